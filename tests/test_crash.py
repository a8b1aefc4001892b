"""kill -9 safety: a process killed anywhere in create, delete or gc leaves a repository that opens,
verifies, restores every committed snapshot byte for byte, and gives back what the dead process wrote.

Children run the real CLI (``python -m blocksnap``) or a few lines over the Client; the named crash
points of backup.py (BLOCKSNAP_CRASHPOINT) SIGKILL the child at a fixed place, the other cases kill it
after a seeded random delay.
"""
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import MiB, allocated, restores_identical, write_random

import blocksnap
from blocksnap.api import Client
from blocksnap.store import catalog as catalogs

CHUNK = 64 << 10
CRASHPOINTS = ("mid-scan", "after-pack-fsync", "after-pack-index", "before-commit", "after-commit")


# --- helpers -------------------------------------------------------------------------------------------
def child_env(**extra):
    """The environment of a child that imports this blocksnap (in tree or installed)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(blocksnap.__file__)))
    env.update(extra)
    return env


def cli(*args, **extra_env):
    """Start ``python -m blocksnap ARGS`` as a child; returns the Popen."""
    return subprocess.Popen([sys.executable, "-m", "blocksnap", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env(**extra_env))


def script(code, *args):
    """Start ``python -c CODE ARGS``; the code prints ``go`` when it starts the work to be killed."""
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env())


def finish(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err




def put_content(image, saved):
    """Make ``image`` hold the bytes of ``saved``, keeping its inode (the disk is registered by path)."""
    with open(saved, "rb") as src, open(image, "r+b") as dst:
        shutil.copyfileobj(src, dst, 8 * MiB)
        dst.truncate()




def reopen(path):
    """A fresh Client: this process's LMDB environment of the catalog is closed and opened again."""
    catalogs.close_env(os.path.join(path, "catalog"))
    return Client(path)


def snapshots(client, disk_id=None):
    return client.describe_snapshots(disk_id=disk_id, sizes=False)["Snapshots"]["Snapshot"]




def assert_gc_left_nothing(client):
    """A dry run after gc plans no work: no dead chunks, orphan packs or interrupted reclaims."""
    plan = client.gc(dry_run=True)
    assert (plan["DeadChunks"], plan["DeadSegments"], plan["DeadBytes"], plan["OrphanPacks"], plan["OrphanBytes"],
            plan["UnnamedRecords"], plan["UnnamedBytes"], plan["PendingReclaim"],
            plan["ExpiredSnapshots"]) == (0, 0, 0, 0, 0, 0, 0, 0, []), plan


def reference_pack_bytes(tmp_path, contents, name):
    """Allocated bytes of packs/ in a fresh repository holding snapshots of ``contents`` (saved images)."""
    path = str(tmp_path / f"ref-{name}")
    Client.init(path, chunk_size=CHUNK)
    image = str(tmp_path / f"ref-{name}.raw")
    open(image, "wb").close()
    with Client(path) as c:
        disk = c.add_disk(image)["DiskId"]
        for saved in contents:
            put_content(image, saved)
            c.create_snapshot(disk)
    catalogs.close_env(os.path.join(path, "catalog"))
    out = allocated(os.path.join(path, "packs"))
    shutil.rmtree(path)
    os.unlink(image)
    return out


