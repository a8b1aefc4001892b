"""Advisory file locks that die with their holder: Linux open file description locks.

Writers: creates hold the repository lock shared; gc and the reclaim after a delete hold it exclusive,
so no create can be about to take a reference to a chunk whose entry is being removed. A disk lock is
held exclusive by the one process creating a snapshot of that disk. Readers (restore, verify) take
neither: they register with :class:`ReaderEpochs`, which never makes them wait, and data is removed
only once every reader that could still see it has finished (docs/FORMAT.md, "Locks").

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


def _flock_arg(kind, start=0, length=0):
    return _FLOCK.pack(kind, os.SEEK_SET, start, length, 0)


class FileLock:
    """One whole-file OFD lock on one file; a context manager that releases on exit."""

    def __init__(self, path, readonly=False):
        self.path = path
        self.readonly = readonly  # for shared locks on files that exist (read-only media)
        self._fd = None

    def _open(self):
        if self._fd is None:
            if self.readonly:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            else:
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


class ByteLock:
    """An exclusive OFD lock on one byte of a file: many independent locks in one file, as a lock per
    ClientToken (the byte at a hash of the token) or a slot of a counted resource (byte N: slot N) needs,
    without a file per lock. Dies with its holder like :class:`FileLock`."""

    def __init__(self, path, offset):
        self.path = path
        self.offset = offset
        self._fd = None

    def acquire(self):
        """Take the lock without waiting; False if another open file holds it (this process's too)."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, _flock_arg(fcntl.F_WRLCK, self.offset, 1))
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                self.release()
                return False
            raise
        return True

    def held(self):
        """True if some open file holds this byte (tested without taking it)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            out = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock_arg(fcntl.F_WRLCK, self.offset, 1))
        finally:
            os.close(fd)
        return _FLOCK.unpack(out)[0] != fcntl.F_UNLCK

    def release(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class ReaderEpochs:
    """Readers that never wait, and writers that remove data only after the readers that could see it.

    The catalog holds an epoch number; two lock files, ``read-0.lock`` and ``read-1.lock``, stand for
    the epochs' parities. A reader reads the epoch e, takes ``read-{e%2}.lock`` shared without waiting
    (a failure means a writer is draining that parity: it reads the epoch again) and only then begins
    the reads it relies on. A writer that removes data (dead chunk entries, whole packs) does so in a
    *flip* from epoch E to E+1:

    1. drain ``read-{(E+1)%2}`` (take it exclusive, release it): readers left from epoch E-1 are gone;
    2. one catalog transaction removes the entries, records their ranges in ``reclaim`` tagged E+1 and
       sets the epoch to E+1; readers that start now do not see the removed entries;
    3. drain ``read-{E%2}``: the readers that could have seen the entries are gone; punch the ranges.

    A range tagged t may be given back once the epoch is past t, or it is t and ``read-{(t-1)%2}`` can be
    drained. Readers never wait for writers; a writer waits only for readers that started before its
    flip (or, not blocking, leaves the ranges for a later flip or gc).
    """

    NAMES = ("read-0.lock", "read-1.lock")

    def __init__(self, locks_dir):
        self.locks_dir = locks_dir

    def path(self, epoch):
        return os.path.join(self.locks_dir, self.NAMES[epoch % 2])

    def ensure(self):
        """Make both lock files (writers; init makes them, repositories upgraded from format 1 lack them)."""
        for name in self.NAMES:
            fd = os.open(os.path.join(self.locks_dir, name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            os.close(fd)

    def enter(self, read_epoch):
        """Register a reader; returns the held lock (release it when done), or None where the lock files
        do not exist and cannot be made (read-only media: nothing can remove data there).

        ``read_epoch`` is a callable returning the catalog's current epoch.
        """
        for _ in range(1000):
            epoch = read_epoch()
            lock = FileLock(self.path(epoch), readonly=True)
            try:
                # Still epoch e once the lock is held: no flip past e+1 can have drained this parity
                # before the lock was taken (else a writer may not wait for this reader: read again).
                if lock.acquire(exclusive=False, blocking=False) and read_epoch() == epoch:
                    return lock
            except FileNotFoundError:
                lock.release()
                try:
                    self.ensure()  # lost, on a writable repository: make them, and register again
                    continue
                except OSError:
                    return None  # read-only media: no writer can remove data here
            except BaseException:  # the epoch's read failed (a damaged catalog): hold nothing
                lock.release()
                raise
            lock.release()  # a writer drains this parity: the epoch has moved on
        raise OSError(errno.EAGAIN, "reader epoch kept moving")

    def drain(self, epoch, blocking):
        """Wait (or only try, if not ``blocking``) until no reader holds the parity of ``epoch``.
        Returns True when it is drained."""
        lock = FileLock(self.path(epoch))
        try:
            return lock.acquire(exclusive=True, blocking=blocking)
        finally:
            lock.release()
