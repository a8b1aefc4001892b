"""Creating a snapshot: scan, deduplicate, store, commit.

Pipeline (docs/FORMAT.md, "Write ordering"):
  1. one write transaction registers the snapshot as ``progressing``;
  2. two scanner threads run the C core over 4 MiB windows of the image
     (read, holes, zero detection, XXH3-128, comparison with the parent map,
     zstd of the changed chunks in place) with the GIL released, while the
     calling thread picks the chunks the repository lacks and a writer
     thread appends them to a pack;
  3. each full pack is fsynced, then indexed (refcount 0) in one transaction;
  4. if the image is unchanged since it was opened, one transaction stores
     the map segments, takes the references and marks the snapshot
     ``accomplished``. Any failure marks it ``failed``.
A crash anywhere leaves committed snapshots intact; what the dead create
wrote is unreferenced and gc (or the next failed-create cleanup) reclaims it.
"""
import errno
import os
import queue
import threading
import time

import lmdb

from . import _native, errors
from .image.raw import RawImage
from .repository import (
    ACCOMPLISHED,
    FAILED,
    PROGRESSING,
    crashpoint,
    map_lmdb_error,
    mark_failed,
    new_id,
    now_iso,
    split_segments,
)
from .store import chunks as chunkstore
from .store import meta

WINDOW_BYTES = 4 << 20
BUFFERS = 8  # windows in flight: bounds memory at BUFFERS * WINDOW_BYTES
SCANNERS = 2
_FRESH = object()  # in the free-buffer queue: a buffer not made yet
PROGRESS_INTERVAL = 0.5  # seconds between Progress updates other processes can see


class _Stats:
    def __init__(self):
        self.logical = 0
        self.changed = 0
        self.changed_chunks = 0
        self.added = 0
        self.added_chunks = 0
        self.scanned = 0


def find_parent(repo, txn, disk_id):
    """The newest accomplished snapshot record of a disk, or None."""
    cat = repo.catalog
    prefix = disk_id.encode()
    with txn.cursor(db=cat.db["disk_snaps"]) as cur:
        if not cur.set_range(prefix + b"\xff" * 8):
            cur.last()
        else:
            cur.prev()
        while cur.key() and cur.key().startswith(prefix):
            rec = cat.get_json(txn, "snapshots", cur.value())
            if rec and rec["Status"] == ACCOMPLISHED:
                return rec
            if not cur.prev():
                break
    return None


def create_snapshot(repo, disk_id, fields, client_token=None, params_hash=None, progress=None, on_wait=None):
    """Create a snapshot of a registered disk; returns its accomplished record.

    Args:
        repo: an open Repository.
        disk_id: the DiskId.
        fields: validated SnapshotName / Description / RetentionDays / Tags.
        client_token, params_hash: idempotency (api.py validated them).
        progress: optional callable(done_bytes, total_bytes).
        on_wait: called once, with no arguments, if a running gc makes the create wait.
    Raises:
        IncorrectDiskStatusCreatingSnapshot, InvalidDiskIdNotFound, ImageNotFound,
        ImageUnreadable, ImageChanged, NoSpace, CreateSnapshotFailed.
    """
    disk_lock = repo.disk_lock(disk_id)
    repo.get_disk(disk_id)
    repo_lock = repo.lock_shared(on_wait)  # waits while gc runs or waits to run
    try:
        if not disk_lock.acquire(exclusive=True, blocking=False):
            raise errors.IncorrectDiskStatusCreatingSnapshot(f"({disk_id})")
        job = _Create(repo, disk_id, fields, client_token, params_hash, progress)
        return job.run(repo_lock)
    finally:
        disk_lock.release()
        repo_lock.release()


