"""How fast could a full snapshot of the workload image be on this machine? The resource floors, measured.

A full snapshot needs at least (a) the C core's CPU work over the image (read, zero check, XXH3-128,
entropy probe, zstd of the compressible chunks), spread over every core, and (b) the device time to
write the stored bytes durably. This script measures both in isolation, plus the CLI's start-up, and
sets them beside blocksnap's real full snapshot:

    floor = start-up + max(C-core CPU seconds / cores, stored bytes / pack write rate)

The floor leaves out everything else a real snapshot does (the catalog, Python, handing windows
between threads, and the CPU that the pack writer's copy takes from the C core), so no implementation
of this design reaches it; the gap says how much is left.

    python3 bench/floors.py                      # 2 GiB workload image in a temp dir
    python3 bench/floors.py --image PATH --repeat 5

Run it on an idle machine; it writes a report to bench/out/floors-<time>.md.
"""
import argparse
import datetime
import fcntl
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # not the repository root: blocksnap is the installed package, with its compiled core

import workload
from peers import blocksnap_command, package_text, parse_json_field, warm_read

from blocksnap import _native
from blocksnap.backup import WINDOW_BYTES
from blocksnap.repository import DEFAULT_CHUNK_SIZE
from blocksnap.store import packs as chunks

RECORD_BYTES = chunks.RECORD.size


