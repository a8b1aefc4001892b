/*
 * Chunk codecs: zstd (system libzstd, zstd_compress.c's one-shot
 * ZSTD_compressCCtx / ZSTD_decompressDCtx) with an entropy probe that skips
 * data which cannot shrink. Encoding happens in place in the scan window,
 * in the scanning thread, with the GIL released.
 */
#include <stdlib.h>
#include <string.h>
#include <zstd.h>

#include "blocksnap.h"

struct bs_codec {
    ZSTD_CCtx *cctx;
    ZSTD_DCtx *dctx;
    int level;
    uint8_t *scratch;
    size_t scratch_len;
};

bs_codec *bs_codec_new(int level, int hash_log)
{
    bs_codec *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->cctx = ZSTD_createCCtx();
    c->dctx = ZSTD_createDCtx();
    c->level = level;
    if (!c->cctx || !c->dctx) {
        bs_codec_free(c);
        return NULL;
    }
    if (ZSTD_isError(ZSTD_CCtx_setParameter(c->cctx, ZSTD_c_compressionLevel, level)) ||
        (hash_log > 0 && ZSTD_isError(ZSTD_CCtx_setParameter(c->cctx, ZSTD_c_hashLog, hash_log)))) {
        bs_codec_free(c);
        return NULL;
    }
    ZSTD_CCtx_setParameter(c->cctx, ZSTD_c_contentSizeFlag, 0);
    ZSTD_CCtx_setParameter(c->cctx, ZSTD_c_checksumFlag, 0);
    return c;
}

void bs_codec_free(bs_codec *c)
{
    if (!c)
        return;
    ZSTD_freeCCtx(c->cctx);
    ZSTD_freeDCtx(c->dctx);
    free(c->scratch);
    free(c);
}

int bs_encode_chunks(bs_codec *c, uint8_t *buf, uint64_t length, uint32_t chunk_size,
                     const uint32_t *idx, uint32_t n, uint32_t skip_millibits,
                     uint8_t *codec_out, uint32_t *len_out)
{
    if (!c || chunk_size == 0)
        return BS_EINVAL;
    size_t bound = ZSTD_compressBound(chunk_size);
    if (c->scratch_len < bound) {
        uint8_t *s = realloc(c->scratch, bound);
        if (!s)
            return BS_ENOMEM;
        c->scratch = s;
        c->scratch_len = bound;
    }
    for (uint32_t k = 0; k < n; k++) {
        uint64_t start = (uint64_t)idx[k] * chunk_size;
        if (start >= length)
            return BS_EINVAL;
        size_t clen = (size_t)((length - start) < chunk_size ? (length - start) : chunk_size);
        uint8_t *src = buf + start;
        codec_out[k] = BS_CODEC_RAW;
        len_out[k] = (uint32_t)clen;
        uint32_t mb;
        bs_entropy_probe(src, clen, &mb);
        if (mb >= skip_millibits)
            continue;
        size_t out = ZSTD_compress2(c->cctx, c->scratch, c->scratch_len, src, clen);
        if (ZSTD_isError(out) || out > clen - (clen >> 5))
            continue; /* stays raw: it would not save 1/32 */
        memcpy(src, c->scratch, out);
        codec_out[k] = BS_CODEC_ZSTD;
        len_out[k] = (uint32_t)out;
    }
    return BS_OK;
}

int bs_decode(bs_codec *c, int codec_id, const uint8_t *src, size_t src_len,
              uint8_t *dst, size_t dst_len)
{
    if (codec_id == BS_CODEC_RAW) {
        if (src_len != dst_len)
            return BS_EDATA;
        memcpy(dst, src, src_len);
        return BS_OK;
    }
    if (codec_id != BS_CODEC_ZSTD || !c)
        return BS_EINVAL;
    size_t got = ZSTD_decompressDCtx(c->dctx, dst, dst_len, src, src_len);
    if (ZSTD_isError(got) || got != dst_len)
        return BS_EDATA;
    return BS_OK;
}
