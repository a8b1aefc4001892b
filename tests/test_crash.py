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
from blocksnap import errors
from blocksnap.api import Client
from blocksnap.store import catalog as catalogs

CHUNK = 64 << 10
CRASHPOINTS = ("mid-scan", "after-pack-fsync", "after-pack-index", "after-object", "before-commit", "after-commit")


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
    # After its snapshot object is stored, a create has happened for every reader (the object is the record).
    assert status == ("accomplished" if point in ("after-object", "after-commit") else "failed")


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


@pytest.mark.parametrize("point", ["delete-marked", "delete-object-gone"])
def test_delete_killed_at_crashpoint_is_finished_by_gc_or_a_second_delete(point, tmp_path, repo_path):
    """A delete SIGKILLed after its mark or after removing the snapshot's object: the snapshot is gone for
    every reader at once, the other snapshot restores, verify is clean, and gc (or the same delete again, or
    a repair, which must not write the object back) finishes the work, giving back the space."""
    image = write_random(tmp_path / "disk.raw", 8 * MiB)
    a_saved = str(tmp_path / "a.saved")
    shutil.copyfile(image, a_saved)
    with Client(repo_path) as c:
        disk = c.add_disk(image)["DiskId"]
        s1 = c.create_snapshot(disk)["SnapshotId"]
        write_random(image, 8 * MiB)
        s2 = c.create_snapshot(disk)["SnapshotId"]
    catalogs.close_env(os.path.join(repo_path, "catalog"))
    rc, out, err = finish(cli("--repo", repo_path, "snapshot", "delete", s2, BLOCKSNAP_CRASHPOINT=point))
    assert rc == -signal.SIGKILL, (rc, out, err)
    assert os.path.exists(os.path.join(repo_path, "snapshots", s2)) == (point == "delete-marked")

    for finisher in ("gc", "delete", "repair"):
        work = str(tmp_path / f"work-{finisher}")
        shutil.copytree(repo_path, work)
        if finisher == "repair":  # the catalog rebuilt: the marked delete is finished, not undone
            rc, out, err = finish(cli("--repo", work, "repair"))
            assert rc == 0, (out, err)
            assert not os.path.exists(os.path.join(work, "snapshots", s2))  # not written back
            with reopen(work) as c, c.repo.catalog.read() as txn:
                assert txn.snapshot(s2) is None
        with reopen(work) as c:
            assert [s["SnapshotId"] for s in snapshots(c)] == [s1]
            out = c.verify()
            assert out["Ok"] and out["Problems"] == [], out
            assert restores_identical(c, tmp_path, s1, a_saved)
            if finisher == "delete":
                c.delete_snapshot(s2)  # the same delete again finishes it
                with pytest.raises(errors.InvalidSnapshotIdNotFound):
                    c.delete_snapshot(s2)
            c.gc()
            assert_gc_left_nothing(c)
            with c.repo.catalog.read() as txn:
                assert txn.snapshot(s2) is None
            assert not os.path.exists(os.path.join(work, "snapshots", s2))
            assert allocated(os.path.join(work, "packs")) <= 1.1 * 8 * MiB + (1 << 20)  # s2's data is gone
            assert restores_identical(c, tmp_path, s1, a_saved)


def test_disk_add_killed_at_its_crashpoint_leaves_nothing_half_registered(tmp_path, repo_path):
    """'disk add' SIGKILLed after writing its disk object, before its catalog record: the disk is not listed,
    verify is clean, gc removes the object, and adding the same image again works (one disk for the path)."""
    image = write_random(tmp_path / "disk.raw", MiB)
    rc, out, err = finish(cli("--repo", repo_path, "disk", "add", image, BLOCKSNAP_CRASHPOINT="disk-object-written"))
    assert rc == -signal.SIGKILL, (rc, out, err)
    assert len(os.listdir(os.path.join(repo_path, "disks"))) == 1
    with reopen(repo_path) as c:
        assert c.describe_disks()["Disks"]["Disk"] == []
        out = c.verify()
        assert out["Ok"] and out["Problems"] == [], out
        c.gc()
        assert os.listdir(os.path.join(repo_path, "disks")) == []
        disk = c.add_disk(image)["DiskId"]
        assert [d["DiskId"] for d in c.describe_disks()["Disks"]["Disk"]] == [disk]
        sid = c.create_snapshot(disk)["SnapshotId"]
        assert restores_identical(c, tmp_path, sid, image)


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


