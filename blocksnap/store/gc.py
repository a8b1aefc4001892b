"""Garbage collection: plan, then execute (restic's prune is the model).

The plan lists what is removable:

- snapshots past their ExpiredTime (RetentionDays), and ``failed`` records older than the grace period
  (``FAILED_GRACE``, 7 days: long enough for an admin who looks weekly to see why a nightly create failed);
- index entries at refcount zero: chunks and map segments of deleted snapshots whose space was not
  reclaimed at once, or of failed or killed creates;
- records in packs that the index does not name (a killed create's, duplicates of a race), found by
  reading every pack's own trailer against the index;
- pack files no index entry names at all (a killed create's last pack);
- with ``max_unused``, packs whose dead bytes exceed that fraction of the pack: their live records are
  copied into new packs and the old packs removed whole (what an object store needs; the local store
  otherwise punches the dead ranges out in place);
- reclaim work a crash interrupted, and ``packs/XX`` directories left empty.

Executing it holds the repository lock exclusively (no create can be about to take a reference) and
removes data only through ``refs.Reclaim``: checked against a mark of every live segment, after the
readers that could still see it (``ReaderEpochs``).
"""
import calendar
import os
import time

from .. import _native, errors
from . import refs
from .packs import CODEC_RAW, KIND_CHUNK, KIND_SEGMENT, RECORD, read_trailer

FAILED_GRACE = 7 * 86400  # seconds a failed record stays visible before gc removes it


def _ts(iso):
    return calendar.timegm(time.strptime(iso, "%Y-%m-%dT%H:%M:%SZ"))


def _expired(rec, now):
    exp = rec.get("ExpiredTime")
    if not exp or rec["Status"] != "accomplished":
        return False
    try:
        return _ts(exp) <= now
    except (ValueError, TypeError):
        return False


def _failed_old(rec, now, grace):
    if rec["Status"] != "failed":
        return False
    try:
        return _ts(rec["LastModifiedTime"]) + grace <= now
    except (ValueError, TypeError):
        return True


def _refuse(key, exc):
    raise exc  # gc never removes anything on a damaged index: 'blocksnap repair' first


def _doomed(repo, txn, now, grace):
    """``(records, expired ids, old failed ids)``: the snapshots readers see, those past RetentionDays, and
    the failed records past the grace period."""
    stored = [r for r in txn.snapshots() if not r.get("Deleting")]
    recs = [repo.view(r) for r in stored]
    return stored, recs, [r["SnapshotId"] for r in recs if _expired(r, now)], \
        [r["SnapshotId"] for r in recs if _failed_old(r, now, grace)]


