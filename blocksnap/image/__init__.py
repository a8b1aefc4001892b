"""Image sources: what a snapshot reads, behind one small interface (QEMU's BlockDriver is the model).

A source is opened on a registered disk's path and describes its guest disk; the C core
(``bs_scan_extents``) does all the reading, decoding and hashing from that description. Every source
has:

    path, size (guest bytes), kind ("file" | "block"), format ("raw" | "qcow2")
    extents(start, length)      the guest bytes [start, start+length) as bs_extent tuples
    data_ranges(start, end)     guest ranges that may hold data, ascending; the rest reads as zeros and
                                is never handed to the C core
    unchanged()                 True while no file the source reads from has changed since it was opened
    close()

Sources: ``raw.RawImage`` (regular files and block devices: guest offset = file offset) and
``Qcow2Source`` here (a qcow2 file with its backing chain and external data file, ``qcow2.py``). The
format comes from the file's header at ``disk add`` and is recorded in the disk; it is never guessed
from a name, and never re-probed for a disk registered raw (a guest that writes a qcow2 header into a raw
disk must not make blocksnap follow a backing file name of its choosing).
"""
import fcntl
import os
import stat
import struct

from .. import _native, errors
from . import probe, qcow2
from .raw import RawImage

FORMATS = ("raw", "qcow2")
QEMU_LOCK_WRITE_BYTE = 101  # file-posix.c: RAW_LOCK_PERM_BASE (100) + the bit of BLK_PERM_WRITE
F_OFD_GETLK = 36  # Linux fcntl.h