# --- init killed at every step of its build, and while clearing what a killed one left -----------------
BUILD = ".init-0123456789ab"  # init's build directory: ".init-" and 12 hex digits

# A child that, for each directory, says "start" before touching it (so a crash names the directory), then
# runs init there and opens the result: init is "made" or "Repository.Exists" (or another error code),
# open is "ok" or an error code.
CHECK_INITS = """
import json, sys
from blocksnap import errors
from blocksnap.api import Client
for d in sys.argv[1:]:
    print(json.dumps({"start": d}), flush=True)
    out = {"dir": d}
    try:
        Client.init(d, chunk_size=64 << 10)
        out["init"] = "made"
    except errors.BlocksnapError as exc:
        out["init"] = exc.code
    try:
        with Client(d) as c:
            out["open"] = "ok" if c.describe_disks()["TotalCount"] == 0 else "has disks"
    except errors.BlocksnapError as exc:
        out["open"] = exc.code
    print(json.dumps(out), flush=True)
"""


def check_inits(dirs):
    """``{dir: {"init": ..., "open": ...}}`` from a child running CHECK_INITS over ``dirs``; fails naming the
    directory if the child dies (an LMDB file mapped where its pages are missing is a SIGBUS)."""
    import json

    rc, out, err = finish(script(CHECK_INITS, *map(str, dirs)))
    lines = [json.loads(line) for line in out.splitlines()]
    started = [x["start"] for x in lines if "start" in x]
    assert rc == 0, f"the child died (rc {rc}) at {started[-1] if started else None}: {err}"
    return {x["dir"]: x for x in lines if "dir" in x}


def tree_bytes(path):
    """Every entry under ``path`` with its kind and, for files, its bytes."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs:
            full = os.path.join(root, name)
            out[os.path.relpath(full, path)] = "link" if os.path.islink(full) else "dir"
        for name in files:
            full = os.path.join(root, name)
            out[os.path.relpath(full, path)] = (os.readlink(full) if os.path.islink(full)
                                                else open(full, "rb").read())
    return out


@pytest.fixture(scope="module")
def init_parts(tmp_path_factory):
    """The files a real init writes, and the states LMDB passes through while making its data file: the
    lock file, the two meta pages as mdb_env_init_meta writes them (identical but for their page number),
    the first commit's page, the complete data file, the config; and a catalog that holds a disk."""
    import json
    import struct

    base = tmp_path_factory.mktemp("init-parts")
    repo = base / "repo"
    Client.init(str(repo), chunk_size=CHUNK)
    config = (repo / "config").read_bytes()
    catalog = str(base / "catalog")  # a catalog of that repository, as init makes it (its id must match)
    catalogs.create(catalog, json.loads(config)["RepositoryId"])
    data = open(os.path.join(catalog, "data.mdb"), "rb").read()
    psize = struct.unpack_from("=I", data, 40)[0]
    page0 = data[:psize]
    image = base / "a.raw"
    image.write_bytes(b"x" * 4096)
    with Client(str(repo)) as c:
        c.add_disk(str(image))
    catalogs.close_env(str(repo / "catalog"))
    return {
        "lock": open(os.path.join(catalog, "lock.mdb"), "rb").read(),
        "metas": page0 + struct.pack("=Q", 1) + page0[8:],
        "page2": data[2 * psize:3 * psize],
        "data": data,
        "psize": psize,
        "config": config,
        "records": (repo / "catalog" / "data.mdb").read_bytes(),
    }


