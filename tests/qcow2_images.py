"""qcow2 test images made by the real tools, one per feature of issue 8's "Reading" list.

Every image is made by ``qemu-img`` / ``qemu-io`` (Debian qemu-utils 7.2) inside a directory the caller
gives; the content is deterministic (seeded random bytes, log-like text, repeated blocks, byte patterns,
zeros of both kinds) and written through qemu-io, so the guest view is what QEMU says it is. The
reference for every comparison is ``qemu-img convert -O raw``.

Besides the builders this module holds a small reader of qcow2 *metadata* (docs/interop/qcow2.rst of
qemu/qemu: "Header", "Header extensions", "Cluster mapping", "Extended L2 Entries", "Host cluster
management"), used only to confirm that a fixture has its feature (a zero cluster of each kind, a
compressed cluster, a subcluster bitmap) and to find the bytes the refusal and fuzz tests patch. It never
reads guest data: the guest view always comes from qemu-img.

    build(name, directory) -> Fixture      one fixture, made in ``directory`` (created, must be new)
    NAMES                                  every fixture name, in a stable order
    Layout(path)                           where a qcow2 file's metadata is
"""
import dataclasses
import json
import os
import random
import shutil
import struct
import subprocess

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

QEMU_TIMEOUT = 120


# --- the tools --------------------------------------------------------------------------------------------
class QemuError(AssertionError):
    """A qemu-img / qemu-io command failed (a fixture could not be made, or a reference not computed)."""


