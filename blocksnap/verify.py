"""Verifying a repository: everything read back and checked, every damage named with what it affects.

What is checked (docs/FORMAT.md, "Integrity"):

- the catalog: every value's checksum (a walk over the whole keyspace), every record's schema, every
  map segment against its id, every count against what references it (segment refcounts against the
  maps, chunk refcounts against the stored segments), the snapshot order, paths and tokens;
- the store: every indexed chunk's record (header, decoding, XXH3-128 against its id, in the C core),
  every map segment's record, every pack's trailer (and that it lists each record the index names in
  it), every snapshot and disk object against the catalog's copy;
- what damage affects: each damaged chunk, segment, map or record is reported with the snapshots and
  offsets it affects, so a user knows what a restore would refuse and what ``repair`` can fix.

A verify registers as a reader (``Repository.reader``): it never waits for gc.
"""
import concurrent.futures

from . import _native, errors
from .repository import ACCOMPLISHED, ZERO_ID
from .restore import BATCH_CHUNKS, _pack_fd, _restorer, window_ids
from .store import catalog as catalogs
from .store import objects, refs
from .store.config import SEGMENT_CHUNKS
from .store.packs import CODEC_RAW, KIND_CHUNK, KIND_SEGMENT, TAIL, read_header, read_trailer

OFFSETS_SHOWN = 4096  # offsets listed per affected snapshot and damaged object


def verify(repo, snapshot_id=None, progress=None, on_wait=None):
    """Re-read and check every stored object (of one snapshot, or of the whole repository).

    Returns:
        dict: ``Checked`` (chunks), ``CheckedBytes``, ``Snapshots``, ``Damaged``: a list of
        ``{"What", "Problem", "Affected": [{"SnapshotId", "Offsets"}]}`` (chunks also carry ``ChunkId``),
        ``Problems``: findings that affect no snapshot's data (counts, orphans of the index),
        ``AffectedSnapshots``: every snapshot some damage affects.
    Raises:
        InvalidSnapshotIdNotFound.
    """
    hold = repo.reader()
    try:
        v = _Verifier(repo, progress)
        if snapshot_id is None:
            return v.everything()
        v.one(snapshot_id)
        return v.result()
    finally:
        if hold is not None:
            hold.release()
        repo.packs.release_ended_threads()


def without_catalog(repo, problem, snapshot_id=None):
    """The report for a repository whose catalog cannot be opened: every snapshot the store holds is
    affected (restores refuse) until ``blocksnap repair`` rebuilds the catalog from the store."""
    v = _Verifier(repo, None)
    for sid in repo.backend.list_objects("snapshots"):
        if snapshot_id is None or sid == snapshot_id:
            v._whole(sid, f"{problem}; 'blocksnap repair' rebuilds the catalog from the store")
    if not v.whole:
        v.problems.append({"What": "catalog", "Problem": problem})
    return v.result()


