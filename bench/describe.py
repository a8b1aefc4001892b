"""DescribeSnapshots from the catalog's indexes: a page of 10 out of 10,000 snapshots, against reading them all.

10,000 real creates of a tiny image take minutes; the records are what DescribeSnapshots reads, so the script
makes one real snapshot of a 64 KiB image and writes the other 9,999 records through the catalog with the calls
a create's commit makes (``put_snapshot``, which maintains the indexes, ``put_snapshot_map``, ``put_disk_snap``,
and ``refs.add_map_refs`` for the shared map's counts), each a copy of the real record with its own id, Seq,
name and tags. They are not in the store (no snapshot objects): ``blocksnap repair`` would drop them, and
nothing here needs it. ``--real`` makes every snapshot with a real create instead (slow).

Timed, each the median of ``--repeat`` runs, through ``Client.call`` (the API form, the same code the CLI and the
api-server run) with the snapshots' sizes left out (``ExclusiveBytes`` reads the chunk index, not the records):

- page 1 and page 500 of ``PageSize=10`` (no filter);
- filtered queries: ``Tag.1.Key=batch``/``Tag.1.Value=7`` (1 % of the snapshots), page 1; the same with
  ``DiskId`` (the disk of them all: two lists intersected, TotalCount by walking their keys); a SnapshotName;
- ``MaxResults=10`` with the NextToken of page 499 (the page 500 of token paging);
- against reading every record: ``describe_snapshots(everything=True)`` through the indexes, and the version-2
  way (``Repository.list_snapshots``, every record read and sorted), which a catalog without indexes still uses.

"records read" counts ``Txn.snapshot`` calls (every read of a snapshot record goes through it).

    python3 bench/describe.py                  # 10,000 snapshots
    python3 bench/describe.py --count 2000 --repeat 3
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

from blocksnap.api import Client  # noqa: E402
from blocksnap.repository import new_id  # noqa: E402
from blocksnap.store import catalog as catalogs  # noqa: E402
from blocksnap.store import refs  # noqa: E402


def build(path, image, count, real):
    """A repository with ``count`` snapshots of one disk; returns its DiskId."""
    Client.init(path, chunk_size=64 << 10)
    with open(image, "wb") as f:
        f.write(os.urandom(64 << 10))
    with Client(path) as c:
        disk = c.add_disk(image)["DiskId"]
        if real:
            for i in range(count):
                c.create_snapshot(disk, snapshot_name=f"n{i}", tags=[{"Key": "batch", "Value": str(i % 100)}])
            return disk
        first = c.create_snapshot(disk, snapshot_name="n0", tags=[{"Key": "batch", "Value": "0"}])["SnapshotId"]
        with c.repo.catalog.read() as txn:
            base = txn.snapshot(first)
            seg_ids = bytes(refs.map_of(txn, base))
        done = 1
        while done < count:
            with c.repo.catalog.write() as txn:
                for i in range(done, min(count, done + 1000)):
                    seq = txn.next_seq()
                    rec = dict(base, SnapshotId=new_id("s-"), Seq=seq, SnapshotName=f"n{i}",
                               Tags=[{"TagKey": "batch", "TagValue": str(i % 100)}], ParentSnapshotId=first)
                    refs.add_map_refs(txn, seg_ids)
                    txn.put_snapshot_map(rec["SnapshotId"], seg_ids)
                    txn.put_snapshot(rec)
                    txn.put_disk_snap(disk, seq, rec["SnapshotId"])
                done = min(count, done + 1000)
        return disk


class Reads:
    """Counts snapshot record reads (Txn.snapshot) while active."""

    def __init__(self):
        self.n = 0
        self._orig = catalogs.Txn.snapshot

    def __enter__(self):
        orig = self._orig

        def counting(txn, sid):
            self.n += 1
            return orig(txn, sid)

        catalogs.Txn.snapshot = counting
        return self

    def __exit__(self, *exc):
        catalogs.Txn.snapshot = self._orig


def timed(fn, repeat):
    times, reads, out = [], 0, None
    for _ in range(repeat):
        with Reads() as r:
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        reads = r.n
    return statistics.median(times), reads, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=10000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--real", action="store_true", help="make every snapshot with a real create (slow)")
    ap.add_argument("--workdir", help="where to build the repository (default: a temporary directory)")
    args = ap.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="bs-describe-")
    try:
        t = time.perf_counter()
        disk = build(os.path.join(work, "repo"), os.path.join(work, "tiny.raw"), args.count, args.real)
        print(f"built {args.count} snapshots of {disk} in {time.perf_counter() - t:.1f} s "
              f"({'real creates' if args.real else 'one real create, the rest through the catalog'})")
        with Client(os.path.join(work, "repo")) as c:
            def page(**params):
                return lambda: c.call("DescribeSnapshots", dict(RegionId=c.region, **params))

            last = args.count // 10
            token = page(MaxResults=10)()["NextToken"]
            for _ in range(min(498, last - 2)):  # the NextToken of page 499
                token = c.call("DescribeSnapshots", {"RegionId": c.region, "MaxResults": 10,
                                                     "NextToken": token})["NextToken"]
            cases = [
                ("page 1 of 10", page(PageSize=10, PageNumber=1)),
                (f"page {min(500, last)} of 10", page(PageSize=10, PageNumber=min(500, last))),
                ("Tag batch=7 (1 %), page 1", page(PageSize=10, **{"Tag.1.Key": "batch", "Tag.1.Value": "7"})),
                ("DiskId (all) + Tag batch=7: two lists leapfrogged", page(DiskId=disk, **{"Tag.1.Key": "batch",
                                                                                      "Tag.1.Value": "7"})),
                ("SnapshotName n4321, page 1", page(SnapshotName="n4321")),
                ("NextToken page 500 of 10", page(MaxResults=10, NextToken=token)),
                ("everything, via the indexes", lambda: c.describe_snapshots(sizes=False)),
                ("everything, every record read and sorted (version 2)",
                 lambda: [c.repo.view(r) for r in c.repo.list_snapshots()]),
            ]
            print(f"{'query':<55} {'median':>10} {'records read':>13} {'returned':>9} {'TotalCount':>11}")
            for name, fn in cases:
                secs, reads, out = timed(fn, args.repeat)
                shown = len(out) if isinstance(out, list) else len(out["Snapshots"]["Snapshot"])
                total = "" if isinstance(out, list) else out["TotalCount"]
                print(f"{name:<55} {secs * 1000:>8.2f} ms {reads:>13} {shown:>9} {total:>11}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
