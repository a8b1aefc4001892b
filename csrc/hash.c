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

#include "blocksnap.h"

int bs_abi_version(void) { return BS_ABI_VERSION; }

int bs_hash128(const uint8_t *data, size_t len, uint8_t *out)
{
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, BS_XXH3_128(data, len));
    memcpy(out, c.digest, BS_ID_LEN);
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