def check_after_kill(client, tmp_path, disk, s1, a_saved, b_saved, image, ref_cache):
    """The checks every killed create must pass; returns the interrupted snapshot's final status.

    S1 restores to ``a_saved``; the interrupted snapshot (if it was registered) is failed, or accomplished
    and restores to ``b_saved``; a new create of the disk (content A again) succeeds; gc then leaves
    nothing to do and packs/ is as small as a fresh repository with the same snapshots (within 10 %).
    """
    assert client.verify()["Ok"]
    assert restores_identical(client, tmp_path, s1, a_saved)
    others = [s for s in snapshots(client, disk) if s["SnapshotId"] != s1]
    assert len(others) <= 1, others
    status = others[0]["Status"] if others else None
    assert status in (None, "failed", "accomplished")
    if status == "accomplished":
        assert others[0]["Progress"] == "100%"
        assert restores_identical(client, tmp_path, others[0]["SnapshotId"], b_saved)
    else:
        assert not [s for s in snapshots(client) if s["Status"] == "progressing"]

    put_content(image, a_saved)
    s3 = client.create_snapshot(disk)["SnapshotId"]
    assert restores_identical(client, tmp_path, s3, a_saved)

    client.gc()
    assert_gc_left_nothing(client)
    live = [a_saved, b_saved, a_saved] if status == "accomplished" else [a_saved, a_saved]
    key = "ab" if status == "accomplished" else "a"
    if key not in ref_cache:
        ref_cache[key] = reference_pack_bytes(tmp_path, live, key)
    have = allocated(os.path.join(client.repo.path, "packs"))
    assert 0.9 * ref_cache[key] <= have <= 1.1 * ref_cache[key], (have, ref_cache[key])
    out = client.verify()
    assert out["Ok"] and out["Problems"] == []
    return status


# --- named crash points --------------------------------------------------------------------------------
@pytest.mark.parametrize("point", CRASHPOINTS)
def test_create_killed_at_crashpoint_leaves_repository_intact(point, tmp_path, repo_path):
    """A create SIGKILLed at a named crash point harms no committed snapshot, never blocks the disk, and gc
    gives back all it wrote."""
    image = write_random(tmp_path / "disk.raw", 32 * MiB)
    a_saved = str(tmp_path / "a.saved")
    shutil.copyfile(image, a_saved)
    c = Client(repo_path)
    disk = c.add_disk(image)["DiskId"]
    s1 = c.create_snapshot(disk)["SnapshotId"]
    # B rewrites the first half, so the first window already stores data (mid-scan leaves a pack behind).
    write_random(image, 16 * MiB, offset=0)
    b_saved = str(tmp_path / "b.saved")
    shutil.copyfile(image, b_saved)
    c.close()
    catalogs.close_env(os.path.join(repo_path, "catalog"))

    rc, out, err = finish(cli("--repo", repo_path, "snapshot", "create", disk, BLOCKSNAP_CRASHPOINT=point))
    assert rc == -signal.SIGKILL, (rc, out, err)

    c = reopen(repo_path)
    try:
        status = check_after_kill(c, tmp_path, disk, s1, a_saved, b_saved, image, {})
    finally:
        c.close()
    assert status == ("accomplished" if point == "after-commit" else "failed")


# --- kills at random times -----------------------------------------------------------------------------
def test_create_killed_at_random_times_leaves_repository_intact(tmp_path, repo_path):
    """A create SIGKILLed after a random delay, wherever it is, harms no committed snapshot and leaves
    nothing gc cannot give back."""
    image = write_random(tmp_path / "disk.raw", 128 * MiB)
    a_saved = str(tmp_path / "a.saved")
    shutil.copyfile(image, a_saved)
    with Client(repo_path) as c:
        disk = c.add_disk(image)["DiskId"]
        s1 = c.create_snapshot(disk)["SnapshotId"]
    catalogs.close_env(os.path.join(repo_path, "catalog"))
    write_random(image, 96 * MiB, offset=16 * MiB)
    b_saved = str(tmp_path / "b.saved")
    shutil.copyfile(image, b_saved)

    # Aim the kills at the create: delays in [0.05 s, 1.5 s], but no later than an unkilled create ends.
    calib = str(tmp_path / "calib")
    shutil.copytree(repo_path, calib)
    t0 = time.monotonic()
    rc, out, err = finish(cli("--repo", calib, "snapshot", "create", disk))
    assert rc == 0, err
    span = min(1.5, max(0.1, time.monotonic() - t0))
    shutil.rmtree(calib)

    rng = random.Random(20240611)
    ref_cache = {}
    outcomes = []
    for i in range(5):
        work = str(tmp_path / f"repo-{i}")
        shutil.copytree(repo_path, work)
        put_content(image, b_saved)
        delay = rng.uniform(0.05, span)
        proc = cli("--repo", work, "snapshot", "create", disk)
        time.sleep(delay)  # the fault: when the kill lands
        proc.send_signal(signal.SIGKILL)
        rc, out, err = finish(proc)
        assert rc in (0, -signal.SIGKILL), (rc, out, err)
        c = reopen(work)
        try:
            status = check_after_kill(c, tmp_path, disk, s1, a_saved, b_saved, image, ref_cache)
        finally:
            c.close()
        catalogs.close_env(os.path.join(work, "catalog"))
        shutil.rmtree(work)
        if rc == 0:
            assert status == "accomplished"
        outcomes.append((round(delay, 2), rc, status))
    assert any(status == "failed" for _, _, status in outcomes), f"no kill landed inside a create: {outcomes}"


