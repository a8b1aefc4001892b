"""Advisory file locks (flock(2)) that die with their process.

The repository lock: creates, restores and verifies hold it shared; gc and
space reclamation hold it exclusive, so chunk data is only ever removed
when no process could be about to reference it. A disk lock is held
exclusive by the one process creating a snapshot of that disk. A killed
process drops its locks with its file descriptors, so a dead creator never
blocks a disk.
"""
import fcntl
import os


class FileLock:
    """One flock on one file; a context manager that releases on exit."""

    def __init__(self, path):
        self.path = path
        self._fd = None

    def acquire(self, exclusive, blocking=True):
        """Take the lock. Returns False instead of waiting when ``blocking`` is false and it is held."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        op = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if blocking else fcntl.LOCK_NB)
        try:
            fcntl.flock(self._fd, op)
        except BlockingIOError:
            return False
        return True

    def release(self):
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def is_held(path):
    """True if some process holds any lock on ``path`` (probed without waiting)."""
    probe = FileLock(path)
    try:
        return not probe.acquire(exclusive=True, blocking=False)
    finally:
        probe.release()
