"""The damage matrix: damage to the catalog or the store is found, refused and repaired, never crashed on.

Every test damages a fresh copy of one prepared repository (two disks, three snapshots: a chain of two that
shares map segments, chunks shared across disks, random and compressible data, holes, written zeros, tails
shorter than a chunk, 4 KiB chunks) as bit rot, a torn write, a truncation or a bug would, then drives the
real CLI in child processes (``python -m blocksnap --repo R ...``), so that a crash shows as what it is: a
death by signal or a traceback. What is asked of every outcome (the issue's contract):

- no child dies of a signal, no output holds a traceback, no command ends in InternalError or hangs;
- a restore reproduces its source image byte for byte, or refuses with a typed one-line error
  (``blocksnap: error: <Code>: ...``) and leaves no output file behind;
- verify exits 1 and names every snapshot the damage affects (for a chunk, also every offset), which the
  test works out by itself from the source images and the packs' trailers; it exits 0 only if every
  restore is exact;
- where the store is intact, ``blocksnap repair`` rebuilds a catalog from which every snapshot restores
  exactly and verify exits 0.

The fuzz trials (``test_fuzz_*``) are seeded, and the prepared repository is built with seeded ids and a
fixed clock (``_build``), so trial k damages the same bytes of the same structure on every run. 20 trials of
each kind run by default (the CI set); set ``BLOCKSNAP_DAMAGE_TRIALS`` to run more, for the slow set::

    BLOCKSNAP_DAMAGE_TRIALS=200 python -m pytest tests/test_damage.py

Tests marked xfail (strict) would reproduce a bug that is not fixed yet; each one turns into a failure (XPASS)
once it is, so that its mark gets removed.
"""
import concurrent.futures
import fcntl
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import time
from typing import NamedTuple

import pytest
import xxhash
from conftest import files_equal, run_cli

from blocksnap.api import Client
from blocksnap.store import catalog as catalogs
from blocksnap.store.packs import KIND_CHUNK, KIND_SEGMENT

KiB, MiB = 1 << 10, 1 << 20
CS = 4 * KiB  # the prepared repository's chunk size
SEGMENT_CHUNKS = 256  # chunk ids per map segment
ZERO_ID = bytes(16)
SECTOR = 512
MDB_PAGE = 4096
TRIALS = int(os.environ.get("BLOCKSNAP_DAMAGE_TRIALS") or 20)
# The images are registered under this fixed path while the repository is built: disk paths are part of
# the catalog's bytes (records, and the keys of the path table), and the fuzz needs the same bytes every run.
IMAGE_DIR = "/tmp/blocksnap-damage-fixture"
ERROR_LINE = re.compile(r"blocksnap: error: ([A-Z][A-Za-z]*(?:\.[A-Z][A-Za-z]*)*): \S")
EXACT = "exact"
PARALLEL = 4  # child processes at a time

# Bugs the matrix found (all fixed now; their tests below reproduce them): kept as the record of what each was.
SIGBUS_PRELOAD = ("bug: py-lmdb touches every page of a value (preload) inside get() and cursor moves, before the "
                  "catalog checks its length, so a damaged LMDB node size that runs past the end of data.mdb kills "
                  "restore, list, gc, verify and repair with SIGBUS")
LMDB_ASSERTS = ("bug: a leaf page of data.mdb whose header is damaged makes LMDB's cursor walk abort the process "
                "(mdb_cursor_next: Assertion 'IS_LEAF(mp)', SIGABRT) in verify and gc --dry-run")
REPAIR_DROPS_PACK = ("bug: repair skips every record of a pack whose trailer it cannot read, so it drops intact chunks "
                     "from the catalog and snapshots that restored before the repair no longer do (and exits 0)")
REPAIR_NEEDS_CATALOG = ("bug: repair of a repository whose catalog/ (or data.mdb) is gone says Repository.ReadOnly: "
                        "repository._writable asks catalog/ and catalog/data.mdb to be writable, and a missing one "
                        "is not")
VERIFY_SKIPS_UNDECODABLE = ("bug: verify skips a snapshot record that passes its checksum but does not decode "
                            "(_catalog_model: 'attributed by the walk', but the walk checks checksums only), so it "
                            "names no affected snapshot for it")
VERIFY_SCANS_NOT_LOOKUPS = ("bug: verify builds its model from cursor scans, restores find keys by lookups; a damaged "
                            "leaf page can hide a chunk entry from lookups that scans still see, and then verify does "
                            "not name the snapshots whose restores refuse for it")
RECORD_UNREACHABLE = ("bug: verify reports a snapshot whose catalog record cannot be reached (its restore refused "
                      "with InvalidSnapshotId.NotFound, its object intact) as a problem, not as an affected snapshot")


# --- the prepared repository ----------------------------------------------------------------------------
class Snap(NamedTuple):
    """A snapshot of the prepared repository, and the test's own model of it (from its source image)."""
    sid: str
    image: str  # the source image as it was when snapshotted
    chunks: list  # the id of each chunk (XXH3-128 of its bytes), None for a zero chunk
    segments: list  # the id of each map segment (XXH3-128 of its chunk ids), ZERO_ID for an all-zero one

    def offsets(self, chunk_ids):
        """Image offsets of the chunks whose id is in ``chunk_ids``."""
        return {i * CS for i, c in enumerate(self.chunks) if c in chunk_ids}

    def uses(self, record):
        return record.id in self.segments if record.kind == KIND_SEGMENT else record.id in self.chunks


class Record(NamedTuple):
    """A record of a pack, as its trailer lists it."""
    id: bytes
    offset: int  # of its 32-byte header
    stored_len: int
    kind: int

    @property
    def end(self):
        return self.offset + 32 + self.stored_len


class Pack(NamedTuple):
    """A pack's layout read from its trailer (store/packs.py): header, records, index, zero padding, tail."""
    id: str  # hex
    path: str  # relative to the repository
    size: int
    index_offset: int
    index_len: int
    records: list


