"""``blocksnap repair``: rebuild the catalog from the store (docs/FORMAT.md, "Rebuilding the catalog").

The store holds everything the catalog indexes: a disk object per disk, a snapshot object per
accomplished snapshot (its record and its map's segment ids), and packs whose trailers list their
records (chunks and map segments). The rebuild:

1. takes the exclusive repository lock (no create runs, no gc);
2. salvages from the old catalog, if it can still be read, what the store lacks: snapshot and disk
   objects that are missing or damaged in the store are written anew from the catalog's checked copies,
   map segments whose records are missing or damaged are written into a new pack, and ``failed``
   records (which live only in the catalog) are carried over;
3. builds a new catalog beside the old one: every record that a readable trailer lists is indexed (a
   chunk stored twice is indexed where its record checks out), the segments of every snapshot object
   are read from their records and checked against their ids, and every count is derived from them;
4. swaps the new catalog in (two renames; a crash between them leaves no catalog, and running repair
   again finishes the work).

A snapshot that cannot be rebuilt (a map segment lost from both the store and the old catalog) is
reported and left out; its object stays in the store for a later look.
"""
import os
import shutil

from .. import _native, errors
from . import catalog as catalogs
from . import objects, packs, refs
from .catalog import ZERO_ID, ChunkEntry, PackEntry, SegmentEntry, TokenEntry
from .layout import crashpoint
from .packs import CODEC_RAW, KIND_CHUNK, KIND_SEGMENT, RECORD, Record, read_trailer



def _salvage(repo, report, bad_packs=(), groups=None):
    """What the old catalog still holds, checked: ``(snapshots, failed, disks, segments, epoch, records)``;
    ``records`` lists the chunk and segment records it places in ``bad_packs`` (packs without a readable
    trailer): ``[(pack id, Record)]``. Its resource group records go into ``groups``."""
    path = os.path.join(repo.path, "catalog")
    groups = {} if groups is None else groups
    snaps, failed, disks, segs, epoch, records = {}, [], {}, {}, 0, []
    if os.path.exists(os.path.join(path, "data.mdb")) and not catalogs.probe(path):
        report["OldCatalog"] = "unreadable: LMDB stopped reading it on a damaged page"
        return snaps, failed, disks, segs, epoch, records
    try:
        old = catalogs.Catalog(path, None, writable=False)
    except errors.BlocksnapError as exc:
        report["OldCatalog"] = f"unusable: {exc}"
        return snaps, failed, disks, segs, epoch, records
    try:
        with old.read() as txn:
            try:
                epoch = txn.epoch()
            except errors.BlocksnapError:
                pass
            for sid in _safe(txn.snapshot_ids, []):
                try:
                    rec = txn.snapshot(sid)
                    if rec.get("Deleting"):  # a delete a crash interrupted: repair finishes it
                        report["DeletesFinished"].append(sid)
                        continue
                    if rec["Status"] == "accomplished":
                        seg_ids = refs.map_of(txn, rec)
                        snaps[sid] = (rec, seg_ids)
                        for s in refs.split_ids(seg_ids):
                            if s != ZERO_ID and s not in segs:
                                try:
                                    seg = txn.segment(s)
                                except errors.BlocksnapError:
                                    seg = None
                                if seg is not None:
                                    segs[s] = seg.ids
                    else:
                        failed.append(rec)
                except errors.BlocksnapError:
                    continue
            for did in _safe(lambda: [k.decode("ascii", "replace") for k in txn.keys("disks")], []):
                try:
                    rec = txn.disk(did)
                except errors.BlocksnapError:
                    continue
                if rec is not None:
                    disks[did] = rec
            for gid in _safe(lambda: [k.decode("ascii", "replace") for k in txn.keys("groups")], []):
                try:
                    rec = txn.group(gid)
                except errors.BlocksnapError:
                    continue
                if rec is not None:
                    groups[gid] = rec
            if bad_packs:
                for cid, e in txn.chunk_items(lambda c, exc: None):
                    if e.pack_id in bad_packs:
                        records.append((e.pack_id, Record(cid, e.offset, e.stored_len, e.raw_len, e.codec,
                                                          KIND_CHUNK)))
                for sid, seg in txn.segment_items(lambda s, exc: None):
                    if seg.pack_id in bad_packs:
                        records.append((seg.pack_id, Record(sid, seg.offset, len(seg.ids), len(seg.ids),
                                                            CODEC_RAW, KIND_SEGMENT)))
        report["OldCatalog"] = "read"
    except errors.BlocksnapError as exc:
        report["OldCatalog"] = f"partly read: {exc}"
    finally:
        old.close()
    return snaps, failed, disks, segs, epoch, records


