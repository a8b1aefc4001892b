"""The catalog's share of a huge full snapshot: how long each transaction holds LMDB's writer lock.

A 1 TiB image of distinct data at 256 KiB chunks is 4 Mi chunk references. This machine has no 1 TiB of
data to snapshot, so the benchmark drives the create's catalog work directly, in the order a create
does it (blocksnap/backup.py): every sealed pack of 256 chunks is indexed in one transaction (its chunk
entries at refcount 0, and the map segment the pack ends with, which takes those chunks' references),
then the commit counts the map's segments and writes the record. Reported: the commit's transaction
(what other disks' creates queue behind at the end), the longest and the median pack transaction (what
they queue behind during the scan), and the total. Readers never wait for any of them.

    python3 bench/commit.py                    # 4 Mi chunks (1 TiB at 256 KiB chunks)
    python3 bench/commit.py --chunks 1M        # quicker
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # not the repository root: blocksnap is the installed package

from blocksnap import _native  # noqa: E402
from blocksnap.repository import Repository  # noqa: E402
from blocksnap.store import refs  # noqa: E402
from blocksnap.store.catalog import PackEntry  # noqa: E402

SEG = 256


def parse_count(text):
    t = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20}.get(t[-1:], 1)
    return int(t[:-1] if t[-1:] in "KM" else t) * mult


def run(n_chunks, workdir):
    path = os.path.join(workdir, "repo")
    repo = Repository.init(path, 256 << 10)
    pack_times, seg_ids = [], bytearray()
    pack_id = os.urandom(8)
    t_all = time.perf_counter()
    for first in range(0, n_chunks, SEG):
        count = min(SEG, n_chunks - first)
        ids = os.urandom(16 * count)
        seg_id = _native.hash128(ids)
        seg_ids += seg_id
        t = time.perf_counter()
        with repo.catalog.write() as txn:
            for j in range(count):
                txn.put_chunk(ids[16 * j:16 * j + 16], (pack_id, 16 + j * 262176, 262144, 262144, 0, 0))
            refs.index_segment(txn, seg_id, ids, pack_id, 16 + count * 262176)
            txn.put_pack(pack_id, PackEntry(64 << 20, count + 1))
        pack_times.append(time.perf_counter() - t)
        pack_id = os.urandom(8)
    t = time.perf_counter()
    with repo.catalog.write() as txn:
        refs.add_map_refs(txn, bytes(seg_ids))
        txn.put_snapshot_map("s-" + "a" * 20, bytes(seg_ids))
    commit = time.perf_counter() - t
    total = time.perf_counter() - t_all
    size = os.path.getsize(os.path.join(path, "catalog", "data.mdb"))
    repo.close()
    return {"chunks": n_chunks, "commit_s": commit, "pack_txn_max_s": max(pack_times),
            "pack_txn_median_s": statistics.median(pack_times), "pack_txns": len(pack_times), "total_s": total,
            "catalog_mib": size / (1 << 20)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=parse_count, default=4 << 20)
    ap.add_argument("--workdir")
    args = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="blocksnap-commit-", dir=args.workdir)
    try:
        r = run(args.chunks, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{r['chunks']} chunk references ({r['chunks'] / (1 << 22):.2f} TiB at 256 KiB chunks), "
          f"{r['pack_txns']} pack transactions")
    print(f"commit transaction: {r['commit_s'] * 1000:.1f} ms")
    print(f"pack transactions: median {r['pack_txn_median_s'] * 1000:.2f} ms, longest {r['pack_txn_max_s'] * 1000:.1f} ms")
    print(f"all catalog work: {r['total_s']:.1f} s (mostly one fsync per pack transaction, as a real create pays "
          f"beside each pack's own); catalog {r['catalog_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
