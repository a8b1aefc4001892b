"""The qcow2 sink (blocksnap.image.qcow2_out.Qcow2Writer), checked by QEMU's own tools.

Each image is written as restore would write it (place, then the data pwritten from worker threads,
then finish) and then judged by qemu-img: ``check`` (no errors, no leaks), ``info`` (qcow2 v3),
``convert -O raw`` and ``compare`` against the raw bytes meant, ``map`` (only placed clusters hold data).
"""
import concurrent.futures
import json
import os
import random
import shutil
import struct
import subprocess
import tracemalloc

import pytest

from blocksnap import errors
from blocksnap.image.qcow2_out import Qcow2Writer

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


def qemu_img(*args):
    """Run qemu-img; the CompletedProcess (text), or AssertionError if it exits non-zero."""
    proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"qemu-img {' '.join(args)} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
    return proc


def round512(n):
    return -(-n // 512) * 512


class Build:
    """One image being written: the qcow2 file, the raw file it must equal, and what was placed where."""

    def __init__(self, tmp_path, virtual_size, cluster_size, compress=False, name="out"):
        self.qcow2 = str(tmp_path / f"{name}.qcow2")
        self.raw = str(tmp_path / f"{name}.raw")
        self.cs = cluster_size
        self.size = virtual_size
        self.fd = os.open(self.qcow2, os.O_RDWR | os.O_CREAT, 0o644)
        self.rawfd = os.open(self.raw, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self.rawfd, virtual_size)
        self.writer = Qcow2Writer(self.fd, virtual_size, cluster_size, compress=compress)
        self.placed = {}            # guest cluster -> host offset (None: compressed)
        self.writes = []            # (host offset, bytes) for the worker threads

    def data(self, guest_off, nbytes, rng):
        """Place ``nbytes`` of random guest data at ``guest_off``."""
        host = self.writer.place(guest_off, nbytes)
        payload = rng.randbytes(nbytes)
        os.pwrite(self.rawfd, payload, guest_off)
        for i in range(-(-nbytes // self.cs)):
            self.placed[guest_off // self.cs + i] = host + i * self.cs
        self.writes.append((host, payload))
        return host

    def compressed(self, guest_off, content, **zstd_args):
        """Place guest cluster ``guest_off`` as a zstd frame of ``content`` (padded to a whole cluster)."""
        import zstandard

        cluster = content + bytes(self.cs - len(content))
        frame = zstandard.ZstdCompressor(**zstd_args).compress(cluster)
        host = self.writer.place_compressed(guest_off, len(frame))
        os.pwrite(self.rawfd, cluster[:self.size - guest_off], guest_off)
        self.placed[guest_off // self.cs] = None
        self.writes.append((host, frame))
        return host, len(frame)

    def finish(self, threads=2):
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda w: os.pwrite(self.fd, w[1], w[0]), self.writes))
        self.writer.finish()
        os.close(self.fd)
        os.close(self.rawfd)


def assert_valid(b):
    """qemu-img finds the image clean, qcow2 v3, equal to the raw file, with data only where placed."""
    check = json.loads(qemu_img("check", "--output=json", b.qcow2).stdout)
    assert check["check-errors"] == 0
    assert check.get("corruptions", 0) == 0 and check.get("leaks", 0) == 0, check
    assert check.get("compressed-clusters", 0) == sum(h is None for h in b.placed.values())

    info = json.loads(qemu_img("info", "--output=json", b.qcow2).stdout)
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == round512(b.size)
    assert info["cluster-size"] == b.cs
    assert info["format-specific"]["data"]["compat"] == "1.1"
    assert info["format-specific"]["data"]["refcount-bits"] == 16
    assert "backing-filename" not in info

    qemu_img("compare", "-f", "raw", "-F", "qcow2", b.raw, b.qcow2)
    converted = b.qcow2 + ".converted.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", b.qcow2, converted)
    assert os.path.getsize(converted) == round512(b.size)
    if b.size <= 64 * MiB:
        with open(b.raw, "rb") as f, open(converted, "rb") as g:
            assert g.read() == f.read() + bytes(round512(b.size) - b.size)
    else:
        qemu_img("compare", "-f", "raw", "-F", "raw", b.raw, converted)
    os.unlink(converted)

    assert data_clusters(b.qcow2, b.cs) == b.placed


def data_clusters(path, cs):
    """guest cluster -> host offset (None: compressed) of every cluster ``qemu-img map`` shows as data."""
    seen = {}
    for ext in json.loads(qemu_img("map", "--output=json", path).stdout):
        if not ext["length"]:
            continue                        # an empty disk maps as one empty extent
        if not ext["data"]:
            assert ext["zero"] and not ext["present"], ext
            continue
        assert ext["start"] % cs == 0, ext
        for g in range(ext["start"] // cs, -(-(ext["start"] + ext["length"]) // cs)):
            seen[g] = ext["offset"] + g * cs - ext["start"] if "offset" in ext else None
    return seen


def scatter(b, rng, fraction, max_run=8, compressed=0.0):
    """Place about ``fraction`` of the disk's clusters, in runs of 1..max_run, in random order; a share
    ``compressed`` of the single clusters as zstd frames of varied size and kind."""
    n = -(-b.size // b.cs)
    runs, g = [], 0
    while g < n:
        length = min(rng.randint(1, max_run), n - g)
        if rng.random() < fraction:
            runs.append((g, length))
        g += length
    rng.shuffle(runs)
    for g, length in runs:
        if compressed and length == 1 and rng.random() < compressed:
            # Mostly zeros: frames from a few bytes to most of a cluster, so some share host clusters
            # and some run into the next one. Content size and checksum on or off.
            noise = rng.randbytes(rng.choice([0, 1, b.cs // 8, b.cs // 2, b.cs * 3 // 4]))
            b.compressed(g * b.cs, noise, write_content_size=rng.random() < 0.5,
                         write_checksum=rng.random() < 0.5)
        else:
            b.data(g * b.cs, min(length * b.cs, b.size - g * b.cs), rng)


@pytest.mark.parametrize("virtual_size, cluster_size, fraction, compressed, reftable_clusters", [
    (1000, 512, 1.0, 0.0, 1),                   # tiny: two clusters, the last cut
    (5 * MiB + 12345, 64 * KiB, 0.5, 0.0, 1),   # size not a multiple of the cluster size nor of 512
    (12 * MiB + 7, 512, 0.9, 0.0, 2),           # many L2 tables, a refcount table of several clusters
    (6 * MiB + 513, 2 * MiB, 1.0, 0.0, 1),      # the largest clusters, last one cut
    (12 * MiB + 7, 512, 0.8, 0.5, 2),           # compressed, 1-bit sector count
    (9 * MiB + 100, 64 * KiB, 0.7, 0.6, 1),     # compressed, the default cluster size
    (13 * MiB, 2 * MiB, 1.0, 1.0, 1),           # compressed, offset field of 49 bits
], ids=["tiny", "unaligned", "512B", "2MiB", "512B-zstd", "64KiB-zstd", "2MiB-zstd"])
def test_image_reads_back_as_placed(tmp_path, virtual_size, cluster_size, fraction, compressed,
                                    reftable_clusters):
    """Clusters placed in random order (some as zstd frames) read back through QEMU as the raw data meant."""
    if compressed:
        pytest.importorskip("zstandard")
    rng = random.Random(f"{virtual_size}/{cluster_size}/{compressed}")
    b = Build(tmp_path, virtual_size, cluster_size, compress=bool(compressed))
    scatter(b, rng, fraction, compressed=compressed)
    b.finish()
    assert_valid(b)
    with open(b.qcow2, "rb") as f:
        assert struct.unpack(">I", f.read(60)[56:60])[0] == reftable_clusters


def test_few_gib_sparse_image(tmp_path):
    """A 3 GiB disk with a handful of clusters across several L2 tables holds just those clusters."""
    rng = random.Random(3)
    b = Build(tmp_path, 3 * GiB + 4096 + 17, 64 * KiB)
    last = (3 * GiB + 4096) // b.cs * b.cs
    for g in [2 * GiB, 0, last, 512 * MiB - 64 * KiB, 1 * GiB + 5 * 64 * KiB]:
        b.data(g, min(2 * b.cs, b.size - g), rng)
    b.finish()
    assert_valid(b)
    assert os.path.getsize(b.qcow2) < 2 * MiB


def test_place_returns_consecutive_clusters_after_the_l1_table(tmp_path):
    """Data clusters follow the header and L1 table in the order placed, a run's clusters back to back."""
    cs = 512
    b = Build(tmp_path, 2 * MiB - 100, cs)       # L1: 64 entries of 8 bytes, one 512-byte cluster
    rng = random.Random(1)
    first = b.data(5 * cs, 3 * cs, rng)
    second = b.data(0, cs, rng)
    third = b.data(100 * cs, 2 * cs, rng)
    assert (first, second, third) == (2 * cs, 5 * cs, 6 * cs)
    # The cut last cluster may also be placed by its host length, a whole cluster.
    assert b.writer.place(2 * MiB - cs, cs) == 8 * cs
    b.placed[2 * MiB // cs - 1] = 8 * cs
    b.finish()
    assert_valid(b)


def test_huge_sparse_disk_is_cheap(tmp_path):
    """A 1 TiB disk with three clusters costs kilobytes of memory and a file of a few clusters."""
    rng = random.Random(4)
    tracemalloc.start()
    try:
        b = Build(tmp_path, 1 << 40, 64 * KiB)
        for g in (0, 1 << 39, (1 << 40) - 64 * KiB):
            b.data(g, 64 * KiB, rng)
        b.finish()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB
    assert os.path.getsize(b.qcow2) <= 16 * 64 * KiB
    check = json.loads(qemu_img("check", "--output=json", b.qcow2).stdout)
    assert check["check-errors"] == 0 and "leaks" not in check and "corruptions" not in check
    assert data_clusters(b.qcow2, b.cs) == b.placed


@pytest.mark.parametrize("virtual_size", [0, 3 * MiB + 1])
def test_nothing_placed_reads_as_zeros(tmp_path, virtual_size):
    """An image where nothing was placed (also an empty disk) is valid and all unallocated zeros."""
    b = Build(tmp_path, virtual_size, 64 * KiB)
    b.finish()
    assert_valid(b)


@pytest.mark.parametrize("compress", [False, True])
def test_header_fields(tmp_path, compress):
    """The header is qcow2 v3 with 16-bit refcounts, no backing file, the zstd compression type only when
    compressing, and an end-of-extensions marker."""
    b = Build(tmp_path, 10 * MiB + 3, 64 * KiB, compress=compress)
    b.data(0, 64 * KiB, random.Random(5))
    b.finish()
    with open(b.qcow2, "rb") as f:
        head = f.read(128)
    magic, version, backing_off, backing_len, bits, size = struct.unpack_from(">4sIQIIQ", head)
    assert (magic, version, backing_off, backing_len, bits, size) == (b"QFI\xfb", 3, 0, 0, 16, round512(b.size))
    crypt, l1_size = struct.unpack_from(">II", head, 32)
    assert (crypt, l1_size) == (0, 1)
    nb_snapshots, snapshots_off, incompat, compat, autoclear, refcount_order, length = \
        struct.unpack_from(">IQQQQII", head, 60)
    assert (nb_snapshots, snapshots_off, compat, autoclear, refcount_order) == (0, 0, 0, 0, 4)
    assert (incompat, length) == ((8, 112) if compress else (0, 104))
    if compress:
        assert head[104:112] == b"\x01" + bytes(7)
    assert head[length:length + 8] == bytes(8)   # extension type 0, length 0
    info = json.loads(qemu_img("info", "--output=json", b.qcow2).stdout)
    assert info["format-specific"]["data"]["compression-type"] == ("zstd" if compress else "zlib")


def refcount(path, host_off):
    """The refcount the image's refcount table and blocks record for the host cluster at ``host_off``."""
    with open(path, "rb") as f:
        head = f.read(104)
        bits = struct.unpack_from(">I", head, 20)[0]
        table_off = struct.unpack_from(">Q", head, 48)[0]
        per_block = (1 << bits) * 8 // 16
        cluster = host_off >> bits
        f.seek(table_off + 8 * (cluster // per_block))
        block_off = struct.unpack(">Q", f.read(8))[0]
        f.seek(block_off + 2 * (cluster % per_block))
        return struct.unpack(">H", f.read(2))[0]


def test_compressed_frames_are_packed_and_counted_as_qemu_does(tmp_path):
    """Frames follow each other byte by byte, run over a cluster boundary, start a new cluster after data,
    and a host cluster holds the refcount of the compressed clusters in it."""
    pytest.importorskip("zstandard")
    cs = 64 * KiB
    rng = random.Random(6)
    b = Build(tmp_path, 20 * cs, cs, compress=True)
    h0, n0 = b.compressed(0, b"")
    h1, n1 = b.compressed(cs, b"")
    h2, n2 = b.compressed(2 * cs, rng.randbytes(20000), write_content_size=False)
    assert (h0, h1, h2) == (2 * cs, 2 * cs + n0, 2 * cs + n0 + n1)
    h3, n3 = b.compressed(3 * cs, rng.randbytes(cs - 2000))      # runs into the next host cluster
    assert h3 == h2 + n2 and h3 + n3 > 3 * cs
    h4, _ = b.compressed(4 * cs, b"b" * 77)
    assert h4 == h3 + n3
    d = b.data(10 * cs, cs, rng)
    assert d == 4 * cs                                           # after the two clusters frames took
    h5, _ = b.compressed(5 * cs, b"")
    assert h5 == 5 * cs                                          # a new cluster: the old one is not last
    b.finish()
    assert_valid(b)
    assert refcount(b.qcow2, 2 * cs) == 4                        # frames 0, 1, 2, 3
    assert refcount(b.qcow2, 3 * cs) == 2                        # frames 3, 4
    assert refcount(b.qcow2, 4 * cs) == 1                        # data
    assert refcount(b.qcow2, 5 * cs) == 1                        # frame 5


def test_compressed_descriptor_counts_additional_sectors(tmp_path):
    """A compressed L2 entry holds the byte offset and the 512-byte sectors after the first that the frame
    touches (bits 62 - (cluster_bits - 8) .. 61)."""
    pytest.importorskip("zstandard")
    cs = 64 * KiB
    b = Build(tmp_path, 4 * cs, cs, compress=True)
    h0, n0 = b.compressed(0, b"")
    h1, n1 = b.compressed(cs, random.Random(7).randbytes(3000))
    b.finish()
    assert_valid(b)
    with open(b.qcow2, "rb") as f:
        f.seek(40)
        l1_off = struct.unpack(">Q", f.read(8))[0]
        f.seek(l1_off)
        l2_off = struct.unpack(">Q", f.read(8))[0] & ((1 << 56) - 512)
        f.seek(l2_off)
        e0, e1 = struct.unpack(">QQ", f.read(16))
    shift = 62 - (16 - 8)
    for entry, host, n in ((e0, h0, n0), (e1, h1, n1)):
        assert entry >> 62 == 1                                  # compressed, not "copied"
        assert entry & ((1 << shift) - 1) == host
        assert (entry >> shift) & 0xFF == (host + n - 1) // 512 - host // 512


@pytest.mark.parametrize("zstd_args", [{}, {"write_content_size": False}, {"write_checksum": True},
                                       {"write_content_size": False, "write_checksum": True}, {"level": 19},
                                       {"level": -5}],
                         ids=["default", "no-content-size", "checksum", "checksum-no-content-size", "level19",
                              "level-5"])
def test_qemu_reads_zstd_frames_of_any_kind(tmp_path, zstd_args):
    """QEMU decodes frames made by python-zstandard with or without content size and checksum."""
    pytest.importorskip("zstandard")
    rng = random.Random(str(zstd_args))
    for cs in (512, 64 * KiB):
        b = Build(tmp_path, 6 * cs, cs, compress=True, name=f"z{cs}")
        for g, content in enumerate([b"", rng.randbytes(cs // 4), b"xy" * (cs // 4), rng.randbytes(cs // 3)]):
            b.compressed(g * cs, content, **zstd_args)
        b.finish()
        assert_valid(b)


def test_existing_file_is_replaced(tmp_path):
    """Written over a larger file full of other bytes, the image ignores them: L1 table written whole, the
    file cut to the image's end."""
    path = tmp_path / "out.qcow2"
    path.write_bytes(b"\xa5" * (8 * MiB))
    b = Build(tmp_path, 2 * GiB, 64 * KiB)       # L1 table of 4 entries, three of them unused
    b.data(64 * KiB, 64 * KiB, random.Random(8))
    b.finish()
    assert_valid(b)
    assert os.path.getsize(b.qcow2) == 6 * 64 * KiB   # header, L1, data, L2, refcount table, block


def test_unfinished_image_is_not_qcow2(tmp_path):
    """Until finish() the file has no qcow2 header, even when it replaces a qcow2 image."""
    old = tmp_path / "out.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(old), "1M")
    b = Build(tmp_path, MiB, 64 * KiB)
    b.data(0, 64 * KiB, random.Random(9))
    with open(b.qcow2, "rb") as f:
        assert f.read(4) != b"QFI\xfb"
    b.finish()
    assert_valid(b)


def _writer(tmp_path, size=MiB, cs=64 * KiB, compress=False):
    fd = os.open(tmp_path / "bad.qcow2", os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    return Qcow2Writer(fd, size, cs, compress=compress)


@pytest.mark.parametrize("cluster_size", [256, 4 * MiB, 3 * 64 * KiB, 0, -512, 65536.0])
def test_rejects_cluster_sizes_qemu_cannot_open(tmp_path, cluster_size):
    """Cluster sizes other than powers of two from 512 B to 2 MiB raise RestoreFailed."""
    with pytest.raises(errors.RestoreFailed):
        _writer(tmp_path, cs=cluster_size)


@pytest.mark.parametrize("size, cs", [(-1, 65536), (1.5, 65536), (129 * GiB, 512), (127 * GiB, 512),
                                      (1 << 62, 65536)], ids=["negative", "float", "L1", "reftable", "L1-64KiB"])
def test_rejects_sizes_past_qemu_limits(tmp_path, size, cs):
    """A negative size, or one whose L1 or refcount table would pass QEMU's limits, raises RestoreFailed."""
    with pytest.raises(errors.RestoreFailed):
        _writer(tmp_path, size=size, cs=cs)


def test_accepts_the_largest_size_qemu_limits_allow(tmp_path):
    """125 GiB at 512-byte clusters fits QEMU's 32 MiB L1 and 8 MiB refcount table limits."""
    w = _writer(tmp_path, size=125 * GiB, cs=512)
    w.place(125 * GiB - 512, 512)
    w.finish()
    qemu_img("check", str(tmp_path / "bad.qcow2"))


CS = 64 * KiB
BAD_CALLS = {
    "unaligned": lambda w: w.place(CS + 512, CS),
    "length-not-clusters": lambda w: w.place(0, CS + 1),
    "zero-length": lambda w: w.place(0, 0),
    "negative": lambda w: w.place(-CS, CS),
    "past-end": lambda w: w.place(16 * CS, 2 * CS),
    "start-past-end": lambda w: w.place(17 * CS, CS),
    "twice": lambda w: w.place(2 * CS, CS),
    "overlapping-run": lambda w: w.place(0, 3 * CS),
    "compressed-over-data": lambda w: w.place_compressed(2 * CS, 100),
    "data-over-compressed": lambda w: w.place(4 * CS, CS),
    "compressed-twice": lambda w: w.place_compressed(4 * CS, 100),
    "stored-len-cluster": lambda w: w.place_compressed(5 * CS, CS),
    "stored-len-zero": lambda w: w.place_compressed(5 * CS, 0),
    "compressed-unaligned": lambda w: w.place_compressed(5 * CS + 8, 100),
    "compressed-past-end": lambda w: w.place_compressed(17 * CS, 100),
    "float": lambda w: w.place(float(CS), CS),
}


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_rejects_calls_that_make_no_sense(tmp_path, name):
    """Bad offsets, lengths and clusters placed twice raise RestoreFailed and change nothing."""
    w = _writer(tmp_path, size=16 * CS + 1000, compress=True)     # 17 clusters, the last cut to 1000 bytes
    assert w.place(2 * CS, CS) == 2 * CS
    w.place_compressed(4 * CS, 100)
    with pytest.raises(errors.RestoreFailed):
        BAD_CALLS[name](w)
    assert w.place(0, 2 * CS) == 4 * CS                           # nothing was taken by the failed call
    assert w.place(16 * CS, 1000) == 6 * CS                       # the cut last cluster, by its guest length
    w.finish()
    check = json.loads(qemu_img("check", "--output=json", str(tmp_path / "bad.qcow2")).stdout)
    assert check["check-errors"] == 0 and "leaks" not in check and "corruptions" not in check
    assert sorted(data_clusters(str(tmp_path / "bad.qcow2"), CS)) == [0, 1, 2, 4, 16]


def test_rejects_use_after_finish_and_compressed_without_compress(tmp_path):
    """place_compressed needs compress=True; nothing is accepted after finish()."""
    w = _writer(tmp_path)
    with pytest.raises(errors.RestoreFailed):
        w.place_compressed(0, 100)
    w.finish()
    for call in (lambda: w.place(0, CS), lambda: w.finish()):
        with pytest.raises(errors.RestoreFailed):
            call()


def test_qemu_can_go_on_writing_the_image(tmp_path):
    """QEMU writes over unallocated, data and shared compressed clusters of the image, and it stays clean:
    the refcounts it finds are the ones it relies on when it allocates and frees."""
    pytest.importorskip("zstandard")
    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io is not installed")
    cs = 64 * KiB
    rng = random.Random(10)
    b = Build(tmp_path, 40 * cs + 300, cs, compress=True)
    for g in (3, 4, 5, 6):
        b.compressed(g * cs, rng.randbytes(cs // 3))
    b.data(10 * cs, 4 * cs, rng)
    b.data(40 * cs, 300, rng)
    b.finish()
    writes = [(0, 2 * cs), (4 * cs, cs), (11 * cs + 512, 4096), (20 * cs, 3 * cs), (40 * cs, 300)]
    commands = []
    with open(b.raw, "r+b") as raw:
        for i, (off, length) in enumerate(writes):
            commands += ["-c", f"write -q -P {0x41 + i} {off} {length}"]
            raw.seek(off)
            raw.write(bytes([0x41 + i]) * length)
    commands += ["-c", f"write -q -c -P 0x7a {30 * cs} {cs}"]      # and a compressed cluster of QEMU's own
    with open(b.raw, "r+b") as raw:
        raw.seek(30 * cs)
        raw.write(b"z" * cs)
    io = subprocess.run(["qemu-io", "-f", "qcow2", *commands, b.qcow2], capture_output=True, text=True,
                        timeout=60, check=False)
    assert io.returncode == 0 and not io.stderr, io.stderr
    check = json.loads(qemu_img("check", "--output=json", b.qcow2).stdout)
    assert check["check-errors"] == 0 and "leaks" not in check and "corruptions" not in check, check
    qemu_img("compare", "-f", "raw", "-F", "qcow2", b.raw, b.qcow2)