def _rescue(repo, stranded, report):
    """Copy the records the old catalog places in packs without a readable trailer into a new pack (each
    checked as it is read), so that the rebuilt catalog can index them; the old pack is then an orphan
    that gc removes. Returns how many were copied."""
    if not stranded:
        return 0
    from ..restore import _restorer

    restorer = _restorer(repo.chunk_size)
    writer = repo.packs.writer()
    copied = 0
    try:
        for pack_id, r in sorted(stranded, key=lambda t: (t[0], t[1].offset)):
            try:
                fd = repo.packs.fd(pack_id)
                restorer.restore([(fd, r.offset, r.stored_len, r.raw_len, r.codec, r.kind, r.id, 0)], -1, 0)
                data = os.pread(fd, r.stored_len, r.offset + RECORD.size)
            except (_native.RestoreDamage, OSError) as exc:
                report["Problems"].append({"What": f"record {r.id.hex()} in pack {pack_id.hex()}",
                                           "Problem": f"not rescued: {exc}"})
                continue
            if writer.add_many(data, [(r.id, 0, r.stored_len, r.raw_len, r.codec, r.kind)])[1]:
                writer.seal()
            copied += 1
        writer.seal()
    finally:
        writer.close()
        repo.packs.close()
    return copied


def _walk_records(repo, pack_id):
    """``[(pack id, Record)]`` of the records of a pack found by their headers (its trailer is damaged): from
    the header on, record after record; past anything that is not a record header (a punched dead record,
    damage) the next ``BSCK`` is looked for. Only what the caller then checks with the C core is kept, so a
    false header costs nothing."""
    try:
        data = repo.backend.read_pack(pack_id, 0, repo.backend.pack_size(pack_id))
    except OSError:
        return []
    limit = max(repo.chunk_size, 4096)
    out, pos = [], packs.PACK_HEADER.size
    while 0 <= pos <= len(data) - RECORD.size:
        magic, codec, kind, raw_len, stored_len, rid = RECORD.unpack_from(data, pos)
        if magic == packs.RECORD_MAGIC and codec in (CODEC_RAW, 1) and kind in (KIND_CHUNK, KIND_SEGMENT) \
                and 0 < raw_len <= limit and 0 < stored_len <= limit + 64 and pos + RECORD.size + stored_len <= len(data):
            out.append((pack_id, Record(rid, pos, stored_len, raw_len, codec, kind)))
            pos += RECORD.size + stored_len
        else:
            pos = data.find(packs.RECORD_MAGIC, pos + 1)
    return out


def recover_swap(path):
    """Clear what an interrupted rebuild left: a killed swap (no ``catalog``, the old one beside it) gets
    the old one back, so that it can still be salvaged; half-built catalogs go."""
    live = os.path.join(path, "catalog")
    names = sorted(os.listdir(path))
    if not os.path.exists(live):
        for name in names:
            if name.startswith("catalog.old-"):
                os.rename(os.path.join(path, name), live)
                break
    for name in names:
        if name.startswith(("catalog.rebuild-", "catalog.old-")) and os.path.exists(os.path.join(path, name)):
            shutil.rmtree(os.path.join(path, name), ignore_errors=True)


def clear_leftovers(path):
    """Remove what an interrupted repair or upgrade left beside a working version-2 catalog (gc)."""
    if not os.path.exists(os.path.join(path, "catalog", "data.mdb")):
        return
    for name in os.listdir(path):
        if name.startswith(("catalog.rebuild-", "catalog.old-", "catalog.v1-")):
            shutil.rmtree(os.path.join(path, name), ignore_errors=True)


def _safe(fn, default):
    try:
        return fn()
    except errors.BlocksnapError:
        return default


