"""The repository's directory layout, and ``init``, which makes it completely or not at all.

    REPO/config          what the repository is (blocksnap.store.config), written last by init
    REPO/catalog/        the LMDB index (blocksnap.store.catalog)
    REPO/packs/XX/       pack files         } the store (blocksnap.store.backend):
    REPO/snapshots/      snapshot objects   } everything the catalog is rebuilt from
    REPO/disks/          disk objects       }
    REPO/locks/          lock files (blocksnap.store.locks)
"""
import errno
import fcntl
import json
import os
import shutil
import signal

import lmdb

from .. import errors
from . import catalog, config as configs
from .backend import OBJECT_KINDS, fsync_dir
from .locks import ReaderEpochs

STORE_DIRS = ("packs",) + OBJECT_KINDS
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


def killed_init_leftovers(path):
    """The entries of ``path`` to clear before an init there, or None if anything in it is not exactly
    what a killed init leaves: its build directories (``.init-*``), the entries it had moved up (an empty
    catalog, empty store directories, lock files), or, from versions before 2026-11-27, which built in
    place, ``config.tmp``. Anything else (a user's own files, a repository that lost only its config) is
    refused, never deleted. The caller holds the directory's lock, so no build here is live."""
    names = os.listdir(path)
    for name in names:
        target = os.path.join(path, name)
        if os.path.islink(target):
            return None
        if name.startswith(".init-"):
            if not os.path.isdir(target) or not set(os.listdir(target)) <= set(STORE_DIRS) | {"locks", "catalog",
                                                                                                "config"}:
                return None
            target_catalog = os.path.join(target, "catalog")
            if os.path.exists(target_catalog) and not empty_catalog(target_catalog):
                return None
        elif name in STORE_DIRS:
            if not os.path.isdir(target) or any(files for _, _, files in os.walk(target)):
                return None
        elif name == "locks":
            if not os.path.isdir(target) or not all(n.endswith(".lock") and os.path.isfile(os.path.join(target, n))
                                                    for n in os.listdir(target)):
                return None
        elif name == "catalog":
            if not empty_catalog(target):
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


def empty_catalog(path):
    """True if ``path`` is an LMDB catalog directory holding no record at all (what init makes): a format-2
    catalog with only its meta records, or a format-1 one with only empty named databases."""
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