def plan(repo, now=None, max_unused=None, grace=FAILED_GRACE):
    """What gc would do, as a dict of lists and byte counts. Changes nothing.

    The expired snapshots count as deleted: their chunks that nothing else references are among
    DeadChunks, as gc will find them after deleting the snapshots.

    Raises:
        CatalogDamaged: an index entry is damaged; nothing may be removed until repair rebuilds the index.
    """
    now = time.time() if now is None else now
    dead, dead_bytes, dead_segs = [], 0, []
    named_packs = {}  # pack id -> live bytes (records the index names)
    with repo.catalog.read() as txn:
        stored, recs, expired, failed = _doomed(repo, txn, now, grace)
        expiring = [r for r in recs if r["SnapshotId"] in expired]
        # A dead create whose object reached the store is accomplished for readers but its map's references
        # are not counted yet (gc settles it first; a dry run cannot): count them here.
        rolled = [v for r, v in zip(stored, recs) if r["Status"] != v["Status"] and v["Status"] == "accomplished"]
        rolled_uses = refs.segment_uses(txn, rolled, repo.segment_ids)
        uses = refs.segment_uses(txn, expiring, repo.segment_ids)
        dying_segs = {s for s, n in uses.items() if txn.segment_refs(s) + rolled_uses.get(s, 0) == n}
        index = {}  # pack id -> {offset: id} of records the index names
        drops = {}  # chunk id -> its places in segments that are (or will be) dead
        seg_bytes = {}
        for sid, seg in txn.segment_items(_refuse):
            index.setdefault(seg.pack_id, {})[seg.offset] = sid
            if (txn.segment_refs(sid) == 0 and sid not in rolled_uses) or sid in dying_segs:
                dead_segs.append(sid)
                for j in _native.nonzero_ids(seg.ids):
                    cid = seg.ids[16 * j:16 * j + 16]
                    drops[cid] = drops.get(cid, 0) + 1
            else:
                seg_bytes[seg.pack_id] = seg_bytes.get(seg.pack_id, 0) + RECORD.size + len(seg.ids)
        for cid, entry in txn.chunks():
            index.setdefault(entry.pack_id, {})[entry.offset] = cid
            if entry.refcount == drops.get(cid, 0):
                dead.append(cid)
                dead_bytes += entry.stored_len
            else:
                named_packs[entry.pack_id] = named_packs.get(entry.pack_id, 0) + RECORD.size + entry.stored_len
        for pack_id, n in seg_bytes.items():
            named_packs[pack_id] = named_packs.get(pack_id, 0) + n
        known_packs = {pid for pid, _ in txn.packs()}
        pending = sum(1 for _ in txn.reclaims())
    orphans, orphan_bytes, unnamed, unnamed_bytes, repack, repack_bytes = [], 0, [], 0, [], 0
    files = repo.backend.list_packs()
    for pack_id in files:
        usage = repo.backend.pack_usage(pack_id)
        if pack_id not in index:
            orphans.append(pack_id)  # no index entry names a record of it: it goes whole
            orphan_bytes += usage
            continue
        try:
            records = read_trailer(repo.backend, pack_id)
        except (errors.RepositoryDamaged, OSError):
            continue  # kept: what cannot be read is never called dead (verify reports it)
        names = index[pack_id]
        dead_here = [(r.offset, RECORD.size + r.stored_len) for r in records if names.get(r.offset) != r.id]
        for (offset, length), left in zip(dead_here, repo.backend.punchable(pack_id, dead_here)):
            if left:
                unnamed.append((pack_id, offset, length))
                unnamed_bytes += left
        if max_unused is not None:
            # The share of its records' bytes that no live entry names (its header, trailer and padding
            # are not counted: a repacked pack has them too).
            total = sum(RECORD.size + r.stored_len for r in records)
            live = named_packs.get(pack_id, 0)
            if total and live and (total - live) / total > max_unused:
                repack.append(pack_id)
                repack_bytes += live
    stale_entries = sorted(known_packs - set(files))
    return {
        "ExpiredSnapshots": expired,
        "FailedRecords": failed,
        "DeadChunks": dead,
        "DeadSegments": dead_segs,
        "DeadBytes": dead_bytes,
        "UnnamedRecords": unnamed,
        "UnnamedBytes": unnamed_bytes,
        "OrphanPacks": orphans,
        "OrphanBytes": orphan_bytes,
        "RepackPacks": repack,
        "RepackBytes": repack_bytes,
        "PendingReclaim": pending,
        "StalePackEntries": stale_entries,
    }


def dry_run(repo, on_wait=None, now=None, max_unused=None, grace=FAILED_GRACE):
    """The plan gc would carry out now: made under the same exclusive lock, so a running create's
    packs and its not yet referenced chunks are not counted as removable."""
    lock = repo.lock_exclusive(on_wait)
    try:
        return plan(repo, now, max_unused, grace)
    finally:
        lock.release()


def execute(repo, on_wait=None, on_readers=None, now=None, max_unused=None, grace=FAILED_GRACE):
    """Make a fresh plan under the exclusive lock and carry it out; returns it with FreedBytes.

    Args:
        on_wait: called once, with no arguments, if creates are running and gc has to wait for them.
        on_readers: called once if restores or verifies that started earlier hold data gc removes.
    """
    lock = repo.lock_exclusive(on_wait)
    try:
        before = repo.packs.disk_usage()
        dead_segments = repo.finish_deletes()  # deletes a crash interrupted
        with repo.catalog.write() as txn:
            repo.settle_dead(txn)  # no create runs now: every progressing record is a dead one's
            # and every ClientToken claim without a record is one whose creator died before it recorded anything
            for token, entry in list(txn.tokens()):
                if txn.snapshot(entry.snapshot_id) is None:
                    txn.delete_token(token)
        with repo.catalog.read() as txn:
            _, _, expired, failed = _doomed(repo, txn, time.time() if now is None else now, grace)
        for sid in expired:
            try:
                repo.delete_snapshot(sid, reclaim=False)
            except errors.InvalidSnapshotIdNotFound:
                pass  # deleted meanwhile
        _remove_failed(repo, failed)
        p = plan(repo, now, max_unused, grace)  # the store walk, once, after the deletes
        p["ExpiredSnapshots"] = expired
        p["FailedRecords"] = failed
        job = refs.Reclaim(repo, blocking=True)
        job.on_wait = on_readers
        dead_segments.extend(p["DeadSegments"])
        job.run(dead_segments, p["DeadChunks"], p["UnnamedRecords"], p["OrphanPacks"])
        if p["RepackPacks"]:
            p["Repacked"] = repack(repo, p["RepackPacks"], job)
        job.process()
        if p["StalePackEntries"]:
            with repo.catalog.write() as txn:  # a pack removed by a process killed before its catalog commit
                for pack_id in p["StalePackEntries"]:
                    txn.delete_pack(pack_id)
        p["DiskObjectsRemoved"] = _remove_unrecorded_disks(repo)
        from .rebuild import clear_leftovers

        clear_leftovers(repo.path)
        p["EmptyDirsRemoved"] = repo.backend.remove_empty_dirs()
        for kind in ("snapshots", "disks", "groups"):
            repo.backend.clear_temporaries(kind)
        p["Problems"] = job.problems
        p["FreedBytes"] = max(0, before - repo.packs.disk_usage())
    except OSError as exc:
        raise errors.translate(exc, "gc") from exc
    finally:
        lock.release()
    return p