def repair(repo, progress=None, on_wait=None):
    """Rebuild the catalog from the store; returns a report.

    Returns:
        dict: ``Snapshots`` (rebuilt), ``Disks``, ``Chunks``, ``Segments``, ``FailedRecords`` (carried over),
        ``ObjectsRewritten``, ``SegmentsRewritten``, ``Lost``: ``[{"SnapshotId", "Problem"}]`` that could not
        be rebuilt, ``Problems``.
    Raises:
        RepositoryReadOnly, RepositoryError.
    """
    repo.require_writable()
    lock = repo.lock_exclusive(on_wait)
    try:
        return _repair(repo, progress)
    except OSError as exc:
        raise errors.translate(exc, "repair") from exc
    finally:
        lock.release()


def _repair(repo, progress):
    report = {"ObjectsRewritten": 0, "SegmentsRewritten": 0, "Lost": [], "Problems": [], "DeletesFinished": []}
    recover_swap(repo.path)
    for kind in ("snapshots", "disks", "groups"):
        repo.backend.clear_temporaries(kind)
    repo.epochs.ensure()
    if repo.catalog is not None:
        repo.catalog.close()
        repo.catalog = None
    backend = repo.backend
    bad_packs = set()
    for pack_id in backend.list_packs():
        try:
            read_trailer(backend, pack_id)
        except (errors.RepositoryDamaged, OSError):
            bad_packs.add(pack_id)
    old_groups = {}
    old_snaps, old_failed, old_disks, old_segs, old_epoch, stranded = _salvage(repo, report, bad_packs, old_groups)
    report["RecordsRewritten"] = _rescue(repo, stranded, report)
    # Packs with a damaged trailer that the old catalog could not speak for: walk their records by headers.
    for pack_id in sorted(bad_packs - {p for p, _ in stranded}):
        report["RecordsRewritten"] += _rescue(repo, _walk_records(repo, pack_id), report)

    # --- the store's objects, mended from the old catalog where it has a good copy ---------------------
    for sid in report["DeletesFinished"]:
        backend.delete_object("snapshots", sid)  # as the interrupted delete would have (its mark came first)
    stored = {}
    for sid in backend.list_objects("snapshots"):
        try:
            got = objects.decode_snapshot(sid, backend.get_object("snapshots", sid))
        except errors.StoreDamaged as exc:
            got = None
            if sid not in old_snaps:
                report["Lost"].append({"SnapshotId": sid, "Problem": f"its object is damaged ({exc.detail}) and "
                                                                       "the catalog has no copy"})
        if got is not None:
            stored[sid] = got
    for sid, (rec, seg_ids) in old_snaps.items():
        if stored.get(sid) != (rec, seg_ids):
            backend.put_object("snapshots", sid, objects.encode_snapshot(rec, seg_ids))
            stored[sid] = (rec, seg_ids)
            report["ObjectsRewritten"] += 1
    disks = {}
    for did in backend.list_objects("disks"):
        try:
            rec = objects.decode_disk(did, backend.get_object("disks", did))
        except errors.StoreDamaged:
            rec = None
        if rec is not None:
            disks[did] = rec
    for did, rec in old_disks.items():
        if did not in disks:
            obj = catalogs.disk_object_fields(rec)
            backend.put_object("disks", did, objects.encode_disk(obj))
            disks[did] = obj
            report["ObjectsRewritten"] += 1

    groups = {}
    for gid in backend.list_objects("groups"):
        try:
            rec = objects.decode_group(gid, backend.get_object("groups", gid))
        except errors.StoreDamaged:
            rec = None
        if rec is not None:
            groups[gid] = rec
    for gid, rec in old_groups.items():
        if gid not in groups:
            backend.put_object("groups", gid, objects.encode_group(rec))
            groups[gid] = rec
            report["ObjectsRewritten"] += 1

    build = build_catalog(repo, report, stored, disks, old_failed, old_segs, old_epoch, recorded=set(old_disks),
                          groups=groups)
    swap_in(repo, build)
    return report