class Prepared(NamedTuple):
    repo: str
    snaps: dict  # "a1", "a2", "b1" -> Snap
    disks: dict  # "a", "b" -> DiskId
    packs: dict  # pack id (hex) -> Pack

    def name(self, sid):
        return next((n for n, s in self.snaps.items() if s.sid == sid), sid)

    def names(self, sids):
        return sorted(self.name(s) for s in sids)

    def users(self, records):
        """Names of the snapshots that use any of ``records``."""
        return sorted(n for n, s in self.snaps.items() if any(s.uses(r) for r in records))


def _text(rng, n):
    """Log-like text: compressible, stored zstd-compressed."""
    words = [b"kernel:", b"eth0:", b"link", b"is", b"up", b"systemd[1]:", b"Started", b"session", b"c2", b"of",
             b"user", b"root.", b"sshd[811]:", b"Accepted", b"publickey", b"for", b"admin\n"]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) + b" "
    return bytes(out[:n])


def _write(path, size, extents):
    with open(path, "r+b" if os.path.exists(path) else "wb") as f:
        f.truncate(size)
        for off, data in extents:
            f.seek(off)
            f.write(data)


def chunk_ids(path):
    out = []
    with open(path, "rb") as f:
        while data := f.read(CS):
            out.append(xxhash.xxh3_128_digest(data) if data.strip(b"\0") else None)
    return out


def segment_ids(chunks):
    out = []
    for s in range(0, len(chunks), SEGMENT_CHUNKS):
        part = chunks[s:s + SEGMENT_CHUNKS]
        out.append(ZERO_ID if not any(part) else xxhash.xxh3_128_digest(b"".join(c or ZERO_ID for c in part)))
    return out


def pack_layout(path, rel):
    """Parse a pack's trailer (index block, zero padding, 32-byte tail) by the test's own reading of it."""
    with open(path, "rb") as f:
        data = f.read()
    magic, index_len, _, index_offset, _ = struct.unpack_from(">4sI8sQ8s", data, len(data) - 32)
    imagic, count = struct.unpack_from(">4sI", data, index_offset)
    assert magic == b"BSPT" and imagic == b"BSPX", rel
    records = []
    entry = struct.Struct(">16sQIIBB6x")  # id, record offset, stored length, raw length, codec, kind
    for k in range(count):
        rid, off, stored, _, _, kind = entry.unpack_from(data, index_offset + 8 + entry.size * k)
        records.append(Record(rid, off, stored, kind))
    return Pack(os.path.basename(rel)[:16], rel, len(data), index_offset, index_len,
                sorted(records, key=lambda r: r.offset))