def _remove_unrecorded_disks(repo):
    """Remove the objects of disks the catalog does not know and no snapshot names: what a 'disk add' killed
    between writing its object and its catalog transaction leaves (it holds the repository lock shared, so
    none is running now). Returns how many."""
    from . import objects

    try:
        with repo.catalog.read() as txn:
            known = {did.decode("ascii", "replace") for did in txn.keys("disks")} | txn.disk_ids_of_paths()
            named = {rec["SourceDiskId"] for rec in txn.snapshots()}
    except errors.RepositoryDamaged:
        return 0  # a damaged entry might name a disk: keep every disk object (verify reports the damage)
    removed = 0
    unknown = [did for did in repo.backend.list_objects("disks") if did not in known and did not in named]
    if not unknown:
        return 0
    for sid in repo.backend.list_objects("snapshots"):  # the store's snapshots, read once
        try:
            stored = objects.decode_snapshot(sid, repo.backend.get_object("snapshots", sid))
        except errors.StoreDamaged:
            return 0  # a damaged object might name one: keep every disk object
        if stored:
            named.add(stored[0]["SourceDiskId"])
    for did in unknown:
        if did not in named:
            repo.backend.delete_object("disks", did)
            removed += 1
    return removed


def _remove_failed(repo, snapshot_ids):
    from ..repository import release_token

    if not snapshot_ids:
        return
    with repo.catalog.write() as txn:
        for sid in snapshot_ids:
            rec = txn.snapshot(sid)
            if rec is None or rec["Status"] != "failed":
                continue
            txn.delete_snapshot(rec)
            release_token(txn, rec)


def repack(repo, pack_ids, job):
    """Copy the live records of ``pack_ids`` into new packs, point the index at the copies, and remove
    the old packs whole once no reader can see them. Every record is checked as it is read.

    Returns:
        ``{"Packs": n, "Records": n, "Bytes": n}`` copied.
    """
    from .. import _native
    from ..restore import _restorer

    moves = {}  # id -> (kind, old pack, old offset, stored_len, raw_len, codec)
    with repo.catalog.read() as txn:
        for pack_id in pack_ids:
            for r in read_trailer(repo.backend, pack_id):
                e = txn.entry_naming(r.kind, r.id, pack_id, r.offset)
                if e is None:
                    continue
                if r.kind == KIND_CHUNK:
                    moves[r.id] = (KIND_CHUNK, pack_id, r.offset, e.stored_len, e.raw_len, e.codec)
                else:
                    moves[r.id] = (KIND_SEGMENT, pack_id, r.offset, len(e.ids), len(e.ids), CODEC_RAW)
    restorer = _restorer(repo.chunk_size)
    writer = repo.packs.writer()
    sealed = []
    copied = 0
    try:
        for rid, (kind, pack_id, offset, stored, raw, codec) in sorted(moves.items(), key=lambda kv: kv[1][1:3]):
            fd = repo.packs.fd(pack_id)
            try:
                restorer.restore([(fd, offset, stored, raw, codec, kind, rid, 0)], -1, 0)
            except (_native.RestoreDamage, OSError) as exc:
                raise errors.StoreDamaged(f"(pack {pack_id.hex()} offset {offset}: {exc}; not repacked: run "
                                          "'blocksnap verify')") from None
            data = os.pread(fd, stored, offset + RECORD.size)
            full = writer.add_many(data, [(rid, 0, stored, raw, codec, kind)])[1]
            copied += stored
            if full:
                sealed.append(writer.seal())
        last = writer.seal()
        if last is not None:
            sealed.append(last)
    finally:
        writer.close()
    job.relocate(sealed, moves, pack_ids)
    return {"Packs": len(pack_ids), "Records": len(moves), "Bytes": copied}



