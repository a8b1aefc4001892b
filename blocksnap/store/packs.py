"""Packs: append-only files of records, each ending in its own record index (docs/FORMAT.md, "Packs").

A pack holds the records one creating process wrote: chunks of images and the map segments that name
them, each behind a 32-byte record header, then a trailer: the index of every record in the pack and a
tail at the very end of the file that locates the index and carries its checksum. A pack therefore
describes itself without the catalog, which is what ``blocksnap repair`` rebuilds the catalog from.
Writers never share a pack, and a pack is never changed once written; its dead records' space is given
back by punching holes (local store) or by repacking its live records (gc ``--max-unused``).

This module owns the pack format: headers, records, the trailer. Where the bytes live is the backend's
business (``blocksnap.store.backend``).
"""
import collections
import fcntl
import os
import struct
import threading
from collections import namedtuple

from .. import _native, errors

PACK_MAGIC_V1 = b"BSPACK\x00\x01"  # format 1: no trailer until the upgrade appends one
PACK_MAGIC = b"BSPACK\x00\x02"
PACK_HEADER = struct.Struct(">8s8s")  # magic, pack id
RECORD_MAGIC = b"BSCK"
# magic(4) codec(1) kind(1) reserved(2) raw_len(4) stored_len(4) id(16)
RECORD = struct.Struct(">4sBB2xII16s")
CODEC_RAW = _native.CODEC_RAW
CODEC_ZSTD = _native.CODEC_ZSTD
KIND_CHUNK = _native.KIND_CHUNK
KIND_SEGMENT = _native.KIND_SEGMENT
# The trailer: an index block right after the last record, zero padding, and a 32-byte tail that ends
# the file (so that a pack written in whole 4 KiB blocks stays a multiple of 4096 bytes).
INDEX_MAGIC = b"BSPX"
INDEX_HEAD = struct.Struct(">4sI")  # magic, record count
INDEX_ENTRY = struct.Struct(">16sQIIBB6x")  # id, record offset, stored_len, raw_len, codec, kind
TAIL_MAGIC = b"BSPT"
TAIL = struct.Struct(">4sI8sQ8s")  # magic, index length, pack id, index offset, XXH3-64 of index + tail[:24]
MAX_RECORDS = 1 << 22  # a pack of 64 MiB holds at most 16 Ki records of 4 KiB chunks; more is damage
ZSTD_LEVEL = 1
# Level 1 with a 2^12-entry (16 KiB) match table instead of the level's own 2^14 (64 KiB) for 256 KiB
# inputs: it stays in the L1 data cache next to the input and output, which makes compression 15-25 %
# faster for 1-3 % more bytes (docs/FORMAT.md, "Compression measurements").
ZSTD_HASH_LOG = 12
INCOMPRESSIBLE_MILLIBITS = 7600  # sampled entropy above which zstd is not tried
PACK_TARGET = 64 << 20  # seal a pack once it holds this many bytes
BLOCK = 4096  # packs are written, and punched, in whole blocks
FDS_PER_THREAD = 64
STAGE_BYTES = 4 << 20  # a pack is written in pieces of this size
STAGES = 2  # staging buffers per writer


Record = namedtuple("Record", "id offset stored_len raw_len codec kind")
Record.__doc__ = "One record of a pack, as its trailer lists it (offset: of its 32-byte header)."


def build_trailer(pack_id, end, records):
    """The trailer of a pack whose records end at ``end``: index, zero padding, tail (FORMAT.md)."""
    index = INDEX_HEAD.pack(INDEX_MAGIC, len(records)) + b"".join(
        INDEX_ENTRY.pack(r.id, r.offset, r.stored_len, r.raw_len, r.codec, r.kind) for r in records)
    pad = -(end + len(index) + TAIL.size) % BLOCK
    tail_head = struct.pack(">4sI8sQ", TAIL_MAGIC, len(index), pack_id, end)
    return index + bytes(pad) + tail_head + _native.hash64(index + tail_head)


