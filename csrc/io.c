/*
 * bs_read_full / bs_read_padded / bs_write_full: the pread and pwrite loops the scanner, the
 * restore path, sparse writes and the pack writer share.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "blocksnap.h"

/* The one pread loop: at the end of the file, BS_ESHORT, or with pad the rest of dst zeroed. */
static int read_loop(int fd, uint8_t *dst, size_t len, uint64_t off, int *err_out, int pad)
{
    while (len) {
        ssize_t r = pread(fd, dst, len, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            *err_out = errno;
            return BS_EIO;
        }
        if (r == 0) {
            if (!pad)
                return BS_ESHORT;
            memset(dst, 0, len);
            return BS_OK;
        }
        dst += r;
        off += (uint64_t)r;
        len -= (size_t)r;
    }
    return BS_OK;
}

int bs_read_full(int fd, uint8_t *dst, size_t len, uint64_t off, int *err_out)
{
    return read_loop(fd, dst, len, off, err_out, 0);
}

int bs_read_padded(int fd, uint8_t *dst, size_t len, uint64_t off, int *err_out)
{
    return read_loop(fd, dst, len, off, err_out, 1);
}

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
