/* 16 float32 lanes for the decode layer's glue, on whichever instruction set the file is compiled for:
 * one AVX-512 register, or two AVX2 halves (the same lanes, the same operation order). A build targets
 * one instruction set; the Python side compiles one library per set and loads the one the CPU runs.
 *
 * bf16 <-> float32 conversions are exact one way and round to nearest even the other, as torch does.
 */
#ifndef LLAMA4_SIMD_H
#define LLAMA4_SIMD_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

static inline float f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest even, as torch converts float32 to bf16 (NaN stays a quiet NaN). */
static inline uint16_t bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static inline float round_bf16(float f) { return f32(bf16(f)); }

#if defined(__AVX512F__)

typedef __m512 v16;
static inline v16 v_zero(void) { return _mm512_setzero_ps(); }
static inline v16 v_set1(float a) { return _mm512_set1_ps(a); }
static inline v16 v_load(const float *p) { return _mm512_loadu_ps(p); }
static inline void v_store(float *p, v16 a) { _mm512_storeu_ps(p, a); }
static inline v16 v_add(v16 a, v16 b) { return _mm512_add_ps(a, b); }
static inline v16 v_sub(v16 a, v16 b) { return _mm512_sub_ps(a, b); }
static inline v16 v_mul(v16 a, v16 b) { return _mm512_mul_ps(a, b); }
static inline v16 v_div(v16 a, v16 b) { return _mm512_div_ps(a, b); }
static inline v16 v_fmadd(v16 a, v16 b, v16 c) { return _mm512_fmadd_ps(a, b, c); }
static inline v16 v_fnmadd(v16 a, v16 b, v16 c) { return _mm512_fnmadd_ps(a, b, c); }
static inline v16 v_min(v16 a, v16 b) { return _mm512_min_ps(a, b); }
static inline v16 v_max(v16 a, v16 b) { return _mm512_max_ps(a, b); }
static inline v16 v_round(v16 a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline v16 v_scale_pow2(v16 p, v16 n) { return _mm512_scalef_ps(p, n); } /* p * 2^n, n integral */

static inline v16 v_load_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline __m256i v_pack_bf16(v16 a) { /* nearest even, as bf16() */
#if defined(__AVX512BF16__)
    return (__m256i)_mm512_cvtneps_pbh(a);
#else
    const __m512i u = _mm512_castps_si512(a);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
    const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quiet));
#endif
}

static inline v16 v_round_bf16(v16 a) { /* each lane rounded to bf16 and back */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v_pack_bf16(a)), 16));
}

/* Sums of 4 vectors' lanes: {sum a, sum b, sum c, sum d}. */
static inline __m128 v_sum4(v16 a, v16 b, v16 c, v16 d) {
#define HALVES(x) _mm256_add_ps(_mm512_castps512_ps256(x), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)))
#define QUARTERS(y) _mm_add_ps(_mm256_castps256_ps128(y), _mm256_extractf128_ps(y, 1))
    const __m128 a4 = QUARTERS(HALVES(a)), b4 = QUARTERS(HALVES(b)), c4 = QUARTERS(HALVES(c)), d4 = QUARTERS(HALVES(d));
#undef HALVES
#undef QUARTERS
    return _mm_hadd_ps(_mm_hadd_ps(a4, b4), _mm_hadd_ps(c4, d4));
}

/* v_round_bf16 for finite lanes (no NaN to keep quiet): nearest even, the low half cleared in place. */
static inline v16 v_round_bf16_finite(v16 a) {
    const __m512i u = _mm512_castps_si512(a);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd);
    return _mm512_castsi512_ps(_mm512_and_si512(rounded, _mm512_set1_epi32((int)0xffff0000u)));
}

/* 16 int8 codes as float32 (exact). */
static inline v16 v_load_i8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

/* 16 float8_e4m3fn codes as their float32 values, exactly: a normal code's exponent and mantissa moved into
 * float32's fields (bias 7 -> 127), a subnormal one (exponent 0) as mantissa x 2^-9, computed rather than
 * read as a float32 subnormal so that denormals-are-zero cannot change it. The NaN codes (s 1111 111) read as
 * +-480: a KV cache never stores them (its encoder clamps to +-448). */
