"""The catalog: an LMDB index of the store, with every key and value encoding of it (docs/FORMAT.md, "The catalog").

This module owns the catalog's data model: no other module builds a key or decodes a value. The catalog is
an index: everything in it can be rebuilt from the store (``blocksnap.store.rebuild``), so damage to it costs a
``blocksnap repair``, never a snapshot. It is still checked on every read, because it is what restores read:

- Every value ends in an 8-byte XXH3-64 of its key and payload, so a flipped bit, a zeroed sector or a
  value moved to another key is found on the read that would have used it.
- Values are read as buffers into LMDB's map and their length is checked before a byte is copied. py-lmdb
  still touches every page of a value first, so a damaged length in an LMDB page could run a read off the
  end of the file (SIGBUS): the map is registered with the C core's SIGBUS guard (csrc/guard.c), which
  answers such a read with a zero page; the value then fails its checks, and the environment that got a
  zero page is closed and opened anew before it is used again.
- Before the environment is opened, its meta pages are read with plain ``pread`` and the file's length
  checked against them: a truncated ``data.mdb`` is reported as damage instead of killing the process.
- Records are named types (``ChunkEntry``, ``SegmentEntry``, ...) or JSON checked against a schema.

One LMDB database holds every table, each under a one-byte key prefix (``TABLES``). Named LMDB databases
are not used: py-lmdb opens a named database's handle in a write transaction when the environment is
writable, so every reader would wait for any writer (LMDB's readers are otherwise lock-free). Integers are
big-endian, so byte order is numeric order.
"""
import errno
import json
import os
import struct
import threading
from collections import namedtuple

import lmdb

from .. import _native, errors

CATALOG_VERSION = 3  # 3: the indexes of DescribeSnapshots and DescribeDisks (version 2 is indexed when opened)
INDEXED_FROM = 3
OLDEST_CATALOG = 2
DEFAULT_MAP_SIZE = 1 << 38  # 256 GiB of address space; the file grows only as it is used
CHECKSUM_LEN = 8
ID_LEN = 16
ZERO_ID = bytes(ID_LEN)

# table -> key prefix (docs/FORMAT.md, "Catalog tables")
TABLES = {
    "meta": b"M",        # name (ASCII)                     -> per name, below
    "disks": b"D",       # DiskId (22)                      -> disk record (JSON)
    "disk_paths": b"P",  # XXH3-128 of the image path (16)  -> DiskId (22)
    "snapshots": b"S",   # SnapshotId (22)                  -> snapshot record (JSON)
    "disk_snaps": b"N",  # DiskId (22) + Seq (u64)          -> SnapshotId (22)
    "maps": b"m",        # SnapshotId (22)                  -> segment ids (16 each)
    "segments": b"G",    # segment id (16)                  -> pack id (8) + offset (u64) + chunk ids (16 each)
    "segment_refs": b"g",  # segment id (16)                -> refcount (u32)
    "chunks": b"C",      # chunk id (16)                    -> chunk entry (32 bytes)
    "packs": b"K",       # pack id (8)                      -> pack entry (12 bytes)
    "reclaim": b"R",     # pack id (8) + offset (u64)       -> length (u64) + epoch (u64)
    "tokens": b"T",      # ClientToken (ASCII, 1-64)        -> {"ParamsHash", "SnapshotId"} (JSON)
    "index": b"I",       # kind (1) + field (1) + XXH3-64 of the value (8) + order key -> the record's id (22)
    "index_counts": b"i",  # kind (1) + field (1) + XXH3-64 of the value (8) -> entries (u64)
    "groups": b"Q",      # ResourceGroupId (ASCII)          -> resource group record (JSON)
}
META_CATALOG = b"catalog"  # -> {"Version", "RepositoryId"} (JSON): whose index this is
META_EPOCH = b"epoch"      # -> u64: the reader epoch (blocksnap.store.locks.ReaderEpochs)
META_SEQ = b"seq"          # -> u64: the last snapshot sequence number
META_DISK_SEQ = b"disk_seq"  # -> u64: the last disk sequence number (a disk's Seq orders DescribeDisks)

U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
# chunk entry: pack id, record offset, stored length, raw length, codec, 3 reserved, refcount
CHUNK = struct.Struct(">8sQIIB3xI")
SEGMENT_HEAD = struct.Struct(">8sQ")  # pack id, record offset; the chunk ids follow
PACK = struct.Struct(">QI")  # pack size in bytes, records it holds
RECLAIM = struct.Struct(">QQ")  # length to give back, epoch it was recorded in
MAX_JSON = 1 << 20  # no record of ours comes near this; a longer value is damage
MAX_SEGMENT_IDS = 256  # chunk ids in a segment (the repository's SegmentChunks)
DISK_ID_LEN = SNAPSHOT_ID_LEN = 22


# Named record types (collections.namedtuple: typing's import costs every command 5 ms).
ChunkEntry = namedtuple("ChunkEntry", "pack_id offset stored_len raw_len codec refcount")
ChunkEntry.__doc__ = """Where a chunk is stored (pack id, offset of its record header, stored bytes after the header,
raw length, codec), and how many places in stored segments name it (refcount)."""
SegmentEntry = namedtuple("SegmentEntry", "pack_id offset ids")
SegmentEntry.__doc__ = "A chunk-map segment: where its record is in the store, and its chunk ids."
PackEntry = namedtuple("PackEntry", "size records")
PackEntry.__doc__ = "A pack the index knows: its size in bytes and how many records it holds."
ReclaimEntry = namedtuple("ReclaimEntry", "length epoch")
ReclaimEntry.__doc__ = "A range to give back, and the reader epoch it was recorded in."
TokenEntry = namedtuple("TokenEntry", "params_hash snapshot_id")
TokenEntry.__doc__ = "A ClientToken's request: the hash of its parameters and the snapshot it made."


