"""A blocksnap repository on a local file system: catalog, packs, locks.

    REPO/config         JSON: format name and version, chunk size (written once, atomically)
    REPO/catalog/       LMDB environment (blocksnap.store.meta)
    REPO/packs/XX/      pack files (blocksnap.store.chunks)
    REPO/locks/         flock files: repo.lock, disk-<DiskId>.lock

This module holds the record-level operations (disks, snapshot records,
reference counting, deletion, space reclamation). Creating, restoring and
verifying snapshots live in backup.py and restore.py; validation of
requests in api.py.
"""
import datetime
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import string
import time

import lmdb

from . import errors
from ._native import hash128
from .store import meta
from .store.chunks import PackStore, fsync_dir
from .store.locks import FileLock, is_held

FORMAT_NAME = "blocksnap-repository"
FORMAT_VERSION = 1
DEFAULT_CHUNK_SIZE = 256 << 10
MIN_CHUNK_SIZE = 4 << 10
MAX_CHUNK_SIZE = 4 << 20
SEGMENT_CHUNKS = 256  # chunk ids per map segment
ID_ALPHABET = string.ascii_lowercase + string.digits
DISK_ID_RE = re.compile(r"^d-[a-z0-9]{20}$")
SNAPSHOT_ID_RE = re.compile(r"^s-[a-z0-9]{20}$")
ZERO_ID = bytes(16)

PROGRESSING = "progressing"
ACCOMPLISHED = "accomplished"
FAILED = "failed"


def default_repo_path():
    """``$BLOCKSNAP_REPO``, else ``$XDG_DATA_HOME/blocksnap/repo``, else ``~/.local/share/blocksnap/repo``."""
    env = os.environ.get("BLOCKSNAP_REPO")
    if env:
        return env
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "blocksnap", "repo")


def new_id(prefix):
    """``prefix`` + 20 characters drawn uniformly from ID_ALPHABET with the OS's random source.

    os.urandom with rejection sampling, as secrets.choice does it, without importing secrets (which
    loads OpenSSL through hmac: 5-6 ms of every command's start-up).
    """
    n = len(ID_ALPHABET)
    limit = 256 - 256 % n  # bytes at or above this would favour the first characters
    out = []
    while len(out) < 20:
        out.extend(ID_ALPHABET[b % n] for b in os.urandom(32) if b < limit)
    return prefix + "".join(out[:20])


