"""Golden tests: the bytes that reach disk (chunk ids, catalog records and keys, pack layout, config).

The hex literals below are frozen. If one of these tests fails, the on-disk format changed: that
needs a FORMAT version bump (repository.FORMAT_VERSION and docs/FORMAT.md), not a new literal.
"""
import json
import os

import pytest
import xxhash
import zstandard
from conftest import run_cli

import blocksnap
from blocksnap import _native, errors
from blocksnap.api import Client
from blocksnap.repository import Repository
from blocksnap.store import chunks, meta

KiB, MiB = 1 << 10, 1 << 20
ZERO_ID = bytes(16)
PACK_ID = bytes.fromhex("0123456789abcdef")


def child_env():
    """PYTHONPATH for run_cli children: the directory this process imported blocksnap from."""
    return {"PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(blocksnap.__file__)))}


# --- chunk ids --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("data, hexid", [
    (b"", "99aa06d3014798d86001c324468d497f"),
    (b"blocksnap", "0d341b4eece85dc8675a388811c2fa95"),
    (bytes(4096), "3ee8dc4f9e7ee49593d76fe148c689ba"),
    (bytes(range(256)) * 256, "9b31b2ce54c6e35a9a1db56d610a5516"),
], ids=["empty", "blocksnap", "4K-zeros", "64K-ramp"])
def test_chunk_id_is_frozen_xxh3_128(data, hexid):
    """A chunk id is XXH3-128 (seed 0, canonical big-endian) of the bytes: the C core, the xxhash
    package and the frozen literal agree."""
    assert _native.hash128(data).hex() == hexid
    assert xxhash.xxh3_128_digest(data).hex() == hexid


# --- struct layouts and key encodings ---------------------------------------------------------------------
def test_catalog_chunk_entry_layout():
    """A chunks-database value is pack_id(8) offset(8) stored(4) raw(4) codec(1) reserved(3) refcount(4),
    big-endian."""
    assert meta.CHUNK.size == 32
    assert meta.CHUNK.pack(PACK_ID, 4112, 1234, 65536, 1, 3).hex() == (
        "0123456789abcdef" "0000000000001010" "000004d2" "00010000" "01" "000000" "00000003")
    raw = bytes.fromhex("0123456789abcdef0000000000001010000004d2000100000100000000000003")
    assert meta.CHUNK.unpack(raw) == (PACK_ID, 4112, 1234, 65536, 1, 3)


def test_catalog_key_and_small_record_encodings():
    """Keys and counters are fixed-width big-endian u64, so byte order is numeric order; segment
    refcounts are u32 and pack records live(4) bytes(8)."""
    assert meta.U64.pack(1).hex() == "0000000000000001"
    assert meta.U64.pack(0x0102030405060708).hex() == "0102030405060708"
    keys = [meta.U64.pack(n) for n in (256, 1, 65536, 255)]
    assert sorted(keys) == [meta.U64.pack(n) for n in (1, 255, 256, 65536)]
    assert meta.SEG_RC.pack(2).hex() == "00000002"
    assert meta.PACK.pack(5, (1 << 32) | 7).hex() == "00000005" "0000000100000007"


def test_catalog_database_names():
    """The catalog's named databases are exactly these."""
    assert meta.DB_NAMES == (b"disks", b"disk_paths", b"snapshots", b"snapmaps", b"disk_snaps", b"segments",
                             b"chunks", b"packs", b"reclaim", b"tokens", b"counters")


def test_pack_header_and_record_layout():
    """A pack starts with magic 'BSPACK\\0\\1' and its 8-byte id; each record header is 'BSCK' codec(1)
    reserved(3) raw_len(4) stored_len(4) chunk id(16)."""
    assert chunks.PACK_MAGIC == b"BSPACK\x00\x01" and chunks.RECORD_MAGIC == b"BSCK"
    assert chunks.PACK_HEADER.size == 16 and chunks.RECORD.size == 32
    assert chunks.PACK_HEADER.pack(chunks.PACK_MAGIC, PACK_ID).hex() == "42535041434b0001" "0123456789abcdef"
    cid = bytes.fromhex("0d341b4eece85dc8675a388811c2fa95")
    assert chunks.RECORD.pack(chunks.RECORD_MAGIC, 1, 65536, 1234, cid).hex() == (
        "4253434b" "01" "000000" "00010000" "000004d2" "0d341b4eece85dc8675a388811c2fa95")
    assert (chunks.CODEC_RAW, chunks.CODEC_ZSTD) == (0, 1)


