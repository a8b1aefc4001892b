"""Restoring and verifying snapshots.

Restore writes a snapshot's guest view to a new sparse file (zero chunks
become holes), or in place into an existing file or block device (zero
chunks are punched, or written as zeros where punching is not possible).
Every chunk is checked against its id as it is read. Two worker threads
each hand batches of 32 chunks to the C core (bs_restore_chunks), which
reads, checks, decodes, verifies and writes them without the GIL.

Verify re-reads stored chunks through the same C checks (record header,
decoding, XXH3-128 against the id) without writing, then names every
snapshot and offset a bad chunk affects.
"""
import concurrent.futures
import errno
import os
import stat
import threading

import lmdb

from . import _native, errors
from .repository import ACCOMPLISHED, ZERO_ID, map_lmdb_error
from .store.chunks import fsync_dir

BATCH_CHUNKS = 32
_tls = threading.local()
RESTORE_WINDOW = 4096  # chunks located and ordered by pack at a time
SPARSE_BLOCK = 4096


def _locate(repo, txn, ids, first, count, include_zero=True):
    """Index entries for chunks ``first .. first+count`` of a map: ``(index, id, entry)``.

    Zero chunks come as ``(index, ZERO_ID, None)`` when ``include_zero``, else not at all; the C
    core finds the non-zero ids, so a huge sparse map costs no Python loop over its holes.
    """
    nonzero = _native.nonzero_ids(ids[16 * first:16 * (first + count)])
    out = []
    if include_zero:
        present = set(nonzero)
        out = [(first + j, ZERO_ID, None) for j in range(count) if j not in present]
    for j in nonzero:
        i = first + j
        cid = ids[16 * i:16 * i + 16]
        entry = repo.catalog.get_chunk(txn, cid)
        if entry is None:
            raise errors.RepositoryDamaged(f"chunk {cid.hex()} at offset {i * repo.chunk_size} is not in the index")
        out.append((i, cid, entry))
    return out


def restore_snapshot(repo, snapshot_id, output, in_place=False, progress=None, sync=False, on_wait=None):
    """Write a snapshot's image to ``output``.

    Args:
        output: a path. A new file is created sparse. An existing block device is
            written in place; an existing regular file only with ``in_place``.
        progress: optional callable(done_bytes, total_bytes).
        sync: fsync the output before returning (like ``cp``, ``qemu-img convert`` and
            ``restic restore``, the default leaves write-back to the kernel).
    Returns:
        dict with RestoredBytes (data written) and Size.
    Raises:
        InvalidSnapshotIdNotFound, IncorrectSnapshotStatus, OutputExists, RestoreFailed,
        RepositoryDamaged (a chunk failed its check; the output is then incomplete).
    """
    def accomplished(txn=None):
        rec = repo.get_snapshot(snapshot_id, txn)
        if rec["Status"] != ACCOMPLISHED:
            raise errors.IncorrectSnapshotStatus(f"(snapshot {snapshot_id} is {rec['Status']})")
        return rec

    accomplished()  # fail fast, before waiting for a running gc
    lock = repo.lock_shared(on_wait)
    try:
        # Again under the lock, in the transaction that reads the map: a delete may have come between.
        with repo.catalog.read() as txn:
            size = accomplished(txn)["SourceDiskSize"]
            ids = repo.snapshot_map(snapshot_id, txn)
        fd, fresh, unnamed = _open_output(output, in_place, size)
        done = False
        try:
            written = _restore_into(repo, fd, fresh, ids, size, progress)
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
    except lmdb.Error as exc:
        raise map_lmdb_error(exc) from exc
    finally:
        lock.release()
        repo.packs.release_ended_threads()
    return {"SnapshotId": snapshot_id, "Output": output, "Size": size, "RestoredBytes": written}


