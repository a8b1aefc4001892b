"""A blocksnap repository: its store, its catalog, its locks, and the record-level operations.

The rooms (docs/FORMAT.md has the whole picture):

- ``store/layout.py``   the directory layout and ``init``;
- ``store/config.py``   the config file and the format versions;
- ``store/backend.py``  where packs and objects live (a local directory);
- ``store/packs.py``    the pack format and the pack writer;
- ``store/objects.py``  disk and snapshot objects (the store's copy of every record);
- ``store/catalog.py``  the LMDB index of the store, every key and value encoding of it;
- ``store/locks.py``    writer locks and the reader epochs;
- ``store/refs.py``     reference counts and the removal of dead data;
- ``store/gc.py``, ``store/rebuild.py``, ``store/upgrade.py``: gc, repair, the format-1 upgrade.

This module opens a repository and holds the operations on records: disks, snapshot records and their
deletion. Creating, restoring and verifying snapshots live in backup.py, restore.py and verify.py.
"""
import os
import re
import string

from . import errors
from .store import catalog as catalogs
from .store import config as configs
from .store import layout, objects, refs
from .store.backend import LocalBackend
from .store.catalog import TokenEntry
from .store.config import DEFAULT_CHUNK_SIZE, SEGMENT_CHUNKS, now_iso  # noqa: F401 (re-exported)
from .store.locks import ByteLock, FileLock, ReaderEpochs, is_held
from .store.packs import PackStore

ID_ALPHABET = string.ascii_lowercase + string.digits
DISK_ID_RE = re.compile(r"^d-[a-z0-9]{20}$")
SNAPSHOT_ID_RE = re.compile(r"^s-[a-z0-9]{20}$")
GROUP_ID_RE = re.compile(r"^rg-[a-z0-9]{20}$")
ZERO_ID = bytes(16)
# Quotas (config "Quotas"; docs/API.md, "Quotas"): the cloud's numbers unless the repository says otherwise.
SNAPSHOTS_PER_DISK = 256  # manual snapshots of one disk, as the cloud's quota (QuotaExceed.Snapshot past it)
# Creates running at once in the repository (QuotaExceed.ConcurrentSnapshotQuota past it). The cloud's only
# concurrency quota is per disk (10 at once on an ESSD, 1 on older disks); here one create of a disk runs at a
# time (IncorrectDiskStatus.CreatingSnapshot, as on the older disks), and creates of different disks are never
# refused for each other, as in the cloud: no repository-wide limit unless one is set.
CONCURRENT_SNAPSHOTS = None
QUOTA_NAMES = {"SnapshotsPerDisk": SNAPSHOTS_PER_DISK, "ConcurrentSnapshots": CONCURRENT_SNAPSHOTS}
MAX_QUOTA = 1 << 20
DEFAULT_GROUP_NAME = "default"
DEFAULT_GROUP_DISPLAY_NAME = "Default Resource Group"
_GROUP_NAME_RE = re.compile(r"^[A-Za-z0-9-]{3,50}$")

PROGRESSING = "progressing"
ACCOMPLISHED = "accomplished"
FAILED = "failed"
crashpoint = layout.crashpoint


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


def is_snapshot_id(text):
    return isinstance(text, str) and SNAPSHOT_ID_RE.match(text) is not None


def default_group_id(repository_id):
    """The id of a repository's default resource group: made from the RepositoryId, so it never changes and
    needs no record (every repository has it, from before resource groups too)."""
    from . import _native

    n = int.from_bytes(_native.hash128(f"default resource group of {repository_id}".encode()), "big")
    out = []
    for _ in range(20):
        n, r = divmod(n, len(ID_ALPHABET))
        out.append(ID_ALPHABET[r])
    return "rg-" + "".join(out)


def mark_failed(rec, exc):
    """Turn a snapshot record ``failed`` with the error that ended it."""
    rec.update(Status=FAILED, LastModifiedTime=now_iso(),
               Error={"Code": getattr(exc, "code", errors.InternalError.code), "Message": str(exc)})
    rec.pop("Pid", None)


def release_token(txn, rec):
    """Forget the ClientToken of a record being removed, if this record holds it: a retry after a failed
    create takes the token over, and only its holder releases it."""
    token = rec.get("ClientToken")
    if token:
        held = txn.token(token)
        if held is not None and held.snapshot_id == rec["SnapshotId"]:
            txn.delete_token(token)


