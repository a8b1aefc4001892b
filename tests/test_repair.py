"""The catalog is an index that can be lost: 'blocksnap repair' rebuilds it from the store, and mends the
store from the catalog's checked copies where the store lost something."""
import os
import shutil
import signal

import pytest
from conftest import MiB, cli, files_equal, write_image

from blocksnap.api import Client
from blocksnap.store import catalog as catalogs

CS = 64 << 10


def rand(n, seed):
    import random

    return random.Random(seed).randbytes(n)


@pytest.fixture
def populated(tmp_path):
    """A repository with two disks sharing data, a chain of three snapshots, a deleted one, a failed one, a
    ClientToken and tags: ``(path, {snapshot id: saved image})``."""
    path = str(tmp_path / "repo")
    Client.init(path, chunk_size=CS)
    text = b"".join(b"%06d GET /index.html 200\n" % i for i in range(40000))[:3 * MiB]
    a = write_image(tmp_path / "a.raw", 20 * MiB, [(0, rand(2 * MiB, 1)), (5 * MiB, text), (19 * MiB, rand(MiB, 2))])
    b = write_image(tmp_path / "b.raw", 8 * MiB + 1000, [(0, rand(2 * MiB, 1)), (6 * MiB, rand(MiB, 3))])
    saved = {}
    with Client(path) as c:
        da = c.add_disk(a, disk_name="a")["DiskId"]
        db = c.add_disk(b, disk_name="b")["DiskId"]

        def snap(disk, img, **kw):
            sid = c.create_snapshot(disk, **kw)["SnapshotId"]
            copy = tmp_path / f"{sid}.saved"
            shutil.copyfile(img, copy)
            saved[sid] = str(copy)
            return sid

        snap(da, a, snapshot_name="first", tags=[{"Key": "k", "Value": "v"}], client_token="tok-1")
        with open(a, "r+b") as f:
            f.seek(MiB)
            f.write(rand(300 << 10, 4))
        gone = c.create_snapshot(da)["SnapshotId"]
        with open(a, "r+b") as f:
            f.seek(8 * MiB)
            f.write(rand(MiB, 5))
        snap(da, a, retention_days=7)
        snap(db, b)
        c.delete_snapshot(gone)
    os.rename(b, b + ".away")
    with Client(path) as c:
        with pytest.raises(Exception):
            c.create_snapshot(db)  # image missing: no record; make a failed one through a killed create
    os.rename(b + ".away", b)
    dead = cli("--repo", path, "snapshot", "create", db, BLOCKSNAP_CRASHPOINT="before-commit")
    assert dead.returncode == -signal.SIGKILL
    return path, saved


def restores(path, saved, tmp_path):
    """Every saved snapshot restores to its image (in a child process: a crash would show)."""
    for sid, img in saved.items():
        out = tmp_path / "out.raw"
        proc = cli("--repo", path, "restore", sid, str(out))
        assert proc.returncode == 0, (sid, proc.stderr)
        assert files_equal(out, img), sid
        out.unlink()


