"""The only module that touches the cffi ``ffi``/``lib`` of the C core.

Typed wrappers over csrc/blocksnap.h: buffers go in through
``ffi.from_buffer`` (no copies), C status codes come out as exceptions.
cffi releases the GIL around every call, so a scan in one thread overlaps
with compression and writing in another.
"""
import errno as _errno
import os

from . import errors

try:
    from ._blocksnap_c import ffi, lib
except ImportError as exc:  # pragma: no cover - depends on the install
    raise errors.NativeMissing(f"({exc})") from exc

ABI_VERSION = 11
ID_LEN = lib.BS_ID_LEN
ZERO_ID = bytes(ID_LEN)

CHUNK_HOLE = lib.BS_CHUNK_HOLE
CHUNK_ZERO = lib.BS_CHUNK_ZERO
CHUNK_DATA = lib.BS_CHUNK_DATA
CHUNK_CHANGED = lib.BS_CHUNK_CHANGED
CODEC_RAW = lib.BS_CODEC_RAW
CODEC_ZSTD = lib.BS_CODEC_ZSTD
KIND_CHUNK = lib.BS_KIND_CHUNK
KIND_SEGMENT = lib.BS_KIND_SEGMENT

if lib.bs_abi_version() != ABI_VERSION:  # pragma: no cover
    raise errors.StaleBuild(found=lib.bs_abi_version(), expected=ABI_VERSION)


def guard_install():
    """Make reads past the end of a registered map read zeros instead of killing the process (bs_guard)."""
    _check(lib.bs_guard_install(), 0)


def guard_add(start, length):
    """Register a memory map ``[start, start+length)`` with the SIGBUS guard; False when the table is full."""
    return lib.bs_guard_add(start, length) == lib.BS_OK


def guard_remove(start):
    lib.bs_guard_remove(start)


def guard_faults():
    """How many reads past the end of a registered map the guard has answered with zeros so far."""
    return lib.bs_guard_faults()


def abort_exit(message):
    """Make SIGABRT print ``message`` (one line) and exit 1 instead of dumping core (the CLI only)."""
    _check(lib.bs_guard_abort_exit(message.encode("utf-8", "replace")[:500]), 0)


class ShortRead(OSError):
    """The file ended before the range that was asked for: it shrank."""


_STATUS_NAMES = {getattr(lib, name): name for name in errors.NATIVE_STATUS}
_DAMAGE_NAMES = {getattr(lib, name): text for name, text in errors.NATIVE_DAMAGE.items()}


def _check(rc, err):
    """Raise what a C core status means: OSError (with errno) for BS_EIO, ShortRead for BS_ESHORT, else
    the class errors.NATIVE_STATUS names."""
    if rc == lib.BS_OK:
        return
    if rc == lib.BS_EIO:
        raise OSError(err, os.strerror(err))
    if rc == lib.BS_ESHORT:
        raise ShortRead(_errno.EIO, "file shorter than expected")
    raise errors.from_native(_STATUS_NAMES.get(rc, "BS_EINVAL"), f"C core status {rc}")


def hash128(data):
    """XXH3-128 of ``data`` as 16 canonical (big-endian) bytes."""
    out = ffi.new("uint8_t[16]")
    lib.bs_hash128(ffi.from_buffer(data), len(data), out)
    return bytes(ffi.buffer(out, ID_LEN))


def hash64(data):
    """XXH3-64 of ``data`` as 8 canonical (big-endian) bytes: the checksum of catalog values and trailers."""
    out = ffi.new("uint8_t[8]")
    lib.bs_hash64(ffi.from_buffer(data), len(data), out)
    return bytes(ffi.buffer(out, 8))


