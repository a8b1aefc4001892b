/* bs_pwrite_sparse: write a buffer, leaving all-zero blocks as holes (as cp --sparse=always does). */

#include "blocksnap.h"

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