def listing(path):
    proc = cli("--repo", path, "snapshot", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    import json

    return {s["SnapshotId"]: s for s in json.loads(proc.stdout)["Snapshots"]["Snapshot"]}


def test_a_deleted_catalog_is_rebuilt_from_the_store(populated, tmp_path):
    """Delete catalog/, run 'blocksnap repair': every snapshot restores byte-identically, the records (names,
    tags, tokens, retention) are back, the failed one too, and verify is clean."""
    path, saved = populated
    before = listing(path)
    catalogs.close_env(os.path.join(path, "catalog"))
    shutil.rmtree(os.path.join(path, "catalog"))
    proc = cli("--repo", path, "snapshot", "list")
    assert proc.returncode == 1 and "Repository.CatalogMissing" in proc.stderr
    proc = cli("--repo", path, "verify")
    assert proc.returncode == 1 and all(sid in proc.stdout for sid in saved), proc.stdout
    proc = cli("--repo", path, "repair")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    restores(path, saved, tmp_path)
    after = listing(path)
    for sid in saved:
        keep = {k: v for k, v in before[sid].items() if k != "ExclusiveBytes"}
        assert {k: v for k, v in after[sid].items() if k != "ExclusiveBytes"} == keep
        assert after[sid]["ExclusiveBytes"] == before[sid]["ExclusiveBytes"]
    # The catalog was lost with the failed record: that one is gone; every accomplished one is back.
    assert set(after) == set(saved)
    proc = cli("--repo", path, "verify")
    assert proc.returncode == 0, proc.stdout
    with Client(path) as c:
        first = next(s for s, r in after.items() if r.get("SnapshotName") == "first")
        disk = after[first]["SourceDiskId"]
        again = c.create_snapshot(disk, snapshot_name="first", tags=[{"Key": "k", "Value": "v"}],
                                  client_token="tok-1")
        assert again["SnapshotId"] == first  # the token came back from the store


def test_repair_of_a_damaged_catalog_keeps_what_only_the_catalog_knew(populated, tmp_path):
    """A catalog with a damaged map segment is rebuilt; the failed record, which lives only in the catalog,
    is carried over; afterwards everything restores and verify is clean."""
    path, saved = populated
    with Client(path) as c:
        failed = [s for s in c.describe_snapshots()["Snapshots"]["Snapshot"] if s["Status"] == "failed"]
        assert len(failed) == 1
        with c.repo.catalog.read() as txn:
            seg = next(s for s in txn.segment_ids())
            raw = bytes(txn._t.get(b"G" + seg))
    catalogs.close_env(os.path.join(path, "catalog"))
    data_path = os.path.join(path, "catalog", "data.mdb")
    with open(data_path, "r+b") as f:
        blob = f.read()
        ids = raw[16:-8]
        piece = next(ids[i:i + 64] for i in range(0, len(ids), 16) if all(ids[i:i + 64][j:j + 16] != bytes(16)
                                                                           for j in range(0, 64, 16)))
        at = blob.find(piece)  # the segment's ids inside LMDB's pages: every copy (old pages hold some)
        assert at >= 0
        while at >= 0:
            f.seek(at)
            f.write(bytes(16))
            at = blob.find(piece, at + 1)
    proc = cli("--repo", path, "verify")
    assert proc.returncode == 1 and "map segment" in proc.stdout, proc.stdout
    proc = cli("--repo", path, "repair")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    restores(path, saved, tmp_path)
    after = listing(path)
    assert after[failed[0]["SnapshotId"]]["Status"] == "failed"
    assert cli("--repo", path, "verify").returncode == 0


def test_repair_writes_lost_store_objects_anew_from_the_catalog(populated, tmp_path):
    """A snapshot object deleted, a disk object damaged, a segment record in a pack damaged, a pack's
    trailer damaged: restores still work (the catalog has checked copies), verify exits 1 naming them,
    repair writes them anew; then the catalog can be lost and rebuilt again, and gc removes the old pack."""
    path, saved = populated
    sids = sorted(saved)
    os.unlink(os.path.join(path, "snapshots", sids[0]))
    disk_obj = os.path.join(path, "disks", sorted(os.listdir(os.path.join(path, "disks")))[0])
    with open(disk_obj, "r+b") as f:
        f.seek(20)
        b = f.read(1)
        f.seek(20)
        f.write(bytes([b[0] ^ 0x40]))
    with Client(path) as c:
        backend = c.repo.backend
        with c.repo.catalog.read() as txn:  # a live segment, and a pack holding none of the live segments
            live = [txn.segment(s) for s in txn.segment_ids() if txn.segment_refs(s)]
        seg = live[0]
        other = next(p for p in backend.list_packs() if p not in {x.pack_id for x in live})
    with open(backend.pack_path(seg.pack_id), "r+b") as f:  # the segment record's ids
        f.seek(seg.offset + 32 + 5)
        f.write(b"\x00\x01\x02")
    size = os.path.getsize(backend.pack_path(other))
    with open(backend.pack_path(other), "r+b") as f:  # the other pack's trailer checksum
        f.seek(size - 3)
        f.write(b"xyz")
    restores(path, saved, tmp_path)
    proc = cli("--repo", path, "verify")
    assert proc.returncode == 1, proc.stdout
    assert sids[0] in proc.stdout and "the store's copy" in proc.stdout and "trailer" in proc.stdout, proc.stdout
    proc = cli("--repo", path, "repair", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import json

    out = json.loads(proc.stdout)
    assert out["ObjectsRewritten"] >= 2 and out["SegmentsRewritten"] >= 1 and out["RecordsRewritten"] > 0, out
    restores(path, saved, tmp_path)
    assert cli("--repo", path, "gc").returncode == 0
    assert not os.path.exists(backend.pack_path(other))  # its records live in a new pack now
    proc = cli("--repo", path, "verify")
    assert proc.returncode == 0, proc.stdout
    catalogs.close_env(os.path.join(path, "catalog"))
    shutil.rmtree(os.path.join(path, "catalog"))
    assert cli("--repo", path, "repair").returncode == 0
    restores(path, saved, tmp_path)
    assert cli("--repo", path, "verify").returncode == 0


@pytest.mark.parametrize("point", ["repair-before-swap", "repair-mid-swap"])
def test_a_repair_killed_while_it_swaps_is_finished_by_the_next(populated, tmp_path, point):
    """kill -9 of repair just before or between its two renames leaves a repository that the next repair
    (and nothing else is needed) brings back whole."""
    path, saved = populated
    proc = cli("--repo", path, "repair", BLOCKSNAP_CRASHPOINT=point)
    assert proc.returncode == -signal.SIGKILL
    proc = cli("--repo", path, "repair")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    restores(path, saved, tmp_path)
    assert cli("--repo", path, "verify").returncode == 0
    assert not [n for n in os.listdir(path) if n.startswith("catalog.")]


def test_a_snapshot_lost_from_store_and_catalog_is_reported_not_invented(populated, tmp_path):
    """A map segment gone from both the store and the catalog makes repair report the snapshots that need
    it as lost (exit 1), keep the others whole, and never index a snapshot it cannot restore."""
    path, saved = populated
    with Client(path) as c:
        rec = c.describe_snapshots(snapshot_ids=[sorted(saved)[-1]])["Snapshots"]["Snapshot"][0]
        with c.repo.catalog.read() as txn:
            seg_ids = c.repo.segment_ids(txn, rec)
            seg = next(seg_ids[i:i + 16] for i in range(0, len(seg_ids), 16) if any(seg_ids[i:i + 16]))
            entry = txn.segment(seg)
    catalogs.close_env(os.path.join(path, "catalog"))
    shutil.rmtree(os.path.join(path, "catalog"))
    with open(os.path.join(path, "packs", entry.pack_id.hex()[:2], entry.pack_id.hex() + ".pack"), "r+b") as f:
        f.seek(entry.offset + 32)
        f.write(bytes(16))
    proc = cli("--repo", path, "repair")
    assert proc.returncode == 1 and "LOST " + rec["SnapshotId"] in proc.stdout, proc.stdout + proc.stderr
    listed = listing(path)
    assert rec["SnapshotId"] not in listed
    rest = {s: i for s, i in saved.items() if s in listed}
    assert rest
    restores(path, rest, tmp_path)


def test_repair_without_a_catalog_finds_the_records_of_a_pack_whose_trailer_is_damaged(populated, tmp_path):
    """With the catalog gone and a pack's trailer damaged, repair finds that pack's records by their headers,
    checks each, and copies them into a new pack: every snapshot still restores, verify is clean after gc."""
    path, saved = populated
    with Client(path) as c:
        backend = c.repo.backend
        biggest = max(backend.list_packs(), key=backend.pack_size)
    catalogs.close_env(os.path.join(path, "catalog"))
    shutil.rmtree(os.path.join(path, "catalog"))
    size = os.path.getsize(backend.pack_path(biggest))
    with open(backend.pack_path(biggest), "r+b") as f:
        f.seek(size - 20)
        f.write(b"\xff" * 8)  # the tail's index offset: the trailer no longer reads
    proc = cli("--repo", path, "repair", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import json

    assert json.loads(proc.stdout)["RecordsRewritten"] > 0
    restores(path, saved, tmp_path)
    assert cli("--repo", path, "gc").returncode == 0
    assert not os.path.exists(backend.pack_path(biggest))
    proc = cli("--repo", path, "verify")
    assert proc.returncode == 0, proc.stdout


def test_repair_keeps_the_disk_the_catalog_recorded_when_two_objects_share_its_path(tmp_path):
    """Two disk objects for one path (the loser of a race of two 'disk add's, killed after its object):
    repair keeps the DiskId the old catalog recorded, even though the other object is newer; the other
    object stays unrecorded until gc removes it."""
    from blocksnap.store import objects

    path = str(tmp_path / "repo")
    Client.init(path, chunk_size=64 << 10)
    img = str(tmp_path / "a.raw")
    write_image(img, MiB, [(0, rand(MiB, 1))])
    with Client(path) as c:
        rec = c.add_disk(img)
        disk = rec["DiskId"]
        other = dict({k: rec[k] for k in ("DiskName", "Path", "Type", "Size")}, DiskId="d-" + "z" * 20,
                     CreationTime="2099-01-01T00:00:00Z")
        c.repo.backend.put_object("disks", other["DiskId"], objects.encode_disk(other))
    catalogs.close_env(os.path.join(path, "catalog"))
    assert cli("--repo", path, "repair").returncode == 0
    with Client(path) as c:
        assert [d["DiskId"] for d in c.describe_disks()["Disks"]["Disk"]] == [disk]
        assert sorted(os.listdir(os.path.join(path, "disks"))) == sorted([disk, other["DiskId"]])
        c.gc()
        assert os.listdir(os.path.join(path, "disks")) == [disk]
        assert c.verify()["Ok"]
