/* y = x W^T for up to 16 rows of x, on a bf16 weight in the packed layout amx_linear.c reads (oneDNN's
 * AB16b64a2b: blocks of 64 outputs x 32 inputs, each block 16 input pairs x 64 outputs x the pair), without
 * AMX: AVX-512 with BF16 (VDPBF16PS takes the pairs as they lie), plain AVX-512 or AVX2 with FMA (a pair's
 * two bf16 halves widened to float32 by a shift and a mask, two FMAs). One build per instruction set.
 *
 * Like the AMX kernel, it streams each block of 64 outputs once, front to back, with software prefetch,
 * accumulating every output's input pairs in order in float32, and rounds once to bf16 (nearest even).
 * The operation order of a row does not depend on the other rows of the call (rows go through the block
 * in tiles of a fixed arithmetic), so a row's result is the same whatever rows come with it.
 */
#include <stdint.h>

#include "simd.h"

#define OUT_BLOCK 64
#define IN_BLOCK 32
#define PAIRS (IN_BLOCK / 2)
#define MAX_ROWS 16
#define PREFETCH_BYTES 8192

/* 1 if this CPU runs the instruction set this library was built for (the OS saving its registers). */
int llama4_kernel_supported(void) {
    __builtin_cpu_init();
#if defined(__AVX512BF16__)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
           && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
#elif defined(__AVX512F__)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
#else
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
}

static inline void prefetch_ahead(const uint16_t *part) {
    const char *ahead = (const char *)part + PREFETCH_BYTES;
    for (int line = 0; line < OUT_BLOCK * IN_BLOCK * 2 / 64; line++) _mm_prefetch(ahead + 64 * line, _MM_HINT_T0);
}

#if defined(__AVX512F__)
#define ROW_TILE 4 /* rows x 4 accumulators of 16 outputs: 16 of the 32 registers */

/* out [R, 64] float32 = R rows of x times one block column of 64 outputs (all input blocks). */
static inline __attribute__((always_inline)) void block_rows(const uint16_t *block, int64_t in_blocks,
                                                             const uint16_t *x, int64_t in_features, const int R,
                                                             float *out) {
    __m512 acc[ROW_TILE][4];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < 4; j++) acc[r][j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < in_blocks; b++) {
        const uint16_t *part = block + b * (OUT_BLOCK * IN_BLOCK);
        prefetch_ahead(part);
        for (int p = 0; p < PAIRS; p++) {
            __m512i w[4];
            for (int j = 0; j < 4; j++) w[j] = _mm512_loadu_si512((const void *)(part + p * 2 * OUT_BLOCK + 32 * j));
#if defined(__AVX512BF16__)
            for (int r = 0; r < R; r++) {
                int32_t pair;
                memcpy(&pair, x + r * in_features + b * IN_BLOCK + 2 * p, 4);
                const __m512bh xr = (__m512bh)_mm512_set1_epi32(pair);
                for (int j = 0; j < 4; j++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], (__m512bh)w[j], xr);
            }
#else
            __m512 even[4], odd[4];
            for (int j = 0; j < 4; j++) {
                even[j] = _mm512_castsi512_ps(_mm512_slli_epi32(w[j], 16));
                odd[j] = _mm512_castsi512_ps(_mm512_and_si512(w[j], _mm512_set1_epi32((int)0xffff0000u)));
            }
            for (int r = 0; r < R; r++) {
                const uint16_t *xp = x + r * in_features + b * IN_BLOCK + 2 * p;
                const __m512 x0 = _mm512_set1_ps(f32(xp[0])), x1 = _mm512_set1_ps(f32(xp[1]));
                for (int j = 0; j < 4; j++) acc[r][j] = _mm512_fmadd_ps(x1, odd[j], _mm512_fmadd_ps(x0, even[j], acc[r][j]));
            }
#endif
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < 4; j++) _mm512_storeu_ps(out + r * OUT_BLOCK + 16 * j, acc[r][j]);
}

#else
#define ROW_TILE 1 /* 8 accumulators of 8 outputs, the weights, the row's pair: 14 of the 16 registers */

static inline __attribute__((always_inline)) void block_rows(const uint16_t *block, int64_t in_blocks,
                                                             const uint16_t *x, int64_t in_features, const int R,
                                                             float *out) {
    (void)R;
    (void)in_features;
    __m256 acc[8];
    for (int s = 0; s < 8; s++) acc[s] = _mm256_setzero_ps();
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    for (int64_t b = 0; b < in_blocks; b++) {
        const uint16_t *part = block + b * (OUT_BLOCK * IN_BLOCK);
        prefetch_ahead(part);
        for (int p = 0; p < PAIRS; p++) {
            const uint16_t *xp = x + b * IN_BLOCK + 2 * p;
            const __m256 x0 = _mm256_set1_ps(f32(xp[0])), x1 = _mm256_set1_ps(f32(xp[1]));
            for (int s = 0; s < 8; s++) { /* outputs 8 s .. 8 s + 7, each a (even, odd) pair of bf16 */
                const __m256i w = _mm256_loadu_si256((const __m256i *)(part + p * 2 * OUT_BLOCK + 16 * s));
                const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
                const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(w, high));
                acc[s] = _mm256_fmadd_ps(x1, odd, _mm256_fmadd_ps(x0, even, acc[s]));
            }
        }
    }
    for (int s = 0; s < 8; s++) _mm256_storeu_ps(out + 8 * s, acc[s]);
}
#endif

/* One block column of 64 outputs for `rows` rows of x (row tiles of ROW_TILE), rounded into y. */
static void block_column(const uint16_t *block, int64_t in_blocks, int64_t in_features, const uint16_t *x,
                          int64_t rows, uint16_t *y, int64_t out_features, int64_t first) {
    float out[ROW_TILE * OUT_BLOCK];
    const int64_t count = out_features - first < OUT_BLOCK ? out_features - first : OUT_BLOCK;
    for (int64_t r0 = 0; r0 < rows; r0 += ROW_TILE) {
        const int64_t tile = rows - r0 < ROW_TILE ? rows - r0 : ROW_TILE;
        const uint16_t *xr = x + r0 * in_features;
        switch (tile) { /* a constant row count per instance: the accumulators stay in registers */
#if ROW_TILE == 4
        case 4: block_rows(block, in_blocks, xr, in_features, 4, out); break;
        case 3: block_rows(block, in_blocks, xr, in_features, 3, out); break;
        case 2: block_rows(block, in_blocks, xr, in_features, 2, out); break;
#endif
        default: block_rows(block, in_blocks, xr, in_features, 1, out); break;
        }
        for (int64_t m = 0; m < tile; m++)
            for (int64_t o = 0; o < count; o++) y[(r0 + m) * out_features + first + o] = bf16(out[m * OUT_BLOCK + o]);
    }
}

#include "linear_groups.h"