def killed_init_states(p):
    """Name -> entries ({relative path: bytes, or None for a directory}) of what init in an existing empty
    directory leaves when killed at each step, in order: _build making the build directory, LMDB making
    the catalog (lock file, then data file: created, its meta pages written, cut short at several points,
    the first commit's page, the commit), the config, the entries moved up one by one; and a later init
    killed while clearing such leftovers (files and directories removed one at a time)."""
    cat, b = f"{BUILD}/catalog", BUILD
    steps = {}
    state = {b: None}
    steps["build directory made"] = dict(state)
    for sub in ("packs", "snapshots", "disks", "locks"):
        state[f"{b}/{sub}"] = None
        steps[f"{sub} made"] = dict(state)
    for name in ("repo.lock", "gate.lock", "read-0.lock", "read-1.lock"):
        state[f"{b}/locks/{name}"] = b""
        steps[f"{name} made"] = dict(state)
    state[cat] = None
    steps["catalog directory made"] = dict(state)
    state[f"{cat}/lock.mdb"] = b""
    steps["lock file created"] = dict(state)
    state[f"{cat}/lock.mdb"] = bytes(len(p["lock"]))
    steps["lock file sized"] = dict(state)
    state[f"{cat}/lock.mdb"] = p["lock"]
    steps["lock file set up"] = dict(state)
    state[f"{cat}/data.mdb"] = b""
    steps["data file created"] = dict(state)
    for cut in (1, 16, 20, 44, p["psize"], p["psize"] + 1, p["psize"] + 1000, 2 * p["psize"] - 1):
        steps[f"meta pages cut at byte {cut}"] = dict(state, **{f"{cat}/data.mdb": p["metas"][:cut]})
    state[f"{cat}/data.mdb"] = p["metas"]
    steps["meta pages written"] = dict(state)
    state[f"{cat}/data.mdb"] = p["metas"] + p["page2"]
    steps["first commit's page written"] = dict(state)
    state[f"{cat}/data.mdb"] = p["data"]
    steps["catalog committed"] = dict(state)
    state[f"{b}/config"] = b""
    steps["config created"] = dict(state)
    steps["config cut short"] = dict(state, **{f"{b}/config": p["config"][:len(p["config"]) // 2]})
    state[f"{b}/config"] = p["config"]
    steps["config written"] = dict(state)
    for sub in ("packs", "snapshots", "disks", "locks", "catalog", "config"):  # config last: then it exists
        state = {(k.replace(f"{b}/", "", 1) if k.startswith(f"{b}/{sub}") else k): v for k, v in state.items()}
        steps[f"{sub} moved up"] = dict(state)
    # A later init clearing what one killed before its config moved up left (it removes entry by entry;
    # shutil.rmtree removes a directory's files first).
    state = steps["catalog moved up"]
    clear = dict(state)
    del clear["catalog/lock.mdb"]
    steps["clearing: catalog's lock file removed"] = dict(clear)
    del clear["catalog/data.mdb"]
    steps["clearing: catalog emptied"] = dict(clear)
    steps["clearing: catalog's data file removed first"] = {k: v for k, v in state.items() if k != "catalog/data.mdb"}
    earlier = dict(steps["catalog committed"])
    del earlier[f"{cat}/lock.mdb"]
    steps["clearing: the build's catalog half removed"] = earlier
    del earlier[f"{b}/packs"]
    steps["clearing: the build's packs removed"] = earlier
    return steps


def not_killed_init_states(p):
    """Name -> entries of directories that look like init's leftovers but are not: init must refuse each
    (Repository.Exists) and leave every byte of it."""
    cat = f"{BUILD}/catalog"
    base = {f"{BUILD}/packs": None, f"{BUILD}/locks": None, cat: None, f"{cat}/lock.mdb": p["lock"]}
    records = p["records"]
    return {
        "the build's catalog holds a disk": dict(base, **{f"{cat}/data.mdb": records}),
        "the build's catalog holds a disk, cut short": dict(base, **{f"{cat}/data.mdb": records[:3 * p["psize"]]}),
        "the build's data file is not LMDB's": dict(base, **{f"{cat}/data.mdb": b"my notes " * 1000}),
        "the build's catalog has another file": dict(base, **{f"{cat}/data.mdb": p["data"], f"{cat}/x.csv": b"1"}),
        "a file in the build's packs": dict(base, **{f"{BUILD}/packs/pack-0001": b"data"}),
        "a file in the build's snapshots": dict(base, **{f"{BUILD}/snapshots/s-1": b"data"}),
        "a lock file with content in the build": dict(base, **{f"{BUILD}/locks/repo.lock": b"mine"}),
        "a file in the build directory": dict(base, **{f"{BUILD}/notes.txt": b"mine"}),
        "the build's config is someone else's": dict(base, **{f"{BUILD}/config": b'{"Format": "other"}'}),
        "the build's lock file is 2 MiB": dict(base, **{f"{cat}/lock.mdb": bytes(2 << 20)}),
        "a directory named .init-mine": {".init-mine": None, ".init-mine/packs": None},
        "a moved-up catalog whose data file is cut short": {"catalog": None, "catalog/data.mdb": p["metas"][:5000]},
        "a moved-up catalog that holds a disk": {"catalog": None, "catalog/data.mdb": records},
    }


def make_entries(root, entries):
    root.mkdir()
    for rel, content in sorted(entries.items()):
        path = root / rel
        if content is None:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
    return root


def test_init_clears_what_an_init_killed_at_any_step_leaves(tmp_path, init_parts):
    """For the leftovers of an init killed at each step of filling an existing empty directory (a
    half-made LMDB data file included), or of one killed while clearing such leftovers, the next init
    makes the repository and it opens; killed after its config is in place, the repository is there."""
    states = killed_init_states(init_parts)
    assert len(states) >= 30
    dirs = {name: make_entries(tmp_path / f"s{i:02d}", entries) for i, (name, entries) in enumerate(states.items())}
    results = check_inits(dirs.values())
    wrong = {}
    for name, d in dirs.items():
        done = "config" in states[name]  # the config was moved into place: the repository exists
        want = {"dir": str(d), "init": "Repository.Exists" if done else "made", "open": "ok"}
        if results.get(str(d)) != want:
            wrong[name] = results.get(str(d))
        elif not done:
            assert sorted(os.listdir(d)) == ["catalog", "config", "disks", "locks", "packs", "snapshots"], name
    assert not wrong, "".join(f"\n{name}: {res}" for name, res in wrong.items())
    assert results[str(dirs["config moved up"])]["init"] == "Repository.Exists"


def test_init_refuses_and_keeps_what_only_looks_like_a_killed_init(tmp_path, init_parts):
    """A build directory or moved-up catalog that a killed init cannot have left (a catalog with records,
    whole or cut short, a file that is not LMDB's, extra files, someone else's config, a big lock file, a
    directory not named as init names its builds) is Repository.Exists, byte for byte as it was, and init
    does not crash on it."""
    states = not_killed_init_states(init_parts)
    dirs = {name: make_entries(tmp_path / f"n{i:02d}", entries) for i, (name, entries) in enumerate(states.items())}
    before = {name: tree_bytes(d) for name, d in dirs.items()}
    results = check_inits(dirs.values())
    for name, d in dirs.items():
        assert results[str(d)]["init"] == "Repository.Exists", (name, results[str(d)])
        assert tree_bytes(d) == before[name], name


def test_init_killed_at_random_moments_of_its_build(tmp_path):
    """30 inits of existing empty directories, each SIGKILLed a random 0-6 ms after its build directory
    appears: the next init of each directory makes the repository (or finds the one that was finished)
    and it opens."""
    rng = random.Random(20261201)
    dirs, finished = [], {}
    for i in range(30):
        d = tmp_path / f"k{i:02d}"
        d.mkdir()
        proc = cli("--repo", str(d), "init")
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline and not any(
                n.startswith(".init-") for n in os.listdir(d)):
            time.sleep(0.0002)
        time.sleep(rng.uniform(0, 0.006))
        proc.send_signal(signal.SIGKILL)
        finish(proc)
        dirs.append(d)
        finished[str(d)] = (d / "config").exists()
    results = check_inits(dirs)
    for d in map(str, dirs):
        want = "Repository.Exists" if finished[d] else "made"
        assert results[d] == {"dir": d, "init": want, "open": "ok"}, results[d]


def test_gc_dry_run_after_a_create_killed_after_its_object_plans_what_gc_does(tmp_path, repo_path):
    """A create killed after storing its object is accomplished for readers before any writer settles it: a
    dry run (which cannot settle it) must count its map as live, plan no dead chunks, and not fail when the
    snapshot is past its retention; gc then does what the dry run said."""
    image = write_random(tmp_path / "disk.raw", 4 * MiB)
    with Client(repo_path) as c:
        disk = c.add_disk(image)["DiskId"]
    catalogs.close_env(os.path.join(repo_path, "catalog"))
    rc, out, err = finish(cli("--repo", repo_path, "snapshot", "create", disk, "--retention-days", "1",
                              BLOCKSNAP_CRASHPOINT="after-object"))
    assert rc == -signal.SIGKILL, (rc, out, err)
    with reopen(repo_path) as c:
        [sid] = [s["SnapshotId"] for s in snapshots(c)]
        plan = c.gc(dry_run=True)
        assert (plan["DeadChunks"], plan["DeadSegments"], plan["ExpiredSnapshots"]) == (0, 0, []), plan
        later = time.time() + 3 * 86400
        plan = c.gc(dry_run=True, now=later)
        assert plan["ExpiredSnapshots"] == [sid] and plan["DeadChunks"] == 64, plan
        done = c.gc(now=later)
        assert done["ExpiredSnapshots"] == [sid] and done["DeadChunks"] == 64, done
        assert snapshots(c) == [] and c.verify()["Ok"]