def died(rec):
    """The failed record a reader shows for a create whose process is gone (nothing is written)."""
    out = dict(rec)
    mark_failed(out, errors.CreateSnapshotFailed(
        f"(the creating process, pid {rec.get('Pid')}, ended before it finished)"))
    out["LastModifiedTime"] = rec["LastModifiedTime"]
    return out


def _writable(path):
    """True if this process can write the repository at ``path`` (not read-only media, not immutable)."""
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return False
    except OSError:
        return False
    parts = [".", "packs", "locks"] + [p for p in ("catalog", os.path.join("catalog", "data.mdb"))
                                       if os.path.exists(os.path.join(path, p))]
    return all(os.access(os.path.join(path, p), os.W_OK) for p in parts)


class Repository:
    """An open repository. Use :meth:`init` or :meth:`open`; close with :meth:`close`."""

    def __init__(self, path, config, catalog=None):
        self.path = path
        self.config = config
        self.version = config["Version"]
        self.repository_id = config["RepositoryId"]
        self.chunk_size = config["ChunkSize"]
        self.backend = LocalBackend(path)
        self.packs = PackStore(self.backend)
        self.locks_dir = os.path.join(path, "locks")
        self.epochs = ReaderEpochs(self.locks_dir)
        self.catalog = catalog
        self.writable = catalog.writable if catalog is not None else _writable(path)
        self.last_problems = []  # what the last delete's check before removing data found

    # --- lifecycle -----------------------------------------------------------------------------------
    @classmethod
    def init(cls, path, chunk_size=DEFAULT_CHUNK_SIZE):
        """Create a repository at ``path`` (absent or an empty directory).

        Raises:
            InvalidChunkSize, RepositoryExists.
        """
        layout.init(path, chunk_size)
        return cls.open(path)

    @classmethod
    def open(cls, path, need_catalog=True):
        """Open an existing repository.

        Args:
            need_catalog: False for repair and upgrade, which work without a usable catalog.
        Raises:
            RepositoryNotFound, RepositoryVersionUnsupported, RepositoryDamaged, UpgradeRequired,
            CatalogMissing, CatalogDamaged, CatalogStale.
        """
        config = configs.load(path)
        if config["Version"] < configs.FORMAT_VERSION:
            if need_catalog:
                raise errors.UpgradeRequired(found=config["Version"], current=configs.FORMAT_VERSION)
            return cls(path, config)
        if not need_catalog:
            return cls(path, config)
        cat = catalogs.Catalog(os.path.join(path, "catalog"), config["RepositoryId"], writable=_writable(path))
        return cls(path, config, cat)

    def close(self):
        self.packs.close()
        if self.catalog is not None:
            self.catalog.close()
            self.catalog = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def require_writable(self):
        if not self.writable:
            raise errors.RepositoryReadOnly(f"({self.path})")

    # --- locks ---------------------------------------------------------------------------------------
    def repo_lock(self):
        return FileLock(os.path.join(self.locks_dir, "repo.lock"))

    def _gate(self):
        return FileLock(os.path.join(self.locks_dir, "gate.lock"))

    def lock_shared(self, on_wait=None):
        """``repo.lock`` taken shared, for a create; waits while gc runs or waits.

        Creates pass ``gate.lock`` (shared, for a moment) on their way in, and gc holds it exclusive
        while it waits for ``repo.lock``: new creates queue behind a waiting gc instead of overtaking
        it, so gc (and RetentionDays expiry) cannot be starved by overlapping creates.
        ``on_wait`` is called once if it has to wait.
        """
        return self._lock_through_gate(False, on_wait)

    def lock_exclusive(self, on_wait=None):
        """``repo.lock`` taken exclusive (gc, repair, upgrade): closes the gate to new creates, then waits
        for the running ones. ``on_wait`` is called once if it has to wait."""
        return self._lock_through_gate(True, on_wait)

    def _lock_through_gate(self, exclusive, on_wait):
        self.require_writable()
        gate = self._gate()
        lock = self.repo_lock()
        waited = False
        try:
            for f in (gate, lock):  # the gate in the same mode: shared for creates, exclusive for gc
                if not f.acquire(exclusive=exclusive, blocking=False):
                    if on_wait and not waited:
                        on_wait()
                    waited = True
                    f.acquire(exclusive=exclusive)
        except OSError as exc:
            lock.release()
            raise errors.translate(exc, f"cannot lock {self.locks_dir}") from None
        finally:
            gate.release()
        return lock

    def reader(self):
        """Register a reader (restore, verify) for as long as the returned lock is held: no data it can see
        is removed meanwhile. Never waits. Release it with ``.release()``."""
        def epoch():
            with self.catalog.read() as txn:
                return txn.epoch()
        try:
            return self.epochs.enter(epoch)
        except OSError as exc:
            raise errors.translate(exc, f"cannot register a reader in {self.locks_dir}") from None

    def disk_lock_path(self, disk_id):
        return os.path.join(self.locks_dir, f"disk-{disk_id}.lock")

    def disk_lock(self, disk_id):
        return FileLock(self.disk_lock_path(disk_id))

    def token_lock(self, token):
        """The lock a create holds while it runs for a ClientToken: one byte of ``tokens.lock`` at a hash
        of the token (62 bits: two tokens sharing a byte is not a practical concern)."""
        from . import _native

        offset = int.from_bytes(_native.hash64(token.encode("ascii")), "big") >> 2
        return ByteLock(os.path.join(self.locks_dir, "tokens.lock"), offset)

    def create_slot(self, quota):
        """One of the ``quota`` slots of running creates (bytes of ``creates.lock``), taken, or None if every
        slot is held: QuotaExceed.ConcurrentSnapshotQuota."""
        path = os.path.join(self.locks_dir, "creates.lock")
        for n in range(quota):
            lock = ByteLock(path, n)
            if lock.acquire():
                return lock
        return None

    # --- quotas --------------------------------------------------------------------------------------
    def quotas(self):
        """The repository's quotas: the config's ``Quotas`` over the defaults (read anew each time, so that a
        long-running api-server sees a change)."""
        try:
            cfg = configs.load(self.path)
        except errors.BlocksnapError:
            cfg = self.config
        given = cfg.get("Quotas") if isinstance(cfg.get("Quotas"), dict) else {}
        out = dict(QUOTA_NAMES)
        for name in QUOTA_NAMES:
            value = given.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_QUOTA:
                out[name] = value
        return out

    def set_quotas(self, **values):
        """Write quotas (``SnapshotsPerDisk``, ``ConcurrentSnapshots``: 1 to 2**20, or None for the default: 256
        and no limit) into the config, atomically. Returns the quotas now in force.

        Raises:
            InvalidParameter, RepositoryReadOnly.
        """
        self.require_writable()
        for name, value in values.items():
            if name not in QUOTA_NAMES:
                raise errors.InvalidParameter(f"({name!r} is no quota; the quotas are {', '.join(QUOTA_NAMES)})")
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 1 <= value <= MAX_QUOTA):
                raise errors.InvalidParameter(f"({name} must be a whole number from 1 to {MAX_QUOTA}, got {value!r})")
        with FileLock(os.path.join(self.locks_dir, "config.lock")) as lock:
            lock.acquire(exclusive=True)
            cfg = configs.load(self.path)
            quotas = dict(cfg.get("Quotas") or {})
            for name, value in values.items():
                if value is None or value == QUOTA_NAMES[name]:
                    quotas.pop(name, None)
                else:
                    quotas[name] = value
            if quotas:
                cfg["Quotas"] = quotas
            else:
                cfg.pop("Quotas", None)
            try:
                configs.write(os.path.join(self.path, "config"), cfg)
            except OSError as exc:
                raise errors.translate(exc, "writing the config") from None
            self.config = cfg
        return self.quotas()

    # --- resource groups -----------------------------------------------------------------------------
    @property
    def default_group(self):
        return default_group_id(self.repository_id)

    def _default_group_record(self):
        return {"ResourceGroupId": self.default_group, "Name": DEFAULT_GROUP_NAME,
                "DisplayName": DEFAULT_GROUP_DISPLAY_NAME, "CreationTime": self.config.get("CreationTime", ""),
                "Status": "OK"}

    def get_group(self, group_id, txn=None):
        """A resource group's record (the default group's too).

        Raises:
            InvalidResourceGroupNotFound.
        """
        if group_id == self.default_group:
            return self._default_group_record()
        rec = None
        if isinstance(group_id, str) and GROUP_ID_RE.match(group_id):
            if txn is None:
                with self.catalog.read() as t:
                    rec = t.group(group_id)
            else:
                rec = txn.group(group_id)
        if rec is None:
            raise errors.InvalidResourceGroupNotFound(f"({group_id!r})")
        return dict(rec, Status="OK")

    def list_groups(self):
        with self.catalog.read() as txn:
            recs = sorted(txn.groups(), key=lambda r: (r["CreationTime"], r["ResourceGroupId"]))
        return [self._default_group_record()] + [dict(r, Status="OK") for r in recs]

    def create_group(self, name, display_name=None):
        """Register a resource group (its object first, then its record). Returns its record.

        Raises:
            InvalidParameter (a name that is not 3-50 letters, digits and hyphens, or is taken; a display name
            that is not 1-50 characters), RepositoryReadOnly.
        """
        self.require_writable()
        if not isinstance(name, str) or not _GROUP_NAME_RE.match(name):
            raise errors.InvalidParameter(f"(a resource group Name is 3-50 letters, digits and hyphens, got {name!r})")
        if display_name is None:
            display_name = name
        if not isinstance(display_name, str) or not 1 <= len(display_name) <= 50:
            raise errors.InvalidParameter(f"(a resource group DisplayName is 1-50 characters, got {display_name!r})")
        if name == DEFAULT_GROUP_NAME or any(g["Name"] == name for g in self.list_groups()):
            raise errors.InvalidParameter(f"(a resource group named {name!r} exists)")
        rec = {"ResourceGroupId": new_id("rg-"), "Name": name, "DisplayName": display_name,
               "CreationTime": now_iso()}
        lock = self.lock_shared()  # repair, which holds it exclusive, must see the object or the record
        try:
            try:
                self.backend.put_object("groups", rec["ResourceGroupId"], objects.encode_group(rec))
            except OSError as exc:
                raise errors.translate(exc, "writing the resource group object") from None
            with self.catalog.write() as txn:
                if any(g["Name"] == name for g in txn.groups()):  # made meanwhile by another process
                    self.backend.delete_object("groups", rec["ResourceGroupId"])
                    raise errors.InvalidParameter(f"(a resource group named {name!r} exists)")
                txn.put_group(rec)
        finally:
            lock.release()
        return dict(rec, Status="OK")

    def delete_group(self, group_id):
        """Remove an empty resource group (its object first, then its record).

        Raises:
            InvalidResourceGroupNotFound, InvalidParameter (the default group), ResourceGroupInUse.
        """
        self.require_writable()
        if group_id == self.default_group:
            raise errors.InvalidParameter("(the default resource group cannot be deleted)")
        self.get_group(group_id)
        lock = self.lock_shared()
        try:
            with self.catalog.write() as txn:
                if txn.group(group_id) is None:
                    raise errors.InvalidResourceGroupNotFound(f"({group_id!r})")
                if self._group_in_use(txn, group_id):
                    raise errors.ResourceGroupInUse(f"({group_id})")
                try:
                    self.backend.delete_object("groups", group_id)
                except OSError as exc:
                    raise errors.translate(exc, "removing the resource group object") from None
                txn.delete_group(group_id)
        finally:
            lock.release()

    def _group_in_use(self, txn, group_id):
        if self.catalog.indexed:
            value = group_id.encode()
            return (txn.index_count(catalogs.KIND_SNAPSHOT, catalogs.F_GROUP, value)
                    + txn.index_count(catalogs.KIND_DISK, catalogs.F_GROUP, value)) > 0
        return any(r.get("ResourceGroupId") == group_id for r in txn.snapshots() if not r.get("Deleting"))

    def group_field(self, group_id):
        """What a record stores for ``group_id``: nothing for the default group (records from before groups
        are in it too), else the id. Raises InvalidResourceGroupNotFound for a group that does not exist."""
        if group_id is None or group_id == self.default_group:
            return None
        self.get_group(group_id)
        return group_id

    # --- disk operation locks ----------------------------------------------------------------------
    def set_disk_lock(self, disk_id, reason, locked):
        """Add (``locked``) or remove an OperationLock of a disk (its LockReason, ``security`` or ``financial``):
        the disk object is written anew, then the record, in one catalog transaction. Returns the record.

        Raises:
            InvalidDiskIdNotFound, InvalidParameter (an unknown reason), RepositoryReadOnly.
        """
        from .describe import LOCK_REASONS

        self.require_writable()
        if reason not in LOCK_REASONS:
            raise errors.InvalidParameter(f"(a LockReason is one of {', '.join(LOCK_REASONS)}, got {reason!r})")
        self.get_disk(disk_id)
        with self.catalog.write() as txn:
            rec = self.get_disk(disk_id, txn)
            locks = [x for x in rec.get("OperationLocks", []) if x["LockReason"] != reason]
            if locked:
                locks.append({"LockReason": reason})
            if locks:
                rec["OperationLocks"] = locks
            else:
                rec.pop("OperationLocks", None)
            try:
                self.backend.put_object("disks", disk_id, objects.encode_disk(catalogs.disk_object_fields(rec)))
            except OSError as exc:
                raise errors.translate(exc, "writing the disk object") from None
            txn.put_disk(rec)
        return rec

    # --- disks ---------------------------------------------------------------------------------------
    def add_disk(self, image_path, name=None, kind="file", size=0, on_wait=None, extra=None):
        """Register an image file or block device; returns the disk record.

        The disk's object is written to the store before the catalog names it.

        Raises:
            DiskAlreadyRegistered if the same path is registered.
        """
        self.require_writable()
        real = os.path.realpath(image_path)
        with self.catalog.read() as txn:
            existing = txn.disk_id_of_path(real)
        if existing is not None:
            raise errors.DiskAlreadyRegistered(f"({real} is {existing})")
        disk_id = new_id("d-")
        with self.catalog.write() as txn:
            seq = txn.next_seq(catalogs.META_DISK_SEQ)  # registration order, for DescribeDisks
        rec = {"DiskId": disk_id, "DiskName": name or os.path.basename(real), "Path": real,
               "Type": kind, "Size": size, "CreationTime": now_iso(), "Seq": seq}
        rec.update(extra or {})  # Format, BackingDirs, AllowDirty where not the defaults (catalog.DISK_OPTIONAL)
        # Held shared like a create: gc, which removes the objects of disks a killed 'disk add' left
        # unrecorded, cannot take this one's for such a leftover.
        lock = self.lock_shared(on_wait)
        try:
            try:
                self.backend.put_object("disks", disk_id, objects.encode_disk(rec))
            except OSError as exc:
                raise errors.translate(exc, "writing the disk object") from None
            crashpoint("disk-object-written")
            with self.catalog.write() as txn:
                existing = txn.disk_id_of_path(real)
                if existing is not None:  # registered meanwhile by another process
                    self.backend.delete_object("disks", disk_id)
                    raise errors.DiskAlreadyRegistered(f"({real} is {existing})")
                txn.put_disk(rec)
                txn.put_disk_path(real, disk_id)
        finally:
            lock.release()
        return rec

    def get_disk(self, disk_id, txn=None):
        if not isinstance(disk_id, str) or not DISK_ID_RE.match(disk_id):
            raise errors.InvalidDiskIdNotFound(f"({disk_id!r})")
        if txn is None:
            with self.catalog.read() as t:
                rec = t.disk(disk_id)
        else:
            rec = txn.disk(disk_id)
        if rec is None:
            raise errors.InvalidDiskIdNotFound(f"({disk_id})")
        return rec

    def list_disks(self):
        with self.catalog.read() as txn:
            return list(txn.disks())

    # --- snapshot records ----------------------------------------------------------------------------
    def get_snapshot(self, snapshot_id, txn=None):
        """A snapshot's record as readers see it (see :meth:`view`).

        Raises:
            InvalidSnapshotIdNotFound, CatalogDamaged.
        """
        if not isinstance(snapshot_id, str) or not SNAPSHOT_ID_RE.match(snapshot_id):
            raise errors.InvalidSnapshotIdNotFound(f"({snapshot_id!r})")
        if txn is None:
            with self.catalog.read() as t:
                rec = t.snapshot(snapshot_id)
        else:
            rec = txn.snapshot(snapshot_id)
        if rec is None or rec.get("Deleting"):
            raise errors.InvalidSnapshotIdNotFound(f"({snapshot_id})")
        return self.view(rec)

    def list_snapshots(self, disk_id=None):
        """Snapshot records (as readers see them) in creation order, optionally of one disk."""
        with self.catalog.read() as txn:
            if disk_id is None:
                recs = list(txn.snapshots())
            else:
                self.get_disk(disk_id, txn)
                recs = []
                for sid in txn.disk_snapshot_ids(disk_id):
                    rec = txn.snapshot(sid)
                    if rec is not None:
                        recs.append(rec)
        recs.sort(key=lambda r: r["Seq"])
        return [self.view(r) for r in recs if not r.get("Deleting")]

    def view(self, rec):
        """A record as readers see it, without writing anything: a ``progressing`` record whose creating
        process is gone is ``failed`` (or ``accomplished``, if that process stored the snapshot's object
        and died before the catalog's commit: the store is the truth; the next writer records it)."""
        if rec["Status"] != PROGRESSING or is_held(self.disk_lock_path(rec["SourceDiskId"])):
            return rec
        stored = self.stored_snapshot(rec["SnapshotId"])
        if stored is not None:
            return dict(stored[0], Seq=rec["Seq"])
        return died(rec)

    def stored_snapshot(self, snapshot_id):
        """``(record, segment ids)`` from the snapshot's object in the store, or None (missing or damaged)."""
        try:
            return objects.decode_snapshot(snapshot_id, self.backend.get_object("snapshots", snapshot_id))
        except (errors.StoreDamaged, OSError):
            return None

    def segment_ids(self, txn, rec):
        """The segment ids of an accomplished snapshot's map (from the store if the catalog has not
        recorded it yet, see :meth:`view`)."""
        segs = txn.snapshot_map(rec["SnapshotId"], refs.segments_of_size(rec["SourceDiskSize"], rec["ChunkSize"]))
        if segs is not None:
            return segs
        stored = self.stored_snapshot(rec["SnapshotId"])  # its map's length is checked against its size
        if stored is not None:
            return stored[1]
        raise errors.CatalogDamaged(f"(snapshot {rec['SnapshotId']} has no chunk map)")

    def exclusive_bytes(self, txn, rec):
        """Stored bytes that deleting this snapshot would free now."""
        if rec["Status"] != ACCOMPLISHED or txn.snapshot_map(rec["SnapshotId"], refs.segments_of_size(
                rec["SourceDiskSize"], rec["ChunkSize"])) is None:
            return 0
        return refs.exclusive_bytes(txn, rec)

    def roll_forward(self, txn, rec):
        """Record in the catalog a snapshot whose creator stored its object and died before the commit
        (writers; inside their write transaction). Returns the accomplished record, or None if the store
        holds no such object (then the caller marks it failed)."""
        stored = self.stored_snapshot(rec["SnapshotId"])
        if stored is None:
            return None
        done, seg_ids = stored
        done = dict(done, Seq=rec["Seq"])
        refs.add_map_refs(txn, seg_ids)
        txn.put_snapshot_map(done["SnapshotId"], seg_ids)
        txn.put_snapshot(done)
        if done.get("ClientToken") and done.get("ParamsHash"):
            txn.put_token(done["ClientToken"], TokenEntry(done["ParamsHash"], done["SnapshotId"]))
        disk = txn.disk(done["SourceDiskId"])
        if disk is not None:
            disk["Size"] = done["SourceDiskSize"]
            txn.put_disk(disk)
        return done

    def manual_snapshot_count(self, txn, disk_id):
        """The manual (SnapshotType user) snapshots of a disk that hold or will hold data: accomplished and
        progressing ones (a failed one holds nothing). From the indexes' keys where the catalog has them."""
        if self.catalog.indexed:
            from . import describe

            S = catalogs.KIND_SNAPSHOT

            def lists(*extra):
                return [describe.IndexPosting(txn, S, catalogs.F_DISK, disk_id.encode()),
                        describe.IndexPosting(txn, S, catalogs.F_TYPE, catalogs.DEFAULT_TYPE.encode()), *extra]

            failed = describe.IndexPosting(txn, S, catalogs.F_STATUS, FAILED.encode())
            return describe.count(lists()) - describe.count(lists(failed))
        n = 0
        for sid in txn.disk_snapshot_ids(disk_id):
            rec = txn.snapshot(sid)
            if rec is not None and not rec.get("Deleting") and rec["Status"] != FAILED \
                    and (rec.get("SnapshotType") or catalogs.DEFAULT_TYPE) == catalogs.DEFAULT_TYPE:
                n += 1
        return n

    def settle_dead(self, txn, disk_id=None):
        """Record the end of every create of ``disk_id`` (or of all disks) whose process is gone: rolled
        forward from the store, or failed. Writers only, inside their write transaction."""
        sids = txn.disk_snapshot_ids(disk_id) if disk_id else txn.snapshot_ids()
        for sid in sids:
            rec = txn.snapshot(sid)
            if rec is None or rec["Status"] != PROGRESSING or rec.get("Deleting"):
                continue
            if disk_id is None and is_held(self.disk_lock_path(rec["SourceDiskId"])):
                continue
            if self.roll_forward(txn, rec) is None:
                txn.put_snapshot(died(rec) | {"LastModifiedTime": now_iso()})

    # --- deletion ------------------------------------------------------------------------------------
    def delete_snapshot(self, snapshot_id, reclaim=True):
        """Delete a snapshot; returns ``(chunks freed, bytes reclaimed now)``.

        Three steps, so that a crash between any two leaves no doubt: one transaction marks the record
        ``Deleting`` (readers no longer see it), its object leaves the store, one transaction drops its
        references and the record. A marked record is a delete in progress, which the next delete of it
        or gc finishes; a record whose object is missing without the mark is damage. Chunks nothing else
        references lose their index entries and their space right away when ``reclaim`` and no create is
        running (and readers that could still see them have finished); otherwise the next gc reclaims them.

        Raises:
            InvalidSnapshotIdNotFound, IncorrectSnapshotStatus (a live create), RepositoryReadOnly.
        """
        self.require_writable()
        with self.catalog.read() as txn:
            rec = txn.snapshot(snapshot_id) if isinstance(snapshot_id, str) and SNAPSHOT_ID_RE.match(snapshot_id) \
                else None
        if rec is None:
            raise errors.InvalidSnapshotIdNotFound(f"({snapshot_id!r})")
        if not rec.get("Deleting") and self.view(rec)["Status"] == PROGRESSING:
            raise errors.IncorrectSnapshotStatus("(the snapshot is still being created)")
        dead = self._finish_delete(snapshot_id)
        freed_chunks, reclaimed = 0, 0
        self.last_problems = []
        if dead:
            with self.catalog.read() as txn:
                _, chunks = refs.Reclaim(self, False).expand(txn, dead, ())
            freed_chunks = len(chunks)
            if reclaim:
                reclaimed, self.last_problems = refs.reclaim(self, dead_segments=dead)
                kept = sum(1 for p in self.last_problems if "ChunkId" in p)
                freed_chunks -= kept  # the mark kept these: their counts were wrong
        return freed_chunks, reclaimed

    def _finish_delete(self, snapshot_id):
        """The three steps of a delete (see :meth:`delete_snapshot`), from wherever an earlier one stopped.
        Returns the segments that fell to zero."""
        with self.catalog.write() as txn:
            rec = txn.snapshot(snapshot_id)
            if rec is None:
                raise errors.InvalidSnapshotIdNotFound(f"({snapshot_id})")
            if not rec.get("Deleting"):
                rec["Deleting"] = True
                txn.put_snapshot(rec)
        crashpoint("delete-marked")
        try:
            self.backend.delete_object("snapshots", snapshot_id)
        except OSError as exc:
            raise errors.translate(exc, f"removing the object of {snapshot_id}") from None
        crashpoint("delete-object-gone")
        with self.catalog.write() as txn:
            rec = txn.snapshot(snapshot_id)
            if rec is None:
                raise errors.InvalidSnapshotIdNotFound(f"({snapshot_id})")
            dead = []
            segs = None
            if rec["Status"] == ACCOMPLISHED:
                segs = txn.snapshot_map(snapshot_id, refs.segments_of_size(rec["SourceDiskSize"], rec["ChunkSize"]))
            if segs is not None:
                dead = refs.drop_map_refs(txn, segs)
            txn.delete_snapshot(rec)
            release_token(txn, rec)
        return dead

    def finish_deletes(self):
        """Finish every delete a crash interrupted (writers: gc). Returns the segments that fell to zero."""
        with self.catalog.read() as txn:
            pending = [sid for sid in txn.snapshot_ids() if (txn.snapshot(sid) or {}).get("Deleting")]
        dead = []
        for sid in pending:
            dead.extend(self._finish_delete(sid))
        return dead
