"""qcow2 images as a source: the guest view of the active layer, as extents.

The format is QEMU's ``docs/interop/qcow2.rst``; where the spec leaves a choice to the reader, this
module does what QEMU's ``block/qcow2.c`` (``qcow2_do_open``), ``block/qcow2-cluster.c``
(``qcow2_get_host_offset``, ``qcow2_get_subcluster_type``) and ``block/qcow2-threads.c`` (the
decompressors) do, and says so where it matters. Only metadata is read here (header, extensions, L1
and L2 tables); guest data is read and decoded by the C
core from the extents this module hands out (``bs_scan_extents``).

Refused (typed errors, never a guess): versions other than 2 and 3, unknown incompatible feature bits,
the corrupt bit, encryption, cluster_bits out of 9..21, an L1 table too large or too small for the
virtual size, tables or clusters that lie past the end of the file, data clusters or L2 tables that
overlap the header, the L1 table, the refcount table or an L2 table, unaligned offsets, invalid
subcluster bitmaps, compressed clusters in an image with an external data file, and backing chains
that loop or are deeper than MAX_CHAIN. The dirty bit (lazy refcounts left dirty, or an image open in a
running QEMU) is refused unless the disk allows it: the L1/L2 tables, all that is read, are valid also
then. Data clusters that end past the end of the file read zeros there, as QEMU reads them.

Backing files and external data files are opened only inside the allowed directories (``Policy``):
an image from a stranger must not make blocksnap read ``/etc/shadow``.
"""
import array
import bisect
import os
import stat
import struct
import sys
import threading

from .. import _native, errors
from . import probe

MAGIC = b"QFI\xfb"
MAX_CHAIN = 16  # backing files below the top image
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21  # block/qcow2.h
MAX_L1_BYTES = 32 << 20  # QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 << 20  # QCOW_MAX_REFTABLE_SIZE
MAX_BACKING_NAME = 1023
MAX_SNAPSHOTS = 65536  # QCOW_MAX_SNAPSHOTS

INCOMPAT_DIRTY, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_COMPRESSION, INCOMPAT_EXTL2 = 1, 2, 4, 8, 16
INCOMPAT_KNOWN = 31
INCOMPAT_NAMES = {0: "dirty", 1: "corrupt", 2: "external data file", 3: "compression type", 4: "extended L2"}
AUTOCLEAR_DATA_FILE_RAW = 2

EXT_END, EXT_BACKING_FORMAT, EXT_FEATURE_TABLE = 0, 0xE2792ACA, 0x6803F857
EXT_CRYPTO, EXT_DATA_FILE = 0x0537BE77, 0x44415441

OFFSET_MASK = 0x00FFFFFFFFFFFE00  # L1E_OFFSET_MASK / L2E_OFFSET_MASK
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
COMPRESSION_DEFLATE, COMPRESSION_ZSTD = 0, 1

# Guest-cluster states, as QEMU's QCow2SubclusterType folds them for reading.
UNALLOC, ZERO, DATA, COMPRESSED = 0, 1, 2, 3
L2_CACHE = 8  # L2 tables kept (each one cluster)

_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")  # the 72 bytes of a version 2 header
_HEADER3 = struct.Struct(">QQQII")  # bytes 72..103 of version 3