def read_trailer(backend, pack_id):
    """The records a pack's trailer lists, checked.

    Raises:
        StoreDamaged if the pack has no valid trailer (truncated, damaged, or a format-1 pack that was
        never upgraded); OSError if it cannot be read.
    """
    name = pack_id.hex()
    size = backend.pack_size(pack_id)
    if size < PACK_HEADER.size + TAIL.size:
        raise errors.StoreDamaged(f"(pack {name} is {size} bytes: too short for a trailer)")
    tail = backend.read_pack(pack_id, size - TAIL.size, TAIL.size)
    magic, index_len, tail_pid, index_off, checksum = TAIL.unpack(tail)
    if magic != TAIL_MAGIC or tail_pid != pack_id:
        raise errors.StoreDamaged(f"(pack {name} has no trailer at its end)")
    if index_off < PACK_HEADER.size or index_len < INDEX_HEAD.size or index_off + index_len > size - TAIL.size \
            or (index_len - INDEX_HEAD.size) % INDEX_ENTRY.size:
        raise errors.StoreDamaged(f"(pack {name}: its trailer points outside the pack)")
    index = backend.read_pack(pack_id, index_off, index_len)
    if len(index) != index_len or _native.hash64(index + tail[:24]) != checksum:
        raise errors.StoreDamaged(f"(pack {name}: its record index fails its checksum)")
    imagic, count = INDEX_HEAD.unpack_from(index)
    if imagic != INDEX_MAGIC or count != (index_len - INDEX_HEAD.size) // INDEX_ENTRY.size or count > MAX_RECORDS:
        raise errors.StoreDamaged(f"(pack {name}: its record index is malformed)")
    out = []
    for k in range(count):
        rec = Record(*INDEX_ENTRY.unpack_from(index, INDEX_HEAD.size + k * INDEX_ENTRY.size))
        if rec.offset < PACK_HEADER.size or rec.offset + RECORD.size + rec.stored_len > index_off:
            raise errors.StoreDamaged(f"(pack {name}: its index lists a record outside the pack)")
        out.append(rec)
    return out


def read_header(backend, pack_id):
    """The pack's format version (1 or 2) from its header. Raises StoreDamaged for anything else."""
    head = backend.read_pack(pack_id, 0, PACK_HEADER.size)
    if len(head) == PACK_HEADER.size:
        magic, pid = PACK_HEADER.unpack(head)
        if pid == pack_id and magic in (PACK_MAGIC_V1, PACK_MAGIC):
            return 1 if magic == PACK_MAGIC_V1 else 2
    raise errors.StoreDamaged(f"(pack {pack_id.hex()} does not start with its header)")