# --- record schemas: what a JSON record must hold to be used --------------------------------------------
_OPT = object()
DISK_SCHEMA = {"DiskId": str, "DiskName": str, "Path": str, "Type": str, "Size": int, "CreationTime": str}
SNAPSHOT_SCHEMA = {
    "SnapshotId": str, "Seq": int, "SourceDiskId": str, "SourceDiskSize": int, "SourceDiskType": str,
    "Status": str, "Progress": str, "CreationTime": str, "LastModifiedTime": str, "ChunkSize": int,
    "ParentSnapshotId": (str, type(None)),
}
STATUSES = ("progressing", "accomplished", "failed")
# Fields a disk record holds only where they are not the default (absent: a raw disk, only its own
# directory tree followed, a dirty qcow2 refused): records written before they existed stay valid.
DISK_FORMATS = ("raw", "qcow2")
DISK_OPTIONAL = ("Format", "BackingDirs", "AllowDirty", "ImagePath", "OperationLocks", "Seq")
GROUP_SCHEMA = {"ResourceGroupId": str, "Name": str, "DisplayName": str, "CreationTime": str}


def disk_object_fields(rec):
    """The fields of a disk record that its store object holds (the schema's and the optional ones set)."""
    return {k: rec[k] for k in list(DISK_SCHEMA) + [k for k in DISK_OPTIONAL if k in rec]}


def check_disk_record(rec, what="disk record"):
    """Raise CatalogDamaged unless ``rec`` is a disk record, its optional fields included."""
    check_record(rec, DISK_SCHEMA, what)
    if rec.get("Format", "raw") not in DISK_FORMATS:
        raise errors.CatalogDamaged(f"({what}: unknown Format {rec.get('Format')!r})")
    dirs = rec.get("BackingDirs", [])
    if not isinstance(dirs, list) or not all(isinstance(d, str) for d in dirs):
        raise errors.CatalogDamaged(f"({what}: field BackingDirs is of the wrong type)")
    if not isinstance(rec.get("ImagePath", ""), str):
        raise errors.CatalogDamaged(f"({what}: field ImagePath is of the wrong type)")
    if not isinstance(rec.get("AllowDirty", False), bool):
        raise errors.CatalogDamaged(f"({what}: field AllowDirty is of the wrong type)")
    seq = rec.get("Seq", 0)
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise errors.CatalogDamaged(f"({what}: field Seq is of the wrong type)")
    locks = rec.get("OperationLocks", [])
    if not isinstance(locks, list) or not all(isinstance(x, dict) and isinstance(x.get("LockReason"), str)
                                              for x in locks):
        raise errors.CatalogDamaged(f"({what}: field OperationLocks is of the wrong type)")
    return rec


def check_group_record(rec, what="resource group record"):
    """Raise CatalogDamaged unless ``rec`` is a resource group record."""
    return check_record(rec, GROUP_SCHEMA, what)


def check_record(rec, schema, what):
    """Raise CatalogDamaged unless ``rec`` is a dict holding every field of ``schema`` with its type."""
    if not isinstance(rec, dict):
        raise errors.CatalogDamaged(f"({what} is not a record)")
    for key, typ in schema.items():
        value = rec.get(key, _OPT)
        if value is _OPT or isinstance(value, bool) or not isinstance(value, typ):
            raise errors.CatalogDamaged(f"({what}: field {key} is missing or of the wrong type)")
    return rec


def check_snapshot_record(rec, what="snapshot record"):
    check_record(rec, SNAPSHOT_SCHEMA, what)
    if rec["Status"] not in STATUSES or rec["SourceDiskSize"] < 0 or rec["ChunkSize"] <= 0:
        raise errors.CatalogDamaged(f"({what}: impossible Status, size or chunk size)")
    return rec


# --- the indexes of DescribeSnapshots and DescribeDisks (docs/FORMAT.md, "Indexes") ----------------------
# An index entry says "the record with this order key has this value in this field": key = "I" + kind +
# field + XXH3-64 of the value + the order key (a snapshot's Seq, u64; a disk's CreationTime, Seq and DiskId), so
# the entries of one (kind, field, value) are a list in creation order that a cursor walks and seeks.
# ``index_counts`` holds the length of each list. Only records readers see are indexed (not a record being
# deleted). A 64-bit hash can collide: whoever reads a record found through an index checks the value.
KIND_SNAPSHOT = b"S"
KIND_DISK = b"D"
F_ALL = b"*"        # every record (value "")
F_DISK = b"d"       # SourceDiskId
F_NAME = b"n"       # SnapshotName / DiskName
F_STATUS = b"s"     # Status
F_CATEGORY = b"c"   # Category (Standard when none was given)
F_TYPE = b"y"       # SnapshotType (user; auto for automatic snapshots)
F_GROUP = b"r"      # ResourceGroupId ("" for the default group)
F_TAG_KEY = b"k"    # a tag's key
F_TAG = b"t"        # a tag's key and value: the compact JSON of [key, value]
F_LOCK = b"l"       # a disk's OperationLocks LockReason
DEFAULT_CATEGORY = "Standard"
DEFAULT_TYPE = "user"


def tag_term(key, value):
    """The F_TAG value of a tag."""
    return dump_json([key, value])


def snapshot_terms(rec):
    """The index values of a snapshot record: ``{(field, value bytes)}``; none for a record being deleted."""
    if rec.get("Deleting"):
        return set()
    out = {(F_ALL, b""), (F_DISK, rec["SourceDiskId"].encode()), (F_STATUS, rec["Status"].encode()),
           (F_CATEGORY, (rec.get("Category") or DEFAULT_CATEGORY).encode()),
           (F_TYPE, (rec.get("SnapshotType") or DEFAULT_TYPE).encode()),
           (F_GROUP, (rec.get("ResourceGroupId") or "").encode())}
    if rec.get("SnapshotName"):
        out.add((F_NAME, rec["SnapshotName"].encode()))
    for tag in rec.get("Tags") or ():
        out.add((F_TAG_KEY, tag["TagKey"].encode()))
        out.add((F_TAG, tag_term(tag["TagKey"], tag["TagValue"])))
    return out


def disk_terms(rec):
    """The index values of a disk record: ``{(field, value bytes)}``."""
    out = {(F_ALL, b""), (F_NAME, rec["DiskName"].encode()), (F_GROUP, (rec.get("ResourceGroupId") or "").encode())}
    for lock in rec.get("OperationLocks") or ():
        out.add((F_LOCK, lock["LockReason"].encode()))
    return out


def snapshot_order(rec):
    return U64.pack(rec["Seq"])


def disk_order(rec):
    """A disk's order key: CreationTime (ISO 8601, so byte order is time order), its Seq (u64; 0 for disks
    registered before disks had one) and its DiskId."""
    return rec["CreationTime"].encode("ascii", "replace") + U64.pack(rec.get("Seq", 0)) + rec["DiskId"].encode("ascii")


