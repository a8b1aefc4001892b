"""Restoring snapshots.

Restore writes a snapshot's guest view to a new sparse file (zero chunks
become holes), or in place into an existing file or block device (zero
chunks are punched, or written as zeros where punching is not possible).
The map is read a window of segments at a time, each segment checked
against its id and each index entry against its checksum before a byte of
that window is written; two worker threads each hand batches of 32 chunks
to the C core (bs_restore_chunks), which reads, checks, decodes, verifies
the chunk's hash and writes without the GIL. Memory does not grow with the
image. A restore registers as a reader (``Repository.reader``): it never
waits for gc, and nothing it can see is removed while it runs.
"""
import concurrent.futures
import errno
import os
import stat
import threading

from . import _native, errors, interrupts
from .image import sinks
from .repository import ACCOMPLISHED, ZERO_ID
from .store.backend import fsync_dir
from .store.config import SEGMENT_CHUNKS
from .store.packs import KIND_CHUNK

BATCH_CHUNKS = 32
_tls = threading.local()
RESTORE_WINDOW = 16 * SEGMENT_CHUNKS  # chunks located and ordered by pack at a time


def window_ids(txn, seg_ids, first_seg, n_segs, n_chunks):
    """The chunk ids of segments ``first_seg .. first_seg+n_segs`` of a map (checked), as one bytes object.

    Raises:
        CatalogDamaged: a segment is missing or does not hash to its id.
    """
    parts = []
    for s in range(first_seg, first_seg + n_segs):
        sid = seg_ids[16 * s:16 * s + 16]
        count = min(SEGMENT_CHUNKS, n_chunks - s * SEGMENT_CHUNKS)
        if sid == ZERO_ID:
            parts.append(bytes(16 * count))
            continue
        seg = txn.segment(sid)
        if seg is None:
            raise errors.CatalogDamaged(f"(map segment {sid.hex()} is not in the index)")
        if len(seg.ids) != 16 * count:
            raise errors.CatalogDamaged(f"(map segment {sid.hex()} holds {len(seg.ids) // 16} ids where the map "
                                        f"needs {count})")
        parts.append(seg.ids)
    return b"".join(parts)


def locate(txn, ids, first, chunk_size, include_zero=True):
    """Index entries for the chunks of ``ids`` (16 bytes each; chunk ``first`` first): ``(index, id, entry)``.

    Zero chunks come as ``(index, ZERO_ID, None)`` when ``include_zero``, else not at all; the C
    core finds the non-zero ids, so a huge sparse map costs no Python loop over its holes.

    Raises:
        RepositoryDamaged: a chunk is not in the index; CatalogDamaged: its entry is damaged.
    """
    count = len(ids) // 16
    nonzero = _native.nonzero_ids(ids)
    out = []
    if include_zero:
        present = set(nonzero)
        out = [(first + j, ZERO_ID, None) for j in range(count) if j not in present]
    for j in nonzero:
        cid = ids[16 * j:16 * j + 16]
        entry = txn.chunk(cid)
        if entry is None:
            raise errors.RepositoryDamaged(f"(chunk {cid.hex()} at offset {(first + j) * chunk_size} is not in "
                                           "the index)")
        out.append((first + j, cid, entry))
    return out


def restore_snapshot(repo, snapshot_id, output, in_place=False, progress=None, sync=False, on_wait=None,
                     format="raw", compress=False):
    """Write a snapshot's image to ``output``.

    Args:
        output: a path. A new file is created sparse. An existing block device is
            written in place; an existing regular file only with ``in_place``.
        format: "raw", or "qcow2" (a new qcow2 v3 file: only clusters with data are allocated;
            an existing file or device is refused, in place or not).
        compress: qcow2 only: store clusters zstd-compressed where that shrinks them.
        progress: optional callable(done_bytes, total_bytes).
        sync: fsync the output before returning (like ``cp``, ``qemu-img convert`` and
            ``restic restore``, the default leaves write-back to the kernel).
        on_wait: kept for the API; a restore never waits.
    Returns:
        dict with RestoredBytes (data written) and Size.
    Raises:
        InvalidSnapshotIdNotFound, IncorrectSnapshotStatus, OutputExists, RestoreFailed,
        RepositoryDamaged (a chunk or the catalog failed its check; the output is then not named,
        or, written in place, incomplete).
    """
    def accomplished(txn=None):
        rec = repo.get_snapshot(snapshot_id, txn)
        if rec["Status"] != ACCOMPLISHED:
            raise errors.IncorrectSnapshotStatus(f"(snapshot {snapshot_id} is {rec['Status']})")
        return rec

    accomplished()  # fail fast
    hold = repo.reader()
    try:
        # Again as a registered reader: a delete may have come between.
        with repo.catalog.read() as txn:
            rec = accomplished(txn)
            seg_ids = repo.segment_ids(txn, rec)
        size = rec["SourceDiskSize"]
        if format == "qcow2":
            if in_place:
                raise errors.RestoreFailed("(a qcow2 restore writes a new file; --in-place is for raw outputs)")
            if os.path.lexists(output) and not os.path.isdir(output):
                raise errors.OutputExists(f"({output}: a qcow2 restore writes a new file and never overwrites one)")
        fd, fresh, unnamed = _open_output(output, in_place, size, truncate=format == "raw")
        done = False
        try:
            if format == "qcow2":
                sink = sinks.Qcow2Sink(fd, size, repo.chunk_size, compress=compress)
            else:
                sink = sinks.RawSink(fd, fresh)
            written = _restore_into(repo, sink, seg_ids, size, progress, snapshot_id)
            sink.finish()
            if sync:
                os.fsync(fd)
            if unnamed:
                _name_output(fd, output, sync)
            done = True
        except OSError as exc:
            raise errors.RestoreFailed(f"({output}: {exc.strerror})") from exc
        finally:
            os.close(fd)
            if fresh and not unnamed and not done:
                _unlink_quietly(output)  # no half-written file that looks like a restored image
    finally:
        if hold is not None:
            hold.release()
        repo.packs.release_ended_threads()
    return {"SnapshotId": snapshot_id, "Output": output, "Size": size, "RestoredBytes": written}


