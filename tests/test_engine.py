"""Snapshot semantics: incremental, deduplicated, chains, restore, verify, bad input."""
import json
import os
import time

import pytest
import xxhash
from conftest import MiB, files_equal, run_cli, write_image

from blocksnap import errors
from blocksnap.api import Client
from blocksnap.store import catalog as catalogs

CS = 64 << 10  # the test repositories' chunk size


def rand(n, seed):
    import random

    return random.Random(seed).randbytes(n)


def chunk_count(client):
    with client.repo.catalog.read() as txn:
        return txn.count("chunks")


def snap(client, disk_id, **kw):
    return client.create_snapshot(disk_id, **kw)["SnapshotId"]


def record(client, sid):
    return client.describe_snapshots(snapshot_ids=[sid])["Snapshots"]["Snapshot"][0]




def test_first_snapshot_stores_only_nonzero_chunks(client, make_image):
    """Zero chunks and holes store nothing; the data chunks are stored once each."""
    img = make_image("a.raw", 8 * MiB, [(0, rand(CS * 3, 1)), (2 * MiB, bytes(CS * 4)), (5 * MiB, rand(CS, 2))])
    sid = snap(client, client.add_disk(img)["DiskId"])
    rec = record(client, sid)
    assert rec["Status"] == "accomplished" and rec["Progress"] == "100%"
    assert chunk_count(client) == 4
    assert rec["LogicalBytes"] == 4 * CS
    assert rec["AddedChunks"] == 4
    assert rec["AddedBytes"] >= 4 * CS  # random data is stored raw


def test_incremental_stores_only_changed_chunks(client, make_image):
    """A second snapshot adds exactly the chunks whose content changed."""
    img = make_image("a.raw", 4 * MiB, [(0, rand(4 * MiB, 3))])
    disk = client.add_disk(img)["DiskId"]
    s1 = snap(client, disk)
    before = chunk_count(client)
    with open(img, "r+b") as f:
        f.seek(CS * 5 + 100)
        f.write(b"changed!")
        f.seek(CS * 40)
        f.write(rand(2 * CS, 4))
    s2 = snap(client, disk)
    rec = record(client, s2)
    assert rec["ParentSnapshotId"] == s1
    assert rec["ChangedChunks"] == 3 and rec["AddedChunks"] == 3
    assert chunk_count(client) == before + 3
    client.restore(s2, "s2.raw")
    assert files_equal(img, "s2.raw")


def test_same_content_stored_once_across_disks(client, make_image):
    """Two disks with equal data share it: the second snapshot adds nothing."""
    data = rand(2 * MiB, 5)
    a = make_image("a.raw", 4 * MiB, [(0, data)])
    b = make_image("b.raw", 8 * MiB, [(4 * MiB, data)])
    snap(client, client.add_disk(a)["DiskId"])
    n = chunk_count(client)
    sb = snap(client, client.add_disk(b)["DiskId"])
    assert chunk_count(client) == n
    assert record(client, sb)["AddedBytes"] == 0
    client.restore(sb, "b.out")
    assert files_equal(b, "b.out")


def test_repeated_chunks_within_an_image_are_stored_once(client, make_image):
    """The same 64 KiB block written ten times in one image is one stored chunk."""
    block = rand(CS, 6)
    img = make_image("a.raw", 2 * MiB, [(i * 2 * CS, block) for i in range(10)])
    snap(client, client.add_disk(img)["DiskId"])
    assert chunk_count(client) == 1


def test_compressible_chunks_are_compressed(client, make_image):
    """Log-like text is stored compressed; random data is stored raw."""
    text = b"".join(b"2026-11-26 host%d sshd[%d]: Accepted publickey for root\n" % (i % 7, i) for i in range(20000))
    img = make_image("a.raw", 4 * MiB, [(0, text[:MiB])])
    sid = snap(client, client.add_disk(img)["DiskId"])
    assert record(client, sid)["AddedBytes"] < MiB // 3


def test_restore_is_sparse_and_identical(client, make_image, tmp_path):
    """Restore writes holes for zero chunks: the output's allocation is no larger than the source's."""
    img = make_image("a.raw", 64 * MiB, [(MiB, rand(MiB, 7)), (40 * MiB, rand(3 * MiB + 123, 8))])
    sid = snap(client, client.add_disk(img)["DiskId"])
    client.restore(sid, "out.raw")
    assert files_equal(img, "out.raw")
    assert os.stat("out.raw").st_size == 64 * MiB
    assert os.stat("out.raw").st_blocks <= os.stat(img).st_blocks