def _open_output(output, in_place, size):
    """``(fd, fresh, unnamed)`` for the output. A new file is made without a name where the file system
    allows it (O_TMPFILE) and named only once it is complete (``_name_output``): a restore that fails or
    is killed leaves no file that looks like a restored image. Elsewhere it is created under its name
    and removed if the restore fails."""
    if output.endswith(os.sep) or os.path.basename(output) in ("", ".", ".."):
        raise errors.RestoreFailed(f"({output} names a directory; give the path of a file or a block device)")
    if os.path.islink(output) and not os.path.exists(output):
        raise errors.RestoreFailed(f"({output} is a symlink to {os.readlink(output)}, which does not exist)")
    try:
        st = os.stat(output)
    except FileNotFoundError:
        st = None
    try:
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
        raise errors.RestoreFailed(f"({output}: {exc.strerror})") from exc
    if not stat.S_ISREG(st.st_mode):  # --in-place cannot help: say what it is
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "neither a regular file nor a block device"
        raise errors.RestoreFailed(f"({output} is {kind}; give the path of a new file, an existing file with "
                                   "--in-place, or a block device)")
    raise errors.OutputExists(f"({output})")


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
    """A pack's descriptor; OSError means the pack is missing or unreadable (damage).

    Raises:
        RepositoryError when the process or system is out of descriptors or memory: that says
        nothing about the repository.
    """
    try:
        return repo.packs.fd(pack_id)
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
            raise errors.RepositoryError(f"(cannot open pack {pack_id.hex()}: {exc.strerror})") from None
        raise


def _restorer(chunk_size):
    """This thread's C restore state (zstd context and buffers) for chunks of ``chunk_size``."""
    restorer = getattr(_tls, "restorer", None)
    if restorer is None or restorer.chunk_size != chunk_size:
        restorer = _tls.restorer = _native.Restorer(chunk_size)
        restorer.chunk_size = chunk_size
    return restorer


def _restore_into(repo, fd, fresh, ids, size, progress):
    cs = repo.chunk_size
    n = len(ids) // 16
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
            pack_id, rec_off, stored, raw, codec = entry[:5]
            try:
                pack_fd = _pack_fd(repo, pack_id)
            except OSError as exc:
                raise errors.RepositoryDamaged(f"chunk at offset {off}: pack {pack_id.hex()}: {exc.strerror}") from None
            items.append((pack_fd, rec_off, stored, raw, codec, cid, off))
            done += clen
        try:
            # One C call reads, checks, decodes, verifies and writes the whole batch without the GIL. A
            # fresh file keeps holes for zero blocks inside chunks too; in place, every byte is written.
            restorer.restore(items, fd, SPARSE_BLOCK if fresh else 0)
        except _native.RestoreDamage as exc:
            pack_fd, rec_off, _, _, _, cid, off = items[exc.index]
            raise errors.RepositoryDamaged(f"chunk {cid.hex()} at offset {off} (record at {rec_off} of its pack): "
                                           f"{exc.problem}") from None
        return done

    # The map is taken a window at a time; inside a window, chunks are read in pack order (each pack
    # opened once, its records read front to back), which keeps a restore from a repository built by
    # a long chain of small incrementals as fast as from one written at once. Memory stays bounded
    # by the window, whatever the image size.
    written = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="blocksnap-restore") as pool:
        pending = []
        with repo.catalog.read() as txn:
            for first in range(0, n, RESTORE_WINDOW):
                located = _locate(repo, txn, ids, first, min(RESTORE_WINDOW, n - first), include_zero=not fresh)
                located.sort(key=lambda t: (b"", 0) if t[2] is None else (t[2][0], t[2][1]))
                for k in range(0, len(located), BATCH_CHUNKS):
                    pending.append(pool.submit(work, located[k:k + BATCH_CHUNKS]))
                    if len(pending) >= 4:
                        written += pending.pop(0).result()
                if progress:
                    progress(min(size, (first + RESTORE_WINDOW) * cs), size)
        for fut in pending:
            written += fut.result()
    if progress:
        progress(size, size)
    return written


