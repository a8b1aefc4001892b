"""References and the removal of dead data (docs/FORMAT.md, "References" and "Removing data").

The counts live in the catalog, are derived from the snapshot maps, and are recounted by verify:

- a map segment's refcount is the number of places in accomplished snapshots' maps that name it;
- a chunk's refcount is the number of places in stored segment entries that name it.

A new segment is stored, and takes its chunks' references, while its create still runs (at refcount 0);
the create's commit then only counts the segments of its map, so committing a 1 TiB snapshot touches 16 Ki
segment counts, not 4 Mi chunk counts. A segment at refcount 0 is dead (or a running create's); it keeps
its chunks' references until it is removed, so a create that found it in the index can still use it.

Removing data is the one thing that can lose a snapshot, so no count decides it alone:

1. it runs under the exclusive repository lock, so no create can be about to take a reference;
2. the candidates (segments and chunks at 0) are checked against a *mark*: every segment that an
   accomplished snapshot's map names (read from the maps, not from the counts) is read, checked, and its
   chunk ids are fed to a C filter of the candidates. A candidate found there is kept and reported: its
   count was wrong;
3. the entries go in one catalog transaction that moves the reader epoch on (``ReaderEpochs``), with
   their records' ranges listed in ``reclaim``; only once every reader that could still see the entries
   has finished are the ranges punched, and a pack is removed only when its own trailer shows that the
   index names none of its records any more.
"""

from .. import _native, errors
from .catalog import ZERO_ID
from .config import segments_of_size  # noqa: F401 (used here and by callers of refs)
from .packs import KIND_CHUNK, KIND_SEGMENT, RECORD, read_trailer

MARK_BATCH = 64  # segments fed to the C filter per call



def map_of(txn, rec):
    """The segment ids of an accomplished snapshot's map (16 bytes each), checked against its size.

    Raises:
        CatalogDamaged: the map is missing, damaged or of the wrong length.
    """
    n = segments_of_size(rec["SourceDiskSize"], rec["ChunkSize"])
    segs = txn.snapshot_map(rec["SnapshotId"], n)
    if segs is None:
        raise errors.CatalogDamaged(f"(snapshot {rec['SnapshotId']} has no chunk map)")
    return segs


def split_ids(blob):
    return [blob[i:i + 16] for i in range(0, len(blob), 16)]


# --- taking and dropping references --------------------------------------------------------------------
def index_segment(txn, seg_id, ids, pack_id, offset):
    """Index a segment a create stored (its record at ``offset`` of ``pack_id``), at refcount 0, and take
    its chunks' references. Returns False if the segment was indexed already (the record is a duplicate)."""
    from .catalog import SegmentEntry

    if txn.has_segment(seg_id):
        return False
    txn.put_segment(seg_id, SegmentEntry(pack_id, offset, bytes(ids)))
    txn.set_segment_refs(seg_id, 0)
    for j in _native.nonzero_ids(ids):
        txn.add_chunk_ref(bytes(ids[16 * j:16 * j + 16]), +1)
    return True


def add_map_refs(txn, seg_ids):
    """A new snapshot's references: one per place in its map, to segments that must be indexed."""
    for sid in split_ids(seg_ids):
        if sid == ZERO_ID:
            continue
        if not txn.has_segment(sid):
            raise errors.CatalogDamaged(f"(map segment {sid.hex()} of a new snapshot is not in the index)")
        txn.set_segment_refs(sid, txn.segment_refs(sid) + 1)


def drop_map_refs(txn, seg_ids):
    """Release a deleted snapshot's references; returns the segments that fell to zero (now dead)."""
    dead = []
    for sid in split_ids(seg_ids):
        if sid == ZERO_ID:
            continue
        refs = txn.segment_refs(sid)
        if refs == 0:
            raise errors.CatalogDamaged(f"(map segment {sid.hex()} is named by a map but its refcount is 0)")
        txn.set_segment_refs(sid, refs - 1)
        if refs == 1:
            dead.append(sid)
    return dead


