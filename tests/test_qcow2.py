"""qcow2 images (issue 8): the guest view of every fixture of tests/qcow2_images.py round-trips byte for byte
against ``qemu-img convert -O raw``; restores as qcow2 are valid, identical and sparse; dedup is on guest
data; incrementals and point in time cover the whole chain; damaged, encrypted, dirty or escaping images
are refused with one typed line, leaving the repository verifiable."""
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import qcow2_images as qi
from conftest import MiB, run_cli

from blocksnap import errors

KiB = 1 << 10
CS = 64 << 10  # the test repositories' chunk size


# --- shared helpers ---------------------------------------------------------------------------------------
class Images:
    """Fixtures built once per session (tests that change an image build their own with qi.build)."""

    def __init__(self, root):
        self.root = root
        self.made = {}
        self.raws = {}

    def get(self, name):
        if name not in self.made:
            self.made[name] = qi.build(name, os.path.join(self.root, name))
        return self.made[name]

    def raw(self, name):
        """The reference guest view: qemu-img convert -O raw of the fixture."""
        if name not in self.raws:
            fx = self.get(name)
            self.raws[name] = qi.to_raw(fx.path, os.path.join(self.root, f"{name}.ref.raw"))
        return self.raws[name]


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    return Images(str(tmp_path_factory.mktemp("qcow2-fixtures")))


def data_ranges(path):
    """The (start, end) ranges of a file that may hold data (SEEK_DATA / SEEK_HOLE); the rest are holes."""
    out = []
    with open(path, "rb") as f:
        fd, size, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    return out


def first_difference(a, b):
    """None if files ``a`` and ``b`` have the same size and bytes, else a description of the first difference.
    Sparse-aware: ranges that are holes in both files are not read."""
    sa, sb = os.path.getsize(a), os.path.getsize(b)
    if sa != sb:
        return f"sizes differ: {sa} != {sb}"
    ranges = sorted(data_ranges(a) + data_ranges(b))
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for start, end in ranges:
            pos = start
            while pos < end:
                n = min(4 * MiB, end - pos)
                x, y = os.pread(fa.fileno(), n, pos), os.pread(fb.fileno(), n, pos)
                if x != y:
                    i = next(k for k in range(len(x)) if x[k] != y[k])
                    return f"first difference at byte {pos + i} ({x[i]:#04x} != {y[i]:#04x})"
                pos += n
    return None


def nonzero_clusters(raw, cluster):
    """Indices of the ``cluster``-sized guest clusters of the raw file that hold a non-zero byte."""
    out = set()
    with open(raw, "rb") as f:
        for start, end in data_ranges(raw):
            c = start // cluster
            while c * cluster < end:
                if os.pread(f.fileno(), cluster, c * cluster).strip(b"\0"):
                    out.add(c)
                c += 1
    return out


