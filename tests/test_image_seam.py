"""The image seam: bs_scan_extents against Python references, and restores through the qcow2 sink."""
import os
import subprocess
import zlib

import pytest
import xxhash
import zstandard

from blocksnap import _native, errors
from blocksnap.api import Client

from conftest import MiB, run_cli

CS = 64 << 10


def _deflate(data):
    """Raw deflate with a 4 KiB window, as QEMU compresses qcow2 clusters (qcow2_zlib_compress)."""
    c = zlib.compressobj(6, zlib.DEFLATED, -12)
    return c.compress(data) + c.flush()


@pytest.fixture
def blobs(tmp_path):
    """A file holding a data range, a hole, a deflate and a zstd compressed cluster; returns (fd, layout)."""
    cluster = bytes(range(256)) * 256  # 64 KiB
    text = b"".join(b"line %06d of a compressed cluster\n" % i for i in range(3000))[:CS]
    data = os.urandom(3 * CS)
    comp_z = _deflate(text)
    comp_s = zstandard.ZstdCompressor(level=3).compress(cluster)
    path = tmp_path / "blobs"
    with open(path, "wb") as f:
        f.write(data)                      # 0 .. 3 CS
        f.seek(5 * CS)                     # a hole of 2 CS
        f.write(comp_z)
        zoff = 5 * CS
        soff = zoff + len(comp_z)
        f.write(comp_s)
        f.write(b"\xee" * 100)             # what follows a compressed cluster in its last sector is ignored
    fd = os.open(path, os.O_RDONLY)
    yield fd, {"data": data, "text": text, "cluster": cluster, "zoff": zoff, "zlen": len(comp_z),
               "soff": soff, "slen": len(comp_s), "path": path}
    os.close(fd)


