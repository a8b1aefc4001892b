"""Review of issue 8 (qcow2 through the image source/sink seam): reproducers, one per finding.

Each test states the behaviour the standards ask for; each fails on the reviewed code (3b0e8bd..HEAD).
Images are made by qemu-img / qemu-io (and patched with tests/qcow2_images.py where a finding needs a
hostile header); the reference guest view is always ``qemu-img convert -O raw``.
"""
import os
import shutil
import subprocess
import sys
import textwrap
import zlib

import pytest
import qcow2_images as qi

from blocksnap import _native, errors
from blocksnap import image as images
from blocksnap.image import qcow2, sinks

KiB, MiB = 1 << 10, 1 << 20


def _reference(path, tmp_path):
    return open(qi.to_raw(path, tmp_path / "reference.raw"), "rb").read()


# --- guest view ---------------------------------------------------------------------------------------------
def test_a_backing_file_without_a_backing_format_that_is_not_raw_is_not_read_as_raw(tmp_path):
    """A qcow2 whose header names no backing format and whose backing file is a vmdk: qemu-img convert probes
    the vmdk and reads its guest view; blocksnap must give the same bytes or refuse with a typed error, never
    the vmdk container's bytes as if it were a raw disk (qcow2._open_backing probes only for the qcow2 magic)."""
    d = tmp_path / "vm"
    d.mkdir()
    base, top = d / "base.vmdk", d / "top.qcow2"
    qi.qemu_img("create", "-q", "-f", "vmdk", base, "1M", cwd=d)
    qi.qemu_io(base, "write -P 0x5a 0 64k", fmt="vmdk")
    qi.qemu_img("create", "-q", "-f", "qcow2", "-b", "base.vmdk", "-F", "vmdk", top, "1M", cwd=d)
    # Drop the backing format extension (an unknown extension type is ignored by QEMU): QEMU now probes.
    ext = qi.Layout(top).extension(0xE2792ACA)
    assert ext is not None
    qi.patch(top, ext[0] - 8, ">I", 0x0BADCAFE)
    want = _reference(top, tmp_path)
    assert want[:4] == b"ZZZZ"  # QEMU reads the vmdk's guest view
    try:
        got = images.read_guest(str(top))
    except errors.ImageUnsupported:
        return  # a clear refusal is right too
    assert got[:4] != b"KDMV", "the vmdk file's own bytes were snapshotted as the guest disk"
    assert got == want


def test_a_compressed_cluster_with_a_large_sector_count_in_a_2m_cluster_image(tmp_path):
    """A 2 MiB-cluster image whose compressed descriptor counts more sectors than one cluster + 4 KiB (the
    field allows up to 4 MiB; decompression stops at the cluster's end, so QEMU reads it): blocksnap must
    read it as qemu-img does, or refuse it as ImageMalformed; not hand the C core an extent it rejects and
    report "a bug in blocksnap" (NativeArgument)."""
    src = tmp_path / "src.raw"
    src.write_bytes((b"hello world " * 400000)[:4 * MiB])
    img = tmp_path / "c2m.qcow2"
    qi.qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", "-c", "-o", "cluster_size=2M", src, img)
    lay = qi.Layout(img)
    entry = lay.compressed()[0]
    x = 62 - (21 - 8)
    qi.patch(img, entry.entry_offset, ">Q", (entry.raw & ~(((1 << (62 - x)) - 1) << x)) | (8191 << x))
    want = _reference(img, tmp_path)
    try:
        got = images.read_guest(str(img))
    except errors.BlocksnapError as exc:
        assert isinstance(exc, errors.ImageMalformed), f"{type(exc).__name__}: {exc}"
        return
    assert got == want


