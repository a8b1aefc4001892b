/*
 * bs_scan_extents: the scan of one window of a guest disk that an image
 * source described as extents (blocksnap/image/: raw files, block devices,
 * qcow2). Each extent says where its guest bytes come from: a range of some
 * file (read, or read around its holes), zeros (never read), or a compressed
 * qcow2 cluster (read and decoded here: raw deflate as QEMU's
 * qcow2_zlib_decompress, zstd as qcow2_zstd_decompress, block/qcow2-threads.c).
 * The filled window is then classified and hashed like any other (bs_classify).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>
#include <zlib.h>
#include <zstd.h>

#include "blocksnap.h"

struct bs_xctx {
    ZSTD_DCtx *zstd;
    z_stream zlib;
    int zlib_ready;
    uint8_t *stored; /* one compressed cluster as read: up to BS_EXT_MAX_STORED bytes */
    uint8_t *cluster; /* one decoded cluster: up to BS_EXT_MAX_CLUSTER bytes */
    /* The last decoded cluster, so a cluster that spans two windows (or two chunks' extents) is
     * decoded once. */
    int last_fd;
    uint64_t last_off;
    uint32_t last_stored, last_len;
    uint8_t last_kind;
};

bs_xctx *bs_xctx_new(void)
{
    bs_xctx *x = calloc(1, sizeof(*x));
    if (!x)
        return NULL;
    x->zstd = ZSTD_createDCtx();
    x->stored = malloc(BS_EXT_MAX_STORED);
    x->cluster = malloc(BS_EXT_MAX_CLUSTER);
    if (!x->zstd || !x->stored || !x->cluster || inflateInit2(&x->zlib, -12) != Z_OK) {
        ZSTD_freeDCtx(x->zstd);
        free(x->stored);
        free(x->cluster);
        free(x);
        return NULL;
    }
    x->zlib_ready = 1;
    x->last_fd = -1;
    return x;
}

void bs_xctx_free(bs_xctx *x)
{
    if (!x)
        return;
    if (x->zlib_ready)
        inflateEnd(&x->zlib);
    ZSTD_freeDCtx(x->zstd);
    free(x->stored);
    free(x->cluster);
    free(x);
}

/* The chunks of window bytes [start, end) were read: they are no holes. */
static void mark_read(uint8_t *flags, uint64_t start, uint64_t end, uint32_t chunk_size)
{
    uint64_t first = start / chunk_size, last = (end + chunk_size - 1) / chunk_size;
    memset(flags + first, 0, (size_t)(last - first));
}

/* A file range at window byte wpos: data ranges read, holes (SEEK_HOLE) zeroed without reading and
 * left marked as holes. Without pad the file must reach the end of the range (a raw image that shrank
 * is BS_ESHORT); with pad what lies past its end reads as zeros (a qcow2's data clusters). */
static int read_sparse(int fd, uint8_t *dst, uint64_t len, uint64_t off, int *err_out, uint64_t wpos,
                       uint32_t chunk_size, uint8_t *flags, int pad)
{
    struct stat st;
    if (fstat(fd, &st) != 0) {
        *err_out = errno;
        return BS_EIO;
    }
    uint64_t end = off + len;
    if (!pad && S_ISREG(st.st_mode) && (uint64_t)st.st_size < end)
        return BS_ESHORT;
    uint64_t pos = off;
    while (pos < end) {
        off_t s = lseek(fd, (off_t)pos, SEEK_DATA);
        uint64_t ds, de;
        if (s < 0) {
            if (errno == ENXIO) {
                memset(dst + (pos - off), 0, (size_t)(end - pos));
                return BS_OK;
            }
            ds = pos; /* no hole support here: all data */
            de = end;
        } else {
            ds = (uint64_t)s < end ? (uint64_t)s : end;
            off_t h = (uint64_t)s < end ? lseek(fd, s, SEEK_HOLE) : -1;
            de = (h < 0 || (uint64_t)h > end) ? end : (uint64_t)h;
        }
        if (ds > pos)
            memset(dst + (pos - off), 0, (size_t)(ds - pos));
        if (de > ds) {
            int rc = pad ? bs_read_padded(fd, dst + (ds - off), (size_t)(de - ds), ds, err_out)
                         : bs_read_full(fd, dst + (ds - off), (size_t)(de - ds), ds, err_out);
            if (rc != BS_OK)
                return rc;
            mark_read(flags, wpos + (ds - off), wpos + (de - off), chunk_size);
        }
        pos = de > ds ? de : end;
    }
    return BS_OK;
}

/* Decode one compressed cluster into x->cluster (QEMU's qcow2_*_decompress: success only when the
 * whole cluster was produced; what follows the compressed data in its last sector is ignored). */
