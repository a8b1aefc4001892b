"""Chunk storage: append-only pack files on a local file system.

A pack holds the chunks one creating process wrote, each behind a 32-byte
record header, so a pack describes itself without the catalog
(docs/FORMAT.md, "Pack files"). Writers never share a pack. Space is given
back by punching holes over dead records and unlinking packs with no live
record. The interface (writer / read / reclaim / list / remove) is what a
later object-store backend implements too.
"""
import collections
import errno
import fcntl
import os
import struct
import threading

from .. import _native

PACK_MAGIC = b"BSPACK\x00\x01"
PACK_HEADER = struct.Struct(">8s8s")  # magic, pack id
RECORD_MAGIC = b"BSCK"
# magic(4) codec(1) reserved(3) raw_len(4) stored_len(4) chunk id(16)
RECORD = struct.Struct(">4sB3xII16s")
CODEC_RAW = _native.CODEC_RAW
CODEC_ZSTD = _native.CODEC_ZSTD
ZSTD_LEVEL = 1
# Level 1 with a 2^12-entry (16 KiB) match table instead of the level's own 2^14 (64 KiB) for 256 KiB
# inputs: it stays in the L1 data cache next to the input and output, which makes compression 15-25 %
# faster for 1-3 % more bytes (docs/FORMAT.md, "Compression measurements").
ZSTD_HASH_LOG = 12
INCOMPRESSIBLE_MILLIBITS = 7600  # sampled entropy above which zstd is not tried
PACK_TARGET = 64 << 20  # seal a pack once it holds this many bytes
BLOCK = 4096  # punching frees whole blocks only
FDS_PER_THREAD = 64
STAGE_BYTES = 4 << 20  # a pack is written in pieces of this size
STAGES = 2  # staging buffers per writer

