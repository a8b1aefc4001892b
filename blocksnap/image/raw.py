"""Raw images: a regular file (sparse or not) or a block device.

The guest view of a raw image is the file itself. Holes are found by the C
core with SEEK_DATA/SEEK_HOLE; a block device has none, so only zero
detection applies there. Point-in-time reads are checked by comparing the
identity (size, mtime, ctime, inode) before and after.
"""
import errno
import os
import stat

from .. import _native, errors


def seek_data_ranges(fd, start, end):
    """Ranges ``(start, end)`` of ``fd`` in [start, end) that SEEK_DATA/SEEK_HOLE call data, ascending; all of
    it where the file system or device cannot tell."""
    off = start
    while off < end:
        try:
            data = os.lseek(fd, off, os.SEEK_DATA)
            hole = os.lseek(fd, data, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nothing but a hole up to the end
                return
            yield off, end  # no SEEK_DATA here (a block device): everything is data
            return
        if data >= end:
            return
        yield data, min(hole, end)
        off = hole


class RawImage:
    """An open raw image, as an image source (blocksnap/image/__init__.py); use as a context manager.

    Attributes: ``path``, ``fd``, ``size`` (bytes), ``kind`` ("file" or "block"), ``format`` ("raw").
    """

    format = "raw"

    def __init__(self, path):
        self.path = path
        try:
            # O_NONBLOCK: a FIFO would otherwise block the open until a writer came (it is refused
            # below); regular files and block devices ignore it.
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise errors.translate(exc, op="read-image") from None
        try:
            st = os.fstat(self.fd)
            if stat.S_ISREG(st.st_mode):
                self.kind = "file"
                self.size = st.st_size
            elif stat.S_ISBLK(st.st_mode):
                self.kind = "block"
                self.size = os.lseek(self.fd, 0, os.SEEK_END)
            else:
                raise errors.ImageUnsupported(f"({path})")
            self._identity = self.identity()
            try:
                os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            except OSError:
                pass
        except BaseException:
            os.close(self.fd)
            raise

    def identity(self):
        """What must not change while the image is read: for files size, mtime and ctime of the open file,
        and which file the path names (an image replaced by ``mv`` while it is read counts as changed)."""
        st = os.fstat(self.fd)
        if self.kind == "block":
            return (st.st_rdev, os.lseek(self.fd, 0, os.SEEK_END))
        try:
            named = os.stat(self.path)
            path_names = (named.st_dev, named.st_ino)
        except OSError:
            path_names = None  # gone
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, path_names)

    def unchanged(self):
        """True if the image looks as it did when it was opened."""
        return self.identity() == self._identity

    def extents(self, start, length):
        """The guest view of [start, start+length): the file's own bytes, holes not read (BS_EXT_RAW)."""
        return [(length, start, self.fd, _native.EXT_RAW, 0, 0, 0)]

    def data_ranges(self, start=0, end=None):
        return seek_data_ranges(self.fd, start, self.size if end is None else end)

    def files(self):
        """``(path, fd)`` of the one file this source reads."""
        return [(self.path, self.fd)]

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def probe(path):
    """``(kind, size)`` of an image path, with typed errors for what cannot be used."""
    with RawImage(path) as img:
        try:
            os.pread(img.fd, 1, 0)
        except OSError as exc:
            if exc.errno == errno.EISDIR:
                raise errors.ImageUnsupported(f"({path})") from None
            raise errors.translate(exc, path, op="read-image") from None
        return img.kind, img.size