def _build(root):
    """Two disks, three snapshots. a1 and a2 (a chain) share map segments 1 and 3; a and b share 64 KiB of
    chunks (in other segments), two of which only a1 and b1 name (a2 overwrote them); b's first segment is
    all holes; both images end in a partial chunk."""
    rng = random.Random(20261201)
    shared_ab = rng.randbytes(64 * KiB)
    images = {
        "a": (3 * MiB + 1000, [(0, shared_ab), (64 * KiB, _text(rng, 192 * KiB)), (MiB, rng.randbytes(512 * KiB)),
                               (MiB + 512 * KiB, bytes(32 * KiB)), (2 * MiB, _text(rng, 128 * KiB)),
                               (2 * MiB + 512 * KiB, rng.randbytes(64 * KiB)), (3 * MiB, _text(rng, 1000))]),
        "b": (3 * MiB + 512, [(MiB, shared_ab), (MiB + 68 * KiB, rng.randbytes(40 * KiB)),
                              (2 * MiB + 300 * KiB, _text(rng, 60 * KiB)), (3 * MiB, _text(rng, 512))]),
    }
    a2_change = [(8 * KiB, rng.randbytes(8 * KiB)), (2 * MiB + 4 * KiB, rng.randbytes(4 * KiB))]
    repo = os.path.join(root, "repo")
    shutil.rmtree(IMAGE_DIR, ignore_errors=True)
    os.makedirs(IMAGE_DIR)
    for name, (size, extents) in images.items():
        _write(os.path.join(IMAGE_DIR, f"{name}.raw"), size, extents)
    ids = random.Random(1)
    snaps = {}
    with pytest.MonkeyPatch.context() as mp:
        # Seeded ids and a fixed clock: the repository's bytes are the same on every run (see the docstring).
        mp.setattr(os, "urandom", ids.randbytes)
        mp.setattr(time, "time", lambda: 1_800_000_000.0)
        Client.init(repo, chunk_size=CS)
        with Client(repo) as c:
            disks = {n: c.add_disk(os.path.join(IMAGE_DIR, f"{n}.raw"), disk_name=n)["DiskId"] for n in images}
            for name in ("a1", "a2", "b1"):
                img = os.path.join(IMAGE_DIR, f"{name[0]}.raw")
                if name == "a2":
                    _write(img, images["a"][0], a2_change)
                sid = c.create_snapshot(disks[name[0]], snapshot_name=f"nightly-{name}")["SnapshotId"]
                saved = os.path.join(root, f"{name}.img")
                shutil.copyfile(img, saved)
                chunks = chunk_ids(saved)
                snaps[name] = Snap(sid, saved, chunks, segment_ids(chunks))
    catalogs.close_env(os.path.join(repo, "catalog"))
    packs = {}
    for sub in sorted(os.listdir(os.path.join(repo, "packs"))):
        for f in sorted(os.listdir(os.path.join(repo, "packs", sub))):
            rel = os.path.join("packs", sub, f)
            packs[f[:16]] = pack_layout(os.path.join(repo, rel), rel)
    os.unlink(os.path.join(repo, "catalog", "lock.mdb"))
    return Prepared(repo, snaps, disks, packs)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("damage-prepared"))
    with open(IMAGE_DIR + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run building the same fixed path waits
        try:
            return _build(root)
        finally:
            shutil.rmtree(IMAGE_DIR, ignore_errors=True)


@pytest.fixture
def repo(prepared, tmp_path):
    """A fresh copy of the prepared repository."""
    path = str(tmp_path / "repo")
    shutil.copytree(prepared.repo, path)
    return path


# --- the real CLI in child processes --------------------------------------------------------------------
def cli(repo, *args, timeout=120):
    """``blocksnap --repo REPO ARGS`` in a child; fails the test on what must never happen: a death by signal,
    a traceback, an InternalError, a hang."""
    what = "blocksnap " + " ".join(args)
    try:
        proc = run_cli("--repo", repo, *args, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} hung (killed after {timeout} s)")
    assert proc.returncode >= 0, f"{what} died of {signal.Signals(-proc.returncode).name}: {proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stdout + proc.stderr, f"{what}:\n{proc.stderr[-4000:]}"
    assert "InternalError" not in proc.stderr, f"{what}: {proc.stderr}"
    return proc


def error_code(proc):
    """The API code of a command that failed with the CLI's one typed line on stderr."""
    lines = proc.stderr.splitlines()
    assert proc.returncode > 0 and len(lines) == 1 and ERROR_LINE.match(lines[0]), \
        f"exit {proc.returncode}, not one typed error line: {proc.stderr!r}"
    return ERROR_LINE.match(lines[0]).group(1)


def restore(repo, snap, out_dir):
    """EXACT, or the code of a refusal that left nothing behind. Exit 0 with other bytes fails the test."""
    os.makedirs(out_dir)
    out = os.path.join(out_dir, "restored.raw")
    proc = cli(repo, "restore", snap.sid, out)
    if proc.returncode == 0:
        assert files_equal(out, snap.image), f"restore of {snap.sid} exited 0 with the wrong bytes"
        shutil.rmtree(out_dir)
        return EXACT
    code = error_code(proc)
    assert os.listdir(out_dir) == [], f"a refused restore of {snap.sid} left {os.listdir(out_dir)} behind"
    os.rmdir(out_dir)
    return code


def parallel(*calls):
    """Run ``calls`` (no-argument callables) PARALLEL at a time; their results, in order."""
    with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
        return [f.result() for f in [pool.submit(c) for c in calls]]


def restores(repo, prepared, out_dir, *commands):
    """``{name: outcome}`` of restoring every snapshot of the prepared repository from ``repo``, and the
    results of ``commands`` (callables) run alongside."""
    names = list(prepared.snaps)
    got = parallel(*[lambda n=n: restore(repo, prepared.snaps[n], os.path.join(out_dir, f"out-{n}")) for n in names],
                   *commands)
    return (dict(zip(names, got)), *got[len(names):]) if commands else dict(zip(names, got))


def restores_and_verify(repo, prepared, out_dir, *commands):
    """``(outcomes, (verify's exit code, report), *results of commands)``, all run at once."""
    return restores(repo, prepared, out_dir, lambda: verify(repo), *commands)


def verify(repo, *args):
    """``(exit code, report)`` of ``verify --json``: exit 0 or 1 and a report, never an error instead."""
    proc = cli(repo, "verify", "--json", *args)
    assert proc.returncode in (0, 1), f"verify exited {proc.returncode}: {proc.stderr}"
    report = json.loads(proc.stdout)
    assert "Damaged" in report, f"verify ended in an error instead of a report: {proc.stdout} {proc.stderr}"
    assert report["Ok"] == (proc.returncode == 0)
    return proc.returncode, report


def chunk_damage(report):
    """``{chunk id (hex): {SnapshotId: [offsets]}}`` of the damaged chunks a verify report names."""
    return {d["ChunkId"]: {a["SnapshotId"]: sorted(a["Offsets"]) for a in d["Affected"]}
            for d in report["Damaged"] if "ChunkId" in d}


def expected_chunk_damage(prepared, chunk_ids):
    out = {}
    for cid in chunk_ids:
        out[cid.hex()] = {s.sid: sorted(s.offsets({cid})) for s in prepared.snaps.values() if cid in s.chunks}
    return out


def assert_repaired(repo, prepared, tmp_path):
    """``blocksnap repair`` exits 0 and loses nothing; then every snapshot restores exactly and verify is clean."""
    proc = cli(repo, "repair", "--json")
    assert proc.returncode == 0, f"repair exited {proc.returncode}: {proc.stdout} {proc.stderr}"
    report = json.loads(proc.stdout)
    assert report["Lost"] == [] and report["Snapshots"] == len(prepared.snaps), report
    got, (code, v) = restores_and_verify(repo, prepared, str(tmp_path / "after-repair"))
    assert got == {n: EXACT for n in prepared.snaps}
    assert code == 0, v
    return report


def listing(repo):
    """What the catalog lists (snapshots and disks), without the fields that differ per request."""
    snaps = json.loads(cli(repo, "snapshot", "list", "--json").stdout)["Snapshots"]["Snapshot"]
    disks = json.loads(cli(repo, "disk", "list", "--json").stdout)["Disks"]["Disk"]
    return snaps, disks


# --- data.mdb as LMDB lays it out ---------------------------------------------------------------------------
class Entry(NamedTuple):
    """A live key of the catalog's one LMDB database, and where its bytes are in data.mdb."""
    key: bytes
    node: int  # offset of its node header (8 bytes: size lo, size hi, flags, key size)
    value: int  # offset of its value (in its leaf page, or after the header of its overflow page)
    size: int
    overflow: bool


def mdb_walk(data):
    """``(entries, pages)``: every live entry of ``data`` (a data.mdb) and the kind of every page in use, walked
    from the newest meta page (lmdb.h ``MDB_meta``, ``MDB_page``, ``MDB_node``; 64-bit, 4 KiB pages): the
    test's own reading of the file, independent of LMDB's, to find where damage lands."""
    assert struct.unpack_from("<I", data, 40)[0] == MDB_PAGE
    metas = [struct.unpack_from("<QQQ", data, pg * MDB_PAGE + 128) for pg in (0, 1)]  # root, last page, txn
    entries, pages = [], {0: "meta", 1: "meta"}

    def walk(pg):
        base = pg * MDB_PAGE
        flags, lower = struct.unpack_from("<HH", data, base + 10)
        pages[pg] = "branch" if flags & 1 else "leaf"
        for i in range((lower - 16) // 2):
            node = base + struct.unpack_from("<H", data, base + 16 + 2 * i)[0]
            lo, hi, nflags, ksize = struct.unpack_from("<HHHH", data, node)
            if flags & 1:  # a branch page: the node names a child page
                walk(lo | hi << 16 | nflags << 32)
                continue
            key = bytes(data[node + 8:node + 8 + ksize])
            if nflags & 1:  # F_BIGDATA: the value is in overflow pages
                ov = struct.unpack_from("<Q", data, node + 8 + ksize)[0]
                entries.append(Entry(key, node, ov * MDB_PAGE + 16, lo | hi << 16, True))
                for k in range(struct.unpack_from("<I", data, ov * MDB_PAGE + 12)[0]):
                    pages[ov + k] = "overflow"
            else:
                entries.append(Entry(key, node, node + 8 + ksize, lo | hi << 16, False))

    walk(max(metas, key=lambda m: m[2])[0])
    return entries, pages


def mdb_entry(data, key):
    [entry] = [e for e in mdb_walk(data)[0] if e.key == key]
    return entry


def describe_mdb_offset(data, off):
    """What byte ``off`` of a pristine data.mdb is (for failure messages)."""
    entries, pages = mdb_walk(data)
    where = f"page {off // MDB_PAGE} ({pages.get(off // MDB_PAGE, 'free')}), byte {off % MDB_PAGE}"
    for e in entries:
        table = next((t for t, p in catalogs.TABLES.items() if e.key[:1] == p), "unknown")
        if e.node <= off < e.node + 8 + len(e.key):
            return f"{where}: node header or key of a {table} entry"
        if e.value <= off < e.value + e.size:
            return f"{where}: value of a {table} entry (byte {off - e.value} of {e.size})"
    return where


def damage_mdb(repo, edit):
    """Apply ``edit(bytearray of data.mdb)`` to the repository's catalog file in place."""
    path = os.path.join(repo, "catalog", "data.mdb")
    with open(path, "rb") as f:
        data = bytearray(f.read())
    edit(data)
    with open(path, "r+b") as f:
        f.write(data)


def pristine_mdb(prepared):
    with open(os.path.join(prepared.repo, "catalog", "data.mdb"), "rb") as f:
        return f.read()


def flip(path, offset, mask=0x01):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))


