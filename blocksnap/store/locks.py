"""Advisory file locks that die with their holder: Linux open file description locks.

The repository lock: creates, restores and verifies hold it shared; gc and
space reclamation hold it exclusive, so chunk data is only ever removed
when no process could be about to reference it. A disk lock is held
exclusive by the one process creating a snapshot of that disk.

OFD locks (fcntl F_OFD_SETLK, Linux 3.15+) behave like flock(2): they
belong to the open file, conflict between two opens even in one process,
and vanish when the holder's descriptors close, so a killed process never
blocks anything. Unlike flock they can be tested without being taken
(F_OFD_GETLK), so asking "is a create running?" never makes a real create
see the lock as held.
"""
import errno
import fcntl
import os
import struct

# struct flock on Linux: l_type, l_whence (short), l_start, l_len (off_t), l_pid (pid_t), padding.
_FLOCK = struct.Struct("hhxxxxqqi4x")


def _flock_arg(kind):
    return _FLOCK.pack(kind, os.SEEK_SET, 0, 0, 0)


class FileLock:
    """One whole-file OFD lock on one file; a context manager that releases on exit."""

    def __init__(self, path):
        self.path = path
        self._fd = None

    def _open(self):
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        return self._fd

    def acquire(self, exclusive, blocking=True):
        """Take the lock. Returns False instead of waiting when ``blocking`` is false and it is held."""
        fd = self._open()
        cmd = fcntl.F_OFD_SETLKW if blocking else fcntl.F_OFD_SETLK
        try:
            fcntl.fcntl(fd, cmd, _flock_arg(fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK))
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def release(self):
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the lock
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def is_held(path):
    """True if some process holds a lock on ``path``. Tests without taking it (F_OFD_GETLK)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        out = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock_arg(fcntl.F_WRLCK))
    finally:
        os.close(fd)
    return _FLOCK.unpack(out)[0] != fcntl.F_UNLCK