class PackStore:
    """Reading packs of a backend through per-thread cached descriptors, and making PackWriters."""

    def __init__(self, backend):
        self.backend = backend
        self._local = threading.local()
        self._all_fds = {}  # fd -> pack id, over all threads
        self._caches = {}  # thread -> its descriptor cache
        self._fds_lock = threading.Lock()

    def path(self, pack_id):
        return self.backend.pack_path(pack_id)

    def writer(self):
        """A new PackWriter; one per creating thread of control."""
        return PackWriter(self)

    # --- reading -------------------------------------------------------------------------------------
    def fd(self, pack_id):
        """This thread's cached read-only descriptor of a pack (raises OSError if it is missing)."""
        return self._fd(pack_id)

    def _fd(self, pack_id):
        # Each thread keeps its own descriptors, so evicting one can never close a descriptor
        # another thread is reading from.
        cache = self._local.__dict__.get("fds")
        if cache is None:
            cache = self._local.fds = collections.OrderedDict()
            with self._fds_lock:
                self._caches[threading.current_thread()] = cache
        fd = cache.get(pack_id)
        if fd is not None:
            cache.move_to_end(pack_id)
            return fd
        if len(cache) >= FDS_PER_THREAD:
            old_pid, old = cache.popitem(last=False)  # least recently used
            self._close_fd(old, old_pid)
        fd = self.backend.open_pack(pack_id)
        with self._fds_lock:
            self._all_fds[fd] = pack_id
        cache[pack_id] = fd
        return fd

    def _close_fd(self, fd, pack_id):
        # Only if still registered to that pack: _forget may have closed it and the number been reused.
        with self._fds_lock:
            if self._all_fds.get(fd) != pack_id:
                return
            del self._all_fds[fd]
        os.close(fd)

    def release_ended_threads(self):
        """Close the cached descriptors of threads that have ended (a restore's or verify's workers).

        A long-lived Client would otherwise keep up to FDS_PER_THREAD descriptors open for every
        worker thread it ever ran, and run out of them.
        """
        with self._fds_lock:
            ended = [t for t in self._caches if not t.is_alive()]
            fds = []
            for t in ended:
                for pid, fd in self._caches.pop(t).items():
                    if self._all_fds.get(fd) == pid:
                        del self._all_fds[fd]
                        fds.append(fd)
        for fd in fds:
            os.close(fd)

    def close(self):
        """Close every cached descriptor (no reads may be in flight)."""
        with self._fds_lock:
            fds, self._all_fds = self._all_fds, {}
            self._caches = {}
        for fd in fds:
            os.close(fd)
        self._local = threading.local()

    # --- space ---------------------------------------------------------------------------------------
    def list_packs(self):
        return self.backend.list_packs()

    def remove(self, pack_id):
        """Unlink a pack (closing this process's descriptors of it first, so its space goes too)."""
        self._forget(pack_id)
        self.backend.remove_pack(pack_id)

    def punch(self, pack_id, offset, length):
        return self.backend.punch_pack(pack_id, offset, length, BLOCK)

    def disk_usage(self):
        return self.backend.usage()

    def _forget(self, pack_id):
        """Close every thread's descriptor of a pack that is being removed, so its space goes too.

        Removal happens under the exclusive repository lock, after the reader epochs that could see the pack
        have drained (their locks are open file descriptions, so readers of this process count too): no
        read of it is in flight.
        """
        with self._fds_lock:
            fds = [fd for fd, pid in self._all_fds.items() if pid == pack_id]
            for fd in fds:
                del self._all_fds[fd]
        for fd in fds:
            os.close(fd)
        self._local.__dict__.get("fds", {}).pop(pack_id, None)

_EVERY_WRITE = (1 << 64) - 1  # for PackStager.wait: every write handed over so far


Sealed = namedtuple("Sealed", "pack_id fd size records last_write")
Sealed.__doc__ = ("A pack handed over by PackWriter.detach (its records: [Record]): wait for last_write, then make "
                  "it durable.")