# --- the prepared repository itself -------------------------------------------------------------------------
def test_the_prepared_repository_is_clean_and_the_tests_model_of_it_matches_its_catalog(prepared, repo, tmp_path):
    """Every snapshot restores exactly and verify exits 0 before any damage; the test's own chunk and segment
    ids (from the images) are the catalog's, and the sharing the damage tests rely on is there."""
    s = prepared.snaps
    got, (code, report) = restores_and_verify(repo, prepared, str(tmp_path))
    assert got == {n: EXACT for n in s}
    assert code == 0 and report["Snapshots"] == 3, report
    with Client(repo) as c, c.repo.catalog.read() as txn:
        for snap in s.values():
            rec = txn.snapshot(snap.sid)
            assert txn.snapshot_map(snap.sid, len(snap.segments)) == b"".join(snap.segments)
            assert rec["SourceDiskSize"] == os.path.getsize(snap.image)
        only_a1_b1 = set(s["a1"].chunks) & set(s["b1"].chunks) - set(s["a2"].chunks)
        assert len(only_a1_b1) == 2 and all(txn.chunk(cid).refcount == 2 for cid in only_a1_b1)
    catalogs.close_env(os.path.join(repo, "catalog"))
    assert s["a1"].segments[1] == s["a2"].segments[1] and s["a1"].segments[3] == s["a2"].segments[3]
    assert s["a1"].segments[0] != s["a2"].segments[0] and s["b1"].segments[0] == ZERO_ID
    assert len(set(s["a1"].chunks) & set(s["b1"].chunks) - {None}) == 16
    listed = {r.id for p in prepared.packs.values() for r in p.records if r.kind == KIND_CHUNK}
    assert listed == {c for snap in s.values() for c in snap.chunks} - {None}


# --- 1-7: damage to the catalog --------------------------------------------------------------------------
def _segment_value(data, snap, s):
    """Offset in data.mdb of the chunk ids of segment ``s`` of ``snap`` (found by scanning for them)."""
    ids = b"".join(c or ZERO_ID for c in snap.chunks[s * SEGMENT_CHUNKS:(s + 1) * SEGMENT_CHUNKS])
    at = [m.start() for m in re.finditer(re.escape(ids), data)]
    assert len(at) == 1, f"segment {s} of {snap.sid} is in data.mdb {len(at)} times"
    return at[0]


def _refused_reported_repaired(repo, prepared, tmp_path, refused):
    """Restores of the snapshots ``refused`` (names) fail with a typed error, the others are exact; verify exits
    1 naming exactly those; repair gives every snapshot back."""
    got, (code, report) = restores_and_verify(repo, prepared, str(tmp_path / "damaged"))
    assert {n for n, o in got.items() if o != EXACT} == set(refused), got
    assert code == 1 and prepared.names(report["AffectedSnapshots"]) == sorted(refused), report
    assert_repaired(repo, prepared, tmp_path)
    return got, report


def test_a_zeroed_sector_in_a_map_segment_in_data_mdb_is_refused_reported_and_repaired(prepared, repo, tmp_path):
    """512 zero bytes over chunk ids of a map segment that a1 and a2 share: both their restores refuse, the
    others are exact, verify exits 1 naming a1 and a2, and repair restores everything."""
    a1 = prepared.snaps["a1"]
    ids_at = _segment_value(pristine_mdb(prepared), a1, 1)
    sector = (ids_at + SECTOR) // SECTOR * SECTOR
    assert sector + SECTOR <= ids_at + 128 * 16  # inside the ids of the segment's 128 random chunks

    def zero(data):
        data[sector:sector + SECTOR] = bytes(SECTOR)

    damage_mdb(repo, zero)
    _, report = _refused_reported_repaired(repo, prepared, tmp_path, ["a1", "a2"])
    assert any(d["What"] == f"map segment {a1.segments[1].hex()}" for d in report["Damaged"]), report