class Policy:
    """Where backing and data files may be opened: inside ``root`` (the top image's own directory,
    resolved) or one of ``allowed`` (resolved), and whether a dirty image may be read."""

    def __init__(self, top_path, backing_dirs=(), allow_dirty=False, deny=()):
        # The image's own tree: the directory of the path it is opened by (where QEMU resolves its relative
        # backing names) and, for an image opened through a symlink, its real file's directory. A block
        # device has none: its directory is /dev, and every other disk of the host is in it.
        try:
            block = stat.S_ISBLK(os.stat(top_path).st_mode)
        except OSError:
            block = False
        own = [] if block else [os.path.dirname(os.path.abspath(top_path)), os.path.dirname(os.path.realpath(top_path))]
        self.roots = list(dict.fromkeys(os.path.realpath(d) for d in own))
        self.roots += [os.path.realpath(d) for d in backing_dirs]
        self.deny = [os.path.realpath(d) for d in deny]  # the repository: its packs are other disks' data
        self.allow_dirty = allow_dirty

    @staticmethod
    def _inside(real, root):
        return real == root or real.startswith(root.rstrip(os.sep) + os.sep)

    def check(self, path, what, image):
        real = os.path.realpath(path)
        for root in self.deny:
            if self._inside(real, root):
                raise errors.BackingFileDenied(f"({image}: {what} {path!s} resolves to {real}, inside the "
                                               "repository)")
        for root in self.roots:
            if self._inside(real, root):
                return real
        where = ", ".join(self.roots) if self.roots else "no directory (the image is a block device: name one with --backing-dir)"
        raise errors.BackingFileDenied(f"({image}: {what} {path!s} resolves to {real}, outside {where})")


def _malformed(path, why):
    return errors.ImageMalformed(f"({path}: {why})")


class _Extents:
    """Extent tuples for bs_scan_extents, coalescing neighbours that continue each other."""

    def __init__(self):
        self.out = []

    def add(self, length, host, fd, kind, stored=0, clen=0, skip=0):
        if self.out:
            last = self.out[-1]
            if kind == _native.EXT_ZERO and last[3] == kind:
                self.out[-1] = (last[0] + length,) + last[1:]
                return
            if kind in (_native.EXT_DATA, _native.EXT_RAW) and last[3] == kind and last[2] == fd and \
                    last[1] + last[0] == host:
                self.out[-1] = (last[0] + length,) + last[1:]
                return
        self.out.append((length, host, fd, kind, stored, clen, skip))