class PackWriter:
    """Appends records to fresh pack files of one writer, and ends each pack with its trailer.

    The C core (bs_packw, ``_native.PackStager``) assembles records in page-aligned staging
    buffers and writes them in STAGE_BYTES pieces from an I/O thread of its own, with O_DIRECT
    where the file system allows it: the data goes to the device without being copied into the
    page cache, which saves the creating process about a third of its CPU time and leaves the
    host's cache to its VMs. Neither the copy nor the writes need the GIL, so the device keeps
    writing while Python works. The trailer is padded so that the file is a whole number of
    4 KiB blocks (docs/FORMAT.md). Where O_DIRECT is refused (tmpfs), writes go through the page
    cache instead.

    One thread adds. ``detach`` hands a finished pack over; whoever takes it calls ``wait`` with
    its write number before ``PackStore.backend.sync_pack``; a record is only indexed after its
    pack is durable.
    """

    def __init__(self, store):
        self.store = store
        self.pack_id = None
        self._fd = None
        self._in_core = False  # the C core has the pack open (begin succeeded, end not yet called)
        self._records = []  # [Record]
        self._stager = _native.PackStager(STAGE_BYTES, STAGES)
        self.written = []  # ids of every pack this writer created

    def _open(self):
        self.pack_id = os.urandom(8)
        self._fd = self.store.backend.create_pack(self.pack_id)
        self.written.append(self.pack_id)
        try:
            fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) | os.O_DIRECT)
        except OSError:
            pass  # no O_DIRECT here: buffered writes
        self._in_core = False
        self._stager.begin(self._fd, PACK_HEADER.pack(PACK_MAGIC, self.pack_id))
        self._in_core = True  # (a begin that fails leaves no pack open in the core: a sticky write error)

    def add_many(self, base, recs):
        """Append records whose stored bytes lie in ``base``.

        Args:
            base: a buffer (a scanned window, or a segment's ids).
            recs: ``(id, src_off, stored_len, raw_len, codec, kind)``, the stored bytes at
                ``base[src_off:src_off + stored_len]``. They are copied before this returns.
        Returns:
            ``(offsets, full)``: each record's offset in its pack, and True when the pack is full and
            should be detached.
        """
        if self._fd is None:
            self._open()
        offsets = self._stager.add(base, recs)
        for (rid, _, stored_len, raw_len, codec, kind), off in zip(recs, offsets):
            self._records.append(Record(rid, off, stored_len, raw_len, codec, kind))
        end = offsets[-1] + RECORD.size + recs[-1][2] if recs else 0  # the pack's logical end
        return offsets, end >= PACK_TARGET

    def add_segment(self, seg_id, ids):
        """Append a map segment (its chunk ids, stored raw). Returns ``(offset, full)``."""
        offsets, full = self.add_many(ids, [(seg_id, 0, len(ids), len(ids), CODEC_RAW, KIND_SEGMENT)])
        return offsets[0], full

    @property
    def current(self):
        """The id of the pack being written, or None between packs."""
        return self.pack_id if self._fd is not None else None

    def detach(self):
        """End the current pack with its trailer and hand it over as a :class:`Sealed`, or None.

        Its last piece may still be on its way to the device: the taker calls
        ``wait(last_write)`` before making it durable or closing ``fd``. The next add starts a new pack.
        """
        if self._fd is None:
            return None
        self._stager.append(build_trailer(self.pack_id, self._stager.offset, self._records))
        self._in_core = False  # the C core ends the pack even when end() reports a failed write
        seq, size = self._stager.end()
        out = Sealed(self.pack_id, self._fd, size, self._records, seq)
        self._fd, self._records = None, []
        return out

    def wait(self, seq):
        """Block until this writer's writes up to number ``seq`` are done (raises their OSError)."""
        self._stager.wait(seq)

    def seal(self):
        """``detach`` and make the pack durable at once (for writers with nothing to overlap: gc's repack,
        repair, upgrade). Returns the :class:`Sealed` (its ``fd`` closed), or None between packs."""
        handed = self.detach()
        if handed is None:
            return None
        try:
            self.wait(handed.last_write)
        except BaseException:
            os.close(handed.fd)
            raise
        self.store.backend.sync_pack(handed.pack_id, handed.fd)
        return handed

    def abort(self):
        """Stop without sealing: wait for the writes in flight, close the open pack (it stays for
        gc, or for the caller to remove) and the I/O thread."""
        self.close()

    def _abandon(self):
        """Close the open pack without sealing it, however far it got (its file stays, unindexed)."""
        if self._fd is None:
            return
        if self._in_core:
            self._in_core = False
            try:
                self._stager.end()
            except OSError:
                pass  # the pack is being abandoned anyway
        try:
            self._stager.wait(_EVERY_WRITE)  # the I/O thread is done with the descriptor
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        self._records = []

    def close(self):
        """Wait for every write handed over, then stop the I/O thread (after ``detach``; a pack still
        open, after an error in the middle of it, is abandoned as by ``abort``)."""
        if self._stager is None:
            return
        self._abandon()
        try:
            self._stager.wait(_EVERY_WRITE)
        except OSError:
            pass  # reported by the call that handed the failing write over
        finally:
            self._stager.close()
            self._stager = None