static inline v16 v_load_e4m3(const uint8_t *p) {
    const __m512i bits = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    const __m512i magnitude = _mm512_and_si512(bits, _mm512_set1_epi32(0x7f));
    const __m512i biased = _mm512_add_epi32(_mm512_slli_epi32(magnitude, 20), _mm512_set1_epi32(120 << 23));
    const __m512 normal = _mm512_castsi512_ps(biased);
    const __m512 subnormal = _mm512_mul_ps(_mm512_cvtepi32_ps(magnitude), _mm512_set1_ps(1.0f / 512));
    const __mmask16 small = _mm512_cmplt_epi32_mask(magnitude, _mm512_set1_epi32(8));
    const __m512 value = _mm512_mask_blend_ps(small, normal, subnormal);
    const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(bits, _mm512_set1_epi32(0x80)), 24);
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(value), sign));
}

#else /* AVX2 + FMA */

typedef struct {
    __m256 lo, hi;
} v16;
static inline v16 v_make(__m256 lo, __m256 hi) {
    v16 r = {lo, hi};
    return r;
}
static inline v16 v_zero(void) { return v_make(_mm256_setzero_ps(), _mm256_setzero_ps()); }
static inline v16 v_set1(float a) { return v_make(_mm256_set1_ps(a), _mm256_set1_ps(a)); }
static inline v16 v_load(const float *p) { return v_make(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)); }
static inline void v_store(float *p, v16 a) {
    _mm256_storeu_ps(p, a.lo);
    _mm256_storeu_ps(p + 8, a.hi);
}
#define V_BINARY(name, op) \
    static inline v16 name(v16 a, v16 b) { return v_make(op(a.lo, b.lo), op(a.hi, b.hi)); }
V_BINARY(v_add, _mm256_add_ps)
V_BINARY(v_sub, _mm256_sub_ps)
V_BINARY(v_mul, _mm256_mul_ps)
V_BINARY(v_div, _mm256_div_ps)
V_BINARY(v_min, _mm256_min_ps)
V_BINARY(v_max, _mm256_max_ps)
#undef V_BINARY
static inline v16 v_fmadd(v16 a, v16 b, v16 c) {
    return v_make(_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi));
}
static inline v16 v_fnmadd(v16 a, v16 b, v16 c) {
    return v_make(_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi));
}
static inline v16 v_round(v16 a) {
    return v_make(_mm256_round_ps(a.lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                  _mm256_round_ps(a.hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

/* p * 2^n for integral n in [-150, 128]: two steps of 2^(n/2), each a normal float. */
static inline __m256 scale_pow2_8(__m256 p, __m256 n) {
    const __m256i whole = _mm256_cvtps_epi32(n), first = _mm256_srai_epi32(whole, 1);
    const __m256i second = _mm256_sub_epi32(whole, first), bias = _mm256_set1_epi32(127);
    const __m256 a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(first, bias), 23));
    const __m256 b = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(second, bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, a), b);
}
static inline v16 v_scale_pow2(v16 p, v16 n) { return v_make(scale_pow2_8(p.lo, n.lo), scale_pow2_8(p.hi, n.hi)); }

static inline __m256 load_bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline v16 v_load_bf16(const uint16_t *p) { return v_make(load_bf16x8(p), load_bf16x8(p + 8)); }

static inline __m256i pack_bf16x8(__m256 a) { /* 8 bf16 in the low 16 bits of each 32-bit lane */
    const __m256i u = _mm256_castps_si256(a);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd), 16);
    const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    const __m256 nan = _mm256_cmp_ps(a, a, _CMP_UNORD_Q);
    return _mm256_blendv_epi8(rounded, quiet, _mm256_castps_si256(nan));
}
static inline __m256i v_pack_bf16(v16 a) {
    const __m256i packed = _mm256_packus_epi32(pack_bf16x8(a.lo), pack_bf16x8(a.hi)); /* lanes lo0-3 hi0-3 lo4-7 hi4-7 */
    return _mm256_permute4x64_epi64(packed, 0xD8);
}

