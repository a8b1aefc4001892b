/*
 * bs_entropy_probe: sample-based byte entropy, to skip compressing data that
 * cannot shrink (the idea of btrfs's compression heuristic, fs/btrfs/compression.c).
 *
 * It runs once per changed chunk, so it is kept cheap: four histograms
 * filled in turn (one shared histogram makes every increment wait for the
 * previous store when bytes repeat), and for the full 8 KiB sample the sum
 * of c*log2(c) comes from a table built once instead of a log2 per bin.
 */
#include <math.h>
#include <pthread.h>
#include <string.h>

#include "blocksnap.h"

#define PIECES 32
#define PIECE 256
#define SAMPLE (PIECES * PIECE)
#define SAMPLE_LOG2 13 /* log2(SAMPLE) */

static float clog2_table[SAMPLE + 1]; /* c * log2(c), 0 for c = 0 */
static pthread_once_t clog2_once = PTHREAD_ONCE_INIT;

static void clog2_init(void)
{
    for (int c = 1; c <= SAMPLE; c++)
        clog2_table[c] = (float)(c * log2((double)c));
}

static void histogram(const uint8_t *q, size_t len, uint32_t h[4][256])
{
    size_t i = 0;
    for (; i + 4 <= len; i += 4) {
        h[0][q[i]]++;
        h[1][q[i + 1]]++;
        h[2][q[i + 2]]++;
        h[3][q[i + 3]]++;
    }
    for (; i < len; i++)
        h[0][q[i]]++;
}

int bs_entropy_probe(const uint8_t *data, size_t len, uint32_t *millibits_out)
{
    uint32_t h4[4][256];
    memset(h4, 0, sizeof h4);
    double bits;
    if (len < SAMPLE) {
        histogram(data, len, h4);
        double total = (double)len, e = 0.0;
        for (int b = 0; b < 256; b++) {
            uint32_t c = h4[0][b] + h4[1][b] + h4[2][b] + h4[3][b];
            if (c) {
                double pr = (double)c / total;
                e -= pr * log2(pr);
            }
        }
        bits = e;
    } else {
        size_t stride = len / PIECES;
        for (size_t p = 0; p < PIECES; p++)
            histogram(data + p * stride, PIECE, h4);
        pthread_once(&clog2_once, clog2_init);
        /* H = log2(N) - sum(c * log2 c) / N with N = SAMPLE */
        double sum = 0.0;
        for (int b = 0; b < 256; b++)
            sum += clog2_table[h4[0][b] + h4[1][b] + h4[2][b] + h4[3][b]];
        bits = SAMPLE_LOG2 - sum / SAMPLE;
    }
    if (bits < 0.0)
        bits = 0.0;
    *millibits_out = (uint32_t)(bits * 1000.0 + 0.5);
    return BS_OK;
}
