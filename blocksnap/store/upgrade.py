"""``blocksnap upgrade``: format version 1 to 2 (docs/FORMAT.md, "Version history" and "Upgrading").

Format 1 kept every record only in the catalog (LMDB named databases, values without checksums) and its
packs had no trailers. The upgrade, under the exclusive repository lock, makes the store complete and
then rebuilds the catalog from it with the same code as ``repair``:

1. gives back the ranges format 1's ``reclaim`` still listed, and removes packs no entry names;
2. appends to every format-1 pack the trailer that lists its indexed records (the records themselves
   are not touched; an interrupted append is cut back and written again);
3. writes every map segment of every accomplished snapshot, checked against its id, into a new pack;
4. writes a disk object per disk and a snapshot object per accomplished snapshot (its ClientToken's
   parameter hash included);
5. builds the version-2 catalog beside the old one, carrying the failed records over, swaps it in and
   writes the version-2 config, in that order; ``catalog.v1-*`` keeps the old catalog until the config
   is written, so a crash at any point leaves a repository that the next ``blocksnap upgrade`` finishes.

Reading format 1 is kept to this module: the rest of blocksnap reads version 2 only.
"""
import json
import os
import shutil
import struct

import lmdb

from .. import _native, errors
from . import config as configs
from . import objects, rebuild, refs
from . import catalog
from .catalog import ZERO_ID
from .config import segments_of_size
from .layout import V1_DB_NAMES
from .packs import KIND_CHUNK, RECORD, Record, build_trailer, read_trailer

V1_CHUNK = struct.Struct(">8sQIIB3xI")
V1_PACK = struct.Struct(">IQ")


class V1Catalog:
    """Read-only access to a format-1 catalog (named LMDB databases, values unchecked)."""

    def __init__(self, path):
        catalog.check_data_file(path)  # a cut-short file must not be mapped (SIGBUS)
        try:
            self.env = lmdb.open(path, readonly=True, lock=False, max_dbs=16, subdir=True, create=False)
            self.db = {n.decode(): self.env.open_db(n, create=False) for n in V1_DB_NAMES}
        except lmdb.Error as exc:
            raise errors.CatalogDamaged(f"(the format-1 catalog {path} cannot be read: {exc})") from exc

    def items(self, name):
        with self.env.begin() as txn:
            return [(bytes(k), bytes(v)) for k, v in txn.cursor(db=self.db[name])]

    def json_items(self, name):
        out = {}
        for k, v in self.items(name):
            try:
                out[k.decode("ascii")] = json.loads(v)
            except (UnicodeDecodeError, ValueError) as exc:
                raise errors.CatalogDamaged(f"(format-1 {name} record {k!r} is not JSON: {exc})") from None
        return out

    def close(self):
        self.env.close()


def upgrade(repo, on_wait=None):
    """Bring ``repo`` (opened with ``need_catalog=False``) to the current format version; returns a report."""
    if repo.version == configs.FORMAT_VERSION:
        return {"From": repo.version, "To": repo.version, "Snapshots": 0, "Disks": 0, "Packs": 0}
    repo.require_writable()
    repo.epochs.ensure()
    lock = repo.lock_exclusive(on_wait)
    try:
        return _upgrade_v1(repo)
    except OSError as exc:
        raise errors.translate(exc, "upgrade") from exc
    finally:
        lock.release()


