"""Creating a snapshot: scan, deduplicate, store, commit (docs/FORMAT.md, "Write ordering").

Pipeline:
  1. one write transaction registers the snapshot as ``progressing``;
  2. two scanner threads run the C core over 4 MiB windows of the image
     (read, holes, zero detection, XXH3-128, comparison with the parent's
     ids, zstd of the changed chunks in place) with the GIL released, while
     the calling thread picks the chunks the repository lacks and hands them
     to the pack writer, and cuts the map into segments as they fill: a new
     segment goes into the pack stream too;
  3. each full pack is fsynced, then one short transaction indexes its
     chunks (refcount 0) and its segments (refcount 0, taking their chunks'
     references): the reference work of a big image is spread over the scan;
  4. if the image is unchanged since it was opened, the snapshot's object
     (record and segment ids) is written to the store, and one transaction
     counts the map's segments and marks the snapshot ``accomplished``.
Memory does not grow with the image: the map is kept as segment ids only
(16 bytes per 256 chunks), the parent's segments are read as the scan
reaches them. A crash anywhere leaves committed snapshots intact; what the
dead create wrote is unreferenced and gc reclaims it.
"""
import errno
import os
import queue
import threading
import time

from . import _native, errors, interrupts
from . import image as images
from .repository import ACCOMPLISHED, PROGRESSING, crashpoint, mark_failed, new_id, now_iso, release_token
from .store import objects, refs
from .store import packs as packstore
from .store.catalog import ZERO_ID, PackEntry, TokenEntry
from .store.config import SEGMENT_CHUNKS

WINDOW_BYTES = 4 << 20
BUFFERS = 8  # windows in flight: bounds memory at BUFFERS * WINDOW_BYTES
SCANNERS = 2
_FRESH = object()  # in the free-buffer queue: a buffer not made yet
PROGRESS_INTERVAL = 0.5  # seconds between Progress updates other processes can see
SEGMENT_BYTES = SEGMENT_CHUNKS * 16
PENDING_SEGMENT_BYTES = 8 << 20  # seal a pack early once this many bytes of new segments wait in it
PARENT_CACHE = 8  # parent segments kept while the scanners pass them


class _Stats:
    def __init__(self):
        self.logical = 0
        self.changed = 0
        self.changed_chunks = 0
        self.added = 0
        self.added_chunks = 0
        self.scanned = 0


def find_parent(txn, disk_id):
    """The newest accomplished snapshot record of a disk, or None."""
    for sid in txn.disk_snapshot_ids(disk_id, reverse=True):
        rec = txn.snapshot(sid)
        if rec is not None and rec["Status"] == ACCOMPLISHED and not rec.get("Deleting"):
            return rec
    return None