def build_catalog(repo, report, stored, disks, old_failed=(), old_segs=None, old_epoch=0, min_seq=0,
                  recorded=(), groups=None):
    """Build a new catalog beside the live one from the store's objects and packs; returns its directory.

    Args:
        stored: ``{SnapshotId: (record, segment ids)}`` of the snapshot objects to index.
        disks: ``{DiskId: record}`` of the disk objects.
        old_failed: failed (or dead progressing) records to carry over.
        old_segs: ``{segment id: ids}`` good copies to write anew where the store lost a segment's record.
        old_epoch: the old catalog's reader epoch; min_seq: the lowest snapshot sequence to continue from.
        recorded: ids of the disks the old catalog recorded (preferred where two objects share a path).
        groups: ``{ResourceGroupId: record}`` of the resource group objects.
    """
    build = os.path.join(repo.path, f"catalog.rebuild-{os.urandom(4).hex()}")
    catalogs.create(build, repo.repository_id)
    new = catalogs.Catalog(build, repo.repository_id)
    try:
        seg_locs, dups, packs = _index_packs(repo, new, report)
        needed = set()
        for rec, seg_ids in stored.values():
            needed.update(s for s in refs.split_ids(seg_ids) if s != ZERO_ID)
        segments = _read_segments(repo, needed, seg_locs, old_segs or {}, report, new)
        _settle_duplicates(repo, new, segments, dups)
        _records(repo, new, stored, disks, segments, old_failed, old_epoch, report, min_seq, recorded)
        _drop_unnamed_chunks(new, report)
        with new.write() as txn:
            for rec in (groups or {}).values():
                txn.put_group(rec)
        report["Packs"] = packs
        report["ResourceGroups"] = len(groups or {})
        new.env.sync(True)
    except BaseException:
        new.close()
        catalogs.close_env(build)
        shutil.rmtree(build, ignore_errors=True)
        raise
    new.close()
    catalogs.close_env(build)
    return build


def swap_in(repo, build):
    """Put the catalog built at ``build`` in place of the live one (two renames), then remove the old one."""
    from .backend import fsync_dir

    crashpoint("repair-before-swap")
    live = os.path.join(repo.path, "catalog")
    old = os.path.join(repo.path, f"catalog.old-{os.urandom(4).hex()}")
    catalogs.close_env(live)
    if os.path.exists(live):
        os.rename(live, old)
    crashpoint("repair-mid-swap")
    os.rename(build, live)
    fsync_dir(repo.path)
    shutil.rmtree(old, ignore_errors=True)
    repo.catalog = catalogs.Catalog(live, repo.repository_id)


def _index_packs(repo, new, report):
    """Index every record the packs' trailers list: chunks at refcount 0 (counted later), segments'
    locations. Returns ``(segment locations, duplicate chunk locations, packs read)``."""
    seg_locs = {}  # segment id -> [(pack id, Record)]
    dups = {}  # chunk id -> [(pack id, Record)] beyond the indexed one
    packs = 0
    pack_list = sorted(repo.backend.list_packs())
    batch = []

    def flush():
        with new.write() as txn:
            for pack_id, size, records in batch:
                txn.put_pack(pack_id, PackEntry(size, len(records)))
                for r in records:
                    if r.kind == KIND_CHUNK:
                        entry = ChunkEntry(pack_id, r.offset, r.stored_len, r.raw_len, r.codec, 0)
                        if not txn.put_chunk(r.id, entry, overwrite=False):
                            dups.setdefault(r.id, []).append((pack_id, r))
        batch.clear()

    for pack_id in pack_list:
        try:
            records = read_trailer(repo.backend, pack_id)
            size = repo.backend.pack_size(pack_id)
        except (errors.RepositoryDamaged, OSError) as exc:
            report["Problems"].append({"What": f"pack {pack_id.hex()}", "Problem": f"not indexed: {exc}"})
            continue
        packs += 1
        for r in records:
            if r.kind == KIND_SEGMENT:
                seg_locs.setdefault(r.id, []).append((pack_id, r))
        batch.append((pack_id, size, records))
        if sum(len(b[2]) for b in batch) >= 65536:
            flush()
    flush()
    return seg_locs, dups, packs