def _upgrade_v1(repo):
    path = repo.path
    live = os.path.join(path, "catalog")
    # An interrupted earlier upgrade moved the format-1 catalog aside: put it back and start over.
    for name in sorted(os.listdir(path)):
        if name.startswith("catalog.v1-"):
            if os.path.exists(live):
                shutil.rmtree(live)
            os.rename(os.path.join(path, name), live)
            break
    rebuild.recover_swap(path)
    for kind in ("snapshots", "disks"):
        os.makedirs(os.path.join(path, kind), exist_ok=True)
        repo.backend.clear_temporaries(kind)
    v1 = V1Catalog(live)
    try:
        disks = v1.json_items("disks")
        snaps = v1.json_items("snapshots")
        tokens = v1.json_items("tokens")
        maps = dict(v1.items("snapmaps"))
        segments = {k: v[4:] for k, v in v1.items("segments")}
        chunks = [(k, V1_CHUNK.unpack(v)) for k, v in v1.items("chunks")]
        packs = {k: V1_PACK.unpack(v) for k, v in v1.items("packs")}
        reclaim = [(k, v) for k, v in v1.items("reclaim")]
        for k, v in reclaim:
            struct.unpack(">8sQ", k)
            struct.unpack(">Q", v)
        seq = dict(v1.items("counters")).get(b"seq")
        seq = struct.unpack(">Q", seq)[0] if seq else 0
        for sid, rec in snaps.items():
            if rec.get("Status") == "accomplished":
                size, cs = rec.get("SourceDiskSize"), rec.get("ChunkSize")
                want = segments_of_size(size, cs) if isinstance(size, int) and isinstance(cs, int) and cs > 0 else -1
                if len(maps.get(sid.encode(), b"")) != 16 * want:
                    raise errors.CatalogDamaged(f"(format-1 snapshot {sid} has no chunk map of its size: the "
                                                "upgrade stops; nothing was changed)")
    except struct.error as exc:
        raise errors.CatalogDamaged(f"(a format-1 catalog value has the wrong size: {exc}; the upgrade stops, "
                                    "nothing was changed)") from None
    finally:
        v1.close()
    by_pack = {}
    for cid, (pack_id, offset, stored, raw, codec, _) in chunks:
        by_pack.setdefault(pack_id, []).append(Record(cid, offset, stored, raw, codec, KIND_CHUNK))

    # Everything is read and checked before anything is changed: a damaged format-1 catalog stops here.
    accomplished = {sid: _as_v2(rec, tokens, f"format-1 snapshot {sid}") for sid, rec in snaps.items()
                    if rec.get("Status") == "accomplished"}
    failed = [_as_v2(rec, tokens, f"format-1 snapshot {sid}") for sid, rec in snaps.items()
              if rec.get("Status") != "accomplished"]
    disk_objs = {}
    for did, rec in disks.items():
        try:
            disk_objs[did] = obj = {k: rec[k] for k in catalog.DISK_SCHEMA}
            catalog.check_record(obj, catalog.DISK_SCHEMA, f"format-1 disk {did}")
        except (KeyError, TypeError, errors.CatalogDamaged) as exc:
            raise errors.CatalogDamaged(f"(format-1 disk record {did} is malformed ({exc}): the upgrade stops; "
                                        "nothing was changed)") from None
    needed = {}
    for sid, rec in accomplished.items():
        for s in refs.split_ids(maps.get(sid.encode(), b"")):
            if s != ZERO_ID and s not in needed:
                ids = segments.get(s)
                if ids is None or _native.hash128(ids) != s:
                    raise errors.CatalogDamaged(f"(format-1 map segment {s.hex()} of {sid} is missing or damaged: "
                                                "the upgrade stops; nothing was changed)")
                needed[s] = ids
    present = set(repo.backend.list_packs())
    # 1. format 1's unfinished reclaim work, and packs nothing names
    for key, val in reclaim:
        pid, off = key[:8], struct.unpack(">Q", key[8:])[0]
        if pid in by_pack and pid in present:
            repo.packs.punch(pid, off, struct.unpack(">Q", val)[0])
    for pack_id in repo.backend.list_packs():
        if pack_id not in by_pack:
            repo.packs.remove(pack_id)
    # 2. trailers for the format-1 packs (a pack the catalog names but that is gone stays gone: verify names
    # the snapshots that lost it)
    for pack_id, records in by_pack.items():
        if pack_id in present:
            _give_trailer(repo, pack_id, sorted(records, key=lambda r: r.offset), packs.get(pack_id))
    # 3. the map segments of accomplished snapshots, checked above, into a new pack
    writer = repo.packs.writer()
    try:
        for s, ids in needed.items():
            if writer.add_segment(s, ids)[1]:
                writer.seal()
        writer.seal()
    finally:
        writer.close()
    # 4. the objects
    stored = {}
    for sid, rec in accomplished.items():
        seg_ids = maps.get(sid.encode(), b"")
        repo.backend.put_object("snapshots", sid, objects.encode_snapshot(rec, seg_ids))
        stored[sid] = (rec, seg_ids)
    for did, obj in disk_objs.items():
        repo.backend.put_object("disks", did, objects.encode_disk(obj))
    # 5. the version-2 catalog, then the config
    report = {"Lost": [], "Problems": [], "ObjectsRewritten": 0, "SegmentsRewritten": 0}
    build = rebuild.build_catalog(repo, report, stored, disk_objs, failed, None, 0, seq)
    if report["Lost"]:  # before the format-1 catalog is touched: the repository stays version 1
        shutil.rmtree(build, ignore_errors=True)
        raise errors.InternalError(f"(the upgrade could not rebuild {report['Lost']}; the repository is still "
                                   "format 1)")
    aside = os.path.join(path, f"catalog.v1-{os.urandom(4).hex()}")
    os.rename(live, aside)
    os.rename(build, live)
    from .backend import fsync_dir

    fsync_dir(path)
    configs.write(os.path.join(path, "config"), dict(repo.config, Version=configs.FORMAT_VERSION))
    shutil.rmtree(aside, ignore_errors=True)
    return {"From": 1, "To": configs.FORMAT_VERSION, "Snapshots": len(stored), "Disks": len(disk_objs),
            "Packs": len(by_pack), "FailedRecords": report.get("FailedRecords", 0)}