def run(*argv, ok=(0,), timeout=QEMU_TIMEOUT, cwd=None):
    """Run a command; returns the CompletedProcess (text). Raises QemuError on an exit status not in ``ok``."""
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, check=False,
                          cwd=cwd)
    if proc.returncode not in ok:
        raise QemuError(f"{' '.join(map(str, argv))} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def here(path):
    """The directory qemu runs in for ``path``: QEMU 7.2 resolves a relative external data file name against its
    working directory (backing file names against the image's directory), so every qemu command of these
    tests runs in the image's own directory and both mean the same file."""
    return os.path.dirname(os.path.abspath(path))


def qemu_img(*args, ok=(0,), cwd=None):
    return run("qemu-img", *args, ok=ok, cwd=cwd)


def qemu_io(path, *commands, fmt="qcow2", ok=(0,)):
    """Run qemu-io commands (each one ``-c``) on an image in one process."""
    argv = ["qemu-io", "-f", fmt]
    for cmd in commands:
        argv += ["-c", cmd]
    proc = run(*argv, os.path.abspath(path), ok=ok, cwd=here(path))
    # qemu-io reports a failed command on stdout/stderr but may still exit 0.
    text = proc.stdout + proc.stderr
    for bad in ("Failed", "failed", "error"):
        if bad in text and 0 in ok and proc.returncode == 0:
            raise QemuError(f"qemu-io {path}: {text.strip()}")
    return proc


def info(path, chain=False):
    """``qemu-img info --output=json`` (``-U``: no lock needed); a list of dicts when ``chain``."""
    args = ["info", "-U", "--output=json"] + (["--backing-chain"] if chain else []) + [path]
    return json.loads(qemu_img(*args[:-1], os.path.abspath(path), cwd=here(path)).stdout)


def check(path):
    """``(exit status, report)`` of ``qemu-img check --output=json``: 0 clean, 2 errors, 3 leaks."""
    proc = qemu_img("check", "-U", "--output=json", os.path.abspath(path), ok=(0, 1, 2, 3), cwd=here(path))
    try:
        report = json.loads(proc.stdout) if proc.stdout.strip() else {}
    except ValueError:
        report = {"raw": proc.stdout}
    return proc.returncode, report


def image_map(path):
    """``qemu-img map --output=json`` entries."""
    return json.loads(qemu_img("map", "-U", "--output=json", os.path.abspath(path), cwd=here(path)).stdout)


def to_raw(path, out):
    """The guest view of ``path`` as QEMU gives it: ``qemu-img convert -O raw``. Returns ``out``."""
    qemu_img("convert", "-U", "-O", "raw", os.path.abspath(path), os.path.abspath(out), cwd=here(path))
    return str(out)


def try_to_raw(path, out):
    """Like to_raw, or None where QEMU cannot read the image (a damaged one)."""
    proc = qemu_img("convert", "-U", "-O", "raw", os.path.abspath(path), os.path.abspath(out), ok=(0, 1),
                    cwd=here(path))
    return str(out) if proc.returncode == 0 else None


def compare(a, b):
    """``qemu-img compare -U A B``: 0 identical, 1 different (anything else raises)."""
    return qemu_img("compare", "-U", os.path.abspath(a), os.path.abspath(b), ok=(0, 1), cwd=here(a)).returncode


# --- deterministic content, written by qemu-io ----------------------------------------------------------
LOG_WORDS = ("kernel", "systemd", "sshd", "nginx", "postgres", "cron", "accepted", "session", "opened",
             "closed", "GET", "POST", "/api/v1/items", "200", "404", "checkpoint", "complete", "vacuum")


def log_text(rng, n):
    """``n`` bytes of log-like text (compresses well, is not all one byte)."""
    lines, total = [], 0
    t = rng.randrange(1_600_000_000, 1_700_000_000)
    while total < n:
        t += rng.randrange(1, 30)
        line = f"{t} host{rng.randrange(4)} {' '.join(rng.choice(LOG_WORDS) for _ in range(rng.randrange(3, 9)))} " \
               f"pid={rng.randrange(1, 65536)}\n"
        lines.append(line)
        total += len(line)
    return "".join(lines).encode()[:n]


class Writes:
    """qemu-io commands for one image, applied by :meth:`apply` in one qemu-io run.

    Data comes from small source files in ``scratch`` (qemu-io ``write -s``), so offsets and lengths can be
    anything; compressed writes (``-c``) must be whole clusters.
    """

    def __init__(self, scratch, seed):
        self.scratch = scratch
        self.rng = random.Random(seed)
        self.cmds = []
        os.makedirs(scratch, exist_ok=True)

    def _source(self, data):
        path = os.path.join(self.scratch, f"src-{len(self.cmds)}-{self.rng.randrange(1 << 30)}")
        with open(path, "wb") as f:
            f.write(data)
        return path

    def data(self, off, data, compressed=False):
        flag = "-c " if compressed else ""
        self.cmds.append(f"write -q {flag}-s {self._source(data)} {off} {len(data)}")
        return self

    def random(self, off, n, compressed=False):
        return self.data(off, self.rng.randbytes(n), compressed)

    def text(self, off, n, compressed=False):
        return self.data(off, log_text(self.rng, n), compressed)

    def repeat(self, off, block, times):
        """The same random ``block``-byte block ``times`` times in a row (dedup within one image)."""
        one = self.rng.randbytes(block)
        return self.data(off, one * times)

    def pattern(self, off, n, byte, compressed=False):
        flag = "-c " if compressed else ""
        self.cmds.append(f"write -q {flag}-P {byte:#x} {off} {n}")
        return self

    def zero(self, off, n, unmap=False):
        """``write -z`` (``-u``: may unmap, a zero cluster without a host cluster)."""
        self.cmds.append(f"write -q -z {'-u ' if unmap else ''}{off} {n}")
        return self

    def apply(self, image, fmt="qcow2"):
        if self.cmds:
            qemu_io(image, *self.cmds, fmt=fmt)
        self.cmds = []
        return image


def mixed(w, size, cluster=64 * KiB):
    """A varied guest view over ``size`` bytes (at least 4 MiB): random, text, repeated blocks, patterns,
    small unaligned writes, zeros of both kinds over data, and data in the last cluster. Returns ``w``."""
    w.random(0, 256 * KiB)
    w.text(512 * KiB, 192 * KiB)
    w.repeat(1 * MiB, 64 * KiB, 4)
    w.pattern(1536 * KiB, 128 * KiB, 0x5A)
    w.random(2 * MiB + 123, 3000)  # unaligned, inside one cluster
    w.text(2 * MiB + 200 * KiB + 7, 70 * KiB)  # unaligned, across a cluster boundary
    w.random(3 * MiB, 256 * KiB)
    w.zero(3 * MiB + 64 * KiB, 64 * KiB)  # zeroed data, host cluster kept (v3: zero flag on an allocated one)
    w.zero(3 * MiB + 192 * KiB, 32 * KiB, unmap=True)
    last = (size - 1) // cluster * cluster
    w.random(max(last, size - 4096), min(4096, size - last))  # the end of the disk
    return w


# --- the metadata reader ----------------------------------------------------------------------------------
# docs/interop/qcow2.rst, "Header": (name, offset, struct format), big-endian.
HEADER_FIELDS = (
    ("magic", 0, ">I"), ("version", 4, ">I"), ("backing_file_offset", 8, ">Q"), ("backing_file_size", 16, ">I"),
    ("cluster_bits", 20, ">I"), ("size", 24, ">Q"), ("crypt_method", 32, ">I"), ("l1_size", 36, ">I"),
    ("l1_table_offset", 40, ">Q"), ("refcount_table_offset", 48, ">Q"), ("refcount_table_clusters", 56, ">I"),
    ("nb_snapshots", 60, ">I"), ("snapshots_offset", 64, ">Q"),
    # version 3
    ("incompatible_features", 72, ">Q"), ("compatible_features", 80, ">Q"), ("autoclear_features", 88, ">Q"),
    ("refcount_order", 96, ">I"), ("header_length", 100, ">I"), ("compression_type", 104, ">B"),
)
FIELD = {name: (off, fmt) for name, off, fmt in HEADER_FIELDS}
INCOMPAT_DIRTY, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_COMPRESSION, INCOMPAT_EXTL2 = (1 << i for i in range(5))
COMPAT_LAZY_REFCOUNTS = 1
AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW = 1, 2
EXT_END, EXT_BACKING_FORMAT, EXT_FEATURE_NAMES, EXT_BITMAPS, EXT_CRYPTO, EXT_DATA_FILE = (
    0, 0xE2792ACA, 0x6803F857, 0x23852875, 0x0537BE77, 0x44415441)
L1_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2_OFFSET_MASK = 0x00FFFFFFFFFFFE00
OFLAG_COPIED, OFLAG_COMPRESSED, OFLAG_ZERO = 1 << 63, 1 << 62, 1


@dataclasses.dataclass
class L2Entry:
    """One L2 entry of the active table: where it is in the file and what it says."""
    entry_offset: int  # file offset of the entry
    guest_offset: int
    raw: int  # the first 64 bits
    bitmap: int | None  # extended L2: the subcluster bitmap

    @property
    def compressed(self):
        return bool(self.raw & OFLAG_COMPRESSED)


class Layout:
    """Where the metadata of a qcow2 file is (docs/interop/qcow2.rst), for confirming and patching fixtures.

    Attributes: ``header`` (field -> value), ``cluster_size``, ``extensions`` (list of (type, data offset,
    length)), ``l1`` (list of (file offset, entry)), ``l2`` (L2Entry list of the active table, allocated
    tables only), ``refcount_blocks`` (file offsets).
    """

    def __init__(self, path):
        with open(path, "rb") as f:
            self.data = f.read()
        d = self.data
        self.header = {}
        v = struct.unpack_from(">I", d, 4)[0]
        for name, off, fmt in HEADER_FIELDS:
            if off >= 72 and v < 3:
                break
            if off + struct.calcsize(fmt) <= len(d):
                self.header[name] = struct.unpack_from(fmt, d, off)[0]
        if v < 3:
            self.header.update(incompatible_features=0, compatible_features=0, autoclear_features=0,
                               refcount_order=4, header_length=72)
        hl = self.header["header_length"]
        if hl <= 104:
            self.header["compression_type"] = 0
        self.cluster_bits = self.header["cluster_bits"]
        self.cluster_size = 1 << self.cluster_bits
        self.extended_l2 = bool(self.header["incompatible_features"] & INCOMPAT_EXTL2)
        self.extensions = []
        off = hl
        while off + 8 <= min(len(d), self.cluster_size):
            typ, length = struct.unpack_from(">II", d, off)
            if typ == EXT_END:
                break
            self.extensions.append((typ, off + 8, length))
            off += 8 + (length + 7) // 8 * 8
        l1_off, l1_size = self.header["l1_table_offset"], self.header["l1_size"]
        self.l1 = [(l1_off + 8 * i, struct.unpack_from(">Q", d, l1_off + 8 * i)[0]) for i in range(l1_size)
                   if l1_off + 8 * i + 8 <= len(d)]
        esize = 16 if self.extended_l2 else 8
        per_l2 = self.cluster_size // esize
        self.l2 = []
        for i, (_, entry) in enumerate(self.l1):
            table = entry & L1_OFFSET_MASK
            if not table or table + self.cluster_size > len(d):
                continue
            for j in range(per_l2):
                eo = table + j * esize
                raw = struct.unpack_from(">Q", d, eo)[0]
                bitmap = struct.unpack_from(">Q", d, eo + 8)[0] if self.extended_l2 else None
                if raw or bitmap:
                    self.l2.append(L2Entry(eo, (i * per_l2 + j) * self.cluster_size, raw, bitmap))
        rt_off = self.header["refcount_table_offset"]
        rt_len = self.header["refcount_table_clusters"] * self.cluster_size
        self.refcount_table = (rt_off, rt_len)
        self.refcount_blocks = []
        for k in range(rt_len // 8):
            if rt_off + 8 * k + 8 > len(d):
                break
            rb = struct.unpack_from(">Q", d, rt_off + 8 * k)[0] & ~0x1FF
            if rb:
                self.refcount_blocks.append(rb)

    def extension(self, typ):
        """(data offset, length) of the header extension ``typ``, or None."""
        for t, off, length in self.extensions:
            if t == typ:
                return off, length
        return None

    def l2_tables(self):
        return sorted({e & L1_OFFSET_MASK for _, e in self.l1 if e & L1_OFFSET_MASK})

    # "Compressed Clusters Descriptor (x = 62 - (cluster_bits - 8))"
    def compressed_extent(self, entry):
        """(host offset, stored byte length upper bound) of a compressed cluster entry."""
        x = 62 - (self.cluster_bits - 8)
        host = entry.raw & ((1 << x) - 1)
        sectors = (entry.raw >> x) & ((1 << (62 - x)) - 1)
        return host, (sectors + 1) * 512 - (host & 511)

    def compressed(self):
        return [e for e in self.l2 if e.compressed]

    def standard(self):
        return [e for e in self.l2 if not e.compressed]

    def zero_allocated(self):
        """Zero clusters that keep a host cluster (bit 0 and an offset)."""
        return [e for e in self.standard() if not self.extended_l2 and e.raw & OFLAG_ZERO and e.raw & L2_OFFSET_MASK]

    def zero_plain(self):
        """Zero clusters without a host cluster (bit 0, offset 0)."""
        return [e for e in self.standard()
                if not self.extended_l2 and e.raw & OFLAG_ZERO and not e.raw & L2_OFFSET_MASK]

    def partial_subclusters(self):
        """Extended L2 entries whose subclusters are not all of one state."""
        out = []
        for e in self.standard():
            if e.bitmap is None:
                continue
            alloc, zero = e.bitmap & 0xFFFFFFFF, e.bitmap >> 32
            if alloc not in (0, 0xFFFFFFFF) or zero not in (0, 0xFFFFFFFF):
                out.append(e)
        return out


def patch(path, offset, fmt, value):
    """Overwrite ``struct.pack(fmt, value)`` at ``offset`` of the file ``path``, in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def patch_field(path, name, value):
    """Overwrite one header field (HEADER_FIELDS) of a qcow2 file."""
    off, fmt = FIELD[name]
    patch(path, off, fmt, value)


def set_bits(path, name, bits):
    """OR ``bits`` into a header field."""
    off, fmt = FIELD[name]
    patch(path, off, fmt, Layout(path).header[name] | bits)


# --- fixtures ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Fixture:
    """A made image: ``path`` is the one to register; ``files`` every file its guest view depends on (top
    first: the image, its backing chain, external data files); ``add_kw`` the add_disk options it needs and
    ``cli`` the same as ``disk add`` arguments."""
    name: str
    feature: str
    path: str
    files: tuple
    directory: str
    add_kw: dict = dataclasses.field(default_factory=dict)
    cli: tuple = ()
    virtual_size: int = 0


_BUILDERS = {}


def _fixture(name, feature):
    def register(fn):
        _BUILDERS[name] = (feature, fn)
        return fn
    return register


def create(path, size, *opts, backing=None, backing_fmt=None):
    args = ["create", "-q", "-f", "qcow2"]
    if backing is not None:
        args += ["-b", backing, "-F", backing_fmt or "qcow2"]
    for o in opts:
        args += ["-o", o]
    qemu_img(*args, os.path.abspath(path), size, cwd=here(path))
    return str(path)


def raw_file(path, size, writes):
    """A raw image of ``size`` bytes written by qemu-io (``writes``: a Writes for it)."""
    with open(path, "wb") as f:
        f.truncate(size)
    writes.apply(path, fmt="raw")
    return str(path)


def build(name, directory):
    """Make fixture ``name`` in ``directory`` (created; must not exist). Returns its Fixture."""
    feature, fn = _BUILDERS[name]
    os.makedirs(directory)
    directory = str(directory)
    scratch = os.path.join(os.path.dirname(directory), f".scratch-{os.path.basename(directory)}")
    try:
        fx = fn(directory, scratch, name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    fx.name, fx.feature, fx.directory = name, feature, directory
    fx.virtual_size = info(fx.path)["virtual-size"]
    return fx


def _fx(path, *others, **kw):
    return Fixture(name="", feature="", path=str(path), files=(str(path),) + tuple(map(str, others)),
                   directory="", **kw)


def _seed(name):
    return sum(name.encode()) * 7919 + len(name)


@_fixture("v2", "version 2 (compat=0.10): no zero flag, no feature bits")
def _v2(d, s, name):
    img = create(os.path.join(d, "disk.qcow2"), 4 * MiB, "compat=0.10")
    mixed(Writes(s, _seed(name)), 4 * MiB).apply(img)
    return _fx(img)


@_fixture("v3", "version 3 (compat=1.1), 64 KiB clusters")
def _v3(d, s, name):
    img = create(os.path.join(d, "disk.qcow2"), 4 * MiB, "compat=1.1")
    mixed(Writes(s, _seed(name)), 4 * MiB).apply(img)
    return _fx(img)


def _cluster(size_text, cluster):
    def fn(d, s, name):
        img = create(os.path.join(d, "disk.qcow2"), 8 * MiB if cluster >= 2 * MiB else 4 * MiB,
                     f"cluster_size={size_text}")
        mixed(Writes(s, _seed(name)), 8 * MiB if cluster >= 2 * MiB else 4 * MiB, cluster).apply(img)
        return _fx(img)
    return fn


for _text, _cs in (("512", 512), ("4k", 4 * KiB), ("64k", 64 * KiB), ("2M", 2 * MiB)):
    _fixture(f"cluster-{_text.lower()}", f"cluster size {_text}")(_cluster(_text, _cs))


def _refcount(bits):
    def fn(d, s, name):
        img = create(os.path.join(d, "disk.qcow2"), 4 * MiB, f"refcount_bits={bits}")
        mixed(Writes(s, _seed(name)), 4 * MiB).apply(img)
        return _fx(img)
    return fn


for _bits in (1, 2, 4, 8, 16, 32, 64):
    _fixture(f"refcount-{_bits}", f"refcount_bits={_bits} (refcount_order {_bits.bit_length() - 1})")(_refcount(_bits))


@_fixture("zero-clusters", "zero clusters of both kinds (with and without a host cluster) over a backing "
                           "file full of data, and unallocated clusters reading the backing file")
def _zero_clusters(d, s, name):
    base = create(os.path.join(d, "base.qcow2"), 4 * MiB)
    Writes(s, _seed(name) + 1).random(0, 4 * MiB).apply(base)
    img = create(os.path.join(d, "disk.qcow2"), 4 * MiB, backing="base.qcow2")
    w = Writes(s, _seed(name))
    w.random(0, 1 * MiB)
    w.apply(img)
    w.zero(0, 128 * KiB)  # allocated -> zero flag, host cluster kept
    w.zero(256 * KiB, 128 * KiB, unmap=True)  # allocated -> zero flag, host cluster freed
    w.zero(2 * MiB, 192 * KiB)  # unallocated over backing data -> zero flag, no host cluster
    w.zero(3 * MiB + 64 * KiB, 64 * KiB, unmap=True)
    w.random(512 * KiB + 5, 100)
    w.apply(img)
    return _fx(img, base)


@_fixture("unallocated-8g", "an 8 GiB virtual disk holding a few clusters: almost all unallocated, no backing")
def _unallocated(d, s, name):
    img = create(os.path.join(d, "disk.qcow2"), 8 * GiB)
    w = Writes(s, _seed(name))
    w.random(0, 64 * KiB).text(1 * GiB + 12345, 20 * KiB).repeat(4 * GiB, 64 * KiB, 3)
    w.random(8 * GiB - 64 * KiB, 64 * KiB).pattern(6 * GiB, 512, 0xEE)
    w.apply(img)
    return _fx(img)


def _compressed(ctype, cluster_text, cluster):
    def fn(d, s, name):
        size = 12 * MiB if cluster >= 2 * MiB else 4 * MiB  # qemu-io writes compressed only to free clusters
        src = raw_file(os.path.join(s + "-raw"), size, mixed(Writes(s, _seed(name)), size, cluster))
        img = os.path.join(d, "disk.qcow2")
        try:
            qemu_img("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o",
                     f"compression_type={ctype},cluster_size={cluster_text}", src, img)
        finally:
            os.unlink(src)
        w = Writes(s, _seed(name) + 1)
        # more compressed clusters written by qemu-io, and a plain write over a compressed one
        w.text(size - 4 * cluster, 2 * cluster, compressed=True)
        w.pattern(size - 2 * cluster, cluster, 0x33, compressed=True)
        w.random(512 * KiB + 100, 300)
        w.apply(img)
        return _fx(img)
    return fn


for _ct in ("zlib", "zstd"):
    _fixture(f"compressed-{_ct}", f"compressed clusters ({_ct}), by qemu-img convert -c and qemu-io write -c")(
        _compressed(_ct, "64k", 64 * KiB))
_fixture("compressed-zlib-512", "compressed clusters (zlib) with 512 B clusters (1-bit sector count)")(
    _compressed("zlib", "512", 512))
_fixture("compressed-zstd-4k", "compressed clusters (zstd) with 4 KiB clusters")(_compressed("zstd", "4k", 4 * KiB))
_fixture("compressed-zstd-2m", "compressed clusters (zstd) with 2 MiB clusters")(_compressed("zstd", "2M", 2 * MiB))


def _subcluster_writes(w, cluster):
    sub = cluster // 32
    w.random(0, 3 * sub)  # three subclusters of cluster 0
    w.text(cluster + 5 * sub, sub)  # one subcluster of cluster 1
    w.random(2 * cluster, cluster)  # a whole cluster
    w.zero(2 * cluster + 4 * sub, 2 * sub)  # zero subclusters inside allocated data
    w.random(4 * cluster + 7, sub)  # unaligned, across two subclusters
    w.zero(6 * cluster + 8 * sub, 3 * sub)  # zero subclusters of an unallocated cluster
    w.pattern(10 * cluster, cluster, 0x77, compressed=True)  # a compressed cluster (no subclusters)
    w.random(12 * cluster + 31 * sub, 2 * sub)  # last subcluster of one, first of the next
    return w


@_fixture("extl2", "extended L2 entries (64 KiB clusters, 2 KiB subclusters): partly allocated and zero "
                   "subclusters, a compressed cluster")
def _extl2(d, s, name):
    img = create(os.path.join(d, "disk.qcow2"), 4 * MiB, "extended_l2=on")
    _subcluster_writes(Writes(s, _seed(name)), 64 * KiB).apply(img)
    return _fx(img)


@_fixture("extl2-16k", "extended L2 entries with 16 KiB clusters (512 B subclusters)")
def _extl2_16k(d, s, name):
    img = create(os.path.join(d, "disk.qcow2"), 4 * MiB, "extended_l2=on", "cluster_size=16k")
    _subcluster_writes(Writes(s, _seed(name)), 16 * KiB).apply(img)
    return _fx(img)


@_fixture("extl2-backing", "extended L2 entries over a backing file: unallocated subclusters read the "
                           "backing file, zero subclusters hide it")
def _extl2_backing(d, s, name):
    base = create(os.path.join(d, "base.qcow2"), 4 * MiB)
    Writes(s, _seed(name) + 1).random(0, 2 * MiB).text(2 * MiB, 2 * MiB).apply(base)
    img = create(os.path.join(d, "disk.qcow2"), 4 * MiB, "extended_l2=on", backing="base.qcow2")
    _subcluster_writes(Writes(s, _seed(name)), 64 * KiB).apply(img)
    return _fx(img, base)


def _base_with_data(path, size, s, seed, fmt="qcow2"):
    w = Writes(s, seed).random(0, size // 4).text(size // 2, size // 8).pattern(size - 64 * KiB, 64 * KiB, 0xB5)
    if fmt == "raw":
        return raw_file(path, size, w)
    return w.apply(create(path, size))


def _overlay(w, size):
    w.random(64 * KiB, 64 * KiB).text(size // 2 + 1000, 10 * KiB).zero(128 * KiB, 64 * KiB)
    w.zero(size // 2 + 64 * KiB, 64 * KiB, unmap=True)
    return w


@_fixture("backing-relative", "a qcow2 backing file named by a relative path")
def _backing_rel(d, s, name):
    base = _base_with_data(os.path.join(d, "base.qcow2"), 4 * MiB, s, _seed(name) + 1)
    img = create(os.path.join(d, "disk.qcow2"), 4 * MiB, backing="base.qcow2")
    _overlay(Writes(s, _seed(name)), 4 * MiB).apply(img)
    return _fx(img, base)


@_fixture("backing-absolute", "a qcow2 backing file named by an absolute path (inside the image's directory)")
def _backing_abs(d, s, name):
    base = _base_with_data(os.path.join(d, "base.qcow2"), 4 * MiB, s, _seed(name) + 1)
    img = create(os.path.join(d, "disk.qcow2"), 4 * MiB, backing=os.path.abspath(base))
    _overlay(Writes(s, _seed(name)), 4 * MiB).apply(img)
    return _fx(img, base)


@_fixture("backing-raw", "a raw backing file")
def _backing_raw(d, s, name):
    base = _base_with_data(os.path.join(d, "base.raw"), 4 * MiB, s, _seed(name) + 1, fmt="raw")
    img = create(os.path.join(d, "disk.qcow2"), 4 * MiB, backing="base.raw", backing_fmt="raw")
    _overlay(Writes(s, _seed(name)), 4 * MiB).apply(img)
    return _fx(img, base)


@_fixture("backing-top-larger", "the top image is larger than its backing file (zeros past the backing file's "
                                "end), backing size not a multiple of the cluster size")
def _backing_larger(d, s, name):
    base = create(os.path.join(d, "base.qcow2"), 3 * MiB + 1536)
    Writes(s, _seed(name) + 1).random(0, 3 * MiB + 1536).apply(base)
    img = create(os.path.join(d, "disk.qcow2"), 6 * MiB, backing="base.qcow2")
    Writes(s, _seed(name)).random(1 * MiB, 64 * KiB).text(5 * MiB, 64 * KiB).apply(img)
    return _fx(img, base)


@_fixture("backing-top-smaller", "the top image is smaller than its backing file (the guest ends at the top's size)")
def _backing_smaller(d, s, name):
    base = _base_with_data(os.path.join(d, "base.raw"), 8 * MiB, s, _seed(name) + 1, fmt="raw")
    img = create(os.path.join(d, "disk.qcow2"), 3 * MiB + 512, backing="base.raw", backing_fmt="raw")
    Writes(s, _seed(name)).random(1 * MiB, 64 * KiB).zero(2 * MiB, 64 * KiB).apply(img)
    return _fx(img, base)


@_fixture("chain-3-deep", "a 3-deep chain: raw base <- qcow2 (compressed clusters) <- qcow2 <- qcow2 top, in "
                          "subdirectories, named by relative and absolute paths")
def _chain3(d, s, name):
    os.makedirs(os.path.join(d, "layers", "base"))
    base = _base_with_data(os.path.join(d, "layers", "base", "base.raw"), 4 * MiB, s, _seed(name) + 1, fmt="raw")
    mid1 = create(os.path.join(d, "layers", "mid1.qcow2"), 4 * MiB, "compression_type=zstd",
                  backing="base/base.raw", backing_fmt="raw")
    Writes(s, _seed(name) + 2).text(0, 256 * KiB, compressed=True).random(1 * MiB + 4096, 8192).apply(mid1)
    mid2 = create(os.path.join(d, "layers", "mid2.qcow2"), 4 * MiB, backing=os.path.abspath(mid1))
    Writes(s, _seed(name) + 3).random(128 * KiB, 64 * KiB).zero(3 * MiB, 128 * KiB).apply(mid2)
    img = create(os.path.join(d, "disk.qcow2"), 5 * MiB, backing="layers/mid2.qcow2")
    _overlay(Writes(s, _seed(name)), 4 * MiB).random(4 * MiB + 100, 500).apply(img)
    return _fx(img, mid2, mid1, base)


@_fixture("size-unaligned", "a virtual size that is no multiple of the cluster size (5 MiB + 3 KiB), data in "
                            "the last, partial cluster")
def _size_unaligned(d, s, name):
    size = 5 * MiB + 3 * KiB
    img = create(os.path.join(d, "disk.qcow2"), size)
    w = Writes(s, _seed(name)).random(0, 128 * KiB).text(5 * MiB - 10 * KiB, 13 * KiB)
    w.random(size - 512, 512)
    w.apply(img)
    return _fx(img)


@_fixture("size-unaligned-2m", "a virtual size that is no multiple of the cluster size, 2 MiB clusters")
def _size_unaligned_2m(d, s, name):
    size = 5 * MiB + 512
    img = create(os.path.join(d, "disk.qcow2"), size, "cluster_size=2M")
    Writes(s, _seed(name)).random(4 * MiB + 7, 1 * MiB + 505).apply(img)
    return _fx(img)


@_fixture("internal-snapshots", "two internal snapshots (qemu-img snapshot -c), then more writes: the active "
                                "layer is the guest view")
def _internal_snapshots(d, s, name):
    img = create(os.path.join(d, "disk.qcow2"), 4 * MiB)
    mixed(Writes(s, _seed(name)), 4 * MiB).apply(img)
    qemu_img("snapshot", "-c", "first", img)
    Writes(s, _seed(name) + 1).random(0, 128 * KiB).zero(512 * KiB, 64 * KiB).apply(img)
    qemu_img("snapshot", "-c", "second", img)
    Writes(s, _seed(name) + 2).text(64 * KiB, 64 * KiB).random(3 * MiB + 512 * KiB, 4096).zero(
        1 * MiB, 64 * KiB, unmap=True).apply(img)
    return _fx(img)


@_fixture("bitmaps", "persistent dirty bitmaps (qemu-img bitmap --add), one enabled and one disabled")
def _bitmaps(d, s, name):
    img = create(os.path.join(d, "disk.qcow2"), 4 * MiB)
    Writes(s, _seed(name) + 1).random(0, 512 * KiB).apply(img)
    qemu_img("bitmap", "--add", img, "b0")
    qemu_img("bitmap", "--add", "--disable", "-g", "128k", img, "b1")
    mixed(Writes(s, _seed(name)), 4 * MiB).apply(img)
    return _fx(img)


@_fixture("lazy-refcounts", "lazy_refcounts=on, closed cleanly (compatible feature bit 0, not dirty)")
def _lazy(d, s, name):
    img = create(os.path.join(d, "disk.qcow2"), 4 * MiB, "lazy_refcounts=on")
    mixed(Writes(s, _seed(name)), 4 * MiB).apply(img)
    return _fx(img)


def make_dirty(img, writes):
    """Apply ``writes`` (a Writes) to a lazy_refcounts image and abort qemu-io before it closes the image:
    the dirty bit stays set, as after a crash of a running QEMU."""
    cmds = writes.cmds + ["abort"]
    writes.cmds = []
    proc = subprocess.run(["qemu-io", "-f", "qcow2", *[a for c in cmds for a in ("-c", c)], img],
                          capture_output=True, text=True, timeout=QEMU_TIMEOUT, check=False)
    if proc.returncode == 0 or not Layout(img).header["incompatible_features"] & INCOMPAT_DIRTY:
        raise QemuError(f"qemu-io abort did not leave {img} dirty: {proc.returncode} {proc.stderr}")
    return img


@_fixture("lazy-refcounts-dirty", "lazy_refcounts=on and the dirty bit set (qemu-io aborted before closing the "
                                  "image): read with allow_dirty")
def _lazy_dirty(d, s, name):
    img = create(os.path.join(d, "disk.qcow2"), 4 * MiB, "lazy_refcounts=on")
    mixed(Writes(s, _seed(name)), 4 * MiB).apply(img)
    make_dirty(img, Writes(s, _seed(name) + 1).random(128 * KiB, 64 * KiB).random(2 * MiB + 512 * KiB, 128 * KiB))
    return _fx(img, add_kw={"allow_dirty": True}, cli=("--allow-dirty",))


def _prealloc(mode):
    def fn(d, s, name):
        img = create(os.path.join(d, "disk.qcow2"), 4 * MiB, f"preallocation={mode}")
        Writes(s, _seed(name)).random(0, 128 * KiB).text(1 * MiB, 64 * KiB).zero(2 * MiB, 64 * KiB).apply(img)
        return _fx(img)
    return fn


for _mode in ("metadata", "falloc", "full"):
    _fixture(f"prealloc-{_mode}", f"preallocation={_mode}: every cluster has a host cluster")(_prealloc(_mode))


def _data_file(raw_on):
    def fn(d, s, name):
        # data_file_raw=on names its data file relatively, the other one absolutely (both inside the tree)
        data = "disk.data" if raw_on else os.path.join(d, "disk.data")
        img = create(os.path.join(d, "disk.qcow2"), 4 * MiB, f"data_file={data}",
                     f"data_file_raw={'on' if raw_on else 'off'}")
        Writes(s, _seed(name)).random(0, 256 * KiB).text(1 * MiB, 128 * KiB).zero(64 * KiB, 64 * KiB).random(
            4 * MiB - 4096, 4096).apply(img)
        return _fx(img, os.path.join(d, "disk.data"))
    return fn


_fixture("data-file-raw", "an external data file named relatively (data_file=disk.data, data_file_raw=on)")(
    _data_file(True))
_fixture("data-file", "an external data file named by an absolute path (data_file_raw=off)")(_data_file(False))


@_fixture("kitchen-sink", "zstd compressed clusters, zero clusters, an internal snapshot, a bitmap, a raw "
                          "backing file and an unaligned size together")
def _kitchen_sink(d, s, name):
    size = 6 * MiB + 1024
    base = _base_with_data(os.path.join(d, "base.raw"), 6 * MiB, s, _seed(name) + 1, fmt="raw")
    img = create(os.path.join(d, "disk.qcow2"), size, "compression_type=zstd", backing="base.raw",
                 backing_fmt="raw")
    w = Writes(s, _seed(name))
    w.text(0, 256 * KiB, compressed=True).random(512 * KiB, 64 * KiB).zero(1 * MiB, 128 * KiB)
    w.apply(img)
    qemu_img("snapshot", "-c", "s1", img)
    qemu_img("bitmap", "--add", img, "dirty")
    Writes(s, _seed(name) + 2).random(0, 64 * KiB).zero(1536 * KiB, 64 * KiB, unmap=True).random(
        size - 1024, 1024).apply(img)
    return _fx(img, base)


NAMES = tuple(_BUILDERS)


def feature(name):
    return _BUILDERS[name][0]


# --- what each fixture must show, by qemu-img info/map and the metadata reader ---------------------------
def confirm(fx):
    """Raise AssertionError unless ``fx`` has the feature its name promises (qemu-img info/map/check and the
    metadata reader agree)."""
    inf = info(fx.path)
    spec = inf.get("format-specific", {}).get("data", {})
    lay = Layout(fx.path)
    n = fx.name
    assert inf["format"] == "qcow2", inf
    problems = []

    def need(cond, what):
        if not cond:
            problems.append(what)

    rc, report = check(fx.path)
    if n == "lazy-refcounts-dirty":
        need(inf.get("dirty-flag") is True and lay.header["incompatible_features"] & INCOMPAT_DIRTY, "dirty bit set")
    else:
        need(rc == 0, f"qemu-img check clean (got {rc}: {report})")
        need(not lay.header["incompatible_features"] & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT), "no dirty/corrupt bit")
    if n == "v2":
        need(spec.get("compat") == "0.10" and lay.header["version"] == 2, "version 2")
    else:
        need(spec.get("compat") == "1.1" and lay.header["version"] == 3, "version 3")
    if n.startswith("cluster-"):
        want = {"cluster-512": 512, "cluster-4k": 4096, "cluster-64k": 65536, "cluster-2m": 2 * MiB}[n]
        need(inf["cluster-size"] == want == lay.cluster_size, f"cluster size {want}")
    if n.startswith("refcount-"):
        bits = int(n.split("-")[1])
        need(spec.get("refcount-bits") == bits and 1 << lay.header["refcount_order"] == bits, f"refcount_bits {bits}")
    if n == "zero-clusters":
        need(lay.zero_allocated(), "a zero cluster with a host cluster")
        need(lay.zero_plain(), "a zero cluster without a host cluster")
        need(len(lay.standard()) > len(lay.zero_allocated()) + len(lay.zero_plain()), "data clusters")
    if n == "unallocated-8g":
        need(inf["virtual-size"] == 8 * GiB, "8 GiB")
        need(sum(e["length"] for e in image_map(fx.path) if e["data"]) <= 1 * MiB, "at most 1 MiB allocated")
    if n.startswith("compressed-") or n == "kitchen-sink":
        need(len(lay.compressed()) >= 2, "compressed clusters")
        ctype = "zstd" if "zstd" in n or n == "kitchen-sink" else "zlib"
        need(spec.get("compression-type") == ctype, f"compression type {ctype}")
        need(bool(lay.header["incompatible_features"] & INCOMPAT_COMPRESSION) == (ctype == "zstd"),
             "compression type bit as the type")
        need(lay.standard(), "also uncompressed clusters")
    if n.startswith("compressed-zlib-512"):
        need(lay.cluster_size == 512, "512 B clusters")
    if n.startswith("extl2"):
        need(spec.get("extended-l2") is True and lay.extended_l2, "extended L2")
        need(lay.partial_subclusters(), "clusters with subclusters of different states")
        need(any(e.bitmap >> 32 for e in lay.standard()), "zero subclusters")
        need(lay.compressed(), "a compressed cluster")
    if n.startswith("backing-") or n in ("zero-clusters", "extl2-backing", "kitchen-sink", "chain-3-deep"):
        chain = info(fx.path, chain=True)
        need(len(chain) == len(fx.files), f"a chain of {len(fx.files)} files (got {len(chain)})")
        bf = inf.get("backing-filename", "")
        if n == "backing-absolute":
            need(os.path.isabs(bf), "absolute backing path")
        elif n != "chain-3-deep":
            need(bf and not os.path.isabs(bf), "relative backing path")
        if n in ("backing-raw", "backing-top-smaller", "kitchen-sink"):
            need(chain[1]["format"] == "raw", "raw backing")
        if n == "backing-top-larger":
            need(inf["virtual-size"] > chain[1]["virtual-size"] and chain[1]["virtual-size"] % 65536, "top larger")
        if n == "backing-top-smaller":
            need(inf["virtual-size"] < chain[1]["virtual-size"], "top smaller")
        if n == "chain-3-deep":
            need(len(chain) == 4 and chain[-1]["format"] == "raw", "3 backing files, raw at the bottom")
            need(os.path.isabs(chain[1].get("backing-filename", "")) and not os.path.isabs(bf), "mixed paths")
            need(Layout(fx.files[2]).compressed(), "compressed clusters in the middle")
    if n.startswith("size-unaligned") or n == "kitchen-sink":
        need(inf["virtual-size"] % lay.cluster_size, "size not a multiple of the cluster size")
        last = (inf["virtual-size"] - 1) // lay.cluster_size * lay.cluster_size
        need(any(e.guest_offset == last for e in lay.standard()), "data in the last cluster")
    if n in ("internal-snapshots", "kitchen-sink"):
        snaps = inf.get("snapshots", [])
        need(len(snaps) == (2 if n == "internal-snapshots" else 1) == lay.header["nb_snapshots"], "snapshots")
    if n in ("bitmaps", "kitchen-sink"):
        need(spec.get("bitmaps") and lay.extension(EXT_BITMAPS), "a bitmaps extension")
        need(lay.header["autoclear_features"] & AUTOCLEAR_BITMAPS, "the bitmaps autoclear bit")
    if n.startswith("lazy-refcounts"):
        need(spec.get("lazy-refcounts") is True and lay.header["compatible_features"] & COMPAT_LAZY_REFCOUNTS,
             "lazy refcounts")
    if n.startswith("prealloc-"):
        need(all(e["data"] or e["zero"] for e in image_map(fx.path)), "no unallocated range")
        need(len(lay.standard()) == inf["virtual-size"] // lay.cluster_size, "every cluster has an L2 entry")
        if n != "prealloc-metadata":
            need(os.stat(fx.path).st_blocks * 512 >= inf["virtual-size"], "file space allocated")
    if n.startswith("data-file"):
        want = "disk.data" if n == "data-file-raw" else os.path.join(fx.directory, "disk.data")
        need(spec.get("data-file") == want and lay.header["incompatible_features"] & INCOMPAT_DATA_FILE,
             "an external data file")
        need(bool(spec.get("data-file-raw")) == (n == "data-file-raw")
             and bool(lay.header["autoclear_features"] & AUTOCLEAR_DATA_FILE_RAW) == (n == "data-file-raw"),
             "data_file_raw as named")
    if problems:
        raise AssertionError(f"fixture {n} lacks: {'; '.join(problems)}")