def segment_uses(txn, recs, map_of=map_of):
    """``{segment id: places}``: how often these snapshots' maps name each non-zero segment (``map_of``:
    how a record's map is found)."""
    uses = {}
    for rec in recs:
        for sid in split_ids(map_of(txn, rec)):
            if sid != ZERO_ID:
                uses[sid] = uses.get(sid, 0) + 1
    return uses


def _unique_segments(txn, recs):
    """The segments that only these snapshots hold (every place that names them is in their maps)."""
    for sid, uses in segment_uses(txn, recs).items():
        if txn.segment_refs(sid) == uses:
            seg = txn.segment(sid)
            if seg is not None:
                yield seg


def exclusive_bytes(txn, rec):
    """Stored bytes deleting this snapshot would free now. Memory stays small whatever the image's size: a
    chunk named once in the whole repository (the common case) is counted as it is met; only chunks named
    several times are remembered until all of this snapshot's places for them are counted."""
    total = 0
    several = {}  # chunk id -> [places here, entry]
    for seg in _unique_segments(txn, [rec]):
        ids = seg.ids
        for j in _native.nonzero_ids(ids):
            cid = ids[16 * j:16 * j + 16]
            if cid in several:
                several[cid][0] += 1
                continue
            entry = txn.chunk(cid)
            if entry is None:
                continue
            if entry.refcount == 1:
                total += entry.stored_len
            else:
                several[cid] = [1, entry]
    return total + sum(e.stored_len for uses, e in several.values() if e.refcount == uses)


# --- the mark ---------------------------------------------------------------------------------------------
def live_segments(txn):
    """The segment ids that accomplished snapshots' maps name: liveness from the maps, not from counts."""
    live = set()
    for rec in txn.snapshots():
        if rec["Status"] == "accomplished":
            live.update(split_ids(map_of(txn, rec)))
    live.discard(ZERO_ID)
    return live


def mark(txn, chunk_candidates, live=None):
    """The candidates that some live segment names (they must not be removed). Reads every live segment."""
    if not chunk_candidates:
        return set()
    live = live_segments(txn) if live is None else live
    filt = _native.IdFilter(chunk_candidates)
    batch = []
    for sid in live:
        seg = txn.segment(sid)
        if seg is None:
            raise errors.CatalogDamaged(f"(live map segment {sid.hex()} is not in the index)")
        batch.append(seg.ids)
        if len(batch) >= MARK_BATCH:
            filt.feed(b"".join(batch))
            batch = []
    if batch:
        filt.feed(b"".join(batch))
    return set(filt.found())


