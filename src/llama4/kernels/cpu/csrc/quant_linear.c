/* y = x W^T for up to 16 rows of x on an int8 or int4 weight (weights.h's layouts), the codes read as they
 * stream in (never a dequantized copy of the weight), for AVX2 and AVX-512 builds alike.
 *
 * int8, per row and output o, in float32: for each 32-input block b in order, S_b = sum_{i in b} x_i code[o, i]
 * (exact products, float32 sums), T += S_b, and at the end y = scale[o] T: x times the dequantized weight up to
 * summation order.
 *
 * int4 multiplies integers, as llama.cpp's q4 x q8 products do: each row's 32-input block b is quantized to int8
 * codes q_i with one scale d_b = max |x_i| / 127 (q_i = x_i * (127 / max |x_i|) rounded to nearest even;
 * llama4_prepare_rows), and
 *   y = sum_b scale[o, g(b)] d_b (sum_{i in b} code[o, i] q_i - zero[o, g(b)] sum_{i in b} q_i),
 * the inner sums exact in integers (int4_cells), the rest in float32. So the int4 product is the dequantized weight times the quantized rows
 * within float32 rounding; the rows' quantization costs at most d_b / 2 per input (tests/kernels/cpu/
 * test_quant_kernel.py checks both). A row whose block holds a NaN or an infinity gives NaN outputs.
 *
 * Every result is rounded once to bf16 (nearest even). A row's operations never depend on the other rows of
 * the call (rows go through in tiles whose arithmetic per row is the same whatever the tile), so a row's
 * result is the same bits in any batch.
 *
 * Decode is bound by the weight stream. int8: a code costs a widening load and a conversion, shared by the
 * tile's rows, then one FMA per row (tiles keep 8 AVX2 / 16 AVX-512 accumulators busy). int4: 32 bytes (64
 * codes) cost a load and three mask / shift operations shared by the rows, then two maddubs and two 16-bit adds
 * per row; the float work is once per 32 inputs and 8 outputs.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

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

/* Where an int8 tile's rows are: xf [rows][I] float32 (row 0 of the tile), totals [rows][64]. */
struct rows_at {
    const float *xf;
    int64_t in_features;
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


/* int8: one block column, in tiles of up to MAX_TILE rows. */
static void int8_column(const struct llama4_weight *w, int64_t ob, int64_t in_features, const struct llama4_rows *X,
                        int64_t rows, uint16_t *y, int64_t out_features, int64_t first) {
    const int64_t in_blocks = in_features / IN_BLOCK, block_bytes = OUT_BLOCK * IN_BLOCK;
    const int bf16_scales = (int)w->bf16_scales;
    const int8_t *codes = (const int8_t *)w->data + ob * in_blocks * block_bytes;
    const void *scale = (const char *)w->scale + ob * OUT_BLOCK * (bf16_scales ? 2 : 4);
    float total[MAX_TILE * OUT_BLOCK];
    for (int64_t r0 = 0; r0 < rows; r0 += MAX_TILE) {
        const int64_t tile = rows - r0 < MAX_TILE ? rows - r0 : MAX_TILE;
        const struct rows_at A = {X->xf + r0 * in_features, in_features, total};
        for (int64_t i = 0; i < tile * OUT_BLOCK; i++) total[i] = 0.0f;
        for (int64_t b = 0; b < in_blocks; b++) {
            const int8_t *part = codes + b * block_bytes;
            prefetch_ahead(part, (int)block_bytes);
#define INT8_TILE(R, V) int8_tile(part, b, A, R, V, v0)
            switch (tile) { TILES(INT8_TILE) }
        }
        for (int64_t m = 0; m < tile; m++)
            for (int v = 0; v < VECS; v++) {
                float *t = total + m * OUT_BLOCK + v * LANES;
                VF_STORE(t, VF_MUL(load_scales(scale, v * LANES, bf16_scales), VF_LOAD(t)));
            }
        store_rows(total, tile, y + r0 * out_features, out_features, first);
    }
}

/* int4 cells (weights.h): 32 inputs x 8 outputs in 128 bytes, four 32-byte loads; in load k, output j's 32-bit
 * lane holds in its byte t the codes of inputs 4k + t (low nibble) and 16 + 4k + t (high nibble). Against the
 * row's codes of the same inputs (broadcast 4 at a time), _mm256_maddubs_epi16 gives each output two sums of
 * two products in 16-bit lanes (codes 0..15 times -127..127: at most 3,810 each); the low and high nibbles'
 * and the 4 loads' sums add to at most 30,480 (no overflow), and _mm256_madd_epi16 adds the output's two lanes
 * into its 32-bit integer sum over the block. */
#define INT4_CELL 128
#define INT4_OUTPUTS 8

static inline __m256i broadcast_codes(const int8_t *q) {
    int32_t four;
    memcpy(&four, q, sizeof four);
    return _mm256_set1_epi32(four);
}

static inline __m256 scales8(const void *scale, int64_t at, int bf16_scales) {
    if (!bf16_scales) return _mm256_loadu_ps((const float *)scale + at);
    const __m128i raw = _mm_loadu_si128((const __m128i *)((const uint16_t *)scale + at));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

static inline __m256 zeros8(const uint8_t *zero, int64_t at) {
    return zero ? _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(zero + at))))
                : _mm256_set1_ps(8.0f);
}