def index_prefix(kind, field, value):
    """The key prefix (after the table's) of one index list."""
    return kind + field + _native.hash64(value)


def dump_json(rec):
    """The one JSON encoding of records (catalog values and store objects): UTF-8, compact, keys sorted."""
    return json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def load_json(raw, what):
    try:
        return json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise errors.CatalogDamaged(f"({what} is not valid JSON text: {exc})") from None


def path_key(path):
    """The disk_paths key of an image path: its XXH3-128 (paths of any length fit)."""
    return _native.hash128(path.encode("utf-8", "surrogateescape"))


def _name(name, what):
    """The key bytes of an ASCII record name; a name read from a damaged key (U+FFFD) is damage."""
    try:
        return name.encode("ascii")
    except UnicodeEncodeError:
        raise errors.CatalogDamaged(f"({what} {name!r}: its key is not ASCII, a damaged key)") from None


def _seal(key, payload):
    return payload + _native.hash64(key + payload)


# --- the environment --------------------------------------------------------------------------------------
class _Env:
    def __init__(self, env, identity, writable, map_start):
        self.env = env
        self.identity = identity
        self.writable = writable
        self.users = 0
        self.map_start = map_start  # registered with the SIGBUS guard, or None
        self.fault_mark = _native.guard_faults()

    def faulted(self):
        """True if the guard answered a read past the end of a map since this environment was opened."""
        return _native.guard_faults() != self.fault_mark

    def close(self):
        if self.map_start is not None:
            _native.guard_remove(self.map_start)
            self.map_start = None
        self.env.close()


_native.guard_install()


def _map_of(path):
    """``(start, length)`` of this process's largest memory map of the file ``path`` (LMDB's map of data.mdb),
    from /proc/self/maps; None where it cannot be found."""
    try:
        st = os.stat(path)
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return None
    best = None
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) < 6 or parts[5].rstrip("\n") != path:
            continue
        try:
            if int(parts[4]) != st.st_ino:
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
        except ValueError:
            continue
        if best is None or hi - lo > best[1]:
            best = (lo, hi - lo)
    return best


_envs = {}  # realpath -> _Env: one environment per file per process (LMDB forbids two)
_envs_lock = threading.Lock()


def _identity(path):
    try:
        st = os.stat(os.path.join(path, "data.mdb"))
    except FileNotFoundError:
        raise errors.CatalogMissing(f"({path}/data.mdb does not exist)") from None
    except OSError as exc:
        raise errors.RepositoryError(f"(cannot read the catalog {path}: {exc.strerror})") from None
    return (st.st_dev, st.st_ino)