# --- point in time ------------------------------------------------------------------------------------------
def test_a_write_between_reading_the_l1_table_and_taking_the_identity_fails_the_create(client, tmp_path,
                                                                                      monkeypatch):
    """Qcow2Source takes the files' identity after Qcow2Image has read the header and L1 table: a write that
    lands in between is not seen, and the snapshot mixes the old L1 table with new L2 tables and data (guest
    offset 0 new, 768 MiB old): neither state of the disk. The create must fail with ImageChanged."""
    img = str(tmp_path / "disk.qcow2")
    qi.qemu_img("create", "-q", "-f", "qcow2", img, "1G")
    qi.qemu_io(img, "write -P 0x61 0 64k")
    disk = client.add_disk(img)
    real_parse = qcow2.Qcow2Image._parse
    fired = []

    def parse_then_a_writer_comes(self, *args):
        real_parse(self, *args)
        if not fired:
            fired.append(1)
            qi.qemu_io(img, "write -P 0x41 0 64k", "write -P 0x42 768M 64k")

    monkeypatch.setattr(qcow2.Qcow2Image, "_parse", parse_then_a_writer_comes)
    try:
        sid = client.create_snapshot(disk["DiskId"])["SnapshotId"]
    except errors.ImageChanged:
        return
    monkeypatch.undo()
    out = tmp_path / "out.raw"
    client.restore(sid, str(out))
    with open(out, "rb") as f:
        first = f.read(1)
        f.seek(768 * MiB)
        later = f.read(1)
    pytest.fail(f"the create succeeded with a torn snapshot: offset 0 reads {first!r}, 768 MiB reads {later!r}")