static inline v16 v_round_bf16(v16 a) {
    return v_make(_mm256_castsi256_ps(_mm256_slli_epi32(pack_bf16x8(a.lo), 16)),
                  _mm256_castsi256_ps(_mm256_slli_epi32(pack_bf16x8(a.hi), 16)));
}

static inline __m128 v_sum4(v16 a, v16 b, v16 c, v16 d) {
#define HALVES(x) _mm256_add_ps((x).lo, (x).hi)
#define QUARTERS(y) _mm_add_ps(_mm256_castps256_ps128(y), _mm256_extractf128_ps(y, 1))
    const __m128 a4 = QUARTERS(HALVES(a)), b4 = QUARTERS(HALVES(b)), c4 = QUARTERS(HALVES(c)), d4 = QUARTERS(HALVES(d));
#undef HALVES
#undef QUARTERS
    return _mm_hadd_ps(_mm_hadd_ps(a4, b4), _mm_hadd_ps(c4, d4));
}

static inline __m256 round_bf16_finite8(__m256 a) {
    const __m256i u = _mm256_castps_si256(a);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd);
    return _mm256_castsi256_ps(_mm256_and_si256(rounded, _mm256_set1_epi32((int)0xffff0000u)));
}
static inline v16 v_round_bf16_finite(v16 a) { return v_make(round_bf16_finite8(a.lo), round_bf16_finite8(a.hi)); }

static inline v16 v_load_i8(const int8_t *p) {
    const __m128i codes = _mm_loadu_si128((const __m128i *)p);
    return v_make(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes)),
                  _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(codes, 8))));
}

static inline __m256 load_e4m3x8(const uint8_t *p) { /* as the AVX-512 v_load_e4m3, 8 lanes */
    const __m256i bits = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    const __m256i magnitude = _mm256_and_si256(bits, _mm256_set1_epi32(0x7f));
    const __m256i biased = _mm256_add_epi32(_mm256_slli_epi32(magnitude, 20), _mm256_set1_epi32(120 << 23));
    const __m256 normal = _mm256_castsi256_ps(biased);
    const __m256 subnormal = _mm256_mul_ps(_mm256_cvtepi32_ps(magnitude), _mm256_set1_ps(1.0f / 512));
    const __m256i small = _mm256_cmpgt_epi32(_mm256_set1_epi32(8), magnitude);
    const __m256 value = _mm256_blendv_ps(normal, subnormal, _mm256_castsi256_ps(small));
    const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(0x80)), 24);
    return _mm256_castsi256_ps(_mm256_or_si256(_mm256_castps_si256(value), sign));
}
static inline v16 v_load_e4m3(const uint8_t *p) { return v_make(load_e4m3x8(p), load_e4m3x8(p + 8)); }

#endif

static inline void v_store_bf16(uint16_t *p, v16 a) { _mm256_storeu_si256((__m256i *)p, v_pack_bf16(a)); }

static inline float v_reduce_add(v16 a) {
    float four[4];
    _mm_storeu_ps(four, v_sum4(a, v_zero(), v_zero(), v_zero()));
    return four[0];
}

/* e^x in float32 for 16 lanes, to ~1 ulp: x = n ln2 + f (|f| <= ln2/2, ln2 in two parts), e^f by its
 * degree-7 Taylor polynomial, times 2^n. Inputs are clamped to [-104, 88.7] (0 and ~3.4e38 beyond). */
static inline v16 v_exp(v16 x) {
    x = v_min(v_max(x, v_set1(-104.0f)), v_set1(88.7f));
    const v16 n = v_round(v_mul(x, v_set1(1.44269504088896341f)));
    v16 f = v_fnmadd(n, v_set1(0.693145751953125f), x);
    f = v_fnmadd(n, v_set1(1.428606765330187045e-06f), f);
    v16 p = v_set1(1.0f / 5040);
    const float coefficients[] = {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
    for (int i = 0; i < 7; i++) p = v_fmadd(p, f, v_set1(coefficients[i]));
    return v_scale_pow2(p, n);
}

#endif