def test_unaligned_image_size_restores(client, make_image):
    """An image whose size is not a multiple of the chunk size restores to the same size and bytes."""
    img = make_image("odd.raw", 3 * MiB + 4097, [(3 * MiB - 10, rand(4107, 9))])
    sid = snap(client, client.add_disk(img)["DiskId"])
    client.restore(sid, "odd.out")
    assert os.stat("odd.out").st_size == 3 * MiB + 4097
    assert files_equal(img, "odd.out")


def test_restore_in_place_overwrites_without_truncating(client, make_image):
    """--in-place writes into an existing file: data chunks written, zero chunks punched, size kept."""
    img = make_image("a.raw", 4 * MiB, [(0, rand(MiB, 10))])
    sid = snap(client, client.add_disk(img)["DiskId"])
    with open("target.raw", "wb") as f:
        f.write(rand(6 * MiB, 11))  # longer than the snapshot, non-zero everywhere
    with pytest.raises(errors.OutputExists):
        client.restore(sid, "target.raw")
    client.restore(sid, "target.raw", in_place=True)
    with open("target.raw", "rb") as f, open(img, "rb") as g:
        assert f.read(4 * MiB) == g.read()
        assert len(f.read()) == 2 * MiB  # not truncated


def test_restore_of_many_batches_is_byte_identical_and_sparse(client, make_image):
    """A restore of many batches on two threads: random and text chunks, zero chunks, holes and zero
    blocks inside chunks come back byte-identical and no less sparse than the image."""
    from blocksnap import restore

    text = b"".join(b"%06d GET /api/v1/disks 200 %d ms\n" % (k, k % 97) for k in range(60000))
    extents, off = [], 0
    for k in range(24):  # 24 x 1 MiB of data between holes: several 4 MiB batches
        piece = rand(MiB, 100 + k) if k % 3 else text[k * 1000:k * 1000 + MiB]
        if k % 5 == 0:
            piece = piece[:MiB // 2] + bytes(MiB // 4) + piece[:MiB // 4]  # zero blocks inside chunks
        extents.append((off, piece))
        off += MiB + (k % 4) * MiB  # holes of 0-3 MiB between them
    img = make_image("many.raw", off + 3 * MiB, extents)
    assert (off + 3 * MiB) // CS > 4 * restore.BATCH_CHUNKS
    sid = snap(client, client.add_disk(img)["DiskId"])
    out = client.restore(sid, "many.out")
    assert files_equal(img, "many.out")
    assert out["RestoredBytes"] == record(client, sid)["LogicalBytes"]
    assert os.stat("many.out").st_blocks <= os.stat(img).st_blocks


def test_chain_delete_middle_keeps_others_identical(client, make_image, tmp_path):
    """Deleting a middle snapshot frees exactly its exclusive chunks; the others restore byte-identical."""
    img = make_image("a.raw", 2 * MiB, [(0, rand(2 * MiB, 12))])
    disk = client.add_disk(img)["DiskId"]
    copies, sids = [], []
    for i in range(5):
        with open(img, "r+b") as f:
            f.seek(5 * CS)  # every snapshot has its own version of this chunk
            f.write(rand(CS, 100 + i))
        sids.append(snap(client, disk))
        copy = tmp_path / f"v{i}.raw"
        copy.write_bytes(open(img, "rb").read())
        copies.append(copy)
    excl = record(client, sids[2])["ExclusiveBytes"]
    assert excl > 0
    n = chunk_count(client)
    out = client.delete_snapshot(sids[2])
    assert out["FreedChunks"] >= 1
    assert chunk_count(client) == n - out["FreedChunks"]
    for i in (0, 1, 3, 4):
        client.restore(sids[i], f"r{i}.raw")
        assert files_equal(copies[i], f"r{i}.raw")
    v = client.verify()
    assert v["Ok"], v


def test_exclusive_bytes_matches_what_delete_frees(client, make_image):
    """ExclusiveBytes (freed-if-deleted) equals the stored bytes that deletion removes."""
    img = make_image("a.raw", MiB, [(0, rand(MiB, 13))])
    disk = client.add_disk(img)["DiskId"]
    snap(client, disk)
    with open(img, "r+b") as f:
        f.write(rand(3 * CS, 14))
    s2 = snap(client, disk)
    rec = record(client, s2)
    assert rec["ExclusiveBytes"] == rec["AddedBytes"] == 3 * CS + 0  # raw random chunks
    assert client.delete_snapshot(s2)["FreedChunks"] == 3


def test_exclusive_bytes_of_a_map_that_repeats_a_segment(client, make_image):
    """An image holding the same data twice, a whole map segment apart, stores it once and uses the same
    segment twice: ExclusiveBytes is still all of it, as deleting the snapshot shows."""
    from blocksnap.repository import SEGMENT_CHUNKS

    seg = SEGMENT_CHUNKS * CS
    data = rand(seg, 16)
    img = make_image("twice.raw", 2 * seg, [(0, data), (seg, data)])
    sid = snap(client, client.add_disk(img)["DiskId"])
    rec = record(client, sid)
    assert rec["AddedChunks"] == SEGMENT_CHUNKS
    assert rec["ExclusiveBytes"] == rec["AddedBytes"] >= seg
    assert client.delete_snapshot(sid)["FreedChunks"] == SEGMENT_CHUNKS


def test_delete_then_gc_leaves_nothing_unreferenced(client, make_image):
    """After deleting every snapshot and gc, the chunk index and packs are empty."""
    img = make_image("a.raw", 2 * MiB, [(0, rand(2 * MiB, 15))])
    disk = client.add_disk(img)["DiskId"]
    s1 = snap(client, disk)
    client.delete_snapshot(s1)
    client.gc()
    assert chunk_count(client) == 0
    assert client.repo.packs.list_packs() == []
    plan = client.gc(dry_run=True)
    assert plan["DeadChunks"] == 0 and plan["OrphanPacks"] == 0


def test_verify_reports_every_affected_snapshot_and_offset(client, make_image, repo_path):
    """A corrupted chunk makes verify fail and name each snapshot and offset that uses it."""
    block = rand(CS, 16)
    a = make_image("a.raw", MiB, [(0, block), (4 * CS, block)])
    b = make_image("b.raw", MiB, [(2 * CS, block)])
    sa = snap(client, client.add_disk(a)["DiskId"])
    sb = snap(client, client.add_disk(b)["DiskId"])
    with client.repo.catalog.read() as txn:
        entry = txn.chunk(xxhash.xxh3_128_digest(block))
    with open(client.repo.packs.path(entry[0]), "r+b") as f:
        f.seek(entry[1] + 32 + 100)  # inside the stored bytes, past the record header
        f.write(b"\xff" * 10)
    out = client.verify()
    assert not out["Ok"]
    [bad] = out["Damaged"]
    affected = {a["SnapshotId"]: a["Offsets"] for a in bad["Affected"]}
    assert affected == {sa: [0, 4 * CS], sb: [2 * CS]}
    proc = run_cli("--repo", repo_path, "verify")
    assert proc.returncode == 1
    assert "DAMAGED" in proc.stdout and sa in proc.stdout and "Traceback" not in proc.stderr
    with pytest.raises(errors.RepositoryDamaged):
        client.restore(sa, "x.raw")


def test_verify_reports_a_missing_pack(client, make_image, repo_path):
    """A deleted pack file is reported as damage, not a crash."""
    img = make_image("a.raw", MiB, [(0, rand(MiB, 17))])
    snap(client, client.add_disk(img)["DiskId"])
    for p in client.repo.packs.list_packs():
        os.unlink(client.repo.packs.path(p))
    client.repo.packs.close()
    out = client.verify()
    chunks = [d for d in out["Damaged"] if "ChunkId" in d]
    others = [d["What"] for d in out["Damaged"] if "ChunkId" not in d]
    # The pack held the 16 chunks and the store's copy of the map's one segment (format 2): nothing else.
    assert not out["Ok"] and len(chunks) == 16 and len(others) == 1, out["Damaged"]
    assert others[0].startswith("map segment") and "store's copy" in others[0], others
    with pytest.raises(errors.RepositoryDamaged):
        client.restore(chunks[0]["Affected"][0]["SnapshotId"], "x.raw")


def test_verify_goes_on_past_damage_in_a_batch_and_names_each_problem(client, make_image):
    """Two corrupted chunks and a torn last record in one pack are each reported with what is wrong;
    every other chunk of the same pack still checks out."""
    blocks = [rand(CS, 40 + k) for k in range(8)]
    img = make_image("a.raw", 8 * CS, [(k * CS, b) for k, b in enumerate(blocks)])
    snap(client, client.add_disk(img)["DiskId"])
    with client.repo.catalog.read() as txn:
        entries = [txn.chunk(xxhash.xxh3_128_digest(b)) for b in blocks]
    assert len({e[0] for e in entries}) == 1  # one pack
    path = client.repo.packs.path(entries[0][0])
    with open(path, "r+b") as f:
        for k in (1, 4):
            f.seek(entries[k][1] + 32 + 7)
            f.write(b"\x00\xff" * 8)
        last = max(entries, key=lambda e: e[1])
        f.truncate(last[1] + 32 + 100)  # the pack now ends inside its last record
    client.repo.packs.close()
    out = client.verify()
    problems = {d["ChunkId"]: d["Problem"] for d in out["Damaged"] if "ChunkId" in d}
    torn = entries.index(last)
    assert set(problems) == {xxhash.xxh3_128_digest(blocks[k]).hex() for k in {1, 4, torn}}
    for k in (1, 4):
        if k != torn:
            assert problems[xxhash.xxh3_128_digest(blocks[k]).hex()].endswith("content does not hash to its id")
    assert problems[xxhash.xxh3_128_digest(blocks[torn]).hex()].endswith("the pack ends inside the record")
    assert out["Checked"] == 8 and not out["Ok"]


@pytest.mark.parametrize("field, value", [(2, 1 << 24), (3, CS + 1), (3, 100), (4, 7)])
def test_a_damaged_index_entry_is_reported_not_crashed(client, make_image, field, value):
    """An index entry whose stored or raw length (or codec) is impossible for this repository, as a flipped
    bit in the catalog leaves it, is named by verify with the rest still checked, and stops a restore with
    Repository.Damaged: never a traceback from the C core's argument checks."""
    blocks = [rand(CS, 50 + k) for k in range(4)]
    img = make_image("a.raw", 4 * CS, [(k * CS, b) for k, b in enumerate(blocks)])
    sid = snap(client, client.add_disk(img)["DiskId"])
    bad = xxhash.xxh3_128_digest(blocks[2])
    with client.repo.catalog.write() as txn:  # a wrong value under a valid checksum (a bug, not bit rot)
        entry = list(txn.chunk(bad))
        entry[field] = value
        txn.put_chunk(bad, entry)
    out = client.verify()
    [damaged] = [d for d in out["Damaged"] if "ChunkId" in d]
    assert damaged["ChunkId"] == bad.hex()
    problem = damaged["Problem"]
    assert "index entry" in problem or "record header does not match the index" in problem
    assert out["Checked"] == 4 and not out["Ok"]
    with pytest.raises(errors.RepositoryDamaged) as exc:
        client.restore(sid, "out.raw")
    assert bad.hex() in str(exc.value)
    assert not os.path.exists("out.raw")  # a failed restore leaves no output behind


def test_restore_of_a_snapshot_deleted_while_it_starts_is_not_found(client, make_image, monkeypatch):
    """A delete landing between the restore's first look at the snapshot and its reader registration gives
    InvalidSnapshotId.NotFound, not a claim that the repository is damaged."""
    img = make_image("a.raw", MiB, [(0, rand(MiB, 60))])
    sid = snap(client, client.add_disk(img)["DiskId"])
    repo = client.repo
    real_reader = repo.reader
    deleted = []

    def register_after_delete():
        if not deleted:
            deleted.append(sid)
            repo.delete_snapshot(sid)
        return real_reader()

    monkeypatch.setattr(repo, "reader", register_after_delete)
    with pytest.raises(errors.InvalidSnapshotIdNotFound):
        client.restore(sid, "out.raw")
    assert deleted == [sid] and not os.path.exists("out.raw")


def test_a_long_lived_client_does_not_keep_descriptors_of_finished_restores(client, make_image):
    """Restores and verifies run worker threads that cache pack descriptors; a Client used for many of
    them (a backup daemon, say) must not keep every worker's descriptors open until it is closed."""
    sids = []
    for k in range(12):  # twelve creates: twelve packs
        img = make_image(f"d{k}.raw", 4 * CS, [(0, rand(4 * CS, 70 + k))])
        sids.append(snap(client, client.add_disk(img)["DiskId"]))

    def open_fds():
        return len(os.listdir("/proc/self/fd"))

    counts = []
    for round_ in range(6):
        for k, sid in enumerate(sids):
            client.restore(sid, f"out-{round_}-{k}.raw")
        assert client.verify()["Ok"]
        counts.append(open_fds())
    assert counts[-1] <= counts[0], counts


def test_retention_days_expire_at_gc(client, make_image):
    """A snapshot past its RetentionDays is deleted by gc; others stay."""
    img = make_image("a.raw", MiB, [(0, rand(MiB, 18))])
    disk = client.add_disk(img)["DiskId"]
    keep = snap(client, disk)
    old = snap(client, disk, retention_days=1)
    assert client.gc(dry_run=True)["ExpiredSnapshots"] == []
    later = time.time() + 86400 + 60  # gc takes the time it is given as now (the injectable clock)
    assert client.gc(dry_run=True, now=later)["ExpiredSnapshots"] == [old]
    client.gc(now=later)
    ids = [s["SnapshotId"] for s in client.describe_snapshots()["Snapshots"]["Snapshot"]]
    assert ids == [keep]


def test_gc_dry_run_predicts_what_gc_does(client, make_image):
    """The dry run counts the chunks that expiring snapshots will leave unreferenced (also chunks placed
    twice in one of them, and not those another snapshot keeps), so its DeadChunks and DeadBytes are
    what gc then reports and frees."""
    from blocksnap.repository import SEGMENT_CHUNKS

    seg = SEGMENT_CHUNKS * CS
    shared, own = rand(seg, 19), rand(seg, 20)
    img = make_image("a.raw", 3 * seg, [(0, shared)])
    disk = client.add_disk(img)["DiskId"]
    keep = snap(client, disk)
    with open(img, "r+b") as f:  # the old snapshot: the shared data, plus its own data twice
        f.seek(seg)
        f.write(own)
        f.write(own)
    old = snap(client, disk, retention_days=1)
    with open(img, "r+b") as f:
        f.seek(seg)
        f.write(bytes(2 * seg))
    keep2 = snap(client, disk)
    later = time.time() + 86400 + 60
    dry = client.gc(dry_run=True, now=later)
    assert dry["ExpiredSnapshots"] == [old]
    assert dry["DeadChunks"] == SEGMENT_CHUNKS  # its own data, stored once; not the shared data
    real = client.gc(now=later)
    assert (real["DeadChunks"], real["DeadBytes"]) == (dry["DeadChunks"], dry["DeadBytes"])
    assert real["FreedBytes"] >= dry["DeadBytes"] - 4096 * SEGMENT_CHUNKS
    assert client.gc(dry_run=True)["DeadChunks"] == 0
    ids = [s["SnapshotId"] for s in client.describe_snapshots()["Snapshots"]["Snapshot"]]
    assert ids == [keep, keep2]


def test_gc_dry_run_waits_for_a_running_create_instead_of_counting_its_data(client, make_image):
    """A create's packs and its chunks are unreferenced until it commits: a dry run made meanwhile would
    count them as removable. Like gc, it waits for the create (on_wait is called) and then sees nothing."""
    import threading

    img = make_image("a.raw", 4 * MiB, [(0, rand(4 * MiB, 21))])
    disk = client.add_disk(img)["DiskId"]
    plans, waited = [], []

    def during(done, total):
        if not plans:
            t = threading.Thread(target=lambda: plans.append(client.gc(dry_run=True,
                                                                       on_wait=lambda: waited.append(1))))
            t.start()
            t.join(1.0)
            assert t.is_alive()  # it waits for this create
            plans.append(t)

    snap(client, disk, progress=during)
    plans[0].join(30)
    plan = plans[1]
    assert waited == [1]
    assert (plan["DeadChunks"], plan["OrphanPacks"]) == (0, 0)


def test_unknown_ids_are_typed_errors(client):
    """Unknown or malformed disk and snapshot ids raise the API's NotFound codes."""
    with pytest.raises(errors.InvalidDiskIdNotFound):
        client.create_snapshot("d-aaaaaaaaaaaaaaaaaaaa")
    with pytest.raises(errors.InvalidSnapshotIdNotFound):
        client.delete_snapshot("s-aaaaaaaaaaaaaaaaaaaa")
    with pytest.raises(errors.InvalidSnapshotIdNotFound):
        client.restore("nonsense", "x.raw")


def test_missing_image_fails_cleanly(client, make_image):
    """A registered image that disappeared fails with InvalidImage.NotFound and stores nothing."""
    img = make_image("a.raw", MiB, [(0, b"x")])
    disk = client.add_disk(img)["DiskId"]
    os.unlink(img)
    with pytest.raises(errors.ImageNotFound):
        client.create_snapshot(disk)
    assert client.describe_snapshots()["TotalCount"] == 0
    with pytest.raises(errors.ImageNotFound):
        client.add_disk("nope.raw")


def test_directory_is_not_an_image(client, tmp_path):
    """A path that is neither a regular file nor a block device is InvalidImage.Unsupported."""
    (tmp_path / "adir").mkdir()
    with pytest.raises(errors.ImageUnsupported):
        client.add_disk(str(tmp_path / "adir"))


def test_unreadable_image_fails_cleanly(repo_path):
    """An image whose reads fail (EIO) is InvalidImage.Unreadable: one line, exit 5, nothing registered.

    /proc/self/mem is a regular file whose offset 0 is never mapped, so reading it fails for any user,
    root included (root reads past file permissions, so a chmod cannot make the case).
    """
    proc = run_cli("--repo", repo_path, "disk", "add", "/proc/self/mem")
    assert proc.returncode == 5, proc.stderr
    assert proc.stderr.startswith("blocksnap: error: InvalidImage.Unreadable") and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1
    with Client(repo_path) as c:
        assert c.describe_disks()["TotalCount"] == 0


def test_cli_round_trip_and_json_shapes(repo_path, make_image):
    """The CLI creates, lists (DescribeSnapshots shape), restores and deletes; errors are one line."""
    img = make_image("a.raw", 2 * MiB, [(0, rand(MiB, 19))])
    out = json.loads(run_cli("--repo", repo_path, "disk", "add", img, "--json", check=True).stdout)
    disk = out["DiskId"]
    assert disk.startswith("d-") and len(disk) == 22
    out = json.loads(run_cli("--repo", repo_path, "snapshot", "create", disk, "--json",
                             "--snapshot-name", "nightly-1", "--tag", "env=lab", check=True).stdout)
    sid = out["SnapshotId"]
    assert sid.startswith("s-") and len(sid) == 22 and len(out["RequestId"]) == 36
    listing = json.loads(run_cli("snapshot", "list", "--json", env={"BLOCKSNAP_REPO": repo_path},
                                 check=True).stdout)
    assert listing["TotalCount"] == 1
    [s] = listing["Snapshots"]["Snapshot"]
    for key in ("SnapshotId", "SnapshotName", "SourceDiskId", "SourceDiskSize", "Status", "Progress",
                "CreationTime", "LogicalBytes", "AddedBytes", "ExclusiveBytes"):
        assert key in s
    assert s["Tags"] == {"Tag": [{"TagKey": "env", "TagValue": "lab"}]}
    run_cli("--repo", repo_path, "restore", sid, "out.raw", check=True)
    assert files_equal(img, "out.raw")
    proc = run_cli("--repo", repo_path, "restore", sid, "out.raw")
    assert proc.returncode == 4 and "InvalidOutput.Exists" in proc.stderr
    proc = run_cli("--repo", repo_path, "snapshot", "create", "d-bbbbbbbbbbbbbbbbbbbb")
    assert proc.returncode == 3
    assert proc.stderr.strip().count("\n") == 0 and "InvalidDiskId.NotFound" in proc.stderr
    run_cli("--repo", repo_path, "snapshot", "delete", sid, check=True)
    assert json.loads(run_cli("--repo", repo_path, "snapshot", "list", "--json").stdout)["TotalCount"] == 0


def test_default_repository_is_per_user(make_image, tmp_path):
    """Without --repo or BLOCKSNAP_REPO the CLI uses (and creates) ~/.local/share/blocksnap/repo."""
    img = make_image("a.raw", MiB, [(0, b"abc")])
    proc = run_cli("disk", "add", img, env={"XDG_DATA_HOME": "", "HOME": str(tmp_path / "h")}, check=True)
    assert proc.stdout.strip().startswith("d-")
    assert os.path.exists(tmp_path / "h" / ".local" / "share" / "blocksnap" / "repo" / "config")


def test_not_a_repository(tmp_path):
    """An explicit path that holds no repository is Repository.NotFound, exit 6, one line."""
    (tmp_path / "empty").mkdir()
    proc = run_cli("--repo", str(tmp_path / "empty"), "snapshot", "list")
    assert proc.returncode == 6
    assert "Repository.NotFound" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(errors.RepositoryNotFound):
        Client(str(tmp_path / "empty"))


def test_chunk_size_is_validated(tmp_path):
    """init refuses chunk sizes that are not powers of two from 4 KiB to 4 MiB."""
    for bad in (1000, 2048, 8 << 20, 3 << 12):
        with pytest.raises(errors.InvalidChunkSize):
            Client.init(str(tmp_path / f"r{bad}"), chunk_size=bad)
    assert Client.init(str(tmp_path / "ok"), chunk_size=4096)["ChunkSize"] == 4096


def test_catalog_keys_are_big_endian(client, make_image):
    """disk_snaps keys are DiskId + big-endian sequence, so a disk's snapshots list in creation order."""
    img = make_image("a.raw", MiB, [(0, b"abc")])
    disk = client.add_disk(img)["DiskId"]
    sids = [snap(client, disk) for _ in range(3)]
    with client.repo.catalog.read() as txn:
        keys = [k for k, _ in txn._scan(catalogs.TABLES["disk_snaps"])]
    assert keys == sorted(keys)
    assert [catalogs.U64.unpack(k[23:])[0] for k in keys] == [1, 2, 3]
    listed = [s["SnapshotId"] for s in client.describe_snapshots(disk_id=disk)["Snapshots"]["Snapshot"]]
    assert listed == sids


def test_whole_window_holes_never_reach_the_c_core(client, make_image, monkeypatch):
    """A 64 GiB sparse image with two small extents is scanned as two windows, and restores identical."""
    from blocksnap import _native

    calls = []
    real_scan = _native.ExtentScanner.scan_extents

    def counting_scan(self, extents, length, buf, parent_ids=b""):
        calls.append((extents[0][1], length))
        return real_scan(self, extents, length, buf, parent_ids)

    monkeypatch.setattr(_native.ExtentScanner, "scan_extents", counting_scan)
    size = 64 << 30
    img = make_image("big.raw", size, [(3 * MiB, rand(CS, 20)), (size - 100, b"tail of the disk")])
    sid = snap(client, client.add_disk(img)["DiskId"])
    assert len(calls) == 2
    rec = record(client, sid)
    assert rec["LogicalBytes"] == 2 * CS and rec["SourceDiskSize"] == size
    client.restore(sid, "big.out")
    with open("big.out", "rb") as f:
        f.seek(3 * MiB)
        assert f.read(CS) == rand(CS, 20)
        f.seek(size - 100)
        assert f.read() == b"tail of the disk" + bytes(84)
    assert os.stat("big.out").st_blocks * 512 < 4 * MiB


def test_damaged_catalog_and_config_are_reported_not_crashed(client, make_image, repo_path):
    """A catalog whose meta pages are overwritten, or a garbled config, is Repository.Damaged in one line."""
    img = make_image("a.raw", MiB, [(0, rand(MiB, 21))])
    sid = snap(client, client.add_disk(img)["DiskId"])
    client.close()
    catalogs.close_env(os.path.join(repo_path, "catalog"))
    with open(os.path.join(repo_path, "catalog", "data.mdb"), "r+b") as f:
        f.write(bytes(8192))  # both LMDB meta pages
    proc = run_cli("--repo", repo_path, "verify")  # names the snapshot the unusable catalog affects
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert sid in proc.stdout and "repair" in proc.stdout, proc.stdout
    proc = run_cli("--repo", repo_path, "snapshot", "list")
    assert proc.returncode == 1 and "Repository.CatalogDamaged" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    with open(os.path.join(repo_path, "config"), "w") as f:
        f.write("{not json")
    proc = run_cli("--repo", repo_path, "snapshot", "list")
    assert proc.returncode == 1 and "Repository.Damaged" in proc.stderr and "Traceback" not in proc.stderr


def test_gc_waits_for_a_running_reader_and_says_so(client, make_image):
    """gc does not give back data that a reader registered before it could still read: it waits for that
    reader and says so (on_readers); a reader that starts meanwhile is not held up."""
    import threading

    keep_img = make_image("k.raw", MiB, [(0, rand(MiB, 23))])
    keep = snap(client, client.add_disk(keep_img)["DiskId"])
    img = make_image("a.raw", MiB, [(0, rand(MiB, 22))])
    sid = snap(client, client.add_disk(img)["DiskId"])
    reader = client.repo.reader()  # as a running restore of sid registers
    client.delete_snapshot(sid)  # its space cannot be given back while the reader may read it
    told = threading.Event()
    done = threading.Event()
    freed = []

    def run_gc():
        freed.append(client.gc(on_readers=told.set)["FreedBytes"])
        done.set()

    t = threading.Thread(target=run_gc)
    t.start()
    try:
        assert told.wait(10)
        assert not done.is_set()
        client.restore(keep, "k.out")  # a new reader meanwhile: not held up by the waiting gc
        assert files_equal(keep_img, "k.out")
    finally:
        reader.release()
    t.join(10)
    assert done.is_set() and freed[0] >= MiB - 64 * 1024


def test_running_out_of_descriptors_is_not_called_damage(client, make_image, repo_path):
    """Verify and restore in a process at its descriptor limit fail with Repository.Error, and do not
    report the repository as damaged."""
    import subprocess
    import sys

    img = make_image("a.raw", 4 * CS, [(0, rand(4 * CS, 90))])
    sid = snap(client, client.add_disk(img)["DiskId"])
    client.close()
    code = (
        "import concurrent.futures.thread, os, resource, sys\n"
        "import blocksnap.restore\n"
        "from blocksnap import errors\n"
        "from blocksnap.api import Client\n"
        "c = Client(sys.argv[1])\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))\n"
        "hog = []\n"
        "try:\n"
        "    while True:\n"
        "        hog.append(os.open(os.devnull, os.O_RDONLY))\n"
        "except OSError:\n"
        "    pass\n"
        "os.close(hog.pop())\n"
        "for call in (lambda: c.verify(), lambda: c.restore(sys.argv[2], sys.argv[3])):\n"
        "    try:\n"
        "        out = call()\n"
        "        print('no error', out)\n"
        "    except errors.BlocksnapError as exc:\n"
        "        print(exc.code)\n"
    )
    p = subprocess.run([sys.executable, "-c", code, repo_path, sid, "out.raw"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.split()
    assert "Repository.Damaged" not in p.stdout and "no" not in lines, p.stdout
    assert lines[0] == "Repository.Error", p.stdout


@pytest.mark.parametrize("tmpfile", [True, False])
def test_a_restore_gets_its_output_name_only_when_complete(client, make_image, monkeypatch, tmp_path, tmpfile):
    """A new output is written unnamed (O_TMPFILE) and linked to its name at the end; where the file system
    cannot do that, it is written under its name and removed when the restore fails. Either way a damaged
    chunk leaves no output, a good restore leaves the right bytes, and a name taken meanwhile is not
    overwritten."""
    blocks = [rand(CS, 80 + k) for k in range(4)]
    img = make_image("a.raw", 4 * CS, [(k * CS, b) for k, b in enumerate(blocks)])
    sid = snap(client, client.add_disk(img)["DiskId"])
    if not tmpfile:
        real_open = os.open

        def no_tmpfile(path, flags, *args, **kw):
            if flags & os.O_TMPFILE == os.O_TMPFILE:
                raise OSError(95, "Operation not supported")
            return real_open(path, flags, *args, **kw)

        monkeypatch.setattr(os, "open", no_tmpfile)
    out = tmp_path / "out.raw"
    client.restore(sid, str(out))
    assert files_equal(img, out) and oct(os.stat(out).st_mode & 0o777) == oct(0o644 & ~_umask())
    os.unlink(out)

    with client.repo.catalog.write() as txn:  # damage chunk 3's index entry: the restore fails near its end
        cid = xxhash.xxh3_128_digest(blocks[3])
        entry = list(txn.chunk(cid))
        entry[3] = CS + 1
        txn.put_chunk(cid, entry)
    with pytest.raises(errors.RepositoryDamaged):
        client.restore(sid, str(out))
    assert not out.exists() and os.listdir(tmp_path).count("out.raw") == 0


def test_an_output_name_taken_while_the_restore_runs_is_not_overwritten(client, make_image, tmp_path):
    img = make_image("a.raw", 4 * CS, [(0, rand(4 * CS, 85))])
    sid = snap(client, client.add_disk(img)["DiskId"])
    out = tmp_path / "out.raw"

    def someone_else(done, total):
        if not out.exists():
            out.write_bytes(b"theirs")

    with pytest.raises(errors.OutputExists):
        client.restore(sid, str(out), progress=someone_else)
    assert out.read_bytes() == b"theirs"


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask



def test_an_image_path_of_any_length_registers(client, tmp_path):
    """An image whose real path is far longer than LMDB's 511-byte key limit registers (disk_paths keys are a
    hash of the path), snapshots and restores, and the same path again is InvalidDisk.Duplicate."""
    deep = tmp_path
    for k in range(6):
        deep = deep / (f"{k}" * 150)
    deep.mkdir(parents=True)
    img = write_image(deep / "disk.raw", MiB, [(0, rand(MiB, 70))])
    assert len(os.path.realpath(img).encode()) > 900
    disk = client.add_disk(img)["DiskId"]
    sid = snap(client, disk)
    client.restore(sid, "long.out")
    assert files_equal(img, "long.out")
    with pytest.raises(errors.DiskAlreadyRegistered):
        client.add_disk(img)
    assert client.verify()["Ok"]


def test_a_record_edit_made_while_a_create_runs_is_kept(client, make_image):
    """A change another writer makes to the record of a running create (here its Description, through the
    catalog) survives the create's commit, in the catalog and in the snapshot's object in the store."""
    img = make_image("a.raw", 16 * MiB, [(0, rand(16 * MiB, 71))])
    disk = client.add_disk(img)["DiskId"]
    edited = []

    def edit(done, total):
        if edited:
            return
        with client.repo.catalog.write() as txn:
            [sid] = txn.disk_snapshot_ids(disk)
            rec = txn.snapshot(sid)
            rec["Description"] = "edited while it ran"
            txn.put_snapshot(rec)
        edited.append(sid)

    sid = client.create_snapshot(disk, description="as asked", progress=edit)["SnapshotId"]
    assert edited == [sid]
    assert record(client, sid)["Description"] == "edited while it ran"
    assert client.repo.stored_snapshot(sid)[0]["Description"] == "edited while it ran"
    assert client.verify()["Ok"]


def test_a_repository_made_anew_at_the_same_path_is_seen_anew(tmp_path, make_image):
    """One process that used a repository, which was then removed and made anew at the same path (while an
    old Client is still open, and after it closed), sees the new repository, not the old catalog."""
    import shutil

    path = str(tmp_path / "r")
    Client.init(path, chunk_size=CS)
    img = make_image("a.raw", MiB, [(0, rand(MiB, 72))])
    old = Client(path)
    snap(old, old.add_disk(img)["DiskId"])
    shutil.rmtree(path)
    Client.init(path, chunk_size=CS)
    with Client(path) as fresh:
        assert fresh.describe_disks()["TotalCount"] == 0
        assert fresh.describe_snapshots()["TotalCount"] == 0
        snap(fresh, fresh.add_disk(img)["DiskId"])
    old.close()
    shutil.rmtree(path)
    Client.init(path, chunk_size=CS)
    with Client(path) as again:
        assert again.describe_snapshots()["TotalCount"] == 0