def _read_segments(repo, needed, seg_locs, old_segs, report, new):
    """``{segment id: (pack id, offset, ids)}`` for the needed segments: read from their records and
    checked against their ids; written anew from the old catalog where the store lost them."""
    out = {}
    missing = []
    for sid in sorted(needed):
        for pack_id, r in seg_locs.get(sid, []):
            if r.codec != CODEC_RAW or r.stored_len != r.raw_len or r.raw_len % 16 or not r.raw_len:
                continue
            try:
                data = repo.backend.read_pack(pack_id, r.offset, RECORD.size + r.stored_len)
            except OSError:
                continue
            head = RECORD.unpack_from(data) if len(data) >= RECORD.size else None
            ids = data[RECORD.size:]
            if head and head[0] == b"BSCK" and head[2] == KIND_SEGMENT and head[5] == sid \
                    and len(ids) == r.stored_len and _native.hash128(ids) == sid:
                out[sid] = (pack_id, r.offset, ids)
                break
        else:
            missing.append(sid)
    rescued = [s for s in missing if s in old_segs]
    if rescued:
        writer = repo.packs.writer()
        try:
            for sid in rescued:
                offset, full = writer.add_segment(sid, old_segs[sid])
                out[sid] = (writer.current, offset, old_segs[sid])
                if full:
                    _index_sealed(new, writer.seal())
            _index_sealed(new, writer.seal())
        finally:
            writer.close()
        report["SegmentsRewritten"] += len(rescued)
    return out


def _index_sealed(new, sealed):
    """Index a pack that ``PackWriter.seal`` made durable (None: there was none) in the new catalog."""
    if sealed is not None:
        with new.write() as txn:
            txn.put_pack(sealed.pack_id, PackEntry(sealed.size, len(sealed.records)))


def _settle_duplicates(repo, new, segments, dups):
    """A chunk listed by several trailers (stored again after it was reclaimed, or by two racing creates)
    is indexed where its record checks out."""
    if not dups:
        return
    from ..restore import _restorer

    needed = set()
    for _, _, ids in segments.values():
        for j in _native.nonzero_ids(ids):
            needed.add(ids[16 * j:16 * j + 16])
    restorer = _restorer(repo.chunk_size)
    with new.write() as txn:
        for cid, others in dups.items():
            if cid not in needed:
                continue
            entry = txn.chunk(cid)
            candidates = [(entry.pack_id, entry.offset, entry.stored_len, entry.raw_len, entry.codec)] + [
                (pid, r.offset, r.stored_len, r.raw_len, r.codec) for pid, r in others]
            for pid, off, stored, raw, codec in candidates:
                try:
                    fd = repo.packs.fd(pid)
                    restorer.restore([(fd, off, stored, raw, codec, KIND_CHUNK, cid, 0)], -1, 0)
                except (_native.RestoreDamage, OSError):
                    continue
                txn.put_chunk(cid, ChunkEntry(pid, off, stored, raw, codec, 0))
                break
    repo.packs.close()


def _drop_unnamed_chunks(new, report):
    """Forget the chunks no indexed segment names. A trailer keeps listing a record after gc punched it (or
    after a create punched its duplicate), so such an entry may point at zeros; a create would deduplicate
    against it and commit a snapshot that cannot be restored. gc finds these records through the trailers."""
    with new.write() as txn:
        dead = [cid for cid, e in txn.chunks() if e.refcount == 0]
        for cid in dead:
            txn.delete_chunk(cid)
        report["Chunks"] = txn.count("chunks")


def _one_disk_per_path(disks, named, failed_named, recorded):
    """The disks to record: of several objects for one path (a 'disk add' killed after its object and before
    its catalog record, then run again, or two racing adds), the one accomplished snapshots name, else one
    failed records name, else the one the old catalog recorded, else the newest. The others stay in the
    store unrecorded, for gc to remove once the new catalog is in place (nothing is deleted before the swap)."""
    def rank(d):
        return (d in named, d in failed_named, d in recorded, disks[d]["CreationTime"])

    best = {}
    for did in sorted(disks, key=rank):
        if disks[did]["Path"]:
            best[disks[did]["Path"]] = did
    return {d: r for d, r in disks.items() if not r["Path"] or best[r["Path"]] == d or d in named}