class _Create:
    def __init__(self, repo, disk_id, fields, client_token, params_hash, progress):
        self.repo = repo
        self.cat = repo.catalog
        self.disk_id = disk_id
        self.fields = fields
        self.client_token = client_token
        self.params_hash = params_hash
        self.progress = progress
        self.cs = repo.chunk_size
        self.stats = _Stats()
        self.writer = None  # made when data is about to flow: it owns an I/O thread and 8 MiB of buffers
        self.pending = set()  # ids in the unsealed pack
        self.indexed = []  # ids this create indexed (refcount 0 until commit)
        self.sealed = set()  # packs this create indexed
        self.rec = None
        self.skipped = 0  # bytes of whole-window holes never handed to the C core
        self._last_progress = 0.0

    # --- the phases ----------------------------------------------------------------------------------
    def run(self, repo_lock):
        disk = self.repo.get_disk(self.disk_id)
        with RawImage(disk["Path"]) as img:
            try:
                self.rec, parent = self._register(img)
            except lmdb.Error as exc:
                raise map_lmdb_error(exc) from exc
            if self.rec.get("_existing"):
                del self.rec["_existing"]
                return self.rec
            try:
                new_map = self._scan_and_store(img, parent)
                if not img.unchanged():
                    raise errors.ImageChanged(f"({disk['Path']})")
                crashpoint("before-commit")
                self._commit(new_map, img)
                crashpoint("after-commit")
            except BaseException as exc:
                typed = self._typed(exc, disk["Path"])
                self._fail(typed, repo_lock)
                if typed is exc:
                    raise
                raise typed from exc
        return self.rec

    def _register(self, img):
        cat = self.cat
        with cat.write() as txn:
            if self.client_token:
                prev = cat.get_json(txn, "tokens", self.client_token)
                if prev is not None:
                    if prev["ParamsHash"] != self.params_hash:
                        raise errors.IdempotentParameterMismatch()
                    rec = cat.get_json(txn, "snapshots", prev["SnapshotId"])
                    if rec is not None and rec["Status"] != FAILED:
                        rec["_existing"] = True
                        return rec, None
                    # a failed first attempt: this retry takes the token over
            # Holding the disk lock, any progressing record of this disk is a dead create's.
            for old in list(self.repo.disk_snapshots(txn, self.disk_id)):
                if old["Status"] == PROGRESSING:
                    mark_failed(old, errors.CreateSnapshotFailed(
                        f"(the creating process, pid {old.get('Pid')}, ended before it finished)"))
                    cat.put_json(txn, "snapshots", old["SnapshotId"], old)
            prefix = self.disk_id.encode()
            parent = find_parent(self.repo, txn, self.disk_id)
            seq = cat.next_seq(txn)
            sid = new_id("s-")
            now = time.time()
            rec = dict(self.fields)
            rec.update({
                "SnapshotId": sid, "Seq": seq, "SourceDiskId": self.disk_id, "SourceDiskSize": img.size,
                "SourceDiskType": img.kind, "Status": PROGRESSING, "Progress": "0%",
                "CreationTime": now_iso(now), "LastModifiedTime": now_iso(now),
                "ParentSnapshotId": parent["SnapshotId"] if parent else None, "Pid": os.getpid(),
                "ChunkSize": self.cs,
            })
            if rec.get("RetentionDays"):
                rec["ExpiredTime"] = now_iso(now + rec["RetentionDays"] * 86400)
            if self.client_token:
                rec["ClientToken"] = self.client_token
                cat.put_json(txn, "tokens", self.client_token,
                             {"ParamsHash": self.params_hash, "SnapshotId": sid})
            cat.put_json(txn, "snapshots", sid, rec)
            txn.put(prefix + meta.U64.pack(seq), sid.encode(), db=cat.db["disk_snaps"])
            parent_map = self.repo.snapshot_map(parent["SnapshotId"], txn) if parent else b""
        return rec, parent_map

    def _scan_and_store(self, img, parent_map):
        """Run the pipeline over the whole image; returns the new chunk map.

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
        new_map = bytearray(16 * -(-img.size // cs))
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
            scanner = _native.Scanner(cs, per_window)
            codec = _native.Codec(chunkstore.ZSTD_LEVEL, chunkstore.ZSTD_HASH_LOG)
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
                ids, flags, changed = scanner.scan(img.fd, off, length, buf,
                                                   parent_map[16 * k:16 * (k + per_window)])
                if not img.unchanged():
                    raise errors.ImageChanged(f"({img.path} changed while it was read)")
                # Compress the changed chunks here too, in place, still without the GIL.
                encoded = codec.encode_chunks(buf, length, cs, changed, chunkstore.INCOMPRESSIBLE_MILLIBITS)
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
                    self.writer.wait(handed[4])
                except OSError:
                    pass  # the create is failing already
                finally:
                    os.close(handed[1])

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
                k = off // cs
                new_map[16 * k:16 * k + len(ids)] = ids
                picked = self._pick_new_chunks(length, ids, flags, changed, encoded)
                # The C core copies the records into its staging buffers (GIL released) and its I/O
                # thread writes them; the window's buffer is free again as soon as this returns.
                if picked and self.writer.add_many(buf, picked):
                    to_seal.put(self.writer.detach())
                free.put(buf)
                self.stats.scanned += length
                self._report(img.size)
                crashpoint("mid-scan")
            if not stop.is_set():
                handed = self.writer.detach()
                if handed is not None:
                    to_seal.put(handed)
        except BaseException:
            stop.set()
            raise
        finally:
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
        return bytes(new_map)

    def _data_windows(self, img, window):
        """Windows ``(offset, length)`` that hold data; whole windows inside holes are skipped here.

        Their map entries stay zero (holes), so a sparse 1 TiB image costs the C core only its
        data. Skipped bytes count as scanned for Progress. Not thread-safe: callers hold a lock.
        """
        size, off = img.size, 0
        while off < size:
            try:
                data = os.lseek(img.fd, off, os.SEEK_DATA)
                hole = os.lseek(img.fd, data, os.SEEK_HOLE)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # nothing but a hole up to the end
                    data = hole = size
                else:  # no SEEK_DATA here (a block device): everything is data
                    data, hole = off, size
            start = max(off, data // window * window)
            end = min(size, -(-min(hole, size) // window) * window)
            self.skipped += start - off  # only this generator writes it
            for w in range(start, end, window):
                yield w, min(window, size - w)
            off = max(end, start + window) if end <= start else end

    def _pick_new_chunks(self, length, ids, flags, changed, encoded):
        """Count a scanned window; returns the records of its chunks the repository lacks.

        Returns:
            ``[(chunk_id, offset_in_window, stored_len, raw_len, codec)]`` for ``PackWriter.add_many``.
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
                if cid in self.pending or self.cat.get_chunk(txn, cid) is not None:
                    continue
                self.pending.add(cid)
                picked.append((cid, i * cs, stored_len, clen, codec))
        return picked

    def _index_pack(self, handed):
        """Make a finished pack durable, then index its chunks at refcount 0 (one transaction)."""
        pack_id, fd, size, records, last_write = handed
        try:
            self.writer.wait(last_write)
        except BaseException:
            os.close(fd)
            raise
        self.repo.packs.make_durable(pack_id, fd)
        crashpoint("after-pack-fsync")
        dups = []
        with self.cat.write() as txn:
            live = 0
            for cid, offset, stored, raw, codec in records:
                if self.cat.put_chunk(txn, cid, (pack_id, offset, stored, raw, codec, 0), overwrite=False):
                    live += 1
                    self.indexed.append(cid)
                    self.stats.added += stored
                    self.stats.added_chunks += 1
                else:
                    dups.append((offset, stored))  # another process stored it first
            if live:
                self.cat.put_pack(txn, pack_id, live, size)
                # The records another process stored first go on the redo log in this transaction, so
                # a crash before the punching below leaves them to gc instead of leaking them.
                dup_keys = [pack_id + meta.U64.pack(off) for off, _ in dups]
                for key, (_, stored) in zip(dup_keys, dups):
                    txn.put(key, meta.U64.pack(stored + chunkstore.RECORD.size), db=self.cat.db["reclaim"])
        self.sealed.add(pack_id)
        for cid, *_ in records:
            self.pending.discard(cid)
        if not live:
            # Every record was stored first by another process (a clone snapshotted at the same
            # time): the pack holds nothing the index names, so it goes. A crash before this leaves
            # it unnamed in the index, which gc removes as an orphan.
            self.repo.packs.remove(pack_id)
        elif dups:
            for offset, stored in dups:
                self.repo.packs.punch(pack_id, offset, stored + chunkstore.RECORD.size)
            with self.cat.write() as txn:
                for key in dup_keys:
                    txn.delete(key, db=self.cat.db["reclaim"])
        crashpoint("after-pack-index")

    def _commit(self, new_map, img):
        st = self.stats
        with self.cat.write() as txn:
            seg_blob = self.repo.add_map_refs(txn, split_segments(new_map))
            txn.put(self.rec["SnapshotId"].encode(), seg_blob, db=self.cat.db["snapmaps"])
            self.rec.update({
                "Status": ACCOMPLISHED, "Progress": "100%", "LastModifiedTime": now_iso(),
                "LogicalBytes": st.logical, "ChangedBytes": st.changed, "ChangedChunks": st.changed_chunks,
                "AddedBytes": st.added, "AddedChunks": st.added_chunks,
            })
            self.rec.pop("Pid", None)
            self.cat.put_json(txn, "snapshots", self.rec["SnapshotId"], self.rec)
            disk = self.cat.get_json(txn, "disks", self.disk_id)
            disk["Size"] = img.size
            self.cat.put_json(txn, "disks", self.disk_id, disk)

    # --- progress and failure ------------------------------------------------------------------------
    def _report(self, total):
        if self.progress:
            self.progress(self.stats.scanned + self.skipped, total)
        now = time.monotonic()
        if now - self._last_progress >= PROGRESS_INTERVAL:
            with self.cat.write() as txn:
                self._progress_record(txn)

    def _progress_record(self, txn):
        self._last_progress = time.monotonic()
        size = self.rec["SourceDiskSize"] or 1
        self.rec["Progress"] = f"{min(99, (self.stats.scanned + self.skipped) * 100 // size)}%"
        cur = self.cat.get_json(txn, "snapshots", self.rec["SnapshotId"])
        if cur is not None:
            cur["Progress"] = self.rec["Progress"]
            self.cat.put_json(txn, "snapshots", self.rec["SnapshotId"], cur)

    def _typed(self, exc, path):
        if isinstance(exc, errors.BlocksnapError):
            return exc
        if isinstance(exc, _native.ShortRead):
            return errors.ImageChanged(f"({path} shrank while it was read)")
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return errors.NoSpace()
        if isinstance(exc, lmdb.Error):
            return map_lmdb_error(exc)
        if isinstance(exc, OSError):
            return errors.CreateSnapshotFailed(f"({exc.strerror}: {exc.filename or path})")
        return exc  # KeyboardInterrupt and programming errors go up as they are

    def _fail(self, exc, repo_lock):
        """Mark the snapshot failed and give back what it wrote, as far as that is safe now."""
        if self.writer is not None:
            self.writer.abort()
            for pack_id in self.writer.written:
                if pack_id not in self.sealed:
                    self.repo.packs.remove(pack_id)  # never indexed: nobody else can know it
        try:
            with self.cat.write() as txn:
                rec = self.cat.get_json(txn, "snapshots", self.rec["SnapshotId"])
                if rec is not None:
                    mark_failed(rec, exc)
                    self.cat.put_json(txn, "snapshots", rec["SnapshotId"], rec)
                    self.rec = rec
        except lmdb.Error:
            pass  # the record stays progressing; readers see its lock gone and call it failed
        if not self.indexed:
            return
        repo_lock.release()  # our own shared lock would block our exclusive one
        excl = self.repo.repo_lock()
        try:
            if excl.acquire(exclusive=True, blocking=False):
                self.repo.reclaim_dead(self.indexed)
        except (OSError, lmdb.Error):
            pass  # gc reclaims it later
        finally:
            excl.release()
