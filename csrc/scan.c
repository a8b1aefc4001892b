/*
 * bs_scan: classify one window of an image into hole / zero / data chunks,
 * hash the data chunks and compare them with the parent snapshot's ids.
 * Holes come from lseek(SEEK_DATA / SEEK_HOLE) (Linux lseek(2)); ranges of
 * consecutive non-hole chunks are read with one pread each.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include "blocksnap.h"

/* Next data range at or after pos, clipped to end: [*ds, *de). Returns 0 if
 * there is none. Without SEEK_DATA support everything counts as data. */
static int next_data(int fd, uint64_t pos, uint64_t end, uint64_t *ds, uint64_t *de)
{
    off_t s = lseek(fd, (off_t)pos, SEEK_DATA);
    if (s < 0) {
        if (errno == ENXIO)
            return 0; /* only a hole (or EOF) from pos on */
        *ds = pos;    /* EINVAL/EOPNOTSUPP: no hole support, treat as data */
        *de = end;
        return 1;
    }
    if ((uint64_t)s >= end)
        return 0;
    off_t h = lseek(fd, s, SEEK_HOLE);
    *ds = (uint64_t)s;
    *de = (h < 0 || (uint64_t)h > end) ? end : (uint64_t)h;
    return 1;
}

int bs_scan(int fd, uint64_t offset, uint64_t length, uint32_t chunk_size,
            uint8_t *buf, size_t buf_len,
            const uint8_t *parent_ids, uint32_t parent_n,
            uint8_t *ids_out, uint8_t *flags_out,
            uint32_t *changed_out, uint32_t *n_changed, int *err_out)
{
    *n_changed = 0;
    *err_out = 0;
    if (chunk_size == 0 || length == 0 || buf_len < length)
        return BS_EINVAL;
    uint64_t n = (length + chunk_size - 1) / chunk_size;
    if (n > UINT32_MAX)
        return BS_EINVAL;
    uint64_t end = offset + length;
    struct stat st;
    if (fstat(fd, &st) != 0) {
        *err_out = errno;
        return BS_EIO;
    }
    /* A regular file must still reach the end of the range: past EOF,
     * SEEK_DATA reports a hole, which would hide a shrunken file. */
    if (S_ISREG(st.st_mode) && (uint64_t)st.st_size < end)
        return BS_ESHORT;

    /* Mark every chunk a hole, then un-mark and read the ones that any
     * data range touches. */
    memset(flags_out, BS_CHUNK_HOLE, (size_t)n);
    uint64_t pos = offset, ds, de;
    while (pos < end && next_data(fd, pos, end, &ds, &de)) {
        uint64_t first = (ds - offset) / chunk_size;
        uint64_t last = (de - offset + chunk_size - 1) / chunk_size; /* exclusive */
        uint64_t rs = offset + first * chunk_size;
        uint64_t re = offset + last * chunk_size;
        if (re > end)
            re = end;
        int rc = bs_read_full(fd, buf + (rs - offset), (size_t)(re - rs), rs, err_out);
        if (rc != BS_OK)
            return rc;
        memset(flags_out + first, 0, (size_t)(last - first));
        pos = re;
    }

    return bs_classify(buf, length, chunk_size, parent_ids, parent_n, ids_out, flags_out, changed_out, n_changed);
}

/* bs_classify: the second half of every scan (header, internal section). */
int bs_classify(const uint8_t *buf, uint64_t length, uint32_t chunk_size,
                const uint8_t *parent_ids, uint32_t parent_n,
                uint8_t *ids_out, uint8_t *flags_out, uint32_t *changed_out, uint32_t *n_changed)
{
    static const uint8_t zero_id[BS_ID_LEN];
    uint64_t n = (length + chunk_size - 1) / chunk_size;
    uint32_t nc = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint8_t *id = ids_out + i * BS_ID_LEN;
        uint64_t cs = i * (uint64_t)chunk_size;
        size_t clen = (size_t)((length - cs) < chunk_size ? (length - cs) : chunk_size);
        if (flags_out[i] != BS_CHUNK_HOLE && bs_is_zero(buf + cs, clen))
            flags_out[i] = BS_CHUNK_ZERO;
        const uint8_t *pid = (parent_ids && i < parent_n) ? parent_ids + i * BS_ID_LEN : zero_id;
        if (flags_out[i] != 0) {
            memset(id, 0, BS_ID_LEN);
        } else {
            bs_hash128(buf + cs, clen, id);
            flags_out[i] = BS_CHUNK_DATA;
            if (memcmp(id, pid, BS_ID_LEN) != 0)
                changed_out[nc++] = (uint32_t)i;
        }
        if (memcmp(id, pid, BS_ID_LEN) != 0)
            flags_out[i] |= BS_CHUNK_CHANGED;
    }
    *n_changed = nc;
    return BS_OK;
}