class Qcow2Image:
    """One open qcow2 file of a chain (its backing file opened below it).

    Attributes: ``path``, ``fd``, ``size`` (virtual bytes), ``cluster_size``, ``backing`` (the image
    below, a Qcow2Image or a raw file, or None), ``format`` ("qcow2"), ``kind`` ("file" or "block").
    """

    format = "qcow2"

    def __init__(self, path, policy, depth=0, seen=None, fd=None):
        self.path = path
        self.backing = None
        self.data_fd = None
        self._l2_cache = {}
        self._l2_lock = threading.Lock()
        self.fd = fd
        try:
            if self.fd is None:
                self.fd = _open_ro(path)
            st = os.fstat(self.fd)
            # What must not change while the disk is read, taken before a byte of metadata is read: a
            # write between the tables and the data would otherwise go unseen.
            self.ident = file_identity(self.fd)
            self.kind = "block" if stat.S_ISBLK(st.st_mode) else "file"
            self.file_size = os.lseek(self.fd, 0, os.SEEK_END) if self.kind == "block" else st.st_size
            seen = set() if seen is None else seen
            key = (st.st_dev, st.st_ino) if self.kind == "file" else ("block", st.st_rdev)
            if key in seen:
                raise _malformed(path, "the backing chain loops back to this file")
            seen.add(key)
            self._parse(policy, depth, seen)
        except BaseException:
            self.close()
            raise

    # --- opening -----------------------------------------------------------------------------------
    def _read(self, off, length, what):
        """Metadata bytes that must lie wholly inside the file."""
        if off + length > self.file_size:
            raise _malformed(self.path, f"{what} at {off}..{off + length} lies past the end of the file "
                                        f"({self.file_size} bytes)")
        try:
            data = os.pread(self.fd, length, off)
        except OSError as exc:
            raise errors.translate(exc, self.path, op="read-image") from None
        if len(data) != length:
            raise errors.ImageChanged(f"({self.path} shrank while it was read)")
        return data

    def _parse(self, policy, depth, seen):
        path = self.path
        if self.file_size < _HEADER.size:
            raise _malformed(path, "shorter than a qcow2 header")
        (magic, version, backing_off, backing_len, cluster_bits, size, crypt, l1_size, l1_off, rt_off,
         rt_clusters, nb_snapshots, snapshots_off) = _HEADER.unpack(self._read(0, _HEADER.size, "the header"))
        if magic != MAGIC:
            raise _malformed(path, "no qcow2 magic")
        if version not in (2, 3):
            raise errors.ImageUnsupported(f"({path}: qcow2 version {version}; versions 2 and 3 are supported)")
        if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
            raise _malformed(path, f"cluster_bits {cluster_bits} is out of range ({MIN_CLUSTER_BITS}..."
                                   f"{MAX_CLUSTER_BITS})")
        self.version = version
        cs = self.cluster_size = 1 << cluster_bits
        self.cluster_bits = cluster_bits
        incompat = compat = autoclear = 0
        refcount_order, header_len, compression = 4, 72, COMPRESSION_DEFLATE
        if version == 3:
            incompat, compat, autoclear, refcount_order, header_len = _HEADER3.unpack(
                self._read(72, _HEADER3.size, "the header"))
            if header_len < 104 or header_len % 8 or header_len > cs:
                raise _malformed(path, f"header_length {header_len} is invalid")
            if header_len > 104:
                compression = self._read(104, 1, "the header")[0]
        head = self._read(0, min(cs, self.file_size), "the header cluster")
        unknown = incompat & ~INCOMPAT_KNOWN
        if unknown:
            names = self._feature_names(head, header_len, version)
            bits = [names.get(b, f"bit {b}") for b in range(64) if unknown >> b & 1]
            raise errors.ImageUnsupported(f"({path}: unknown incompatible qcow2 features: {', '.join(bits)})")
        if incompat & INCOMPAT_CORRUPT:
            raise _malformed(path, "QEMU marked the image corrupt; 'qemu-img check -r all' may repair it")
        if incompat & INCOMPAT_DIRTY and not policy.allow_dirty:
            raise errors.ImageInUse(f"({path}: the qcow2 dirty bit is set)")
        if crypt == 1 or crypt == 2:
            raise errors.ImageUnsupported(f"({path}: the image is encrypted ({'AES' if crypt == 1 else 'LUKS'}); "
                                          "blocksnap has no key: snapshot the decrypted disk instead)")
        if crypt:
            raise errors.ImageUnsupported(f"({path}: unknown encryption method {crypt})")
        if refcount_order > 6:
            raise _malformed(path, f"refcount_order {refcount_order} is out of range (0..6)")
        if incompat & INCOMPAT_COMPRESSION:
            if header_len <= 104 or compression == COMPRESSION_DEFLATE:
                raise _malformed(path, "the compression type bit is set without a compression type")
            if compression != COMPRESSION_ZSTD:
                raise errors.ImageUnsupported(f"({path}: unknown compression type {compression})")
        elif compression != COMPRESSION_DEFLATE:
            raise _malformed(path, f"compression type {compression} without the compression type bit")
        self.compression = compression
        self.extended_l2 = bool(incompat & INCOMPAT_EXTL2)
        if self.extended_l2 and cluster_bits < 14:
            raise _malformed(path, "extended L2 entries need clusters of 16 KiB or more")
        # QEMU counts a qcow2's virtual disk in whole 512-byte sectors (qcow2_do_open: total_sectors =
        # size / BDRV_SECTOR_SIZE): a tail past the last whole sector is not part of the guest view.
        self.size = size // 512 * 512
        entry = 16 if self.extended_l2 else 8
        self.l2_entries = cs // entry
        self.sub_size = cs // 32 if self.extended_l2 else cs
        span = cs * self.l2_entries  # guest bytes one L2 table maps
        need = -(-size // span)
        if l1_size > MAX_L1_BYTES // 8:
            raise _malformed(path, f"l1_size {l1_size} is larger than QEMU allows ({MAX_L1_BYTES // 8})")
        if l1_size < need:
            raise _malformed(path, f"the L1 table ({l1_size} entries) is too small for the virtual size {size}")
        self.l1_off = l1_off
        self._check_table(l1_off, l1_size * 8, "the L1 table")
        if not rt_clusters:
            raise _malformed(path, "the image has no refcount table")
        if rt_clusters * cs > MAX_REFTABLE_BYTES:
            raise _malformed(path, f"the refcount table ({rt_clusters} clusters) is larger than QEMU allows")
        self._check_table(rt_off, rt_clusters * cs, "the refcount table", past_eof_ok=True)
        if nb_snapshots > MAX_SNAPSHOTS:
            raise _malformed(path, f"{nb_snapshots} internal snapshots, more than QEMU allows ({MAX_SNAPSHOTS})")
        if nb_snapshots and snapshots_off % cs:
            raise _malformed(path, "the snapshot table is not cluster aligned")
        # Metadata that data clusters and L2 tables must not overlap: the header cluster, the L1 table, the
        # refcount table. (Refcount blocks are not read: a reader does not need them, and an 8 MiB refcount
        # table would cost a set of a million offsets to check against.)
        self._meta = [(0, cs, "the header"), (l1_off, l1_off + l1_size * 8, "the L1 table"),
                      (rt_off, rt_off + rt_clusters * cs, "the refcount table")]
        ext_end = backing_off if backing_off else cs
        exts = self._extensions(head, header_len if version == 3 else 72, ext_end)
        if len(exts.get(EXT_BACKING_FORMAT, b"")) > MAX_BACKING_NAME:
            raise _malformed(path, "the backing format name is too long")
        if EXT_CRYPTO in exts:
            raise errors.ImageUnsupported(f"({path}: the image carries an encryption header)")
        # The L1 table, and every L2 table it names checked against the metadata.
        raw_l1 = self._read(l1_off, need * 8, "the L1 table") if need else b""
        # Only the entries the virtual size reaches are used (the rest map VM state): an array, 8 bytes each.
        self.l1 = array.array("Q", raw_l1)
        if sys.byteorder == "little":
            self.l1.byteswap()
        l2_offsets = []
        for i, e in _nonzero_entries(raw_l1):
            off = e & OFFSET_MASK
            if not off:
                continue
            if off % cs:
                raise _malformed(path, f"L1 entry {i} names an unaligned L2 table at {off}")
            if off + cs > self.file_size:
                raise _malformed(path, f"L1 entry {i} names an L2 table at {off}, past the end of the file "
                                       f"({self.file_size} bytes)")
            self._check_overlap(off, f"the L2 table of L1 entry {i}")
            l2_offsets.append(off >> cluster_bits)
        l2_offsets.sort()
        self._l2_tables = array.array("Q", l2_offsets)
        del l2_offsets
        # The external data file (guest data at the same offsets of a raw file).
        if incompat & INCOMPAT_DATA_FILE:
            name = exts.get(EXT_DATA_FILE)
            if not name:
                raise errors.ImageUnsupported(f"({path}: the external data file is not named in the image)")
            data_path = self._relative(name)
            real = policy.check(data_path, "the external data file", path)
            _check_kind(real, f"{path}: its data file {data_path}")
            try:
                self.data_fd = _open_ro(real)
            except errors.ImageNotFound:
                raise errors.ImageNotFound(f"({path}: its data file {data_path} does not exist)") from None
            self.data_ident = file_identity(self.data_fd)
            st = os.fstat(self.data_fd)
            self.data_size = os.lseek(self.data_fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size
        elif autoclear & AUTOCLEAR_DATA_FILE_RAW:
            pass  # the bit only means something with a data file; QEMU clears it
        # The backing file, below.
        if backing_off:
            if backing_len > MAX_BACKING_NAME or backing_off + backing_len > cs:
                raise _malformed(path, "the backing file name is too long or lies outside the header cluster")
            name = self._read(backing_off, backing_len, "the backing file name")
            if depth >= MAX_CHAIN:
                raise _malformed(path, f"the backing chain is deeper than {MAX_CHAIN} files")
            bpath = self._relative(name)
            real = policy.check(bpath, "the backing file", path)
            fmt = exts.get(EXT_BACKING_FORMAT)
            fmt = os.fsdecode(fmt) if fmt is not None else None
            self.backing = _open_backing(real, bpath, fmt, policy, depth + 1, seen, path)

    def _check_table(self, off, length, what, past_eof_ok=False):
        if off % self.cluster_size:
            raise _malformed(self.path, f"{what} is not cluster aligned (offset {off})")
        if length and off < self.cluster_size:
            raise _malformed(self.path, f"{what} overlaps the header")
        if length and not past_eof_ok and off + length > self.file_size:
            raise _malformed(self.path, f"{what} at {off}..{off + length} lies past the end of the file "
                                        f"({self.file_size} bytes)")

    def _check_overlap(self, off, what):
        """``off`` (a cluster offset) must not be metadata: header, L1 table, refcount table or blocks."""
        end = off + self.cluster_size
        for s, e, name in self._meta:
            if off < e and s < end:
                raise _malformed(self.path, f"{what} at {off} overlaps {name}")

    def _relative(self, name):
        """A backing or data file name as QEMU resolves it: relative names from the image's directory."""
        name = os.fsdecode(name)
        if "\0" in name or not name:
            raise _malformed(self.path, "an empty or NUL-bearing file name in the header")
        if name.startswith(("json:", "nbd:", "http:", "https:", "ssh:", "iscsi:", "file:")):
            raise errors.ImageUnsupported(f"({self.path}: the backing/data file {name!r} is not a plain file name)")
        return name if os.path.isabs(name) else os.path.join(os.path.dirname(os.path.abspath(self.path)), name)

    def _extensions(self, head, start, end):
        """Header extensions ``{type: data}`` in head[start:end) (docs/interop/qcow2.rst, "Header extensions";
        the area ends at the backing file name or the end of the header cluster, as qcow2_read_extensions
        reads it: an area without an end marker is complete)."""
        out = {}
        off = start
        end = min(end, len(head))
        while off < end:
            if off + 8 > end:
                raise _malformed(self.path, "a header extension runs past the extension area")
            typ, length = struct.unpack_from(">II", head, off)
            if typ == EXT_END:
                return out
            if length > end - off - 8:
                raise _malformed(self.path, f"header extension {typ:#x} is too large")
            out.setdefault(typ, head[off + 8:off + 8 + length])
            off += 8 + (length + 7) // 8 * 8
        return out

    def _feature_names(self, head, header_len, version):
        try:
            table = self._extensions(head, header_len if version == 3 else 72, len(head)).get(EXT_FEATURE_TABLE, b"")
        except errors.ImageMalformed:
            return {}
        names = {}
        for k in range(0, len(table) - 47, 48):
            if table[k] == 0:
                names[table[k + 1]] = table[k + 2:k + 48].rstrip(b"\0").decode("ascii", "replace")
        return names

    # --- the map ------------------------------------------------------------------------------------
    def _l2(self, i):
        """L2 table ``i`` as bytes, or None when the L1 entry is unallocated."""
        off = self.l1[i] & OFFSET_MASK if i < len(self.l1) else 0
        if not off:
            return None
        with self._l2_lock:
            table = self._l2_cache.get(i)
        if table is None:
            table = self._read(off, self.cluster_size, f"the L2 table of L1 entry {i}")
            with self._l2_lock:
                self._l2_cache[i] = table
                while len(self._l2_cache) > L2_CACHE:
                    del self._l2_cache[next(iter(self._l2_cache))]
        return table

    def _runs(self, start, end):
        """``(start, end, state, info)`` runs of the active layer over guest bytes [start, end), in order.

        info: DATA: (fd, host offset of ``start``); COMPRESSED: (host offset, stored length, offset of
        ``start`` in its cluster); UNALLOC and ZERO: None. DATA runs are split where the host offsets
        stop being consecutive, COMPRESSED runs are one cluster each.
        """
        cs, bits = self.cluster_size, self.cluster_bits
        sub = self.sub_size
        ext = self.extended_l2
        per = self.l2_entries
        fd = self.data_fd if self.data_fd is not None else self.fd
        pos = start
        while pos < end:
            c = pos >> bits
            i, j = divmod(c, per)
            table = self._l2(i)
            table_end = min(end, (i + 1) * per * cs)
            if table is None:
                yield pos, table_end, UNALLOC, None
                pos = table_end
                continue
            last_j = (table_end - 1 - i * per * cs) >> bits
            esize = 16 if ext else 8
            # Only the entries that are not all zero are looked at (the C core finds them): an L2 table
            # of a sparse disk costs its few allocated clusters, not its thousands of empty entries.
            lo_b, hi_b = j * esize // 16 * 16, -(-(last_j + 1) * esize // 16) * 16
            nonzero = _native.nonzero_ids(table[lo_b:hi_b])
            if ext:
                todo = [lo_b // 16 + p for p in nonzero]
            else:
                todo = [e for p in nonzero for e in (lo_b // 8 + 2 * p, lo_b // 8 + 2 * p + 1)]
            for jj in todo:
                if jj < j or jj > last_j:
                    continue
                cstart = (i * per + jj) << bits
                lo, hi = max(pos, cstart), min(table_end, cstart + cs)
                if ext:
                    entry, bitmap = struct.unpack_from(">QQ", table, 16 * jj)
                else:
                    entry, bitmap = struct.unpack_from(">Q", table, 8 * jj)[0], None
                if not entry and not bitmap:
                    continue  # the other half of a pair
                if lo > pos:
                    yield pos, lo, UNALLOC, None
                yield from self._cluster(entry, bitmap, i * per + jj, cstart, lo, hi, fd, sub)
                pos = hi
            if pos < table_end:
                yield pos, table_end, UNALLOC, None
            pos = table_end

    def _cluster(self, entry, bitmap, c, cstart, lo, hi, fd, sub):
        """The runs of one guest cluster (qcow2_get_cluster_type / qcow2_get_subcluster_type)."""
        cs = self.cluster_size
        if entry & OFLAG_COMPRESSED:
            if self.data_fd is not None:
                raise _malformed(self.path, f"guest cluster {c} is compressed in an image with an external "
                                            "data file")
            shift = 62 - (self.cluster_bits - 8)
            host = entry & ((1 << shift) - 1)
            sectors = ((entry >> shift) & ((1 << (self.cluster_bits - 8)) - 1)) + 1
            # QEMU reads this many bytes and stops decoding when the cluster is full; a count larger than a
            # compressed cluster can be (one cluster and a sector) reads nothing more that matters.
            stored = min(sectors * 512 - (host & 511), _native.EXT_MAX_STORED, self.cluster_size + 4096)
            if host >= self.file_size:
                raise _malformed(self.path, f"the compressed data of guest cluster {c} starts at {host}, past the "
                                            f"end of the file ({self.file_size} bytes)")
            if host < cs:
                raise _malformed(self.path, f"the compressed data of guest cluster {c} overlaps the header")
            yield lo, hi, COMPRESSED, (host, stored, lo - cstart)
            return
        off = entry & OFFSET_MASK
        if bitmap is None:
            if entry & OFLAG_ZERO:  # v3 zero cluster, preallocated (ZERO_ALLOC) or not (ZERO_PLAIN)
                if self.version < 3:  # qcow2_get_host_offset: "Zero cluster entry found in pre-v3 image"
                    raise _malformed(self.path, f"guest cluster {c} is a zero cluster in a version 2 image")
                yield lo, hi, ZERO, None
                return
            if not off and not (self.data_fd is not None and entry & OFLAG_COPIED):
                yield lo, hi, UNALLOC, None
                return
            self._check_data(off, c)
            yield lo, hi, DATA, (fd, off + (lo - cstart))
            return
        alloc, zero = bitmap & 0xFFFFFFFF, bitmap >> 32
        if alloc & zero:
            raise _malformed(self.path, f"guest cluster {c}: subclusters marked both allocated and zero")
        allocated = bool(off) or (self.data_fd is not None and entry & OFLAG_COPIED)
        if not allocated and alloc:
            raise _malformed(self.path, f"guest cluster {c}: allocated subclusters in an unallocated cluster")
        if allocated:
            self._check_data(off, c)
        if not alloc and not zero:
            yield lo, hi, UNALLOC, None
            return
        if alloc == 0xFFFFFFFF:
            yield lo, hi, DATA, (fd, off + (lo - cstart))
            return
        first, last = (lo - cstart) // sub, (hi - 1 - cstart) // sub
        for s in range(first, last + 1):
            a, b = max(lo, cstart + s * sub), min(hi, cstart + (s + 1) * sub)
            if alloc >> s & 1:
                yield a, b, DATA, (fd, off + (a - cstart))
            elif zero >> s & 1:
                yield a, b, ZERO, None
            else:
                yield a, b, UNALLOC, None

    def _check_data(self, off, c):
        if off % self.cluster_size:
            raise _malformed(self.path, f"guest cluster {c} maps to an unaligned host offset {off}")
        if self.data_fd is not None:
            # qcow2_get_host_offset: with an external data file, guest and host offsets are the same.
            if off != c << self.cluster_bits:
                raise _malformed(self.path, f"guest cluster {c} maps to {off} of the external data file; it "
                                            f"must map to {c << self.cluster_bits}")
            if off >= self.data_size:
                raise _malformed(self.path, f"guest cluster {c} maps to {off}, past the end of the data file")
            return
        if off >= self.file_size:
            raise _malformed(self.path, f"guest cluster {c} maps to {off}, past the end of the file "
                                        f"({self.file_size} bytes)")
        if off < self.cluster_size:
            raise _malformed(self.path, f"guest cluster {c} maps to the header")
        cl = off >> self.cluster_bits
        if _member(self._l2_tables, cl):
            raise _malformed(self.path, f"guest cluster {c} maps to an L2 table at {off}")
        for s, e, name in self._meta[1:]:
            if off < e and s < off + self.cluster_size:
                raise _malformed(self.path, f"guest cluster {c} maps to {name} at {off}")

    def extents(self, start, length, out=None):
        """Extents (bs_scan_extents tuples) of guest bytes [start, start+length)."""
        out = _Extents() if out is None else out
        end = start + length
        cs = self.cluster_size
        kind = _native.EXT_ZSTD if self.compression == COMPRESSION_ZSTD else _native.EXT_DEFLATE
        mine_end = min(end, self.size)
        for a, b, state, info in self._runs(start, mine_end):
            if state == DATA:
                out.add(b - a, info[1], info[0], _native.EXT_DATA)
            elif state == COMPRESSED:
                host, stored, skip = info
                out.add(b - a, host, self.fd, kind, stored, cs, skip)
            elif state == UNALLOC and self.backing is not None:
                _below(self.backing, a, b, out)
            else:
                out.add(b - a, 0, -1, _native.EXT_ZERO)
        if end > mine_end:
            out.add(end - mine_end, 0, -1, _native.EXT_ZERO)
        return out.out

    def data_ranges(self, start=0, end=None):
        """Guest ranges ``(start, end)`` that may hold data, ascending; what lies between them reads as
        zeros. Unallocated L1 entries are skipped whole, without reading."""
        end = self.size if end is None else min(end, self.size)
        run = None
        for a, b, state, _ in self._runs(start, end):
            if state in (DATA, COMPRESSED):
                parts = [(a, b)]
            elif state == UNALLOC and self.backing is not None and a < self.backing.size:
                parts = list(self.backing.data_ranges(a, min(b, self.backing.size)))
            else:
                parts = []
            for p in parts:
                if run is not None and p[0] <= run[1]:
                    run = (run[0], max(run[1], p[1]))
                    continue
                if run is not None:
                    yield run
                run = p
        if run is not None:
            yield run

    # --- point in time --------------------------------------------------------------------------------
    def files(self):
        """Every open file of the chain: ``(path, fd, identity when opened)``."""
        out = [(self.path, self.fd, self.ident)]
        if self.data_fd is not None:
            out.append((self.path + " (data file)", self.data_fd, self.data_ident))
        if self.backing is not None:
            out += self.backing.files()
        return out

    def close(self):
        if self.backing is not None:
            self.backing.close()
            self.backing = None
        for name in ("data_fd", "fd"):
            fd = getattr(self, name, None)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)


def _below(backing, a, b, out):
    """The extents of [a, b) read from a backing image: past its end, zeros."""
    if a < backing.size:
        backing.extents(a, min(b, backing.size) - a, out)
    if b > backing.size:
        out.add(b - max(a, backing.size), 0, -1, _native.EXT_ZERO)


class RawBacking:
    """A raw file at the bottom of a chain: guest offset = file offset, holes not read."""

    format = "raw"

    def __init__(self, path, fd):
        self.path = path
        self.fd = fd
        self.ident = file_identity(fd)
        st = os.fstat(fd)
        self.size = os.lseek(fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size

    def extents(self, start, length, out):
        out.add(length, start, self.fd, _native.EXT_RAW)
        return out.out

    def data_ranges(self, start, end):
        from .raw import seek_data_ranges
        return seek_data_ranges(self.fd, start, end)

    def files(self):
        return [(self.path, self.fd, self.ident)]

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def file_identity(fd):
    """What must not change while a file is read: for a file its inode, size, mtime and ctime; for a block
    device its number and size."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return (st.st_rdev, os.lseek(fd, 0, os.SEEK_END))
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _check_kind(real, what):
    """A backing or data file must be a regular file or a block device: refused before it is opened (opening
    some character devices has effects of its own)."""
    try:
        st = os.stat(real)
    except FileNotFoundError:
        return  # the open says so
    except OSError as exc:
        raise errors.translate(exc, real, op="read-image") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise errors.ImageUnsupported(f"({what} is not a regular file or block device)")


def _nonzero_entries(raw):
    """``(index, value)`` of the big-endian 8-byte entries of ``raw`` that are not zero, in order (the C core
    finds them)."""
    raw = raw[:len(raw) // 8 * 8]
    padded = raw if len(raw) % 16 == 0 else raw + bytes(8)
    for p in _native.nonzero_ids(padded):
        for k in (2 * p, 2 * p + 1):
            if 8 * k < len(raw):
                e = struct.unpack_from(">Q", raw, 8 * k)[0]
                if e:
                    yield k, e


def _member(arr, value):
    i = bisect.bisect_left(arr, value)
    return i < len(arr) and arr[i] == value


def _open_ro(path):
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise errors.translate(exc, path, op="read-image") from None


def _open_backing(real, shown, fmt, policy, depth, seen, top):
    """Open a backing file as the format its image names (probing the header, as QEMU does, when it names none:
    formats blocksnap does not read are refused, never read as raw)."""
    _check_kind(real, f"{top}: its backing file {shown}")
    try:
        fd = _open_ro(real)
    except errors.ImageNotFound:
        raise errors.ImageNotFound(f"({top}: its backing file {shown} does not exist)") from None
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise errors.ImageUnsupported(f"({top}: its backing file {shown} is not a file or block device)")
        if fmt is None:
            try:
                fmt = probe.format_of(os.pread(fd, probe.HEAD_BYTES, 0))
            except OSError as exc:
                raise errors.translate(exc, shown, op="read-image") from None
        if fmt == "qcow2":
            return Qcow2Image(shown, policy, depth, seen, fd=fd)
        if fmt == "raw":
            key = (st.st_dev, st.st_ino)
            if key in seen:
                raise _malformed(top, "the backing chain loops")
            return RawBacking(shown, fd)
        raise errors.ImageUnsupported(f"({top}: its backing file {shown} is in format {fmt!r}; raw and qcow2 "
                                      "backing files are supported)")
    except BaseException:
        if fmt != "qcow2":
            os.close(fd)
        raise
