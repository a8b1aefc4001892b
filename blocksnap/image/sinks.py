"""Restore sinks: where a restored guest disk goes, behind one small interface (the way out of image/).

A sink takes batches of chunks to restore, each ``(pack_fd, record_offset, stored_len, raw_len, codec,
kind, id, guest_offset)``, and a thread's ``_native.Restorer``; ``write(restorer, items)`` may be called
from several threads at once. ``finish()`` completes the output once every batch is written.

    RawSink    a raw file or block device: the C core writes each checked chunk at its guest offset
               (bs_restore_chunks); a new file keeps holes for zero blocks.
    Qcow2Sink  a new qcow2 v3 file (qcow2_out.Qcow2Writer lays it out): chunks are checked and decoded
               into memory (bs_restore_to_memory), clusters that hold only zeros are left unallocated,
               the others written uncompressed or, with ``compress``, as zstd compressed clusters where
               zstd shrinks them (bs_encode_chunks).
"""
import os
import threading

from .. import _native
from .qcow2_out import Qcow2Writer

SPARSE_BLOCK = 4096
QCOW2_CLUSTER = 64 << 10
ZSTD_LEVEL = 3
INCOMPRESSIBLE_MILLIBITS = 7900  # clusters that sample as random are stored as they are


def _pwrite_all(fd, data, offset):
    """Write all of ``data`` at ``offset``: a short write (a full disk part way, FUSE, NFS) goes on from where it
    stopped, and one that writes nothing is ENOSPC; never a cluster left half written."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(28, os.strerror(28))  # ENOSPC
        view = view[n:]
        offset += n


class RawSink:
    def __init__(self, fd, fresh):
        self.fd = fd
        self.fresh = fresh

    def write(self, restorer, items):
        # One C call reads, checks, decodes, verifies and writes the whole batch without the GIL. A fresh
        # file keeps holes for zero blocks inside chunks too; in place, every byte is written.
        restorer.restore(items, self.fd, SPARSE_BLOCK if self.fresh else 0)

    def finish(self):
        pass


class Qcow2Sink:
    """A qcow2 image of ``size`` guest bytes on ``fd`` (a new, empty file), from chunks of ``chunk_size``."""

    fresh = True

    def __init__(self, fd, size, chunk_size, compress=False):
        self.fd = fd
        self.chunk_size = chunk_size
        self.cluster = min(QCOW2_CLUSTER, chunk_size)
        self.compress = compress
        self.writer = Qcow2Writer(fd, size, cluster_size=self.cluster, compress=compress)
        self._lock = threading.Lock()  # the writer's layout is decided by one thread at a time
        self._tls = threading.local()

    def _buffers(self, n):
        tls = self._tls
        if getattr(tls, "buf", None) is None or len(tls.buf) < n * self.chunk_size:
            tls.buf = bytearray(n * self.chunk_size)
            if self.compress:
                tls.codec = _native.Codec(ZSTD_LEVEL)
        return tls.buf

    def write(self, restorer, items):
        cs, ccs = self.chunk_size, self.cluster
        buf = self._buffers(len(items))
        restorer.restore_to_memory([it[:7] + (k * cs,) for k, it in enumerate(items)], buf)
        view = memoryview(buf)
        for k, it in enumerate(items):
            guest, length = it[7], it[3]
            base = k * cs
            clusters = [c for c in range(-(-length // ccs))
                        if not _native.is_zero(view[base + c * ccs:base + min(length, (c + 1) * ccs)])]
            if not clusters:
                continue
            if self.compress:
                self._write_compressed(view, base, guest, length, clusters)
                continue
            # Runs of consecutive data clusters go to consecutive host clusters: one write each.
            run = [clusters[0]]
            for c in clusters[1:] + [None]:
                if c is not None and c == run[-1] + 1:
                    run.append(c)
                    continue
                a, b = run[0] * ccs, min(length, (run[-1] + 1) * ccs)
                with self._lock:
                    host = self.writer.place(guest + a, len(run) * ccs)
                _pwrite_all(self.fd, view[base + a:base + b], host)
                run = [c] if c is not None else []

    def _write_compressed(self, view, base, guest, length, clusters):
        ccs = self.cluster
        codec = self._tls.codec
        chunk = view[base:base + length]
        # A compressed cluster must decode to a whole cluster (QEMU fails the read otherwise): the disk's
        # last cluster, cut short by its size, is stored as it is.
        whole = [c for c in clusters if (c + 1) * ccs <= length]
        codecs, lens = codec.encode_chunks(chunk, length, ccs, whole, INCOMPRESSIBLE_MILLIBITS)
        encoded = dict(zip(whole, zip(codecs, lens)))
        for c in clusters:
            kind, n = encoded.get(c, (_native.CODEC_RAW, 0))
            off = c * ccs
            if kind == _native.CODEC_ZSTD and n < ccs:
                with self._lock:
                    host = self.writer.place_compressed(guest + off, n)
                _pwrite_all(self.fd, chunk[off:off + n], host)
            else:
                with self._lock:
                    host = self.writer.place(guest + off, ccs)
                _pwrite_all(self.fd, chunk[off:min(length, off + ccs)], host)

    def finish(self):
        self.writer.finish()
