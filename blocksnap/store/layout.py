"""The repository's directory layout, and ``init``, which makes it completely or not at all.

    REPO/config          what the repository is (blocksnap.store.config), written last by init
    REPO/catalog/        the LMDB index (blocksnap.store.catalog)
    REPO/packs/XX/       pack files         } the store (blocksnap.store.backend):
    REPO/snapshots/      snapshot objects   } everything the catalog is rebuilt from
    REPO/disks/          disk objects       }
    REPO/groups/         resource groups    }  (made with the first group other than the default)
    REPO/locks/          lock files (blocksnap.store.locks)
"""
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import stat
import struct

import lmdb

from .. import errors
from . import catalog
from . import config as configs
from .backend import fsync_dir
from .locks import ReaderEpochs

STORE_DIRS = ("packs", "snapshots", "disks")  # made by init; groups/ comes with the first resource group
LOCK_FILES = ("repo.lock", "gate.lock") + ReaderEpochs.NAMES
V1_DB_NAMES = (b"disks", b"disk_paths", b"snapshots", b"snapmaps", b"disk_snaps", b"segments",
               b"chunks", b"packs", b"reclaim", b"tokens", b"counters")


def crashpoint(name):
    """Die here, as kill -9 would, when the crash tests ask for it (BLOCKSNAP_CRASHPOINT=name)."""
    if os.environ.get("BLOCKSNAP_CRASHPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _build(build, chunk_size):
    """Make a complete new repository in the directory ``build`` (which must not exist); returns its config.
    On any failure nothing of it is left."""
    os.mkdir(build)
    try:
        for sub in STORE_DIRS + ("locks",):
            os.mkdir(os.path.join(build, sub))
        for name in LOCK_FILES:
            os.close(os.open(os.path.join(build, "locks", name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644))
        cfg = configs.new_config(chunk_size)
        catalog.create(os.path.join(build, "catalog"), cfg["RepositoryId"])
        with open(os.path.join(build, "config"), "w", encoding="utf-8") as f:
            f.write(configs.encode(cfg))
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(build)
        crashpoint("init-before-rename")
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return cfg


def init(path, chunk_size):
    """Create a repository at ``path`` (absent, or an empty directory); returns its config.

    The repository is built in a hidden directory and moved into place with config last: it exists
    completely or not at all, whatever point a kill or a full disk stops this at. For a path that does
    not exist yet (the per-user default on first use), the build directory is a sibling renamed onto it
    in one step, so of two processes making it, one wins cleanly. An existing directory (a mount point,
    say, or a symlink to one) cannot be replaced: holding a lock on it, init builds inside it and moves
    the entries up, config last.

    Raises:
        InvalidChunkSize, RepositoryExists.
    """
    if not configs.valid_chunk_size(chunk_size):
        raise errors.InvalidChunkSize(f"(got {chunk_size!r})")
    if os.path.exists(os.path.join(path, "config")):
        raise errors.RepositoryExists(f"({path})")
    if not os.path.isdir(path):
        home = os.path.dirname(os.path.abspath(path))
        os.makedirs(home, exist_ok=True)
        build = os.path.join(home, f".{os.path.basename(os.path.abspath(path))}.init-{os.urandom(6).hex()}")
        cfg = _build(build, chunk_size)
        try:
            os.rename(build, path)
        except OSError as exc:
            shutil.rmtree(build, ignore_errors=True)
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise errors.RepositoryExists(f"({path})") from None
            raise
        fsync_dir(home)
        return cfg
    dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)  # another init here waits, then finds config
        if os.path.exists(os.path.join(path, "config")):
            raise errors.RepositoryExists(f"({path})")
        leftovers = killed_init_leftovers(path)
        if leftovers is None:
            raise errors.RepositoryExists(f"({path} is a non-empty directory)")
        for name in leftovers:
            target = os.path.join(path, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            else:
                os.unlink(target)
        build = os.path.join(path, f".init-{os.urandom(6).hex()}")
        cfg = _build(build, chunk_size)
        try:
            for name in STORE_DIRS + ("locks", "catalog", "config"):  # the repository exists after the last
                os.rename(os.path.join(build, name), os.path.join(path, name))
            os.rmdir(build)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
        fsync_dir(path)
    finally:
        os.close(dir_fd)
    return cfg


_BUILD_NAME = re.compile(r"\.init-[0-9a-f]{12}\Z")  # f".init-{os.urandom(6).hex()}", as init names its build


def killed_init_leftovers(path):
    """The entries of ``path`` to clear before an init there, or None if anything in it is not exactly
    what a killed init leaves: its build directories (``.init-`` and 12 hex digits) at any step of the
    build (``_killed_build``), the entries it had moved up (an empty catalog, empty store directories,
    lock files), those same entries partly removed by a later init killed while clearing them, or, from
    versions before 2026-11-27, which built in place, ``config.tmp``. Anything else (a user's own files, a
    repository that lost only its config) is refused, never deleted. The caller holds the directory's
    lock, so no build here is live."""
    names = os.listdir(path)
    for name in names:
        target = os.path.join(path, name)
        if os.path.islink(target):
            return None
        if name.startswith(".init-"):
            if not _killed_build(target, name):
                return None
        elif name in STORE_DIRS:
            if not os.path.isdir(target) or any(files for _, _, files in os.walk(target)):
                return None
        elif name == "locks":
            if not os.path.isdir(target) or not all(n.endswith(".lock") and os.path.isfile(os.path.join(target, n))
                                                    for n in os.listdir(target)):
                return None
        elif name == "catalog":
            # Moved up only once complete: whole and empty, or partly removed by a killed clearing.
            if not _killed_init_catalog(target, torn_ok=False):
                return None
        elif name == "config.tmp":
            try:
                with open(target, encoding="utf-8") as f:
                    if json.load(f).get("Format") != configs.FORMAT_NAME:
                        return None
            except (OSError, ValueError, AttributeError):
                return None
        else:
            return None
    return names


def _killed_build(target, name):
    """True if ``target`` is a build directory as ``_build`` leaves it when killed at any step (or as a
    killed clearing of one leaves it): any of empty store directories, ``locks/`` holding at most init's
    empty lock files, a catalog made so far (``_killed_init_catalog``) and a config written so far (empty,
    cut short, or whole)."""
    if not _BUILD_NAME.match(name) or not _is_dir(target):
        return False
    for sub in os.listdir(target):
        entry = os.path.join(target, sub)
        if sub in STORE_DIRS:
            if not _is_dir(entry) or os.listdir(entry):
                return False
        elif sub == "locks":
            if not _is_dir(entry) or not all(n in LOCK_FILES and _is_file(os.path.join(entry, n))
                                             and not os.path.getsize(os.path.join(entry, n))
                                             for n in os.listdir(entry)):
                return False
        elif sub == "catalog":
            if not _killed_init_catalog(entry, torn_ok=True):
                return False
        elif sub == "config":
            if not _killed_build_config(entry):
                return False
        else:
            return False
    return True


def _killed_build_config(path):
    """A build's config as far as it was written: empty, the start of a JSON object that does not parse
    yet, or a whole blocksnap config."""
    if not _is_file(path) or os.path.getsize(path) > 64 << 10:
        return False
    with open(path, "rb") as f:
        raw = f.read()
    if not raw:
        return True
    try:
        return json.loads(raw).get("Format") == configs.FORMAT_NAME
    except (ValueError, AttributeError):
        return raw.startswith(b"{")


def _killed_init_catalog(path, torn_ok):
    """True if ``path`` is a catalog directory as init makes it, at any step: empty (just made, or
    cleared), ``lock.mdb`` alone (LMDB makes it first), and a ``data.mdb`` that holds no record. With
    ``torn_ok``, ``data.mdb`` may also be what LMDB had written of a new file when the process died
    (``_new_lmdb_file``). A catalog with records, or any other file, is not init's."""
    if not _is_dir(path):
        return False
    names = set(os.listdir(path))
    if not names <= {"data.mdb", "lock.mdb"}:
        return False
    if "lock.mdb" in names and not _lmdb_lock_file(os.path.join(path, "lock.mdb")):
        return False
    if "data.mdb" not in names:
        return True
    state = _new_lmdb_file(os.path.join(path, "data.mdb"))
    if state == "torn":
        return torn_ok
    return state == "complete" and empty_catalog(path)


# LMDB's data file (liblmdb mdb.c, 64-bit layout): page 0 and page 1 are meta pages, each a page header
# (mp_pgno u64, mp_pad u16, mp_flags u16 = P_META, mp_lower/mp_upper u16 each) and MDB_meta: mm_magic u32
# at byte 16, mm_dbs[FREE_DBI].md_pad (the page size) at byte 40, mm_last_pg u64 at 136, mm_txnid u64 at
# 144. A new file is made empty, then both meta pages are written at once (mdb_env_init_meta), then each
# commit writes its pages and, last, the newer meta page. Where the layout differs (32-bit pgno_t), no file
# matches it: init then refuses such leftovers, it never deletes them.
_MDB_HEAD = struct.Struct("=QHHII")  # mp_pgno, mp_pad, mp_flags, mp_lower|mp_upper, mm_magic
_MDB_PSIZE = struct.Struct("=I")
_MDB_TAIL = struct.Struct("=QQ")  # mm_last_pg, mm_txnid
_MDB_MAGIC = 0xBEEFC0DE
_P_META = 0x08


def _new_lmdb_file(path):
    """``"torn"`` for an LMDB data file cut short while it was being made (empty, or part of its two meta
    pages: LMDB cannot open it, and mapping it would fault), ``"complete"`` for one whose meta pages
    and every page they name are present (safe to open), None for anything else."""
    if not _is_file(path):
        return None
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(1 << 17)
    if not size:
        return "torn"
    want = _MDB_HEAD.pack(0, 0, _P_META, 0, _MDB_MAGIC)
    if head[:len(want)] != want[:len(head)]:
        return None
    if len(head) < _MDB_PSIZE.size + 40:
        return "torn"
    (psize,) = _MDB_PSIZE.unpack_from(head, 40)
    if psize < 512 or psize > 1 << 16 or psize & (psize - 1):
        return None
    if size < 2 * psize:
        page1 = head[psize:]
        want1 = _MDB_HEAD.pack(1, 0, _P_META, 0, _MDB_MAGIC)
        return "torn" if page1[:len(want1)] == want1[:len(page1)] else None
    metas = []
    for pgno in (0, 1):
        if _MDB_HEAD.unpack_from(head, pgno * psize) != (pgno, 0, _P_META, 0, _MDB_MAGIC):
            return None
        metas.append(_MDB_TAIL.unpack_from(head, pgno * psize + 136))
    last_pg, _txnid = max(metas, key=lambda m: m[1])
    return "complete" if size >= (last_pg + 1) * psize else None


def _lmdb_lock_file(path):
    """An LMDB lock file, in whatever state LMDB was making it (empty, sized, filled in): a regular file of
    a few KiB (its reader table; a file of more than 1 MiB is not one)."""
    return _is_file(path) and os.path.getsize(path) <= 1 << 20


def _is_dir(path):
    return stat.S_ISDIR(os.lstat(path).st_mode)


def _is_file(path):
    return stat.S_ISREG(os.lstat(path).st_mode)


def empty_catalog(path):
    """True if ``path`` is an LMDB catalog directory holding no record at all (what init makes): a format-2
    catalog with only its meta records, or a format-1 one with only empty named databases. Call it only on a
    catalog whose data file ``_new_lmdb_file`` found complete: LMDB maps the file, and a page it names that
    is not there would kill this process (SIGBUS)."""
    if not os.path.isdir(path) or not set(os.listdir(path)) <= {"data.mdb", "lock.mdb"}:
        return False
    try:
        env = lmdb.open(path, readonly=True, lock=False, max_dbs=len(V1_DB_NAMES) + 1, subdir=True, create=False)
    except lmdb.Error:
        return False
    try:
        with env.begin() as txn:
            keys = [bytes(k) for k, _ in txn.cursor()]
            for key in keys:
                if key.startswith(catalog.TABLES["meta"]):
                    continue
                if key not in V1_DB_NAMES:
                    return False
                db = env.open_db(key, txn=txn, create=False)
                if txn.stat(db)["entries"]:
                    return False
        return True
    except lmdb.Error:
        return False
    finally:
        env.close()
