/*
 * bs_entropy_probe: sample-based byte entropy, to skip compressing data that
 * cannot shrink (the idea of btrfs's compression heuristic, fs/btrfs/compression.c).
 */
#include <math.h>
#include <string.h>

#include "blocksnap.h"

#define PIECES 32
#define PIECE 256

int bs_entropy_probe(const uint8_t *data, size_t len, uint32_t *millibits_out)
{
    uint32_t hist[256];
    memset(hist, 0, sizeof hist);
    size_t total = 0;
    if (len <= (size_t)PIECES * PIECE) {
        for (size_t i = 0; i < len; i++)
            hist[data[i]]++;
        total = len;
    } else {
        size_t stride = len / PIECES;
        for (size_t p = 0; p < PIECES; p++) {
            const uint8_t *q = data + p * stride;
            for (size_t i = 0; i < PIECE; i++)
                hist[q[i]]++;
        }
        total = (size_t)PIECES * PIECE;
    }
    double h = 0.0;
    for (int b = 0; b < 256; b++) {
        if (hist[b]) {
            double pr = (double)hist[b] / (double)total;
            h -= pr * log2(pr);
        }
    }
    *millibits_out = (uint32_t)(h * 1000.0 + 0.5);
    return BS_OK;
}
