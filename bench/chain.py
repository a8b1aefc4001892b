"""Chain-length benchmark: restore and delete the newest snapshot of a long chain vs a 1-snapshot chain.

Every snapshot holds a complete map (shared segments), so neither restore nor delete should walk the
chain. This builds a chain of N snapshots of one image (each after a small change), and a second
repository with one snapshot of the same final image, then times restore and delete of the newest
snapshot in both, plus a DescribeSnapshots of that one snapshot.

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

from blocksnap.api import Client  # noqa: E402
from workload import make_image, parse_size  # noqa: E402

MiB = 1 << 20


def timed(fn, repeat):
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def measure(repo, snapshot_id, work, repeat):
    """Median seconds for restore and describe of one snapshot, then the time of its deletion."""
    with Client(repo) as c:
        def restore():
            out = os.path.join(work, "restored.raw")
            if os.path.exists(out):
                os.unlink(out)
            c.restore(snapshot_id, out)

        r = timed(restore, repeat)
        d = timed(lambda: c.describe_snapshots(snapshot_ids=[snapshot_id]), repeat)
        t = time.perf_counter()
        c.delete_snapshot(snapshot_id)
        x = time.perf_counter() - t
    return r, d, x


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=1000)
    ap.add_argument("--size", type=parse_size, default=64 * MiB)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--workdir")
    args = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="blocksnap-chain-", dir=args.workdir)
    try:
        img = os.path.join(work, "disk.raw")
        make_image(img, args.size, seed=3)
        long_repo, short_repo = os.path.join(work, "long"), os.path.join(work, "short")
        Client.init(long_repo)
        Client.init(short_repo)
        rng = random.Random(4)
        t0 = time.perf_counter()
        with Client(long_repo) as c:
            disk = c.add_disk(img)["DiskId"]
            for _ in range(args.length):
                with open(img, "r+b") as f:  # a small guest write between snapshots
                    f.seek(rng.randrange(0, args.size // 4096) * 4096)
                    f.write(rng.randbytes(4096))
                newest = c.create_snapshot(disk)["SnapshotId"]
        build = time.perf_counter() - t0
        with Client(short_repo) as c:
            single = c.create_snapshot(c.add_disk(img)["DiskId"])["SnapshotId"]
        long_r, long_d, long_x = measure(long_repo, newest, work, args.repeat)
        short_r, short_d, short_x = measure(short_repo, single, work, args.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"image {args.size // MiB} MiB; built a {args.length}-snapshot chain in {build:.1f} s "
          f"({build / args.length * 1000:.1f} ms per incremental)")
    print("| newest snapshot of | restore (s) | describe (ms) | delete (ms) |")
    print("|---|---|---|---|")
    print(f"| 1-snapshot chain | {short_r:.3f} | {short_d * 1000:.2f} | {short_x * 1000:.1f} |")
    print(f"| {args.length}-snapshot chain | {long_r:.3f} | {long_d * 1000:.2f} | {long_x * 1000:.1f} |")
    print(f"| ratio | {long_r / short_r:.2f} | {long_d / short_d:.2f} | {long_x / short_x:.2f} |")


if __name__ == "__main__":
    main()
