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
from blocksnap.store import catalog, objects, packs

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
def sealed(key, payload):
    """A catalog value as FORMAT.md says: the payload and the XXH3-64 of key + payload (independent xxhash)."""
    return payload + xxhash.xxh3_64_digest(key + payload)


def test_catalog_tables_and_key_prefixes():
    """The catalog is LMDB's main database only; each table is a one-byte key prefix, frozen here."""
    assert catalog.TABLES == {"meta": b"M", "disks": b"D", "disk_paths": b"P", "snapshots": b"S",
                              "disk_snaps": b"N", "maps": b"m", "segments": b"G", "segment_refs": b"g",
                              "chunks": b"C", "packs": b"K", "reclaim": b"R", "tokens": b"T",
                              "index": b"I", "index_counts": b"i", "groups": b"Q"}


def test_catalog_index_entry_and_count_layout(snapped):
    """An index entry is 'I' + kind ('S' snapshot) + field ('n' SnapshotName, '*' every record, 'd' SourceDiskId,
    ...) + XXH3-64 of the value + big-endian u64 Seq, its value the SnapshotId; the count of a list is 'i' + the
    same prefix, a u64. The catalog says version 3 (its indexes complete)."""
    client, disk, sid, _ = snapped
    with client.repo.catalog.read() as txn:
        rows = {bytes(k): bytes(v) for k, v in txn._scan(b"I")}
        counts = {bytes(k): bytes(v) for k, v in txn._scan(b"i")}
        meta = txn.meta_json(catalog.META_CATALOG)
    seq = bytes.fromhex("0000000000000001")
    for field, value in ((b"*", b""), (b"d", disk.encode()), (b"s", b"accomplished"), (b"c", b"Standard"),
                         (b"y", b"user"), (b"r", b"")):
        prefix = b"S" + field + xxhash.xxh3_64_digest(value)
        assert rows[b"I" + prefix + seq] == sealed(b"I" + prefix + seq, sid.encode())
        assert counts[b"i" + prefix] == sealed(b"i" + prefix, (1).to_bytes(8, "big"))
    assert meta["Version"] == 3 and catalog.CATALOG_VERSION == 3


def test_catalog_chunk_entry_layout_and_checksum():
    """A chunk entry is pack_id(8) offset(8) stored(4) raw(4) codec(1) reserved(3) refcount(4), big-endian,
    followed by the XXH3-64 of 'C' + chunk id + those 32 bytes."""
    assert catalog.CHUNK.size == 32
    payload = catalog.CHUNK.pack(PACK_ID, 4112, 1234, 65536, 1, 3)
    key = b"C" + bytes.fromhex("0d341b4eece85dc8675a388811c2fa95")
    assert sealed(key, payload).hex() == (
        "0123456789abcdef" "0000000000001010" "000004d2" "00010000" "01" "000000" "00000003" "e4a77c0abbe98b9c")
    assert catalog.CHUNK.unpack(payload) == (PACK_ID, 4112, 1234, 65536, 1, 3)


def test_catalog_small_value_encodings():
    """Counters are u64 and segment refcounts u32, big-endian (byte order is numeric order), sealed by
    their checksum; a pack entry is size(8) records(4), a reclaim entry length(8) epoch(8)."""
    assert catalog.U64.pack(1).hex() == "0000000000000001"
    keys = [catalog.U64.pack(n) for n in (256, 1, 65536, 255)]
    assert sorted(keys) == [catalog.U64.pack(n) for n in (1, 255, 256, 65536)]
    assert sealed(b"Mseq", catalog.U64.pack(7)).hex() == "0000000000000007" "9b91a8064bc0c88a"
    seg = bytes.fromhex("0d341b4eece85dc8675a388811c2fa95")
    assert sealed(b"g" + seg, catalog.U32.pack(2)).hex() == "00000002" "67bbff61980057fb"
    assert catalog.PACK.pack(5 << 32 | 7, 3).hex() == "0000000500000007" "00000003"
    assert catalog.RECLAIM.pack(4128, 9).hex() == "0000000000001020" "0000000000000009"
    assert catalog.SEGMENT_HEAD.pack(PACK_ID, 16).hex() == "0123456789abcdef" "0000000000000010"