# --- kills during delete and gc ------------------------------------------------------------------------
DELETE_SCRIPT = """
import sys
from blocksnap.api import Client
c = Client(sys.argv[1])
print("go", flush=True)
for sid in sys.argv[2:]:
    c.delete_snapshot(sid)
"""

GC_SCRIPT = """
import sys
from blocksnap.api import Client
c = Client(sys.argv[1])
print("go", flush=True)
c.gc()
"""


@pytest.fixture(scope="module")
def many_base(tmp_path_factory):
    """Built once per module: a 4 KiB-chunk repository with 8 snapshots of a 16 MiB image that changes
    3 MiB each time. Small chunks make delete and gc long enough (thousands of index entries) for a kill
    to land inside. Returns (repo path, [(snapshot id, saved image)])."""
    base = tmp_path_factory.mktemp("many")
    path = str(base / "repo")
    Client.init(path, chunk_size=4 << 10)
    image = write_random(base / "many.raw", 16 * MiB)
    rng = random.Random(7)
    snaps = []
    with Client(path) as c:
        disk = c.add_disk(image)["DiskId"]
        for i in range(8):
            if i:
                write_random(image, 3 * MiB, offset=rng.randrange(0, 13 * MiB, 4096))
            saved = str(base / f"many-{i}.saved")
            shutil.copyfile(image, saved)
            snaps.append((c.create_snapshot(disk)["SnapshotId"], saved))
    catalogs.close_env(os.path.join(path, "catalog"))
    return path, snaps


@pytest.fixture
def many_snapshots(many_base, tmp_path):
    """A private copy of ``many_base``: (repo path, [(snapshot id, saved image)])."""
    path = str(tmp_path / "many")
    shutil.copytree(many_base[0], path)
    return path, many_base[1]


def run_and_kill(code, args, delay):
    """Start a child script, wait for its ``go``, SIGKILL it ``delay`` s later; returns its exit status."""
    proc = script(code, *args)
    line = proc.stdout.readline()
    assert line.strip() == "go", (line, proc.stderr.read() if proc.poll() is not None else "")
    time.sleep(delay)  # the fault: when the kill lands
    proc.send_signal(signal.SIGKILL)
    rc, out, err = finish(proc)
    assert rc in (0, -signal.SIGKILL), (rc, out, err)
    return rc


def kill_delays(rng, span, n):
    """``n`` seeded delays within ``span``; the first within its first tenth, so at least one kill lands
    inside the work even when a run is much faster than the measured one."""
    return [rng.uniform(0, 0.1 * span)] + [rng.uniform(0, span) for _ in range(n - 1)]


def check_survivors(path, tmp_path, snaps):
    """The repository opens, verifies, and every remaining accomplished snapshot restores identical."""
    c = reopen(path)
    try:
        out = c.verify()
        assert out["Ok"] and out["Problems"] == [], out
        saved = dict(snaps)
        left = snapshots(c)
        assert all(s["Status"] == "accomplished" for s in left)
        for s in left:
            assert restores_identical(c, tmp_path, s["SnapshotId"], saved[s["SnapshotId"]])
        return [s["SnapshotId"] for s in left]
    finally:
        c.close()
        catalogs.close_env(os.path.join(path, "catalog"))