class IdFilter:
    """Which of a set of candidate ids occur in lists of ids (bs_ids_filter): the mark of a mark-and-sweep.

    ``IdFilter(ids)`` takes any iterable of 16-byte ids; ``feed(ids_bytes)`` marks the candidates that
    occur in a list of ids (16 bytes each); ``found()`` / ``missing()`` are the marked and unmarked ones.
    """

    def __init__(self, candidates):
        self.ids = sorted(set(bytes(c) for c in candidates))
        self._cands = b"".join(self.ids)
        self._found = bytearray(len(self.ids))
        self._cbuf = ffi.from_buffer(self._cands)
        self._fbuf = ffi.from_buffer(self._found, require_writable=True)

    def feed(self, ids):
        if not self.ids or not ids:
            return
        rc = lib.bs_ids_filter(self._cbuf, len(self.ids), ffi.from_buffer(ids), len(ids) // ID_LEN, self._fbuf)
        _check(rc, 0)

    def found(self):
        return [c for c, f in zip(self.ids, self._found) if f]

    def any_found(self):
        return any(self._found)

    def clear(self):
        self._found[:] = bytes(len(self._found))

    def missing(self):
        return [c for c, f in zip(self.ids, self._found) if not f]


def nonzero_ids(ids):
    """Indexes of the ids (16 bytes each) in ``ids`` that are not the zero id, as a list."""
    n = len(ids) // ID_LEN
    out = ffi.new("uint32_t[]", max(n, 1))
    count = ffi.new("uint32_t *")
    lib.bs_ids_nonzero(ffi.from_buffer(ids), n, out, count)
    return list(out[0:count[0]])


def is_zero(data):
    """True if ``data`` holds only zero bytes."""
    return bool(lib.bs_is_zero(ffi.from_buffer(data), len(data)))


class Scanner:
    """Reusable output arrays for ``bs_scan`` over windows of up to ``max_chunks`` chunks.

    One Scanner per thread; ``scan`` fills ``ids``, ``flags`` and ``changed``
    and returns the number of changed data chunks.
    """

    def __init__(self, chunk_size, max_chunks):
        self.chunk_size = chunk_size
        self.max_chunks = max_chunks
        self._ids = ffi.new("uint8_t[]", max_chunks * ID_LEN)
        self._flags = ffi.new("uint8_t[]", max_chunks)
        self._changed = ffi.new("uint32_t[]", max_chunks)
        self._n_changed = ffi.new("uint32_t *")
        self._err = ffi.new("int *")

    def scan(self, fd, offset, length, buf, parent_ids=b""):
        """Classify ``[offset, offset+length)`` of ``fd`` into ``buf``.

        Args:
            fd: an open file descriptor of the image.
            offset, length: the window; ``length`` at most ``max_chunks`` chunks.
            buf: a writable buffer of at least ``length`` bytes.
            parent_ids: the parent's ids for this window (16 bytes each), may be shorter.
        Returns:
            ``(ids, flags, changed)``: ids as bytes (16 per chunk), flags as bytes,
            changed as a list of chunk indexes within the window.
        Raises:
            OSError on a failed read, ShortRead if the file shrank.
        """
        n = -(-length // self.chunk_size)
        if n > self.max_chunks:
            raise ValueError("window larger than the scanner")
        pn = len(parent_ids) // ID_LEN
        rc = lib.bs_scan(fd, offset, length, self.chunk_size,
                         ffi.from_buffer(buf, require_writable=True), len(buf),
                         ffi.from_buffer(parent_ids) if pn else ffi.NULL, pn,
                         self._ids, self._flags, self._changed, self._n_changed, self._err)
        _check(rc, self._err[0])
        nc = self._n_changed[0]
        return (bytes(ffi.buffer(self._ids, n * ID_LEN)), bytes(ffi.buffer(self._flags, n)),
                list(self._changed[0:nc]))


EXT_ZERO = lib.BS_EXT_ZERO
EXT_DATA = lib.BS_EXT_DATA
EXT_RAW = lib.BS_EXT_RAW
EXT_DEFLATE = lib.BS_EXT_DEFLATE
EXT_ZSTD = lib.BS_EXT_ZSTD
EXT_MAX_CLUSTER = lib.BS_EXT_MAX_CLUSTER
EXT_MAX_STORED = lib.BS_EXT_MAX_STORED


class Undecodable(Exception):
    """A compressed cluster that does not decode to a whole cluster; ``index`` is its extent's."""

    def __init__(self, index):
        super().__init__(f"extent {index} does not decode")
        self.index = index


class ExtentScanner(Scanner):
    """A Scanner for windows that an image source describes as extents (bs_scan_extents).

    Extents are ``(length, host_off, fd, kind, stored_len, cluster_len, skip)`` tuples, EXT_* kinds
    (csrc/blocksnap.h). Holds a decoding context of its own: one per thread.
    """

    def __init__(self, chunk_size, max_chunks):
        super().__init__(chunk_size, max_chunks)
        ctx = lib.bs_xctx_new()
        if ctx == ffi.NULL:
            raise errors.NativeOutOfMemory("(decoding context)")
        self._ctx = ffi.gc(ctx, lib.bs_xctx_free)
        self._failed = ffi.new("uint32_t *")

    def scan_extents(self, extents, length, buf, parent_ids=b""):
        """Fill, classify and hash a window of ``length`` guest bytes that ``extents`` describe.

        Returns:
            ``(ids, flags, changed)`` as ``scan``.
        Raises:
            OSError on a failed read (``.extent`` is the index of the extent), ShortRead if a raw file
            shrank, Undecodable for a compressed cluster that does not decode.
        """
        n = -(-length // self.chunk_size)
        if n > self.max_chunks:
            raise ValueError("window larger than the scanner")
        pn = len(parent_ids) // ID_LEN
        ext = ffi.new("bs_extent[]", [{"length": e[0], "host_off": e[1], "fd": e[2], "kind": e[3],
                                        "stored_len": e[4], "cluster_len": e[5], "skip": e[6]} for e in extents])
        rc = lib.bs_scan_extents(self._ctx, ext, len(extents), length, self.chunk_size,
                                 ffi.from_buffer(buf, require_writable=True), len(buf),
                                 ffi.from_buffer(parent_ids) if pn else ffi.NULL, pn,
                                 self._ids, self._flags, self._changed, self._n_changed, self._err, self._failed)
        if rc == lib.BS_EDATA:
            raise Undecodable(self._failed[0])
        if rc == lib.BS_EIO:
            exc = OSError(self._err[0], os.strerror(self._err[0]))
            exc.extent = self._failed[0]
            raise exc
        _check(rc, self._err[0])
        nc = self._n_changed[0]
        return (bytes(ffi.buffer(self._ids, n * ID_LEN)), bytes(ffi.buffer(self._flags, n)),
                list(self._changed[0:nc]))


def punch_hole(fd, offset, length):
    """Deallocate ``[offset, offset+length)`` of a file, keeping its size.

    Raises:
        OSError (EOPNOTSUPP where the file system cannot punch holes).
    """
    err = ffi.new("int *")
    _check(lib.bs_punch_hole(fd, offset, length, err), err[0])


def pwrite_sparse(fd, data, offset, block_size=4096):
    """Write ``data`` at ``offset``, leaving all-zero ``block_size`` blocks unwritten (holes in a new file).

    Raises:
        OSError on a failed write.
    """
    err = ffi.new("int *")
    _check(lib.bs_pwrite_sparse(fd, ffi.from_buffer(data), len(data), offset, block_size, err), err[0])


def entropy_millibits(data):
    """Sampled byte entropy of ``data`` in millibits per byte (8000 = random)."""
    out = ffi.new("uint32_t *")
    lib.bs_entropy_probe(ffi.from_buffer(data), len(data), out)
    return out[0]


class Codec:
    """A zstd compression and decompression context (system libzstd) for one thread.

    ``level`` is the zstd level; ``hash_log`` (0: the level's own) sizes the encoder's match table.
    """

    def __init__(self, level, hash_log=0):
        if hash_log and not 6 <= hash_log <= 30:  # ZSTD_HASHLOG_MIN..ZSTD_HASHLOG_MAX (64-bit)
            raise ValueError(f"zstd hash_log must be 0 or 6..30, not {hash_log}")
        ptr = lib.bs_codec_new(level, hash_log)
        if ptr == ffi.NULL:
            raise MemoryError(f"blocksnap C core: cannot make a zstd context (level {level}, hash_log {hash_log})")
        self._ptr = ffi.gc(ptr, lib.bs_codec_free)

    def encode_chunks(self, buf, length, chunk_size, idx, skip_millibits):
        """Encode chunks ``idx`` of a scanned window in place (see bs_encode_chunks).

        Returns:
            ``(codecs, lengths)``: per listed chunk its codec and the length of its stored bytes,
            which now start at its slot ``buf[i*chunk_size:]``.
        """
        n = len(idx)
        if n == 0:
            return b"", []
        codecs = ffi.new("uint8_t[]", n)
        lens = ffi.new("uint32_t[]", n)
        rc = lib.bs_encode_chunks(self._ptr, ffi.from_buffer(buf, require_writable=True), length, chunk_size,
                                  ffi.new("uint32_t[]", idx), n, skip_millibits, codecs, lens)
        _check(rc, 0)
        return bytes(ffi.buffer(codecs, n)), list(lens)

    def decode(self, codec_id, stored, raw_len):
        """The raw bytes of one stored chunk. Raises ValueError when they do not decode."""
        out = bytearray(raw_len)
        rc = lib.bs_decode(self._ptr, codec_id, ffi.from_buffer(stored), len(stored),
                           ffi.from_buffer(out, require_writable=True), raw_len)
        _check(rc, 0)
        return out


class RestoreDamage(Exception):
    """A chunk failed its checks in bs_restore_chunks: ``index`` into the batch, ``problem`` in words."""

    def __init__(self, index, problem):
        super().__init__(problem)
        self.index = index
        self.problem = problem




class PackStager:
    """bs_packw: assembles pack records in aligned buffers and writes them from an I/O thread of its own.

    One thread calls ``begin``/``add``/``end``; any thread may ``wait``. The copy in ``add`` and
    every write run without the GIL. Errors of a write (ENOSPC, EIO) come back as OSError from
    that call or a later one; a pack's descriptor may be closed only after ``wait`` for its last
    write number returned or raised.
    """

    def __init__(self, stage_bytes, stages):
        if stage_bytes <= 0 or stage_bytes % 4096 or stages < 2:
            raise ValueError(f"staging needs >= 2 buffers of a multiple of 4096 bytes, not {stages} x {stage_bytes}")
        ptr = lib.bs_packw_new(stage_bytes, stages)
        if ptr == ffi.NULL:
            raise MemoryError(f"blocksnap C core: cannot make a pack writer ({stages} x {stage_bytes} bytes)")
        self._ptr = ffi.gc(ptr, lib.bs_packw_free)
        self._err = ffi.new("int *")
        self._u64 = ffi.new("uint64_t[2]")

    def begin(self, fd, header):
        _check(lib.bs_packw_begin(self._ptr, fd, header, len(header), self._err), self._err[0])

    def add(self, base, recs):
        """Append records; ``recs`` are ``(id, src_off, stored_len, raw_len, codec, kind)`` with the
        stored bytes at ``base[src_off:src_off + stored_len]``. Returns each record's pack offset."""
        n = len(recs)
        if n == 0:
            return []
        arr = ffi.new("bs_pack_rec[]", n)
        for k, (cid, src_off, stored_len, raw_len, codec, kind) in enumerate(recs):
            if src_off + stored_len > len(base):
                raise ValueError("record bytes lie outside the buffer")
            r = arr[k]
            r.src_off = src_off
            r.stored_len = stored_len
            r.raw_len = raw_len
            r.codec = codec
            r.kind = kind
            r.id = cid
        offsets = ffi.new("uint64_t[]", n)
        _check(lib.bs_packw_add(self._ptr, ffi.from_buffer(base), arr, n, offsets, self._err), self._err[0])
        return list(offsets)

    def append(self, data):
        """Append raw bytes (a pack's trailer) after the records."""
        _check(lib.bs_packw_append(self._ptr, ffi.from_buffer(data), len(data), self._err), self._err[0])

    @property
    def offset(self):
        return lib.bs_packw_offset(self._ptr)

    def end(self):
        """Pad and hand over the last buffer of the current pack; returns ``(last_write_number, size)``."""
        _check(lib.bs_packw_end(self._ptr, self._u64, self._u64 + 1, self._err), self._err[0])
        return self._u64[0], self._u64[1]

    def wait(self, seq):
        """Block until writes 1..seq are done (all handed over so far if seq is larger); raises the
        first failed write's OSError."""
        _check(lib.bs_packw_wait(self._ptr, seq, self._err), self._err[0])

    def close(self):
        """Stop the I/O thread (after the last ``wait``)."""
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            ffi.release(ptr)


class Restorer:
    """One thread's state for bs_restore_chunks: a zstd context and two chunk-sized buffers."""

    def __init__(self, chunk_size):
        self._codec = Codec(1)
        self._scratch_len = 32 + chunk_size
        self._scratch = ffi.new("uint8_t[]", self._scratch_len)
        self._raw = ffi.new("uint8_t[]", chunk_size)
        self._raw_len = chunk_size
        self._failed = ffi.new("uint32_t *")
        self._detail = ffi.new("int *")

    def restore(self, items, out_fd, sparse_block):
        """Read, check, decode, verify and write a batch of chunks in one C call.

        Args:
            items: ``(pack_fd, record_offset, stored_len, raw_len, codec, kind, id, out_offset)`` tuples.
            out_fd: where the chunks go; -1 only checks them (verify).
            sparse_block: leave all-zero blocks of this size unwritten (0: write everything).
        Raises:
            RestoreDamage (with the failing item's index), OSError (with ``.index`` set).
        """
        if items:
            self._finish(lib.bs_restore_chunks(self._codec._ptr, self._items(items), len(items), out_fd,
                                               sparse_block, self._scratch, self._scratch_len, self._raw,
                                               self._raw_len, self._failed, self._detail))

    def restore_to_memory(self, items, dst):
        """The same checks as ``restore``, each chunk's bytes copied to ``dst`` at its out_offset (bs_restore_to_memory)."""
        if items:
            self._finish(lib.bs_restore_to_memory(self._codec._ptr, self._items(items), len(items),
                                                  ffi.from_buffer(dst, require_writable=True), len(dst),
                                                  self._scratch, self._scratch_len, self._raw, self._raw_len,
                                                  self._failed, self._detail))

    @staticmethod
    def _items(items):
        arr = ffi.new("bs_restore_item[]", len(items))
        for k, (fd, off, stored, raw, codec, kind, cid, out_off) in enumerate(items):
            it = arr[k]
            it.pack_fd = fd
            it.pack_offset = off
            it.stored_len = stored
            it.raw_len = raw
            it.codec = codec
            it.kind = kind
            it.id = cid
            it.out_offset = out_off
        return arr

    def _finish(self, rc):
        if rc == lib.BS_OK:
            return
        index, detail = self._failed[0], self._detail[0]
        if rc == lib.BS_EDAMAGED:
            raise RestoreDamage(index, _DAMAGE_NAMES.get(detail, f"damage {detail}"))
        if rc == lib.BS_EIO:
            exc = OSError(detail, os.strerror(detail))
            exc.index = index
            raise exc
        raise errors.from_native(_STATUS_NAMES.get(rc, "BS_EINVAL"), f"restore batch, C core status {rc}")
