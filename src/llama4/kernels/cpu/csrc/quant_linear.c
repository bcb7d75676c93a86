/* y = x W^T for up to 16 rows of x on an int8 or int4 weight (weights.h's layouts), the codes turned into
 * float32 in registers as they stream in (never a dequantized copy of the weight), for AVX2 and AVX-512.
 *
 * Arithmetic, per row and output o, in float32: for each 32-input block b in order,
 *   S_b = sum_{i in b} x_i code[o, i] (in order: exact products, float32 sums),
 *   int8: T += S_b, and at the end y = scale[o] T;
 *   int4: T += scale[o, g(b)] (S_b - zero[o, g(b)] X_b), X_b = sum_{i in b} x_i (llama4_prepare_rows), y = T;
 * then one rounding to bf16 (nearest even). This is x times the dequantized weight up to summation order:
 * within float32 rounding of a float64 product before the final rounding to bf16
 * (tests/kernels/cpu/test_quant_kernel.py). A row's operations never depend on the other rows of the call:
 * rows go through a block in tiles (R rows x V vectors of outputs) whose arithmetic per row is the same
 * whatever the tile, so a row's result is the same bits in any batch.
 *
 * Decode is bound by the weight stream. A code costs a widening load (bytes to 32-bit lanes), a mask or shift
 * (int4) and a conversion, shared by the tile's rows, then one FMA per row; the tiles keep 8 AVX2 (16 AVX-512)
 * accumulators busy: 1 row x 64 outputs, 2 x 32 or 4 x 16 on AVX2, up to 4 rows x 64 outputs on AVX-512.
 */
#include <stdint.h>

#include "simd.h"
#include "weights.h"

#define OUT_BLOCK 64
#define IN_BLOCK 32
#define PAIRS (IN_BLOCK / 2)
#define PREFETCH_BYTES 4096

#if defined(__AVX512F__)
#define LANES 16
typedef __m512 vf;
typedef __m512i vi;
#define VF_ZERO() _mm512_setzero_ps()
#define VF_SET1(a) _mm512_set1_ps(a)
#define VF_LOAD(p) _mm512_loadu_ps(p)
#define VF_STORE(p, a) _mm512_storeu_ps(p, a)
#define VF_ADD(a, b) _mm512_add_ps(a, b)
#define VF_MUL(a, b) _mm512_mul_ps(a, b)
#define VF_FMADD(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VF_FNMADD(a, b, c) _mm512_fnmadd_ps(a, b, c)
#define VF_BF16(p) v_load_bf16(p)
#define VI_FROM_U8(p) _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p)))
#define VI_FROM_S8(p) _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p)))
#define VI_LOW_NIBBLE(a) _mm512_and_si512(a, _mm512_set1_epi32(15))
#define VI_HIGH_NIBBLE(a) _mm512_srli_epi32(a, 4)
#define VI_FLOAT(a) _mm512_cvtepi32_ps(a)
#else
#define LANES 8
typedef __m256 vf;
typedef __m256i vi;
#define VF_ZERO() _mm256_setzero_ps()
#define VF_SET1(a) _mm256_set1_ps(a)
#define VF_LOAD(p) _mm256_loadu_ps(p)
#define VF_STORE(p, a) _mm256_storeu_ps(p, a)
#define VF_ADD(a, b) _mm256_add_ps(a, b)
#define VF_MUL(a, b) _mm256_mul_ps(a, b)
#define VF_FMADD(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VF_FNMADD(a, b, c) _mm256_fnmadd_ps(a, b, c)
#define VF_BF16(p) load_bf16x8(p)
#define VI_FROM_U8(p) _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p)))
#define VI_FROM_S8(p) _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p)))
#define VI_LOW_NIBBLE(a) _mm256_and_si256(a, _mm256_set1_epi32(15))
#define VI_HIGH_NIBBLE(a) _mm256_srli_epi32(a, 4)
#define VI_FLOAT(a) _mm256_cvtepi32_ps(a)
#endif
#define VECS (OUT_BLOCK / LANES)
#define MAX_TILE 4