def test_two_chunk_ids_swapped_in_a_map_segment_in_data_mdb_are_refused_reported_and_repaired(prepared, repo,
                                                                                             tmp_path):
    """A segment value whose layout is valid but whose content is not (two of its chunk ids swapped: each id
    is a real chunk, at the wrong offset): the restores that use it refuse instead of writing the chunks in
    the wrong places, verify names a1 and a2, repair restores everything."""
    a1 = prepared.snaps["a1"]
    ids_at = _segment_value(pristine_mdb(prepared), a1, 1)

    def swap(data):
        first, second = data[ids_at:ids_at + 16], data[ids_at + 16:ids_at + 32]
        assert first != second and any(first) and any(second)
        data[ids_at:ids_at + 32] = second + first

    damage_mdb(repo, swap)
    _refused_reported_repaired(repo, prepared, tmp_path, ["a1", "a2"])


def test_a_flipped_digit_of_SourceDiskSize_in_a_snapshot_record_is_refused_reported_and_repaired(prepared, repo,
                                                                                                tmp_path):
    """b1's record in data.mdb says its image is 1 byte larger: its restore refuses (it would make a file of
    the wrong size), verify exits 1 naming b1, repair restores everything."""
    b1 = prepared.snaps["b1"]
    entry = mdb_entry(pristine_mdb(prepared), b"S" + b1.sid.encode())
    field = b'"SourceDiskSize":%d,' % os.path.getsize(b1.image)

    def flip_digit(data):
        at = bytes(data[entry.value:entry.value + entry.size]).index(field) + entry.value + len(field) - 2
        data[at] = ord("0") + (data[at] - ord("0") + 1) % 10

    damage_mdb(repo, flip_digit)
    _refused_reported_repaired(repo, prepared, tmp_path, ["b1"])


def test_a_chunk_refcount_one_too_low_does_not_let_a_delete_remove_data_another_snapshot_uses(prepared, repo,
                                                                                             tmp_path):
    """A count written wrong with a valid checksum (a bug, not bit rot): a chunk that only a1 and b1 use is
    counted once. Deleting b1 must not remove it (the mark finds a1's segment naming it): a1 still restores
    exactly, before and after gc; verify and gc report the wrong count, and repair sets it right."""
    s = prepared.snaps
    cid = min(set(s["a1"].chunks) & set(s["b1"].chunks) - set(s["a2"].chunks))
    with Client(repo) as c, c.repo.catalog.write() as txn:
        entry = txn.chunk(cid)
        assert entry.refcount == 2
        txn.put_chunk(cid, entry._replace(refcount=1))
    catalogs.close_env(os.path.join(repo, "catalog"))
    proc = cli(repo, "snapshot", "delete", s["b1"].sid)
    assert proc.returncode == 0, proc.stderr
    left = prepared._replace(snaps={n: s[n] for n in ("a1", "a2")})
    got, (code, report) = restores_and_verify(repo, left, str(tmp_path / "after-delete"))
    assert got == {"a1": EXACT, "a2": EXACT}
    assert code == 1 and report["AffectedSnapshots"] == [], report
    assert report["Problems"] == [{"What": f"chunk {cid.hex()}", "Problem": "refcount 0, named 1 times by segments"}]
    proc = cli(repo, "gc", "--json")
    assert proc.returncode == 0, proc.stderr
    problems = json.loads(proc.stdout)["Problems"]
    assert problems == [{"ChunkId": cid.hex(), "Problem": "refcount 0, but a live segment names it: kept"}]
    assert restores(repo, left, str(tmp_path / "after-gc")) == {"a1": EXACT, "a2": EXACT}
    proc = cli(repo, "repair")
    assert proc.returncode == 0, proc.stderr
    assert verify(repo)[0] == 0


def _every_reading_command_refuses(repo, prepared, tmp_path, code):
    """snapshot list, disk list, gc --dry-run and every restore end in the one typed error ``code``; verify
    exits 1 with a report naming every snapshot."""
    commands = [["snapshot", "list"], ["snapshot", "list", "--disk-id", prepared.disks["a"]], ["disk", "list"],
                ["gc", "--dry-run"]]
    got, (rc, report), *procs = restores_and_verify(repo, prepared, str(tmp_path / "damaged"),
                                                    *[lambda a=a: cli(repo, *a) for a in commands])
    assert [error_code(proc) for proc in procs] == [code] * len(commands)
    assert got == {n: code for n in prepared.snaps}
    assert rc == 1 and prepared.names(report["AffectedSnapshots"]) == sorted(prepared.snaps), report