def measure(code, args):
    """How long the child's work takes when nobody kills it (to aim the kills inside it)."""
    proc = script(code, *args)
    assert proc.stdout.readline().strip() == "go"
    t0 = time.monotonic()
    rc, _, err = finish(proc)
    assert rc == 0, err
    return time.monotonic() - t0


def test_delete_killed_leaves_remaining_snapshots_intact(tmp_path, many_snapshots):
    """Deletes SIGKILLed at random points leave a repository that verifies, restores every remaining
    snapshot identically, and whose leftovers gc reclaims."""
    path, snaps = many_snapshots
    victims = [sid for sid, _ in snaps[:-1]]
    calib = str(tmp_path / "calib")
    shutil.copytree(path, calib)
    span = measure(DELETE_SCRIPT, [calib, *victims])
    shutil.rmtree(calib)

    rng = random.Random(11)
    killed = 0
    for i, delay in enumerate(kill_delays(rng, span, 3)):
        work = str(tmp_path / f"del-{i}")
        shutil.copytree(path, work)
        rc = run_and_kill(DELETE_SCRIPT, [work, *victims], delay)
        killed += rc == -signal.SIGKILL
        left = check_survivors(work, tmp_path, snaps)
        assert snaps[-1][0] in left
        with Client(work) as c:
            c.gc()
            assert_gc_left_nothing(c)
        check_survivors(work, tmp_path, snaps)
        shutil.rmtree(work)
    assert killed, "no kill landed before the deletes finished"


def test_gc_killed_leaves_repository_intact(tmp_path, many_snapshots):
    """gc SIGKILLed at random points, twice in a row, never harms a live snapshot, and a final gc
    finishes the work."""
    path, snaps = many_snapshots
    with Client(path) as c:
        for sid, _ in snaps[1:7]:
            c.repo.delete_snapshot(sid, reclaim=False)  # leave the dead chunks for gc
        dead = c.gc(dry_run=True)["DeadChunks"]
    catalogs.close_env(os.path.join(path, "catalog"))
    assert dead > 1000
    kept = [snaps[0], snaps[7]]
    calib = str(tmp_path / "calib")
    shutil.copytree(path, calib)
    span = measure(GC_SCRIPT, [calib])
    shutil.rmtree(calib)

    rng = random.Random(5)
    delays = iter(kill_delays(rng, span, 6))
    killed = 0
    for i in range(3):
        work = str(tmp_path / f"gc-{i}")
        shutil.copytree(path, work)
        for _ in range(2):  # the second kill lands on what the first killed gc left
            rc = run_and_kill(GC_SCRIPT, [work], next(delays))
            killed += rc == -signal.SIGKILL
            assert sorted(check_survivors(work, tmp_path, kept)) == sorted(sid for sid, _ in kept)
        with Client(work) as c:
            c.gc()
            assert_gc_left_nothing(c)
        check_survivors(work, tmp_path, kept)
        shutil.rmtree(work)
    assert killed, "no kill landed before gc finished"


# Children that SIGKILL themselves at a fixed point of reclamation, via a wrapper around one engine method.
KILL_IN_RECLAIM = """
import os, signal, sys
from blocksnap.store import packs, refs
where, op, path, *sids = sys.argv[1:]
if where == "before-punch":  # index entries are gone, the reclaim list is committed, nothing punched yet
    refs.Reclaim.process = lambda self: os.kill(os.getpid(), signal.SIGKILL)
else:  # the first dead pack is unlinked or range punched; the reclaim list is not cleared yet
    def killing(orig):
        def run(self, *args):
            out = orig(self, *args)
            os.kill(os.getpid(), signal.SIGKILL)
            return out
        return run
    packs.PackStore.remove = killing(packs.PackStore.remove)
    packs.PackStore.punch = killing(packs.PackStore.punch)
from blocksnap.api import Client
c = Client(path)
if op == "delete":
    for sid in sids:
        c.delete_snapshot(sid)
else:
    c.gc()
"""