/* Scales (float32 or bf16) at `at` as float32 lanes; zero points (uint8), or 8 for every lane. */
static inline vf load_scales(const void *scale, int64_t at, int bf16_scales) {
    return bf16_scales ? VF_BF16((const uint16_t *)scale + at) : VF_LOAD((const float *)scale + at);
}

static inline vf load_zeros(const uint8_t *zero, int64_t at) {
    return zero ? VI_FLOAT(VI_FROM_U8(zero + at)) : VF_SET1(8.0f);
}

static inline void prefetch_ahead(const void *part, int bytes) {
    for (int line = 0; line < bytes / 64; line++) _mm_prefetch((const char *)part + PREFETCH_BYTES + 64 * line, _MM_HINT_T0);
}

/* Where a tile's rows are: xf [rows][I] float32 (row 0 of the tile), xsum [rows][I/32], totals [rows][64]. */
struct rows_at {
    const float *xf, *xsum;
    int64_t in_features, in_blocks;
    float *total;
};

/* Block b of an int8 column, outputs v0*LANES .. (v0+V)*LANES-1, R rows: total += S_b. */
static inline __attribute__((always_inline)) void int8_tile(const int8_t *part, int64_t b, struct rows_at A,
                                                            const int R, const int V, const int v0) {
    vf sum[MAX_TILE][VECS];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < V; v++) sum[r][v] = VF_ZERO();
    const float *x = A.xf + b * IN_BLOCK;
    for (int i = 0; i < IN_BLOCK; i++)
        for (int v = 0; v < V; v++) {
            const vf w = VI_FLOAT(VI_FROM_S8(part + i * OUT_BLOCK + (v0 + v) * LANES));
            for (int r = 0; r < R; r++) sum[r][v] = VF_FMADD(VF_SET1(x[r * A.in_features + i]), w, sum[r][v]);
        }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < V; v++) {
            float *t = A.total + r * OUT_BLOCK + (v0 + v) * LANES;
            VF_STORE(t, VF_ADD(VF_LOAD(t), sum[r][v]));
        }
}

/* Block b of an int4 column (scale and zero at `at`), the same tile: total += scale (S_b - zero X_b). */
static inline __attribute__((always_inline)) void int4_tile(const uint8_t *part, int64_t b, const void *scale,
                                                            int bf16_scales, const uint8_t *zero, int64_t at,
                                                            struct rows_at A, const int R, const int V,
                                                            const int v0) {
    vf sum[MAX_TILE][VECS];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < V; v++) sum[r][v] = VF_ZERO();
    const float *x = A.xf + b * IN_BLOCK;
    for (int p = 0; p < PAIRS; p++)
        for (int v = 0; v < V; v++) {
            const vi both = VI_FROM_U8(part + p * OUT_BLOCK + (v0 + v) * LANES);
            const vf even = VI_FLOAT(VI_LOW_NIBBLE(both)), odd = VI_FLOAT(VI_HIGH_NIBBLE(both));
            for (int r = 0; r < R; r++) {
                const float *xr = x + r * A.in_features + 2 * p;
                sum[r][v] = VF_FMADD(VF_SET1(xr[1]), odd, VF_FMADD(VF_SET1(xr[0]), even, sum[r][v]));
            }
        }
    for (int v = 0; v < V; v++) {
        const int64_t o = (v0 + v) * LANES;
        const vf s = load_scales(scale, at + o, bf16_scales), z = load_zeros(zero, at + o);
        for (int r = 0; r < R; r++) {
            float *t = A.total + r * OUT_BLOCK + o;
            VF_STORE(t, VF_FMADD(s, VF_FNMADD(z, VF_SET1(A.xsum[r * A.in_blocks + b]), sum[r][v]), VF_LOAD(t)));
        }
    }
}

/* A tile shape per row count: R rows x V vectors of outputs, the block's VECS vectors in VECS / V passes. */
#if defined(__AVX512F__)
#define TILES(CALL) \
    case 4: for (int v0 = 0; v0 < VECS; v0 += 4) CALL(4, 4); break; \
    case 3: for (int v0 = 0; v0 < VECS; v0 += 4) CALL(3, 4); break; \
    case 2: for (int v0 = 0; v0 < VECS; v0 += 4) CALL(2, 4); break; \
    default: for (int v0 = 0; v0 < VECS; v0 += 4) CALL(1, 4); break;