def test_data_mdb_cut_to_half_is_a_typed_error_everywhere_and_repair_rebuilds_it(prepared, repo, tmp_path):
    """data.mdb truncated to half its length: every command ends in Repository.CatalogDamaged (verify in a
    report naming every snapshot), never a signal; repair rebuilds the same listing and every snapshot."""
    before = listing(repo)
    path = os.path.join(repo, "catalog", "data.mdb")
    os.truncate(path, os.path.getsize(path) // 2)
    _every_reading_command_refuses(repo, prepared, tmp_path, "Repository.CatalogDamaged")
    assert_repaired(repo, prepared, tmp_path)
    assert listing(repo) == before




@pytest.mark.parametrize("how", ["byte in data.mdb", "sealed with a valid checksum"])
def test_an_invalid_utf8_byte_in_a_snapshot_record_is_reported_not_an_internal_error(prepared, repo, tmp_path, how):
    """A 0xff byte in b1's record (as bit rot leaves it, or as a bug would write it under a valid checksum):
    list, describe, verify and gc never end in InternalError or a traceback, only b1's restore refuses,
    verify exits 1 naming b1, and repair gives the record back."""
    b1 = prepared.snaps["b1"]
    key = b"S" + b1.sid.encode()
    if how == "byte in data.mdb":
        entry = mdb_entry(pristine_mdb(prepared), key)

        def garble(data):
            at = bytes(data[entry.value:entry.value + entry.size]).index(b"nightly-b1") + entry.value
            data[at] = 0xFF

        damage_mdb(repo, garble)
    else:
        with Client(repo) as c, c.repo.catalog.write() as txn:
            payload = catalogs.dump_json(txn.snapshot(b1.sid)).replace(b"nightly-b1", b"\xffightly-b1")
            txn._put(key, payload)  # the one way to seal bytes that no record encodes to
        catalogs.close_env(os.path.join(repo, "catalog"))
    for args in (["snapshot", "list"], ["snapshot", "list", "--json", "--disk-id", prepared.disks["b"]],
                 ["snapshot", "list", "--disk-id", prepared.disks["a"]], ["gc", "--dry-run"], ["gc"]):
        proc = cli(repo, *args)
        if proc.returncode:
            error_code(proc)
    got, (code, report) = restores_and_verify(repo, prepared, str(tmp_path / "damaged"))
    assert {n for n, o in got.items() if o != EXACT} == {"b1"}, got
    assert code == 1, report
    assert_repaired(repo, prepared, tmp_path)
    snaps, _ = listing(repo)
    assert [s["SnapshotName"] for s in snaps if s["SnapshotId"] == b1.sid] == ["nightly-b1"]
    assert prepared.names(report["AffectedSnapshots"]) == ["b1"], report  # last: the known bug fails here


def test_a_deleted_catalog_is_CatalogMissing_everywhere_and_verify_names_every_snapshot(prepared, repo, tmp_path):
    """catalog/ removed entirely: every reading command says Repository.CatalogMissing, and verify exits 1
    naming every snapshot the store holds."""
    shutil.rmtree(os.path.join(repo, "catalog"))
    _every_reading_command_refuses(repo, prepared, tmp_path, "Repository.CatalogMissing")


@pytest.mark.parametrize("gone", ["catalog/", "catalog/data.mdb"])
def test_repair_rebuilds_a_deleted_catalog_from_the_store_alone(prepared, repo, tmp_path, gone):
    """With catalog/ (or its data.mdb) deleted, repair rebuilds the same listing from the store alone: every
    snapshot restores exactly and verify is clean."""
    before = listing(repo)
    path = os.path.join(repo, gone)
    shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
    report = assert_repaired(repo, prepared, tmp_path)
    assert report["ObjectsRewritten"] == 0 and report["SegmentsRewritten"] == 0
    assert listing(repo) == before


# --- 8: damage to the store ---------------------------------------------------------------------------------
def test_a_flipped_byte_in_a_snapshot_object_is_reported_and_repair_writes_it_anew(prepared, repo, tmp_path):
    """snapshots/<a2> damaged: restores still work (the catalog holds the record), verify exits 1 naming a2,
    and repair writes the object anew from the catalog's checked copy, byte for byte as it was."""
    a2 = prepared.snaps["a2"]
    path = os.path.join(repo, "snapshots", a2.sid)
    flip(path, os.path.getsize(path) // 2)
    got, (code, report) = restores_and_verify(repo, prepared, str(tmp_path / "damaged"))
    assert got == {n: EXACT for n in prepared.snaps}, got
    assert code == 1 and prepared.names(report["AffectedSnapshots"]) == ["a2"], report
    assert assert_repaired(repo, prepared, tmp_path)["ObjectsRewritten"] == 1
    with open(path, "rb") as got, open(os.path.join(prepared.repo, "snapshots", a2.sid), "rb") as was:
        assert got.read() == was.read()


def test_a_flipped_byte_in_a_disk_object_is_reported_and_repair_writes_it_anew(prepared, repo, tmp_path):
    """disks/<b> damaged: every restore still works, verify exits 1 naming the disk, and repair writes the
    object anew from the catalog's copy, byte for byte as it was."""
    disk = prepared.disks["b"]
    path = os.path.join(repo, "disks", disk)
    flip(path, 20)
    got, (code, report) = restores_and_verify(repo, prepared, str(tmp_path / "damaged"))
    assert got == {n: EXACT for n in prepared.snaps}, got
    assert code == 1 and [p["What"] for p in report["Problems"]] == [f"disk object {disk}"], report
    assert assert_repaired(repo, prepared, tmp_path)["ObjectsRewritten"] == 1
    with open(path, "rb") as got, open(os.path.join(prepared.repo, "disks", disk), "rb") as was:
        assert got.read() == was.read()


def _record(prepared, rid):
    [(pack, rec)] = [(p, r) for p in prepared.packs.values() for r in p.records if r.id == rid]
    return pack, rec


@pytest.mark.parametrize("where", ["stored bytes of a raw chunk", "record header", "stored bytes of a zstd chunk"])
def test_a_damaged_chunk_record_in_a_pack_is_refused_and_verify_names_its_snapshots_and_offsets(
        prepared, repo, tmp_path, where):
    """One flipped bit in a chunk's pack record: exactly the snapshots whose images hold that chunk refuse to
    restore, and verify names them with each offset the chunk has in them (worked out from the images)."""
    s = prepared.snaps
    if where == "stored bytes of a zstd chunk":
        cid = s["a1"].chunks[20]  # text at 80 KiB of a (a1 and a2)
    else:
        cid = s["a1"].chunks[5]  # shared by a1, a2 (at 20 KiB) and b1 (at 1 MiB + 20 KiB)
    pack, rec = _record(prepared, cid)
    assert (rec.stored_len < CS) == (where == "stored bytes of a zstd chunk")
    flip(os.path.join(repo, pack.path), rec.offset + (20 if where == "record header" else 32 + rec.stored_len // 2))
    users = prepared.users([rec])
    assert users == (["a1", "a2"] if "zstd" in where else ["a1", "a2", "b1"])
    got, (code, report) = restores_and_verify(repo, prepared, str(tmp_path / "damaged"))
    assert {n for n, o in got.items() if o != EXACT} == set(users), got
    assert code == 1 and prepared.names(report["AffectedSnapshots"]) == users, report
    assert chunk_damage(report) == expected_chunk_damage(prepared, [cid])
    assert f"offset {rec.offset}" in next(d["Problem"] for d in report["Damaged"] if d.get("ChunkId") == cid.hex())


def test_a_damaged_map_segment_record_in_a_pack_is_reported_while_restores_use_the_catalogs_copy(prepared, repo,
                                                                                                tmp_path):
    """A flipped bit in the store's copy of the segment a1 and a2 share: restores work (they read the catalog's
    checked copy), verify exits 1 naming a1 and a2, and repair writes the segment anew from the catalog."""
    seg = prepared.snaps["a1"].segments[1]
    pack, rec = _record(prepared, seg)
    flip(os.path.join(repo, pack.path), rec.offset + 32 + 100, 0x40)
    got, (code, report) = restores_and_verify(repo, prepared, str(tmp_path / "damaged"))
    assert got == {n: EXACT for n in prepared.snaps}, got
    assert code == 1 and prepared.names(report["AffectedSnapshots"]) == ["a1", "a2"], report
    assert [d["What"] for d in report["Damaged"]] == [f"map segment {seg.hex()} (the store's copy)"]
    assert assert_repaired(repo, prepared, tmp_path)["SegmentsRewritten"] == 1


def _largest_pack(prepared):
    return max(prepared.packs.values(), key=lambda p: p.size)


@pytest.mark.parametrize("where", ["record index", "tail"])
def test_a_damaged_pack_trailer_is_reported_while_restores_still_work(prepared, repo, tmp_path, where):
    """A flipped bit in a pack's trailer (which repair rebuilds the catalog from): every restore still works,
    verify exits 1 and names the snapshots whose records that pack holds."""
    pack = _largest_pack(prepared)
    flip(os.path.join(repo, pack.path), pack.index_offset + 40 if where == "record index" else pack.size - 20)
    got, (code, report) = restores_and_verify(repo, prepared, str(tmp_path / "damaged"))
    assert got == {n: EXACT for n in prepared.snaps}, got
    assert code == 1 and prepared.names(report["AffectedSnapshots"]) == prepared.users(pack.records), report
    assert [d["What"] for d in report["Damaged"]] == [f"pack {pack.id} (its trailer)"]


def _truncate_largest_pack(prepared, repo):
    """Cut the largest pack in the middle of a record; returns (records lost, records kept)."""
    pack = _largest_pack(prepared)
    cut = pack.records[len(pack.records) // 2].offset + 100
    os.truncate(os.path.join(repo, pack.path), cut)
    return [r for r in pack.records if r.end > cut], [r for r in pack.records if r.end <= cut]


def test_a_truncated_pack_is_refused_only_by_the_snapshots_whose_chunks_it_lost(prepared, repo, tmp_path):
    """The largest pack cut in the middle of a record: the restores of the snapshots that use a chunk past the
    cut refuse, all others are exact; verify exits 1, names every lost chunk with its offsets, and names
    the snapshots the pack's records serve."""
    pack = _largest_pack(prepared)
    lost, _ = _truncate_largest_pack(prepared, repo)
    lost_chunks = [r for r in lost if r.kind == KIND_CHUNK]
    refused = prepared.users(lost_chunks)
    assert refused and len(refused) < len(prepared.snaps)
    got, (code, report) = restores_and_verify(repo, prepared, str(tmp_path / "damaged"))
    assert sorted(n for n, o in got.items() if o != EXACT) == refused, got
    assert code == 1 and prepared.names(report["AffectedSnapshots"]) == prepared.users(pack.records), report
    assert chunk_damage(report) == expected_chunk_damage(prepared, [r.id for r in lost_chunks])


# --- bugs the matrix found (fixed; each test reproduces one) -----------------------------------------------
def test_a_flipped_bit_in_the_size_of_a_segment_value_in_data_mdb_is_never_a_sigbus(prepared, repo, tmp_path):
    """One bit of the LMDB node size of the segment a1 and a2 share (the value is in overflow pages) set, so
    that it runs 1 MiB past the end of data.mdb: list ends in a typed error, every other command as damage to
    data.mdb must (``assert_catalog_damage_handled``), never in a signal."""
    entry = mdb_entry(pristine_mdb(prepared), b"G" + prepared.snaps["a1"].segments[1])
    assert entry.overflow
    flip(os.path.join(repo, "catalog", "data.mdb"), entry.node + 2, 0x10)  # bit 20 of the size
    proc = cli(repo, "snapshot", "list")
    if proc.returncode:
        error_code(proc)
    assert_catalog_damage_handled(repo, prepared, tmp_path, "bit 20 of a segment value's size")


@pytest.mark.parametrize("damage", ["flipped bit in the trailer", "pack truncated"])
def test_repair_never_loses_a_snapshot_that_restored_before_it(prepared, repo, tmp_path, damage):
    """After damage to a pack's trailer, every snapshot that restored exactly before 'blocksnap repair' still
    does after it (the records are intact; verify says repair rewrites them into a new pack)."""
    if damage == "pack truncated":
        _truncate_largest_pack(prepared, repo)
    else:
        pack = _largest_pack(prepared)
        flip(os.path.join(repo, pack.path), pack.index_offset + 40)
    before = restores(repo, prepared, str(tmp_path / "before"))
    assert EXACT in before.values()
    proc = cli(repo, "repair", "--json")
    after = restores(repo, prepared, str(tmp_path / "after"))
    assert {n for n, o in after.items() if o == EXACT} >= {n for n, o in before.items() if o == EXACT}, \
        (before, after, proc.stdout[-2000:])


def test_a_leaf_page_of_data_mdb_with_a_zeroed_header_is_never_a_sigabrt(prepared, repo, tmp_path):
    """The two flag bytes of a leaf page of chunk entries (not the first leaf) cleared: every command ends in a
    typed error or a report, never a signal; verify names every snapshot that refused; repair restores all."""
    pristine = pristine_mdb(prepared)
    entry = mdb_entry(pristine, b"C" + prepared.snaps["a1"].chunks[5])
    page = entry.node // MDB_PAGE
    assert not entry.overflow and mdb_walk(pristine)[1][page] == "leaf"
    with open(os.path.join(repo, "catalog", "data.mdb"), "r+b") as f:
        f.seek(page * MDB_PAGE + 10)
        f.write(bytes(2))
    assert_catalog_damage_handled(repo, prepared, tmp_path, f"flags of leaf page {page} cleared")


def test_a_zeroed_sector_over_node_headers_in_data_mdb_is_named_by_verify_for_every_refused_restore(prepared, repo,
                                                                                                   tmp_path):
    """The sector over the node headers of the disk records zeroed (their leaf page also holds chunk and
    segment entries; fuzz trial 75 hit it): every restore that refuses for it is named by verify, and
    repair restores everything."""
    pristine = pristine_mdb(prepared)
    node = [e for e in mdb_walk(pristine)[0] if e.key[:1] == b"D"][-1].node
    with open(os.path.join(repo, "catalog", "data.mdb"), "r+b") as f:
        f.seek(node - node % SECTOR)
        f.write(bytes(SECTOR))
    assert_catalog_damage_handled(repo, prepared, tmp_path, f"the sector at {node - node % SECTOR} zeroed")


def test_a_snapshot_record_lost_from_the_catalog_is_named_by_verify(prepared, repo, tmp_path):
    """b1's record gone from the catalog (its map and its object in the store intact), as a bug or a damaged
    branch page leaves it: b1's restore refuses, verify exits 1 naming b1, repair gives it back."""
    b1 = prepared.snaps["b1"]
    with Client(repo) as c, c.repo.catalog.write() as txn:
        txn._delete(b"S" + b1.sid.encode())
    catalogs.close_env(os.path.join(repo, "catalog"))
    _refused_reported_repaired(repo, prepared, tmp_path, ["b1"])


# --- 9: seeded fuzz ---------------------------------------------------------------------------------------
def assert_catalog_damage_handled(repo, prepared, tmp_path, hit):
    """The contract for damage to data.mdb, whatever it hit: restores, verify and gc --dry-run never crash, each
    restore is exact or a typed refusal, verify exits 0 only if no restore refused and names every snapshot
    that did; then repair, from the intact store, gives every snapshot back."""
    got, (code, report), planned = restores_and_verify(repo, prepared, str(tmp_path / "damaged"),
                                                       lambda: cli(repo, "gc", "--dry-run"))
    if planned.returncode:
        error_code(planned)
    refused = {n for n, o in got.items() if o != EXACT}
    assert code == 1 or not refused, (hit, got, report)
    assert refused <= set(prepared.names(report["AffectedSnapshots"])), (hit, got, report)
    assert_repaired(repo, prepared, tmp_path)


# Trials that hit a known bug (the seeds are tied to the prepared repository's bytes: a change to the fixture
# or to what blocksnap writes moves them, and these marks with them).
KNOWN_DATA_MDB_TRIALS = {}
KNOWN_PACK_TRIALS = {}


def trials(known):
    return [pytest.param(k, marks=pytest.mark.xfail(strict=True, reason=known[k])) if k in known else k
            for k in range(TRIALS)]


def _mutate(rng, data):
    """Flip one bit, or zero the 512-byte sector, at a seeded random offset of ``data`` (a whole file, as a
    bytearray); returns (offset, what was done)."""
    off = rng.randrange(len(data))
    if rng.random() < 0.5:
        bit = rng.randrange(8)
        data[off] ^= 1 << bit
        return off, f"bit {bit} of byte {off} flipped"
    off -= off % SECTOR
    data[off:off + SECTOR] = bytes(len(data[off:off + SECTOR]))
    return off, f"the sector at byte {off} zeroed"


@pytest.mark.parametrize("trial", trials(KNOWN_DATA_MDB_TRIALS))
def test_fuzz_data_mdb(prepared, repo, tmp_path, trial):
    """A seeded bit flip or zeroed sector anywhere in data.mdb: nothing crashes, every restore is exact or a
    typed refusal, verify names every snapshot that refused (and exits 0 only if none did), and repair,
    from the intact store, gives every snapshot back."""
    rng = random.Random(f"data.mdb {trial}")
    pristine = pristine_mdb(prepared)
    data = bytearray(pristine)
    off, what = _mutate(rng, data)
    with open(os.path.join(repo, "catalog", "data.mdb"), "r+b") as f:
        f.write(data)
    hit = f"{what}: {describe_mdb_offset(pristine, off)}"
    print(hit)  # shown with a failure
    assert_catalog_damage_handled(repo, prepared, tmp_path, hit)


def _pack_damage(pack, pristine, damaged):
    """What the changed bytes of a pack hit, by its trailer's offsets: ``(offsets changed, records they hit,
    whether they hit the index block or the tail)``; the rest is the pack header or the zero padding."""
    changed = [i for i, (x, y) in enumerate(zip(pristine, damaged)) if x != y]
    records = [r for r in pack.records if any(r.offset <= i < r.end for i in changed)]
    trailer = any(pack.index_offset <= i < pack.index_offset + pack.index_len or i >= pack.size - 32 for i in changed)
    return changed, records, trailer


@pytest.mark.parametrize("trial", trials(KNOWN_PACK_TRIALS))
def test_fuzz_packs(prepared, repo, tmp_path, trial):
    """A seeded bit flip or zeroed sector anywhere in the packs: exactly the snapshots that use a damaged chunk
    record refuse to restore (all others are exact); verify names exactly the snapshots the damaged records
    serve (all of the pack's for its trailer) with every offset of a damaged chunk, and exits 0 only if the
    damage hit nothing that is read (the zero padding before the tail, the pack header) or changed no byte."""
    rng = random.Random(f"packs {trial}")
    packs = sorted(prepared.packs.values(), key=lambda p: p.path)
    pack = rng.choices(packs, weights=[p.size for p in packs])[0]
    path = os.path.join(repo, pack.path)
    with open(path, "rb") as f:
        pristine = f.read()
    data = bytearray(pristine)
    _, what = _mutate(rng, data)
    what = f"{pack.path}: {what}"
    with open(path, "r+b") as f:
        f.write(data)
    changed, records, trailer = _pack_damage(pack, pristine, data)
    chunks = [r for r in records if r.kind == KIND_CHUNK]
    hit = f"{what}: {len(changed)} bytes changed, records {[(r.offset, r.kind) for r in records]}, trailer {trailer}"
    print(hit)  # shown with a failure
    got, (code, report) = restores_and_verify(repo, prepared, str(tmp_path / "damaged"))
    assert sorted(n for n, o in got.items() if o != EXACT) == prepared.users(chunks), (hit, got)
    if not changed:
        assert code == 0, (hit, report)
    elif records or trailer:
        named = prepared.users(pack.records) if trailer else prepared.users(records)
        assert code == 1 and prepared.names(report["AffectedSnapshots"]) == named, (hit, report)
        assert chunk_damage(report) == expected_chunk_damage(prepared, [r.id for r in chunks]), (hit, report)
    else:  # only the zero padding or the pack header: nothing reads them; a report must not name snapshots
        assert report["AffectedSnapshots"] == [], (hit, report)