@pytest.mark.parametrize("where", ["before-punch", "mid-reclaim"])
@pytest.mark.parametrize("op", ["delete", "gc"])
def test_killed_during_reclaim_leaves_work_gc_finishes(op, where, tmp_path, many_snapshots):
    """A delete or gc killed between updating the index and giving the space back leaves every remaining
    snapshot intact, and the next gc finishes the reclamation so packs on disk match the index again."""
    path, snaps = many_snapshots
    victims = [sid for sid, _ in snaps[:7]]
    if op == "gc":
        with Client(path) as c:
            for sid in victims:
                c.repo.delete_snapshot(sid, reclaim=False)
        catalogs.close_env(os.path.join(path, "catalog"))
    args = [where, op, path, *(victims if op == "delete" else [])]
    proc = subprocess.Popen([sys.executable, "-c", KILL_IN_RECLAIM, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env())
    rc, out, err = finish(proc)
    assert rc == -signal.SIGKILL, (rc, out, err)

    kept = [snaps[7]] if op == "gc" else [s for s in snaps if s[0] not in victims[:1]]
    left = check_survivors(path, tmp_path, kept)
    assert snaps[7][0] in left
    with Client(path) as c:
        plan = c.gc(dry_run=True)
        assert plan["PendingReclaim"] + plan["DeadChunks"] + plan["DeadSegments"] > 0  # work left behind
        c.gc()
        assert_gc_left_nothing(c)
        with c.repo.catalog.read() as txn:
            indexed_packs = {k.hex() for k in txn.keys("packs")}
        on_disk = {p.hex() for p in c.repo.packs.list_packs()}
        assert on_disk == indexed_packs
    check_survivors(path, tmp_path, kept)


def test_process_killed_inside_a_catalog_write_does_not_block_writers(tmp_path, repo_path):
    """A process SIGKILLed while it holds the catalog's write transaction neither blocks the next writer nor
    leaves its uncommitted change behind."""
    code = """
import os, signal, sys
from blocksnap.api import Client
c = Client(sys.argv[1])
txn = c.repo.catalog.write().__enter__()
txn.put_meta_u64(b"half-done", 1)
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.Popen([sys.executable, "-c", code, repo_path], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env())
    rc, _, err = finish(proc)
    assert rc == -signal.SIGKILL, err
    image = write_random(tmp_path / "a.raw", 4 * MiB)
    # A writer in a child, so a stuck write lock shows as a timeout instead of hanging the test run.
    add = subprocess.run([sys.executable, "-m", "blocksnap", "--repo", repo_path, "disk", "add", image],
                         check=False, capture_output=True, text=True, env=child_env(), timeout=60)
    assert add.returncode == 0, add.stderr
    c = reopen(repo_path)
    try:
        sid = c.create_snapshot(add.stdout.strip())["SnapshotId"]
        assert restores_identical(c, tmp_path, sid, image)
        with c.repo.catalog.read() as txn:
            assert txn._t.get(b"Mhalf-done") is None
    finally:
        c.close()


# --- init ------------------------------------------------------------------------------------------------
def test_init_killed_before_its_rename_leaves_no_half_repository(tmp_path):
    """An init killed at its last step leaves no repository at all (only a hidden build directory beside
    it): a new init, or the default repository's first use, then works."""
    home = tmp_path / "home"
    repo = tmp_path / "r"
    rc, _, _ = finish(cli("--repo", str(repo), "init", BLOCKSNAP_CRASHPOINT="init-before-rename"))
    assert rc == -signal.SIGKILL
    assert not repo.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".r.init-")]
    rc, out, err = finish(cli("--repo", str(repo), "init"))
    assert rc == 0, err
    rc, out, err = finish(cli("--repo", str(repo), "disk", "list"))
    assert rc == 0, err

    rc, _, _ = finish(cli("disk", "list", HOME=str(home), XDG_DATA_HOME=str(home / "data"),
                          BLOCKSNAP_CRASHPOINT="init-before-rename"))
    assert rc == -signal.SIGKILL
    rc, out, err = finish(cli("disk", "list", HOME=str(home), XDG_DATA_HOME=str(home / "data")))
    assert rc == 0 and "Traceback" not in err, err