#else
#define TILES(CALL) \
    case 4: for (int v0 = 0; v0 < VECS; v0 += 2) CALL(4, 2); break; \
    case 3: for (int v0 = 0; v0 < VECS; v0 += 2) CALL(3, 2); break; \
    case 2: for (int v0 = 0; v0 < VECS; v0 += 4) CALL(2, 4); break; \
    default: for (int v0 = 0; v0 < VECS; v0 += 8) CALL(1, 8); break;
#endif

static void store_rows(const float *total, int64_t rows, uint16_t *y, int64_t out_features, int64_t first) {
    const int64_t count = out_features - first < OUT_BLOCK ? out_features - first : OUT_BLOCK;
    for (int64_t m = 0; m < rows; m++)
        for (int64_t o = 0; o < count; o++) y[m * out_features + first + o] = bf16(total[m * OUT_BLOCK + o]);
}

void llama4_quant_column(const struct llama4_weight *w, int64_t ob, int64_t in_features, const float *xf,
                         const float *xsum, int64_t rows, uint16_t *y, int64_t out_features, int64_t first) {
    const int64_t in_blocks = in_features / IN_BLOCK, int4 = w->format == LLAMA4_INT4;
    const int64_t groups = int4 ? in_features / w->group : 1, group_blocks = int4 ? w->group / IN_BLOCK : in_blocks;
    const int bf16_scales = (int)w->bf16_scales;
    const int64_t block_bytes = int4 ? OUT_BLOCK * PAIRS : OUT_BLOCK * IN_BLOCK;
    const uint8_t *codes = (const uint8_t *)w->data + ob * in_blocks * block_bytes;
    const void *scale = (const char *)w->scale + ob * groups * OUT_BLOCK * (bf16_scales ? 2 : 4);
    const uint8_t *zero = w->zero ? w->zero + ob * groups * OUT_BLOCK : 0;
    float total[MAX_TILE * OUT_BLOCK];
    for (int64_t r0 = 0; r0 < rows; r0 += MAX_TILE) {
        const int64_t tile = rows - r0 < MAX_TILE ? rows - r0 : MAX_TILE;
        const struct rows_at A = {xf + r0 * in_features, xsum + r0 * in_blocks, in_features, in_blocks, total};
        for (int64_t i = 0; i < tile * OUT_BLOCK; i++) total[i] = 0.0f;
        for (int64_t b = 0; b < in_blocks; b++) {
            const uint8_t *part = codes + b * block_bytes;
            prefetch_ahead(part, (int)block_bytes);
            if (int4) {
                const int64_t at = b / group_blocks * OUT_BLOCK;
#define INT4_TILE(R, V) int4_tile(part, b, scale, bf16_scales, zero, at, A, R, V, v0)
                switch (tile) { TILES(INT4_TILE) }
            } else {
#define INT8_TILE(R, V) int8_tile((const int8_t *)part, b, A, R, V, v0)
                switch (tile) { TILES(INT8_TILE) }
            }
        }
        if (!int4)
            for (int64_t m = 0; m < tile; m++)
                for (int v = 0; v < VECS; v++) {
                    float *t = total + m * OUT_BLOCK + v * LANES;
                    VF_STORE(t, VF_MUL(load_scales(scale, v * LANES, bf16_scales), VF_LOAD(t)));
                }
        store_rows(total, tile, y + r0 * out_features, out_features, first);
    }
}

void llama4_prepare_rows(const uint16_t *x, int64_t rows, int64_t in_features, float *xf, float *xsum) {
    const int64_t in_blocks = in_features / IN_BLOCK;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t b = 0; b < in_blocks; b++) {
            const uint16_t *xb = x + r * in_features + b * IN_BLOCK;
            float *fb = xf + r * in_features + b * IN_BLOCK;
            const v16 lo = v_load_bf16(xb), hi = v_load_bf16(xb + 16);
            v_store(fb, lo);
            v_store(fb + 16, hi);
            xsum[r * in_blocks + b] = v_reduce_add(v_add(lo, hi));
        }
}