def create_snapshot(repo, disk_id, fields, client_token=None, params_hash=None, progress=None, on_wait=None):
    """Create a snapshot of a registered disk; returns its accomplished record.

    Args:
        repo: an open Repository.
        disk_id: the DiskId.
        fields: validated SnapshotName / Description / RetentionDays / Tags / Category / ResourceGroupId /
            InstantAccess / InstantAccessRetentionDays.
        client_token, params_hash: idempotency (api.py validated them). The token is claimed in the catalog
            before the disk is taken (see :func:`claim_token`), so a retry is answered from state.
        progress: optional callable(done_bytes, total_bytes).
        on_wait: called once, with no arguments, if a running gc makes the create wait.
    Raises:
        IncorrectDiskStatusCreatingSnapshot, InvalidDiskIdNotFound, InstanceLockedForSecurity,
        InvalidResourceGroupNotFound, QuotaExceedSnapshot, QuotaExceedConcurrentSnapshot,
        IdempotentParameterMismatch, IdempotentProcessing, ImageNotFound, ImageUnreadable, ImageChanged,
        NoSpace, CreateSnapshotFailed, RepositoryReadOnly.
    """
    repo.require_writable()
    disk_lock = repo.disk_lock(disk_id)
    repo.get_disk(disk_id)
    repo_lock = repo.lock_shared(on_wait)  # waits while gc runs or waits to run
    token_lock = slot = None
    sid = new_id("s-")
    registered = False
    try:
        if client_token:
            token_lock, existing = claim_token(repo, client_token, params_hash, sid)
            if existing is not None:
                return existing
        check_disk_usable(repo.get_disk(disk_id))
        if not disk_lock.acquire(exclusive=True, blocking=False):
            raise errors.IncorrectDiskStatusCreatingSnapshot(f"({disk_id})")
        quota = repo.quotas()["ConcurrentSnapshots"]
        slot = repo.create_slot(quota) if quota is not None else None
        if quota is not None and slot is None:
            raise errors.QuotaExceedConcurrentSnapshot(
                f"(this repository runs at most {quota} creates at once; its quota ConcurrentSnapshots)",
                disk=disk_id, quota=quota)
        job = _Create(repo, disk_id, fields, client_token, params_hash, progress, sid)
        try:
            return job.run(repo_lock)
        finally:
            registered = job.rec is not None
    except OSError as exc:
        raise errors.translate(exc, "locks", op="create") from exc
    except errors.BlocksnapError as exc:
        typed = errors.translate(exc, op="create")  # a full disk is CreateSnapshot.NoSpace here
        if typed is exc:
            raise
        raise typed from exc
    finally:
        if token_lock is not None:
            if not registered:
                _unclaim_token(repo, client_token, sid)  # nothing was made: the token stays unused
            token_lock.release()  # after the record's last change: a retry now sees it final
        if slot is not None:
            slot.release()
        disk_lock.release()
        repo_lock.release()


def check_disk_usable(disk):
    """Raise InstanceLockedForSecurity if the disk carries a security OperationLock (``disk lock``)."""
    if any(x.get("LockReason") == "security" for x in disk.get("OperationLocks") or ()):
        raise errors.InstanceLockedForSecurity(f"({disk['DiskId']} is locked: 'blocksnap disk unlock' lifts it)")


def claim_token(repo, token, params_hash, sid):
    """Decide a ClientToken request from the catalog, in one write transaction, and claim the token for a new
    create (SnapshotId ``sid``) where that is the answer.

    The creator of a token holds its lock (:meth:`Repository.token_lock`) from this transaction until its record
    is final (accomplished or failed), and takes the lock inside the transaction that records the claim: a
    request that finds a claim whose lock is held knows its first request is running, one that finds the lock
    free knows it ended. So:

    - the token's snapshot accomplished: that snapshot is the answer (``(None, record)``), also after a
      restart; with other parameters, IdempotentParameterMismatch;
    - its snapshot progressing, or the claim still without a record while its lock is held:
      IdempotentProcessing (IdempotentParameterMismatch with other parameters);
    - no claim, a failed snapshot, or a claim whose creator died before it recorded anything: the token is
      claimed for this request: ``(held lock, None)``.

    Raises:
        IdempotentParameterMismatch, IdempotentProcessing.
    """
    lock = repo.token_lock(token)
    with repo.catalog.write() as txn:
        prev = txn.token(token)
        other = prev is not None and prev.params_hash != params_hash
        if prev is not None:
            rec = txn.snapshot(prev.snapshot_id)
            if rec is not None and not rec.get("Deleting"):
                if other:
                    raise errors.IdempotentParameterMismatch()
                seen = repo.view(rec)
                if seen["Status"] == ACCOMPLISHED:
                    return None, seen
                if seen["Status"] == PROGRESSING:
                    raise errors.IdempotentProcessing()
        # No snapshot yet, or a failed one: the claim's creator still holds the lock if it runs (before it
        # recorded its snapshot, or while it clears up a failure); free, it has ended.
        if not lock.acquire():
            raise errors.IdempotentParameterMismatch() if other else errors.IdempotentProcessing()
        try:
            txn.put_token(token, TokenEntry(params_hash, sid))
        except BaseException:
            lock.release()
            raise
    return lock, None


