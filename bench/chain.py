"""Chain-length benchmark: restore and delete the newest snapshot of a long chain vs a 1-snapshot chain.

Every snapshot holds a complete map (shared segments), so neither restore nor delete walks the chain.
This builds a chain of N snapshots of one image, each after a 4 KiB guest write, and at lengths 1, 10,
100, 300 and N times restore and DescribeSnapshots of the newest snapshot; then it times deleting the
newest of the long chain against deleting the only snapshot of a 1-snapshot repository. The number of
packs the newest snapshot reads is shown too: what a restore pays beyond the data grows with that
(bounded by the image's chunk count), never with the chain itself.

    python3 bench/chain.py [--length 1000] [--size 64M] [--repeat 5]
"""
import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from workload import make_image, parse_size

from blocksnap.api import Client

MiB = 1 << 20


def timed(fn, repeat):
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def restore_and_describe(client, snapshot_id, work, repeat):
    """Median seconds for a restore and a DescribeSnapshots of one snapshot."""
    out = os.path.join(work, "restored.raw")

    def restore():
        if os.path.exists(out):
            os.unlink(out)
        client.restore(snapshot_id, out)

    restore()  # the first read after O_DIRECT pack writes comes from the device: keep it out
    return timed(restore, repeat), timed(lambda: client.describe_snapshots(snapshot_ids=[snapshot_id]), repeat)


def timed_delete(client, snapshot_id):
    t = time.perf_counter()
    client.delete_snapshot(snapshot_id)
    return time.perf_counter() - t


def packs_referenced(client, snapshot_id):
    """How many packs hold the chunks of one snapshot (through the catalog's typed reads)."""
    from blocksnap.store import refs

    repo = client.repo
    packs = set()
    with repo.catalog.read() as txn:
        rec = repo.get_snapshot(snapshot_id, txn)
        for seg_id in refs.split_ids(repo.segment_ids(txn, rec)):
            if not any(seg_id):
                continue
            ids = txn.segment(seg_id).ids
            packs.update(txn.chunk(ids[j:j + 16]).pack_id for j in range(0, len(ids), 16) if any(ids[j:j + 16]))
    return len(packs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=1000)
    ap.add_argument("--size", type=parse_size, default=64 * MiB)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--workdir")
    args = ap.parse_args(argv)
    checkpoints = sorted({1, *[n for n in (10, 100, 300) if n < args.length], args.length})
    work = tempfile.mkdtemp(prefix="blocksnap-chain-", dir=args.workdir)
    rows = []
    try:
        img = os.path.join(work, "disk.raw")
        make_image(img, args.size, seed=3)
        long_repo = os.path.join(work, "long")
        Client.init(long_repo)
        rng = random.Random(4)
        t0 = time.perf_counter()
        with Client(long_repo) as c:
            disk = c.add_disk(img)["DiskId"]
            for n in range(1, args.length + 1):
                if n > 1:
                    with open(img, "r+b") as f:  # a small guest write between snapshots
                        f.seek(rng.randrange(0, args.size // 4096) * 4096)
                        f.write(rng.randbytes(4096))
                newest = c.create_snapshot(disk)["SnapshotId"]
                if n in checkpoints:
                    build = time.perf_counter() - t0
                    r, d = restore_and_describe(c, newest, work, args.repeat)
                    rows.append([n, r, d, packs_referenced(c, newest)])
                    t0 += time.perf_counter() - t0 - build  # keep measuring out of the build time
            build = time.perf_counter() - t0
            long_delete = timed_delete(c, newest)
        single_repo = os.path.join(work, "single")
        Client.init(single_repo)
        with Client(single_repo) as c:
            single = c.create_snapshot(c.add_disk(img)["DiskId"])["SnapshotId"]
            single_delete = timed_delete(c, single)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"image {args.size // MiB} MiB, {args.size // (256 << 10)} chunks; built a {args.length}-snapshot chain "
          f"in {build:.1f} s ({build / args.length * 1000:.1f} ms per incremental)")
    print("| chain length | restore newest (s) | describe newest (ms) | packs the newest reads |")
    print("|---:|---:|---:|---:|")
    for n, r, d, p in rows:
        print(f"| {n} | {r:.3f} | {d * 1000:.2f} | {p} |")
    print(f"delete newest: 1-snapshot chain {single_delete * 1000:.1f} ms (frees the whole image), "
          f"{args.length}-snapshot chain {long_delete * 1000:.1f} ms")


if __name__ == "__main__":
    main()