def allocated_clusters(image, cluster):
    """Indices of the guest clusters ``qemu-img map`` shows as data in a qcow2 without a backing file."""
    out = set()
    for e in qi.image_map(image):
        if e["data"]:
            out.update(range(e["start"] // cluster, -(-(e["start"] + e["length"]) // cluster)))
    return out


def code_class(code):
    for cls in errors.all_error_classes():
        if cls.code == code:
            return cls
    raise AssertionError(f"no error class has the code {code} (blocksnap/errors.py)")


def one_line_error(proc, codes):
    """``proc`` failed with one of ``codes`` as the plan's one line (`blocksnap: error: <Code>: ...`), no
    traceback, and that code's exit status."""
    codes = (codes,) if isinstance(codes, str) else tuple(codes)
    assert proc.returncode != 0, f"expected {codes}, the command succeeded: {proc.stdout[-500:]}"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    got = proc.stderr.split(": ", 3)[2] if proc.stderr.startswith("blocksnap: error: ") else None
    assert got in codes, f"expected {' or '.join(codes)} (exit {proc.returncode}), got: {proc.stderr.strip()}"
    assert proc.returncode == code_class(got).exit_code, (proc.returncode, proc.stderr)
    return got


def cli_json(repo, *args, **kw):
    p = run_cli("--repo", repo, "--json", *args, **kw)
    assert p.returncode == 0, f"blocksnap {' '.join(args)} exited {p.returncode}: {p.stderr}"
    return json.loads(p.stdout)


def record(client, sid):
    return client.describe_snapshots(snapshot_ids=[sid])["Snapshots"]["Snapshot"][0]


def listed_format(client, disk):
    """The Format describe_disks lists for the disk record ``disk``."""
    return next(d.get("Format") for d in client.describe_disks()["Disks"]["Disk"] if d["DiskId"] == disk["DiskId"])


def snapshot(client, path, **add_kw):
    disk = client.add_disk(path, **add_kw)
    return disk, client.create_snapshot(disk["DiskId"])["SnapshotId"]


def assert_restores_to(client, sid, reference, out):
    client.restore(sid, str(out))
    diff = first_difference(str(out), reference)
    assert diff is None, f"restored {sid} differs from {reference}: {diff}"


def assert_valid_qcow2_of(out, source, reference, compressed=False):
    """``out`` (a restored qcow2) is what issue 8's "Writing" asks: qemu-img check clean, qemu-img compare
    identical to ``source``, a v3 without backing file of the same size, only clusters with data allocated."""
    rc, report = qi.check(out)
    assert rc == 0 and not report.get("corruptions") and not report.get("leaks") and not report.get(
        "check-errors"), f"qemu-img check {out}: {rc} {report}"
    assert qi.compare(source, out) == 0, f"qemu-img compare {source} {out}: not identical"
    inf = qi.info(out)
    spec = inf["format-specific"]["data"]
    assert inf["format"] == "qcow2" and spec["compat"] == "1.1" and "backing-filename" not in inf, inf
    assert inf["virtual-size"] == qi.info(source)["virtual-size"], inf
    cs = inf["cluster-size"]
    alloc, data = allocated_clusters(out, cs), nonzero_clusters(reference, cs)
    assert alloc == data, (f"allocated clusters of {out} are not the clusters with data: "
                           f"{len(alloc - data)} allocated without data (e.g. {sorted(alloc - data)[:5]}), "
                           f"{len(data - alloc)} with data not allocated (e.g. {sorted(data - alloc)[:5]})")
    if compressed:
        assert spec["compression-type"] == "zstd", spec
        assert qi.Layout(out).compressed(), f"{out}: no compressed cluster"


# --- the fixtures themselves -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", qi.NAMES)
def test_fixture_has_its_feature(images, name):
    """qemu-img info / check / map and the metadata reader confirm the feature each fixture is named for."""
    qi.confirm(images.get(name))


# --- reading: the guest view ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", qi.NAMES)
def test_read_guest_is_what_qemu_img_convert_gives(images, name):
    """blocksnap.image.read_guest returns qemu-img convert's bytes; detect_format and open_source say qcow2 and
    the virtual size. Large holes are sampled (start, middle, end) instead of read whole."""
    from blocksnap import image

    fx, ref = images.get(name), images.raw(name)
    assert image.detect_format(fx.path) == "qcow2"
    with image.open_source(fx.path, **fx.add_kw) as src:
        assert (src.format, src.size) == ("qcow2", fx.virtual_size)
    pieces, pos = [], 0
    for start, end in data_ranges(ref) + [(fx.virtual_size, fx.virtual_size)]:
        if start - pos <= 8 * MiB:
            pieces.append((pos, start - pos))
        else:  # a long hole in the reference: sample it
            pieces += [(pos, 64 * KiB), ((pos + start) // 2 // 512 * 512, 64 * KiB), (start - 64 * KiB, 64 * KiB)]
        pieces.append((start, end - start))
        pos = end
    with open(ref, "rb") as f:
        for off, n in pieces:
            if n <= 0:
                continue
            got = image.read_guest(fx.path, off, n, **fx.add_kw)
            want = os.pread(f.fileno(), n, off)
            assert len(got) == n, (off, n, len(got))
            if got != want:
                i = next(k for k in range(n) if got[k] != want[k])
                raise AssertionError(f"{name}: guest byte {off + i}: blocksnap {got[i]:#04x}, qemu {want[i]:#04x}")


@pytest.mark.parametrize("name", qi.NAMES)
def test_snapshot_of_qcow2_restores_to_qemu_img_convert_bytes(images, name, client, tmp_path):
    """disk add (format detected: qcow2) + snapshot create + restore to raw gives qemu-img convert -O raw's
    bytes, and the snapshot records the virtual size."""
    fx = images.get(name)
    disk, sid = snapshot(client, fx.path, **fx.add_kw)
    assert disk.get("Format") == "qcow2", disk
    rec = record(client, sid)
    assert rec["Status"] == "accomplished" and rec["SourceDiskSize"] == fx.virtual_size, rec
    assert rec.get("SourceDiskFormat") == "qcow2", rec
    assert_restores_to(client, sid, images.raw(name), tmp_path / "out.raw")


CLI_SUBSET = ("v2", "compressed-zstd", "extl2-backing", "chain-3-deep", "data-file-raw", "lazy-refcounts-dirty",
              "unallocated-8g", "size-unaligned")


@pytest.mark.parametrize("name", CLI_SUBSET)
def test_cli_snapshot_of_qcow2_restores_as_raw_and_qcow2(images, name, repo_path, tmp_path):
    """Through the command line: disk add shows Format qcow2, and the snapshot restores to qemu-img convert's
    bytes (raw) and to a qcow2 that qemu-img compare calls identical."""
    fx = images.get(name)
    disk = cli_json(repo_path, "disk", "add", fx.path, *fx.cli)
    assert disk.get("Format") == "qcow2", disk
    listed = cli_json(repo_path, "disk", "list")["Disks"]["Disk"]
    assert [d.get("Format") for d in listed] == ["qcow2"], listed
    sid = cli_json(repo_path, "snapshot", "create", disk["DiskId"])["SnapshotId"]
    out = tmp_path / "out.raw"
    cli_json(repo_path, "restore", sid, str(out))
    assert first_difference(str(out), images.raw(name)) is None
    outq = tmp_path / "out.qcow2"
    cli_json(repo_path, "restore", sid, str(outq), "--format", "qcow2")
    assert_valid_qcow2_of(str(outq), fx.path, images.raw(name))


# --- writing: restore as qcow2 ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", qi.NAMES)
def test_restore_as_qcow2_is_valid_identical_and_sparse(images, name, client, tmp_path):
    """restore --format qcow2: qemu-img check clean, qemu-img compare identical to the source image, and only
    the clusters holding data allocated."""
    fx = images.get(name)
    _, sid = snapshot(client, fx.path, **fx.add_kw)
    out = str(tmp_path / "out.qcow2")
    client.restore(sid, out, format="qcow2")
    assert_valid_qcow2_of(out, fx.path, images.raw(name))


COMPRESS_SUBSET = ("v3", "cluster-512", "compressed-zlib", "extl2", "backing-raw", "size-unaligned",
                   "kitchen-sink", "prealloc-full", "unallocated-8g")


@pytest.mark.parametrize("name", COMPRESS_SUBSET)
def test_restore_as_compressed_qcow2_is_valid_identical_and_compressed(images, name, client, tmp_path):
    """restore --format qcow2 --compress: the same checks, compression type zstd, and compressed clusters."""
    fx = images.get(name)
    _, sid = snapshot(client, fx.path, **fx.add_kw)
    out = str(tmp_path / "out.qcow2")
    client.restore(sid, out, format="qcow2", compress=True)
    assert_valid_qcow2_of(out, fx.path, images.raw(name), compressed=True)


def test_cli_restore_compressed_qcow2_and_compress_without_qcow2_is_refused(images, repo_path, tmp_path):
    """`restore --format qcow2 --compress` works from the command line; `--compress` without `--format qcow2`
    is InvalidParameter (it only means zstd clusters of a qcow2) and writes nothing."""
    fx = images.get("compressed-zlib")
    disk = cli_json(repo_path, "disk", "add", fx.path)
    sid = cli_json(repo_path, "snapshot", "create", disk["DiskId"])["SnapshotId"]
    out = tmp_path / "out.qcow2"
    cli_json(repo_path, "restore", sid, str(out), "--format", "qcow2", "--compress")
    assert_valid_qcow2_of(str(out), fx.path, images.raw("compressed-zlib"), compressed=True)
    p = run_cli("--repo", repo_path, "restore", sid, str(tmp_path / "x.raw"), "--compress")
    one_line_error(p, "InvalidParameter")
    assert not (tmp_path / "x.raw").exists()


@pytest.mark.parametrize("in_place", [False, True])
def test_restore_as_qcow2_onto_an_existing_file_is_refused_and_leaves_it_alone(images, repo_path, tmp_path, in_place):
    """docs/API.md: restoring as qcow2 onto an existing file is refused, InvalidOutput.Exists (with --in-place,
    RestoreSnapshot.Failed); the file is untouched."""
    fx = images.get("v3")
    disk = cli_json(repo_path, "disk", "add", fx.path)["DiskId"]
    sid = cli_json(repo_path, "snapshot", "create", disk)["SnapshotId"]
    target = tmp_path / "existing.qcow2"
    shutil.copyfile(images.get("compressed-zstd").path, target)
    before = target.read_bytes()
    p = run_cli("--repo", repo_path, "restore", sid, str(target), "--format", "qcow2",
                *(["--in-place"] if in_place else []))
    one_line_error(p, "RestoreSnapshot.Failed" if in_place else "InvalidOutput.Exists")
    assert target.read_bytes() == before


def test_a_raw_disk_restores_as_a_valid_qcow2(images, client, tmp_path):
    """A snapshot of a raw image restores --format qcow2 to a qcow2 qemu-img compare calls identical to it."""
    _, sid = snapshot(client, images.raw("kitchen-sink"))
    out = str(tmp_path / "out.qcow2")
    client.restore(sid, out, format="qcow2")
    assert_valid_qcow2_of(out, images.raw("kitchen-sink"), images.raw("kitchen-sink"))


# --- dedup, incrementals -----------------------------------------------------------------------------------
def test_the_same_disk_as_raw_qcow2_and_compressed_qcow2_stores_its_data_once(images, client, tmp_path):
    """Dedup is on guest data: after the raw image, the same disk as qcow2, zlib- and zstd-compressed qcow2
    adds no chunk and no stored bytes, and all four snapshots have the same LogicalBytes."""
    raw = str(tmp_path / "disk.raw")
    shutil.copyfile(images.raw("v3"), raw)
    variants = {"raw": raw}
    for name, opts in (("qcow2", []), ("zlib", ["-c", "-o", "compression_type=zlib"]),
                       ("zstd", ["-c", "-o", "compression_type=zstd"])):
        variants[name] = str(tmp_path / f"disk-{name}.qcow2")
        qi.qemu_img("convert", "-f", "raw", "-O", "qcow2", *opts, raw, variants[name])
    assert qi.Layout(variants["zstd"]).compressed() and qi.Layout(variants["zlib"]).compressed()
    recs = {}
    for name, path in variants.items():
        _, sid = snapshot(client, path)
        recs[name] = record(client, sid)
    assert recs["raw"]["AddedChunks"] > 0
    for name in ("qcow2", "zlib", "zstd"):
        assert (recs[name]["AddedChunks"], recs[name]["AddedBytes"]) == (0, 0), (name, recs[name])
        assert recs[name]["LogicalBytes"] == recs["raw"]["LogicalBytes"], (name, recs[name])


# (fixture, which file, writes): the expected changed / added chunk counts of the second snapshot
INCREMENTALS = {
    "v3": (0, lambda w: w.random(CS * 5 + 100, 100).random(CS * 40, 2 * CS), 3),
    "compressed-zstd": (0, lambda w: w.text(CS * 20, CS, compressed=True).random(CS * 2 + 7, 10), 2),
    "extl2": (0, lambda w: w.random(CS * 30 + 2048, 2048).random(CS + 100, 10), 2),
    "backing-relative": (1, lambda w: w.random(3 * MiB + 100, 4096), 1),  # the backing file changes
    "chain-3-deep": (3, lambda w: w.random(3 * MiB + 512 * KiB, 100), 1),  # the raw base changes
}


@pytest.mark.parametrize("name", INCREMENTALS)
def test_an_incremental_of_qcow2_after_a_qemu_io_write_stores_only_what_changed(name, client, tmp_path):
    """After qemu-io writes to one file of the chain, the next snapshot finds exactly the chunks whose guest
    content changed (the same counts as the same writes to a raw copy give) and restores to the new view."""
    which, writes, changed = INCREMENTALS[name]
    fx = qi.build(name, tmp_path / "img")
    twin = qi.to_raw(fx.path, tmp_path / "twin.raw")
    dq, s1 = snapshot(client, fx.path)
    dr, t1 = snapshot(client, twin)
    target = fx.files[which]
    fmt = "raw" if target.endswith(".raw") else "qcow2"
    w = qi.Writes(str(tmp_path / "scratch"), 7)
    writes(w)
    cmds = list(w.cmds)
    w.apply(target, fmt=fmt)
    if which == 0:  # the same guest writes to the raw twin (compressed writes are plain writes there)
        w.cmds = [c.replace("-c ", "") for c in cmds]
        w.apply(twin, fmt="raw")
    else:
        qi.to_raw(fx.path, twin + ".new")
        os.replace(twin + ".new", twin)
    s2 = client.create_snapshot(dq["DiskId"])["SnapshotId"]
    t2 = client.create_snapshot(dr["DiskId"])["SnapshotId"]
    rq, rr = record(client, s2), record(client, t2)
    assert rq["ParentSnapshotId"] == s1 and rr["ParentSnapshotId"] == t1
    assert (rq["ChangedChunks"], rq["AddedChunks"]) == (changed, changed), rq
    assert (rr["ChangedChunks"], rr["AddedChunks"]) == (changed, 0), rr  # the qcow2 already stored them
    assert_restores_to(client, s2, qi.to_raw(fx.path, tmp_path / "now.raw"), tmp_path / "out.raw")


# --- point in time over the whole chain ---------------------------------------------------------------------
def _qemu_write(path):
    fmt = "raw" if path.endswith((".raw", ".data")) else "qcow2"
    qi.qemu_io(path, "write -q -P 0x99 1m 4k", fmt=fmt)


def _raw_write(path):
    with open(path, "r+b") as f:
        os.pwrite(f.fileno(), b"\x99" * 512, 3 * MiB)


POINT_IN_TIME = {
    "top": ("chain-3-deep", 0, _qemu_write),
    "middle": ("chain-3-deep", 1, _qemu_write),
    "lower-middle": ("chain-3-deep", 2, _qemu_write),
    "raw-base": ("chain-3-deep", 3, _raw_write),
    "raw-base-replaced": ("chain-3-deep", 3, "replace"),
    "backing-replaced": ("backing-relative", 1, "replace"),
    "data-file": ("data-file-raw", 1, _raw_write),
    "data-file-replaced": ("data-file-raw", 1, "replace"),
}


@pytest.mark.parametrize("case", POINT_IN_TIME)
def test_a_change_to_any_file_of_the_chain_during_create_fails_it(case, client, tmp_path):
    """A write to (or `mv` over) any file of the chain while a create reads it: CreateSnapshot.ImageChanged,
    no snapshot recorded; the next create works and restores to the image as it is now."""
    name, which, change = POINT_IN_TIME[case]
    fx = qi.build(name, tmp_path / "img")
    target = fx.files[which]
    if change == "replace":
        other = target + ".new"
        shutil.copyfile(target, other)
        with open(other, "r+b") as f:
            os.pwrite(f.fileno(), b"\x42" * 4096, 0 if target.endswith((".raw", ".data")) else os.path.getsize(other))

        def change(path):
            os.rename(other, path)
    disk = client.add_disk(fx.path)["DiskId"]
    done = []

    def hook(done_bytes, total):
        if not done:
            done.append(done_bytes)
            change(target)

    before = client.describe_snapshots()["TotalCount"]
    with pytest.raises(errors.ImageChanged):
        client.create_snapshot(disk, progress=hook)
    assert done, "the progress hook never ran"
    accomplished = [s for s in client.describe_snapshots()["Snapshots"]["Snapshot"] if s["Status"] == "accomplished"]
    assert len(accomplished) == 0 and client.describe_snapshots()["TotalCount"] <= before + 1
    sid = client.create_snapshot(disk)["SnapshotId"]
    assert_restores_to(client, sid, qi.to_raw(fx.path, tmp_path / "now.raw"), tmp_path / "out.raw")
    assert client.verify()["Ok"]


# --- refusing, safely ---------------------------------------------------------------------------------------
MALFORMED, UNSUPPORTED, IN_USE = "InvalidImage.Malformed", "InvalidImage.Unsupported", "InvalidImage.InUse"
DENIED, NOT_FOUND = "InvalidImage.BackingFileDenied", "InvalidImage.NotFound"


def _eof_cluster(path, lay, ahead=16):
    return (os.path.getsize(path) // lay.cluster_size + ahead) * lay.cluster_size


def _first_l1(lay):
    return next((off, e) for off, e in lay.l1 if e & qi.L1_OFFSET_MASK)


def _first_data(lay):
    return next(e for e in lay.standard() if e.raw & qi.L2_OFFSET_MASK and not e.raw & qi.OFLAG_ZERO)


def _set_l1(fn):
    def patcher(path):
        lay = qi.Layout(path)
        off, entry = _first_l1(lay)
        qi.patch(path, off, ">Q", fn(path, lay, entry))
    return patcher


def _set_l2(fn, compressed=False):
    def patcher(path):
        lay = qi.Layout(path)
        e = lay.compressed()[0] if compressed else _first_data(lay)
        qi.patch(path, e.entry_offset, ">Q", fn(path, lay, e))
    return patcher


def _field(name, value):
    return lambda path: qi.patch_field(path, name, value(path) if callable(value) else value)


def _bits(name, bits):
    return lambda path: qi.set_bits(path, name, bits)


def _compressed_garbage(path):
    import random

    lay = qi.Layout(path)
    host, n = lay.compressed_extent(lay.compressed()[0])
    with open(path, "r+b") as f:
        os.pwrite(f.fileno(), random.Random(5).randbytes(min(n, 64)), host)


def _recompressed(ctype, length):
    """Replace the first compressed cluster's stored data with a valid stream (zstd frame or raw deflate, as
    QEMU writes them) that decodes to ``length(cluster_size)`` bytes instead of one cluster."""
    def patcher(path):
        import zlib

        import zstandard

        lay = qi.Layout(path)
        e = lay.compressed()[0]
        host, room = lay.compressed_extent(e)
        plain = b"\x42" * length(lay.cluster_size)
        if ctype == "zstd":
            data = zstandard.ZstdCompressor().compress(plain)
        else:
            c = zlib.compressobj(6, zlib.DEFLATED, -12)
            data = c.compress(plain) + c.flush()
        assert len(data) <= room, (len(data), room)
        with open(path, "r+b") as f:
            os.pwrite(f.fileno(), data, host)
    return patcher


def _compressed_sectors_huge(path, lay, e):
    x = 62 - (lay.cluster_bits - 8)
    return e.raw | (((1 << (62 - x)) - 1) << x)


def _extl2_bitmap(value):
    def patcher(path):
        lay = qi.Layout(path)
        e = next(e for e in lay.standard() if e.bitmap is not None and e.raw & qi.L2_OFFSET_MASK)
        qi.patch(path, e.entry_offset + 8, ">Q", value(e))
    return patcher


def _extl2_alloc_without_cluster(path):
    lay = qi.Layout(path)
    # an entry without host cluster whose bitmap says "allocated": zero subclusters of an unallocated cluster
    e = next(e for e in lay.standard() if e.bitmap is not None and not e.raw & qi.L2_OFFSET_MASK)
    qi.patch(path, e.entry_offset + 8, ">Q", 0xF)


def _rebase(target):
    return lambda path: qi.qemu_img("rebase", "-u", "-b", target, "-F", "qcow2", path, cwd=qi.here(path))


def _vmdk_backing(path):
    d = os.path.dirname(path)
    qi.qemu_img("create", "-q", "-f", "vmdk", os.path.join(d, "base.vmdk"), "4M", cwd=d)
    qi.qemu_img("rebase", "-u", "-b", "base.vmdk", "-F", "vmdk", path, cwd=d)


def _unlink(which):
    return lambda path: os.unlink(os.path.join(os.path.dirname(path), which))


# id: (fixture, patch(path of the top image), accepted codes, refused at disk add?, mode)
#   mode "strict": the codes, always.
#   mode "qemu": where QEMU reads the damaged image in a defined way, reading it exactly as qemu-img convert does
#   is also right (issue 8); where qemu-img convert fails, one of the codes is required.
REFUSALS = {
    # header fields (docs/interop/qcow2.rst "Header")
    "unknown-incompatible-bit-5": ("v3", _bits("incompatible_features", 1 << 5), UNSUPPORTED, True, "strict"),
    "unknown-incompatible-bit-63": ("v3", _bits("incompatible_features", 1 << 63), UNSUPPORTED, True, "strict"),
    "corrupt-bit": ("v3", _bits("incompatible_features", qi.INCOMPAT_CORRUPT), MALFORMED, True, "strict"),
    "dirty-bit-patched": ("v3", _bits("incompatible_features", qi.INCOMPAT_DIRTY), IN_USE, False, "strict"),
    "version-1": ("v3", _field("version", 1), UNSUPPORTED, True, "strict"),
    "version-4": ("v3", _field("version", 4), UNSUPPORTED, True, "strict"),
    "cluster-bits-8": ("v3", _field("cluster_bits", 8), MALFORMED, True, "strict"),
    "cluster-bits-22": ("v3", _field("cluster_bits", 22), (MALFORMED, UNSUPPORTED), True, "strict"),
    "cluster-bits-63": ("v3", _field("cluster_bits", 63), MALFORMED, True, "strict"),
    "l1-size-absurd": ("v3", _field("l1_size", 0x7FFFFFFF), MALFORMED, True, "strict"),
    "l1-size-too-small-for-the-disk": ("v3", _field("l1_size", 0), MALFORMED, True, "strict"),
    "size-huge-for-its-l1": ("v3", _field("size", 1 << 62), MALFORMED, True, "strict"),
    "size-not-a-multiple-of-512": ("v3", _field("size", 4 * MiB - 1000), MALFORMED, False, "qemu"),
    "l1-table-past-eof": ("v3", _field("l1_table_offset", lambda p: _eof_cluster(p, qi.Layout(p))), MALFORMED,
                          False, "qemu"),  # QEMU reads zeros past the end
    "l1-table-unaligned": ("v3", _field("l1_table_offset", lambda p: qi.Layout(p).header["l1_table_offset"] + 8),
                           MALFORMED, True, "strict"),
    "l1-table-overlaps-header": ("v3", _field("l1_table_offset", 0), MALFORMED, True, "strict"),
    "refcount-table-past-eof": ("v3", _field("refcount_table_offset", lambda p: _eof_cluster(p, qi.Layout(p))),
                                MALFORMED, False, "qemu"),
    "refcount-order-7": ("v3", _field("refcount_order", 7), MALFORMED, True, "strict"),
    "header-length-short": ("v3", _field("header_length", 96), MALFORMED, True, "strict"),
    "header-length-unaligned": ("v3", _field("header_length", 105), MALFORMED, False, "qemu"),
    "header-extension-overflows-the-cluster": (
        "backing-relative", lambda p: qi.patch(p, qi.Layout(p).extensions[0][1] - 4, ">I", 0x7FFFFFF0), MALFORMED,
        True, "qemu"),
    "compression-type-unknown": ("compressed-zstd", _field("compression_type", 2), UNSUPPORTED, True, "strict"),
    "compression-bit-with-type-zlib": ("compressed-zlib", _bits("incompatible_features", qi.INCOMPAT_COMPRESSION),
                                       (MALFORMED, UNSUPPORTED), True, "strict"),
    "crypt-method-aes-patched": ("v3", _field("crypt_method", 1), UNSUPPORTED, True, "strict"),
    "crypt-method-luks-patched": ("v3", _field("crypt_method", 2), (UNSUPPORTED, MALFORMED), True, "strict"),
    "crypt-method-unknown": ("v3", _field("crypt_method", 3), (UNSUPPORTED, MALFORMED), True, "strict"),
    "extended-l2-with-4k-clusters": ("cluster-4k", _bits("incompatible_features", qi.INCOMPAT_EXTL2),
                                     (MALFORMED, UNSUPPORTED), True, "strict"),
    "data-file-bit-without-a-name": ("v3", _bits("incompatible_features", qi.INCOMPAT_DATA_FILE),
                                     (UNSUPPORTED, MALFORMED), True, "strict"),
    "data-file-missing": ("data-file-raw", _unlink("disk.data"), NOT_FOUND, True, "strict"),
    "snapshot-table-past-eof": ("internal-snapshots",
                                _field("snapshots_offset", lambda p: _eof_cluster(p, qi.Layout(p))), MALFORMED,
                                False, "qemu"),
    "snapshot-count-absurd": ("internal-snapshots", _field("nb_snapshots", 0xFFFFFFFF), MALFORMED, False, "qemu"),
    # backing files
    "backing-name-too-long": ("backing-relative", _field("backing_file_size", 1024), MALFORMED, True, "strict"),
    "backing-name-past-eof": ("backing-relative", _field("backing_file_offset", 1 << 40), MALFORMED, True, "strict"),
    "backing-missing": ("backing-relative", _unlink("base.qcow2"), NOT_FOUND, True, "strict"),
    "chain-loop": ("backing-relative", lambda p: _rebase("disk.qcow2")(os.path.join(os.path.dirname(p),
                                                                                     "base.qcow2")),
                   MALFORMED, True, "strict"),
    "chain-self-loop": ("backing-relative", _rebase("disk.qcow2"), MALFORMED, True, "strict"),
    "backing-file-in-vmdk-format": ("backing-relative", lambda p: _vmdk_backing(p), UNSUPPORTED, True, "strict"),
    "backing-file-named-by-nbd-protocol": ("backing-relative", _rebase("nbd://127.0.0.1:10809/x"), UNSUPPORTED,
                                           True, "strict"),
    "backing-file-named-by-json-protocol": (
        "backing-relative", _rebase('json:{"driver":"qcow2","file":{"driver":"file","filename":"base.qcow2"}}'),
        UNSUPPORTED, True, "strict"),
    # L1 / L2 tables ("Cluster mapping")
    "l2-table-past-eof": ("v3", _set_l1(lambda p, lay, e: _eof_cluster(p, lay) | qi.OFLAG_COPIED), MALFORMED,
                          False, "qemu"),
    "l2-table-unaligned": ("v3", _set_l1(lambda p, lay, e: e + 512), MALFORMED, False, "qemu"),
    "l2-table-is-the-l1-table": ("v3", _set_l1(lambda p, lay, e: lay.header["l1_table_offset"] | qi.OFLAG_COPIED),
                                 MALFORMED, False, "strict"),
    "l2-table-is-the-refcount-table": (
        "v3", _set_l1(lambda p, lay, e: lay.header["refcount_table_offset"] | qi.OFLAG_COPIED), MALFORMED, False,
        "strict"),
    "l1-reserved-bits": ("v3", _set_l1(lambda p, lay, e: e | (1 << 57)), MALFORMED, False, "qemu"),
    "data-cluster-past-eof": ("v3", _set_l2(lambda p, lay, e: (e.raw & ~qi.L2_OFFSET_MASK) | _eof_cluster(p, lay)),
                              MALFORMED, False, "qemu"),
    "data-cluster-unaligned": ("v3", _set_l2(lambda p, lay, e: e.raw + 512), MALFORMED, False, "qemu"),
    "data-cluster-is-the-l1-table": (
        "v3", _set_l2(lambda p, lay, e: (e.raw & ~qi.L2_OFFSET_MASK) | lay.header["l1_table_offset"]), MALFORMED,
        False, "strict"),  # docs/API.md: a data cluster on metadata is an overlap
    "data-cluster-is-the-refcount-table": (
        "v3", _set_l2(lambda p, lay, e: (e.raw & ~qi.L2_OFFSET_MASK) | lay.header["refcount_table_offset"]),
        MALFORMED, False, "strict"),
    "data-cluster-at-offset-0-without-data-file": (
        "v3", _set_l2(lambda p, lay, e: (e.raw & ~qi.L2_OFFSET_MASK) | qi.OFLAG_COPIED), MALFORMED, False, "qemu"),
    "compressed-cluster-with-a-data-file": (
        "data-file-raw", _set_l2(lambda p, lay, e: (e.raw & ~qi.OFLAG_COPIED) | qi.OFLAG_COMPRESSED), MALFORMED, False,
        "strict"),
    "l2-reserved-bits": ("v3", _set_l2(lambda p, lay, e: e.raw | (1 << 57)), MALFORMED, False, "qemu"),
    "zero-bit-in-a-v2-image": ("v2", _set_l2(lambda p, lay, e: e.raw | qi.OFLAG_ZERO), MALFORMED, False, "qemu"),
    "compressed-cluster-past-eof": (
        "compressed-zlib", _set_l2(lambda p, lay, e: (e.raw & ~((1 << (62 - (lay.cluster_bits - 8))) - 1))
                                   | _eof_cluster(p, lay), compressed=True), MALFORMED, False, "strict"),
    "compressed-sector-count-past-eof": ("compressed-zstd", _set_l2(_compressed_sectors_huge, compressed=True),
                                         MALFORMED, False, "qemu"),
    "compressed-data-zlib-garbage": ("compressed-zlib", _compressed_garbage, MALFORMED, False, "qemu"),
    "compressed-data-zstd-garbage": ("compressed-zstd", _compressed_garbage, MALFORMED, False, "qemu"),
    # a valid stream that decodes to more or less than one cluster (QEMU: zstd must end at the cluster's end,
    # deflate may run longer and is cut)
    "compressed-zstd-frame-longer-than-a-cluster": ("compressed-zstd", _recompressed("zstd", lambda cs: cs + 4096),
                                                    MALFORMED, False, "qemu"),
    "compressed-zstd-frame-shorter-than-a-cluster": ("compressed-zstd", _recompressed("zstd", lambda cs: cs - 512),
                                                     MALFORMED, False, "qemu"),
    "compressed-zlib-stream-longer-than-a-cluster": ("compressed-zlib", _recompressed("zlib", lambda cs: cs + 4096),
                                                     MALFORMED, False, "qemu"),
    "compressed-zlib-stream-shorter-than-a-cluster": ("compressed-zlib", _recompressed("zlib", lambda cs: cs - 512),
                                                      MALFORMED, False, "qemu"),
    "extl2-allocated-and-zero": ("extl2", _extl2_bitmap(lambda e: 0x1_0000_0001 | e.bitmap), MALFORMED, False,
                                 "qemu"),
    "extl2-allocated-without-cluster": ("extl2", _extl2_alloc_without_cluster, MALFORMED, False, "qemu"),
}


def _copy_fixture(fx, dest):
    shutil.copytree(fx.directory, dest, symlinks=True)
    return os.path.join(dest, os.path.relpath(fx.path, fx.directory))


@pytest.mark.parametrize("case", REFUSALS)
def test_a_damaged_or_unsupported_image_is_one_typed_line_and_the_repository_stays_intact(case, repo_path,
                                                                                           tmp_path):
    """Each "Refusing, safely" case made by patching a real image: `disk add` (of a damaged copy) and `snapshot
    create` (of a registered disk damaged since) fail with the typed code, one line, the code's non-zero exit
    status, no traceback; `blocksnap verify` stays clean and the earlier snapshot restores as it was. Where
    QEMU reads the damage in a defined way, blocksnap may read it the same way instead."""
    from blocksnap.api import Client

    name, damage, codes, at_add, mode = REFUSALS[case]
    codes = (codes,) if isinstance(codes, str) else codes
    fx = qi.build(name, tmp_path / "img")
    before = qi.to_raw(fx.path, tmp_path / "before.raw")
    with Client(repo_path) as c:
        disk, s1 = snapshot(c, fx.path)
        disk = disk["DiskId"]
    copy = _copy_fixture(fx, tmp_path / "copy")
    damage(fx.path)
    damage(copy)
    qemu_view = qi.try_to_raw(fx.path, tmp_path / "qemu.raw") if mode == "qemu" else None

    def refused_or_read_as_qemu(proc, what):
        if proc.returncode == 0 and mode == "qemu":
            assert qemu_view is not None, (f"{case}: blocksnap {what} succeeded where qemu-img convert fails "
                                           f"(expected {codes})")
            return True
        one_line_error(proc, codes)
        return False

    p = run_cli("--repo", repo_path, "--json", "disk", "add", copy)
    if at_add or p.returncode != 0:
        refused_or_read_as_qemu(p, "disk add")
    p = run_cli("--repo", repo_path, "--json", "snapshot", "create", disk)
    read = refused_or_read_as_qemu(p, "snapshot create")
    with Client(repo_path) as c:
        assert c.verify()["Ok"], c.verify()
        assert_restores_to(c, s1, before, tmp_path / "s1.raw")
        if read:
            sid = json.loads(p.stdout)["SnapshotId"]
            assert_restores_to(c, sid, qemu_view, tmp_path / "s2.raw")


@pytest.mark.parametrize("kind", ["luks", "aes"])
def test_an_encrypted_image_is_refused_as_unsupported(kind, repo_path, tmp_path):
    """qcow2 encrypted with LUKS or the old AES (made by qemu-img with a secret): InvalidImage.Unsupported, one
    line, at disk add."""
    img = str(tmp_path / "enc.qcow2")
    opts = f"encrypt.format={kind},encrypt.key-secret=s" + (",encrypt.iter-time=10" if kind == "luks" else "")
    qi.qemu_img("create", "-q", "-f", "qcow2", "--object", "secret,id=s,data=hunter2", "-o", opts, img, "4M")
    assert qi.info(img).get("encrypted") is True
    one_line_error(run_cli("--repo", repo_path, "disk", "add", img), UNSUPPORTED)


def _chain(directory, n):
    """A chain of ``n`` backing files under one top (n + 1 qcow2 files), each layer writing one cluster."""
    os.makedirs(directory)
    prev = None
    for i in range(n + 1):
        path = os.path.join(directory, f"l{i}.qcow2")
        qi.create(path, 4 * MiB, backing=prev)
        qi.qemu_io(path, f"write -q -P {i + 1:#x} {i * 64}k 64k")
        prev = os.path.basename(path)
    return path


def test_a_chain_of_16_backing_files_is_read_and_17_is_refused(repo_path, tmp_path):
    """The plan's limit: 16 backing files are read (qemu-img convert's bytes); 17 are InvalidImage.Malformed."""
    ok = _chain(str(tmp_path / "c16"), 16)
    disk = cli_json(repo_path, "disk", "add", ok)["DiskId"]
    sid = cli_json(repo_path, "snapshot", "create", disk)["SnapshotId"]
    cli_json(repo_path, "restore", sid, str(tmp_path / "c16.raw"))
    assert first_difference(str(tmp_path / "c16.raw"), qi.to_raw(ok, tmp_path / "c16.ref")) is None
    one_line_error(run_cli("--repo", repo_path, "disk", "add", _chain(str(tmp_path / "c17"), 17)), MALFORMED)


# --- dirty images and QEMU's lock ---------------------------------------------------------------------------
def test_a_dirty_image_is_refused_unless_allow_dirty(images, repo_path, tmp_path):
    """The dirty bit (lazy refcounts, qemu-io aborted): snapshot create is InvalidImage.InUse (being in use is
    checked at each create, disk add may register it); a disk added with --allow-dirty is read as qemu-img
    convert reads it."""
    fx = images.get("lazy-refcounts-dirty")
    p = run_cli("--repo", repo_path, "--json", "disk", "add", fx.path)
    if p.returncode != 0:
        one_line_error(p, IN_USE)
    else:
        plain = json.loads(p.stdout)["DiskId"]
        one_line_error(run_cli("--repo", repo_path, "snapshot", "create", plain), IN_USE)
    copy = str(tmp_path / "copy.qcow2")
    shutil.copyfile(fx.path, copy)
    disk = cli_json(repo_path, "disk", "add", copy, "--allow-dirty")["DiskId"]
    sid = cli_json(repo_path, "snapshot", "create", disk)["SnapshotId"]
    cli_json(repo_path, "restore", sid, str(tmp_path / "out.raw"))
    assert first_difference(str(tmp_path / "out.raw"), images.raw("lazy-refcounts-dirty")) is None


def test_an_image_that_became_dirty_fails_the_next_create_and_keeps_the_earlier_snapshot(repo_path, tmp_path):
    """A disk registered clean whose QEMU then crashed (dirty bit set): snapshot create fails InvalidImage.InUse;
    the repository verifies and the earlier snapshot restores as it was."""
    from blocksnap.api import Client

    fx = qi.build("lazy-refcounts", tmp_path / "img")
    before = qi.to_raw(fx.path, tmp_path / "before.raw")
    disk = cli_json(repo_path, "disk", "add", fx.path)["DiskId"]
    s1 = cli_json(repo_path, "snapshot", "create", disk)["SnapshotId"]
    qi.make_dirty(fx.path, qi.Writes(str(tmp_path / "s"), 3).random(3 * MiB + 512 * KiB, 64 * KiB))
    one_line_error(run_cli("--repo", repo_path, "snapshot", "create", disk), IN_USE)
    with Client(repo_path) as c:
        assert c.verify()["Ok"]
        assert_restores_to(c, s1, before, tmp_path / "s1.raw")


class QemuHolder:
    """A qemu-io process holding an image open read-write (QEMU's write-permission lock byte taken)."""

    def __init__(self, path):
        self.proc = subprocess.Popen(["qemu-io", "-f", "qcow2", path], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        # Until its lock is taken, asked without taking a lock (F_OFD_GETLK): a probe that took one, as
        # `qemu-img info` does, could make qemu-io fail to get its write lock while it starts.
        from blocksnap.image import qemu_writer

        fd = os.open(path, os.O_RDONLY)
        try:
            while not qemu_writer(fd):
                assert time.monotonic() < deadline and self.proc.poll() is None, "qemu-io did not lock the image"
                time.sleep(0.05)
        finally:
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


def test_an_image_qemu_holds_open_for_writing_is_in_use(repo_path, tmp_path):
    """While a QEMU process (qemu-io) holds the image open read-write, snapshot create is InvalidImage.InUse
    (disk add may register it or refuse it the same way); once it has exited, the create works."""
    fx = qi.build("v3", tmp_path / "img")
    with QemuHolder(fx.path):
        p = run_cli("--repo", repo_path, "--json", "disk", "add", fx.path)
        if p.returncode != 0:
            one_line_error(p, IN_USE)
    disk = cli_json(repo_path, "disk", "add", fx.path)["DiskId"] if p.returncode else json.loads(p.stdout)["DiskId"]
    with QemuHolder(fx.path):
        one_line_error(run_cli("--repo", repo_path, "snapshot", "create", disk), IN_USE)
    cli_json(repo_path, "snapshot", "create", disk)


# --- backing files are a security boundary -----------------------------------------------------------------
def _top_over(directory, backing, backing_fmt="raw", size=4 * MiB, name="disk.qcow2"):
    """A qcow2 ``name`` in ``directory`` whose backing file name is ``backing`` (not opened: rebase -u)."""
    os.makedirs(directory, exist_ok=True)
    top = os.path.join(directory, name)
    qi.create(top, size)
    qi.qemu_io(top, "write -q -P 0x61 64k 64k")
    qi.qemu_img("rebase", "-u", "-b", backing, "-F", backing_fmt, top, cwd=directory)
    return top


def _outside_base(tmp_path, name="outside"):
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    base = d / "base.qcow2"
    qi.create(base, 4 * MiB)
    qi.qemu_io(str(base), "write -q -P 0x62 0 1m")
    return str(d), str(base)


def _etc_passwd(tmp_path):
    return _top_over(str(tmp_path / "vm"), "/etc/passwd"), ["/etc"]


def _relative_escape(tmp_path):
    d, _ = _outside_base(tmp_path)
    top = _top_over(str(tmp_path / "vm"), "../outside/base.qcow2", "qcow2")
    return top, [d]


def _symlink_escape(tmp_path):
    d, base = _outside_base(tmp_path)
    (tmp_path / "vm").mkdir()
    os.symlink(base, tmp_path / "vm" / "base.qcow2")
    return _top_over(str(tmp_path / "vm"), "base.qcow2", "qcow2"), [d]


def _symlinked_directory_escape(tmp_path):
    d, _ = _outside_base(tmp_path)
    (tmp_path / "vm").mkdir()
    os.symlink(d, tmp_path / "vm" / "layers")
    return _top_over(str(tmp_path / "vm"), "layers/base.qcow2", "qcow2"), [d]


def _middle_escape(tmp_path):
    d, _ = _outside_base(tmp_path)
    mid = _top_over(str(tmp_path / "vm" / "sub"), "../../outside/base.qcow2", "qcow2")
    os.rename(mid, tmp_path / "vm" / "sub" / "mid.qcow2")
    return _top_over(str(tmp_path / "vm"), "sub/mid.qcow2", "qcow2"), [d]


def _data_file_escape(tmp_path):
    d = tmp_path / "outside"
    d.mkdir()
    (tmp_path / "vm").mkdir()
    top = str(tmp_path / "vm" / "disk.qcow2")
    qi.create(top, 4 * MiB, f"data_file={d / 'disk.data'}", "data_file_raw=on")
    qi.qemu_io(top, "write -q -P 0x63 0 128k")
    return top, [str(d)]


ESCAPES = {"etc-passwd-raw-backing": _etc_passwd, "relative-dotdot": _relative_escape,
           "symlinked-backing-file": _symlink_escape, "symlinked-directory": _symlinked_directory_escape,
           "middle-of-the-chain": _middle_escape, "external-data-file": _data_file_escape}


@pytest.mark.parametrize("case", ESCAPES)
def test_a_backing_file_outside_the_image_tree_is_denied_unless_its_directory_is_allowed(case, repo_path,
                                                                                          tmp_path):
    """A backing (or data) file that resolves outside the image's directory tree (realpath: symlinks that escape
    count as outside) is InvalidImage.BackingFileDenied at disk add, also with an unrelated --backing-dir; with
    --backing-dir naming its directory the image is read as qemu-img convert reads it."""
    top, allowed = ESCAPES[case](tmp_path)
    one_line_error(run_cli("--repo", repo_path, "disk", "add", top), DENIED)
    (tmp_path / "unrelated").mkdir()
    one_line_error(run_cli("--repo", repo_path, "disk", "add", top, "--backing-dir", str(tmp_path / "unrelated")),
                   DENIED)
    args = [x for a in allowed for x in ("--backing-dir", a)]
    disk = cli_json(repo_path, "disk", "add", top, *args)["DiskId"]
    sid = cli_json(repo_path, "snapshot", "create", disk)["SnapshotId"]
    cli_json(repo_path, "restore", sid, str(tmp_path / "out.raw"))
    assert first_difference(str(tmp_path / "out.raw"), qi.to_raw(top, tmp_path / "ref.raw")) is None


def _snapshot_matches_qemu(repo_path, tmp_path, path, ref):
    disk = cli_json(repo_path, "disk", "add", path)["DiskId"]
    sid = cli_json(repo_path, "snapshot", "create", disk)["SnapshotId"]
    out = tmp_path / f"out-{disk}.raw"
    cli_json(repo_path, "restore", sid, str(out))
    assert first_difference(str(out), qi.to_raw(ref, tmp_path / f"ref-{disk}.raw")) is None


def test_a_symlinked_backing_file_that_stays_inside_the_tree_is_allowed(repo_path, tmp_path):
    """A backing file name that is a symlink to a file deeper in the image's own tree needs no --backing-dir."""
    real = tmp_path / "real"
    (real / "deep").mkdir(parents=True)
    base = real / "deep" / "base.qcow2"
    qi.create(base, 4 * MiB)
    qi.qemu_io(str(base), "write -q -P 0x64 0 256k")
    os.symlink("deep/base.qcow2", real / "base-link.qcow2")
    top = _top_over(str(real), "base-link.qcow2", "qcow2")
    _snapshot_matches_qemu(repo_path, tmp_path, top, top)


def test_an_image_registered_through_a_symlink_may_use_backing_files_next_to_its_real_file(repo_path, tmp_path):
    """The plan's "image's own directory tree (realpath)": an image registered as links/vm.qcow2 -> real/disk.qcow2
    whose backing file (named absolutely, so QEMU and blocksnap mean the same file) is real/deep/base.qcow2 is
    inside the tree of its real path and needs no --backing-dir."""
    real = tmp_path / "real"
    (real / "deep").mkdir(parents=True)
    base = real / "deep" / "base.qcow2"
    qi.create(base, 4 * MiB)
    qi.qemu_io(str(base), "write -q -P 0x64 0 256k")
    top = _top_over(str(real), str(base), "qcow2")
    (tmp_path / "links").mkdir()
    os.symlink(top, tmp_path / "links" / "vm.qcow2")
    _snapshot_matches_qemu(repo_path, tmp_path, str(tmp_path / "links" / "vm.qcow2"), top)


@pytest.mark.parametrize("next_to_the_link", ["absent", "another-file"])
def test_a_relative_backing_name_of_a_symlinked_image_resolves_as_qemu_resolves_it(repo_path, tmp_path,
                                                                                     next_to_the_link):
    """QEMU resolves a relative backing file name next to the path it opened (the symlink links/vm.qcow2), not
    next to the real file: blocksnap must not snapshot real/base.qcow2, which is not the guest view QEMU gives.
    With no links/base.qcow2 (qemu-img convert fails) that is InvalidImage.NotFound; with another file there it
    is that file's view, or a refusal (it lies outside the real file's tree)."""
    real = tmp_path / "real"
    real.mkdir()
    qi.create(real / "base.qcow2", 4 * MiB)
    qi.qemu_io(str(real / "base.qcow2"), "write -q -P 0x65 0 64k")
    top = _top_over(str(real), "base.qcow2", "qcow2")
    (tmp_path / "links").mkdir()
    link = tmp_path / "links" / "vm.qcow2"
    os.symlink(top, link)
    if next_to_the_link == "absent":
        assert qi.try_to_raw(str(link), tmp_path / "q.raw") is None
        one_line_error(run_cli("--repo", repo_path, "disk", "add", str(link)), NOT_FOUND)
        return
    qi.create(tmp_path / "links" / "base.qcow2", 4 * MiB)
    qi.qemu_io(str(tmp_path / "links" / "base.qcow2"), "write -q -P 0x66 0 64k")
    p = run_cli("--repo", repo_path, "--json", "disk", "add", str(link))
    if p.returncode != 0:
        one_line_error(p, (DENIED, NOT_FOUND))
        return
    sid = cli_json(repo_path, "snapshot", "create", json.loads(p.stdout)["DiskId"])["SnapshotId"]
    cli_json(repo_path, "restore", sid, str(tmp_path / "out.raw"))
    diff = first_difference(str(tmp_path / "out.raw"), qi.to_raw(str(link), tmp_path / "ref.raw"))
    assert diff is None, f"not the guest view qemu-img convert gives of {link}: {diff}"


def test_a_backing_file_rebased_outside_after_disk_add_fails_the_create(repo_path, tmp_path):
    """`qemu-img rebase -u -b /etc/passwd` after disk add: the next snapshot create is
    InvalidImage.BackingFileDenied, the repository verifies and the earlier snapshot is intact."""
    from blocksnap.api import Client

    fx = qi.build("backing-relative", tmp_path / "img")
    before = qi.to_raw(fx.path, tmp_path / "before.raw")
    disk = cli_json(repo_path, "disk", "add", fx.path)["DiskId"]
    s1 = cli_json(repo_path, "snapshot", "create", disk)["SnapshotId"]
    qi.qemu_img("rebase", "-u", "-b", "/etc/passwd", "-F", "raw", fx.path)
    one_line_error(run_cli("--repo", repo_path, "snapshot", "create", disk), DENIED)
    with Client(repo_path) as c:
        assert c.verify()["Ok"]
        assert_restores_to(c, s1, before, tmp_path / "s1.raw")


# --- the format comes from the header ---------------------------------------------------------------------
def test_the_format_is_detected_from_the_header_not_the_name(images, client, tmp_path):
    """A qcow2 named disk.raw is read as qcow2; a raw image named disk.qcow2 is read as its bytes."""
    q = tmp_path / "looks.raw"
    shutil.copyfile(images.get("v3").path, q)
    r = tmp_path / "looks.qcow2"
    shutil.copyfile(images.raw("v3"), r)
    dq, sq = snapshot(client, str(q))
    dr, sr = snapshot(client, str(r))
    assert (listed_format(client, dq), listed_format(client, dr)) == ("qcow2", "raw")
    assert_restores_to(client, sq, images.raw("v3"), tmp_path / "q.out")
    assert_restores_to(client, sr, str(r), tmp_path / "r.out")


def test_the_disk_add_reply_names_the_format_of_raw_and_qcow2_disks(images, client):
    """The disk record add_disk returns carries "Format" ("raw" or "qcow2", the plan's Disk field), as
    describe_disks lists it."""
    q = client.add_disk(images.get("v3").path)
    r = client.add_disk(images.raw("v3"))
    assert (q.get("Format"), r.get("Format")) == ("qcow2", "raw"), (q, r)
    assert (listed_format(client, q), listed_format(client, r)) == ("qcow2", "raw")


def test_format_raw_snapshots_a_qcow2_files_bytes(images, client, tmp_path):
    """`disk add --format raw` on a qcow2 file: the snapshot is the file's own bytes (its backing file unread)."""
    fx = images.get("backing-relative")
    disk = client.add_disk(fx.path, format="raw")
    assert listed_format(client, disk) == "raw"
    sid = client.create_snapshot(disk["DiskId"])["SnapshotId"]
    assert_restores_to(client, sid, fx.path, tmp_path / "out")


def test_a_qcow2_disk_replaced_by_a_raw_file_fails_with_format_changed(images, repo_path, tmp_path):
    """A disk registered as qcow2 whose file is now raw: snapshot create is InvalidImage.FormatChanged, it does
    not switch to reading the bytes."""
    img = tmp_path / "disk.img"
    shutil.copyfile(images.get("v3").path, img)
    disk = cli_json(repo_path, "disk", "add", str(img))["DiskId"]
    cli_json(repo_path, "snapshot", "create", disk)
    shutil.copyfile(images.raw("v3"), img)
    one_line_error(run_cli("--repo", repo_path, "snapshot", "create", disk), "InvalidImage.FormatChanged")


def test_a_raw_disk_whose_guest_writes_a_qcow2_header_stays_raw(images, client, tmp_path):
    """A disk registered raw is never re-probed: a guest that writes a qcow2 header (naming a backing file) into
    its disk gets its bytes snapshotted, and blocksnap follows no backing file of its choosing."""
    img = tmp_path / "disk.img"
    shutil.copyfile(images.raw("v3"), img)
    disk = client.add_disk(str(img))
    assert listed_format(client, disk) == "raw"
    top = _top_over(str(tmp_path / "g"), "/etc/passwd")
    with open(top, "rb") as src, open(img, "r+b") as dst:
        dst.write(src.read())
    sid = client.create_snapshot(disk["DiskId"])["SnapshotId"]
    assert_restores_to(client, sid, str(img), tmp_path / "out")


def test_format_qcow2_on_a_raw_file_is_refused(images, repo_path):
    """`disk add --format qcow2` of a raw image: a typed one-line refusal, no disk registered."""
    p = run_cli("--repo", repo_path, "disk", "add", images.raw("v3"), "--format", "qcow2")
    one_line_error(p, ("InvalidImage.FormatChanged", UNSUPPORTED, MALFORMED))
    assert cli_json(repo_path, "disk", "list")["TotalCount"] == 0


# --- sparse images: what is not allocated is not read ------------------------------------------------------
def test_a_1_tib_virtual_disk_holding_a_few_mib_is_snapshotted_without_reading_its_holes(repo_path, tmp_path):
    """A 1 TiB qcow2 with 3 MiB of data: snapshot create and restore --format qcow2 finish (a reader that hashed
    the unallocated 1 TiB would run for many minutes; the child is killed after 120 s) and qemu-img compare calls
    the restore identical."""
    img = str(tmp_path / "big.qcow2")
    qi.create(img, 1 << 40)
    w = qi.Writes(str(tmp_path / "s"), 11).random(0, 1 * MiB).text(1 << 39, 1 * MiB).random((1 << 40) - MiB, MiB)
    w.apply(img)
    disk = cli_json(repo_path, "disk", "add", img)["DiskId"]
    sid = json.loads(run_cli("--repo", repo_path, "--json", "snapshot", "create", disk, check=True,
                             timeout=120).stdout)["SnapshotId"]
    out = str(tmp_path / "out.qcow2")
    run_cli("--repo", repo_path, "restore", sid, out, "--format", "qcow2", check=True, timeout=120)
    assert qi.compare(img, out) == 0
    assert sum(e["length"] for e in qi.image_map(out) if e["data"]) <= 4 * MiB