def detect_format(path):
    """The format a file's header shows: "qcow2", "raw", or the name of a format blocksnap does not read.

    Raises:
        ImageNotFound, ImageUnreadable.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise errors.translate(exc, path, op="read-image") from None
    try:
        head = os.pread(fd, probe.HEAD_BYTES, 0)
    except OSError as exc:
        if exc.errno == 21:  # EISDIR
            raise errors.ImageUnsupported(f"({path})") from None
        raise errors.translate(exc, path, op="read-image") from None
    finally:
        os.close(fd)
    # A file that starts with the magic of a format blocksnap does not read is refused at 'disk add' unless it
    # is registered with --format raw (then its bytes are the disk).
    return probe.format_of(head)


def qemu_writer(fd):
    """True if a QEMU process holds the image open for writing (its OFD lock on the write permission byte,
    file-posix.c raw_apply_lock_bytes): a running VM, qemu-nbd, qemu-io."""
    lock = struct.pack("hhxxxxqqi4x", fcntl.F_WRLCK, os.SEEK_SET, QEMU_LOCK_WRITE_BYTE, 1, 0)
    try:
        got = fcntl.fcntl(fd, F_OFD_GETLK, lock)
    except OSError:
        return False  # no OFD locks here: nothing to tell
    return struct.unpack("hhxxxxqqi4x", got)[0] != fcntl.F_UNLCK


class Qcow2Source:
    """A qcow2 image with its chain, as a source. Point in time covers every file of the chain: each file's
    identity is taken as it is opened, before any of its metadata is read."""

    format = "qcow2"

    def __init__(self, path, backing_dirs=(), allow_dirty=False, deny=()):
        self.path = path
        named = _named(path)
        self.top = qcow2.Qcow2Image(path, qcow2.Policy(path, backing_dirs, allow_dirty, deny))
        try:
            if not allow_dirty and qemu_writer(self.top.fd):
                raise errors.ImageInUse(f"({path}: a QEMU process holds it open for writing)")
            self.fd = self.top.fd
            self.size = self.top.size
            self.kind = self.top.kind
            self._identity = tuple(ident for _, _, ident in self.top.files()) + (named,)
        except BaseException:
            self.top.close()
            raise

    def identity(self):
        return tuple(qcow2.file_identity(fd) for _, fd, _ in self.top.files()) + (_named(self.path),)

    def unchanged(self):
        return self.identity() == self._identity

    def extents(self, start, length):
        return self.top.extents(start, length)

    def data_ranges(self, start=0, end=None):
        return self.top.data_ranges(start, end)

    def files(self):
        """``(path, fd)`` of every file the source reads."""
        return [(p, fd) for p, fd, _ in self.top.files()]

    def close(self):
        self.top.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _named(path):
    """Which file the path names (an image replaced by ``mv`` while it is read counts as changed)."""
    try:
        st = os.stat(path)
        return (st.st_dev, st.st_ino)
    except OSError:
        return None


def open_source(path, fmt="auto", backing_dirs=(), allow_dirty=False, deny=()):
    """Open an image as a source of its guest view.

    Args:
        fmt: "raw", "qcow2", or "auto" (from the header; formats blocksnap does not read are refused).
        backing_dirs: directories outside the image's own tree that backing and data files may be in.
        allow_dirty: read a qcow2 whose dirty bit is set or that a QEMU process holds open for writing.
        deny: directories no backing or data file may be in, whatever else allows it (the repository).
    Raises:
        ImageNotFound, ImageUnreadable, ImageUnsupported, ImageMalformed, ImageInUse, BackingFileDenied,
        ImageFormatChanged (fmt "qcow2" and the header is not).
    """
    if fmt == "auto":
        fmt = detect_format(path)
        if fmt not in FORMATS:
            raise errors.ImageUnsupported(f"({path}: a {fmt} image; convert it with 'qemu-img convert -O qcow2', "
                                          "or register it with --format raw to snapshot the file's bytes)")
    if fmt == "raw":
        return RawImage(path)
    if fmt == "qcow2":
        if detect_format(path) != "qcow2":
            raise errors.ImageFormatChanged(f"({path} was registered as qcow2 and has no qcow2 header now)")
        return Qcow2Source(path, backing_dirs, allow_dirty, deny)
    raise errors.InvalidParameter(f"(format {fmt!r}: one of auto, {', '.join(FORMATS)})")


def read_guest(path, offset=0, length=None, **open_kw):
    """The guest view of ``path`` as the snapshot engine reads it (the same sources and C kernel), as bytes.

    For tests and tools; a snapshot streams instead. Raises what ``open_source`` raises, and
    ImageMalformed for a compressed cluster that does not decode.
    """
    with open_source(path, **open_kw) as src:
        end = src.size if length is None else min(src.size, offset + length)
        out = bytearray()
        window = 4 << 20
        scanner = _native.ExtentScanner(window, 1)
        buf = bytearray(window)
        pos = offset
        while pos < end:
            n = min(window, end - pos)
            ext = src.extents(pos, n)
            try:
                scanner.scan_extents(ext, n, buf)
            except _native.Undecodable as exc:
                raise undecodable(src, ext, exc) from None
            except _native.ShortRead:
                raise errors.ImageChanged(f"({path} shrank while it was read)") from None
            except OSError as exc:
                raise errors.translate(OSError(exc.errno, exc.strerror, path_of(src, ext, exc)),
                                       op="read-image") from None
            out += buf[:n]
            pos += n
        return bytes(out)


# A disk is mapped a chunk at a time (16 bytes of id per chunk, in segments): past this many chunks the map
# of one snapshot no longer fits a create's memory. A qcow2 header may claim up to 2 EiB in a small file.
MAX_CHUNKS = 1 << 28


def check_mappable(src, chunk_size):
    """Raise ImageUnsupported when the disk is larger than a repository of ``chunk_size`` chunks maps."""
    if -(-src.size // chunk_size) > MAX_CHUNKS:
        raise errors.ImageUnsupported(f"({src.path}: a disk of {src.size} bytes is more than {MAX_CHUNKS} chunks of "
                                      f"{chunk_size} bytes; a repository with larger chunks maps up to "
                                      f"{MAX_CHUNKS} of them)")


def path_of(src, extents, exc):
    """The file an extent that failed reads from (a backing or data file, or the image itself)."""
    index = getattr(exc, "extent", getattr(exc, "index", None))
    if index is None or index >= len(extents):
        return src.path
    fd = extents[index][2]
    for path, f in src.files():
        if f == fd:
            return path
    return src.path


def undecodable(src, extents, exc):
    """ImageMalformed for a compressed cluster the C core could not decode, naming the file it is in."""
    e = extents[exc.index]
    return errors.ImageMalformed(f"({path_of(src, extents, exc)}: the compressed cluster at host offset {e[1]} "
                                 f"({e[4]} bytes) does not decode to a whole cluster)")