def _records(repo, new, stored, disks, segments, old_failed, old_epoch, report, min_seq=0, recorded=()):
    """Segments, counts, records, maps, tokens and disks of the new catalog."""
    seg_uses = {}
    good = {}
    for sid, (rec, seg_ids) in stored.items():
        lost = [s for s in refs.split_ids(seg_ids) if s != ZERO_ID and s not in segments]
        if lost:
            report["Lost"].append({"SnapshotId": sid, "Problem": f"{len(lost)} of its map segments are lost "
                                                                 f"(first {lost[0].hex()})"})
            continue
        good[sid] = (rec, seg_ids)
        for s in refs.split_ids(seg_ids):
            if s != ZERO_ID:
                seg_uses[s] = seg_uses.get(s, 0) + 1
    missing = set()
    with new.write() as txn:
        for s, uses in seg_uses.items():
            pack_id, offset, ids = segments[s]
            txn.put_segment(s, SegmentEntry(pack_id, offset, ids))
            txn.set_segment_refs(s, uses)
            for j in _native.nonzero_ids(ids):
                cid = ids[16 * j:16 * j + 16]
                if txn.chunk(cid) is None:
                    missing.add(cid)
                    continue
                txn.add_chunk_ref(cid, +1)
    report["Incomplete"] = []
    if missing:
        filt = _native.IdFilter(missing)
        for sid, (rec, seg_ids) in sorted(good.items()):
            filt.clear()
            for s in refs.split_ids(seg_ids):
                if s != ZERO_ID:
                    filt.feed(segments[s][2])
            if filt.any_found():
                report["Incomplete"].append({"SnapshotId": sid, "Problem": f"{len(filt.found())} of its chunks are "
                                             "stored in no pack: restores refuse; 'blocksnap verify' names the "
                                             "offsets"})
    newest = {}
    max_seq = min_seq
    with new.write() as txn:
        for sid, (rec, seg_ids) in sorted(good.items(), key=lambda kv: kv[1][0]["Seq"]):
            txn.put_snapshot(rec)
            txn.put_snapshot_map(sid, seg_ids)
            txn.put_disk_snap(rec["SourceDiskId"], rec["Seq"], sid)
            if rec.get("ClientToken") and rec.get("ParamsHash"):
                txn.put_token(rec["ClientToken"], TokenEntry(rec["ParamsHash"], sid))
            newest[rec["SourceDiskId"]] = rec
            max_seq = max(max_seq, rec["Seq"])
        disks = _one_disk_per_path(disks, set(newest), {r["SourceDiskId"] for r in old_failed}, set(recorded))
        carried = 0
        for rec in old_failed:
            if rec["SnapshotId"] in good or rec["SourceDiskId"] not in disks:
                continue
            if rec["Status"] == "progressing":
                from ..repository import died

                rec = died(rec)
            txn.put_snapshot(rec)
            txn.put_disk_snap(rec["SourceDiskId"], rec["Seq"], rec["SnapshotId"])
            if rec.get("ClientToken") and rec.get("ParamsHash") and txn.token(rec["ClientToken"]) is None:
                txn.put_token(rec["ClientToken"], TokenEntry(rec["ParamsHash"], rec["SnapshotId"]))
            max_seq = max(max_seq, rec["Seq"])
            carried += 1
        for did in set(disks) | set(newest):
            rec = dict(disks.get(did) or {"DiskId": did, "DiskName": did, "Path": "", "Type":
                                          newest[did]["SourceDiskType"], "Size": 0,
                                          "CreationTime": newest[did]["CreationTime"]})
            if did not in disks:
                report["Problems"].append({"What": f"disk {did}", "Problem": "its object is lost: its path is unknown"})
            if did in newest:
                rec["Size"] = newest[did]["SourceDiskSize"]
            txn.put_disk(rec)
            if rec["Path"]:
                txn.put_disk_path(rec["Path"], did)
        txn.put_meta_u64(catalogs.META_SEQ, max_seq)
        txn.put_meta_u64(catalogs.META_DISK_SEQ, max([r.get("Seq", 0) for r in disks.values()] + [0]))
        # Readers of the old catalog hold one of the two reader locks: two epochs on, the first removal
        # of data drains both.
        txn.put_meta_u64(catalogs.META_EPOCH, old_epoch + 2)
    report.update(Snapshots=len(good), Disks=len(set(disks) | set(newest)), Segments=len(seg_uses),
                  FailedRecords=carried)  # Chunks: counted by _drop_unnamed_chunks, which runs next