def _as_v2(rec, tokens, what):
    """A format-1 snapshot record as format 2 stores it (its ClientToken's ParamsHash, which format 1 kept
    beside it, carried in), checked."""
    if not isinstance(rec, dict):
        raise errors.CatalogDamaged(f"({what} is not a record: the upgrade stops; nothing was changed)")
    rec = dict(rec)
    tok = rec.get("ClientToken")
    if tok and isinstance(tokens.get(tok), dict) and tokens[tok].get("SnapshotId") == rec.get("SnapshotId"):
        rec["ParamsHash"] = tokens[tok].get("ParamsHash")
    try:
        catalog.check_snapshot_record(rec, what)
    except errors.CatalogDamaged as exc:
        raise errors.CatalogDamaged(f"{exc.detail or '(' + what + ')'} (the upgrade stops; nothing was changed)") \
            from None
    return rec


def _give_trailer(repo, pack_id, records, v1_entry):
    """Append the trailer listing ``records`` to a format-1 pack (again, if an earlier try was cut short)."""
    try:
        got = read_trailer(repo.backend, pack_id)
        if [(r.id, r.offset) for r in got] == [(r.id, r.offset) for r in records]:
            return  # done by an earlier, interrupted upgrade
    except (errors.RepositoryDamaged, OSError):
        pass
    end = max(r.offset + RECORD.size + r.stored_len for r in records)
    if v1_entry is not None:
        end = max(end, v1_entry[1])
    base = -(-end // 4096) * 4096  # format 1 padded every pack to whole 4 KiB blocks
    size = repo.backend.pack_size(pack_id)
    if size < base:
        raise errors.StoreDamaged(f"(format-1 pack {pack_id.hex()} is {size} bytes, its records end at {end})")
    if size > base:
        # Only a trailer an interrupted upgrade began may follow the records; anything else is not ours to cut.
        head = repo.backend.read_pack(pack_id, base, 4)
        if head not in (b"BSPX", bytes(4)):
            raise errors.StoreDamaged(f"(format-1 pack {pack_id.hex()} holds unknown bytes after its records)")
        repo.backend.truncate_pack(pack_id, base)
    repo.backend.append_pack(pack_id, build_trailer(pack_id, base, records))