def check_data_file(path):
    """Check ``data.mdb`` against its own meta pages before LMDB maps it.

    LMDB keeps two meta pages (pages 0 and 1); the one with the larger transaction id is current and
    names the last page in use. A file shorter than that page (truncated, or a damaged meta page) would
    be mapped anyway and kill the process with SIGBUS at the first read past its end. Layout
    (lmdb ``MDB_meta`` after the 16-byte page header, 64-bit builds): magic u32 0xBEEFC0DE, version u32,
    address, mapsize, two ``MDB_db`` of 48 bytes (the first one's first u32 is the page size),
    last page number u64, transaction id u64.
    """
    data = os.path.join(path, "data.mdb")
    try:
        with open(data, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = os.pread(f.fileno(), 4096 + 160, 0)
            psize = struct.unpack_from("<I", head, 40)[0] if len(head) >= 44 else 0
            if psize not in (4096, 8192, 16384, 32768, 65536):
                psize = 4096
            second = os.pread(f.fileno(), 160, psize)
    except FileNotFoundError:
        raise errors.CatalogMissing(f"({data} does not exist)") from None
    except OSError as exc:
        raise errors.RepositoryError(f"(cannot read {data}: {exc.strerror})") from None
    best = None
    for page in (head[:160], second):
        if len(page) < 152:
            continue
        magic, version = struct.unpack_from("<II", page, 16)
        last_pg, txnid = struct.unpack_from("<QQ", page, 136)
        if magic == 0xBEEFC0DE and version == 1 and (best is None or txnid > best[1]):
            best = (last_pg, txnid)
    if best is None:
        raise errors.CatalogDamaged(f"({data} has no valid LMDB meta page)")
    if (best[0] + 1) * psize > size:
        raise errors.CatalogDamaged(f"({data} is {size} bytes but its meta page names page {best[0]}: "
                                    "the file was truncated)")


def _open_env(path, writable):
    """A new environment for ``path``, read-only where it cannot be written, its map under the SIGBUS guard:
    ``(lmdb.Environment, writable, map start or None)``."""
    env, w = _open_lmdb(path, writable)
    region = _map_of(os.path.join(path, "data.mdb"))
    start = region[0] if region and _native.guard_add(*region) else None
    return env, w, start


def _open_lmdb(path, writable):
    """A new lmdb.Environment for ``path``, read-only where it cannot be written."""
    check_data_file(path)
    map_size = int(os.environ.get("BLOCKSNAP_MAP_SIZE", DEFAULT_MAP_SIZE))
    opts = dict(map_size=map_size, max_dbs=0, subdir=True, create=False, readahead=False, max_readers=256)
    try:
        if writable:
            return lmdb.open(path, **opts), True
        try:
            return lmdb.open(path, readonly=True, **opts), False
        except lmdb.Error as exc:
            # Read-only media: LMDB cannot open lock.mdb for its reader table. Nobody can write the
            # catalog through this mount, so reading it without locks is what LMDB's MDB_NOLOCK is for
            # (a writer through another mount is the caller's risk; every value is still checked).
            if getattr(exc, "errno", None) not in (errno.EACCES, errno.EROFS, errno.EPERM) and \
                    "Read-only" not in str(exc) and "Permission" not in str(exc):
                raise
            return lmdb.open(path, readonly=True, lock=False, **opts), False
    except lmdb.Error as exc:
        raise errors.translate(exc, f"catalog {path}") from exc


def acquire_env(path, writable=True):
    """The process's environment for the catalog at ``path``; release it with :func:`release_env`.

    One environment per file per process (LMDB forbids opening one twice). If the file at ``path`` is no
    longer the one the cached environment maps (the repository was removed and made anew, or repaired),
    a new environment is opened for the new file.
    """
    key = os.path.realpath(path)
    ident = _identity(key)
    with _envs_lock:
        ent = _envs.get(key)
        if ent is not None and (ent.identity != ident or (writable and not ent.writable) or ent.faulted()):
            del _envs[key]
            if ent.users == 0:
                ent.close()
            ent = None
        if ent is None:
            ent = _envs[key] = _new_env(key, ident, writable)
        ent.users += 1
        return ent


def _new_env(key, ident, writable):
    env, w, start = _open_env(key, writable)
    return _Env(env, ident, w, start)


def release_env(ent):
    with _envs_lock:
        ent.users -= 1
        if ent.users > 0:
            return
        key = next((k for k, v in _envs.items() if v is ent), None)
        if key is not None:
            del _envs[key]
        ent.close()


def close_env(path):
    """Close and forget the environment of ``path`` whatever its users (tests, forked children)."""
    key = os.path.realpath(path)
    with _envs_lock:
        ent = _envs.pop(key, None)
    if ent is not None:
        ent.close()


def open_envs():
    """Paths of the environments open in this process (tests)."""
    with _envs_lock:
        return list(_envs)


_PROBE = """
import sys
from blocksnap.store import catalog
cat = catalog.Catalog(sys.argv[1], None, writable=False)
with cat.read() as txn:
    for table, key, raw in txn.raw_items():
        try:
            txn.check_raw(key, raw)
        except Exception:
            pass
    for sid in txn.snapshot_ids():
        try:
            rec = txn.snapshot(sid)
            n = -(-(-(-rec["SourceDiskSize"] // rec["ChunkSize"])) // 256)
            segs = txn.snapshot_map(sid, n) or b""
        except Exception:
            continue
        for i in range(0, len(segs), 16):
            try:
                seg = txn.segment(segs[i:i + 16]) if any(segs[i:i + 16]) else None
            except Exception:
                continue
            for j in range(0, len(seg.ids) if seg else 0, 16):
                try:
                    txn.chunk(seg.ids[j:j + 16])
                except Exception:
                    pass
"""


def probe(path):
    """True unless reading the whole catalog at ``path`` kills a process: LMDB aborts (an assertion) on some
    damaged pages, and a verify or repair must still report. The walk, as verify and repair do it, runs in a
    child process first."""
    try:
        import subprocess
        import sys

        import blocksnap
    except (OSError, ImportError):
        return True  # could not look (out of descriptors, say): go on as without the probe
    try:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [os.path.dirname(os.path.dirname(os.path.abspath(blocksnap.__file__)))] +
            [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        proc = subprocess.run([sys.executable, "-c", _PROBE, path], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=3600, check=False)
    except (OSError, ImportError, subprocess.SubprocessError):
        return True  # could not look (out of descriptors, say): go on as without the probe
    return proc.returncode >= 0


def create(path, repository_id):
    """Make a new, empty catalog directory at ``path`` (init, rebuild): only its meta records."""
    os.makedirs(path, exist_ok=False)
    env = lmdb.open(path, map_size=int(os.environ.get("BLOCKSNAP_MAP_SIZE", DEFAULT_MAP_SIZE)), max_dbs=0,
                    subdir=True, create=True, readahead=False)
    try:
        with env.begin(write=True) as txn:
            t = Txn(txn, True)
            t.put_meta_json(META_CATALOG, {"Version": CATALOG_VERSION, "RepositoryId": repository_id})
            t.put_meta_u64(META_EPOCH, 0)
            t.put_meta_u64(META_SEQ, 0)
        env.sync(True)
    finally:
        env.close()


class Catalog:
    """The catalog of one repository. ``read()`` and ``write()`` give transactions (:class:`Txn`)."""

    def __init__(self, path, repository_id=None, writable=True):
        self.path = path
        self._ent = acquire_env(path, writable)
        self.writable = self._ent.writable
        self.repository_id = repository_id
        self.version = OLDEST_CATALOG
        try:
            with self.read() as t:
                info = t.meta_json(META_CATALOG)
        except errors.CatalogDamaged:
            if repository_id is not None:
                self.close()
                raise
            info = None  # salvage and probes read what they can; unindexed, nothing is migrated
        except BaseException:
            self.close()
            raise
        version = info.get("Version") if isinstance(info, dict) else None
        if repository_id is not None and (version not in range(OLDEST_CATALOG, CATALOG_VERSION + 1)
                                          or info.get("RepositoryId") != repository_id):
            self.close()
            raise errors.CatalogStale(f"({path} is not a version-{CATALOG_VERSION} index of this repository)")
        if isinstance(version, int) and not isinstance(version, bool):
            self.version = version
        if isinstance(info, dict) and self.version < INDEXED_FROM and self.writable:
            try:
                self.build_indexes()
            except errors.CatalogDamaged:
                pass  # left unindexed: readers scan, as version 2 did; 'blocksnap repair' rebuilds it

    @property
    def indexed(self):
        """True if the indexes of DescribeSnapshots and DescribeDisks are complete (version 3)."""
        return self.version >= INDEXED_FROM

    def build_indexes(self):
        """Index a version-2 catalog (every snapshot and disk record) and make it version 3, in one
        transaction; another process that did it first wins. Raises CatalogDamaged (nothing written) if a
        record cannot be read: the catalog then stays unindexed until 'blocksnap repair'."""
        with self.write() as txn:
            info = txn.meta_json(META_CATALOG)
            if info.get("Version", 0) < INDEXED_FROM:
                for table in ("index", "index_counts"):
                    for key in [bytes(k) for k, _ in txn._scan(TABLES[table])]:
                        txn._delete(key)
                for rec in txn.snapshots():
                    txn.index_snapshot(rec)
                for rec in txn.disks():
                    txn.index_disk(rec)
                txn.put_meta_json(META_CATALOG, dict(info, Version=CATALOG_VERSION))
        self.version = CATALOG_VERSION

    @property
    def env(self):
        return self._ent.env

    def read(self):
        """A read transaction: never waits for a writer, never writes."""
        return _TxnContext(self, write=False)

    def write(self):
        if not self.writable:
            raise errors.RepositoryReadOnly(f"({self.path})")
        return _TxnContext(self, write=True)

    def close(self):
        if self._ent is not None:
            release_env(self._ent)
            self._ent = None


class _TxnContext:
    def __init__(self, catalog, write):
        self.catalog = catalog
        self.write = write
        self.txn = None

    def __enter__(self):
        try:
            self.txn = self.catalog.env.begin(write=self.write, buffers=True)
        except lmdb.Error as exc:
            raise errors.translate(exc, "catalog") from exc
        return Txn(self.txn, self.write, self.catalog._ent)

    def __exit__(self, typ, exc, tb):
        txn, self.txn = self.txn, None
        if typ is None and self.catalog._ent.faulted():
            txn.abort()
            raise errors.CatalogDamaged(_RAN_OFF)
        if typ is not None:
            txn.abort()
            if isinstance(exc, lmdb.Error):
                raise errors.translate(exc, "catalog", path=self.catalog.path) from exc
            return False
        try:
            txn.commit()
        except lmdb.Error as exc:
            raise errors.translate(exc, "catalog commit", path=self.catalog.path) from exc
        return False


_RAN_OFF = "(a value of data.mdb runs past the end of the file: a damaged LMDB page)"


class Txn:
    """Typed access to the catalog's tables inside one LMDB transaction. Every read is checked."""

    def __init__(self, txn, write, ent=None):
        self._t = txn
        self.write = write
        self._ent = ent

    # --- raw access with checks -----------------------------------------------------------------
    def _get(self, key, max_len, what):
        raw = self._t.get(key)
        if raw is None:
            return None
        return self._open(key, raw, max_len, what)

    def _open(self, key, raw, max_len, what):
        if self._ent is not None and self._ent.faulted():
            raise errors.CatalogDamaged(_RAN_OFF)
        n = len(raw)  # a memoryview into the map: its length is read without touching the bytes
        if n < CHECKSUM_LEN or n > max_len + CHECKSUM_LEN:
            raise errors.CatalogDamaged(f"({what}: a value of {n} bytes)")
        data = bytes(raw)
        payload = data[:-CHECKSUM_LEN]
        if _native.hash64(key + payload) != data[-CHECKSUM_LEN:]:
            raise errors.CatalogDamaged(f"({what} fails its checksum)")
        return payload

    def _put(self, key, payload, overwrite=True):
        return self._t.put(key, _seal(key, payload), overwrite=overwrite)

    def _delete(self, key):
        return self._t.delete(key)

    def _scan(self, prefix, start=b""):
        """``(key, raw value)`` of every key beginning with ``prefix`` (from ``prefix + start``), in order."""
        with self._t.cursor() as cur:
            if not cur.set_range(prefix + start):
                return
            for key, raw in cur:
                key = bytes(key)
                if not key.startswith(prefix):
                    break
                yield key, raw

    def count(self, table):
        """Entries of a table (a scan: for tests and reports)."""
        return sum(1 for _ in self._scan(TABLES[table]))

    def keys(self, table):
        """The keys of a table without their prefix, unchecked values (tests and the raw dump)."""
        prefix = TABLES[table]
        return [k[len(prefix):] for k, _ in self._scan(prefix)]

    # --- meta -----------------------------------------------------------------------------------
    def meta_json(self, name):
        key = TABLES["meta"] + name
        raw = self._get(key, MAX_JSON, f"catalog meta {name.decode()}")
        return None if raw is None else load_json(raw, f"catalog meta {name.decode()}")

    def put_meta_json(self, name, value):
        self._put(TABLES["meta"] + name, dump_json(value))

    def meta_u64(self, name):
        raw = self._get(TABLES["meta"] + name, 8, f"catalog meta {name.decode()}")
        if raw is None:
            return 0
        if len(raw) != 8:
            raise errors.CatalogDamaged(f"(catalog meta {name.decode()} has {len(raw)} bytes)")
        return U64.unpack(raw)[0]

    def put_meta_u64(self, name, value):
        self._put(TABLES["meta"] + name, U64.pack(value))

    def next_seq(self, name=META_SEQ):
        value = self.meta_u64(name) + 1
        self.put_meta_u64(name, value)
        return value

    def epoch(self):
        return self.meta_u64(META_EPOCH)

    # --- disks ----------------------------------------------------------------------------------
    def disk(self, disk_id):
        """The disk record of ``disk_id``, or None."""
        key = TABLES["disks"] + _name(disk_id, "disk record")
        raw = self._get(key, MAX_JSON, f"disk record {disk_id}")
        if raw is None:
            return None
        rec = check_disk_record(load_json(raw, f"disk record {disk_id}"), f"disk record {disk_id}")
        if rec["DiskId"] != disk_id:
            raise errors.CatalogDamaged(f"(disk record {disk_id} names {rec['DiskId']!r})")
        return rec

    def disks(self):
        prefix = TABLES["disks"]
        for key, _ in self._scan(prefix):
            yield self.disk(key[len(prefix):].decode("ascii", "replace"))

    def put_disk(self, rec):
        """Write a disk record and bring its index entries in line with it."""
        key = TABLES["disks"] + rec["DiskId"].encode("ascii")
        old = self._stored_json(key, f"disk record {rec['DiskId']}", check_disk_record)
        self._put(key, dump_json(rec))
        if old and disk_order(old) != disk_order(rec):  # another CreationTime: every entry moves
            self._reindex(KIND_DISK, disk_terms(old), set(), disk_order(old), rec["DiskId"])
            old = None
        self._reindex(KIND_DISK, disk_terms(old) if old else set(), disk_terms(rec), disk_order(rec), rec["DiskId"])

    def disk_id_of_path(self, path):
        key = TABLES["disk_paths"] + path_key(path)
        raw = self._get(key, DISK_ID_LEN, "disk path entry")
        return None if raw is None else raw.decode("ascii", "replace")

    def disk_ids_of_paths(self):
        """The DiskIds that path entries name (each entry checked)."""
        prefix = TABLES["disk_paths"]
        out = set()
        for key, _ in self._scan(prefix):
            raw = self._get(key, DISK_ID_LEN, "disk path entry")
            if raw is not None:
                out.add(raw.decode("ascii", "replace"))
        return out

    def put_disk_path(self, path, disk_id):
        self._put(TABLES["disk_paths"] + path_key(path), disk_id.encode("ascii"))

    # --- snapshots ------------------------------------------------------------------------------
    def snapshot(self, snapshot_id):
        """The snapshot record of ``snapshot_id`` as stored (dead creators not settled), or None."""
        key = TABLES["snapshots"] + _name(snapshot_id, "snapshot record")
        raw = self._get(key, MAX_JSON, f"snapshot record {snapshot_id}")
        if raw is None:
            return None
        rec = check_snapshot_record(load_json(raw, f"snapshot record {snapshot_id}"),
                                    f"snapshot record {snapshot_id}")
        if rec["SnapshotId"] != snapshot_id:
            raise errors.CatalogDamaged(f"(snapshot record {snapshot_id} names {rec['SnapshotId']!r})")
        return rec

    def snapshot_ids(self):
        prefix = TABLES["snapshots"]
        return [key[len(prefix):].decode("ascii", "replace") for key, _ in self._scan(prefix)]

    def snapshots(self):
        for sid in self.snapshot_ids():
            yield self.snapshot(sid)

    def put_snapshot(self, rec):
        """Write a snapshot record and bring its index entries in line with it."""
        key = TABLES["snapshots"] + rec["SnapshotId"].encode("ascii")
        old = self._stored_json(key, f"snapshot record {rec['SnapshotId']}", check_snapshot_record)
        self._put(key, dump_json(rec))
        self._reindex(KIND_SNAPSHOT, snapshot_terms(old) if old else set(), snapshot_terms(rec),
                      snapshot_order(rec), rec["SnapshotId"])

    def delete_snapshot(self, rec):
        sid = rec["SnapshotId"].encode("ascii")
        old = self._stored_json(TABLES["snapshots"] + sid, f"snapshot record {rec['SnapshotId']}",
                                check_snapshot_record)
        if old:
            self._reindex(KIND_SNAPSHOT, snapshot_terms(old), set(), snapshot_order(old), rec["SnapshotId"])
        self._delete(TABLES["snapshots"] + sid)
        self._delete(TABLES["maps"] + sid)
        self._delete(TABLES["disk_snaps"] + rec["SourceDiskId"].encode("ascii") + U64.pack(rec["Seq"]))

    def index_snapshot(self, rec):
        """Add a stored record's index entries (building the indexes of a version-2 catalog)."""
        self._reindex(KIND_SNAPSHOT, set(), snapshot_terms(rec), snapshot_order(rec), rec["SnapshotId"])

    def index_disk(self, rec):
        self._reindex(KIND_DISK, set(), disk_terms(rec), disk_order(rec), rec["DiskId"])

    def _stored_json(self, key, what, check):
        """The record stored under ``key``, checked, or None. A value that is no record is left to the reads
        that check it: an index update must not stop a write that replaces it."""
        raw = self._t.get(key)
        if raw is None:
            return None
        try:
            return check(load_json(self._open(key, raw, MAX_JSON, what), what), what)
        except errors.CatalogDamaged:
            return None

    # --- indexes ----------------------------------------------------------------------------------
    def _reindex(self, kind, old_terms, new_terms, order, ident):
        table = TABLES["index"]
        for field, value in old_terms - new_terms:
            prefix = index_prefix(kind, field, value)
            if self._t.delete(table + prefix + order):
                self._add_count(prefix, -1)
        for field, value in new_terms - old_terms:
            prefix = index_prefix(kind, field, value)
            if self._put(table + prefix + order, ident.encode("ascii"), overwrite=False):
                self._add_count(prefix, +1)

    def _add_count(self, prefix, delta):
        key = TABLES["index_counts"] + prefix
        n = max(0, self.index_count_of(prefix) + delta)
        if n:
            self._put(key, U64.pack(n))
        else:
            self._delete(key)

    def index_count_of(self, prefix):
        raw = self._get(TABLES["index_counts"] + prefix, 8, "index count")
        if raw is None:
            return 0
        if len(raw) != 8:
            raise errors.CatalogDamaged(f"(an index count of {len(raw)} bytes)")
        return U64.unpack(raw)[0]

    def index_count(self, kind, field, value):
        """Entries of one index list (from index_counts: no walk)."""
        return self.index_count_of(index_prefix(kind, field, value))

    def posting(self, kind, field, value):
        """The index list of records whose ``field`` has ``value``, as a :class:`Posting`."""
        return Posting(self, TABLES["index"] + index_prefix(kind, field, value))

    def index_items(self):
        """``(index key after the table prefix, id)`` of every index entry (verify)."""
        prefix = TABLES["index"]
        for key, raw in self._scan(prefix):
            yield key[len(prefix):], self._open(key, raw, 64, "index entry").decode("ascii", "replace")

    def index_count_items(self):
        prefix = TABLES["index_counts"]
        for key, raw in self._scan(prefix):
            val = self._open(key, raw, 8, "index count")
            if len(val) != 8:
                raise errors.CatalogDamaged(f"(an index count of {len(val)} bytes)")
            yield key[len(prefix):], U64.unpack(val)[0]

    # --- resource groups ------------------------------------------------------------------------
    def group(self, group_id):
        """The resource group record of ``group_id``, or None."""
        key = TABLES["groups"] + _name(group_id, "resource group record")
        raw = self._get(key, MAX_JSON, f"resource group record {group_id}")
        if raw is None:
            return None
        rec = check_group_record(load_json(raw, f"resource group record {group_id}"),
                                 f"resource group record {group_id}")
        if rec["ResourceGroupId"] != group_id:
            raise errors.CatalogDamaged(f"(resource group record {group_id} names {rec['ResourceGroupId']!r})")
        return rec

    def groups(self):
        prefix = TABLES["groups"]
        for key, _ in self._scan(prefix):
            yield self.group(key[len(prefix):].decode("ascii", "replace"))

    def put_group(self, rec):
        self._put(TABLES["groups"] + rec["ResourceGroupId"].encode("ascii"), dump_json(rec))

    def delete_group(self, group_id):
        self._delete(TABLES["groups"] + group_id.encode("ascii"))

    def put_disk_snap(self, disk_id, seq, snapshot_id):
        self._put(TABLES["disk_snaps"] + disk_id.encode("ascii") + U64.pack(seq), snapshot_id.encode("ascii"))

    def disk_snapshot_ids(self, disk_id, reverse=False):
        """The SnapshotIds of one disk in creation order (newest first with ``reverse``)."""
        prefix = TABLES["disk_snaps"] + _name(disk_id, "snapshot order of")
        out = []
        for key, raw in self._scan(prefix):
            sid = self._open(key, raw, SNAPSHOT_ID_LEN, f"snapshot order entry of {disk_id}")
            out.append(sid.decode("ascii", "replace"))
        return out[::-1] if reverse else out

    # --- maps and segments ----------------------------------------------------------------------
    def snapshot_map(self, snapshot_id, segments):
        """The segment ids (16 bytes each) of an accomplished snapshot's map; ``segments`` is how many
        it must have (from its size and chunk size). None if there is no map."""
        key = TABLES["maps"] + _name(snapshot_id, "chunk map")
        raw = self._get(key, ID_LEN * segments, f"chunk map of {snapshot_id}")
        if raw is not None and len(raw) != ID_LEN * segments:
            raise errors.CatalogDamaged(f"(chunk map of {snapshot_id} has {len(raw) // ID_LEN} segments, "
                                        f"its size needs {segments})")
        return raw

    def map_ids(self):
        prefix = TABLES["maps"]
        return [key[len(prefix):].decode("ascii", "replace") for key, _ in self._scan(prefix)]

    def put_snapshot_map(self, snapshot_id, seg_ids):
        self._put(TABLES["maps"] + snapshot_id.encode("ascii"), bytes(seg_ids))

    def segment(self, seg_id):
        """The segment ``seg_id`` (its content checked against its id), or None."""
        key = TABLES["segments"] + seg_id
        raw = self._get(key, SEGMENT_HEAD.size + ID_LEN * MAX_SEGMENT_IDS, f"map segment {seg_id.hex()}")
        if raw is None:
            return None
        ids = raw[SEGMENT_HEAD.size:]
        if len(raw) < SEGMENT_HEAD.size + ID_LEN or len(ids) % ID_LEN or _native.hash128(ids) != seg_id:
            raise errors.CatalogDamaged(f"(map segment {seg_id.hex()} does not hash to its id)")
        pack_id, offset = SEGMENT_HEAD.unpack_from(raw)
        return SegmentEntry(pack_id, offset, ids)

    def has_segment(self, seg_id):
        return self._t.get(TABLES["segments"] + seg_id) is not None

    def put_segment(self, seg_id, entry, overwrite=True):
        return self._put(TABLES["segments"] + seg_id, SEGMENT_HEAD.pack(entry.pack_id, entry.offset) + entry.ids,
                         overwrite=overwrite)

    def delete_segment(self, seg_id):
        self._delete(TABLES["segments"] + seg_id)
        self._delete(TABLES["segment_refs"] + seg_id)

    def segment_ids(self):
        prefix = TABLES["segments"]
        return [key[len(prefix):] for key, _ in self._scan(prefix)]

    def segment_refs(self, seg_id):
        raw = self._get(TABLES["segment_refs"] + seg_id, 4, f"refcount of map segment {seg_id.hex()}")
        if raw is None:
            return 0
        if len(raw) != 4:
            raise errors.CatalogDamaged(f"(refcount of map segment {seg_id.hex()} has {len(raw)} bytes)")
        return U32.unpack(raw)[0]

    def set_segment_refs(self, seg_id, refs):
        self._put(TABLES["segment_refs"] + seg_id, U32.pack(refs))

    def segment_ref_items(self):
        """``(segment id, refcount)`` of every refcount entry."""
        prefix = TABLES["segment_refs"]
        for key, raw in self._scan(prefix):
            val = self._open(key, raw, 4, f"refcount of map segment {key[1:].hex()}")
            if len(val) != 4:
                raise errors.CatalogDamaged(f"(refcount of map segment {key[1:].hex()} has {len(val)} bytes)")
            yield key[len(prefix):], U32.unpack(val)[0]

    # --- chunks ---------------------------------------------------------------------------------
    def entry_naming(self, kind, record_id, pack_id, offset):
        """The index entry (ChunkEntry or SegmentEntry) of a record if it names this very copy of it
        (``pack_id`` at ``offset``), else None; None for a record kind this version does not index."""
        if kind == _native.KIND_CHUNK:
            entry = self.chunk(record_id)
        elif kind == _native.KIND_SEGMENT:
            entry = self.segment(record_id)
        else:
            return None
        return entry if entry is not None and entry.pack_id == pack_id and entry.offset == offset else None

    def chunk(self, chunk_id):
        """The chunk entry of ``chunk_id``, or None."""
        key = TABLES["chunks"] + chunk_id
        raw = self._get(key, CHUNK.size, f"chunk entry {chunk_id.hex()}")
        return None if raw is None else self._chunk(raw, chunk_id)

    @staticmethod
    def _chunk(raw, chunk_id):
        if len(raw) != CHUNK.size:
            raise errors.CatalogDamaged(f"(chunk entry {chunk_id.hex()} has {len(raw)} bytes)")
        return ChunkEntry(*CHUNK.unpack(raw))

    def has_chunk(self, chunk_id):
        """True if the index names ``chunk_id`` (unchecked: dedup asks this of every changed chunk, and
        every later use of the entry checks it)."""
        return self._t.get(TABLES["chunks"] + chunk_id) is not None

    def chunks(self):
        """``(chunk id, ChunkEntry)`` of every chunk entry."""
        prefix = TABLES["chunks"]
        for key, raw in self._scan(prefix):
            cid = key[len(prefix):]
            yield cid, self._chunk(self._open(key, raw, CHUNK.size, f"chunk entry {cid.hex()}"), cid)

    def put_chunk(self, chunk_id, entry, overwrite=True):
        return self._put(TABLES["chunks"] + chunk_id, CHUNK.pack(*entry), overwrite=overwrite)

    def delete_chunk(self, chunk_id):
        self._delete(TABLES["chunks"] + chunk_id)

    def add_chunk_ref(self, chunk_id, delta):
        """Add ``delta`` to a chunk's refcount; returns the new count. The chunk must be indexed."""
        entry = self.chunk(chunk_id)
        if entry is None:
            raise errors.CatalogDamaged(f"(chunk {chunk_id.hex()} is referenced but not in the index)")
        rc = entry.refcount + delta
        if rc < 0:
            raise errors.CatalogDamaged(f"(chunk {chunk_id.hex()}: refcount below zero)")
        self.put_chunk(chunk_id, entry._replace(refcount=rc))
        return rc

    # --- packs and reclaim ----------------------------------------------------------------------
    def pack(self, pack_id):
        raw = self._get(TABLES["packs"] + pack_id, PACK.size, f"pack entry {pack_id.hex()}")
        if raw is None:
            return None
        if len(raw) != PACK.size:
            raise errors.CatalogDamaged(f"(pack entry {pack_id.hex()} has {len(raw)} bytes)")
        return PackEntry(*PACK.unpack(raw))

    def packs(self):
        prefix = TABLES["packs"]
        for key, _ in self._scan(prefix):
            pid = key[len(prefix):]
            yield pid, self.pack(pid)

    def put_pack(self, pack_id, entry):
        self._put(TABLES["packs"] + pack_id, PACK.pack(*entry))

    def delete_pack(self, pack_id):
        self._delete(TABLES["packs"] + pack_id)

    def put_reclaim(self, pack_id, offset, length, epoch):
        self._put(TABLES["reclaim"] + pack_id + U64.pack(offset), RECLAIM.pack(length, epoch))

    def reclaims(self):
        """``(pack id, offset, ReclaimEntry)`` of every range waiting to be given back."""
        prefix = TABLES["reclaim"]
        for key, raw in self._scan(prefix):
            val = self._open(key, raw, RECLAIM.size, "reclaim entry")
            if len(val) != RECLAIM.size or len(key) != 17:
                raise errors.CatalogDamaged("(a reclaim entry of the wrong size)")
            yield key[1:9], U64.unpack(key[9:])[0], ReclaimEntry(*RECLAIM.unpack(val))

    def delete_reclaim(self, pack_id, offset):
        self._delete(TABLES["reclaim"] + pack_id + U64.pack(offset))

    # --- tokens ---------------------------------------------------------------------------------
    def token(self, token):
        key = TABLES["tokens"] + _name(token, "ClientToken")
        raw = self._get(key, MAX_JSON, f"ClientToken {token!r}")
        if raw is None:
            return None
        rec = load_json(raw, f"ClientToken {token!r}")
        if not isinstance(rec, dict) or not isinstance(rec.get("SnapshotId"), str) \
                or not isinstance(rec.get("ParamsHash"), str):
            raise errors.CatalogDamaged(f"(ClientToken {token!r}: not a token record)")
        return TokenEntry(rec["ParamsHash"], rec["SnapshotId"])

    def tokens(self):
        prefix = TABLES["tokens"]
        for key, _ in self._scan(prefix):
            tok = key[len(prefix):].decode("ascii", "replace")
            yield tok, self.token(tok)

    def put_token(self, token, entry):
        self._put(TABLES["tokens"] + token.encode("ascii"),
                  dump_json({"ParamsHash": entry.params_hash, "SnapshotId": entry.snapshot_id}))

    def delete_token(self, token):
        self._delete(TABLES["tokens"] + token.encode("ascii"))

    # --- damage-tolerant walks (verify) ---------------------------------------------------------
    def chunk_items(self, on_damage):
        """``(chunk id, ChunkEntry)`` of every good chunk entry; ``on_damage(chunk id, exc)`` for the others."""
        prefix = TABLES["chunks"]
        for key, raw in self._scan(prefix):
            cid = key[len(prefix):]
            try:
                yield cid, self._chunk(self._open(key, raw, CHUNK.size, f"chunk entry {cid.hex()}"), cid)
            except errors.CatalogDamaged as exc:
                on_damage(cid, exc)

    def segment_items(self, on_damage):
        """``(segment id, SegmentEntry)`` of every good segment; ``on_damage(segment id, exc)`` for the others."""
        for sid in self.segment_ids():
            try:
                yield sid, self.segment(sid)
            except errors.CatalogDamaged as exc:
                on_damage(sid, exc)

    # --- the whole keyspace (verify) ------------------------------------------------------------
    def raw_items(self):
        """``(table or None, key, raw value)`` of every key in the catalog, in key order."""
        by_prefix = {p: name for name, p in TABLES.items()}
        with self._t.cursor() as cur:
            for key, raw in cur:
                key = bytes(key)
                yield by_prefix.get(key[:1]), key, raw

    def check_raw(self, key, raw):
        """Check one raw value's length and checksum (verify's walk over the keyspace)."""
        self._open(key, raw, MAX_JSON + ID_LEN * (1 << 24), f"catalog key {key[:1]!r}")


class Posting:
    """One index list: the entries of the records whose field has one value, in order key order.

    ``seek(order)`` gives the first entry at or after ``order`` as ``(order key, id)``, or None past the end;
    entries are read through one cursor, keys only until an id is asked for. Not thread-safe; lives as long
    as its transaction.
    """

    def __init__(self, txn, prefix):
        self._txn = txn
        self._prefix = prefix
        self._cur = txn._t.cursor()

    def seek(self, order=b""):
        cur = self._cur
        if not cur.set_range(self._prefix + order):
            return None
        key = bytes(cur.key())
        if not key.startswith(self._prefix):
            return None
        ident = self._txn._open(key, cur.value(), 64, "index entry")
        return key[len(self._prefix):], ident.decode("ascii", "replace")

    def seek_key(self, order=b""):
        """The first order key at or after ``order`` (its id not read), or None."""
        cur = self._cur
        if not cur.set_range(self._prefix + order):
            return None
        key = cur.key()
        n = len(self._prefix)
        if bytes(key[:n]) != self._prefix:
            return None
        return bytes(key[n:])

    def keys(self, order=b""):
        """Every order key from ``order`` on, the cursor stepping (no seek, no id read): for skipping pages."""
        first = self.seek_key(order)
        if first is None:
            return
        yield first
        cur, prefix, n = self._cur, self._prefix, len(self._prefix)
        while cur.next():
            key = cur.key()
            if bytes(key[:n]) != prefix:
                return
            yield bytes(key[n:])

    def walk(self, order=b""):
        """``(order key, id)`` of every entry from ``order`` on."""
        hit = self.seek(order)
        if hit is None:
            return
        yield hit
        cur, n = self._cur, len(self._prefix)
        while cur.next():
            key = bytes(cur.key())
            if not key.startswith(self._prefix):
                return
            yield key[n:], self._txn._open(key, cur.value(), 64, "index entry").decode("ascii", "replace")