# --- security -----------------------------------------------------------------------------------------------
@pytest.fixture
def two_loop_devices(tmp_path):
    if os.getuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup")
    victim, top = tmp_path / "victim.img", tmp_path / "top.img"
    victim.write_bytes(b"SECRET!!" * (512 * KiB // 8))
    qi.qemu_img("create", "-q", "-f", "qcow2", top, "512K")
    os.truncate(top, MiB)
    devs = []
    try:
        for f in (victim, top):
            proc = subprocess.run(["losetup", "--find", "--show", str(f)], capture_output=True, text=True)
            if proc.returncode != 0:
                pytest.skip(f"no loop device here: {proc.stderr.strip()}")
            devs.append(proc.stdout.strip())
        yield devs
    finally:
        for dev in devs:
            subprocess.run(["losetup", "-d", dev], check=False)


def test_a_qcow2_on_a_block_device_cannot_name_another_block_device_as_its_backing_file(two_loop_devices):
    """A qcow2 written onto a block device (an LV) is in /dev, so Policy's "own directory tree" is /dev: its
    header can name any other disk of the host (here a loop device standing in for /dev/sda) and blocksnap
    reads it without any --backing-dir. That must be BackingFileDenied."""
    victim_dev, top_dev = two_loop_devices
    qi.qemu_img("rebase", "-u", "-f", "qcow2", "-b", victim_dev, "-F", "raw", top_dev)
    with pytest.raises(errors.BackingFileDenied):
        data = images.read_guest(top_dev)
        assert data[:8] != b"SECRET!!", "another block device of the host was read as the backing file"


def test_a_data_file_that_is_a_directory_is_refused_when_the_disk_is_added(client, tmp_path):
    """The external data file is opened without the file-type check backing files get: a directory (QEMU:
    "'file' driver requires 'data.raw' to be a regular file") is accepted by disk add, and read_guest then
    raises a bare IsADirectoryError. It must be refused as ImageUnsupported."""
    img = tmp_path / "disk.qcow2"
    qi.qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=data.raw", img, "1M", cwd=tmp_path)
    qi.qemu_io(img, "write -P 0x33 0 64k")
    os.unlink(tmp_path / "data.raw")
    os.mkdir(tmp_path / "data.raw")
    with pytest.raises(errors.ImageUnsupported):
        client.add_disk(str(img))


# --- limits -------------------------------------------------------------------------------------------------
def _run_limited(script, tmp_path, limit_bytes, timeout=120):
    """Run ``script`` in a child whose address space is capped (a runaway allocation fails at once instead of
    swapping a shared machine); its LMDB map is made small enough to fit under the cap."""
    code = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, ({limit_bytes}, {limit_bytes}))
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
    """) + textwrap.dedent(script)
    import blocksnap
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(blocksnap.__file__)),
               BLOCKSNAP_MAP_SIZE=str(1 << 30))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          cwd=tmp_path, env=env)


def test_a_qcow2_of_a_huge_virtual_size_is_refused_with_a_typed_error(tmp_path):
    """A 1 EiB qcow2 (what 'qemu-img create -o cluster_size=2M x.qcow2 1E' makes: a few MiB of file) is
    registered, and its create dies of MemoryError in _MapBuilder (an InternalError on the CLI). A size the
    repository cannot map must be refused with a typed error at disk add (or create)."""
    img = tmp_path / "huge.qcow2"
    qi.qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", img, "1E")
    proc = _run_limited(f"""
        from blocksnap.api import Client
        from blocksnap import errors
        Client.init("repo", chunk_size=64 << 10)
        c = Client("repo")
        try:
            c.create_snapshot(c.add_disk({str(img)!r})["DiskId"])
            print("OK")
        except errors.InternalError as exc:
            print("UNTYPED", type(exc).__name__, exc)
        except errors.BlocksnapError as exc:
            print("TYPED", exc.code)
        except BaseException as exc:
            print("UNTYPED", type(exc).__name__, exc)
    """, tmp_path, 4 << 30)
    out = proc.stdout.strip()
    assert out.startswith("TYPED"), f"{out} {proc.stderr[-400:]}"


def test_a_long_l1_table_costs_about_what_it_does_in_qemu(tmp_path):
    """l1_size is bounded by QEMU's 32 MiB, but Qcow2Image keeps it as a tuple of Python ints (40 bytes an
    entry) and the refcount table's entries as a set: a 1 MiB disk whose (sparse) file has a full-size L1
    table and refcount table of non-zero entries costs ~140 MiB more RSS to open (~280 MiB in all), so a
    chain of 17 such files costs ~2.5-4.5 GB at every disk add and create. QEMU holds those tables in 40 MiB
    per file; allow 2x that."""
    img = tmp_path / "l1.qcow2"
    qi.qemu_img("create", "-q", "-f", "qcow2", img, "1M")
    cs = 64 * KiB
    n_l1, n_rt = (32 * MiB) // 8, (8 * MiB) // 8
    l1_off, rt_off = 64 * MiB, 128 * MiB
    import array
    with open(img, "r+b") as f:
        l1 = array.array("Q", range(0, n_l1 * cs, cs))
        l1[0] = 0  # the one entry the disk needs: unallocated; the rest lie past the virtual size
        l1.byteswap()
        f.seek(l1_off)
        f.write(l1.tobytes())
        rt = array.array("Q", range(200 * MiB, 200 * MiB + n_rt * cs, cs))
        rt.byteswap()
        f.seek(rt_off)
        f.write(rt.tobytes())
    qi.patch_field(img, "l1_size", n_l1)
    qi.patch_field(img, "l1_table_offset", l1_off)
    qi.patch_field(img, "refcount_table_offset", rt_off)
    qi.patch_field(img, "refcount_table_clusters", (8 * MiB) // cs)
    assert qi.try_to_raw(img, tmp_path / "ref.raw") is not None  # QEMU opens and reads it
    proc = _run_limited(f"""
        import resource
        from blocksnap.image import qcow2
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        img = qcow2.Qcow2Image({str(img)!r}, qcow2.Policy({str(img)!r}))
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """, tmp_path, 8 << 30)
    assert proc.returncode == 0, proc.stderr[-400:]
    grew_mib = int(proc.stdout.strip())
    assert grew_mib <= 80, f"opening one image took {grew_mib} MiB"


# --- the qcow2 sink -----------------------------------------------------------------------------------------
def test_a_short_pwrite_of_guest_data_fails_the_qcow2_restore(client, tmp_path, monkeypatch):
    """Qcow2Sink writes guest clusters with one os.pwrite and ignores its count (qcow2_out has _pwrite_all for
    its metadata; the sink does not use it). A short write (ENOSPC part way, a FUSE or NFS mount) leaves the
    cluster's tail unwritten and the restore reports success with an image that is not the snapshot."""
    data = os.urandom(256 * KiB)
    src = tmp_path / "d.raw"
    src.write_bytes(data)
    sid = client.create_snapshot(client.add_disk(str(src))["DiskId"])["SnapshotId"]
    real_pwrite = os.pwrite

    class ShortWrites:
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def pwrite(fd, buf, off):
            n = len(buf)
            return real_pwrite(fd, buf[:n // 2] if n >= 4096 else buf, off)

    monkeypatch.setattr(sinks, "os", ShortWrites())
    out = tmp_path / "out.qcow2"
    try:
        client.restore(sid, str(out), format="qcow2")
    except errors.BlocksnapError:
        assert not out.exists()
        return
    monkeypatch.undo()
    back = qi.to_raw(out, tmp_path / "back.raw")
    assert open(back, "rb").read() == data, "the restore reported success and wrote another disk"


# --- the C core (csrc/extent.c) -----------------------------------------------------------------------------
def _deflate(data):
    c = zlib.compressobj(9, zlib.DEFLATED, -12)
    return c.compress(data) + c.flush()


def test_an_extent_whose_host_range_wraps_past_2_64_is_refused(tmp_path):
    """read_sparse computes end = off + len in 64 bits: an extent at host offset 2**64 - 1024 wraps, the loop
    never runs, nothing is read and the chunk comes back as a hole (zero id) with BS_OK. A malformed extent
    must be BS_EINVAL (or a read error), never a silent hole."""
    f = tmp_path / "data.bin"
    f.write_bytes(os.urandom(8192))
    fd = os.open(f, os.O_RDONLY)
    try:
        scanner = _native.ExtentScanner(4096, 1)
        buf = bytearray(b"\xaa" * 4096)
        for kind in (_native.EXT_DATA, _native.EXT_RAW):
            with pytest.raises((errors.BlocksnapError, OSError)):
                ids, flags, _ = scanner.scan_extents([(4096, 2**64 - 1024, fd, kind, 0, 0, 0)], 4096, buf)
                pytest.fail(f"kind {kind}: accepted, flags {flags!r}, id {ids.hex()}")
    finally:
        os.close(fd)


def test_the_decoded_cluster_cache_does_not_outlive_the_file_it_came_from(tmp_path):
    """decode_cluster caches the last cluster by (fd number, offset, lengths, kind): once a file is closed and
    another opened under the same descriptor number, an ExtentScanner (documented as "one per thread") hands
    back the first file's cluster for the second file's."""
    cs = 4096
    a, b = _deflate(b"A" * cs), _deflate(b"B" * cs)
    assert len(a) == len(b)
    (tmp_path / "a.bin").write_bytes(a)
    (tmp_path / "b.bin").write_bytes(b)
    scanner = _native.ExtentScanner(cs, 1)
    buf = bytearray(cs)
    fd = os.open(tmp_path / "a.bin", os.O_RDONLY)
    scanner.scan_extents([(cs, 0, fd, _native.EXT_DEFLATE, len(a), cs, 0)], cs, buf)
    assert bytes(buf[:4]) == b"AAAA"
    os.close(fd)
    fd2 = os.open(tmp_path / "b.bin", os.O_RDONLY)
    try:
        assert fd2 == fd  # the lowest free number comes back
        scanner.scan_extents([(cs, 0, fd2, _native.EXT_DEFLATE, len(b), cs, 0)], cs, buf)
        assert bytes(buf[:4]) == b"BBBB", "the other file's cluster was returned"
    finally:
        os.close(fd2)


def test_a_compressed_extent_on_fd_minus_one_is_not_served_from_the_cache(tmp_path):
    """After a failed decode decode_cluster sets last_fd = -1 but keeps the other cache keys: a compressed
    extent with fd -1 and the previous cluster's offset and lengths then hits the cache and returns whatever
    the failed decode left in the cluster buffer, with BS_OK. fd -1 must fail (EBADF)."""
    cs = 4096
    good = _deflate(b"G" * cs)
    (tmp_path / "good.bin").write_bytes(good)
    (tmp_path / "junk.bin").write_bytes(os.urandom(64))
    scanner = _native.ExtentScanner(cs, 1)
    buf = bytearray(cs)
    fd = os.open(tmp_path / "good.bin", os.O_RDONLY)
    junk = os.open(tmp_path / "junk.bin", os.O_RDONLY)
    try:
        scanner.scan_extents([(cs, 0, fd, _native.EXT_DEFLATE, len(good), cs, 0)], cs, buf)
        with pytest.raises(_native.Undecodable):
            scanner.scan_extents([(cs, 0, junk, _native.EXT_DEFLATE, 64, cs, 0)], cs, buf)
    finally:
        os.close(fd)
        os.close(junk)
    buf[:] = b"\xee" * cs
    with pytest.raises(OSError):
        scanner.scan_extents([(cs, 0, -1, _native.EXT_DEFLATE, len(good), cs, 0)], cs, buf)
        pytest.fail(f"fd -1 decoded to {bytes(buf[:8])!r}")