def _scan(extents, length, chunk=CS):
    scanner = _native.ExtentScanner(chunk, -(-length // chunk))
    buf = bytearray(length)
    ids, flags, changed = scanner.scan_extents(extents, length, buf)
    return bytes(buf), ids, flags, changed


def test_every_extent_kind_fills_the_window_as_its_reference_decodes_it(blobs):
    """DATA, a hole read through RAW, ZERO, a deflate cluster from its middle and a zstd cluster: the window holds
    exactly the bytes Python's zlib and zstandard give, and each chunk id is the XXH3-128 of its bytes."""
    fd, b = blobs
    half = CS // 2
    extents = [(2 * CS, CS, fd, _native.EXT_DATA, 0, 0, 0),
               (CS, 3 * CS, fd, _native.EXT_RAW, 0, 0, 0),          # the hole: zeros, never read
               (CS, 0, -1, _native.EXT_ZERO, 0, 0, 0),
               (half, b["zoff"], fd, _native.EXT_DEFLATE, b["zlen"] + 40, CS, half),
               (CS, b["soff"], fd, _native.EXT_ZSTD, b["slen"] + 100, CS, 0)]
    length = 5 * CS + half
    got, ids, flags, changed = _scan(extents, length)
    want = b["data"][CS:3 * CS] + bytes(2 * CS) + b["text"][half:] + b["cluster"]
    assert got == want
    for i in range(-(-length // CS)):
        piece = want[i * CS:(i + 1) * CS]
        if any(piece):
            assert ids[16 * i:16 * i + 16] == xxhash.xxh3_128_digest(piece)
    assert flags[2] & _native.CHUNK_HOLE and flags[3] & _native.CHUNK_HOLE  # hole and zero extent: never read
    assert not flags[0] & _native.CHUNK_HOLE


def test_a_data_extent_past_the_end_of_its_file_reads_zeros_and_a_raw_one_is_a_short_read(blobs):
    """DATA pads with zeros past EOF (QEMU's reading of a qcow2's data); RAW over the same range is ShortRead (a
    raw image that shrank)."""
    fd, b = blobs
    size = os.fstat(fd).st_size
    got = _scan([(CS, size - 100, fd, _native.EXT_DATA, 0, 0, 0)], CS)[0]
    with open(b["path"], "rb") as f:
        f.seek(size - 100)
        assert got == f.read() + bytes(CS - 100)
    with pytest.raises(_native.ShortRead):
        _scan([(CS, size - 100, fd, _native.EXT_RAW, 0, 0, 0)], CS)


@pytest.mark.parametrize("kind", ["deflate", "zstd-short", "zstd-long"])
def test_a_compressed_cluster_that_does_not_decode_to_a_whole_cluster_is_undecodable(tmp_path, kind):
    """A frame that ends before the cluster is full, or goes on past it, is Undecodable with its extent's index."""
    if kind == "deflate":
        stored, clen = _deflate(b"x" * 1000), CS
        ext_kind = _native.EXT_DEFLATE
    else:
        stored = zstandard.ZstdCompressor().compress(b"y" * (CS // 2 if kind == "zstd-short" else 2 * CS))
        clen, ext_kind = CS, _native.EXT_ZSTD
    path = tmp_path / "c"
    path.write_bytes(stored)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(_native.Undecodable) as exc:
            _scan([(CS, 0, -1, _native.EXT_ZERO, 0, 0, 0), (CS, 0, fd, ext_kind, len(stored), clen, 0)], 2 * CS)
        assert exc.value.index == 1
    finally:
        os.close(fd)


def test_extents_that_do_not_cover_the_window_exactly_are_refused(blobs):
    """The lengths must add up to the window: short or long is NativeArgument, never a partial window."""
    fd, _ = blobs
    for extents in ([(CS, 0, fd, _native.EXT_DATA, 0, 0, 0)],
                    [(3 * CS, 0, fd, _native.EXT_DATA, 0, 0, 0)],
                    [(2 * CS, 0, fd, 9, 0, 0, 0)]):
        with pytest.raises(errors.NativeArgument):
            _scan(extents, 2 * CS)


# --- restores through the qcow2 sink ---------------------------------------------------------------------------
def _snap(client, path):
    disk = client.add_disk(path)["DiskId"]
    return client.create_snapshot(disk)["SnapshotId"]


def _qemu_same(qcow2, raw):
    return subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(qcow2), str(raw)]).returncode == 0


@pytest.mark.parametrize("compress", [False, True])
def test_a_disk_whose_size_is_no_multiple_of_the_cluster_restores_to_a_qcow2_qemu_reads_back(client, tmp_path,
                                                                                             compress):
    """5 MiB + 12345 bytes of text and zeros: the qcow2 (plain or zstd) is clean for qemu-img check and its
    guest view is the disk (the last, partial cluster is stored whole: QEMU needs whole clusters)."""
    raw = tmp_path / "odd.raw"
    with open(raw, "wb") as f:
        f.write(b"".join(b"log line %08d with some words\n" % i for i in range(200000)))  # past the end
        f.truncate(5 * MiB + 12345)
    sid = _snap(client, str(raw))
    out = tmp_path / "odd.qcow2"
    client.restore(sid, str(out), format="qcow2", compress=compress)
    check = subprocess.run(["qemu-img", "check", "-q", str(out)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert _qemu_same(out, raw)
    if compress:
        assert os.path.getsize(out) < os.path.getsize(raw) // 2  # text: zstd clusters


def test_a_damaged_chunk_fails_a_qcow2_restore_and_leaves_no_file(client, tmp_path):
    """A flipped byte in a pack: the qcow2 restore is Repository.Damaged (the chunk's hash is checked on the way to
    the sink's buffer) and no file is left under the output's name."""
    raw = tmp_path / "d.raw"
    raw.write_bytes(os.urandom(2 * MiB))
    sid = _snap(client, str(raw))
    packs = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(client.repo.path, "packs")) for f in fs]
    target = max(packs, key=os.path.getsize)
    with open(target, "r+b") as f:
        f.seek(4096)
        byte = f.read(1)
        f.seek(4096)
        f.write(bytes([byte[0] ^ 0x40]))
    out = tmp_path / "d.qcow2"
    with pytest.raises(errors.RepositoryDamaged):
        client.restore(sid, str(out), format="qcow2")
    assert not out.exists()


def test_a_qcow2_restore_never_writes_into_an_existing_file(repo_path, tmp_path):
    """An existing output is InvalidOutput.Exists, --in-place with qcow2 is RestoreSnapshot.Failed, --compress
    without qcow2 is InvalidParameter; the existing file is untouched."""
    raw = tmp_path / "e.raw"
    raw.write_bytes(os.urandom(MiB))
    with Client(repo_path) as c:
        sid = _snap(c, str(raw))
    existing = tmp_path / "there.qcow2"
    existing.write_bytes(b"precious")
    cases = [(["restore", sid, str(existing), "--format", "qcow2"], "InvalidOutput.Exists"),
             (["restore", sid, str(existing), "--format", "qcow2", "--in-place"], "RestoreSnapshot.Failed"),
             (["restore", sid, str(tmp_path / "new.raw"), "--compress"], "InvalidParameter")]
    for argv, code in cases:
        p = run_cli("--repo", repo_path, *argv)
        assert p.returncode != 0 and f"error: {code}:" in p.stderr and len(p.stderr.strip().splitlines()) == 1, \
            (argv, p.stderr)
    assert existing.read_bytes() == b"precious"
    assert not (tmp_path / "new.raw").exists()


def test_the_same_guest_data_as_raw_and_as_qcow2_is_stored_once(client, tmp_path):
    """A raw disk, its qcow2 and its zstd qcow2 (qemu-img convert): the second and third snapshots add no chunk."""
    raw = tmp_path / "g.raw"
    with open(raw, "wb") as f:
        f.write(os.urandom(3 * MiB))
        f.seek(6 * MiB)
        f.write(b"".join(b"text %07d\n" % i for i in range(100000)))
        f.truncate(8 * MiB)  # a disk is whole sectors: qemu-img would round the qcow2's size up to 512
    q = tmp_path / "g.qcow2"
    z = tmp_path / "gz.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(q)], check=True)
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", str(raw), str(z)],
                   check=True)
    first = client.describe_snapshots(snapshot_ids=[_snap(client, str(raw))])["Snapshots"]["Snapshot"][0]
    assert first["AddedChunks"] > 0
    for image in (q, z):
        rec = client.describe_snapshots(snapshot_ids=[_snap(client, str(image))])["Snapshots"]["Snapshot"][0]
        assert rec["SourceDiskFormat"] == "qcow2"
        assert (rec["AddedChunks"], rec["LogicalBytes"]) == (0, first["LogicalBytes"]), rec
