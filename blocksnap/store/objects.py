"""Store objects: one per disk (``disks/<DiskId>``), one per accomplished snapshot (``snapshots/<SnapshotId>``)
and one per resource group other than the default one (``groups/<ResourceGroupId>``).

With the packs they are the store, from which the catalog can be rebuilt (docs/FORMAT.md, "Objects").
A snapshot object is the top of a Merkle tree: it holds the snapshot's record and the ids of its map
segments, each segment is content-addressed (its id is the XXH3-128 of its chunk ids) and so is each
chunk, so checking the object's own checksum at the top proves everything below it.

Layout (big-endian)::

    0   6  magic "BSOBJ\\0"
    6   1  format version (2)
    7   1  kind: "S" snapshot, "D" disk, "R" resource group
    8   4  length J of the JSON record
    12  4  number S of segment ids (0 for a disk or a group)
    16  J  the record: UTF-8 JSON, compact, keys sorted
    ..  16*S  segment ids
    ..  16 XXH3-128 of everything before it

This module owns that encoding.
"""
import struct

from .. import _native, errors
from . import catalog
from .config import segments_of_size

MAGIC = b"BSOBJ\x00"
VERSION = 2
HEAD = struct.Struct(">6sBcII")
KIND_SNAPSHOT = b"S"
KIND_DISK = b"D"
KIND_GROUP = b"R"
_KIND_NAMES = {KIND_SNAPSHOT: "snapshot", KIND_DISK: "disk", KIND_GROUP: "resource group"}
MAX_OBJECT = 1 << 30


def _encode(kind, rec, seg_ids=b""):
    body = catalog.dump_json(rec)
    data = HEAD.pack(MAGIC, VERSION, kind, len(body), len(seg_ids) // 16) + body + bytes(seg_ids)
    return data + _native.hash128(data)


def _decode(kind, name, data):
    what = f"{_KIND_NAMES[kind]} object {name}"
    if data is None:
        return None
    if len(data) < HEAD.size + 16 or len(data) > MAX_OBJECT:
        raise errors.StoreDamaged(f"({what} is {len(data)} bytes long)")
    if _native.hash128(data[:-16]) != data[-16:]:
        raise errors.StoreDamaged(f"({what} fails its checksum)")
    magic, version, got_kind, jlen, nids = HEAD.unpack_from(data)
    if magic != MAGIC or version != VERSION or got_kind != kind or HEAD.size + jlen + 16 * nids + 16 != len(data):
        raise errors.StoreDamaged(f"({what} is not a version-{VERSION} {kind.decode()} object)")
    try:
        rec = catalog.load_json(data[HEAD.size:HEAD.size + jlen], what)
    except errors.CatalogDamaged as exc:
        raise errors.StoreDamaged(exc.detail) from None
    return rec, data[HEAD.size + jlen:-16]


def encode_snapshot(rec, seg_ids):
    """The object of an accomplished snapshot: its record and the segment ids of its map."""
    return _encode(KIND_SNAPSHOT, rec, seg_ids)


def decode_snapshot(name, data):
    """``(record, segment ids)`` of a snapshot object, checked; None for None.

    Raises:
        StoreDamaged: the object fails its checksum, is malformed, or names another snapshot.
    """
    out = _decode(KIND_SNAPSHOT, name, data)
    if out is None:
        return None
    rec, seg_ids = out
    try:
        catalog.check_snapshot_record(rec, f"snapshot object {name}")
    except errors.CatalogDamaged as exc:
        raise errors.StoreDamaged(exc.detail) from None
    if rec["SnapshotId"] != name or rec["Status"] != "accomplished":
        raise errors.StoreDamaged(f"(snapshot object {name} holds the record of {rec['SnapshotId']!r}, "
                                  f"{rec['Status']})")
    segments = segments_of_size(rec["SourceDiskSize"], rec["ChunkSize"])
    if len(seg_ids) != 16 * segments:
        raise errors.StoreDamaged(f"(snapshot object {name} holds {len(seg_ids) // 16} segment ids, its size "
                                  f"needs {segments})")
    return rec, seg_ids


def encode_disk(rec):
    return _encode(KIND_DISK, rec)


def decode_disk(name, data):
    """The record of a disk object, checked; None for None. Raises StoreDamaged."""
    out = _decode(KIND_DISK, name, data)
    if out is None:
        return None
    rec = out[0]
    try:
        catalog.check_disk_record(rec, f"disk object {name}")
    except errors.CatalogDamaged as exc:
        raise errors.StoreDamaged(exc.detail) from None
    if rec["DiskId"] != name:
        raise errors.StoreDamaged(f"(disk object {name} holds the record of {rec['DiskId']!r})")
    return rec


def encode_group(rec):
    return _encode(KIND_GROUP, rec)


def decode_group(name, data):
    """The record of a resource group object, checked; None for None. Raises StoreDamaged."""
    out = _decode(KIND_GROUP, name, data)
    if out is None:
        return None
    rec = out[0]
    try:
        catalog.check_group_record(rec, f"resource group object {name}")
    except errors.CatalogDamaged as exc:
        raise errors.StoreDamaged(exc.detail) from None
    if rec["ResourceGroupId"] != name:
        raise errors.StoreDamaged(f"(resource group object {name} holds the record of {rec['ResourceGroupId']!r})")
    return rec