def fsync_dir(path):
    """Make the names in a directory durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PackStore:
    """Pack files under ``root`` (``packs/XX/<16 hex>.pack``)."""

    def __init__(self, root):
        self.root = root
        self._local = threading.local()
        self._all_fds = {}  # fd -> pack id, over all threads
        self._caches = {}  # thread -> its descriptor cache
        self._fds_lock = threading.Lock()

    def path(self, pack_id):
        h = pack_id.hex()
        return os.path.join(self.root, h[:2], h + ".pack")

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
        fd = os.open(self.path(pack_id), os.O_RDONLY | os.O_CLOEXEC)
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
        """Ids of every pack file present (sealed or not)."""
        out = []
        if not os.path.isdir(self.root):
            return out
        for sub in os.listdir(self.root):
            d = os.path.join(self.root, sub)
            if not os.path.isdir(d):
                continue
            for name in os.listdir(d):
                if name.endswith(".pack") and len(name) == 21:
                    try:
                        out.append(bytes.fromhex(name[:16]))
                    except ValueError:
                        continue
        return out

    def remove(self, pack_id):
        """Unlink a pack; a missing one counts as removed."""
        self._forget(pack_id)
        try:
            os.unlink(self.path(pack_id))
        except FileNotFoundError:
            pass

    def punch(self, pack_id, offset, length):
        """Give the whole blocks inside ``[offset, offset+length)`` back to the file system."""
        start = -(-offset // BLOCK) * BLOCK
        end = ((offset + length) // BLOCK) * BLOCK
        if end <= start:
            return 0
        try:
            fd = os.open(self.path(pack_id), os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0
        try:
            _native.punch_hole(fd, start, end - start)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                return 0  # the file system cannot punch: the bytes stay until the pack goes
            raise
        finally:
            os.close(fd)
        return end - start

    def _forget(self, pack_id):
        """Close every thread's descriptor of a pack that is being removed, so its space goes too.

        Removal happens under the exclusive repository lock, so no read of it is in flight.
        """
        with self._fds_lock:
            fds = [fd for fd, pid in self._all_fds.items() if pid == pack_id]
            for fd in fds:
                del self._all_fds[fd]
        for fd in fds:
            os.close(fd)
        self._local.__dict__.get("fds", {}).pop(pack_id, None)

    def make_durable(self, pack_id, fd):
        """fsync a finished pack, close its descriptor, fsync its folder names."""
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        sub = os.path.dirname(self.path(pack_id))
        fsync_dir(sub)  # the file's name
        fsync_dir(os.path.dirname(sub))  # its folder's name

    def disk_usage(self):
        """Bytes the packs occupy on disk (st_blocks), as ``du`` counts them."""
        total = 0
        for pack_id in self.list_packs():
            try:
                total += os.stat(self.path(pack_id)).st_blocks * 512
            except FileNotFoundError:
                continue
        return total


_EVERY_WRITE = (1 << 64) - 1  # for PackStager.wait: every write handed over so far


class PackWriter:
    """Appends chunk records to fresh pack files of one writer.

    The C core (bs_packw, ``_native.PackStager``) assembles records in page-aligned staging
    buffers and writes them in STAGE_BYTES pieces from an I/O thread of its own, with O_DIRECT
    where the file system allows it: the data goes to the device without being copied into the
    page cache, which saves the creating process about a third of its CPU time and leaves the
    host's cache to its VMs. Neither the copy nor the writes need the GIL, so the device keeps
    writing while Python works. The last piece of a pack is padded with zeros to a whole block,
    so a pack file may be up to 4095 bytes longer than its records (docs/FORMAT.md). Where
    O_DIRECT is refused (tmpfs), writes go through the page cache instead.

    One thread adds. ``detach`` hands a finished pack over; whoever takes it calls ``wait`` with
    its write number before ``PackStore.make_durable``; a record is only indexed after its pack
    is durable.
    """

    def __init__(self, store):
        self.store = store
        self.pack_id = None
        self._fd = None
        self._records = []  # (chunk_id, offset, stored_len, raw_len, codec)
        self._stager = _native.PackStager(STAGE_BYTES, STAGES)
        self.written = []  # ids of every pack this writer created

    def _open(self):
        self.pack_id = os.urandom(8)
        path = self.store.path(self.pack_id)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self.written.append(self.pack_id)
        try:
            fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) | os.O_DIRECT)
        except OSError:
            pass  # no O_DIRECT here: buffered writes
        self._stager.begin(self._fd, PACK_HEADER.pack(PACK_MAGIC, self.pack_id))

    def add_many(self, base, recs):
        """Append records whose stored bytes lie in ``base``.

        Args:
            base: a buffer (a scanned window).
            recs: ``(chunk_id, src_off, stored_len, raw_len, codec)``, the stored bytes at
                ``base[src_off:src_off + stored_len]``. They are copied before this returns.
        Returns:
            True when the pack is full and should be detached.
        """
        if self._fd is None:
            self._open()
        offsets = self._stager.add(base, recs)
        for (cid, _, stored_len, raw_len, codec), off in zip(recs, offsets):
            self._records.append((cid, off, stored_len, raw_len, codec))
        end = offsets[-1] + RECORD.size + recs[-1][2] if recs else 0  # the pack's logical end
        return end >= PACK_TARGET

    def add(self, chunk_id, codec, stored, raw_len):
        """Append one encoded chunk. Returns True when the pack is full and should be detached."""
        return self.add_many(stored, [(chunk_id, 0, len(stored), raw_len, codec)])

    def detach(self):
        """Hand the current pack over: ``(pack_id, fd, size, records, write_number)``, or None.

        Its last piece may still be on its way to the device: the taker calls
        ``wait(write_number)`` before :meth:`PackStore.make_durable` or closing ``fd``. The next
        ``add`` starts a new pack.
        """
        if self._fd is None:
            return None
        seq, size = self._stager.end()
        out = (self.pack_id, self._fd, size, self._records, seq)
        self._fd, self._records = None, []
        return out

    def wait(self, seq):
        """Block until this writer's writes up to number ``seq`` are done (raises their OSError)."""
        self._stager.wait(seq)

    def abort(self):
        """Stop without sealing: wait for the writes in flight, close the open pack (it stays for
        gc, or for the caller to remove) and the I/O thread."""
        if self._fd is not None:
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
        self.close()

    def close(self):
        """Wait for every write handed over, then stop the I/O thread (after ``detach`` or ``abort``)."""
        if self._stager is None:
            return
        try:
            self._stager.wait(_EVERY_WRITE)
        except OSError:
            pass  # reported by the call that handed the failing write over
        finally:
            self._stager.close()
            self._stager = None
