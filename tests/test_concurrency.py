"""Concurrency and resource limits: creates seen by other processes, creates racing each other, images that
change while they are read, a full file system, and space given back by delete and gc.

Where two processes must overlap, the children hold at a gate file or a barrier (a wrapper around one
engine function that waits for a file), so the overlap is certain instead of hoped for.
"""
import errno
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time

import pytest
from conftest import MiB, allocated, restores_identical, run_cli, write_random

import blocksnap
from blocksnap import _native, backup, errors
from blocksnap.api import Client
from blocksnap.store import catalog as catalogs
from blocksnap.store import packs as chunkstore
from blocksnap.store import refs

CHUNK = 64 << 10


# --- helpers -------------------------------------------------------------------------------------------
def child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(blocksnap.__file__)))
    return env


def cli_child(*args):
    """``python -m blocksnap ARGS`` run to completion with blocksnap importable; returns CompletedProcess."""
    return run_cli(*args, env={"PYTHONPATH": child_env()["PYTHONPATH"]})


def wrapped_cli(wrapper, *args):
    """Start the CLI in a child after ``wrapper`` (Python source using sys.argv[1:3]) patched the engine."""
    code = wrapper + "\nfrom blocksnap.cli.main import main\nsys.exit(main(sys.argv[3:]))\n"
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env())


# The child scans the first N windows, then waits until the gate file exists (60 s at most).
GATED_SCAN = """
import os, sys, time
from blocksnap import _native
gate, free = sys.argv[1], int(sys.argv[2])
_orig = _native.ExtentScanner.scan_extents
_calls = []
def scan(self, *a, **k):
    _calls.append(1)
    if len(_calls) > free:
        deadline = time.monotonic() + 60
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
    return _orig(self, *a, **k)
_native.ExtentScanner.scan_extents = scan
"""

# The child stops before indexing its first pack until every process named in argv[2] got there too.
INDEX_BARRIER = """
import os, sys, time
from blocksnap import backup
me, everyone = sys.argv[1], sys.argv[2].split(",")
_orig = backup._Create._index_pack
def index_pack(self, handed):
    open(me, "w").close()
    deadline = time.monotonic() + 60
    while not all(os.path.exists(p) for p in everyone) and time.monotonic() < deadline:
        time.sleep(0.01)
    return _orig(self, handed)
backup._Create._index_pack = index_pack
"""






def pack_files(repo_path):
    return sorted(name for _, _, files in os.walk(os.path.join(repo_path, "packs")) for name in files
                  if name.endswith(".pack"))


def db_keys(client, name):
    with client.repo.catalog.read() as txn:
        return set(txn.keys(name))


def db_entries(client, name):
    with client.repo.catalog.read() as txn:
        return txn.count(name)


def referenced_chunks(client):
    """The non-zero chunk ids the maps of all accomplished snapshots name."""
    repo = client.repo
    out = set()
    with repo.catalog.read() as txn:
        for rec in txn.snapshots():
            if rec["Status"] != "accomplished":
                continue
            for sid in refs.split_ids(refs.map_of(txn, rec)):
                if sid != bytes(16):
                    ids = txn.segment(sid).ids
                    out.update(ids[j:j + 16] for j in range(0, len(ids), 16))
    out.discard(bytes(16))
    return out


def snapshot(client, sid):
    (rec,) = client.describe_snapshots(snapshot_ids=[sid], sizes=False)["Snapshots"]["Snapshot"]
    return rec


