"""Writing qcow2 version 3 images: the qcow2 sink of restore.

Reference: QEMU ``docs/interop/qcow2.rst``, sections "Header" (version 3, 104-byte header, or 112 bytes
with "Additional fields" when ``compression_type`` is zstd), "Header extensions" (only the end marker),
"Host cluster management" (refcount table and blocks, refcount_order 4), "Cluster mapping" (L1/L2 tables,
standard and compressed cluster descriptors). Compressed clusters are packed byte-wise and their
descriptor's sector count computed as ``qcow2_alloc_compressed_cluster_offset`` / ``qcow2_alloc_bytes``
in QEMU's ``block/qcow2-cluster.c`` and ``block/qcow2-refcount.c`` do; every host cluster a compressed
cluster touches is counted once for it, as ``qemu-img check`` counts them.

Layout (host clusters, in file order)::

    0                 header (written last, by finish(); zeroed when the writer is made)
    1 .. L            L1 table (L clusters, from virtual_size; 0 clusters for an empty disk)
    L+1 ..            data clusters in the order they were placed: place() takes consecutive clusters,
                      place_compressed() packs frames byte after byte into clusters taken at the end
    then              L2 tables, one per L1 entry in use, in guest order   \\
    then              refcount table                                         > written by finish()
    then              refcount blocks covering every cluster up to the end  /

Every host cluster of the file is in use (refcount >= 1), so the refcount blocks are all ones but for
clusters holding compressed data. Only the L2 tables that have a placed cluster are kept in memory (one
cluster each), so a huge sparse disk costs little.
"""
import os
import stat
import struct
import sys
import threading
from array import array

from .. import errors

MAGIC = b"QFI\xfb"
VERSION = 3
REFCOUNT_ORDER = 4                  # 16-bit refcounts
HEADER_LENGTH = 104                 # version 3 fields up to header_length
HEADER_LENGTH_ZSTD = 112            # + compression_type (byte 104) and padding to a multiple of 8
INCOMPAT_COMPRESSION = 1 << 3       # "Compression type bit"
COMPRESSION_ZSTD = 1
MIN_CLUSTER_BITS = 9                # 512 B
MAX_CLUSTER_BITS = 21               # 2 MiB: QEMU's implementation limit
MAX_L1_BYTES = 32 << 20             # QEMU's QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 << 20        # QEMU's QCOW_MAX_REFTABLE_SIZE
OFLAG_COPIED = 1 << 63              # refcount is exactly one
OFLAG_COMPRESSED = 1 << 62
HOST_OFFSET_LIMIT = 1 << 56         # bits 9-55 of standard descriptors and L1 entries
SECTOR = 512                        # compressed sizes are counted in 512-byte sectors, whatever the cluster size
L1_WRITE_ENTRIES = 1 << 16          # the L1 table is written in pieces of this many entries

# "QFI\xfb", version, backing_file_offset, backing_file_size, cluster_bits, size, crypt_method, l1_size,
# l1_table_offset, refcount_table_offset, refcount_table_clusters, nb_snapshots, snapshots_offset,
# incompatible, compatible, autoclear features, refcount_order, header_length
_HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQII")
_BIG_ENDIAN_HOST = sys.byteorder == "big"