# --- the repository config --------------------------------------------------------------------------------
def test_new_repository_config(repo_path):
    """A new repository's config file holds exactly the format name, version 1, chunk size, 256 ids a
    segment, the chunk-id and compression names, a random id and the creation time."""
    with open(os.path.join(repo_path, "config"), encoding="utf-8") as f:
        cfg = json.load(f)
    assert set(cfg) == {"Format", "Version", "RepositoryId", "ChunkSize", "SegmentChunks", "ChunkId",
                        "Compression", "CreationTime"}
    assert cfg["Format"] == "blocksnap-repository"
    assert cfg["Version"] == 1
    assert cfg["ChunkSize"] == 64 * KiB
    assert cfg["SegmentChunks"] == 256
    assert cfg["ChunkId"] == "xxh3-128"
    assert cfg["Compression"] == "zstd:1"
    assert len(cfg["RepositoryId"]) == 32 and int(cfg["RepositoryId"], 16) >= 0
    assert sorted(os.listdir(repo_path)) == ["catalog", "config", "locks", "packs"]


def set_config(path, **changes):
    cfg_path = os.path.join(path, "config")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f)


def test_newer_version_is_refused(tmp_path):
    """A repository whose config says Version 2 fails to open with Repository.VersionUnsupported."""
    path = str(tmp_path / "v2")
    Client.init(path, chunk_size=64 * KiB)
    set_config(path, Version=2)
    with pytest.raises(errors.RepositoryVersionUnsupported) as exc:
        Client(path)
    assert exc.value.code == "Repository.VersionUnsupported"
    assert "format version 2" in str(exc.value)
    with pytest.raises(errors.RepositoryVersionUnsupported):
        Repository.open(path)


def test_cli_newer_version_one_line_exit_6(tmp_path):
    """The CLI refuses a Version 2 repository with one stderr line and exit code 6."""
    path = str(tmp_path / "v2")
    Client.init(path, chunk_size=64 * KiB)
    set_config(path, Version=2)
    proc = run_cli("snapshot", "list", "--repo", path, env=child_env())
    assert proc.returncode == 6, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("blocksnap: error: Repository.VersionUnsupported")
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("kind", ["empty-dir", "missing", "foreign-config", "garbage-config", "file"])
def test_not_a_repository(tmp_path, kind):
    """A path that is no blocksnap repository fails to open with Repository.NotFound."""
    path = tmp_path / "r"
    if kind == "empty-dir":
        path.mkdir()
    elif kind == "foreign-config":
        path.mkdir()
        (path / "config").write_text(json.dumps({"Format": "other", "Version": 1, "ChunkSize": 65536}))
    elif kind == "garbage-config":
        path.mkdir()
        (path / "config").write_text("not json")
    elif kind == "file":
        path.write_text("x")
    with pytest.raises(errors.RepositoryNotFound) as exc:
        Client(str(path))
    assert exc.value.code == "Repository.NotFound"


def test_cli_not_a_repository_exit_6(tmp_path):
    """The CLI on a directory that is no repository prints one Repository.NotFound line and exits 6."""
    (tmp_path / "empty").mkdir()
    proc = run_cli("snapshot", "list", "--repo", str(tmp_path / "empty"), env=child_env())
    assert proc.returncode == 6, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("blocksnap: error: Repository.NotFound"), proc.stderr


# --- a snapshot's bytes on disk ----------------------------------------------------------------------
CS = 64 * KiB
SEG = 256 * CS


