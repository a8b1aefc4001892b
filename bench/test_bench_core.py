"""pytest-benchmark benchmarks of the blocksnap hot paths.

Not part of the default test run (testpaths = tests). Run them, after ``pip install .``, with

    pytest bench/ --benchmark-only                      # 256 MiB image
    BLOCKSNAP_BENCH_SIZE=1G pytest bench/ --benchmark-only

They measure the installed package (conftest.py keeps the source tree, which has no compiled core, off
sys.path), and fail, not skip, when it cannot be run. .ci/run runs each of them once, untimed, on a 32 MiB
image (``--benchmark-disable``), so that they cannot rot unnoticed.

The snapshot and restore benchmarks go through the CLI in a subprocess (so they
include interpreter start-up, about 0.1 s); the native ones call the C core directly.
"""
import itertools
import os
import subprocess

import peers
import pytest
import workload

MiB = 1 << 20
NATIVE_BUF = 64 * MiB
BS_CMD, BS_HOW = peers.blocksnap_command(os.environ.get("BLOCKSNAP_BENCH_CMD"))
_counter = itertools.count()


def cli(repo, *args):
    """Run one blocksnap command against ``repo``; return its stdout. Fails the test with stderr shown."""
    p = subprocess.run(BS_CMD + ["--repo", str(repo), *map(str, args)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.fail(f"blocksnap {' '.join(map(str, args))} (run as {BS_HOW}) exited {p.returncode}:\n"
                    f"{p.stderr}{p.stdout}")
    return p.stdout


def fresh_repo(base, image):
    """A new repository with ``image`` added; returns ``(repo, disk_id)``."""
    repo = base / f"repo-{next(_counter)}"
    cli(repo, "init")
    disk_id = peers.parse_json_field(cli(repo, "disk", "add", image, "--json"), "DiskId")
    assert disk_id, "disk add --json printed no DiskId"
    return repo, disk_id


def snapshot(repo, disk_id):
    sid = peers.parse_json_field(cli(repo, "snapshot", "create", disk_id, "--json"), "SnapshotId")
    assert sid, "snapshot create --json printed no SnapshotId"
    return sid


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A pristine workload image (BLOCKSNAP_BENCH_SIZE, default 256M) and a scratch directory."""
    base = tmp_path_factory.mktemp("bench")
    size = workload.parse_size(os.environ.get("BLOCKSNAP_BENCH_SIZE", "256M"))
    pristine = base / "pristine.img"
    workload.make_image(str(pristine), size, seed=0)
    return {"base": base, "pristine": pristine, "size": size}


def _throughput(benchmark, nbytes):
    try:
        benchmark.extra_info["MiB/s"] = round(nbytes / MiB / benchmark.stats.stats.mean, 1)
    except (AttributeError, ZeroDivisionError, TypeError):
        pass  # benchmarks disabled: no stats


def test_full_snapshot(benchmark, workspace):
    """A full snapshot of the pristine image into a fresh repository."""
    def setup():
        return fresh_repo(workspace["base"], workspace["pristine"]), {}

    benchmark.group = "snapshot"
    benchmark.pedantic(snapshot, setup=setup, rounds=3, iterations=1)
    _throughput(benchmark, workspace["size"])


def test_incremental_snapshot(benchmark, workspace):
    """A snapshot after the 1 % change (20 x 1 MiB) on top of a full one."""
    def setup():
        image = workspace["base"] / f"work-{next(_counter)}.img"
        peers.sparse_copy(str(workspace["pristine"]), str(image))
        repo, disk_id = fresh_repo(workspace["base"], image)
        snapshot(repo, disk_id)
        workload.change_image(str(image), seed=1)
        return (repo, disk_id), {}

    benchmark.group = "snapshot"
    benchmark.pedantic(snapshot, setup=setup, rounds=3, iterations=1)
    _throughput(benchmark, workspace["size"])


def test_restore(benchmark, workspace):
    """A restore of a full snapshot into a new file; the bytes must equal the image."""
    repo, disk_id = fresh_repo(workspace["base"], workspace["pristine"])
    sid = snapshot(repo, disk_id)
    out = workspace["base"] / "restored.raw"

    def setup():
        if out.exists():
            out.unlink()
        return (repo, "restore", sid, out), {}

    benchmark.group = "restore"
    benchmark.pedantic(cli, setup=setup, rounds=3, iterations=1)
    _throughput(benchmark, workspace["size"])
    assert peers.same_bytes(str(out), str(workspace["pristine"])), "restored bytes differ from the image"


def _native():
    from blocksnap import _native  # StaleBuild or NativeMissing fail the benchmark: install blocksnap first

    return _native


def test_native_hash128(benchmark):
    """XXH3-128 over 64 MiB of random bytes through the C core."""
    native = _native()
    buf = workload.random_bytes(0, "native", NATIVE_BUF)
    benchmark.group = "native"
    benchmark(native.hash128, buf)
    _throughput(benchmark, NATIVE_BUF)


def test_xxhash_python_hash128(benchmark):
    """The same hash through python-xxhash, the reference for test_native_hash128."""
    xxhash = pytest.importorskip("xxhash")
    buf = workload.random_bytes(0, "native", NATIVE_BUF)
    benchmark.group = "native"
    benchmark(xxhash.xxh3_128_digest, buf)
    _throughput(benchmark, NATIVE_BUF)


def test_native_is_zero(benchmark):
    """Zero detection over 64 MiB of zeros (the worst case: every byte is looked at)."""
    native = _native()
    buf = bytes(NATIVE_BUF)
    benchmark.group = "native"
    assert benchmark(native.is_zero, buf) is True
    _throughput(benchmark, NATIVE_BUF)


@pytest.fixture(scope="module")
def qcow2_images(workspace):
    """The pristine image as a plain and as a zstd-compressed qcow2 (qemu-img convert)."""
    plain = workspace["base"] / "pristine.qcow2"
    zstd = workspace["base"] / "pristine-zstd.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(workspace["pristine"]), str(plain)], check=True)
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd",
                    str(workspace["pristine"]), str(zstd)], check=True)
    return {"plain": plain, "zstd": zstd}


@pytest.mark.parametrize("kind", ["plain", "zstd"])
def test_full_snapshot_qcow2(benchmark, workspace, qcow2_images, kind):
    """A full snapshot of the pristine image as a qcow2 (plain or zstd-compressed) into a fresh repository."""
    def setup():
        return fresh_repo(workspace["base"], qcow2_images[kind]), {}

    benchmark.group = "snapshot"
    benchmark.pedantic(snapshot, setup=setup, rounds=3, iterations=1)
    _throughput(benchmark, workspace["size"])


@pytest.mark.parametrize("compress", [False, True])
def test_restore_qcow2(benchmark, workspace, compress):
    """A restore of a full snapshot into a new qcow2 file; qemu-img must find it identical to the image."""
    repo, disk_id = fresh_repo(workspace["base"], workspace["pristine"])
    sid = snapshot(repo, disk_id)
    out = workspace["base"] / f"restored-{int(compress)}.qcow2"

    def setup():
        if out.exists():
            out.unlink()
        return (repo, "restore", sid, out, "--format", "qcow2") + (("--compress",) if compress else ()), {}

    benchmark.group = "restore"
    benchmark.pedantic(cli, setup=setup, rounds=3, iterations=1)
    _throughput(benchmark, workspace["size"])
    p = subprocess.run(["qemu-img", "compare", "-q", "-F", "raw", str(out), str(workspace["pristine"])])
    assert p.returncode == 0, "the restored qcow2 differs from the image"