class Qcow2Writer:
    """Lays out a sparse qcow2 v3 image on ``fd`` while the caller writes the guest data.

    Args:
        fd: an open, writable file descriptor (a new or existing file, or a block device); the writer
            never closes it. Metadata is written with ``os.pwrite``.
        virtual_size: guest size in bytes (need not be a multiple of the cluster size).
        cluster_size: a power of two from 512 B to 2 MiB.
        compress: allow ``place_compressed`` (the image then records zstd as its compression type).

    ``place`` and ``place_compressed`` hand out host offsets; the caller writes there from any thread.
    ``finish`` writes the tables and the header once all those writes are done. Clusters never placed
    are unallocated and read as zeros.

    The header's size field is ``virtual_size`` rounded up to 512 bytes, as ``qemu-img create`` and
    ``qemu-img convert`` round it: QEMU opens a qcow2 image as ``size // 512`` sectors, so an unaligned
    size would cut the last bytes of the disk off (a raw file of that size reads, in QEMU, as the
    rounded-up size with zeros at the end, which is what the image then holds).

    Raises:
        RestoreFailed: a cluster size that is not a power of two in range, a negative virtual size, or
            one too big for QEMU's table size limits at this cluster size.
    """

    def __init__(self, fd, virtual_size, cluster_size=65536, compress=False):
        if (not isinstance(cluster_size, int) or cluster_size <= 0 or cluster_size & (cluster_size - 1)
                or not MIN_CLUSTER_BITS <= cluster_size.bit_length() - 1 <= MAX_CLUSTER_BITS):
            raise errors.RestoreFailed(f"(qcow2 cluster size {cluster_size!r}: must be a power of two from "
                                       f"512 B to 2 MiB)")
        if not isinstance(virtual_size, int) or virtual_size < 0:
            raise errors.RestoreFailed(f"(qcow2 virtual size {virtual_size!r}: must be a byte count >= 0)")
        self.fd = fd
        self.virtual_size = virtual_size
        self.cluster_size = cluster_size
        self.compress = bool(compress)
        self._bits = cluster_size.bit_length() - 1
        self._l2_entries = cluster_size // 8
        self._rb_entries = cluster_size * 8 >> REFCOUNT_ORDER
        self._guest_clusters = -(-virtual_size // cluster_size)
        self.l1_size = -(-self._guest_clusters // self._l2_entries)
        if self.l1_size * 8 > MAX_L1_BYTES:
            raise errors.RestoreFailed(f"(a qcow2 image of {virtual_size} bytes needs an L1 table larger than "
                                       f"QEMU's 32 MiB limit at {cluster_size}-byte clusters; use bigger clusters)")
        self._l1_clusters = -(-self.l1_size * 8 // cluster_size)
        # Compressed descriptor: offset in bits 0..x-1, additional sectors in bits x..61, x = 62 - (bits - 8).
        self._csize_shift = 62 - (self._bits - 8)
        self._csize_mask = (1 << (self._bits - 8)) - 1
        # Worst case: every guest cluster placed, each in its own host cluster (a compressed one never
        # takes more than one new cluster). The refcount table must still fit QEMU's limit.
        worst = 1 + self._l1_clusters + self._guest_clusters + self.l1_size
        if self._refcount_layout(worst)[0] * cluster_size > MAX_REFTABLE_BYTES:
            raise errors.RestoreFailed(f"(a qcow2 image of {virtual_size} bytes can need a refcount table larger "
                                       f"than QEMU's 8 MiB limit at {cluster_size}-byte clusters; use bigger "
                                       f"clusters)")
        self._lock = threading.Lock()
        self._next = 1 + self._l1_clusters      # next free host cluster
        self._l2 = {}                           # L1 index -> array('Q') of L2 entries (host byte order)
        self._refblocks = {}                    # refcount block index -> array('H'), only where compressed
                                                # frames made a refcount other than one
        self._cpos = 0                          # next free byte after the last compressed frame
        self._cend = 0                          # end of the clusters taken for compressed data (bytes)
        self._finished = False
        # Until finish() writes the header the file must not look like a qcow2 image (nor like the
        # image it may replace).
        os.pwrite(fd, bytes(SECTOR), 0)

    # --- allocation ---------------------------------------------------------------------------------
    def place(self, guest_off, nbytes):
        """Allocate consecutive host clusters for the guest clusters of ``guest_off .. guest_off+nbytes``.

        Args:
            guest_off: cluster-aligned guest offset.
            nbytes: a multiple of the cluster size, or shorter at the end of the disk (the last cluster is
                cut by ``virtual_size`` in the guest; on the host it is still a whole cluster).

        Returns:
            the host offset where the caller writes those ``nbytes`` (clusters follow each other).

        Raises:
            RestoreFailed: unaligned or out-of-range arguments, a cluster placed before, or after finish().
        """
        cs = self.cluster_size
        with self._lock:
            self._check_open()
            if not isinstance(guest_off, int) or not isinstance(nbytes, int) or nbytes <= 0 or guest_off < 0:
                raise errors.RestoreFailed(f"(qcow2 place({guest_off!r}, {nbytes!r}): offset and a positive "
                                           f"length in bytes expected)")
            if guest_off % cs or (nbytes % cs and guest_off + nbytes != self.virtual_size):
                raise errors.RestoreFailed(f"(qcow2 place({guest_off}, {nbytes}): not aligned to the "
                                           f"{cs}-byte clusters)")
            if guest_off + nbytes > self._guest_clusters * cs:
                raise errors.RestoreFailed(f"(qcow2 place({guest_off}, {nbytes}): past the end of the "
                                           f"{self.virtual_size}-byte disk)")
            first = guest_off >> self._bits
            count = -(-nbytes // cs)
            host = self._next * cs
            if (self._next + count) * cs > HOST_OFFSET_LIMIT:
                raise errors.RestoreFailed("(qcow2 image would pass the 64 PiB host offset limit)")
            l1_index, lo = divmod(first, self._l2_entries)
            if lo + count <= self._l2_entries:
                pieces = ((l1_index, lo, lo + count),)      # the common case: one L2 table
            else:
                pieces = list(self._l2_pieces(first, count))
            for l1_index, lo, hi in pieces:
                table = self._l2.get(l1_index)
                if table is not None and (table[lo] if hi - lo == 1 else any(table[lo:hi])):
                    raise errors.RestoreFailed(f"(qcow2 place({guest_off}, {nbytes}): a cluster in that range "
                                               f"was placed before)")
            entry = host | OFLAG_COPIED
            for l1_index, lo, hi in pieces:
                table = self._l2.get(l1_index)
                if table is None:
                    table = self._l2[l1_index] = array("Q", bytes(cs))
                if hi - lo == 1:
                    table[lo] = entry
                else:
                    table[lo:hi] = array("Q", range(entry, entry + (hi - lo) * cs, cs))
                entry += (hi - lo) * cs
            self._next += count
            return host

    def place_compressed(self, guest_off, stored_len):
        """Allocate room for one compressed cluster: a zstd frame of ``stored_len`` bytes.

        The frame must decompress to exactly one whole cluster (``cluster_size`` bytes, zero-padded for
        the last cluster of a disk cut by ``virtual_size``): QEMU decodes until it has a full cluster and
        fails if the frame is then not complete. Frames are packed byte after byte, so several can share
        a host cluster and one can run into the next cluster.

        Args:
            guest_off: cluster-aligned guest offset.
            stored_len: the frame's length, 1 .. cluster_size - 1.

        Returns:
            the host byte offset (not aligned) where the caller writes the frame.

        Raises:
            RestoreFailed: compress=False, unaligned or out-of-range arguments, a cluster placed before,
                or after finish().
        """
        cs = self.cluster_size
        with self._lock:
            self._check_open()
            if not self.compress:
                raise errors.RestoreFailed("(qcow2 place_compressed: the writer was made with compress=False)")
            if not isinstance(guest_off, int) or not isinstance(stored_len, int):
                raise errors.RestoreFailed(f"(qcow2 place_compressed({guest_off!r}, {stored_len!r}): byte "
                                           f"counts expected)")
            if not 0 < stored_len < cs:
                raise errors.RestoreFailed(f"(qcow2 place_compressed({guest_off}, {stored_len}): a compressed "
                                           f"cluster holds 1 to {cs - 1} bytes; store it uncompressed)")
            if guest_off < 0 or guest_off % cs or guest_off >= self._guest_clusters * cs:
                raise errors.RestoreFailed(f"(qcow2 place_compressed({guest_off}, {stored_len}): not the start "
                                           f"of a cluster of the {self.virtual_size}-byte disk)")
            index = guest_off >> self._bits
            table = self._l2.get(index // self._l2_entries)
            if table is not None and table[index % self._l2_entries]:
                raise errors.RestoreFailed(f"(qcow2 place_compressed({guest_off}, {stored_len}): that cluster "
                                           f"was placed before)")
            # As qcow2_alloc_bytes: go on after the previous frame if its clusters are still the last ones
            # of the file (taking the clusters the frame runs into), else start a new cluster.
            if self._cend == self._next * cs and self._cpos < self._cend:
                host = self._cpos
            else:
                host = self._next * cs
            end = host + stored_len
            if end > (1 << self._csize_shift) or end > HOST_OFFSET_LIMIT:
                raise errors.RestoreFailed(f"(qcow2 compressed cluster at host offset {host}: past the offset "
                                           f"limit of {cs}-byte clusters)")
            new_end = max(self._next, -(-end // cs))
            for c in range(host >> self._bits, (end - 1 >> self._bits) + 1):
                self._count_compressed(c, fresh=c >= self._next)
            self._next = new_end
            self._cend = new_end * cs
            self._cpos = end
            sectors = (end - 1) // SECTOR - host // SECTOR  # additional 512-byte sectors
            if table is None:
                table = self._l2[index // self._l2_entries] = array("Q", bytes(cs))
            table[index % self._l2_entries] = OFLAG_COMPRESSED | sectors << self._csize_shift | host
            return host

    def _l2_pieces(self, first, count):
        """``(l1_index, lo, hi)`` for each L2 table that guest clusters ``first .. first+count`` touch."""
        n = self._l2_entries
        index = first
        stop = first + count
        while index < stop:
            lo = index % n
            hi = min(n, lo + stop - index)
            yield index // n, lo, hi
            index += hi - lo

    def _count_compressed(self, cluster, fresh):
        """One more compressed cluster touches host ``cluster`` (``fresh``: it was just taken)."""
        b, i = divmod(cluster, self._rb_entries)
        block = self._refblocks.get(b)
        if block is None:
            block = self._refblocks[b] = array("H", [1]) * self._rb_entries
        if fresh:
            block[i] = 1
        elif block[i] == 0xFFFF:
            raise errors.RestoreFailed(f"(qcow2 host cluster {cluster}: more compressed clusters than a 16-bit "
                                       f"refcount counts)")
        else:
            block[i] += 1

    def _check_open(self):
        if self._finished:
            raise errors.RestoreFailed("(qcow2 writer: already finished)")

    # --- finish -------------------------------------------------------------------------------------
    def _refcount_layout(self, data_clusters):
        """``(table_clusters, blocks)`` that cover ``data_clusters`` clusters plus the refcount table and
        blocks themselves: the least fixpoint of blocks = ceil(all / entries), table = ceil(blocks * 8 / cs)."""
        table = blocks = 0
        while True:
            need_blocks = -(-(data_clusters + table + blocks) // self._rb_entries)
            need_table = -(-need_blocks * 8 // self.cluster_size)
            if (need_blocks, need_table) == (blocks, table):
                return table, blocks
            blocks, table = need_blocks, need_table

    def finish(self):
        """Write the L2 tables, the L1 table, the refcount table and blocks, then the header.

        Call once, after every write to the offsets handed out has returned. A regular file is then cut
        (or extended) to the image's end. The fd stays open; syncing it is the caller's business.

        Raises:
            RestoreFailed: called twice. OSError from the writes.
        """
        with self._lock:
            self._check_open()
            self._finished = True
            cs = self.cluster_size
            fd = self.fd
            # L2 tables, in guest order.
            l1 = {}
            out = _Run(fd, self._next * cs)
            for l1_index in sorted(self._l2):
                l1[l1_index] = self._next * cs | OFLAG_COPIED
                self._next += 1
                out.add(_be(self._l2[l1_index]))
            out.flush()
            # Refcount table and blocks.
            table_clusters, blocks = self._refcount_layout(self._next)
            table_off = self._next * cs
            blocks_off = table_off + table_clusters * cs
            total = self._next + table_clusters + blocks
            reftable = array("Q", bytes(table_clusters * cs))
            reftable[:blocks] = array("Q", range(blocks_off, blocks_off + blocks * cs, cs))
            out = _Run(fd, table_off)
            out.add(_be(reftable))
            ones = _be(array("H", [1]) * self._rb_entries)
            for b in range(blocks):
                first = b * self._rb_entries
                block = self._refblocks.get(b)
                if total - first < self._rb_entries:
                    if block is None:
                        block = array("H", [1]) * self._rb_entries
                    block = block[:total - first] + array("H", bytes(2 * (self._rb_entries - (total - first))))
                out.add(ones if block is None else _be(block))
            out.flush()
            # L1 table, whole: the file may hold older bytes there.
            used = sorted(l1)
            u = 0
            for start in range(0, self.l1_size, L1_WRITE_ENTRIES):
                part = array("Q", bytes(8 * min(L1_WRITE_ENTRIES, self.l1_size - start)))
                while u < len(used) and used[u] < start + len(part):
                    part[used[u] - start] = l1[used[u]]
                    u += 1
                _pwrite_all(fd, _be(part), cs + 8 * start)
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.ftruncate(fd, total * cs)
            _pwrite_all(fd, self._header(table_off, table_clusters), 0)

    def _header(self, table_off, table_clusters):
        """The header, padding and the end-of-extensions marker (type 0, length 0)."""
        length = HEADER_LENGTH_ZSTD if self.compress else HEADER_LENGTH
        incompatible = INCOMPAT_COMPRESSION if self.compress else 0
        l1_off = self.cluster_size if self.l1_size else 0
        size = -(-self.virtual_size // SECTOR) * SECTOR
        head = _HEADER.pack(MAGIC, VERSION, 0, 0, self._bits, size, 0, self.l1_size, l1_off,
                            table_off, table_clusters, 0, 0, incompatible, 0, 0, REFCOUNT_ORDER, length)
        if self.compress:
            head += bytes([COMPRESSION_ZSTD]) + bytes(7)
        return head + bytes(8)


def _be(arr):
    """The bytes of an array of integers in big-endian order."""
    if not _BIG_ENDIAN_HOST:
        arr = array(arr.typecode, arr)
        arr.byteswap()
    return arr.tobytes()


class _Run:
    """Consecutive writes from ``offset`` on, gathered into pwrites of about 1 MiB."""

    def __init__(self, fd, offset):
        self.fd, self.offset, self.parts, self.size = fd, offset, [], 0

    def add(self, data):
        self.parts.append(data)
        self.size += len(data)
        if self.size >= 1 << 20:
            self.flush()

    def flush(self):
        if self.parts:
            _pwrite_all(self.fd, b"".join(self.parts), self.offset)
            self.offset += self.size
            self.parts, self.size = [], 0


def _pwrite_all(fd, data, offset):
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view = view[done:]
        offset += done