def test_pack_header_and_record_layout():
    """A pack starts with magic 'BSPACK\\0\\2' and its 8-byte id; each record header is 'BSCK' codec(1)
    kind(1) reserved(2) raw_len(4) stored_len(4) id(16)."""
    assert packs.PACK_MAGIC == b"BSPACK\x00\x02" and packs.PACK_MAGIC_V1 == b"BSPACK\x00\x01"
    assert packs.RECORD_MAGIC == b"BSCK"
    assert packs.PACK_HEADER.size == 16 and packs.RECORD.size == 32
    assert packs.PACK_HEADER.pack(packs.PACK_MAGIC, PACK_ID).hex() == "42535041434b0002" "0123456789abcdef"
    cid = bytes.fromhex("0d341b4eece85dc8675a388811c2fa95")
    assert packs.RECORD.pack(packs.RECORD_MAGIC, 1, 1, 65536, 1234, cid).hex() == (
        "4253434b" "01" "01" "0000" "00010000" "000004d2" "0d341b4eece85dc8675a388811c2fa95")
    assert (packs.CODEC_RAW, packs.CODEC_ZSTD, packs.KIND_CHUNK, packs.KIND_SEGMENT) == (0, 1, 0, 1)


def test_pack_trailer_layout():
    """A pack's trailer is its index ('BSPX', count, 40-byte entries), zeros, and a 32-byte tail ('BSPT',
    index length, pack id, index offset, XXH3-64 of index + tail[:24]) ending on a 4 KiB boundary."""
    rid = bytes.fromhex("0d341b4eece85dc8675a388811c2fa95")
    rec = packs.Record(rid, 16, 1234, 65536, 1, 0)
    trailer = packs.build_trailer(PACK_ID, 1282, [rec])
    index = bytes.fromhex("42535058" "00000001" "0d341b4eece85dc8675a388811c2fa95" "0000000000000010"
                          "000004d2" "00010000" "01" "00" "000000000000")
    assert trailer.startswith(index)
    assert (1282 + len(trailer)) % 4096 == 0
    tail = trailer[-32:]
    assert tail[:24].hex() == "42535054" "00000030" "0123456789abcdef" "0000000000000502"
    assert tail[24:] == xxhash.xxh3_64_digest(index + tail[:24])
    assert trailer[len(index):-32] == bytes(len(trailer) - len(index) - 32)


def test_store_object_layout():
    """A snapshot object is 'BSOBJ\\0', version 2, kind 'S', JSON length, segment count, the compact sorted
    JSON, the segment ids, and the XXH3-128 of all of it."""
    rec = {"SnapshotId": "s-" + "a" * 20, "Status": "accomplished"}
    seg = bytes.fromhex("0d341b4eece85dc8675a388811c2fa95")
    data = objects._encode(b"S", rec, seg)
    body = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()
    head = b"BSOBJ\x00" + bytes([2]) + b"S" + len(body).to_bytes(4, "big") + (1).to_bytes(4, "big")
    assert data == head + body + seg + xxhash.xxh3_128_digest(head + body + seg)


# --- the repository config --------------------------------------------------------------------------------
def test_new_repository_config(repo_path):
    """A new repository's config file holds exactly the format name, version 2, chunk size, 256 ids a
    segment, the chunk-id and compression names, a random id, the creation time and its checksum: the
    XXH3-64 of the compact, key-sorted JSON of the other fields."""
    with open(os.path.join(repo_path, "config"), encoding="utf-8") as f:
        cfg = json.load(f)
    assert set(cfg) == {"Format", "Version", "RepositoryId", "ChunkSize", "SegmentChunks", "ChunkId",
                        "Compression", "CreationTime", "Checksum"}
    body = {k: v for k, v in cfg.items() if k != "Checksum"}
    assert cfg["Checksum"] == xxhash.xxh3_64_hexdigest(json.dumps(body, sort_keys=True, separators=(",", ":"))
                                                       .encode())
    assert cfg["Format"] == "blocksnap-repository"
    assert cfg["Version"] == 2
    assert cfg["ChunkSize"] == 64 * KiB
    assert cfg["SegmentChunks"] == 256
    assert cfg["ChunkId"] == "xxh3-128"
    assert cfg["Compression"] == "zstd:1"
    assert len(cfg["RepositoryId"]) == 32 and int(cfg["RepositoryId"], 16) >= 0
    assert sorted(os.listdir(repo_path)) == ["catalog", "config", "disks", "locks", "packs", "snapshots"]
    assert sorted(os.listdir(os.path.join(repo_path, "locks"))) == ["gate.lock", "read-0.lock", "read-1.lock",
                                                                    "repo.lock"]