def listed(repo_path):
    """``snapshot list --json`` as another process sees it."""
    proc = cli_child("--repo", repo_path, "snapshot", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["Snapshots"]["Snapshot"]




def poll(predicate, timeout=60, interval=0.02):
    """The first truthy value of ``predicate()`` within ``timeout`` seconds, else None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None


# --- a create as other processes see it ----------------------------------------------------------------
def test_running_create_is_progressing_and_blocks_a_second_create(tmp_path, repo_path):
    """While a create runs, other processes list it progressing with a partial Progress and a second create
    of the disk fails at once with IncorrectDiskStatus.CreatingSnapshot (exit 4); then it is accomplished."""
    image = write_random(tmp_path / "a.raw", 64 * MiB)
    disk = cli_child("--repo", repo_path, "disk", "add", image).stdout.strip()
    gate = str(tmp_path / "gate")
    child = wrapped_cli(GATED_SCAN, gate, "2", "--repo", repo_path, "snapshot", "create", disk, "--json")
    try:
        def seen():
            snaps = [s for s in listed(repo_path) if s["SourceDiskId"] == disk]
            if snaps and snaps[0]["Status"] == "progressing" and snaps[0]["Progress"] != "0%":
                return snaps
            return None

        snaps = poll(seen)
        assert snaps, "the running create was never listed progressing with Progress above 0%"
        (rec,) = snaps
        pct = rec["Progress"]
        assert pct.endswith("%") and 0 < int(pct[:-1]) < 100, pct

        second = subprocess.run([sys.executable, "-m", "blocksnap", "--repo", repo_path, "snapshot", "create",
                                 disk, "--json"], check=False, capture_output=True, text=True,
                                env=child_env(), timeout=30)  # waiting for the disk lock would run into this
        assert second.returncode == errors.EXIT_CONFLICT == 4, second.stderr
        assert json.loads(second.stdout)["Error"]["Code"] == "IncorrectDiskStatus.CreatingSnapshot"
        assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
        # Listing and the refused create did not turn the live create into a failed one.
        assert [s["Status"] for s in listed(repo_path)] == ["progressing"]
    finally:
        open(gate, "w").close()
        out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert json.loads(out)["SnapshotId"] == rec["SnapshotId"]
    (done,) = listed(repo_path)
    assert (done["Status"], done["Progress"]) == ("accomplished", "100%")
    with Client(repo_path) as c:
        assert restores_identical(c, tmp_path, rec["SnapshotId"], image)


def test_deleting_the_parent_during_a_create_keeps_the_new_snapshot_whole(tmp_path, repo_path):
    """Deleting the parent while a create of its disk runs defers reclamation, and the new snapshot, whose
    unchanged chunks are the parent's, restores identical before and after gc."""
    image = write_random(tmp_path / "a.raw", 64 * MiB)
    with Client(repo_path) as c:
        disk = c.add_disk(image)["DiskId"]
        parent = c.create_snapshot(disk)["SnapshotId"]
    write_random(image, MiB, offset=40 * MiB)
    gate = str(tmp_path / "gate")
    child = wrapped_cli(GATED_SCAN, gate, "2", "--repo", repo_path, "snapshot", "create", disk, "--json")
    try:
        running = poll(lambda: [s for s in listed(repo_path) if s["Status"] == "progressing"])
        assert running, "the create was never seen progressing"
        gone = cli_child("--repo", repo_path, "snapshot", "delete", parent, "--json")
        assert gone.returncode == 0, gone.stderr
        assert json.loads(gone.stdout)["ReclaimedBytes"] == 0  # the running create holds the repository
    finally:
        open(gate, "w").close()
        out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    sid = json.loads(out)["SnapshotId"]
    with Client(repo_path) as c:
        assert restores_identical(c, tmp_path, sid, image)
        c.gc()
        assert c.gc(dry_run=True)["DeadChunks"] == 0
        assert db_keys(c, "chunks") == referenced_chunks(c)
        assert restores_identical(c, tmp_path, sid, image)
        out = c.verify()
        assert out["Ok"] and out["Problems"] == []


def test_listing_a_dead_create_writes_nothing_and_a_new_create_takes_the_disk(tmp_path, repo_path):
    """A listing shows a dead create's record as failed without writing anything (the catalog's last
    transaction id does not move: reads do not write, so they cannot race a new create of that disk); the
    next create of the disk records the failure and succeeds."""
    image = write_random(tmp_path / "a.raw", 4 * MiB)
    disk = cli_child("--repo", repo_path, "disk", "add", image).stdout.strip()
    dead = run_cli("--repo", repo_path, "snapshot", "create", disk,
                   env={"PYTHONPATH": child_env()["PYTHONPATH"], "BLOCKSNAP_CRASHPOINT": "before-commit"})
    assert dead.returncode == -9
    with Client(repo_path) as c:
        before = c.repo.catalog.env.info()["last_txnid"]
        [rec] = c.describe_snapshots()["Snapshots"]["Snapshot"]
        assert rec["Status"] == "failed" and "ended before it finished" in rec["Error"]["Message"]
        with c.repo.catalog.read() as txn:
            assert txn.snapshot(rec["SnapshotId"])["Status"] == "progressing"  # as stored: nothing written
        assert c.repo.catalog.env.info()["last_txnid"] == before
        sid = c.create_snapshot(disk)["SnapshotId"]
        with c.repo.catalog.read() as txn:
            assert txn.snapshot(rec["SnapshotId"])["Status"] == "failed"  # the writer recorded it
        assert restores_identical(c, tmp_path, sid, image)


def test_two_disks_snapshotted_at_once_share_stored_data(tmp_path, repo_path):
    """Two processes snapshotting two disks at the same time both succeed, both restore identical, and the
    8 MiB both images hold is stored once even though both processes wrote it."""
    shared = os.urandom(8 * MiB)
    images = []
    for name, at in (("a", 0), ("b", 8 * MiB)):
        path = write_random(tmp_path / f"{name}.raw", 24 * MiB)
        with open(path, "r+b") as f:
            f.seek(at)
            f.write(shared)
        images.append(path)
    disks = [cli_child("--repo", repo_path, "disk", "add", p).stdout.strip() for p in images]
    marks = [str(tmp_path / f"indexing-{i}") for i in range(2)]
    # Both hold before indexing until both got there: each has then written the shared chunks to its own
    # pack, and the second to index them must find them indexed and give its copy back.
    children = [wrapped_cli(INDEX_BARRIER, marks[i], ",".join(marks), "--repo", repo_path, "snapshot",
                            "create", disks[i], "--json") for i in range(2)]
    sids = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        sids.append(json.loads(out)["SnapshotId"])

    with Client(repo_path) as c:
        for sid, image in zip(sids, images):
            assert restores_identical(c, tmp_path, sid, image)
        out = c.verify()
        assert out["Ok"] and out["Problems"] == []
        unique = (16 + 16 + 8) * MiB
        assert db_entries(c, "chunks") == unique // CHUNK
        assert sum(snapshot(c, sid)["AddedBytes"] for sid in sids) == unique
    data = 2 * 24 * MiB
    packs = allocated(os.path.join(repo_path, "packs"))
    assert packs < data - 0.8 * len(shared), (packs, data)


# --- point in time -------------------------------------------------------------------------------------
def _change_after(monkeypatch, image, windows, how):
    """Make the scanner change ``image`` right after it read ``windows`` windows."""
    orig = _native.ExtentScanner.scan_extents
    calls = []

    def scan(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == windows:
            with open(image, "r+b") as f:
                if how == "rewrite":
                    f.seek(4096)
                    f.write(os.urandom(4096))
                elif how == "append":
                    f.seek(0, os.SEEK_END)
                    f.write(os.urandom(4096))
                else:
                    f.truncate(os.path.getsize(image) // 2)
        return out

    monkeypatch.setattr(_native.ExtentScanner, "scan_extents", scan)


@pytest.mark.parametrize("how", ["rewrite", "append", "truncate"])
def test_image_changed_while_read_fails_and_keeps_nothing(how, tmp_path, client, monkeypatch):
    """An image written to while a create reads it fails the create with ImageChanged, lists the snapshot
    failed and leaves no pack file and no chunk index entry behind; the earlier snapshot still restores."""
    image = str(tmp_path / "a.raw")
    with open(image, "wb") as f:
        f.truncate(32 * MiB)
    empty_saved = str(tmp_path / "empty.saved")
    shutil.copyfile(image, empty_saved)
    disk = client.add_disk(image)["DiskId"]
    s1 = client.create_snapshot(disk)["SnapshotId"]  # all holes: stores nothing
    write_random(image, 32 * MiB)
    _change_after(monkeypatch, image, 1, how)

    with pytest.raises(errors.ImageChanged) as info:
        client.create_snapshot(disk)
    assert isinstance(info.value, errors.CreateSnapshotFailed)
    assert info.value.code == "CreateSnapshot.ImageChanged"
    (failed,) = [s for s in client.describe_snapshots(disk)["Snapshots"]["Snapshot"] if s["SnapshotId"] != s1]
    assert failed["Status"] == "failed"
    assert failed["Error"]["Code"] == "CreateSnapshot.ImageChanged"
    assert pack_files(client.repo.path) == []
    assert [db_entries(client, db) for db in ("chunks", "packs", "reclaim")] == [0, 0, 0]
    assert restores_identical(client, tmp_path, s1, empty_saved)


def test_image_changed_after_packs_were_indexed_gives_them_back(tmp_path, client, monkeypatch):
    """A create that already sealed and indexed packs when the image changed removes those packs and index
    entries again; the previous snapshot restores identical and a create of the settled image succeeds."""
    monkeypatch.setattr(chunkstore, "PACK_TARGET", 4 * MiB)  # a sealed, indexed pack per ~4 MiB
    image = write_random(tmp_path / "a.raw", 32 * MiB)
    a_saved = str(tmp_path / "a.saved")
    shutil.copyfile(image, a_saved)
    disk = client.add_disk(image)["DiskId"]
    s1 = client.create_snapshot(disk)["SnapshotId"]
    before = (pack_files(client.repo.path), db_keys(client, "chunks"), db_keys(client, "packs"))
    write_random(image, 32 * MiB)
    indexed = []
    orig_index = backup._Create._index_pack

    def index_pack(self, handed):
        orig_index(self, handed)
        indexed.append(db_entries(client, "chunks"))
        if len(indexed) == 2:  # two packs are durable and indexed: now the image changes
            with open(image, "r+b") as f:
                f.write(os.urandom(4096))

    monkeypatch.setattr(backup._Create, "_index_pack", index_pack)
    with pytest.raises(errors.ImageChanged):
        client.create_snapshot(disk)
    assert len(indexed) >= 2 and indexed[1] > len(before[1])
    assert (pack_files(client.repo.path), db_keys(client, "chunks"), db_keys(client, "packs")) == before
    assert db_entries(client, "reclaim") == 0
    assert restores_identical(client, tmp_path, s1, a_saved)

    monkeypatch.undo()
    b_saved = str(tmp_path / "b.saved")
    shutil.copyfile(image, b_saved)
    s3 = client.create_snapshot(disk)["SnapshotId"]
    assert restores_identical(client, tmp_path, s3, b_saved)
    out = client.verify()
    assert out["Ok"] and out["Problems"] == []


# --- a full file system --------------------------------------------------------------------------------
@pytest.fixture
def small_fs(mount_tmpfs):
    """A 24 MiB tmpfs mounted for the test (skips when mounting is not allowed)."""
    return mount_tmpfs("small", "24m")


def test_full_file_system_fails_create_with_no_space_and_recovers(tmp_path, small_fs):
    """A create that fills the repository's file system fails with CreateSnapshot.NoSpace (exit 5, one line),
    keeps nothing, leaves earlier snapshots intact, and the repository works again afterwards."""
    repo = os.path.join(small_fs, "repo")
    Client.init(repo, chunk_size=CHUNK)
    small = write_random(tmp_path / "small.raw", 2 * MiB)
    big = write_random(tmp_path / "big.raw", 64 * MiB)
    with Client(repo) as c:
        s1 = c.create_snapshot(c.add_disk(small)["DiskId"])["SnapshotId"]
        big_disk = c.add_disk(big)["DiskId"]
        used = allocated(os.path.join(repo, "packs"))

        with pytest.raises(errors.NoSpace) as info:
            c.create_snapshot(big_disk)
        assert info.value.code == "CreateSnapshot.NoSpace"
        assert allocated(os.path.join(repo, "packs")) == used

    proc = cli_child("--repo", repo, "snapshot", "create", big_disk)
    assert proc.returncode == errors.EXIT_FAILED == 5, proc.stderr
    assert proc.stderr.startswith("blocksnap: error: CreateSnapshot.NoSpace: ")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr

    with Client(repo) as c:
        fails = c.describe_snapshots(big_disk)["Snapshots"]["Snapshot"]
        assert [(s["Status"], s["Error"]["Code"]) for s in fails] == [("failed", errors.NoSpace.code)] * 2
        assert allocated(os.path.join(repo, "packs")) == used
        out = c.verify()
        assert out["Ok"] and out["Problems"] == []
        assert restores_identical(c, tmp_path, s1, small)
        c.gc()
        with open(big, "r+b") as f:  # the big image's data is gone; a small one fits again
            f.truncate(4 * MiB)
        s3 = c.create_snapshot(big_disk)["SnapshotId"]
        assert restores_identical(c, tmp_path, s3, big)
        out = c.verify()
        assert out["Ok"] and out["Problems"] == []


def test_full_file_system_at_registration_raises_no_space(tmp_path, small_fs):
    """A create whose very first catalog write finds the file system full raises the typed NoSpace error."""
    repo = os.path.join(small_fs, "repo")
    Client.init(repo, chunk_size=CHUNK)
    image = str(tmp_path / "sparse.raw")
    with open(image, "wb") as f:
        f.truncate(8 * MiB)
    with Client(repo) as c:
        disk = c.add_disk(image)["DiskId"]
        with open(os.path.join(small_fs, "filler"), "wb") as f:  # someone else fills the file system
            try:
                while True:
                    f.write(bytes(1 << 16))
                    f.flush()
            except OSError:
                pass
        with pytest.raises(errors.NoSpace):
            c.create_snapshot(disk)


@pytest.mark.parametrize("room", [0, 4096, 20000, 300000])
def test_a_catalog_commit_cut_short_by_a_full_disk_is_no_space(tmp_path, small_fs, room):
    """With the file system full but for ``room`` bytes, a create fails with CreateSnapshot.NoSpace, also when
    LMDB's commit is cut short by the full disk (it reports that as EIO, 'Input/output error'), keeps
    nothing, and the repository still verifies."""
    repo = os.path.join(small_fs, "repo")
    Client.init(repo, chunk_size=CHUNK)
    image = write_random(tmp_path / "a.raw", 2 * MiB)
    with Client(repo) as c:
        disk = c.add_disk(image)["DiskId"]
        filler = os.path.join(small_fs, "filler")
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(bytes(4096))
            except OSError:
                pass
        if room:
            os.truncate(filler, os.path.getsize(filler) - room)
        with pytest.raises(errors.NoSpace):
            c.create_snapshot(disk)
        os.unlink(filler)
        assert [s["Status"] for s in c.describe_snapshots()["Snapshots"]["Snapshot"]] in ([], ["failed"])
        assert c.verify()["Ok"]
        sid = c.create_snapshot(disk)["SnapshotId"]
        assert restores_identical(c, tmp_path, sid, image)


def test_a_pack_whose_last_write_fails_is_abandoned_cleanly():
    """When a pack's writes fail (a full device), detach raises the OSError and a later abort still stops the writer without a second error (the create then reports NoSpace, not a bug of
    the C core's arguments)."""
    class Backend:
        def create_pack(self, pack_id):
            return os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC

    class Store:
        backend = Backend()

    writer = chunkstore.PackWriter(Store())
    data = os.urandom(chunkstore.STAGE_BYTES)  # fills a staging buffer: its write goes out, and fails
    writer.add_many(data, [(b"\1" * 16, 0, len(data), len(data), chunkstore.CODEC_RAW, chunkstore.KIND_CHUNK)])
    with pytest.raises(OSError):
        writer.wait(1)
    with pytest.raises(OSError) as e:
        writer.detach()
    assert e.value.errno == errno.ENOSPC
    writer.abort()
    assert writer.current is None


def _full_device_writer():
    class Backend:
        def create_pack(self, pack_id):
            return os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC

    class Store:
        backend = Backend()

    return chunkstore.PackWriter(Store())


def test_a_pack_that_cannot_begin_after_a_failed_write_is_abandoned_cleanly():
    """The write that ends a pack fails after detach returned (the I/O thread reports it later); the next
    pack's start then fails on that error, and abort stops the writer without a second error."""
    writer = _full_device_writer()
    data = os.urandom(4096)
    rec = [(b"\1" * 16, 0, len(data), len(data), chunkstore.CODEC_RAW, chunkstore.KIND_CHUNK)]
    writer.add_many(data, rec)
    handed = writer.detach()  # nothing failed yet: the last stage is on its way
    with pytest.raises(OSError):
        writer.wait(handed.last_write)
    os.close(handed.fd)
    with pytest.raises(OSError) as e:
        writer.add_many(data, rec)  # the next pack: its start sees the kept error
    assert e.value.errno == errno.ENOSPC
    writer.abort()
    assert writer.current is None


def test_closing_a_writer_whose_seal_failed_closes_the_pack_descriptor():
    """seal() raising (the pack's writes failed) leaves nothing open once the caller closes the writer."""
    writer = _full_device_writer()
    data = os.urandom(chunkstore.STAGE_BYTES)
    writer.add_many(data, [(b"\1" * 16, 0, len(data), len(data), chunkstore.CODEC_RAW, chunkstore.KIND_CHUNK)])
    fd = writer._fd
    with pytest.raises(OSError):
        try:
            writer.seal()
        finally:
            writer.close()
    with pytest.raises(OSError) as e:
        os.fstat(fd)
    assert e.value.errno == errno.EBADF


# --- space ---------------------------------------------------------------------------------------------
def test_gc_gives_back_space_of_deleted_snapshots(tmp_path, client):
    """Deleting the first two of three snapshots while a reader holds the repository defers reclamation; gc
    then shrinks the repository's allocated bytes and the last snapshot still restores identical."""
    image = write_random(tmp_path / "a.raw", 16 * MiB)
    disk = client.add_disk(image)["DiskId"]
    sids = [client.create_snapshot(disk)["SnapshotId"]]
    write_random(image, 8 * MiB, offset=0)
    sids.append(client.create_snapshot(disk)["SnapshotId"])
    write_random(image, 8 * MiB, offset=8 * MiB)
    last_saved = str(tmp_path / "last.saved")
    shutil.copyfile(image, last_saved)
    sids.append(client.create_snapshot(disk)["SnapshotId"])
    before = allocated(client.repo.path)

    with client.repo.repo_lock() as reader:  # a restore in progress, as far as the locks know
        reader.acquire(exclusive=False)
        assert [client.delete_snapshot(sid)["ReclaimedBytes"] for sid in sids[:2]] == [0, 0]
    plan = client.gc(dry_run=True)
    assert plan["DeadChunks"] == 16 * MiB // CHUNK  # all of the first image; the second's half lives on
    out = client.gc()
    after = allocated(client.repo.path)
    assert after <= before - 15 * MiB, (before, after)
    assert out["FreedBytes"] >= 15 * MiB
    assert restores_identical(client, tmp_path, sids[2], last_saved)
    assert client.verify()["Ok"]


def test_deleting_from_the_middle_of_a_chain_keeps_every_other_snapshot(tmp_path, client):
    """Deleting snapshots from the middle of a 10-snapshot chain in random order keeps every remaining one
    restorable, verifiable, and the chunk index holds exactly the chunks they reference."""
    rng = random.Random(42)
    image = write_random(tmp_path / "a.raw", 8 * MiB)
    disk = client.add_disk(image)["DiskId"]
    saved = {}
    for i in range(10):
        if i:
            write_random(image, MiB, offset=rng.randrange(0, 7 * MiB, 4096))
        copy = str(tmp_path / f"v{i}.saved")
        shutil.copyfile(image, copy)
        saved[client.create_snapshot(disk)["SnapshotId"]] = copy
    chain = list(saved)
    middle = chain[1:-1]
    rng.shuffle(middle)
    for sid in middle:
        client.delete_snapshot(sid)
        del saved[sid]
        for left, copy in saved.items():
            assert restores_identical(client, tmp_path, left, copy)
        out = client.verify()
        assert out["Ok"] and out["Problems"] == [], out
        assert db_keys(client, "chunks") == referenced_chunks(client)
    assert list(saved) == [chain[0], chain[-1]]


def test_restore_onto_a_full_file_system_fails_cleanly(tmp_path, small_fs):
    """A restore whose output runs out of space mid-way (after some batches were written, in whichever
    thread hits it) fails with RestoreFailed naming the output, one line from the CLI, no traceback."""
    repo = str(tmp_path / "repo")
    Client.init(repo, chunk_size=CHUNK)
    big = write_random(tmp_path / "big.raw", 64 * MiB)
    out = os.path.join(small_fs, "out.raw")
    with Client(repo) as c:
        sid = c.create_snapshot(c.add_disk(big)["DiskId"])["SnapshotId"]
        with pytest.raises(errors.RestoreFailed) as info:
            c.restore(sid, out)
        assert "out.raw" in str(info.value) and "No space left" in str(info.value)
        assert not os.path.exists(out)  # no half-written file that looks like a restored image
        st = os.statvfs(small_fs)
        assert st.f_bfree * st.f_frsize > 20 * MiB  # and its space is given back
    proc = cli_child("--repo", repo, "restore", sid, out)
    assert proc.returncode == errors.RestoreFailed.exit_code, proc.stderr
    assert proc.stderr.startswith(f"blocksnap: error: {errors.RestoreFailed.code}: ")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr



# --- the same data stored by two creates at once ---------------------------------------------------------
@pytest.mark.parametrize("same", ["all", "half"])
def test_records_another_create_stored_first_are_not_kept(tmp_path, same):
    """Two disks with the same data (a cloned VM) snapshotted at the same time: both creates pick the same
    chunks, and the second to index finds them stored. A pack that then names nothing goes at once; in
    one that keeps other records, theirs are punched (through the redo log, so a crash cannot leak them).
    After both snapshots are deleted and gc runs, nothing may be left."""
    repo = str(tmp_path / "repo")
    Client.init(repo, chunk_size=CHUNK)
    a = write_random(tmp_path / "a.raw", 2 * MiB)
    b = tmp_path / "b.raw"
    shutil.copyfile(a, b)
    if same == "half":
        write_random(tmp_path / "a.raw", MiB)  # A's first half is its own
    with Client(repo) as c:
        disk_a = c.add_disk(a)["DiskId"]
        disk_b = c.add_disk(str(b))["DiskId"]
        inner = []

        def create_b_meanwhile(done, total):
            # Create A has picked its chunks and handed them to its pack writer; B stores and
            # indexes the same chunks before A's pack is sealed and indexed.
            if not inner:
                inner.append(c.create_snapshot(disk_b)["SnapshotId"])

        sa = c.create_snapshot(disk_a, progress=create_b_meanwhile)["SnapshotId"]
        [sb] = inner
        recs = {r["SnapshotId"]: r for r in c.describe_snapshots()["Snapshots"]["Snapshot"]}
        own = 0 if same == "all" else MiB // CHUNK
        assert recs[sb]["AddedChunks"] == 2 * MiB // CHUNK and recs[sa]["AddedChunks"] == own
        packs = c.repo.packs.list_packs()
        with c.repo.catalog.read() as txn:
            named = {e.pack_id for _, e in txn.chunks()}
            in_table = set(txn.keys("packs"))
            assert txn.count("reclaim") == 0
        assert set(packs) == named == in_table and len(packs) == (1 if same == "all" else 2)
        stored = sum(recs[s]["AddedBytes"] for s in (sa, sb))
        assert allocated(os.path.join(repo, "packs")) < stored + len(packs) * 4 * CHUNK
        assert restores_identical(c, tmp_path, sa, a) and restores_identical(c, tmp_path, sb, b)
        assert c.verify()["Ok"]
        c.delete_snapshot(sa)
        c.delete_snapshot(sb)
        c.gc()
        assert c.repo.packs.list_packs() == [] and allocated(os.path.join(repo, "packs")) == 0


def test_gc_removes_a_pack_the_table_knows_but_no_index_entry_names(tmp_path):
    """Repositories written before the fix above hold such packs at live 0: gc removes them, and only them."""
    repo = str(tmp_path / "repo")
    Client.init(repo, chunk_size=CHUNK)
    img = write_random(tmp_path / "a.raw", MiB)
    with Client(repo) as c:
        sid = c.create_snapshot(c.add_disk(img)["DiskId"])["SnapshotId"]
        [real] = c.repo.packs.list_packs()
        empty = bytes.fromhex("00000000deadbeef")
        os.makedirs(os.path.dirname(c.repo.packs.path(empty)), exist_ok=True)
        shutil.copyfile(c.repo.packs.path(real), c.repo.packs.path(empty))
        with c.repo.catalog.write() as txn:
            txn.put_pack(empty, catalogs.PackEntry(os.path.getsize(c.repo.packs.path(empty)), 0))
        assert c.gc(dry_run=True)["OrphanPacks"] == 1
        c.gc()
        assert c.repo.packs.list_packs() == [real]
        with c.repo.catalog.read() as txn:
            assert txn.pack(empty) is None
        assert restores_identical(c, tmp_path, sid, img)
        assert c.verify()["Ok"]


def test_a_waiting_gc_is_not_overtaken_by_new_readers(tmp_path):
    """Reader A holds the repository; gc waits for it; reader B comes after gc. B must queue behind gc,
    not overtake it: otherwise overlapping creates and restores could keep gc (and RetentionDays expiry)
    waiting forever."""
    repo = str(tmp_path / "repo")
    Client.init(repo, chunk_size=CHUNK)
    events = []
    with Client(repo) as c:
        take_exclusive = c.repo.lock_exclusive

        def recorded_exclusive(on_wait=None):
            lock = take_exclusive(on_wait)
            events.append("gc in")
            return lock

        c.repo.lock_exclusive = recorded_exclusive
        a = c.repo.lock_shared()
        gc_waiting = threading.Event()
        gc = threading.Thread(target=lambda: c.gc(on_wait=gc_waiting.set))
        gc.start()
        assert gc_waiting.wait(10)

        def reader_b():
            lock = c.repo.lock_shared()
            events.append("B in")
            lock.release()

        b = threading.Thread(target=reader_b)
        b.start()
        time.sleep(0.3)
        assert events == []  # B waits behind gc, gc waits for A
        a.release()
        gc.join(30)
        b.join(30)
    assert events == ["gc in", "B in"]


def waits_for_gc(client, call, readers=()):
    """Hold the repository as a running gc does; ``readers(on_wait)`` must go through meanwhile, and
    ``call(on_wait)`` must wait, say so once, and complete once gc is done. Returns what ``call`` returned."""
    waited, done = [], []
    told = threading.Event()

    def on_wait():
        waited.append(1)
        told.set()

    gc_lock = client.repo.lock_exclusive()  # gc is running
    try:
        for read in readers:
            read(on_wait)
        assert waited == []  # readers went through while gc held the repository
        t = threading.Thread(target=lambda: done.append(call(on_wait)))
        t.start()
        assert told.wait(30)
        time.sleep(0.2)
        assert done == []  # still waiting
    finally:
        gc_lock.release()
    t.join(30)
    assert waited == [1] and len(done) == 1
    return done[0]


def test_a_create_that_waits_for_gc_says_so_and_readers_never_wait(tmp_path):
    """While gc holds the repository, a create waits; on_wait tells its caller (the CLI prints a line) once,
    and the create then completes. A restore and a verify do not wait for gc at all."""
    repo = str(tmp_path / "repo")
    Client.init(repo, chunk_size=CHUNK)
    img = write_random(tmp_path / "a.raw", MiB)
    with Client(repo) as c:
        disk = c.add_disk(img)["DiskId"]
        sid = c.create_snapshot(disk)["SnapshotId"]
        readers = (lambda w: c.restore(sid, str(tmp_path / "out.raw"), on_wait=w),
                   lambda w: c.verify(on_wait=w)["Ok"] or pytest.fail("verify"))
        new = waits_for_gc(c, lambda w: c.create_snapshot(disk, on_wait=w), readers)
        assert restores_identical(c, tmp_path, new["SnapshotId"], img)


def test_a_failed_create_that_cannot_remove_its_object_leaves_its_data_for_gc(tmp_path, monkeypatch):
    """A create fails after its snapshot object is stored (its commit's transaction fails), and removing
    that object fails too: readers will call the snapshot accomplished once the creator is gone, so the
    create must not reclaim its data at once; the snapshot restores exactly, and gc keeps it."""
    from blocksnap.store import backend as backends

    repo = str(tmp_path / "repo")
    Client.init(repo, chunk_size=CHUNK)
    img = write_random(tmp_path / "a.raw", 4 * MiB)

    def failing_refs(txn, seg_ids):
        raise OSError(errno.EIO, "injected: the commit's transaction fails")

    real_delete = backends.LocalBackend.delete_object

    def failing_delete(self, kind, name):
        if kind == "snapshots":
            raise OSError(errno.EIO, "injected: the object cannot be removed")
        return real_delete(self, kind, name)

    with Client(repo) as c:
        disk = c.add_disk(img)["DiskId"]
        monkeypatch.setattr(refs, "add_map_refs", failing_refs)
        monkeypatch.setattr(backends.LocalBackend, "delete_object", failing_delete)
        with pytest.raises(errors.BlocksnapError):
            c.create_snapshot(disk)
        monkeypatch.undo()
        [rec] = c.describe_snapshots()["Snapshots"]["Snapshot"]
        assert rec["Status"] == "accomplished"  # its object is in the store and its creator is done
        assert restores_identical(c, tmp_path, rec["SnapshotId"], img)
        c.gc()
        assert restores_identical(c, tmp_path, rec["SnapshotId"], img)
        out = c.verify()
        assert out["Ok"] and out["Problems"] == [], out


def test_a_disk_add_that_waits_for_gc_says_so(tmp_path):
    """A disk add holds the repository lock shared, as a create does: while gc holds it, the add waits and
    on_wait says so once; the add completes when gc is done."""
    repo = str(tmp_path / "repo")
    Client.init(repo, chunk_size=CHUNK)
    img = write_random(tmp_path / "a.raw", MiB)
    with Client(repo) as c:
        added = waits_for_gc(c, lambda w: c.add_disk(img, on_wait=w))
        assert [d["DiskId"] for d in c.describe_disks()["Disks"]["Disk"]] == [added["DiskId"]]


def test_gc_repacks_packs_that_are_mostly_unused_and_removes_them_whole(tmp_path):
    """With --max-unused, a pack whose share of dead records is above the threshold has its live records
    copied into a new pack and is removed whole (the way to give space back where holes cannot be punched):
    the snapshot still restores identical, verify is clean, and the store alone rebuilds the catalog."""
    repo = str(tmp_path / "repo")
    Client.init(repo, chunk_size=CHUNK)
    image = write_random(tmp_path / "a.raw", 16 * MiB)
    with Client(repo) as c:
        disk = c.add_disk(image)["DiskId"]
        first = c.create_snapshot(disk)["SnapshotId"]
        write_random(image, 12 * MiB, offset=0)
        second = c.create_snapshot(disk)["SnapshotId"]
        [old_pack] = [p for p in c.repo.packs.list_packs()
                      if sum(1 for _ in chunkstore.read_trailer(c.repo.backend, p)) > 200]
        c.delete_snapshot(first)
        plan = c.gc(dry_run=True, max_unused=0.5)
        assert plan["RepackPacks"] == 1 and 3 * MiB < plan["RepackBytes"] < 5 * MiB, plan
        assert c.gc(dry_run=True, max_unused=0.9)["RepackPacks"] == 0  # 75 % unused is below 90 %
    proc = cli_child("--repo", repo, "gc", "--max-unused", "50%", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["RepackPacks"] == 1
    assert out["Repacked"]["Packs"] == 1 and 3 * MiB < out["Repacked"]["Bytes"] < 5 * MiB, out
    with Client(repo) as c:
        assert old_pack not in c.repo.packs.list_packs()
        assert restores_identical(c, tmp_path, second, image)
        verified = c.verify()
        assert verified["Ok"], verified
        assert c.gc(dry_run=True, max_unused=0.5)["RepackPacks"] == 0
    catalogs.close_env(os.path.join(repo, "catalog"))
    shutil.rmtree(os.path.join(repo, "catalog"))
    assert cli_child("--repo", repo, "repair").returncode == 0
    with Client(repo) as c:
        assert restores_identical(c, tmp_path, second, image)
    bad = cli_child("--repo", repo, "gc", "--max-unused", "150%")
    assert bad.returncode == 2 and "InvalidParameter" in bad.stderr


def test_gc_keeps_a_live_segment_whose_count_is_wrong_and_reports_only_it(tmp_path):
    """A live segment's refcount damaged to 0: gc's mark keeps it and its chunks, and reports the one wrong
    count (its chunks' counts are right: they are not reported as wrong too); the snapshot still restores."""
    repo = str(tmp_path / "repo")
    Client.init(repo, chunk_size=CHUNK)
    img = write_random(tmp_path / "a.raw", MiB)  # 16 chunks: one map segment
    with Client(repo) as c:
        sid = c.create_snapshot(c.add_disk(img)["DiskId"])["SnapshotId"]
        with c.repo.catalog.read() as txn:
            [seg] = [s for s in refs.split_ids(refs.map_of(txn, txn.snapshot(sid)))]
        with c.repo.catalog.write() as txn:
            txn.set_segment_refs(seg, 0)
        out = c.gc()
        assert out["Problems"] == [{"Segment": seg.hex(), "Problem": "refcount 0, but a map names it: kept"}], out
        assert restores_identical(c, tmp_path, sid, img)
