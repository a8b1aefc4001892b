/* bs_punch_hole: give a file range back to the file system (fallocate(2)). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>

#include "blocksnap.h"

int bs_punch_hole(int fd, uint64_t offset, uint64_t length, int *err_out)
{
    *err_out = 0;
    if (length == 0)
        return BS_OK;
    if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length) != 0) {
        *err_out = errno;
        return BS_EIO;
    }
    return BS_OK;
}