static int decode_cluster(bs_xctx *x, const bs_extent *e, int *err_out)
{
    if (e->fd >= 0 && x->last_fd == e->fd && x->last_off == e->host_off && x->last_stored == e->stored_len &&
        x->last_len == e->cluster_len && x->last_kind == e->kind)
        return BS_OK;
    x->last_fd = -1;
    x->last_off = 0;
    x->last_stored = x->last_len = 0;
    int rc = bs_read_padded(e->fd, x->stored, e->stored_len, e->host_off, err_out);
    if (rc != BS_OK)
        return rc;
    if (e->kind == BS_EXT_DEFLATE) {
        if (inflateReset(&x->zlib) != Z_OK)
            return BS_EDATA;
        x->zlib.next_in = x->stored;
        x->zlib.avail_in = e->stored_len;
        x->zlib.next_out = x->cluster;
        x->zlib.avail_out = e->cluster_len;
        int zr = inflate(&x->zlib, Z_FINISH);
        if (!((zr == Z_STREAM_END || zr == Z_BUF_ERROR) && x->zlib.avail_out == 0))
            return BS_EDATA;
    } else {
        ZSTD_DCtx_reset(x->zstd, ZSTD_reset_session_only);
        ZSTD_outBuffer out = {x->cluster, e->cluster_len, 0};
        ZSTD_inBuffer in = {x->stored, e->stored_len, 0};
        size_t zr = 0;
        while (out.pos < out.size) {
            size_t in0 = in.pos, out0 = out.pos;
            zr = ZSTD_decompressStream(x->zstd, &out, &in);
            if (ZSTD_isError(zr))
                return BS_EDATA;
            if (in.pos <= in0 && out.pos <= out0)
                return BS_EDATA; /* no progress: the input ended before the cluster did */
        }
        if (zr != 0)
            return BS_EDATA; /* the frame goes on past the cluster: damage, as QEMU finds it */
    }
    x->last_fd = e->fd;
    x->last_off = e->host_off;
    x->last_stored = e->stored_len;
    x->last_len = e->cluster_len;
    x->last_kind = e->kind;
    return BS_OK;
}

int bs_fill_extents(bs_xctx *x, const bs_extent *ext, uint32_t n_ext, uint8_t *buf, uint64_t length,
                    uint32_t chunk_size, uint8_t *flags_out, int *err_out, uint32_t *failed_out)
{
    *err_out = 0;
    *failed_out = n_ext;
    if (chunk_size == 0 || length == 0)
        return BS_EINVAL;
    uint64_t n = (length + chunk_size - 1) / chunk_size;
    memset(flags_out, BS_CHUNK_HOLE, (size_t)n);
    /* The decoded-cluster cache serves extents of this call only: a descriptor number may name another
     * file by the next call. */
    x->last_fd = -1;
    uint64_t pos = 0;
    for (uint32_t k = 0; k < n_ext; k++) {
        const bs_extent *e = &ext[k];
        *failed_out = k;
        if (e->length == 0 || e->length > length - pos)
            return BS_EINVAL;
        if (e->kind != BS_EXT_ZERO && e->host_off > UINT64_MAX - (e->length > e->stored_len ? e->length : e->stored_len))
            return BS_EINVAL; /* a host range that wraps past 2^64 */
        uint8_t *dst = buf + pos;
        int rc = BS_OK, read_any = 0;
        switch (e->kind) {
        case BS_EXT_ZERO:
            memset(dst, 0, (size_t)e->length);
            break;
        case BS_EXT_DATA:
        case BS_EXT_RAW:
            rc = read_sparse(e->fd, dst, e->length, e->host_off, err_out, pos, chunk_size, flags_out,
                             e->kind == BS_EXT_DATA);
            break;
        case BS_EXT_DEFLATE:
        case BS_EXT_ZSTD:
            if (e->stored_len > BS_EXT_MAX_STORED || e->cluster_len > BS_EXT_MAX_CLUSTER ||
                e->skip > e->cluster_len || e->length > e->cluster_len - e->skip)
                return BS_EINVAL;
            rc = decode_cluster(x, e, err_out);
            if (rc == BS_OK)
                memcpy(dst, x->cluster + e->skip, (size_t)e->length);
            read_any = 1;
            break;
        default:
            return BS_EINVAL;
        }
        if (rc != BS_OK)
            return rc;
        if (read_any)
            mark_read(flags_out, pos, pos + e->length, chunk_size);
        pos += e->length;
    }
    *failed_out = n_ext;
    if (pos != length)
        return BS_EINVAL;
    return BS_OK;
}

int bs_scan_extents(bs_xctx *x, const bs_extent *ext, uint32_t n_ext, uint64_t length, uint32_t chunk_size,
                    uint8_t *buf, size_t buf_len, const uint8_t *parent_ids, uint32_t parent_n,
                    uint8_t *ids_out, uint8_t *flags_out, uint32_t *changed_out, uint32_t *n_changed,
                    int *err_out, uint32_t *failed_out)
{
    *n_changed = 0;
    *err_out = 0;
    *failed_out = n_ext;
    if (chunk_size == 0 || length == 0 || buf_len < length || (length + chunk_size - 1) / chunk_size > UINT32_MAX)
        return BS_EINVAL;
    int rc = bs_fill_extents(x, ext, n_ext, buf, length, chunk_size, flags_out, err_out, failed_out);
    if (rc != BS_OK)
        return rc;
    return bs_classify(buf, length, chunk_size, parent_ids, parent_n, ids_out, flags_out, changed_out, n_changed);
}