/* R rows (row stride in_features) times one 8-output column's cells -> out[r * OUT_BLOCK + 0..7]. `at`: the
 * column's first scale of its first group. */
static inline __attribute__((always_inline)) void int4_cells(const uint8_t *cells, int64_t in_blocks,
                                                             int64_t group_blocks, const void *scale,
                                                             int bf16_scales, const uint8_t *zero, int64_t at,
                                                             const struct llama4_rows *X, int64_t in_features,
                                                             const int R, float *out) {
    const __m256i nibble = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    __m256 acc[MAX_TILE];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < in_blocks; b++) {
        const uint8_t *cell = cells + b * INT4_CELL;
        _mm_prefetch((const char *)cell + PREFETCH_BYTES, _MM_HINT_T0);
        _mm_prefetch((const char *)cell + PREFETCH_BYTES + 64, _MM_HINT_T0);
        __m256i dot[MAX_TILE];
        for (int k = 0; k < 4; k++) {
            const __m256i c = _mm256_loadu_si256((const __m256i *)(cell + 32 * k));
            const __m256i lo = _mm256_and_si256(c, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(c, 4), nibble);
            for (int r = 0; r < R; r++) {
                const int8_t *q = X->xq + r * in_features + b * IN_BLOCK + 4 * k;
                const __m256i sums = _mm256_add_epi16(_mm256_maddubs_epi16(lo, broadcast_codes(q)),
                                                      _mm256_maddubs_epi16(hi, broadcast_codes(q + 16)));
                dot[r] = k ? _mm256_add_epi16(dot[r], sums) : sums;
            }
        }
        const int64_t here = at + b / group_blocks * OUT_BLOCK;
        const __m256 s = scales8(scale, here, bf16_scales), z = zeros8(zero, here);
        for (int r = 0; r < R; r++) {
            const int64_t rb = r * (in_features / IN_BLOCK) + b;
            const __m256 exact = _mm256_cvtepi32_ps(_mm256_madd_epi16(dot[r], ones));
            const __m256 centred = _mm256_fnmadd_ps(z, _mm256_set1_ps(X->xqsum[rb]), exact);
            acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(s, _mm256_set1_ps(X->xd[rb])), centred, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) _mm256_storeu_ps(out + r * OUT_BLOCK, acc[r]);
}

/* int4: one block column, its eight 8-output columns in turn, each streamed once for every tile of rows (the
 * column's cells, in_blocks x 128 bytes, stay in cache between tiles). */