def _open_output(output, in_place, size, truncate=True):
    """``(fd, fresh, unnamed)`` for the output. A new file is made without a name where the file system
    allows it (O_TMPFILE) and named only once it is complete (``_name_output``): a restore that fails or
    is killed leaves no file that looks like a restored image. Elsewhere it is created under its name
    and removed if the restore fails."""
    if output.endswith(os.sep) or os.path.basename(output) in ("", ".", ".."):
        raise errors.RestoreFailed(f"({output} names a directory; give the path of a file or a block device)")
    if os.path.islink(output) and not os.path.exists(output):
        raise errors.RestoreFailed(f"({output} is a symlink to {os.readlink(output)}, which does not exist)")
    try:
        try:
            st = os.stat(output)
        except FileNotFoundError:
            st = None
        if st is None:
            try:
                fd = os.open(os.path.dirname(os.path.abspath(output)), os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC,
                             0o644)
                unnamed = True
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
                fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                unnamed = False
            try:
                if truncate:
                    os.ftruncate(fd, size)
            except OSError:
                os.close(fd)
                if not unnamed:
                    _unlink_quietly(output)
                raise
            return fd, True, unnamed
        if stat.S_ISBLK(st.st_mode):
            fd = os.open(output, os.O_WRONLY | os.O_CLOEXEC)
            dev_size = os.lseek(fd, 0, os.SEEK_END)
            if dev_size < size:
                os.close(fd)
                raise errors.RestoreFailed(f"({output} holds {dev_size} bytes, the snapshot {size})")
            return fd, False, False
        if stat.S_ISREG(st.st_mode) and in_place:
            fd = os.open(output, os.O_WRONLY | os.O_CLOEXEC)
            if st.st_size < size:
                os.ftruncate(fd, size)
            return fd, False, False
    except OSError as exc:
        raise _output_failed(output, exc) from exc
    if not stat.S_ISREG(st.st_mode):  # --in-place cannot help: say what it is
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "neither a regular file nor a block device"
        raise errors.RestoreFailed(f"({output} is {kind}; give the path of a new file, an existing file with "
                                   "--in-place, or a block device)")
    raise errors.OutputExists(f"({output})")


def _output_failed(output, exc):
    """RestoreFailed for an output path the OS refused, in one line that says why."""
    why = exc.strerror or str(exc)
    if exc.errno == errno.ENOTDIR:
        parent = os.path.dirname(output)
        while parent and not os.path.lexists(parent):  # up to the ancestor that exists: it is not a directory
            up = os.path.dirname(parent)
            parent = "" if up == parent else up
        if parent:
            why = f"{why}: {parent} is not a directory"
    elif exc.errno == errno.ENAMETOOLONG:
        longest = max(len(os.fsencode(name)) for name in output.split(os.sep))
        name_max = _name_max(output)
        if longest > name_max:
            why = f"{why}: a name in the path has {longest} bytes, the file system takes at most {name_max}"
        else:
            why = f"{why}: the path has {len(os.fsencode(output))} bytes, more than the system takes"
    shown = output if len(output) <= 120 else f"{output[:60]}...{output[-40:]} ({len(output)} characters)"
    return errors.RestoreFailed(f"({shown}: {why})")


def _name_max(output):
    """NAME_MAX of the file system the output would be on (its nearest existing ancestor's)."""
    parent = os.path.dirname(os.path.abspath(output))
    while True:
        try:
            return os.pathconf(parent, "PC_NAME_MAX")
        except OSError:
            if parent == os.path.dirname(parent):
                return 255
            parent = os.path.dirname(parent)