def verify(repo, snapshot_id=None, progress=None, on_wait=None):
    """Re-read and check every stored chunk (of one snapshot, or of the repository).

    Returns:
        dict: Checked (chunks), CheckedBytes, Damaged: list of {ChunkId, Problem,
        Affected: [{SnapshotId, Offsets}]}, Problems (catalog-level findings).
    Raises:
        InvalidSnapshotIdNotFound.
    """
    cat = repo.catalog
    problems = []
    lock = repo.lock_shared(on_wait)
    try:
        with cat.read() as txn:
            if snapshot_id is not None:
                rec = repo.get_snapshot(snapshot_id, txn)
                snaps = [rec] if rec["Status"] == ACCOMPLISHED else []
            else:
                snaps = [r for r in cat.iter_json(txn, "snapshots") if r["Status"] == ACCOMPLISHED]
            wanted = {}
            maps = {}
            for rec in snaps:
                try:
                    ids = repo.snapshot_map(rec["SnapshotId"], txn)
                except errors.RepositoryDamaged as exc:
                    problems.append({"SnapshotId": rec["SnapshotId"], "Problem": str(exc)})
                    continue
                maps[rec["SnapshotId"]] = ids
                for i in _native.nonzero_ids(ids):
                    cid = ids[16 * i:16 * i + 16]
                    if cid not in wanted:
                        wanted[cid] = cat.get_chunk(txn, cid)
            if snapshot_id is None:
                problems.extend(_check_refcounts(repo, txn, maps))
        bad = {}
        todo = sorted(((e, cid) for cid, e in wanted.items() if e is not None), key=lambda t: (t[0][0], t[0][1]))
        for cid, e in wanted.items():
            if e is None:
                bad[cid] = "missing from the index"
        total = sum(e[3] for e, _ in todo)
        done = 0

        batches = [todo[k:k + BATCH_CHUNKS] for k in range(0, len(todo), BATCH_CHUNKS)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="blocksnap-verify") as pool:
            for problems_of_batch, raw in pool.map(lambda b: _check_batch(repo, b), batches):
                done += raw
                bad.update(problems_of_batch)
                if progress:
                    progress(done, total)
    finally:
        lock.release()
        repo.packs.release_ended_threads()
    damaged = []
    for cid, problem in sorted(bad.items()):
        affected = []
        for sid, ids in maps.items():
            offs = [j // 16 * repo.chunk_size for j in range(0, len(ids), 16) if ids[j:j + 16] == cid]
            if offs:
                affected.append({"SnapshotId": sid, "Offsets": offs})
        damaged.append({"ChunkId": cid.hex(), "Problem": problem, "Affected": affected})
    return {"Checked": len(todo), "CheckedBytes": sum(e[3] for e, _ in todo), "Damaged": damaged,
            "Problems": problems, "Snapshots": len(maps)}


def _check_batch(repo, batch):
    """Check stored chunks ``[(entry, chunk_id)]`` with the restore path's C checks, writing nothing.

    Returns:
        ``({chunk_id: problem}, raw bytes checked)``; a damaged chunk does not stop the batch.
    """
    restorer = _restorer(repo.chunk_size)
    bad, items, where = {}, [], []
    for entry, cid in batch:
        pack_id, rec_off, stored, raw, codec = entry[:5]
        try:
            pack_fd = _pack_fd(repo, pack_id)
        except OSError as exc:
            bad[cid] = f"pack {pack_id.hex()}: {exc.strerror}"
            continue
        items.append((pack_fd, rec_off, stored, raw, codec, cid, 0))
        where.append(f"pack {pack_id.hex()} offset {rec_off}")
    start = 0
    while start < len(items):
        try:
            restorer.restore(items[start:], -1, 0)
            break
        except _native.RestoreDamage as exc:
            k, problem = start + exc.index, exc.problem
        except OSError as exc:
            k, problem = start + exc.index, exc.strerror
        bad[items[k][5]] = f"{where[k]}: {problem}"
        start = k + 1
    return bad, sum(entry[3] for entry, _ in batch)


def _check_refcounts(repo, txn, maps):
    """Recount segment and chunk references from the snapshot maps; report every difference."""
    cat = repo.catalog
    seg_refs = repo.segment_uses(txn, maps)
    chunk_refs = {}
    out = []
    with txn.cursor(db=cat.db["segments"]) as cur:
        for key, val in cur:
            rc = int.from_bytes(val[:4], "big")
            if seg_refs.get(key, 0) != rc:
                out.append({"Segment": key.hex(), "Problem": f"refcount {rc}, referenced {seg_refs.get(key, 0)} times"})
            ids = val[4:]
            for j in range(0, len(ids), 16):
                c = ids[j:j + 16]
                if c != ZERO_ID:
                    chunk_refs[c] = chunk_refs.get(c, 0) + 1
    with txn.cursor(db=cat.db["chunks"]) as cur:
        for key, val in cur:
            rc = int.from_bytes(val[-4:], "big")
            expected = chunk_refs.get(key, 0)
            if rc != expected:
                out.append({"ChunkId": key.hex(), "Problem": f"refcount {rc}, referenced {expected} times"})
    return out