static void int4_column(const struct llama4_weight *w, int64_t ob, int64_t in_features, const struct llama4_rows *X,
                        int64_t rows, uint16_t *y, int64_t out_features, int64_t first) {
    const int64_t in_blocks = in_features / IN_BLOCK, groups = in_features / w->group;
    const int64_t group_blocks = w->group / IN_BLOCK;
    const int bf16_scales = (int)w->bf16_scales;
    const uint8_t *codes = (const uint8_t *)w->data + ob * in_blocks * (OUT_BLOCK / INT4_OUTPUTS) * INT4_CELL;
    const void *scale = (const char *)w->scale + ob * groups * OUT_BLOCK * (bf16_scales ? 2 : 4);
    const uint8_t *zero = w->zero ? w->zero + ob * groups * OUT_BLOCK : 0;
    float total[16 * OUT_BLOCK];
    for (int64_t c = 0; c < OUT_BLOCK / INT4_OUTPUTS; c++) {
        const uint8_t *cells = codes + c * in_blocks * INT4_CELL;
        for (int64_t r0 = 0; r0 < rows; r0 += MAX_TILE) {
            const int64_t tile = rows - r0 < MAX_TILE ? rows - r0 : MAX_TILE;
            const struct llama4_rows A = llama4_rows_at(X, r0, in_features);
            float *out = total + r0 * OUT_BLOCK + c * INT4_OUTPUTS;
            const int64_t at = c * INT4_OUTPUTS;
#define INT4_CELLS(R) int4_cells(cells, in_blocks, group_blocks, scale, bf16_scales, zero, at, &A, in_features, R, out)
            switch (tile) {
            case 4: INT4_CELLS(4); break;
            case 3: INT4_CELLS(3); break;
            case 2: INT4_CELLS(2); break;
            default: INT4_CELLS(1); break;
            }
        }
    }
    store_rows(total, rows, y, out_features, first);
}

void llama4_quant_column(const struct llama4_weight *w, int64_t ob, int64_t in_features, const struct llama4_rows *X,
                         int64_t rows, uint16_t *y, int64_t out_features, int64_t first) {
    if (w->format == LLAMA4_INT4)
        int4_column(w, ob, in_features, X, rows, y, out_features, first);
    else
        int8_column(w, ob, in_features, X, rows, y, out_features, first);
}

/* One 32-input block of a row (float32) -> its int8 codes, scale and code sum (the top comment's rule). */
static void quantize_block(const float *f, int8_t *q, float *d, float *qsum) {
    const __m256 sign = _mm256_set1_ps(-0.0f), inf = _mm256_set1_ps(INFINITY);
    __m256 amax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    for (int i = 0; i < IN_BLOCK; i += 8) {
        const __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(f + i));
        amax = _mm256_max_ps(amax, a);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ)); /* NaN or infinite */
    }
    if (_mm256_movemask_ps(bad)) {
        memset(q, 0, IN_BLOCK);
        *d = NAN;
        *qsum = 0.0f;
        return;
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    const float largest = _mm_cvtss_f32(m);
    const __m256 inverse = _mm256_set1_ps(largest > 0.0f ? 127.0f / largest : 0.0f);
    __m256i i[4];
    for (int j = 0; j < 4; j++) i[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(f + 8 * j), inverse));
    const __m256i total = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
    /* packs work within 128-bit lanes: dwords come out as i0[0:4] i1[0:4] i2[0:4] i3[0:4] i0[4:8] ... */
    const __m256i words = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
    const __m256i ordered = _mm256_permutevar8x32_epi32(words, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)q, ordered);
    *d = largest / 127.0f;
    *qsum = (float)_mm_cvtsi128_si32(t);
}

void llama4_prepare_rows(const uint16_t *x, int64_t rows, int64_t in_features, const struct llama4_rows *X) {
    const int64_t in_blocks = in_features / IN_BLOCK;
    float block[IN_BLOCK];
    for (int64_t r = 0; r < rows; r++)
        for (int64_t b = 0; b < in_blocks; b++) {
            const uint16_t *xb = x + r * in_features + b * IN_BLOCK;
            float *fb = X->xf ? X->xf + r * in_features + b * IN_BLOCK : block;
            v_store(fb, v_load_bf16(xb));
            v_store(fb + 16, v_load_bf16(xb + 16));
            if (X->xq)
                quantize_block(fb, X->xq + r * in_features + b * IN_BLOCK, X->xd + r * in_blocks + b,
                               X->xqsum + r * in_blocks + b);
        }
}