def now_iso(ts=None):
    t = datetime.datetime.fromtimestamp(time.time() if ts is None else ts, datetime.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def mark_failed(rec, exc):
    """Turn a snapshot record ``failed`` with the error that ended it."""
    rec.update(Status=FAILED, LastModifiedTime=now_iso(),
               Error={"Code": getattr(exc, "code", errors.InternalError.code), "Message": str(exc)})
    rec.pop("Pid", None)


def split_segments(map_bytes):
    """The 16-byte ids of a chunk map cut into segments of SEGMENT_CHUNKS ids."""
    step = SEGMENT_CHUNKS * 16
    return [map_bytes[i:i + step] for i in range(0, len(map_bytes), step)]


def crashpoint(name):
    """Die here, as kill -9 would, when the crash tests ask for it (BLOCKSNAP_CRASHPOINT=name)."""
    if os.environ.get("BLOCKSNAP_CRASHPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _build(build, chunk_size):
    """Make a complete new repository in the directory ``build`` (which must not exist); returns its config.
    On any failure nothing of it is left."""
    os.mkdir(build)
    try:
        for sub in ("packs", "locks"):
            os.mkdir(os.path.join(build, sub))
        meta.create_env(os.path.join(build, "catalog"))
        meta.close_env(os.path.join(build, "catalog"))  # LMDB must not see it open under two names
        config = {
            "Format": FORMAT_NAME,
            "Version": FORMAT_VERSION,
            "RepositoryId": os.urandom(16).hex(),
            "ChunkSize": chunk_size,
            "SegmentChunks": SEGMENT_CHUNKS,
            "ChunkId": "xxh3-128",
            "Compression": "zstd:1",
            "CreationTime": now_iso(),
        }
        with open(os.path.join(build, "config"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(build)
        crashpoint("init-before-rename")
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return config


def _killed_init_leftovers(path):
    """The entries of ``path`` to clear before an init there, or None if anything in it is not exactly
    what a killed init leaves: its build directories (``.init-*``), the entries it had moved up (an empty
    catalog, empty ``packs/``, lock files), or, from versions before 2026-11-27, which built in place,
    ``config.tmp``. Anything else (a user's own files, a repository that lost only its config) is
    refused, never deleted. The caller holds the directory's lock, so no build here is live."""
    names = os.listdir(path)
    for name in names:
        target = os.path.join(path, name)
        if os.path.islink(target):
            return None
        if name.startswith(".init-"):
            if not os.path.isdir(target) or not set(os.listdir(target)) <= {"packs", "locks", "catalog", "config"}:
                return None
            target_catalog = os.path.join(target, "catalog")
            if os.path.exists(target_catalog) and not _empty_catalog(target_catalog):
                return None
        elif name == "packs":
            if not os.path.isdir(target) or any(files for _, _, files in os.walk(target)):
                return None
        elif name == "locks":
            if not os.path.isdir(target) or not all(n.endswith(".lock") and os.path.isfile(os.path.join(target, n))
                                                    for n in os.listdir(target)):
                return None
        elif name == "catalog":
            if not _empty_catalog(target):
                return None
        elif name == "config.tmp":
            try:
                with open(target, encoding="utf-8") as f:
                    if json.load(f).get("Format") != FORMAT_NAME:
                        return None
            except (OSError, ValueError, AttributeError):
                return None
        else:
            return None
    return names


def _empty_catalog(path):
    """True if ``path`` is an LMDB catalog directory holding no record at all (what init makes)."""
    if not os.path.isdir(path) or not set(os.listdir(path)) <= {"data.mdb", "lock.mdb"}:
        return False
    try:
        env = lmdb.open(path, readonly=True, lock=False, max_dbs=meta.MAX_DBS, subdir=True, create=False)
    except lmdb.Error:
        return False
    try:
        with env.begin() as txn:
            names = [k for k, _ in txn.cursor()]  # the main database lists the named ones
            for name in names:
                db = env.open_db(name, txn=txn, create=False)
                if txn.stat(db)["entries"]:
                    return False
        return True
    except lmdb.Error:
        return False
    finally:
        env.close()


class Repository:
    """An open repository. Use :meth:`init` or :meth:`open`; close with :meth:`close`."""

    def __init__(self, path, config):
        self.path = path
        self.config = config
        self.chunk_size = config["ChunkSize"]
        self.catalog = meta.Catalog(os.path.join(path, "catalog"))
        self.packs = PackStore(os.path.join(path, "packs"))
        self.locks_dir = os.path.join(path, "locks")

    # --- lifecycle -----------------------------------------------------------------------------------
    @classmethod
    def init(cls, path, chunk_size=DEFAULT_CHUNK_SIZE):
        """Create a repository at ``path`` (absent or an empty directory).

        Raises:
            InvalidChunkSize, RepositoryExists.
        """
        if not (MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE) or chunk_size & (chunk_size - 1):
            raise errors.InvalidChunkSize(f"(got {chunk_size})")
        if os.path.exists(os.path.join(path, "config")):
            raise errors.RepositoryExists(f"({path})")
        # The repository is built in a hidden directory and moved into place with config last: it
        # exists completely or not at all, whatever point a kill or a full disk stops this at. For a
        # path that does not exist yet (the per-user default on first use), the build directory is a
        # sibling renamed onto it in one step, so of two processes making it, one wins cleanly. An
        # existing directory (a mount point, say, or a symlink to one) cannot be replaced: holding a
        # lock on it, init builds inside it and moves the entries up, config last.
        if not os.path.isdir(path):
            home = os.path.dirname(os.path.abspath(path))
            os.makedirs(home, exist_ok=True)
            build = os.path.join(home, f".{os.path.basename(os.path.abspath(path))}.init-{os.urandom(6).hex()}")
            config = _build(build, chunk_size)
            try:
                os.rename(build, path)
            except OSError as exc:
                shutil.rmtree(build, ignore_errors=True)
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise errors.RepositoryExists(f"({path})") from None
                raise
            fsync_dir(home)
            return cls(path, config)
        dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX)  # another init here waits, then finds config
            if os.path.exists(os.path.join(path, "config")):
                raise errors.RepositoryExists(f"({path})")
            leftovers = _killed_init_leftovers(path)
            if leftovers is None:
                raise errors.RepositoryExists(f"({path} is a non-empty directory)")
            for name in leftovers:
                target = os.path.join(path, name)
                if os.path.isdir(target):
                    shutil.rmtree(target)
                else:
                    os.unlink(target)
            build = os.path.join(path, f".init-{os.urandom(6).hex()}")
            config = _build(build, chunk_size)
            try:
                for name in ("packs", "locks", "catalog", "config"):  # the repository exists after the last
                    os.rename(os.path.join(build, name), os.path.join(path, name))
                os.rmdir(build)
            except BaseException:
                shutil.rmtree(build, ignore_errors=True)
                raise
            fsync_dir(path)
        finally:
            os.close(dir_fd)
        return cls(path, config)

    @classmethod
    def open(cls, path):
        """Open an existing repository.

        Raises:
            RepositoryNotFound, RepositoryVersionUnsupported, RepositoryDamaged.
        """
        cfg_path = os.path.join(path, "config")
        try:
            with open(cfg_path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise errors.RepositoryNotFound(f"({path})") from None
        except (IsADirectoryError, NotADirectoryError):
            raise errors.RepositoryNotFound(f"({path})") from None
        except OSError as exc:
            raise errors.RepositoryError(f"{cfg_path}: {exc.strerror}") from None
        try:
            config = json.loads(text)
            if config.get("Format") != FORMAT_NAME:
                raise ValueError("not a blocksnap config")
            version = int(config["Version"])
            chunk_size = int(config["ChunkSize"])
        except (ValueError, KeyError, TypeError, AttributeError):
            if os.path.isdir(os.path.join(path, "catalog")):  # ours, with its config damaged
                raise errors.RepositoryDamaged(f"({path}: config is unreadable)") from None
            raise errors.RepositoryNotFound(f"({path}: config is not a blocksnap repository config)") from None
        if version > FORMAT_VERSION:
            raise errors.RepositoryVersionUnsupported(found=version, supported=FORMAT_VERSION)
        if not (MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE) or chunk_size & (chunk_size - 1):
            raise errors.RepositoryDamaged(f"config has an invalid ChunkSize {chunk_size}")
        if not os.path.isdir(os.path.join(path, "catalog")):
            raise errors.RepositoryDamaged("the catalog directory is missing")
        return cls(path, config)

    def close(self):
        self.packs.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- locks ---------------------------------------------------------------------------------------
    def repo_lock(self):
        return FileLock(os.path.join(self.locks_dir, "repo.lock"))

    def _gate(self):
        return FileLock(os.path.join(self.locks_dir, "gate.lock"))

    def lock_shared(self, on_wait=None):
        """``repo.lock`` taken shared, for a create, restore or verify; waits while gc runs or waits.

        Readers pass ``gate.lock`` (shared, for a moment) on their way in, and gc holds it exclusive
        while it waits for ``repo.lock``: new readers queue behind a waiting gc instead of overtaking
        it, so gc (and RetentionDays expiry) cannot be starved by overlapping creates and restores.
        ``on_wait`` is called once if it has to wait.
        """
        return self._lock_through_gate(False, on_wait)

    def lock_exclusive(self, on_wait=None):
        """``repo.lock`` taken exclusive (gc): closes the gate to new readers, then waits for the running
        ones. ``on_wait`` is called once if it has to wait."""
        return self._lock_through_gate(True, on_wait)

    def _lock_through_gate(self, exclusive, on_wait):
        gate = self._gate()
        lock = self.repo_lock()
        waited = False
        try:
            for f in (gate, lock):  # the gate in the same mode: shared for readers, exclusive for gc
                if not f.acquire(exclusive=exclusive, blocking=False):
                    if on_wait and not waited:
                        on_wait()
                    waited = True
                    f.acquire(exclusive=exclusive)
        except OSError as exc:
            raise errors.RepositoryError(f"(cannot lock {self.locks_dir}: {exc.strerror})") from None
        finally:
            gate.release()
        return lock

    def disk_lock_path(self, disk_id):
        return os.path.join(self.locks_dir, f"disk-{disk_id}.lock")

    def disk_lock(self, disk_id):
        return FileLock(self.disk_lock_path(disk_id))

    # --- disks ---------------------------------------------------------------------------------------
    def add_disk(self, image_path, name=None, kind="file", size=0):
        """Register an image file or block device; returns the disk record.

        Raises:
            DiskAlreadyRegistered if the same path is registered.
        """
        real = os.path.realpath(image_path)
        cat = self.catalog
        with cat.write() as txn:
            existing = txn.get(real.encode(), db=cat.db["disk_paths"])
            if existing is not None:
                raise errors.DiskAlreadyRegistered(f"({real} is {existing.decode()})")
            disk_id = new_id("d-")
            rec = {"DiskId": disk_id, "DiskName": name or os.path.basename(real), "Path": real,
                   "Type": kind, "Size": size, "CreationTime": now_iso()}
            cat.put_json(txn, "disks", disk_id, rec)
            txn.put(real.encode(), disk_id.encode(), db=cat.db["disk_paths"])
        return rec

    def get_disk(self, disk_id, txn=None):
        if not isinstance(disk_id, str) or not DISK_ID_RE.match(disk_id):
            raise errors.InvalidDiskIdNotFound(f"({disk_id!r})")
        if txn is None:
            with self.catalog.read() as t:
                rec = self.catalog.get_json(t, "disks", disk_id)
        else:
            rec = self.catalog.get_json(txn, "disks", disk_id)
        if rec is None:
            raise errors.InvalidDiskIdNotFound(f"({disk_id})")
        return rec

    def list_disks(self):
        with self.catalog.read() as txn:
            return list(self.catalog.iter_json(txn, "disks"))

    # --- snapshot records ----------------------------------------------------------------------------
    def get_snapshot(self, snapshot_id, txn=None):
        if not isinstance(snapshot_id, str) or not SNAPSHOT_ID_RE.match(snapshot_id):
            raise errors.InvalidSnapshotIdNotFound(f"({snapshot_id!r})")
        if txn is None:
            with self.catalog.read() as t:
                rec = self.catalog.get_json(t, "snapshots", snapshot_id)
        else:
            rec = self.catalog.get_json(txn, "snapshots", snapshot_id)
        if rec is None:
            raise errors.InvalidSnapshotIdNotFound(f"({snapshot_id})")
        return self._settle(rec)

    def list_snapshots(self, disk_id=None):
        """Snapshot records in creation order, optionally of one disk."""
        cat = self.catalog
        with cat.read() as txn:
            if disk_id is None:
                recs = list(cat.iter_json(txn, "snapshots"))
            else:
                self.get_disk(disk_id, txn)
                recs = list(self.disk_snapshots(txn, disk_id))
        recs.sort(key=lambda r: r["Seq"])
        return [self._settle(r) for r in recs]

    def disk_snapshots(self, txn, disk_id):
        """The snapshot records of one disk, oldest first (disk_snaps is ordered by sequence)."""
        cat = self.catalog
        prefix = disk_id.encode()
        with txn.cursor(db=cat.db["disk_snaps"]) as cur:
            if not cur.set_range(prefix):
                return
            for key, sid in cur:
                if not key.startswith(prefix):
                    break
                rec = cat.get_json(txn, "snapshots", sid)
                if rec is not None:
                    yield rec

    def _settle(self, rec):
        """A progressing record whose creator died is failed: record that and return it."""
        if rec["Status"] != PROGRESSING or is_held(self.disk_lock_path(rec["SourceDiskId"])):
            return rec
        cat = self.catalog
        with cat.write() as txn:
            cur = cat.get_json(txn, "snapshots", rec["SnapshotId"])
            if cur is None or cur["Status"] != PROGRESSING:
                return cur or rec
            mark_failed(cur, errors.CreateSnapshotFailed(
                f"(the creating process, pid {cur.get('Pid')}, ended before it finished)"))
            cat.put_json(txn, "snapshots", cur["SnapshotId"], cur)
        return cur

    def snapshot_map(self, snapshot_id, txn):
        """The full chunk map (16 bytes a chunk) of an accomplished snapshot."""
        cat = self.catalog
        segs = txn.get(snapshot_id.encode(), db=cat.db["snapmaps"])
        if segs is None:
            raise errors.RepositoryDamaged(f"snapshot {snapshot_id} has no chunk map")
        rec = cat.get_json(txn, "snapshots", snapshot_id)
        n = -(-rec["SourceDiskSize"] // self.chunk_size)
        parts = []
        for i in range(0, len(segs), 16):
            sid = segs[i:i + 16]
            if sid == ZERO_ID:
                nids = min(SEGMENT_CHUNKS, n - (i // 16) * SEGMENT_CHUNKS)
                parts.append(bytes(16 * nids))
                continue
            seg = cat.get_segment(txn, sid)
            if seg is None:
                raise errors.RepositoryDamaged(f"snapshot {snapshot_id} refers to a missing map segment {sid.hex()}")
            parts.append(seg[1])
        out = b"".join(parts)
        if len(out) != 16 * n:
            raise errors.RepositoryDamaged(f"snapshot {snapshot_id}: chunk map has the wrong length")
        return out

    def exclusive_bytes(self, snapshot_id, txn):
        """Stored bytes that deleting this snapshot would free (chunks nothing else references)."""
        return sum(entry[2] for entry in self.chunks_freed_by(txn, [snapshot_id]).values())

    def segment_uses(self, txn, snapshot_ids):
        """``{segment_id: places}``: how often these snapshots' maps use each (non-zero) segment."""
        uses = {}
        for snapshot_id in snapshot_ids:
            segs = txn.get(snapshot_id.encode(), db=self.catalog.db["snapmaps"]) or b""
            for i in range(0, len(segs), 16):
                sid = segs[i:i + 16]
                if sid != ZERO_ID:
                    uses[sid] = uses.get(sid, 0) + 1
        return uses

    def chunks_freed_by(self, txn, snapshot_ids):
        """``{chunk_id: index entry}`` of the chunks that deleting these snapshots would leave unreferenced."""
        cat = self.catalog
        seg_uses = self.segment_uses(txn, snapshot_ids)
        # A chunk's refcount counts its places in distinct segments (add_map_refs), however many
        # snapshots, or places in one map, use a segment: so count each place in a segment that
        # only these snapshots hold once.
        chunk_uses = {}
        for sid, uses in seg_uses.items():
            seg = cat.get_segment(txn, sid)
            if seg is None or seg[0] != uses:
                continue  # another snapshot holds this segment too
            ids = seg[1]
            for j in range(0, len(ids), 16):
                cid = ids[j:j + 16]
                if cid != ZERO_ID:
                    chunk_uses[cid] = chunk_uses.get(cid, 0) + 1
        freed = {}
        for cid, uses in chunk_uses.items():
            entry = cat.get_chunk(txn, cid)
            if entry is not None and entry[5] == uses:
                freed[cid] = entry
        return freed

    # --- reference counting --------------------------------------------------------------------------
    def add_map_refs(self, txn, seg_list):
        """Take references for a new snapshot's segments (and, for new segments, their chunks)."""
        cat = self.catalog
        seg_ids = []
        for ids in seg_list:
            if not any(ids):
                seg_ids.append(ZERO_ID)
                continue
            sid = hash128(ids)
            seg_ids.append(sid)
            seg = cat.get_segment(txn, sid)
            if seg is not None:
                cat.put_segment(txn, sid, seg[0] + 1, seg[1])
                continue
            cat.put_segment(txn, sid, 1, bytes(ids))
            for j in range(0, len(ids), 16):
                cid = bytes(ids[j:j + 16])
                if cid != ZERO_ID:
                    cat.add_chunk_ref(txn, cid, +1)
        return b"".join(seg_ids)

    def drop_map_refs(self, txn, segs):
        """Release a snapshot's segment references. Returns the chunk ids whose count fell to zero."""
        cat = self.catalog
        dead = []
        for i in range(0, len(segs), 16):
            sid = segs[i:i + 16]
            if sid == ZERO_ID:
                continue
            seg = cat.get_segment(txn, sid)
            if seg is None:
                raise errors.RepositoryDamaged(f"map segment {sid.hex()} is missing")
            if seg[0] > 1:
                cat.put_segment(txn, sid, seg[0] - 1, seg[1])
                continue
            txn.delete(sid, db=cat.db["segments"])
            ids = seg[1]
            for j in range(0, len(ids), 16):
                cid = ids[j:j + 16]
                if cid != ZERO_ID and cat.add_chunk_ref(txn, cid, -1) == 0:
                    dead.append(cid)
        return dead

    # --- deletion and space --------------------------------------------------------------------------
    def delete_snapshot(self, snapshot_id, reclaim=True):
        """Delete a snapshot; returns ``(chunks freed, bytes reclaimed now)``.

        Chunks nothing else references lose their index entries and their
        space right away when ``reclaim`` and no other process is creating or
        reading; otherwise the next gc reclaims them.

        Raises:
            InvalidSnapshotIdNotFound, IncorrectSnapshotStatus (a live create).
        """
        rec = self.get_snapshot(snapshot_id)
        if rec["Status"] == PROGRESSING:
            raise errors.IncorrectSnapshotStatus("(the snapshot is still being created)")
        cat = self.catalog
        with cat.write() as txn:
            rec = cat.get_json(txn, "snapshots", snapshot_id)
            if rec is None:
                raise errors.InvalidSnapshotIdNotFound(f"({snapshot_id})")
            segs = txn.get(snapshot_id.encode(), db=cat.db["snapmaps"])
            dead = self.drop_map_refs(txn, segs) if segs else []
            txn.delete(snapshot_id.encode(), db=cat.db["snapmaps"])
            txn.delete(snapshot_id.encode(), db=cat.db["snapshots"])
            txn.delete(rec["SourceDiskId"].encode() + meta.U64.pack(rec["Seq"]), db=cat.db["disk_snaps"])
            token = rec.get("ClientToken")
            if token:
                # A retry after a failed create takes the token over: only its holder releases it.
                held = cat.get_json(txn, "tokens", token)
                if held is not None and held.get("SnapshotId") == snapshot_id:
                    txn.delete(token.encode(), db=cat.db["tokens"])
        reclaimed = 0
        if dead and reclaim:
            lock = self.repo_lock()
            try:
                if lock.acquire(exclusive=True, blocking=False):
                    reclaimed = self.reclaim_dead(dead)
            finally:
                lock.release()
        return len(dead), reclaimed

    def reclaim_dead(self, chunk_ids):
        """Drop index entries of chunks still at refcount zero and give their space back.

        The caller holds the repository lock exclusively, so no process can be
        about to revive one of them. Entries go first, in one transaction that
        also records the ranges to punch; a crash before the punching leaves
        those ranges for gc (``reclaim`` database), never a live chunk without data.
        """
        cat = self.catalog
        with cat.write() as txn:
            for cid in chunk_ids:
                entry = cat.get_chunk(txn, cid)
                if entry is None or entry[5] != 0:
                    continue
                pack_id, offset, stored = entry[0], entry[1], entry[2]
                txn.delete(cid, db=cat.db["chunks"])
                txn.put(pack_id + meta.U64.pack(offset), meta.U64.pack(stored + 32), db=cat.db["reclaim"])
                pk = cat.get_pack(txn, pack_id)
                if pk is not None:
                    cat.put_pack(txn, pack_id, max(pk[0] - 1, 0), pk[1])
        return self.process_reclaim()

    def process_reclaim(self):
        """Punch or unlink what the ``reclaim`` database lists, then clear it. Returns bytes freed."""
        cat = self.catalog
        freed = 0
        with cat.read() as txn:
            todo = list(txn.cursor(db=cat.db["reclaim"]))
            live = {}
            for key, _ in todo:
                pid = key[:8]
                if pid not in live:
                    live[pid] = cat.get_pack(txn, pid)
        gone = set()
        for pid, pk in live.items():
            if pk is None or pk[0] == 0:
                try:
                    freed += os.stat(self.packs.path(pid)).st_blocks * 512
                except FileNotFoundError:
                    pass
                self.packs.remove(pid)
                gone.add(pid)
        for key, val in todo:
            pid = key[:8]
            if pid not in gone:
                freed += self.packs.punch(pid, meta.U64.unpack(key[8:])[0], meta.U64.unpack(val)[0])
        with cat.write() as txn:
            for key, _ in todo:
                txn.delete(key, db=cat.db["reclaim"])
            for pid in gone:
                txn.delete(pid, db=cat.db["packs"])
        return freed


def map_lmdb_error(exc):
    """A typed error for an LMDB failure."""
    if isinstance(exc, lmdb.MapFullError):
        return errors.RepositoryFull()
    if isinstance(exc, lmdb.DiskError) or "No space" in str(exc):
        return errors.NoSpace(f"(catalog: {exc})")
    if isinstance(exc, (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError)):
        return errors.RepositoryDamaged(f"(catalog: {exc})")
    return errors.RepositoryError(f"(catalog: {exc})")
