/*
 * bs_restore_chunks: the restore and verify hot path in one call per batch,
 * GIL released: read a pack record, check it, decode, verify the id, write.
 * The record layout is docs/FORMAT.md, "Pack files".
 */
#define _GNU_SOURCE
#include <string.h>

#include "blocksnap.h"

static uint32_t be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static int read_record(int fd, uint8_t *dst, size_t len, uint64_t off, int *detail)
{
    int rc = bs_read_full(fd, dst, len, off, detail);
    if (rc == BS_ESHORT) {
        *detail = BS_DAMAGE_SHORT;
        return BS_EDAMAGED;
    }
    return rc;
}

/* Read, check and decode one item; *data_out points at its raw bytes: at out when out is given (the
 * stored bytes are read, or decoded, straight into it), else in scratch or raw. */
static int load_item(bs_codec *codec, const bs_restore_item *it, uint8_t *scratch, size_t scratch_len,
                     uint8_t *raw, size_t raw_len, uint8_t *out, const uint8_t **data_out, int *detail_out)
{
    if (BS_RECORD_SIZE + (size_t)it->stored_len > scratch_len || it->raw_len > raw_len) {
        *detail_out = BS_DAMAGE_INDEX;
        return BS_EDAMAGED;
    }
    int direct = out != NULL && it->codec == BS_CODEC_RAW && it->stored_len == it->raw_len;
    int rc = read_record(it->pack_fd, scratch, direct ? BS_RECORD_SIZE : BS_RECORD_SIZE + (size_t)it->stored_len,
                         it->pack_offset, detail_out);
    if (rc == BS_OK && direct)
        rc = read_record(it->pack_fd, out, it->stored_len, it->pack_offset + BS_RECORD_SIZE, detail_out);
    if (rc != BS_OK)
        return rc;
    if (memcmp(scratch, BS_RECORD_MAGIC, 4) != 0 || scratch[4] != it->codec || scratch[5] != it->kind ||
        scratch[6] != 0 || scratch[7] != 0 || be32(scratch + 8) != it->raw_len ||
        be32(scratch + 12) != it->stored_len || memcmp(scratch + 16, it->id, BS_ID_LEN) != 0) {
        *detail_out = BS_DAMAGE_HEADER;
        return BS_EDAMAGED;
    }
    const uint8_t *data = direct ? out : scratch + BS_RECORD_SIZE;
    if (it->codec != BS_CODEC_RAW) {
        uint8_t *dst = out ? out : raw;
        if (bs_decode(codec, it->codec, data, it->stored_len, dst, it->raw_len) != BS_OK) {
            *detail_out = BS_DAMAGE_DECODE;
            return BS_EDAMAGED;
        }
        data = dst;
    } else if (it->stored_len != it->raw_len) {
        *detail_out = BS_DAMAGE_HEADER;
        return BS_EDAMAGED;
    }
    uint8_t id[BS_ID_LEN];
    bs_hash128(data, it->raw_len, id);
    if (memcmp(id, it->id, BS_ID_LEN) != 0) {
        *detail_out = BS_DAMAGE_HASH;
        return BS_EDAMAGED;
    }
    if (out && data != out)
        memcpy(out, data, it->raw_len);
    *data_out = data;
    return BS_OK;
}

int bs_restore_chunks(bs_codec *codec, const bs_restore_item *items, uint32_t n, int out_fd,
                      uint32_t sparse_block, uint8_t *scratch, size_t scratch_len,
                      uint8_t *raw, size_t raw_len, uint32_t *failed_out, int *detail_out)
{
    *detail_out = 0;
    for (uint32_t k = 0; k < n; k++) {
        const bs_restore_item *it = &items[k];
        const uint8_t *data;
        *failed_out = k;
        int rc = load_item(codec, it, scratch, scratch_len, raw, raw_len, NULL, &data, detail_out);
        if (rc != BS_OK)
            return rc;
        if (out_fd < 0)
            continue; /* checking only (verify) */
        rc = bs_pwrite_sparse(out_fd, data, it->raw_len, it->out_offset, sparse_block, detail_out);
        if (rc != BS_OK)
            return rc;
    }
    *failed_out = n;
    return BS_OK;
}

int bs_restore_to_memory(bs_codec *codec, const bs_restore_item *items, uint32_t n, uint8_t *dst,
                         size_t dst_len, uint8_t *scratch, size_t scratch_len, uint8_t *raw, size_t raw_len,
                         uint32_t *failed_out, int *detail_out)
{
    *detail_out = 0;
    for (uint32_t k = 0; k < n; k++) {
        const bs_restore_item *it = &items[k];
        const uint8_t *data;
        *failed_out = k;
        if (it->out_offset > dst_len || it->raw_len > dst_len - it->out_offset) {
            *detail_out = BS_DAMAGE_INDEX;
            return BS_EDAMAGED;
        }
        int rc = load_item(codec, it, scratch, scratch_len, raw, raw_len, dst + it->out_offset, &data,
                           detail_out);
        if (rc != BS_OK)
            return rc;
    }
    *failed_out = n;
    return BS_OK;
}