def _name_output(fd, output, sync):
    """Give the complete, unnamed output its name; OutputExists if something took the name meanwhile."""
    # linkat(2) of /proc/self/fd/N with AT_SYMLINK_FOLLOW; os.link takes that path only with a directory fd.
    proc_fd = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.link(str(fd), output, src_dir_fd=proc_fd, follow_symlinks=True)
    except FileExistsError:
        raise errors.OutputExists(f"({output} appeared while the restore ran; nothing was written to it)") from None
    finally:
        os.close(proc_fd)
    if sync:
        fsync_dir(os.path.dirname(os.path.abspath(output)))


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _zero_range(fd, off, length, can_punch, zeros):
    """Make ``[off, off+length)`` of an existing output read as zeros: punch it, else write zeros."""
    if can_punch[0]:
        try:
            _native.punch_hole(fd, off, length)
            return
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                pass  # a block device punches whole logical blocks only: this range (a tail) is not one
            elif exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.ENODEV):
                can_punch[0] = False
            else:
                raise
    os.pwrite(fd, zeros[:length], off)


def _pack_fd(repo, pack_id):
    """A pack's descriptor.

    Raises:
        StoreDamaged when the pack is missing or unreadable; RepositoryError when the process or system is
        out of descriptors or memory, which says nothing about the repository (errors.OP_TABLE, "read-pack").
    """
    try:
        return repo.packs.fd(pack_id)
    except OSError as exc:
        raise errors.translate(exc, f"pack {pack_id.hex()}", op="read-pack") from None


def _restorer(chunk_size):
    """This thread's C restore state (zstd context and buffers) for chunks of ``chunk_size``."""
    restorer = getattr(_tls, "restorer", None)
    if restorer is None or restorer.chunk_size != chunk_size:
        restorer = _tls.restorer = _native.Restorer(chunk_size)
        restorer.chunk_size = chunk_size
    return restorer


def _restore_into(repo, sink, seg_ids, size, progress, snapshot_id=None):
    cs = repo.chunk_size
    n = -(-size // cs)
    fd, fresh = sink.fd, sink.fresh
    can_punch = [not fresh]
    zeros = bytes(cs)

    def work(batch):
        restorer = _restorer(cs)
        items, done = [], 0
        for i, cid, entry in batch:
            off = i * cs
            clen = min(cs, size - off)
            if entry is None:
                if not fresh:
                    _zero_range(fd, off, clen, can_punch, zeros)
                continue
            try:
                pack_fd = _pack_fd(repo, entry.pack_id)
            except errors.StoreDamaged as exc:
                raise errors.StoreDamaged(f"(chunk at offset {off}: {exc.detail.strip('()')})") from None
            if entry.raw_len != clen:
                raise errors.CatalogDamaged(f"(chunk entry {cid.hex()} gives {entry.raw_len} bytes where offset "
                                            f"{off} needs {clen})")
            items.append((pack_fd, entry.offset, entry.stored_len, entry.raw_len, entry.codec, KIND_CHUNK, cid, off))
            done += clen
        try:
            sink.write(restorer, items)
        except _native.RestoreDamage as exc:
            pack_fd, rec_off, _, _, _, _, cid, off = items[exc.index]
            raise errors.RepositoryDamaged(f"(chunk {cid.hex()} at offset {off} (record at {rec_off} of its pack): "
                                           f"{exc.problem})") from None
        return done

    # The map is taken a window at a time; inside a window, chunks are read in pack order (each pack
    # opened once, its records read front to back), which keeps a restore from a repository built by
    # a long chain of small incrementals as fast as from one written at once. Memory stays bounded
    # by the window, whatever the image size.
    written = 0
    segs_per_window = RESTORE_WINDOW // SEGMENT_CHUNKS
    n_segs = len(seg_ids) // 16
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="blocksnap-restore")
    pending = []
    try:
        for s0 in range(0, n_segs, segs_per_window):
            count = min(segs_per_window, n_segs - s0)
            with repo.catalog.read() as txn:
                try:
                    ids = window_ids(txn, seg_ids, s0, count, n)
                    located = locate(txn, ids, s0 * SEGMENT_CHUNKS, cs, include_zero=not fresh)
                except errors.RepositoryDamaged:
                    # Each window is read in a transaction of its own: a delete that came between is not damage.
                    rec = txn.snapshot(snapshot_id) if snapshot_id else None
                    if snapshot_id and (rec is None or rec.get("Deleting")):
                        raise errors.RestoreFailed(f"(snapshot {snapshot_id} was deleted while it was restored)") \
                            from None
                    raise
            located.sort(key=lambda t: (b"", 0) if t[2] is None else (t[2].pack_id, t[2].offset))
            for k in range(0, len(located), BATCH_CHUNKS):
                pending.append(pool.submit(work, located[k:k + BATCH_CHUNKS]))
                if len(pending) >= 4:
                    written += pending.pop(0).result()
            if progress:
                progress(min(size, (s0 + count) * SEGMENT_CHUNKS * cs), size)
        for fut in pending:
            written += fut.result()
    finally:
        # On a failure or a signal, batches not started are dropped; the running ones (32 chunks) finish,
        # also when a second signal comes (the caller then closes and removes the output).
        with interrupts.deferred():
            pool.shutdown(wait=True, cancel_futures=True)
    if progress:
        progress(size, size)
    return written