def test_init_over_what_an_older_killed_init_left(tmp_path):
    """Versions before 2026-11-27 built the repository in place; one killed before writing its config left
    packs/, locks/ and catalog/ without config. init (and the default repository's first use) start over
    there; a directory holding anything else is still refused."""
    from blocksnap import errors
    from blocksnap.repository import Repository

    half = tmp_path / "half"
    for sub in ("packs", "locks"):
        (half / sub).mkdir(parents=True)
    catalogs.create(str(half / "catalog"), "0" * 32)
    with pytest.raises(errors.RepositoryNotFound):
        Repository.open(str(half))
    Client.init(str(half), chunk_size=CHUNK)
    with Client(str(half)) as c:
        assert c.describe_disks()["TotalCount"] == 0
    catalogs.close_env(str(half / "catalog"))

    other = tmp_path / "other"
    (other / "packs").mkdir(parents=True)
    (other / "notes.txt").write_text("mine")
    with pytest.raises(errors.RepositoryExists):
        Client.init(str(other))
    assert (other / "notes.txt").read_text() == "mine"


def test_first_use_of_the_default_repository_by_several_processes_at_once(tmp_path):
    """Four processes using the per-user default repository for the first time at the same moment: all
    succeed, and there is one repository."""
    home = tmp_path / "home"
    env = {"HOME": str(home), "XDG_DATA_HOME": str(home / "data")}
    procs = [cli("disk", "list", "--json", **env) for _ in range(4)]
    results = [finish(p) for p in procs]
    assert [rc for rc, _, _ in results] == [0, 0, 0, 0], [err for _, _, err in results]
    repos = [p for p in (home / "data").rglob("config")]
    assert len(repos) == 1


def test_first_use_of_the_default_repository_when_another_process_makes_it_meanwhile(monkeypatch):
    """The race above made certain: between this process's look for the default repository's config and
    its init, another process creates the repository. The Client opens that one."""
    from blocksnap import errors
    from blocksnap.repository import Repository, default_repo_path

    real_init = Repository.init.__func__

    def init_after_another(cls, path, chunk_size=CHUNK):
        real_init(cls, path, chunk_size)  # the other process wins
        catalogs.close_env(os.path.join(path, "catalog"))
        return real_init(cls, path, chunk_size)  # ours then finds it there

    monkeypatch.setattr(Repository, "init", classmethod(init_after_another))
    with pytest.raises(errors.RepositoryExists):
        Repository.init(str(default_repo_path()) + "-probe")
    with Client() as c:
        assert c.repo.path == default_repo_path() and c.describe_disks()["TotalCount"] == 0


def test_init_in_an_existing_empty_directory_killed_or_not(tmp_path):
    """An existing empty directory (a mount point, or behind a symlink) is filled, not replaced: the symlink
    stays a symlink. Killed before its config is in place, init leaves what the next init clears."""
    target = tmp_path / "disk"
    target.mkdir()
    link = tmp_path / "backup"
    link.symlink_to(target)
    rc, _, _ = finish(cli("--repo", str(link), "init", BLOCKSNAP_CRASHPOINT="init-before-rename"))
    assert rc == -signal.SIGKILL
    assert not (target / "config").exists()
    rc, _, err = finish(cli("--repo", str(link), "disk", "list"))
    assert rc != 0 and "Repository.NotFound" in err
    rc, _, err = finish(cli("--repo", str(link), "init"))
    assert rc == 0, err
    assert link.is_symlink() and (target / "config").is_file()
    assert sorted(p.name for p in target.iterdir()) == ["catalog", "config", "disks", "locks", "packs", "snapshots"]
    rc, _, err = finish(cli("--repo", str(link), "disk", "list"))
    assert rc == 0, err