# --- removing ---------------------------------------------------------------------------------------------
class Reclaim:
    """One removal of dead data (the caller holds the exclusive repository lock)."""

    def __init__(self, repo, blocking):
        self.repo = repo
        self.blocking = blocking
        self.problems = []  # counts found wrong by the mark
        self.removed_chunks = 0
        self.removed_segments = 0
        self.freed = 0
        self.on_wait = None  # called once if older readers make it wait

    def _drain(self, epoch):
        if self.repo.epochs.drain(epoch, False):
            return True
        if not self.blocking:
            return False
        if self.on_wait:
            self.on_wait()
            self.on_wait = None
        return self.repo.epochs.drain(epoch, True)

    def run(self, dead_segments=(), dead_chunks=(), dead_ranges=(), dead_packs=()):
        """Remove the given candidates that are still dead and pass the mark, then give space back.

        Args:
            dead_segments, dead_chunks: ids whose counts fell to zero.
            dead_ranges: ``(pack id, offset, length)`` of records no index entry names (gc).
            dead_packs: packs no index entry names at all (gc's orphans).
        Returns:
            bytes given back to the file system now.
        """
        cat = self.repo.catalog
        with cat.read() as txn:
            segs, chunks = self.expand(txn, dead_segments, dead_chunks)
            if segs or chunks:
                live = live_segments(txn)
                wrong_segs = segs & live
                if wrong_segs:  # kept: the chunks only they name are no candidates either
                    segs, chunks = self.expand(txn, segs - live, dead_chunks)
                wrong_chunks = mark(txn, chunks, live)
                chunks -= wrong_chunks
                for sid in sorted(wrong_segs):
                    self.problems.append({"Segment": sid.hex(), "Problem": "refcount 0, but a map names it: kept"})
                for cid in sorted(wrong_chunks):
                    self.problems.append({"ChunkId": cid.hex(), "Problem": "refcount 0, but a live segment "
                                                                           "names it: kept"})
            epoch = txn.epoch()
        if segs or chunks or dead_ranges or dead_packs:
            if not self._drain(epoch + 1):
                return self.process()  # readers left from an older epoch: leave it for later
            with cat.write() as txn:
                epoch = txn.epoch() + 1
                self._remove(txn, segs, chunks, epoch)
                for pack_id, offset, length in dead_ranges:
                    txn.put_reclaim(pack_id, offset, length, epoch)
                for pack_id in dead_packs:
                    txn.put_reclaim(pack_id, 0, 0, epoch)  # length 0: the whole pack, if it is dead
                txn.put_meta_u64(b"epoch", epoch)
        return self.process()

    def relocate(self, sealed, moves, old_packs):
        """Point the index at records copied into new packs (gc's repack) in one flip, and mark the old
        packs for removal once no reader can see them."""
        from .catalog import PackEntry, SegmentEntry

        with self.repo.catalog.read() as txn:
            epoch = txn.epoch()
        if not self._drain(epoch + 1):
            for handed in sealed:
                self.repo.packs.remove(handed.pack_id)  # nothing names the copies yet
            return
        with self.repo.catalog.write() as txn:
            epoch = txn.epoch() + 1
            for handed in sealed:
                txn.put_pack(handed.pack_id, PackEntry(handed.size, len(handed.records)))
                for r in handed.records:
                    kind, old_pack, old_off = moves[r.id][:3]
                    e = txn.entry_naming(kind, r.id, old_pack, old_off)
                    if e is None:
                        continue  # changed since the copy was planned
                    if kind == KIND_CHUNK:
                        txn.put_chunk(r.id, e._replace(pack_id=handed.pack_id, offset=r.offset))
                    else:
                        txn.put_segment(r.id, SegmentEntry(handed.pack_id, r.offset, e.ids))
            for pack_id in old_packs:
                txn.put_reclaim(pack_id, 0, 0, epoch)
            txn.put_meta_u64(b"epoch", epoch)

    def expand(self, txn, dead_segments, dead_chunks):
        """The segments still at refcount 0, and the chunks at 0 once those are removed."""
        segs = {s for s in dead_segments if txn.has_segment(s) and txn.segment_refs(s) == 0}
        drops = {}
        for sid in segs:
            ids = txn.segment(sid).ids
            for j in _native.nonzero_ids(ids):
                cid = ids[16 * j:16 * j + 16]
                drops[cid] = drops.get(cid, 0) + 1
        chunks = set()
        for cid in set(dead_chunks) | set(drops):
            entry = txn.chunk(cid)
            if entry is not None and entry.refcount == drops.get(cid, 0):
                chunks.add(cid)
        return segs, chunks

    def _remove(self, txn, segs, chunks, epoch):
        for sid in segs:
            if not txn.has_segment(sid) or txn.segment_refs(sid) != 0:
                continue  # taken again meanwhile (cannot happen under the exclusive lock; cheap to check)
            seg = txn.segment(sid)
            for j in _native.nonzero_ids(seg.ids):
                txn.add_chunk_ref(seg.ids[16 * j:16 * j + 16], -1)
            txn.delete_segment(sid)
            txn.put_reclaim(seg.pack_id, seg.offset, RECORD.size + len(seg.ids), epoch)
            self.removed_segments += 1
        for cid in chunks:
            entry = txn.chunk(cid)
            if entry is None or entry.refcount != 0:
                continue
            txn.delete_chunk(cid)
            txn.put_reclaim(entry.pack_id, entry.offset, RECORD.size + entry.stored_len, epoch)
            self.removed_chunks += 1

    def process(self):
        """Give back the ranges in ``reclaim`` whose readers are gone: punch them, or remove their pack
        when its trailer shows the index names none of its records. Returns bytes freed."""
        repo = self.repo
        cat = repo.catalog
        with cat.read() as txn:
            epoch = txn.epoch()
            todo = list(txn.reclaims())
        if not todo:
            return 0
        # Epoch 0: never named by the index (a create's duplicates), no reader can see it.
        ready_now = any(e.epoch >= epoch and e.epoch for _, _, e in todo) and self._drain(epoch - 1)
        def is_ready(ent):
            return ent.epoch < epoch or not ent.epoch or ready_now
        waiting = {pack_id for pack_id, _, ent in todo if not is_ready(ent)}  # a reader may still read these
        todo = [t for t in todo if is_ready(t[2])]
        if not todo:
            return self.freed
        by_pack = {}
        for pack_id, offset, ent in todo:
            by_pack.setdefault(pack_id, []).append((offset, ent.length))
        gone = []
        for pack_id, ranges in by_pack.items():
            if pack_id not in waiting and self._pack_dead(pack_id):
                self.freed += repo.backend.pack_usage(pack_id)
                repo.packs.remove(pack_id)
                gone.append(pack_id)
                continue
            for offset, length in ranges:
                if length:
                    self.freed += repo.packs.punch(pack_id, offset, length)
        with cat.write() as txn:
            for pack_id, offset, _ in todo:
                txn.delete_reclaim(pack_id, offset)
            for pack_id in gone:
                txn.delete_pack(pack_id)
        return self.freed

    def _pack_dead(self, pack_id):
        """True if the index names none of the pack's records (read from its trailer), or it is gone.
        A pack whose trailer cannot be read is never called dead."""
        try:
            records = read_trailer(self.repo.backend, pack_id)
        except FileNotFoundError:
            return True
        except (errors.StoreDamaged, OSError):
            # No readable trailer: a killed create's last pack, which was never indexed (a pack's entry is
            # written in the transaction that indexes its first records), or a damaged one: dead only if
            # no index entry at all names it (a walk over the whole index; this is rare).
            with self.repo.catalog.read() as txn:
                if txn.pack(pack_id) is None:
                    return True
                damaged = []
                for _, entry in txn.chunk_items(lambda c, exc: damaged.append(c)):
                    if entry.pack_id == pack_id:
                        return False
                for _, seg in txn.segment_items(lambda s, exc: damaged.append(s)):
                    if seg.pack_id == pack_id:
                        return False
                return not damaged  # a damaged entry might name it: keep it
        with self.repo.catalog.read() as txn:
            for rec in records:
                if rec.kind not in (KIND_CHUNK, KIND_SEGMENT):
                    return False  # a kind this version does not know: keep the pack
                if txn.entry_naming(rec.kind, rec.id, pack_id, rec.offset) is not None:
                    return False
        return True


def reclaim(repo, dead_segments=(), dead_chunks=(), blocking=False):
    """Remove what these candidates leave dead; returns ``(bytes freed, problems)``.

    Not ``blocking`` (a delete's immediate reclaim): takes the exclusive repository lock only if it is
    free and leaves whatever older readers could still see for later; gc passes ``blocking``.
    """
    lock = repo.repo_lock()
    try:
        if not lock.acquire(exclusive=True, blocking=blocking):
            return 0, []
        # No create runs now: a progressing record whose creator is gone and whose object is in the store
        # is accomplished (Repository.view), and its map must be live for the mark. Record it first; if
        # that cannot be done, remove nothing (gc settles and reclaims later).
        try:
            with repo.catalog.write() as txn:
                repo.settle_dead(txn)
        except errors.BlocksnapError:
            return 0, []
        job = Reclaim(repo, blocking)
        freed = job.run(dead_segments, dead_chunks)
        return freed, job.problems
    except OSError as exc:
        raise errors.translate(exc, "reclaim") from exc
    finally:
        lock.release()