def core_cpu(image, chunk_size):
    """One thread runs the C core over the whole image as a full snapshot would.

    Returns:
        dict: ScanSeconds (read, holes, zero check, XXH3-128) and EncodeSeconds (entropy probe,
        zstd) of thread CPU time, StoredBytes (records of the non-zero chunks, headers included),
        DataChunks, CompressedChunks.
    """
    per_window = max(WINDOW_BYTES // chunk_size, 1)
    window = per_window * chunk_size
    scanner = _native.Scanner(chunk_size, per_window)
    codec = _native.Codec(chunks.ZSTD_LEVEL, chunks.ZSTD_HASH_LOG)
    buf = bytearray(window)
    out = {"ScanSeconds": 0.0, "EncodeSeconds": 0.0, "StoredBytes": 0, "DataChunks": 0, "CompressedChunks": 0}
    fd = os.open(image, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        for off in range(0, size, window):
            length = min(window, size - off)
            t0 = time.thread_time()
            _ids, _flags, changed = scanner.scan(fd, off, length, buf, b"")
            t1 = time.thread_time()
            codecs, lens = codec.encode_chunks(buf, length, chunk_size, changed, chunks.INCOMPRESSIBLE_MILLIBITS)
            t2 = time.thread_time()
            out["ScanSeconds"] += t1 - t0
            out["EncodeSeconds"] += t2 - t1
            out["StoredBytes"] += sum(lens) + RECORD_BYTES * len(lens)
            out["DataChunks"] += len(changed)
            out["CompressedChunks"] += sum(1 for c in codecs if c == _native.CODEC_ZSTD)
    finally:
        os.close(fd)
    return out


def direct_write_rate(directory, nbytes):
    """Bytes per second of writing ``nbytes`` of records through the pack writer's C path, then fsync.

    The same path as a create's packs (``_native.PackStager``: huge-page staging buffers, O_DIRECT
    where the file system allows it, its own I/O thread), fed 256 KiB records of random bytes from
    64 MiB that no layer below can deduplicate.
    """
    source = os.urandom(64 << 20)
    rec_len = 256 << 10
    path = os.path.join(directory, "floors-write.tmp")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    stager = _native.PackStager(chunks.STAGE_BYTES, chunks.STAGES)
    try:
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
        except OSError:
            pass
        t0 = time.perf_counter()
        stager.begin(fd, b"\0" * chunks.PACK_HEADER.size)
        written = 0
        k = 0
        while written < nbytes:
            src = (k * rec_len) % len(source)
            stager.add(source, [(k.to_bytes(16, "big"), src, rec_len, rec_len, _native.CODEC_RAW, _native.KIND_CHUNK)])
            written += rec_len + RECORD_BYTES
            k += 1
        seq, size = stager.end()
        stager.wait(seq)
        os.fsync(fd)
        return size / (time.perf_counter() - t0)
    finally:
        stager.close()
        os.close(fd)
        os.unlink(path)


def startup_seconds(cmd, repeat):
    """Median wall time of ``blocksnap --version``: interpreter, imports, nothing else."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd + ["--version"], check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def real_full_snapshot(cmd, image, workdir, repeat):
    """Median wall time of ``blocksnap snapshot create`` into a fresh repository, page cache warm."""
    env = None  # the installed package, as for peers.py
    times = []
    for k in range(repeat):
        repo = os.path.join(workdir, f"floors-repo-{k}")
        subprocess.run(cmd + ["--repo", repo, "init"], check=True, capture_output=True, env=env)
        added = subprocess.run(cmd + ["--repo", repo, "--json", "disk", "add", image], check=True,
                               capture_output=True, text=True, env=env)
        disk_id = parse_json_field(added.stdout, "DiskId")
        warm_read(image)
        subprocess.run(["sync"], check=True)
        t0 = time.perf_counter()
        subprocess.run(cmd + ["--repo", repo, "--json", "snapshot", "create", disk_id], check=True,
                       capture_output=True, env=env)
        times.append(time.perf_counter() - t0)
        shutil.rmtree(repo)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", help="an existing image (default: make the 2 GiB workload image)")
    ap.add_argument("--size", default="2G", help="workload size when making the image (default 2G)")
    ap.add_argument("--workdir", help="where the image, test writes and repositories go (default: a temp dir)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of the real snapshot and of start-up (median)")
    ap.add_argument("--out", default=os.path.join(HERE, "out"), help="report directory")
    args = ap.parse_args(argv)

    workdir = args.workdir or tempfile.mkdtemp(prefix="blocksnap-floors-", dir="/var/tmp")
    os.makedirs(workdir, exist_ok=True)
    image = args.image
    if image is None:
        image = os.path.join(workdir, "workload.raw")
        workload.make_image(image, workload.parse_size(args.size), seed=0)
    cmd, how = blocksnap_command()
    cores = os.cpu_count() or 1

    warm_read(image)  # as bench/peers.py does before every warm-cache step
    cpu = core_cpu(image, DEFAULT_CHUNK_SIZE)
    rate = direct_write_rate(workdir, cpu["StoredBytes"])
    start = startup_seconds(cmd, max(args.repeat, 3))
    real = real_full_snapshot(cmd, image, workdir, args.repeat)
    core_seconds = cpu["ScanSeconds"] + cpu["EncodeSeconds"]
    cpu_floor = core_seconds / cores
    io_floor = cpu["StoredBytes"] / rate
    floor = start + max(cpu_floor, io_floor)

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    res = {"Image": image, "ImageBytes": os.path.getsize(image), "Cores": cores, "ChunkSize": DEFAULT_CHUNK_SIZE,
           **cpu, "WriteBytesPerSecond": rate, "StartupSeconds": start, "CpuFloorSeconds": cpu_floor,
           "WriteFloorSeconds": io_floor, "FloorSeconds": floor, "FullSnapshotSeconds": real, "Blocksnap": how,
           "BlocksnapPackage": package_text()}
    mib = 1 << 20
    lines = [
        f"# Full-snapshot floors, {datetime.datetime.now().isoformat(timespec='seconds')}", "",
        (f"Image {image}, {res['ImageBytes'] / mib:.0f} MiB apparent; {cores} cores; "
         f"chunk {DEFAULT_CHUNK_SIZE >> 10} KiB; blocksnap as {how}, {res['BlocksnapPackage']}."), "",
        "| part | measured |", "|---|---:|",
        f"| C core, one thread: read + holes + zero check + XXH3-128 (s CPU) | {cpu['ScanSeconds']:.3f} |",
        (f"| C core, one thread: entropy probe + zstd (s CPU; {cpu['CompressedChunks']} of "
         f"{cpu['DataChunks']} chunks compressed) | {cpu['EncodeSeconds']:.3f} |"),
        f"| stored bytes (records, headers included) (MiB) | {cpu['StoredBytes'] / mib:.1f} |",
        f"| pack write rate here: the C pack writer, O_DIRECT, + fsync (MiB/s) | {rate / mib:.0f} |",
        f"| CLI start-up, `blocksnap --version` (s) | {start:.3f} |",
        f"| CPU floor: C core / {cores} cores (s) | {cpu_floor:.3f} |",
        f"| write floor: stored bytes / write rate (s) | {io_floor:.3f} |",
        f"| **floor**: start-up + max(CPU, write) (s) | **{floor:.3f}** |",
        f"| blocksnap full snapshot, median of {args.repeat} (s) | {real:.3f} |",
        f"| blocksnap / floor | {real / floor:.2f} |", "",
        "The floor ignores the catalog, Python, handing windows between threads and the CPU the pack",
        "writer's copy takes from the C core. A peer time T allows a ratio of at most T / floor here.",
    ]
    report = "\n".join(lines)
    print(report)
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"floors-{stamp}")
    with open(base + ".md", "w") as f:
        f.write(report)
    with open(base + ".json", "w") as f:
        json.dump(res, f, indent=2)
    print(f"wrote {base}.md and {base}.json")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
