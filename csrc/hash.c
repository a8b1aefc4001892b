/*
 * Chunk ids and zero detection.
 * Chunk ids are XXH3-128 with seed 0, in the canonical (big-endian) byte
 * order of xxhash's XXH128_canonicalFromHash, from the system libxxhash.
 * On x86-64 the library's runtime dispatcher (xxh_x86dispatch.h) picks the
 * AVX-512 / AVX2 / SSE2 kernel the CPU has; the plain entry point is built
 * for SSE2 only and runs 3-4x slower on current CPUs.
 */
#include <string.h>
#include <xxhash.h>
#if defined(__x86_64__) && defined(__has_include)
#if __has_include(<xxh_x86dispatch.h>)
#include <xxh_x86dispatch.h>
#define BS_XXH3_128 XXH3_128bits_dispatch
#endif
#endif
#ifndef BS_XXH3_128
#define BS_XXH3_128 XXH3_128bits
#endif
#if defined(__x86_64__) && defined(__has_include)
#if __has_include(<xxh_x86dispatch.h>)
#define BS_XXH3_64 XXH3_64bits_dispatch
#endif
#endif
#ifndef BS_XXH3_64
#define BS_XXH3_64 XXH3_64bits
#endif

#include "blocksnap.h"

int bs_abi_version(void) { return BS_ABI_VERSION; }

int bs_hash128(const uint8_t *data, size_t len, uint8_t *out)
{
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, BS_XXH3_128(data, len));
    memcpy(out, c.digest, BS_ID_LEN);
    return BS_OK;
}

int bs_hash64(const uint8_t *data, size_t len, uint8_t *out)
{
    XXH64_canonical_t c;
    XXH64_canonicalFromHash(&c, BS_XXH3_64(data, len));
    memcpy(out, c.digest, 8);
    return BS_OK;
}

int bs_is_zero(const uint8_t *data, size_t len)
{
    /* Check a short prefix byte by byte, then compare the buffer with itself
     * shifted by that prefix: memcmp is vectorised by libc, so this runs at
     * memory speed and stops at the first non-zero byte. */
    size_t head = len < 16 ? len : 16;
    for (size_t i = 0; i < head; i++)
        if (data[i])
            return 0;
    if (len <= 16)
        return 1;
    return memcmp(data, data + 16, len - 16) == 0;
}

int bs_ids_nonzero(const uint8_t *ids, uint32_t n, uint32_t *idx_out, uint32_t *count)
{
    uint32_t c = 0;
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *id = ids + (size_t)i * BS_ID_LEN;
        uint64_t a, b;
        memcpy(&a, id, 8);
        memcpy(&b, id + 8, 8);
        if (a | b)
            idx_out[c++] = i;
    }
    *count = c;
    return BS_OK;
}

int bs_ids_filter(const uint8_t *cands, uint32_t ncand, const uint8_t *ids, uint32_t n, uint8_t *found)
{
    for (uint32_t k = 1; k < ncand; k++)
        if (memcmp(cands + (size_t)(k - 1) * BS_ID_LEN, cands + (size_t)k * BS_ID_LEN, BS_ID_LEN) > 0)
            return BS_EINVAL;
    if (ncand == 0)
        return BS_OK;
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *id = ids + (size_t)i * BS_ID_LEN;
        uint64_t a, b;
        memcpy(&a, id, 8);
        memcpy(&b, id + 8, 8);
        if (!(a | b))
            continue; /* the zero id stands for zeros and holes: never a candidate */
        uint32_t lo = 0, hi = ncand; /* binary search for id in [lo, hi) */
        while (lo < hi) {
            uint32_t mid = lo + (hi - lo) / 2;
            int c = memcmp(cands + (size_t)mid * BS_ID_LEN, id, BS_ID_LEN);
            if (c == 0) {
                found[mid] = 1;
                break;
            }
            if (c < 0)
                lo = mid + 1;
            else
                hi = mid;
        }
    }
    return BS_OK;
}
