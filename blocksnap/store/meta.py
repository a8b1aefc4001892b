"""The catalog: one LMDB environment with named databases.

Layout (docs/FORMAT.md, "Catalog"): every key is fixed width or a fixed
prefix plus a big-endian counter, so byte order is numeric order. Records
that people read (disks, snapshots) are UTF-8 JSON; records on the hot path
(chunks, segments, packs) are packed structs. Transactions are passed in
explicitly; this module never opens one behind a caller's back.
"""
import json
import os
import struct
import threading

import lmdb

from .. import errors

DB_NAMES = (b"disks", b"disk_paths", b"snapshots", b"snapmaps", b"disk_snaps", b"segments",
            b"chunks", b"packs", b"reclaim", b"tokens", b"counters")
DEFAULT_MAP_SIZE = 1 << 38  # 256 GiB of address space; the file grows only as used
MAX_DBS = 16

# chunks: id(16) -> pack_id(8) offset(8) stored_len(4) raw_len(4) codec(1) reserved(3) refcount(4)
CHUNK = struct.Struct(">8sQIIB3xI")
# segments: id(16) -> refcount(4) + chunk ids (16 each)
SEG_RC = struct.Struct(">I")
# packs: pack_id(8) -> live entries(4) bytes(8)
PACK = struct.Struct(">IQ")
# reclaim: pack_id(8) + offset(8) -> length(8)
U64 = struct.Struct(">Q")

_envs = {}
_envs_lock = threading.Lock()


def open_env(path, map_size=None):
    """The process's one ``lmdb.Environment`` for ``path`` (LMDB forbids opening one twice)."""
    key = os.path.realpath(path)
    with _envs_lock:
        env = _envs.get(key)
        if env is None:
            size = map_size or int(os.environ.get("BLOCKSNAP_MAP_SIZE", DEFAULT_MAP_SIZE))
            try:
                env = lmdb.open(key, map_size=size, max_dbs=MAX_DBS, subdir=True, create=False,
                                readahead=False, max_readers=256)
            except lmdb.Error as exc:
                raise errors.RepositoryDamaged(f"The catalog at {key} cannot be opened: {exc}") from exc
            _envs[key] = env
        return env


def create_env(path):
    """Create an empty catalog directory (init only)."""
    os.makedirs(path, exist_ok=False)
    env = open_env(path)
    with env.begin(write=True) as txn:
        for name in DB_NAMES:
            env.open_db(name, txn=txn)
    return env


def close_env(path):
    """Close and forget the environment of ``path`` (tests and forked children)."""
    key = os.path.realpath(path)
    with _envs_lock:
        env = _envs.pop(key, None)
    if env is not None:
        env.close()


class Catalog:
    """Typed access to the named databases of one environment."""

    def __init__(self, path):
        self.env = open_env(path)
        try:
            # Handles opened in a read-only transaction are not usable by later ones: open them
            # in a (short, empty) write transaction.
            with self.env.begin(write=True) as txn:
                self.db = {name.decode(): self.env.open_db(name, txn=txn, create=False) for name in DB_NAMES}
        except lmdb.Error as exc:
            raise errors.RepositoryDamaged(f"The catalog lacks its databases: {exc}") from exc

    def read(self):
        return self.env.begin(write=False, buffers=False)

    def write(self):
        return self.env.begin(write=True)

    # --- JSON records --------------------------------------------------------------------------------
    def get_json(self, txn, dbname, key):
        raw = txn.get(key.encode() if isinstance(key, str) else key, db=self.db[dbname])
        return None if raw is None else json.loads(raw)

    def put_json(self, txn, dbname, key, value):
        txn.put(key.encode() if isinstance(key, str) else key,
                json.dumps(value, sort_keys=True, separators=(",", ":")).encode(), db=self.db[dbname])

    def iter_json(self, txn, dbname):
        with txn.cursor(db=self.db[dbname]) as cur:
            for _, raw in cur:
                yield json.loads(raw)

    # --- counters ------------------------------------------------------------------------------------
    def next_seq(self, txn, name=b"seq"):
        raw = txn.get(name, db=self.db["counters"])
        value = (U64.unpack(raw)[0] if raw else 0) + 1
        txn.put(name, U64.pack(value), db=self.db["counters"])
        return value

    # --- chunks --------------------------------------------------------------------------------------
    def get_chunk(self, txn, chunk_id):
        raw = txn.get(chunk_id, db=self.db["chunks"])
        return None if raw is None else CHUNK.unpack(raw)

    def put_chunk(self, txn, chunk_id, entry, overwrite=True):
        return txn.put(chunk_id, CHUNK.pack(*entry), db=self.db["chunks"], overwrite=overwrite)

    def add_chunk_ref(self, txn, chunk_id, delta):
        """Add ``delta`` to a chunk's refcount; returns the new count. The chunk must exist."""
        entry = self.get_chunk(txn, chunk_id)
        if entry is None:
            raise errors.RepositoryDamaged(f"chunk {chunk_id.hex()} is referenced but not in the index")
        rc = entry[5] + delta
        if rc < 0:
            raise errors.RepositoryDamaged(f"chunk {chunk_id.hex()} refcount below zero")
        self.put_chunk(txn, chunk_id, entry[:5] + (rc,))
        return rc

    # --- segments ------------------------------------------------------------------------------------
    def get_segment(self, txn, seg_id):
        """``(refcount, ids)`` of a segment, or None."""
        raw = txn.get(seg_id, db=self.db["segments"])
        if raw is None:
            return None
        return SEG_RC.unpack_from(raw)[0], raw[SEG_RC.size:]

    def put_segment(self, txn, seg_id, refcount, ids):
        txn.put(seg_id, SEG_RC.pack(refcount) + ids, db=self.db["segments"])

    # --- packs ---------------------------------------------------------------------------------------
    def get_pack(self, txn, pack_id):
        raw = txn.get(pack_id, db=self.db["packs"])
        return None if raw is None else PACK.unpack(raw)

    def put_pack(self, txn, pack_id, live, size):
        txn.put(pack_id, PACK.pack(live, size), db=self.db["packs"])
