"""Reproducers of the review of format version 2 (bed11bb..review): each test states a behaviour the design
promises and that the reviewed code broke. Interleavings that need a precise moment are forced with events."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import MiB, files_equal, run_cli, write_random

from blocksnap import errors
from blocksnap import restore as restoring
from blocksnap.api import Client
from blocksnap.restore import locate, window_ids
from blocksnap.store import backend as backends
from blocksnap.store import catalog as catalogs
from blocksnap.store import refs

CHUNK = 64 << 10


def _cli_ok(*args):
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    return proc


def _reopen(repo):
    catalogs.close_env(os.path.join(repo, "catalog"))
    return Client(repo)


def test_a_delete_keeps_the_data_of_a_dead_create_that_stored_its_object(tmp_path):
    """A create killed after it stored its snapshot object is accomplished for every reader; a delete of
    another snapshot that shared its segments must not reclaim them (its reclaim's mark ignored it)."""
    repo = str(tmp_path / "repo")
    Client.init(repo, chunk_size=CHUNK)
    img = write_random(tmp_path / "a.raw", 4 * MiB)
    with Client(repo) as c:
        disk = c.add_disk(img)["DiskId"]
        s1 = c.create_snapshot(disk)["SnapshotId"]
    proc = run_cli("--repo", repo, "snapshot", "create", disk, env={"BLOCKSNAP_CRASHPOINT": "after-object"})
    assert proc.returncode == -signal.SIGKILL
    c = _reopen(repo)
    with c:
        [s2] = [s["SnapshotId"] for s in c.describe_snapshots(sizes=False)["Snapshots"]["Snapshot"]
                if s["SnapshotId"] != s1 and s["Status"] == "accomplished"]
        c.delete_snapshot(s1)
        out = str(tmp_path / "s2.raw")
        c.restore(s2, out)
        assert files_equal(out, img)
        c.create_snapshot(disk)  # settles the dead create: its segments must still be indexed
        assert c.verify()["Ok"]


def test_repair_after_gc_indexes_no_punched_record_and_later_creates_stay_restorable(tmp_path):
    """gc punches a dead record and the pack's trailer still lists it; the catalog repair rebuilds must not
    index it (verify would call a healthy repository damaged, and a create would deduplicate against zeros)."""
    repo = str(tmp_path / "repo")
    Client.init(repo, chunk_size=CHUNK)
    img = write_random(tmp_path / "img.raw", 4 * MiB)
    orig = str(tmp_path / "orig.raw")
    with open(img, "rb") as f, open(orig, "wb") as g:
        g.write(f.read())
    with Client(repo) as c:
        disk = c.add_disk(img)["DiskId"]
        s1 = c.create_snapshot(disk)["SnapshotId"]
        write_random(img, 2 * MiB)  # the first half changes, the second stays in the first pack
        c.create_snapshot(disk)
        c.delete_snapshot(s1)  # the first half's records are punched inside the first pack
        c.gc()
    _cli_ok("--repo", repo, "repair")
    c = _reopen(repo)
    with c:
        assert c.verify()["Ok"]
        copy = str(tmp_path / "copy.raw")
        with open(orig, "rb") as f, open(copy, "wb") as g:
            g.write(f.read())
        s3 = c.create_snapshot(c.add_disk(copy)["DiskId"])["SnapshotId"]
        out = str(tmp_path / "s3.raw")
        c.restore(s3, out)
        assert files_equal(out, orig)


def test_a_pack_is_not_removed_whole_while_a_reader_may_still_read_one_of_its_records(tmp_path):
    """A range tagged with the current epoch waits for the readers of the one before; removing its pack
    whole because an older range of the same pack became ready gives it back all the same."""
    repo = str(tmp_path / "repo")
    Client.init(repo, chunk_size=CHUNK)
    img = write_random(tmp_path / "img.raw", 4 * MiB)
    with Client(repo) as c:
        disk = c.add_disk(img)["DiskId"]
        s1 = c.create_snapshot(disk)["SnapshotId"]
        write_random(img, 2 * MiB)
        s2 = c.create_snapshot(disk)["SnapshotId"]
        r = c.repo
        first_packs = set(r.backend.list_packs())
        r0 = r.reader()
        c.delete_snapshot(s1)  # the first half's ranges wait for r0
        r0.release()
        r1 = r.reader()  # a restore of s2 registers and locates its chunks
        try:
            with r.catalog.read() as txn:
                rec = r.get_snapshot(s2, txn)
                segs = r.segment_ids(txn, rec)
                located = locate(txn, window_ids(txn, segs, 0, len(segs) // 16, 64), 0, CHUNK, include_zero=False)
            used = {e.pack_id for _, _, e in located}
            code = f"from blocksnap.api import Client; Client({repo!r}).delete_snapshot({s2!r})"
            subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=os.path.dirname(
                os.path.dirname(restoring.__file__))))
            for pack_id in used:
                assert os.path.exists(r.backend.pack_path(pack_id)), "a pack r1 reads was removed under it"
        finally:
            r1.release()
        assert used & first_packs


def test_a_reader_that_read_the_epoch_before_a_flip_is_still_waited_for(tmp_path):
    """A restore reads the epoch, is descheduled across gc's first flip, and takes its lock after the first
    drain of gc's repack flip: gc must still wait for it before removing the packs it reads."""
    repo = str(tmp_path / "repo")
    Client.init(repo, chunk_size=CHUNK)
    img = write_random(tmp_path / "img.raw", 4 * MiB)
    c = Client(repo)
    disk = c.add_disk(img)["DiskId"]
    s1 = c.create_snapshot(disk)["SnapshotId"]
    write_random(img, 2 * MiB)
    s2 = c.create_snapshot(disk)["SnapshotId"]
    c.delete_snapshot(s1)  # s2's first pack is half dead: a repack candidate
    other = write_random(tmp_path / "other.raw", MiB)
    s3 = c.create_snapshot(c.add_disk(other)["DiskId"])["SnapshotId"]
    c.repo.delete_snapshot(s3, reclaim=False)  # dead data: gc's first flip

    epoch_read, go, located, gc_done = (threading.Event() for _ in range(4))
    reader = Client(repo)
    rrepo = reader.repo

    def stale_reader():
        with rrepo.catalog.read() as txn:
            e = txn.epoch()
        epoch_read.set()
        go.wait(30)
        calls = []

        def read_epoch():  # the first read is the one made before the flip; later ones read the catalog
            calls.append(1)
            if len(calls) == 1:
                return e
            with rrepo.catalog.read() as txn:
                return txn.epoch()
        return rrepo.epochs.enter(read_epoch)
    rrepo.reader = stale_reader
    orig_locate = restoring.locate

    def slow_locate(*a, **k):
        out = orig_locate(*a, **k)
        located.set()
        gc_done.wait(30)
        return out
    orig_relocate = refs.Reclaim.relocate

    def relocate(self, *a):
        orig_drain, first = self._drain, []

        def drain(epoch):
            ok = orig_drain(epoch)
            if not first:  # step 1 of the repack's flip is done: now the reader takes its lock
                first.append(1)
                go.set()
                located.wait(30)
            return ok
        self._drain = drain
        return orig_relocate(self, *a)
    result = {}

    def run_restore():
        try:
            reader.restore(s2, str(tmp_path / "out.raw"))
            result["ok"] = files_equal(str(tmp_path / "out.raw"), img)
        except errors.BlocksnapError as exc:
            result["ok"] = exc
    try:
        restoring.locate = slow_locate
        refs.Reclaim.relocate = relocate
        t = threading.Thread(target=run_restore)
        t.start()
        epoch_read.wait(30)
        c.gc(max_unused=0.1, on_readers=gc_done.set)
        gc_done.set()
        t.join(60)
    finally:
        restoring.locate = orig_locate
        refs.Reclaim.relocate = orig_relocate
        reader.close()
        c.close()
    assert result["ok"] is True, result["ok"]


def test_an_interrupted_create_leaves_no_object_of_its_failed_snapshot(tmp_path):
    """A create interrupted after its object reached the store (a signal, or a full disk at the commit) is
    failed and its data given back; its object must go too, else verify fails once gc drops the failed record
    and repair reports the snapshot LOST."""
    repo = str(tmp_path / "repo")
    Client.init(repo, chunk_size=CHUNK)
    img = write_random(tmp_path / "img.raw", 4 * MiB)
    with Client(repo) as c:
        disk = c.add_disk(img)["DiskId"]
        orig = c.repo.backend.put_object

        def put_object(kind, name, data):
            orig(kind, name, data)
            if kind == "snapshots":
                raise KeyboardInterrupt  # SIGINT right after the object's rename
        c.repo.backend.put_object = put_object
        with pytest.raises(KeyboardInterrupt):
            c.create_snapshot(disk)
        c.repo.backend.put_object = orig
        assert [s["Status"] for s in c.describe_snapshots(sizes=False)["Snapshots"]["Snapshot"]] == ["failed"]
        c.gc(now=time.time() + 8 * 86400)
        assert c.verify()["Ok"]
    assert run_cli("--repo", repo, "repair").returncode == 0


def test_verify_while_a_snapshot_is_deleted_is_no_internal_error(tmp_path):
    """A whole verify and a delete of another client may overlap (readers never wait for writers)."""
    repo = str(tmp_path / "repo")
    Client.init(repo, chunk_size=CHUNK)
    with Client(repo) as c, Client(repo) as other:
        sids = [c.create_snapshot(c.add_disk(write_random(tmp_path / f"{k}.raw", 8 * MiB))["DiskId"])["SnapshotId"]
                for k in range(2)]
        done = []

        def progress(n, total):
            if not done:
                done.append(other.delete_snapshot(sids[0]))
        out = c.verify(progress=progress)
        assert done and out["Ok"], out


def test_a_restore_of_a_snapshot_deleted_meanwhile_is_not_catalog_damage(tmp_path):
    """A restore reads its map a window at a time; a delete that comes between is not CatalogDamaged."""
    repo = str(tmp_path / "repo")
    Client.init(repo, chunk_size=4096)
    with Client(repo) as c, Client(repo) as other:
        sid = c.create_snapshot(c.add_disk(write_random(tmp_path / "a.raw", 40 * MiB))["DiskId"])["SnapshotId"]
        done = []

        def progress(n, total):
            if not done and n < total:
                done.append(other.delete_snapshot(sid))
        with pytest.raises(errors.BlocksnapError) as info:
            c.restore(sid, str(tmp_path / "out.raw"), progress=progress)
        assert done
        assert not isinstance(info.value, errors.RepositoryDamaged), info.value


def test_a_non_ascii_byte_in_a_catalog_key_is_reported_not_an_internal_error(tmp_path):
    """A flipped high bit in a snapshot's key: list, verify, gc and repair answer with typed errors or a
    report (exit 1), never InternalError (exit 5)."""
    repo = str(tmp_path / "repo")
    Client.init(repo, chunk_size=CHUNK)
    with Client(repo) as c:
        sid = c.create_snapshot(c.add_disk(write_random(tmp_path / "a.raw", MiB))["DiskId"])["SnapshotId"]
    path = os.path.join(repo, "catalog", "data.mdb")
    data = bytearray(open(path, "rb").read())
    key = b"S" + sid.encode()
    i = data.find(key)
    assert i >= 0
    while i >= 0:  # every copy LMDB left in the file
        data[i + len(key) - 1] |= 0x80
        i = data.find(key, i + 1)
    open(path, "wb").write(data)
    for args in (["snapshot", "list"], ["verify"], ["gc"], ["repair"]):
        proc = run_cli("--repo", repo, *args)
        assert proc.returncode != errors.InternalError.exit_code, (args, proc.stderr)


def test_a_disk_add_killed_after_its_object_leaves_a_repository_that_verifies(tmp_path):
    """kill -9 of 'disk add' between its object and its catalog transaction: verify stays clean (or gc makes
    it clean), and repair does not register a second disk for the path."""
    repo = str(tmp_path / "repo")
    Client.init(repo, chunk_size=CHUNK)
    img = write_random(tmp_path / "a.raw", MiB)
    code = f"""
import os, signal
from blocksnap.api import Client
from blocksnap.store import backend
orig = backend.LocalBackend.put_object
def put(self, kind, name, data):
    orig(self, kind, name, data)
    if kind == "disks":
        os.kill(os.getpid(), signal.SIGKILL)
backend.LocalBackend.put_object = put
Client({repo!r}).add_disk({img!r})
"""
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=os.path.dirname(
        os.path.dirname(backends.__file__))))
    assert proc.returncode == -signal.SIGKILL
    run_cli("--repo", repo, "gc")
    assert run_cli("--repo", repo, "verify").returncode == 0
    _cli_ok("--repo", repo, "disk", "add", img)
    _cli_ok("--repo", repo, "repair")
    assert run_cli("--repo", repo, "verify").returncode == 0