def test_init_at_a_mount_point(mount_tmpfs):
    """The root of a freshly mounted backup disk (a tmpfs here) takes a repository."""
    mnt = mount_tmpfs("mnt", "16m")
    rc, _, err = finish(cli("--repo", mnt, "init"))
    assert rc == 0, err
    rc, _, err = finish(cli("--repo", mnt, "disk", "list"))
    assert rc == 0, err


def test_init_never_deletes_what_is_not_a_killed_init(tmp_path):
    """A directory whose names happen to be init's (catalog/, locks/, config.tmp) but whose contents are the
    user's, or a repository that lost only its config while its catalog holds disks, is refused as it is."""
    from blocksnap import errors

    mine = tmp_path / "proj"
    (mine / "catalog").mkdir(parents=True)
    (mine / "locks").mkdir()
    (mine / "catalog" / "products.csv").write_text("important")
    (mine / "locks" / "notes.txt").write_text("x")
    (mine / "config.tmp").write_text("cfg")
    with pytest.raises(errors.RepositoryExists):
        Client.init(str(mine))
    assert (mine / "catalog" / "products.csv").read_text() == "important"
    assert (mine / "locks" / "notes.txt").read_text() == "x" and (mine / "config.tmp").read_text() == "cfg"

    lost = tmp_path / "lost"
    Client.init(str(lost), chunk_size=CHUNK)
    image = tmp_path / "a.raw"
    image.write_bytes(b"x" * 4096)
    with Client(str(lost)) as c:
        c.add_disk(str(image))
    catalogs.close_env(str(lost / "catalog"))
    (lost / "config").unlink()
    with pytest.raises(errors.RepositoryExists):
        Client.init(str(lost), chunk_size=CHUNK)
    assert (lost / "catalog" / "data.mdb").exists()


def test_inits_racing_on_one_existing_directory(tmp_path):
    """Several inits of the same existing empty directory at once (the per-user default's first use, when
    its directory exists): one makes the repository, the others are Repository.Exists, and the one made is
    whole and stays."""
    target = tmp_path / "shared"
    for trial in range(6):
        d = target / str(trial)
        d.mkdir(parents=True)
        procs = [cli("--repo", str(d), "init") for _ in range(3)]
        results = [finish(p) for p in procs]
        codes = sorted(rc for rc, _, _ in results)
        assert codes == [0, 6, 6], [err for _, _, err in results]
        for rc, _, err in results:
            if rc:
                assert "Repository.Exists" in err and "Traceback" not in err, err
        assert sorted(p.name for p in d.iterdir()) == ["catalog", "config", "disks", "locks", "packs", "snapshots"]
        rc, _, err = finish(cli("--repo", str(d), "disk", "list"))
        assert rc == 0, err


def test_an_init_waits_for_another_building_in_the_same_directory(tmp_path, monkeypatch):
    """The race made certain: init A is building inside the directory when init B starts there. B must
    not take A's build for a killed one and clear it: it waits, then finds the repository."""
    import threading
    import time

    from blocksnap import errors, repository

    from blocksnap.store import layout

    real_build = layout._build
    building = threading.Event()

    def slow_build(build, chunk_size):
        building.set()
        time.sleep(0.5)
        return real_build(build, chunk_size)

    monkeypatch.setattr(layout, "_build", slow_build)
    d = tmp_path / "d"
    d.mkdir()
    outcome = {}

    def init_a():
        try:
            outcome["a"] = repository.Repository.init(str(d), CHUNK).config["RepositoryId"]
        except Exception as exc:  # reported below
            outcome["a"] = exc

    a = threading.Thread(target=init_a)
    a.start()
    assert building.wait(10)
    monkeypatch.setattr(layout, "_build", real_build)
    with pytest.raises(errors.RepositoryExists):
        repository.Repository.init(str(d), CHUNK)
    a.join(30)
    assert isinstance(outcome["a"], str), outcome
    catalogs.close_env(str(d / "catalog"))
    with Client(str(d)) as c:
        assert c.repo.config["RepositoryId"] == outcome["a"]