def set_config(path, **changes):
    """Change config fields and seal it again with a valid checksum (as a newer blocksnap would)."""
    from blocksnap.store import config as configs

    cfg_path = os.path.join(path, "config")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(cfg_path, "w", encoding="utf-8") as f:
        f.write(configs.encode(cfg))


def test_newer_version_is_refused(tmp_path):
    """A repository whose config says Version 3 fails to open with Repository.VersionUnsupported."""
    path = str(tmp_path / "v3")
    Client.init(path, chunk_size=64 * KiB)
    set_config(path, Version=3)
    with pytest.raises(errors.RepositoryVersionUnsupported) as exc:
        Client(path)
    assert exc.value.code == "Repository.VersionUnsupported"
    assert "format version 3" in str(exc.value)
    with pytest.raises(errors.RepositoryVersionUnsupported):
        Repository.open(path)


def test_cli_newer_version_one_line_exit_6(tmp_path):
    """The CLI refuses a Version 3 repository with one stderr line and exit code 6."""
    path = str(tmp_path / "v3")
    Client.init(path, chunk_size=64 * KiB)
    set_config(path, Version=3)
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


def test_map_is_list_of_segment_ids_and_segments_are_stored_twice(snapped, repo_path):
    """A snapshot's map value is its segment ids: XXH3-128 of each run of 256 concatenated chunk ids (fewer
    in the last), the zero id for an all-zero segment. Each segment is in the catalog (its pack, offset and
    ids; refcount 1 in its own table) and in the store, as a kind-1 raw record whose bytes are those ids."""
    client, _, sid, image = snapped
    ids = expected_ids(image)
    assert len(ids) == 516
    segs = [b"".join(ids[i:i + 256]) for i in range(0, len(ids), 256)]
    seg_ids = [ZERO_ID if not any(s) else xxhash.xxh3_128_digest(s) for s in segs]
    assert seg_ids[1] == ZERO_ID and seg_ids[0] != ZERO_ID and seg_ids[2] != ZERO_ID
    with client.repo.catalog.read() as txn:
        raw = txn._t.get(b"m" + sid.encode())
        assert bytes(raw) == sealed(b"m" + sid.encode(), b"".join(seg_ids))
        for seg_id, seg in zip(seg_ids, segs):
            if seg_id == ZERO_ID:
                continue
            value = bytes(txn._t.get(b"G" + seg_id))
            pack_id, offset = catalog.SEGMENT_HEAD.unpack_from(value)
            assert value == sealed(b"G" + seg_id, value[:16] + seg)
            assert bytes(txn._t.get(b"g" + seg_id)) == sealed(b"g" + seg_id, (1).to_bytes(4, "big"))
            path = os.path.join(repo_path, "packs", pack_id.hex()[:2], pack_id.hex() + ".pack")
            with open(path, "rb") as f:
                f.seek(offset)
                rec = f.read(32 + len(seg))
            assert rec == b"BSCK" + bytes([0, 1, 0, 0]) + len(seg).to_bytes(4, "big") * 2 + seg_id + seg
        assert txn._t.get(b"G" + ZERO_ID) is None


