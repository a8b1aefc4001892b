/*
 * bs_pwrite_sparse: write a buffer, leaving all-zero blocks as holes (as cp --sparse=always does);
 * bs_write_full: the pwrite loop it and the pack writer share.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <unistd.h>

#include "blocksnap.h"

int bs_write_full(int fd, const uint8_t *p, size_t len, uint64_t off, int *err_out)
{
    while (len) {
        ssize_t w = pwrite(fd, p, len, (off_t)off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            *err_out = errno;
            return BS_EIO;
        }
        if (w == 0) {
            *err_out = ENOSPC; /* no progress: only a full file system does that */
            return BS_EIO;
        }
        p += w;
        off += (uint64_t)w;
        len -= (size_t)w;
    }
    return BS_OK;
}

int bs_pwrite_sparse(int fd, const uint8_t *data, size_t len, uint64_t offset,
                     uint32_t block_size, int *err_out)
{
    *err_out = 0;
    if (block_size == 0)
        return bs_write_full(fd, data, len, offset, err_out);
    size_t pos = 0, run = 0; /* [run, pos) is a pending run of non-zero blocks */
    while (pos < len) {
        size_t blen = (len - pos) < block_size ? (len - pos) : block_size;
        if (bs_is_zero(data + pos, blen)) {
            if (pos > run) {
                int rc = bs_write_full(fd, data + run, pos - run, offset + run, err_out);
                if (rc != BS_OK)
                    return rc;
            }
            run = pos + blen;
        }
        pos += blen;
    }
    if (pos > run)
        return bs_write_full(fd, data + run, pos - run, offset + run, err_out);
    return BS_OK;
}