@pytest.fixture
def snapped(client, make_image):
    """A 64 KiB-chunk snapshot of a known image: segment 0 with data, zeros and a duplicate, segment 1
    all hole, segment 2 with data and a 1000-byte tail."""
    rnd = b"".join(xxhash.xxh3_128_digest(i.to_bytes(4, "big")) for i in range(CS // 16))  # incompressible
    size = 2 * SEG + 3 * CS + 1000
    extents = [
        (0, b"blocksnap" * (CS // 9) + b"b" * (CS % 9)),  # compressible: zstd
        (5 * CS, rnd),  # incompressible: raw
        (6 * CS, rnd),  # the same bytes again: stored once
        (255 * CS, bytes(CS)),  # explicit zeros: zero id
        (2 * SEG, b"segment two " * 100),
        (size - 1000, b"T" * 1000),
    ]
    img = make_image("golden.raw", size, extents)
    disk = client.add_disk(img)["DiskId"]
    sid = client.create_snapshot(disk)["SnapshotId"]
    with open(img, "rb") as f:
        image = f.read()
    return client, disk, sid, image


def expected_ids(image):
    ids = []
    for off in range(0, len(image), CS):
        data = image[off:off + CS]
        ids.append(ZERO_ID if not any(data) else xxhash.xxh3_128_digest(data))
    return ids


def test_snapmap_is_list_of_segment_ids(snapped):
    """A snapshot's snapmaps value is its segment ids: XXH3-128 of each run of 256 concatenated chunk
    ids (fewer in the last), the zero id for an all-zero segment; segments store refcount + those ids."""
    client, _, sid, image = snapped
    ids = expected_ids(image)
    assert len(ids) == 516
    segs = [b"".join(ids[i:i + 256]) for i in range(0, len(ids), 256)]
    seg_ids = [ZERO_ID if not any(s) else xxhash.xxh3_128_digest(s) for s in segs]
    assert seg_ids[1] == ZERO_ID and seg_ids[0] != ZERO_ID and seg_ids[2] != ZERO_ID
    cat = client.repo.catalog
    with cat.read() as txn:
        assert txn.get(sid.encode(), db=cat.db["snapmaps"]) == b"".join(seg_ids)
        for seg_id, seg in zip(seg_ids, segs):
            if seg_id != ZERO_ID:
                assert txn.get(seg_id, db=cat.db["segments"]) == meta.SEG_RC.pack(1) + seg
        assert txn.get(ZERO_ID, db=cat.db["segments"]) is None


def test_chunk_index_and_pack_records_on_disk(snapped, repo_path):
    """Each distinct data chunk has one chunks-database entry (refcount = its uses) pointing at a record
    in a pack file that starts with the pack header; the record header and stored bytes decode,
    independently of blocksnap, to the chunk's exact bytes (zstd for compressible data, raw otherwise)."""
    client, _, _, image = snapped
    ids = expected_ids(image)
    uses = {}
    for cid in ids:
        if cid != ZERO_ID:
            uses[cid] = uses.get(cid, 0) + 1
    assert len(uses) == 4 and max(uses.values()) == 2
    content = {cid: image[i * CS:(i + 1) * CS] for i, cid in reversed(list(enumerate(ids)))}
    cat = client.repo.catalog
    with cat.read() as txn:
        index = {k: meta.CHUNK.unpack(v) for k, v in txn.cursor(db=cat.db["chunks"])}
    assert set(index) == set(uses)
    codecs = {}
    for cid, (pack_id, offset, stored_len, raw_len, codec, refcount) in index.items():
        assert refcount == uses[cid]
        assert raw_len == len(content[cid])
        path = os.path.join(repo_path, "packs", pack_id.hex()[:2], pack_id.hex() + ".pack")
        with open(path, "rb") as f:
            blob = f.read()
        assert blob[:16] == chunks.PACK_MAGIC + pack_id
        head = blob[offset:offset + 32]
        assert head == b"BSCK" + bytes([codec]) + bytes(3) + raw_len.to_bytes(4, "big") \
            + stored_len.to_bytes(4, "big") + cid
        stored = blob[offset + 32:offset + 32 + stored_len]
        if codec == 1:
            assert stored[:4] == bytes.fromhex("28b52ffd")  # a zstd frame
            data = zstandard.ZstdDecompressor().decompress(stored, max_output_size=raw_len)
        else:
            assert codec == 0
            data = stored
        assert data == content[cid]
        codecs[cid] = codec
    assert codecs[ids[0]] == 1 and codecs[ids[5]] == 0


def test_pack_is_a_contiguous_run_of_records(snapped, repo_path):
    """A pack file is its header, back-to-back records (one per indexed chunk), then zeros to a 4 KiB boundary."""
    client, _, _, _ = snapped
    cat = client.repo.catalog
    with cat.read() as txn:
        entries = sorted(meta.CHUNK.unpack(v)[:3] for _, v in txn.cursor(db=cat.db["chunks"]))
    [pack_id] = {e[0] for e in entries}
    pos = 16
    for _, offset, stored_len in entries:
        assert offset == pos
        pos += 32 + stored_len
    path = os.path.join(repo_path, "packs", pack_id.hex()[:2], pack_id.hex() + ".pack")
    assert os.path.getsize(path) == -(-pos // 4096) * 4096
    with open(path, "rb") as f:
        f.seek(pos)
        assert f.read() == bytes(os.path.getsize(path) - pos)


def test_disk_snaps_key_is_disk_id_and_big_endian_seq(snapped):
    """A disk's first snapshot has disk_snaps key DiskId + big-endian u64 1 and value its SnapshotId."""
    client, disk, sid, _ = snapped
    cat = client.repo.catalog
    with cat.read() as txn:
        rows = list(txn.cursor(db=cat.db["disk_snaps"]))
        names = sorted(k for k, _ in txn.cursor())
    assert rows == [(disk.encode() + bytes.fromhex("0000000000000001"), sid.encode())]
    assert names == sorted(meta.DB_NAMES)  # the main database holds only the named databases