def test_chunk_index_and_pack_records_on_disk(snapped, repo_path):
    """Each distinct data chunk has one chunk entry (refcount = its uses) pointing at a record in a pack
    file that starts with the pack header; the record header and stored bytes decode, independently of
    blocksnap, to the chunk's exact bytes (zstd for compressible data, raw otherwise)."""
    client, _, _, image = snapped
    ids = expected_ids(image)
    uses = {}
    for cid in ids:
        if cid != ZERO_ID:
            uses[cid] = uses.get(cid, 0) + 1
    assert len(uses) == 4 and max(uses.values()) == 2
    content = {cid: image[i * CS:(i + 1) * CS] for i, cid in reversed(list(enumerate(ids)))}
    with client.repo.catalog.read() as txn:
        index = {}
        for key, value in txn._scan(b"C"):
            value = bytes(value)
            assert value[32:] == xxhash.xxh3_64_digest(key + value[:32])
            index[key[1:]] = catalog.CHUNK.unpack(value[:32])
    assert set(index) == set(uses)
    codecs = {}
    for cid, (pack_id, offset, stored_len, raw_len, codec, refcount) in index.items():
        assert refcount == uses[cid]
        assert raw_len == len(content[cid])
        path = os.path.join(repo_path, "packs", pack_id.hex()[:2], pack_id.hex() + ".pack")
        with open(path, "rb") as f:
            blob = f.read()
        assert blob[:16] == packs.PACK_MAGIC + pack_id
        head = blob[offset:offset + 32]
        assert head == b"BSCK" + bytes([codec, 0, 0, 0]) + raw_len.to_bytes(4, "big") \
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


def test_pack_is_records_then_its_trailer(snapped, repo_path):
    """A pack file is its header, back-to-back records (the chunks, then the map segments), then its trailer,
    which lists exactly those records and ends the file on a 4 KiB boundary."""
    client, _, _, _ = snapped
    [pack_id] = client.repo.backend.list_packs()
    path = os.path.join(repo_path, "packs", pack_id.hex()[:2], pack_id.hex() + ".pack")
    with open(path, "rb") as f:
        blob = f.read()
    assert len(blob) % 4096 == 0
    listed = packs.read_trailer(client.repo.backend, pack_id)
    pos = 16
    before = set()
    for r in listed:
        assert r.offset == pos
        head = blob[pos:pos + 32]
        assert head == packs.RECORD.pack(b"BSCK", r.codec, r.kind, r.raw_len, r.stored_len, r.id)
        if r.kind == 1:  # a segment follows the records of the chunks it names
            seg = blob[pos + 32:pos + 32 + r.stored_len]
            named = {seg[i:i + 16] for i in range(0, len(seg), 16)} - {ZERO_ID}
            assert named <= before
        before.add(r.id)
        pos += 32 + r.stored_len
    assert sorted(r.kind for r in listed) == [0] * 4 + [1] * 2
    index_len, index_off = int.from_bytes(blob[-28:-24], "big"), int.from_bytes(blob[-16:-8], "big")
    assert index_off == pos and blob[pos:pos + 4] == b"BSPX" and index_len == 8 + 40 * len(listed)


def test_disk_snaps_key_is_disk_id_and_big_endian_seq(snapped):
    """A disk's first snapshot has the snapshot-order key 'N' + DiskId + big-endian u64 1 and value its
    SnapshotId; every key of the catalog starts with a table's prefix."""
    client, disk, sid, _ = snapped
    with client.repo.catalog.read() as txn:
        rows = [(k, bytes(v)) for k, v in txn._scan(b"N")]
        prefixes = {bytes(k)[:1] for k, _ in txn._t.cursor()}
    key = b"N" + disk.encode() + bytes.fromhex("0000000000000001")
    assert rows == [(key, sealed(key, sid.encode()))]
    assert prefixes <= set(catalog.TABLES.values())


def test_snapshot_and_disk_objects_in_the_store(snapped, repo_path):
    """The store holds the disk's object and the snapshot's, which repeats its catalog record and map."""
    client, disk, sid, _ = snapped
    with open(os.path.join(repo_path, "snapshots", sid), "rb") as f:
        rec, seg_ids = objects.decode_snapshot(sid, f.read())
    with client.repo.catalog.read() as txn:
        assert rec == txn.snapshot(sid)
        assert seg_ids == txn.snapshot_map(sid, 3)
    with open(os.path.join(repo_path, "disks", disk), "rb") as f:
        assert objects.decode_disk(disk, f.read())["DiskId"] == disk