def _unclaim_token(repo, token, sid):
    """Forget a claim that made nothing (the disk was busy, a quota was reached), if it is still this one's."""
    try:
        with repo.catalog.write() as txn:
            held = txn.token(token)
            if held is not None and held.snapshot_id == sid and txn.snapshot(sid) is None:
                txn.delete_token(token)
    except (errors.BlocksnapError, OSError):
        pass  # a claim without a record whose lock is free is taken over by the next request


class _MapBuilder:
    """The new snapshot's map, one segment at a time: fills segments as windows are scanned or skipped,
    and hands each one over when all its chunks are known. Holds only the segments being filled and the
    finished segment ids. Thread-safe."""

    def __init__(self, n_chunks):
        self.n_chunks = n_chunks
        self.n_segs = -(-n_chunks // SEGMENT_CHUNKS)
        self.seg_ids = bytearray(16 * self.n_segs)
        self._open = {}  # segment index -> [bytearray of its ids, chunks known]
        self._done = []  # (index, segment id, ids) finished and not yet taken
        self._lock = threading.Lock()

    def _seg_len(self, s):
        return min(SEGMENT_CHUNKS, self.n_chunks - s * SEGMENT_CHUNKS)

    def put(self, first, ids):
        """Chunks ``first ..`` have ids ``ids`` (16 bytes each); ``ids`` None: they are holes (zero)."""
        count = (len(ids) // 16) if ids is not None else None
        return self._fill(first, count, ids)

    def skip(self, first, count):
        self._fill(first, count, None)

    def _fill(self, first, count, ids):
        with self._lock:
            k = first
            end = first + count
            while k < end:
                s = k // SEGMENT_CHUNKS
                lo = k - s * SEGMENT_CHUNKS
                n = min(end - k, self._seg_len(s) - lo)
                ent = self._open.get(s)
                if ent is None:
                    ent = self._open[s] = [bytearray(16 * self._seg_len(s)), 0]
                if ids is not None:
                    ent[0][16 * lo:16 * (lo + n)] = ids[16 * (k - first):16 * (k - first + n)]
                ent[1] += n
                if ent[1] == self._seg_len(s):
                    del self._open[s]
                    seg = bytes(ent[0])
                    seg_id = _native.hash128(seg) if any(seg) else ZERO_ID
                    self.seg_ids[16 * s:16 * s + 16] = seg_id
                    self._done.append((s, seg_id, seg))
                k += n

    def take(self):
        """The segments finished since the last call."""
        with self._lock:
            out, self._done = self._done, []
        return out

    def complete(self):
        with self._lock:
            return not self._open and not self._done


class _Create:
    def __init__(self, repo, disk_id, fields, client_token, params_hash, progress, snapshot_id=None):
        self.repo = repo
        self.snapshot_id = snapshot_id or new_id("s-")
        self.vanished = False  # the image's path was gone when the create ended: it leaves no record
        self.cat = repo.catalog
        self.disk_id = disk_id
        self.fields = fields
        self.client_token = client_token
        self.params_hash = params_hash
        self.progress = progress
        self.cs = repo.chunk_size
        self.stats = _Stats()
        self.writer = None  # made when data is about to flow: it owns an I/O thread and 8 MiB of buffers
        self.pending = set()  # chunk ids in the pack being written
        self.pending_segs = {}  # segment id -> ids, stored in a pack not yet indexed
        self.pending_seg_bytes = 0
        self.sealed = []  # packs this create indexed
        self.rec = None
        self.skipped = 0  # bytes of whole-window holes never handed to the C core
        self._last_progress = 0.0
        self.parent_segs = b""
        self._parent_cache = {}
        self._parent_lock = threading.Lock()

    # --- the phases ----------------------------------------------------------------------------------
    def run(self, repo_lock):
        disk = self.repo.get_disk(self.disk_id)
        with images.open_source(disk.get("ImagePath", disk["Path"]), disk.get("Format", "raw"), disk.get("BackingDirs", ()),
                                disk.get("AllowDirty", False), deny=(self.repo.path,)) as img:
            images.check_mappable(img, self.cs)
            self.rec = self._register(img)
            try:
                seg_ids = self._scan_and_store(img)
                if not img.unchanged():
                    if not os.path.lexists(disk["Path"]):
                        self.vanished = True
                        raise errors.CreateSnapshotFailed(f"(the image {disk['Path']} was removed while it was read; "
                                                          "nothing of this snapshot was kept)")
                    raise errors.ImageChanged(f"({disk['Path']})")
                crashpoint("before-commit")
                self._commit(seg_ids, img)
                crashpoint("after-commit")
            except BaseException as exc:
                typed = self._typed(exc, disk["Path"])
                why = interrupts.describe(exc)
                with interrupts.deferred():  # a second signal does not cut the cleanup short
                    self._fail(errors.CreateSnapshotFailed(f"({why})") if why else typed, repo_lock)
                if typed is exc:
                    raise
                raise typed from exc
        return self.rec

    def _register(self, img):
        with self.cat.write() as txn:
            # Holding the disk lock, any progressing record of this disk is a dead create's.
            self.repo.settle_dead(txn, self.disk_id)
            disk = self.repo.get_disk(self.disk_id, txn)
            check_disk_usable(disk)
            group = self.fields.get("ResourceGroupId")
            if group is not None and txn.group(group) is None:  # removed since the request was checked
                raise errors.InvalidResourceGroupNotFound(f"({group!r})")
            quota = self.repo.quotas()["SnapshotsPerDisk"]
            have = self.repo.manual_snapshot_count(txn, self.disk_id)
            if have >= quota:
                raise errors.QuotaExceedSnapshot(f"({self.disk_id} has {have} manual snapshots; its quota is {quota})")
            parent = find_parent(txn, self.disk_id)
            seq = txn.next_seq()
            sid = self.snapshot_id
            now = time.time()
            rec = dict(self.fields)
            rec.update({
                "SnapshotId": sid, "Seq": seq, "SourceDiskId": self.disk_id, "SourceDiskSize": img.size,
                "SourceDiskType": img.kind, "Status": PROGRESSING, "Progress": "0%",
                "CreationTime": now_iso(now), "LastModifiedTime": now_iso(now),
                "ParentSnapshotId": parent["SnapshotId"] if parent else None, "Pid": os.getpid(),
                "ChunkSize": self.cs,
            })
            if img.format != "raw":
                rec["SourceDiskFormat"] = img.format
            if rec.get("RetentionDays"):
                rec["ExpiredTime"] = now_iso(now + rec["RetentionDays"] * 86400)
            if self.client_token:
                rec["ClientToken"] = self.client_token
                rec["ParamsHash"] = self.params_hash
                txn.put_token(self.client_token, TokenEntry(self.params_hash, sid))
            txn.put_snapshot(rec)
            txn.put_disk_snap(self.disk_id, seq, sid)
            if parent is not None and parent["ChunkSize"] == self.cs:
                self.parent_segs = bytes(refs.map_of(txn, parent))
        return rec

    # --- the parent's ids, a segment at a time ---------------------------------------------------------
    def _parent_window(self, first, count):
        """The parent's ids for chunks ``first .. first+count`` (shorter where the parent map ends)."""
        if not self.parent_segs:
            return b""
        n_segs = len(self.parent_segs) // 16
        s0, s1 = first // SEGMENT_CHUNKS, (first + count - 1) // SEGMENT_CHUNKS
        parts = []
        for s in range(s0, min(s1 + 1, n_segs)):
            parts.append(self._parent_segment(s))
            if len(parts[-1]) < SEGMENT_BYTES:
                break  # the parent's last, short segment
        blob = b"".join(parts)
        off = 16 * (first - s0 * SEGMENT_CHUNKS)
        return blob[off:off + 16 * count]

    def _parent_segment(self, s):
        sid = self.parent_segs[16 * s:16 * s + 16]
        if sid == ZERO_ID:
            return bytes(SEGMENT_BYTES)
        with self._parent_lock:
            ids = self._parent_cache.get(s)
        if ids is None:
            with self.cat.read() as txn:
                seg = txn.segment(sid)
            if seg is None:
                raise errors.CatalogDamaged(f"(map segment {sid.hex()} of the parent snapshot is not in the index)")
            ids = seg.ids
            with self._parent_lock:
                self._parent_cache[s] = ids
                while len(self._parent_cache) > PARENT_CACHE:
                    del self._parent_cache[min(self._parent_cache)]
        return ids

    # --- the pipeline ------------------------------------------------------------------------------------
    def _scan_and_store(self, img):
        """Run the pipeline over the whole image; returns the new map's segment ids.

        Threads: two scanners take windows in turn and run the C core on each
        (read, holes, zero check, XXH3-128, parent diff, then zstd of the
        changed chunks in place), all with the GIL released; this thread
        records ids, picks the chunks the repository lacks and appends them
        to the pack writer, whose C core copies them into its staging buffers
        (the window's buffer is free again right after) and writes those from
        an I/O thread of its own; one sealer waits for each full pack's last
        write, fsyncs it and indexes it.
        """
        cs = self.cs
        per_window = max(WINDOW_BYTES // cs, 1)
        window = per_window * cs
        self.map = _MapBuilder(-(-img.size // cs))
        self.writer = self.repo.packs.writer()
        windows = self._data_windows(img, window)
        windows_lock = threading.Lock()
        free = queue.Queue()
        for _ in range(BUFFERS):
            free.put(_FRESH)  # a scanner makes the buffer when it first takes it: no serial start-up
        ready = queue.Queue()
        to_seal = queue.Queue()
        failures = []
        stop = threading.Event()

        def guarded(fn):
            def run():
                try:
                    fn()
                except BaseException as exc:  # re-raised by this thread below
                    failures.append(exc)
                    stop.set()
                    ready.put(None)
            return run

        def scan_windows():
            scanner = _native.ExtentScanner(cs, per_window)
            codec = _native.Codec(packstore.ZSTD_LEVEL, packstore.ZSTD_HASH_LOG)
            while not stop.is_set():
                with windows_lock:
                    nxt = next(windows, None)
                if nxt is None:
                    break
                off, length = nxt
                buf = free.get()
                if buf is None or stop.is_set():
                    break
                if buf is _FRESH:
                    buf = bytearray(window)
                k = off // cs
                parent = self._parent_window(k, -(-length // cs))
                extents = img.extents(off, length)
                try:
                    ids, flags, changed = scanner.scan_extents(extents, length, buf, parent)
                except _native.Undecodable as exc:
                    raise images.undecodable(img, extents, exc) from None
                except OSError as exc:
                    if exc.filename is None and not isinstance(exc, _native.ShortRead):
                        exc.filename = images.path_of(img, extents, exc)  # a backing or data file, maybe
                    raise
                if not img.unchanged():
                    raise errors.ImageChanged(f"({img.path} changed while it was read)")
                # Compress the changed chunks here too, in place, still without the GIL.
                encoded = codec.encode_chunks(buf, length, cs, changed, packstore.INCOMPRESSIBLE_MILLIBITS)
                ready.put((off, length, buf, (ids, flags, changed), encoded))
            ready.put(None)

        def seal_packs():
            # Runs until the None at the end, so every handed-over pack's descriptor gets closed, also
            # after a failure (then only once the I/O thread is done with it).
            while True:
                handed = to_seal.get()
                if handed is None:
                    break
                if not stop.is_set():
                    try:
                        self._index_pack(handed)  # closes the descriptor, also when it raises
                    except BaseException as exc:  # re-raised by the calling thread
                        failures.append(exc)
                        stop.set()
                        ready.put(None)
                    continue
                try:
                    self.writer.wait(handed.last_write)
                except OSError:
                    pass  # the create is failing already
                finally:
                    os.close(handed.fd)

        scanners = [threading.Thread(target=guarded(scan_windows), name=f"blocksnap-scan{i}", daemon=True)
                    for i in range(SCANNERS)]
        sealer = threading.Thread(target=guarded(seal_packs), name="blocksnap-seal", daemon=True)
        for t in scanners + [sealer]:
            t.start()
        try:
            finished = 0
            while finished < SCANNERS and not stop.is_set():
                item = ready.get()
                if item is None:
                    finished += 1
                    continue
                off, length, buf, (ids, flags, changed), encoded = item
                picked = self._pick_new_chunks(length, ids, flags, changed, encoded)
                # The C core copies the records into its staging buffers (GIL released) and its I/O
                # thread writes them; the window's buffer is free again as soon as this returns.
                full = False
                if picked:
                    full = self.writer.add_many(buf, picked)[1]
                free.put(buf)
                self.map.put(off // cs, ids)
                full = self._store_segments() or full
                if full:
                    to_seal.put(self._detach())
                self.stats.scanned += length
                self._report(img.size)
                crashpoint("mid-scan")
            if not stop.is_set():
                self._store_segments()
                if not self.map.complete():
                    raise errors.InternalError("(the map of the new snapshot has chunks no window covered)")
                handed = self._detach()
                if handed is not None:
                    to_seal.put(handed)
        except BaseException:
            stop.set()
            raise
        finally:
            # A second signal must not cut these joins short: _fail decides which packs to remove from
            # what the sealer indexed, so the sealer has to be done first.
            with interrupts.deferred():
                if stop.is_set():
                    for _ in range(SCANNERS):
                        free.put(None)  # wake scanners waiting for a buffer
                to_seal.put(None)
                sealer.join()
                if not stop.is_set():
                    self.writer.close()
                for t in scanners:
                    t.join()
        if failures:
            raise failures[0]
        return bytes(self.map.seg_ids)

    def _detach(self):
        handed = self.writer.detach()
        self.pending_seg_bytes = 0
        return handed

    def _store_segments(self):
        """Put the map's finished segments that the repository lacks into the pack stream. Returns True
        when the pack should be sealed (full, or holding many new segments)."""
        done = self.map.take()
        if not done:
            return False
        full = False
        with self.cat.read() as txn:
            for _, seg_id, seg in done:
                if seg_id == ZERO_ID or seg_id in self.pending_segs or txn.has_segment(seg_id):
                    continue
                self.pending_segs[seg_id] = seg
                self.pending_seg_bytes += len(seg)
                full = self.writer.add_segment(seg_id, seg)[1] or full
        return full or self.pending_seg_bytes >= PENDING_SEGMENT_BYTES

    def _data_windows(self, img, window):
        """Windows ``(offset, length)`` that may hold data; windows the source calls all zeros are skipped.

        Their map entries stay zero (holes), so a sparse 1 TiB image (or a qcow2 with few clusters) costs
        the C core only its data. Skipped bytes count as scanned for Progress. Not thread-safe: callers
        hold a lock.
        """
        size, off = img.size, 0
        for data, hole in img.data_ranges(0, size):
            if hole <= off:
                continue
            start = max(off, data // window * window)
            end = min(size, -(-min(hole, size) // window) * window)
            self._skip(off, start)
            for w in range(start, end, window):
                yield w, min(window, size - w)
            off = end
        self._skip(off, size)

    def _skip(self, start, end):
        if end > start:
            self.skipped += end - start  # only this generator writes it
            self.map.skip(start // self.cs, -(-end // self.cs) - start // self.cs)

    def _pick_new_chunks(self, length, ids, flags, changed, encoded):
        """Count a scanned window; returns the records of its chunks the repository lacks.

        Returns:
            ``[(chunk_id, offset_in_window, stored_len, raw_len, codec, kind)]`` for ``PackWriter.add_many``.
        """
        cs = self.cs
        st = self.stats
        data_chunks = flags.count(_native.CHUNK_DATA) + flags.count(_native.CHUNK_DATA | _native.CHUNK_CHANGED)
        st.logical += data_chunks * cs
        if flags and flags[-1] & _native.CHUNK_DATA and length % cs:
            st.logical -= cs - length % cs
        picked = []
        if not changed:
            return picked
        codecs, stored_lens = encoded
        with self.cat.read() as txn:
            for i, codec, stored_len in zip(changed, codecs, stored_lens):
                cid = ids[16 * i:16 * i + 16]
                clen = min(cs, length - i * cs)
                st.changed += clen
                st.changed_chunks += 1
                if cid in self.pending or txn.has_chunk(cid):
                    continue
                self.pending.add(cid)
                picked.append((cid, i * cs, stored_len, clen, codec, packstore.KIND_CHUNK))
        return picked

    def _index_pack(self, handed):
        """Make a finished pack durable, then index its chunks and segments at refcount 0 (one transaction)."""
        pack_id = handed.pack_id
        try:
            self.writer.wait(handed.last_write)
        except BaseException:
            os.close(handed.fd)
            raise
        self.repo.backend.sync_pack(pack_id, handed.fd)
        crashpoint("after-pack-fsync")
        dups = []
        live = 0
        with self.cat.write() as txn:
            for r in handed.records:
                if r.kind == packstore.KIND_CHUNK:
                    if txn.put_chunk(r.id, (pack_id, r.offset, r.stored_len, r.raw_len, r.codec, 0), overwrite=False):
                        live += 1
                        self.stats.added += r.stored_len
                        self.stats.added_chunks += 1
                        continue
                elif r.id in self.pending_segs and refs.index_segment(txn, r.id, self.pending_segs[r.id], pack_id,
                                                                       r.offset):
                    live += 1
                    continue
                dups.append(r)  # another process stored it first
            if live:
                txn.put_pack(pack_id, PackEntry(handed.size, len(handed.records)))
                # The records another process stored first go on the redo log in this transaction, so
                # a crash before the punching below leaves them to gc instead of leaking them. Nothing
                # ever named them, so no reader can be reading them (epoch 0).
                for r in dups:
                    txn.put_reclaim(pack_id, r.offset, packstore.RECORD.size + r.stored_len, 0)
        self.sealed.append(pack_id)
        for r in handed.records:
            self.pending.discard(r.id)
            self.pending_segs.pop(r.id, None)
        if not live:
            # Every record was stored first by another process (a clone snapshotted at the same
            # time): the pack holds nothing the index names, so it goes. A crash before this leaves
            # it unnamed in the index, which gc removes as an orphan.
            self.repo.packs.remove(pack_id)
        elif dups:
            for r in dups:
                self.repo.packs.punch(pack_id, r.offset, packstore.RECORD.size + r.stored_len)
            with self.cat.write() as txn:
                for r in dups:
                    txn.delete_reclaim(pack_id, r.offset)
        crashpoint("after-pack-index")

    def _commit(self, seg_ids, img):
        """Store the snapshot's object, then count its map and mark it accomplished (one short transaction:
        its segments are indexed already). Fields someone else changed in the record meanwhile are kept."""
        st = self.stats
        sid = self.rec["SnapshotId"]
        done = {"Status": ACCOMPLISHED, "Progress": "100%", "LogicalBytes": st.logical, "ChangedBytes": st.changed,
                "ChangedChunks": st.changed_chunks, "AddedBytes": st.added, "AddedChunks": st.added_chunks}
        for _ in range(100):
            with self.cat.read() as txn:
                base = txn.snapshot(sid)
            if base is None:
                raise errors.CreateSnapshotFailed("(the snapshot's record was removed while it was created)")
            rec = {k: v for k, v in base.items() if k != "Pid"}
            rec.update(done, LastModifiedTime=now_iso())
            self.repo.backend.put_object("snapshots", sid, objects.encode_snapshot(rec, seg_ids))
            crashpoint("after-object")
            with self.cat.write() as txn:
                now = txn.snapshot(sid)
                if now is None or {k: v for k, v in now.items() if k != "Progress"} != \
                        {k: v for k, v in base.items() if k != "Progress"}:
                    continue  # edited between our read and this transaction: store the object again
                refs.add_map_refs(txn, seg_ids)
                txn.put_snapshot_map(sid, seg_ids)
                txn.put_snapshot(rec)
                disk = txn.disk(self.disk_id)
                if disk is not None:
                    disk["Size"] = img.size
                    txn.put_disk(disk)
            self.rec = rec
            return
        raise errors.CreateSnapshotFailed("(the snapshot's record kept changing while it was committed)")

    # --- progress and failure ------------------------------------------------------------------------
    def _report(self, total):
        if self.progress:
            self.progress(self.stats.scanned + self.skipped, total)
        now = time.monotonic()
        if now - self._last_progress >= PROGRESS_INTERVAL:
            self._last_progress = now
            size = self.rec["SourceDiskSize"] or 1
            value = f"{min(99, (self.stats.scanned + self.skipped) * 100 // size)}%"
            with self.cat.write() as txn:
                cur = txn.snapshot(self.rec["SnapshotId"])
                if cur is not None and cur["Status"] == PROGRESSING:
                    cur["Progress"] = value
                    txn.put_snapshot(cur)

    def _typed(self, exc, path):
        """The API error for what ended the create (errors.translate's table): an error of the repository's
        storage (a full disk is CreateSnapshot.NoSpace), or of reading the image."""
        if isinstance(exc, _native.ShortRead):
            return errors.ImageChanged(f"({path} shrank while it was read)")
        if isinstance(exc, OSError):
            repo_path = os.path.abspath(self.repo.path)
            ours = exc.filename and os.path.commonpath([os.path.abspath(str(exc.filename)), repo_path]) == repo_path
            if ours or exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return errors.translate(exc, "the repository", op="create")
            return errors.translate(OSError(exc.errno, exc.strerror, exc.filename or path), op="scan-image")
        if isinstance(exc, errors.BlocksnapError):
            return errors.translate(exc, op="create")
        return exc  # KeyboardInterrupt, signals and programming errors go up as they are

    def _fail(self, exc, repo_lock):
        """Mark the snapshot failed and give back what it wrote, as far as that is safe now."""
        if self.writer is not None:
            self.writer.abort()
            for pack_id in self.writer.written:
                if pack_id not in self.sealed:
                    self.repo.packs.remove(pack_id)  # never indexed: nobody else can know it
        settled = False
        try:
            sid = self.rec["SnapshotId"]
            with self.cat.read() as txn:
                cur = txn.snapshot(sid)
            if cur is None or cur["Status"] != ACCOMPLISHED:
                # The commit did not happen: an object stored for it would make readers (and repair) take
                # the snapshot for accomplished once its data is reclaimed below.
                self.repo.backend.delete_object("snapshots", sid)
            with self.cat.write() as txn:
                rec = txn.snapshot(sid)
                if rec is not None and rec["Status"] == PROGRESSING:
                    if self.vanished:  # as the cloud drops a creating snapshot of a released disk: no record
                        txn.delete_snapshot(rec)
                        release_token(txn, rec)
                    else:
                        mark_failed(rec, exc)
                        txn.put_snapshot(rec)
                        self.rec = rec
            settled = True
        except (errors.BlocksnapError, OSError):
            pass  # the record stays progressing; readers see its lock gone and call it failed
        if not self.sealed or not settled:
            # Unsettled, its object may still be in the store: the reclaim below would not count its map
            # (its disk lock is still held), and could take data that readers will call accomplished.
            # gc settles dead creates before its mark, and reclaims this later.
            return
        # What this create indexed is unreferenced now: its packs' trailers list it.
        segs, chunks = [], []
        for pack_id in self.sealed:
            try:
                for r in packstore.read_trailer(self.repo.backend, pack_id):
                    (segs if r.kind == packstore.KIND_SEGMENT else chunks).append(r.id)
            except (errors.BlocksnapError, OSError):
                continue  # gc finds it
        repo_lock.release()  # our own shared lock would block the exclusive one
        try:
            refs.reclaim(self.repo, dead_segments=segs, dead_chunks=chunks)
        except (errors.BlocksnapError, OSError):
            pass  # gc reclaims it later