class _Verifier:
    def __init__(self, repo, progress):
        self.repo = repo
        self.cs = repo.chunk_size
        self.progress = progress
        self.maps = {}  # snapshot id -> segment ids, of the accomplished snapshots that have a good map
        self.sizes = {}  # snapshot id -> image size
        self.damaged = []  # finished damage items
        self.bad_chunks = {}  # chunk id -> problem
        self.bad_segments = {}  # segment id -> problem (the catalog's copy: restores refuse)
        self.bad_segment_records = {}  # segment id -> problem (the store's copy: repair cannot rebuild it)
        self.bad_packs = {}  # pack id -> problem (trailer)
        self.whole = {}  # snapshot id -> [problems] that affect the whole snapshot
        self.problems = []
        self.checked = 0
        self.checked_bytes = 0

    # --- one snapshot ---------------------------------------------------------------------------------
    def one(self, snapshot_id):
        repo = self.repo
        with repo.catalog.read() as txn:
            rec = repo.get_snapshot(snapshot_id, txn)
            if rec["Status"] != ACCOMPLISHED:
                return
            try:
                seg_ids = repo.segment_ids(txn, rec)
            except errors.RepositoryDamaged as exc:
                self._whole(snapshot_id, str(exc))
                return
        self.maps[snapshot_id] = seg_ids
        self.sizes[snapshot_id] = rec["SourceDiskSize"]
        self._check_object(rec, seg_ids)
        n = -(-rec["SourceDiskSize"] // self.cs)
        n_segs = len(seg_ids) // 16
        items, seg_items = [], []
        step = 16
        for s0 in range(0, n_segs, step):
            count = min(step, n_segs - s0)
            with repo.catalog.read() as txn:
                for s in range(s0, s0 + count):
                    sid = seg_ids[16 * s:16 * s + 16]
                    try:
                        ids = window_ids(txn, seg_ids, s, 1, n)
                    except errors.RepositoryDamaged as exc:
                        self.bad_segments[sid] = str(exc)
                        continue
                    if sid != ZERO_ID:
                        seg = txn.segment(sid)
                        seg_items.append((seg.pack_id, seg.offset, len(seg.ids), len(seg.ids), CODEC_RAW,
                                          KIND_SEGMENT, sid, 0))
                    for j in _native.nonzero_ids(ids):
                        cid = ids[16 * j:16 * j + 16]
                        try:
                            entry = txn.chunk(cid)
                        except errors.RepositoryDamaged as exc:
                            self.bad_chunks[cid] = str(exc)
                            continue
                        if entry is None:
                            self.bad_chunks[cid] = "missing from the index"
                            continue
                        items.append((entry.pack_id, entry.offset, entry.stored_len, entry.raw_len, entry.codec,
                                      KIND_CHUNK, cid, 0))
        self._check_records(sorted(set(items)), sorted(set(seg_items)))

    # --- everything -----------------------------------------------------------------------------------
    def everything(self):
        """Check the whole repository; returns the report."""
        if not catalogs.probe(self.repo.catalog.path):
            self._unreadable("LMDB stopped reading it on a damaged page")
            return self.result()
        try:
            self._walk_catalog()
            chunk_items, seg_items = self._catalog_model()
            self._check_indexes()
            self._check_lookups()
            self._check_records(chunk_items, seg_items)
            self._check_packs()
            self._check_store()
            return self.result()  # resolving what damage affects reads the catalog too
        except errors.CatalogDamaged as exc:
            self._unreadable(exc)
            return self.result()

    def _check_indexes(self):
        """The indexes of DescribeSnapshots and DescribeDisks hold exactly the entries the records make, and each
        list's count is its length ('blocksnap repair' rebuilds them)."""
        if not self.repo.catalog.indexed:
            return
        want = {}
        with self.repo.catalog.read() as txn:
            for sid in txn.snapshot_ids():
                try:
                    rec = txn.snapshot(sid)
                except errors.RepositoryDamaged:
                    continue  # reported with the record
                for field, value in catalogs.snapshot_terms(rec):
                    want[catalogs.index_prefix(catalogs.KIND_SNAPSHOT, field, value) + catalogs.snapshot_order(rec)] = sid
            for rec in self._disk_records(txn):
                for field, value in catalogs.disk_terms(rec):
                    want[catalogs.index_prefix(catalogs.KIND_DISK, field, value) + catalogs.disk_order(rec)] = \
                        rec["DiskId"]
            lengths, wrong = {}, 0
            for key, ident in txn.index_items():
                lengths[key[:10]] = lengths.get(key[:10], 0) + 1
                if want.pop(key, None) != ident:
                    wrong += 1
            bad_counts = sum(1 for prefix, n in txn.index_count_items() if lengths.pop(prefix, 0) != n) + len(lengths)
        if wrong or want or bad_counts:
            self.problems.append({"What": "catalog indexes", "Problem": f"{wrong} entries no record makes, {len(want)} "
                                  f"missing, {bad_counts} wrong counts ('blocksnap repair' rebuilds them)"})

    @staticmethod
    def _disk_records(txn):
        for did in txn.keys("disks"):
            try:
                rec = txn.disk(bytes(did).decode("ascii", "replace"))
            except errors.RepositoryDamaged:
                continue
            if rec is not None:
                yield rec

    def _unreadable(self, exc):
        """The catalog cannot be walked (LMDB's own structure is damaged, or a read ran off the end of
        data.mdb): every snapshot the store holds is affected until 'repair' rebuilds the catalog."""
        self.maps, self.bad_chunks, self.bad_segments, self.bad_segment_records, self.bad_packs = {}, {}, {}, {}, {}
        self.damaged, self.whole = [], {}
        for sid in self.repo.backend.list_objects("snapshots"):
            self._whole(sid, f"the catalog is unreadable ({exc}); 'blocksnap repair' rebuilds it")
        if not self.whole:
            self.problems.append({"What": "catalog", "Problem": f"unreadable: {exc}"})

    def _walk_catalog(self):
        """Every key's checksum; damaged values are attributed to what they affect."""
        with self.repo.catalog.read() as txn:
            for table, key, raw in txn.raw_items():
                try:
                    txn.check_raw(key, raw)
                except errors.RepositoryDamaged as exc:
                    self._attribute(table, key[1:], str(exc))
                    continue
                if table is None:
                    self.problems.append({"What": f"catalog key {key[:24].hex()}", "Problem": "in no table"})

    def _attribute(self, table, key, problem):
        if table in ("snapshots", "maps"):
            self._whole(key.decode("ascii", "replace"), problem)
        elif table == "disk_snaps":
            self.problems.append({"What": f"snapshot order of {key[:22].decode('ascii', 'replace')}",
                                  "Problem": problem})
        elif table == "segments":
            self.bad_segments[bytes(key)] = problem
        elif table == "chunks":
            self.bad_chunks[bytes(key)] = problem
        elif table == "disks":
            self.problems.append({"What": f"disk record {key.decode('ascii', 'replace')}", "Problem": problem})
        else:
            self.problems.append({"What": f"catalog {table or 'key'} {bytes(key)[:24].hex()}", "Problem": problem})

    def _catalog_model(self):
        """Records, maps, segments and chunk entries: schema, hashes and counts. Returns the records to
        read from the packs: ``(chunk items, segment items)`` sorted by pack and offset."""
        repo = self.repo
        seg_uses = {}
        chunk_places = {}
        chunk_items, seg_items = [], []
        with repo.catalog.read() as txn:
            for sid in txn.snapshot_ids():
                try:
                    rec = txn.snapshot(sid)
                except errors.RepositoryDamaged as exc:
                    if sid not in self.whole:  # it passed its checksum, and still is no record
                        self._whole(sid, str(exc))
                    continue
                if rec["Status"] != ACCOMPLISHED:
                    continue
                try:
                    segs = refs.map_of(txn, rec)
                except errors.RepositoryDamaged as exc:
                    self._whole(sid, str(exc))
                    continue
                self.maps[sid] = segs
                self.sizes[sid] = rec["SourceDiskSize"]
                for s in refs.split_ids(segs):
                    if s != ZERO_ID:
                        seg_uses[s] = seg_uses.get(s, 0) + 1
            for sid in txn.map_ids():
                if sid not in self.maps and sid not in self.whole:
                    self.problems.append({"What": f"chunk map of {sid}", "Problem": "no accomplished snapshot owns it"})
            seen_segments = set()
            for sid, seg in txn.segment_items(lambda s, exc: self.bad_segments.__setitem__(s, str(exc))):
                seen_segments.add(sid)
                for j in _native.nonzero_ids(seg.ids):
                    cid = seg.ids[16 * j:16 * j + 16]
                    chunk_places[cid] = chunk_places.get(cid, 0) + 1
                seg_items.append((seg.pack_id, seg.offset, len(seg.ids), len(seg.ids), CODEC_RAW, KIND_SEGMENT, sid, 0))
            for s in seg_uses:
                if s not in seen_segments and s not in self.bad_segments:
                    self.bad_segments[s] = "missing from the index"
            refs_seen = set()
            try:
                for s, rc in txn.segment_ref_items():
                    refs_seen.add(s)
                    if rc != seg_uses.get(s, 0):
                        self.problems.append({"What": f"map segment {s.hex()}",
                                              "Problem": f"refcount {rc}, named {seg_uses.get(s, 0)} times by maps"})
            except errors.RepositoryDamaged:
                pass  # attributed by the walk
            for s in seen_segments - refs_seen:
                self.problems.append({"What": f"map segment {s.hex()}", "Problem": "has no refcount entry"})
            indexed = set()
            for cid, entry in txn.chunk_items(lambda c, exc: self.bad_chunks.__setitem__(c, str(exc))):
                indexed.add(cid)
                expected = chunk_places.get(cid, 0)
                if entry.refcount != expected:
                    self.problems.append({"What": f"chunk {cid.hex()}",
                                          "Problem": f"refcount {entry.refcount}, named {expected} times by segments"})
                chunk_items.append((entry.pack_id, entry.offset, entry.stored_len, entry.raw_len, entry.codec,
                                    KIND_CHUNK, cid, 0))
            for cid in chunk_places:
                if cid not in indexed and cid not in self.bad_chunks:
                    self.bad_chunks[cid] = "missing from the index"
            self._check_side_tables(txn)
        chunk_items.sort()
        seg_items.sort()
        return chunk_items, seg_items

    def _check_side_tables(self, txn):
        """Snapshot order, paths, disks and tokens agree with the records."""
        recs = {}
        for sid in txn.snapshot_ids():
            try:
                recs[sid] = txn.snapshot(sid)
            except errors.RepositoryDamaged:
                continue
        disks = {}
        for did in [r["SourceDiskId"] for r in recs.values()] + [d["DiskId"] for d in self._good_disks(txn)]:
            if did in disks:
                continue
            try:
                disks[did] = txn.disk(did)
            except errors.RepositoryDamaged:
                disks[did] = "damaged"
        listed = set()
        for did, rec in disks.items():
            if rec is None:
                self.problems.append({"What": f"disk {did}", "Problem": "snapshots name it but it has no record"})
                continue
            try:
                for sid in txn.disk_snapshot_ids(did):
                    listed.add(sid)
                    if sid not in recs:
                        self.problems.append({"What": f"snapshot order of {did}", "Problem": f"names {sid}, "
                                              "which has no record"})
            except errors.RepositoryDamaged as exc:
                self.problems.append({"What": f"snapshot order of {did}", "Problem": str(exc)})
            if isinstance(rec, dict):
                try:
                    owner = txn.disk_id_of_path(rec["Path"])
                except errors.RepositoryDamaged as exc:
                    owner = str(exc)
                if owner != did:
                    self.problems.append({"What": f"disk {did}", "Problem": f"its path is registered as {owner!r}"})
        for sid, rec in recs.items():
            if sid not in listed:
                self.problems.append({"What": f"snapshot {sid}", "Problem": "missing from its disk's snapshot order"})
        try:
            for tok, ent in txn.tokens():
                rec = recs.get(ent.snapshot_id)
                if rec is None or rec.get("ClientToken") != tok:
                    self.problems.append({"What": f"ClientToken {tok!r}", "Problem": f"names {ent.snapshot_id}, "
                                          "which does not hold it"})
        except errors.RepositoryDamaged:
            pass  # attributed by the walk

    def _records(self, txn):
        """The snapshot records that can be read (memoised for one walk)."""
        if getattr(self, "_readable_records", None) is None:
            out = []
            for sid in txn.snapshot_ids():
                try:
                    rec = txn.snapshot(sid)
                except errors.RepositoryDamaged:
                    continue
                if rec is not None:
                    out.append(rec)
            self._readable_records = out
        return self._readable_records

    def _good_disks(self, txn):
        prefix_ids = [k.decode("ascii", "replace") for k in txn.keys("disks")]
        out = []
        for did in prefix_ids:
            try:
                rec = txn.disk(did)
            except errors.RepositoryDamaged:
                continue
            if rec is not None:
                out.append(rec)
        return out

    def _check_lookups(self):
        """Every map resolved as a restore resolves it, by lookups (a damaged page can hide from a lookup
        what a scan still shows)."""
        looked_up = set()  # segments shared by many snapshots (a chain) are looked up once
        with self.repo.catalog.read() as txn:
            for sid, segs in self.maps.items():
                for seg_id in refs.split_ids(segs):
                    if seg_id == ZERO_ID or seg_id in self.bad_segments or seg_id in looked_up:
                        continue
                    looked_up.add(seg_id)
                    try:
                        seg = txn.segment(seg_id)
                    except errors.CatalogDamaged as exc:
                        self.bad_segments[seg_id] = str(exc)
                        continue
                    if seg is None:
                        self.bad_segments[seg_id] = "not found by a lookup (a damaged page of the index hides it)"
                        continue
                    for j in _native.nonzero_ids(seg.ids):
                        cid = seg.ids[16 * j:16 * j + 16]
                        if cid in self.bad_chunks:
                            continue
                        try:
                            entry = txn.chunk(cid)
                        except errors.CatalogDamaged as exc:
                            self.bad_chunks[cid] = str(exc)
                            continue
                        if entry is None:
                            self.bad_chunks[cid] = "not found by a lookup (a damaged page of the index hides it)"

    # --- reading the packs ----------------------------------------------------------------------------
    def _check_records(self, chunk_items, seg_items):
        """Read every record through the C core's checks: chunks (restores depend on them) and map
        segments (the store's copies, which repair depends on)."""
        total = sum(it[3] for it in chunk_items)
        done = 0
        kinds = {KIND_CHUNK: self.bad_chunks, KIND_SEGMENT: self.bad_segment_records}
        todo = [("c", chunk_items), ("s", seg_items)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="blocksnap-verify") as pool:
            for _, items in todo:
                batches = [items[k:k + BATCH_CHUNKS] for k in range(0, len(items), BATCH_CHUNKS)]
                for bad, raw in pool.map(self._check_batch, batches):
                    for (kind, rid), problem in bad.items():
                        kinds[kind].setdefault(rid, problem)
                    if items is chunk_items:
                        done += raw
                        if self.progress:
                            self.progress(done, total)
        self.checked = len(chunk_items)
        self.checked_bytes = total

    def _check_batch(self, batch):
        restorer = _restorer(self.cs)
        bad, items, where = {}, [], []
        for pack_id, rec_off, stored, raw, codec, kind, rid, _ in batch:
            try:
                pack_fd = _pack_fd(self.repo, pack_id)
            except errors.StoreDamaged as exc:
                bad[(kind, rid)] = exc.detail.strip("()")
                continue
            items.append((pack_fd, rec_off, stored, raw, codec, kind, rid, 0))
            where.append(f"pack {pack_id.hex()} offset {rec_off}")
        start = 0
        while start < len(items):
            try:
                restorer.restore(items[start:], -1, 0)
                break
            except _native.RestoreDamage as exc:
                k, problem = start + exc.index, exc.problem
            except OSError as exc:
                k, problem = start + exc.index, exc.strerror
            bad[(items[k][5], items[k][6])] = f"{where[k]}: {problem}"
            start = k + 1
        return bad, sum(it[3] for it in batch if it[5] == KIND_CHUNK)

    def _check_packs(self):
        """Every pack's trailer reads and lists the records the index names in it."""
        repo = self.repo
        named = {}  # pack id -> {offset: id}
        with repo.catalog.read() as txn:
            for cid, entry in txn.chunk_items(lambda c, exc: None):
                named.setdefault(entry.pack_id, {})[entry.offset] = cid
            for sid, seg in txn.segment_items(lambda s, exc: None):
                named.setdefault(seg.pack_id, {})[seg.offset] = sid
        present = set(repo.backend.list_packs())
        for pack_id in sorted(present):
            try:
                records = read_trailer(repo.backend, pack_id)
                listed = {r.offset: r.id for r in records}
            except (errors.RepositoryDamaged, OSError) as exc:
                if pack_id in named:
                    self.bad_packs[pack_id] = (str(exc), named[pack_id])
                continue
            self._check_pack_frame(pack_id)
            for offset, rid in named.get(pack_id, {}).items():
                if listed.get(offset) != rid:
                    self.bad_packs[pack_id] = (f"its trailer does not list the record at {offset}",
                                               named[pack_id])
                    break

    def _check_pack_frame(self, pack_id):
        """The bytes of a pack no read depends on: its header (magic and id) and the zero padding before its
        tail. Damage there affects no snapshot; it is a problem all the same."""
        backend = self.repo.backend
        name = pack_id.hex()
        try:
            read_header(backend, pack_id)
        except (errors.RepositoryDamaged, OSError) as exc:
            self.problems.append({"What": f"pack {name}", "Problem": f"its header is damaged ({exc}); its records "
                                  "are found through its trailer"})
        try:
            size = backend.pack_size(pack_id)
            tail = backend.read_pack(pack_id, size - TAIL.size, TAIL.size)
            _, index_len, _, index_off, _ = TAIL.unpack(tail)
            pad = backend.read_pack(pack_id, index_off + index_len, size - TAIL.size - index_off - index_len)
        except OSError as exc:
            self.problems.append({"What": f"pack {name}", "Problem": f"cannot be read ({exc.strerror})"})
            return
        if any(pad):
            self.problems.append({"What": f"pack {name}", "Problem": "the padding before its tail is not zero"})

    # --- the store's objects --------------------------------------------------------------------------
    def _check_object(self, rec, seg_ids):
        sid = rec["SnapshotId"]
        if rec.get("Deleting"):
            return  # a delete a crash interrupted: its object may be gone already; gc finishes it
        try:
            stored = objects.decode_snapshot(sid, self.repo.backend.get_object("snapshots", sid))
        except (errors.RepositoryDamaged, OSError) as exc:
            self._store_copy(sid, f"its object in the store is damaged ({exc})")
            return
        if stored is None:
            self._store_copy(sid, "it has no object in the store")
        elif stored[0] != rec or stored[1] != seg_ids:
            self._store_copy(sid, "its object in the store differs from the catalog's record")

    def _store_copy(self, sid, problem):
        self.damaged.append({"What": f"snapshot {sid} (the store's copy)",
                             "Problem": f"{problem}; restores work, 'blocksnap repair' writes it anew",
                             "Affected": [{"SnapshotId": sid, "Offsets": []}]})

    def _check_store(self):
        repo = self.repo
        with repo.catalog.read() as txn:
            for sid in list(self.maps):
                try:
                    rec = txn.snapshot(sid)
                except errors.RepositoryDamaged:
                    continue
                if rec is None:
                    continue  # deleted since the catalog was walked
                self._check_object(rec, self.maps[sid])
            catalog_sids = set(txn.snapshot_ids())
            for sid in repo.backend.list_objects("snapshots"):
                try:
                    missing = sid not in catalog_sids or txn.snapshot(sid) is None
                except errors.CatalogDamaged:
                    missing = False  # there is a record, damaged: the walk named it
                if missing:
                    self._whole(sid, "the catalog has no record of it: restores refuse until 'blocksnap repair' "
                                     "adds it from the store")
            for did in repo.backend.list_objects("disks"):
                try:
                    stored = objects.decode_disk(did, repo.backend.get_object("disks", did))
                except (errors.RepositoryDamaged, OSError) as exc:
                    self.problems.append({"What": f"disk object {did}", "Problem": str(exc)})
                    continue
                try:
                    rec = txn.disk(did)
                except errors.RepositoryDamaged:
                    continue
                if rec is None:
                    if any(r["SourceDiskId"] == did for r in self._records(txn)):
                        self.problems.append({"What": f"disk object {did}", "Problem": "the catalog has no record "
                                              "of it, and snapshots name it ('blocksnap repair' adds it)"})
                    # else: what a 'disk add' killed before its catalog transaction leaves; gc removes it
                elif {k: v for k, v in rec.items() if k != "Size"} != {k: v for k, v in stored.items() if k != "Size"}:
                    self.problems.append({"What": f"disk {did}", "Problem": "its object differs from the catalog"})
            for rec in self._good_disks(txn):
                if repo.backend.get_object("disks", rec["DiskId"]) is None:
                    self.problems.append({"What": f"disk {rec['DiskId']}", "Problem": "it has no object in the store"})

    # --- the report -----------------------------------------------------------------------------------
    def _whole(self, sid, problem):
        self.whole.setdefault(sid, []).append(problem)

    def result(self):
        out = list(self.damaged)
        for sid, problems in sorted(self.whole.items()):
            out.append({"What": f"snapshot {sid}", "Problem": "; ".join(problems),
                        "Affected": [{"SnapshotId": sid, "Offsets": []}]})
        wanted = set(self.bad_chunks) | set(self.bad_segments) | set(self.bad_segment_records)
        for pack_id, (_, names) in self.bad_packs.items():
            wanted.update(names.values())
        places = self._places(wanted) if wanted else {}
        for cid, problem in sorted(self.bad_chunks.items()):
            out.append({"What": f"chunk {cid.hex()}", "ChunkId": cid.hex(), "Problem": problem,
                        "Affected": places.get(("c", cid), [])})
        for sid, problem in sorted(self.bad_segments.items()):
            out.append({"What": f"map segment {sid.hex()}", "Problem": problem,
                        "Affected": places.get(("s", sid), [])})
        for sid, problem in sorted(self.bad_segment_records.items()):
            if sid in self.bad_segments:
                continue
            out.append({"What": f"map segment {sid.hex()} (the store's copy)",
                        "Problem": f"{problem}; restores work, 'blocksnap repair' writes it anew",
                        "Affected": places.get(("s", sid), [])})
        for pack_id, (problem, names) in sorted(self.bad_packs.items()):
            affected = {}
            for rid in names.values():
                for a in places.get(("c", rid), []) + places.get(("s", rid), []):
                    affected.setdefault(a["SnapshotId"], set()).update(a["Offsets"])
            out.append({"What": f"pack {pack_id.hex()} (its trailer)",
                        "Problem": f"{problem}; restores work, but the catalog could not be rebuilt from it: "
                                   "'blocksnap repair' rewrites its records into a new pack",
                        "Affected": [{"SnapshotId": s, "Offsets": sorted(o)[:OFFSETS_SHOWN]}
                                     for s, o in sorted(affected.items())]})
        affected = sorted({a["SnapshotId"] for d in out for a in d["Affected"]})
        return {"Checked": self.checked, "CheckedBytes": self.checked_bytes, "Damaged": out,
                "Problems": self.problems, "Snapshots": len(self.maps) + len(set(self.whole) - set(self.maps)),
                "AffectedSnapshots": affected}

    def _places(self, wanted):
        """``{("c"|"s", id): [{"SnapshotId", "Offsets"}]}``: where each wanted chunk or segment id is used."""
        cs = self.cs
        found = {}
        filt = _native.IdFilter(wanted)
        with self.repo.catalog.read() as txn:
            for sid, segs in sorted(self.maps.items()):
                n = -(-self.sizes[sid] // cs)
                per = {}
                for s, seg_id in enumerate(refs.split_ids(segs)):
                    base = s * SEGMENT_CHUNKS
                    count = min(SEGMENT_CHUNKS, n - base)
                    if seg_id in wanted:
                        per.setdefault(("s", seg_id), []).extend((base + j) * cs for j in range(count))
                    if seg_id == ZERO_ID or seg_id in self.bad_segments:
                        continue
                    try:
                        seg = txn.segment(seg_id)
                    except errors.RepositoryDamaged:
                        continue
                    if seg is None:
                        continue
                    filt.clear()
                    filt.feed(seg.ids)
                    if not filt.any_found():
                        continue
                    for j in range(len(seg.ids) // 16):
                        cid = seg.ids[16 * j:16 * j + 16]
                        if cid in wanted:
                            per.setdefault(("c", cid), []).append((base + j) * cs)
                for key, offs in per.items():
                    found.setdefault(key, []).append({"SnapshotId": sid, "Offsets": offs[:OFFSETS_SHOWN]})
        return found

