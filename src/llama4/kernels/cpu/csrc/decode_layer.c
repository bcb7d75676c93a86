/* One decoder layer for rows that each carry one new token (a decode step's rows, or the tokens of one
 * sequence's prefill piece), bf16, in one call: what the layer's torch modules compute, without the per-op
 * cost of torch's dispatch and of Python between the products.
 *
 * h += attention(rms_norm(h)); h += ffn(rms_norm(h)), for each row independently. The products run on the
 * kernel this library is built with (amx_linear.c, or vec_linear.c for AVX-512 / AVX2: each row its own
 * one-row product; on AMX bit for bit as the torch path computes it), the vector glue on simd.h's lanes;
 * the rest (norms, RoPE, QK-norm, attention temperature, the KV-cache write, attention over the cached
 * keys, top-1 sigmoid routing, SwiGLU) is plain C that follows the torch path's float32 arithmetic and
 * rounds to bf16 where it rounds, up to summation order and exp: results agree with the torch path to
 * bf16 rounding, not bit for bit (tests/test_fused_decode.py states the tolerance). A row's result never
 * depends on the other rows of the call, so a prefill token equals its decode step bit for bit.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pool.h"
#include "simd.h"

#define MAX_ROWS 16
/* How long the pool's workers poll after a layer (see llama4_decode_layer) */
#define LAYER_GAP_NS 100000

int llama4_linear_groups(const uint64_t *weights, const int64_t *rows, int64_t groups, int64_t out_features,
                          int64_t in_features, const uint16_t *x, uint16_t *y, int threads);

/* What one layer holds (set once, when the weights are packed). Weights are addresses of their struct
 * llama4_weight (weights.h: bf16, int8 or int4, each weight its own); norm weights plain bf16 [dim]. */
struct llama4_layer {
    int64_t dim, heads, kv_heads, head_dim;
    int64_t use_rope, qk_norm, tune_temperature;
    int64_t num_experts; /* 0: a dense SwiGLU feed-forward (shared_* hold it) */
    int64_t hidden;      /* the feed-forward's width: every expert's, shared included (Llama 4), or the dense one's */
    double eps;
    const uint16_t *attn_norm, *ffn_norm;
    uint64_t qkv, wo, router;                 /* [(H + 2 Hkv) d, D], [D, H d], [E, D] */
    const uint64_t *gate_up, *down;           /* per expert: [2 hidden, D] (gate rows first), [D, hidden] */
    uint64_t shared_gate_up, shared_down;     /* the same shapes */
};

/* How a layer's cache stores an entry (one token's d keys or values of one KV head): bf16, or as
 * quant/kv_cache.py's KVFormat stores int8 / fp8 entries, d codes (int8, or float8_e4m3fn bits) then the
 * entry's bf16 scale, d + 2 bytes. */
enum { KV_BF16 = 0, KV_INT8 = 1, KV_FP8 = 2 };

/* One call: `rows` rows of the residual stream h [rows, D] (updated in place). Keys and values live in
 * stores where the entry in slot s of KV head g starts at byte g * head_stride + s * entry_bytes, in the
 * layer's kv_format; row r writes its new key/value to slot write[r] and attends to its count[r] entries
 * (the new one included): slots first[r], first[r] + 1, ... or, without `first`, the slots
 * gather[r * gather_width + j]. */
struct llama4_step {
    int64_t rows;
    uint16_t *h;
    uint8_t *k_store, *v_store;
    int64_t head_stride; /* bytes */
    const int64_t *write, *count, *first, *gather;
    int64_t gather_width;
    const float *rope;    /* complex rotations [rows, d/2] (re, im) */
    const float *q_scale; /* [rows] attention temperature, or NULL */
    int64_t threads;
    int64_t kv_format;   /* KV_BF16, KV_INT8 or KV_FP8: set per layer */
    int64_t entry_bytes; /* 2 d (bf16) or d + 2 */
};

/* torch's rms_norm of a bf16 row (float32 math, one rounding), then times a bf16 weight (another). */
static void rms_norm(const uint16_t *x, const uint16_t *weight, int64_t n, double eps, uint16_t *y) {
    double squares = 0;
    for (int64_t i = 0; i < n; i++) squares += (double)f32(x[i]) * f32(x[i]);
    const float scale = 1.0f / sqrtf((float)(squares / n) + (float)eps);
    for (int64_t i = 0; i < n; i++) {
        const float v = round_bf16(f32(x[i]) * scale);
        y[i] = weight ? bf16(v * f32(weight[i])) : bf16(v);
    }
}

/* Interleaved pairs (2j, 2j+1) times the unit complex rotation[j], in float32, rounded back to bf16. */
static void rotate(uint16_t *x, const float *rotation, int64_t d) {
    for (int64_t j = 0; j < d / 2; j++) {
        const float a = f32(x[2 * j]), b = f32(x[2 * j + 1]), c = rotation[2 * j], s = rotation[2 * j + 1];
        const float ac = a * c, bs = b * s, as = a * s, bc = b * c;
        x[2 * j] = bf16(ac - bs);
        x[2 * j + 1] = bf16(as + bc);
    }
}

/* float32 -> float8_e4m3fn bits, to nearest even, as torch converts (c10's fp8e4m3fn_from_fp32_value, so
 * that a cache written here holds the codes the torch layers write). Below e4m3's smallest normal, 2^-6,
 * adding 2^14 (whose float32 ulp, 2^-9, is e4m3's subnormal step) lets the float adder round to the nearest
 * subnormal code. */
static uint8_t e4m3(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    const uint32_t sign = bits & 0x80000000u;
    bits ^= sign;
    uint8_t code;
    if (bits >= 1087u << 20) { /* 480 or more (never: the encoder clamps to 448), NaN */
        code = 0x7f;
    } else if (bits < 121u << 23) {
        const uint32_t denormal_bits = 141u << 23;
        float denormal, sum;
        memcpy(&denormal, &denormal_bits, 4);
        memcpy(&f, &bits, 4);
        sum = f + denormal;
        memcpy(&bits, &sum, 4);
        code = (uint8_t)(bits - denormal_bits);
    } else {
        const uint32_t odd = (bits >> 20) & 1;
        bits += (uint32_t)(7 - 127) * (1u << 23) + 0x7ffffu + odd;
        code = (uint8_t)(bits >> 20);
    }
    return code | (uint8_t)(sign >> 24);
}

/* A new entry (d bf16 values) stored as the layer's cache stores it. int8 / fp8: bit for bit what
 * KVFormat.encode writes for the same values - scale = amax / qmax in float32, rounded to bf16 and up
 * one step where that rounded down (formats._stored_scale: no code clips), codes = value / scale (a true
 * division, as torch's, against 1 for an all-zero entry) rounded half to even and clamped to +-127 (int8)
 * or clamped to +-448 and converted (fp8). */
static void store_entry(const uint16_t *x, int64_t d, int64_t format, uint8_t *out) {
    if (format == KV_BF16) {
        memcpy(out, x, (size_t)d * 2);
        return;
    }
    float amax = 0;
    for (int64_t i = 0; i < d; i++) {
        const float a = fabsf(f32(x[i]));
        amax = a > amax ? a : amax;
    }
    const float qmax = format == KV_INT8 ? 127.0f : 448.0f, wanted = amax / qmax;
    uint16_t scale = bf16(wanted);
    if (f32(scale) < wanted) scale++; /* the next bf16 up (scale is positive) */
    const float divisor = scale ? f32(scale) : 1.0f;
    for (int64_t i = 0; i < d; i++) {
        float y = f32(x[i]) / divisor;
        y = y < -qmax ? -qmax : y > qmax ? qmax : y; /* clamping before rounding: the bounds are integral */
        out[i] = format == KV_INT8 ? (uint8_t)(int8_t)rintf(y) : e4m3(y);
    }
    memcpy(out + d, &scale, 2);
}

/* Lanes 16 l .. 16 l + 15 of a stored entry in float32, as the torch layers attend over it: bf16 as stored;
 * int8 / fp8 as KVFormat.decode gives bf16 attention, code x scale (exact in float32: 8 by 8 significant
 * bits at most) rounded once to bf16. */
static inline v16 load_entry(const uint8_t *entry, int64_t l, int64_t format, int64_t d) {
    if (format == KV_BF16) return v_load_bf16((const uint16_t *)entry + 16 * l);
    uint16_t scale;
    memcpy(&scale, entry + d, 2);
    const v16 codes = format == KV_INT8 ? v_load_i8((const int8_t *)entry + 16 * l) : v_load_e4m3(entry + 16 * l);
    return v_round_bf16_finite(v_mul(codes, v_set1(f32(scale)))); /* a stored scale and code are finite */
}

#define KEY_BLOCK 64  /* keys per block: converted to float32 once (16 KB at d = 64, 32 KB at d = 128) */
#define MAX_GROUP 8   /* query heads per KV head */
#define MAX_LANES 16  /* head_dim up to 256 */
#define SHARED_ROWS 4 /* rows over the same keys (one sequence's prefill tokens) attended together */

/* Rows that attend over the same entries (tokens of one sequence in a prefill piece), each with its own
 * query heads of one KV group (q[r]: `group` <= MAX_GROUP heads x d) and entry count n[r]: entry j in slot
 * slots[j], or first + j without slots, of the group's stores k/v. softmax(q k^T / sqrt(d)) v in float32,
 * the probabilities rounded to bf16 before they weight the values (as torch's CPU flash attention does
 * for bf16), each head's result rounded once -> out[r] [group, d].
 *
 * A row's arithmetic does not depend on the rows beside it: each score is the same lane sum (sum4, a
 * missing partner key counted as zeros), each softmax runs over the row's own scores, and each output
 * accumulates the row's entries in order. So a prefill token computes exactly what its decode step
 * (one row) computes, while the rows share each key block's conversion to float32 and each value load.
 * d is a multiple of 16, at most 16 * MAX_LANES. Scratch: scores rows x group x max(n), keys KEY_BLOCK x
 * d, acc rows x group x d floats. */
/* Entry j of a store (k or v): slot slots[j], or first + j without slots, `width` bytes each (names of the
 * functions below). */
#define ENTRY(base, j) ((base) + (slots ? slots[j] : first + (j)) * width)

/* scores[(r * group + g) * most + j] = q[r][g] . key j / sqrt(d) for j < n[r], one key block converted to
 * float32 at a time (decoded, for int8 / fp8 entries) and shared by the rows. */
static void score_keys(const uint16_t *const *q, const int64_t *n, int64_t rows, const uint8_t *k,
                       const int64_t *slots, int64_t first, int64_t format, int64_t width, int64_t group, int64_t d,
                       int64_t most, float *scores, float *keys) {
    const float scale = 1.0f / sqrtf((float)d);
    const int64_t lanes = d / 16;
    for (int64_t block = 0; block < most; block += KEY_BLOCK) {
        const int64_t end = block + KEY_BLOCK < most ? block + KEY_BLOCK : most;
        for (int64_t j = block; j < end; j++) {
            const uint8_t *kj = ENTRY(k, j);
            for (int64_t l = 0; l < lanes; l++)
                v_store(keys + (j - block) * d + 16 * l, load_entry(kj, l, format, d));
        }
        for (int64_t r = 0; r < rows; r++) {
            const int64_t stop = end < n[r] ? end : n[r];
            for (int64_t g = 0; g < group; g++) {
                v16 qv[MAX_LANES];
                for (int64_t l = 0; l < lanes; l++) qv[l] = v_load_bf16(q[r] + g * d + 16 * l);
                float *row = scores + (r * group + g) * most;
                int64_t j = block;
                for (; j + 4 <= stop; j += 4) {
                    const float *k0 = keys + (j - block) * d;
                    v16 a = v_zero(), b = a, c = a, e = a;
                    for (int64_t l = 0; l < lanes; l++) {
                        a = v_fmadd(qv[l], v_load(k0 + 16 * l), a);
                        b = v_fmadd(qv[l], v_load(k0 + d + 16 * l), b);
                        c = v_fmadd(qv[l], v_load(k0 + 2 * d + 16 * l), c);
                        e = v_fmadd(qv[l], v_load(k0 + 3 * d + 16 * l), e);
                    }
                    _mm_storeu_ps(row + j, _mm_mul_ps(v_sum4(a, b, c, e), _mm_set1_ps(scale)));
                }
                if (j < stop) { /* the last 1-3 keys, their missing partners zeros: the same lane sums */
                    v16 dot[4];
                    for (int i = 0; i < 4; i++) {
                        dot[i] = v_zero();
                        if (j + i >= stop) continue;
                        const float *kj = keys + (j + i - block) * d;
                        for (int64_t l = 0; l < lanes; l++) dot[i] = v_fmadd(qv[l], v_load(kj + 16 * l), dot[i]);
                    }
                    float four[4];
                    _mm_storeu_ps(four, _mm_mul_ps(v_sum4(dot[0], dot[1], dot[2], dot[3]), _mm_set1_ps(scale)));
                    for (int i = 0; j + i < stop; i++) row[j + i] = four[i];
                }
            }
        }
    }
}

/* The first count scores of a head become exp(score - max), rounded to bf16 in place; returns their sum
 * (of the unrounded values). */
static float softmax_numerators(float *row, int64_t count) {
    float top = -INFINITY;
    for (int64_t j = 0; j < count; j++) top = row[j] > top ? row[j] : top;
    const v16 shift = v_set1(top);
    v16 sum = v_zero();
    int64_t j = 0;
    for (; j + 16 <= count; j += 16) {
        const v16 p = v_exp(v_sub(v_load(row + j), shift));
        sum = v_add(sum, p);
        v_store(row + j, v_round_bf16(p));
    }
    if (j < count) { /* the last 1-15 scores, the lanes past them zeros in the sum */
        float tail[16] = {0};
        const int64_t left = count - j;
        memcpy(tail, row + j, (size_t)left * sizeof(float));
        v_store(tail, v_exp(v_sub(v_load(tail), shift)));
        for (int64_t i = left; i < 16; i++) tail[i] = 0;
        const v16 p = v_load(tail);
        sum = v_add(sum, p);
        v_store(tail, v_round_bf16(p));
        memcpy(row + j, tail, (size_t)left * sizeof(float));
    }
    return v_reduce_add(sum);
}

/* acc[h] [d] = sum over j < count[h] of weights[h][j] * value j, in entry order (heads share each value load).
 * int8 / fp8 entries are decoded a block at a time into `decoded` (KEY_BLOCK x d floats), once for all lanes. */
static void weigh_values(const uint8_t *v, const int64_t *slots, int64_t first, int64_t format, int64_t width,
                         int64_t d, int64_t most, int64_t heads, float *const *weights, const int64_t *count,
                         float *acc, float *decoded) {
    const int64_t lanes = d / 16;
    for (int64_t i = 0; i < heads * d; i++) acc[i] = 0;
    for (int64_t block = 0; block < most; block += KEY_BLOCK) {
        const int64_t end = block + KEY_BLOCK < most ? block + KEY_BLOCK : most;
        if (format != KV_BF16)
            for (int64_t j = block; j < end; j++)
                for (int64_t l = 0; l < lanes; l++)
                    v_store(decoded + (j - block) * d + 16 * l, load_entry(ENTRY(v, j), l, format, d));
        for (int64_t l = 0; l < lanes; l++) {
            v16 sums[SHARED_ROWS * MAX_GROUP];
            for (int64_t h = 0; h < heads; h++) sums[h] = v_load(acc + h * d + 16 * l);
            for (int64_t j = block; j < end; j++) {
                const v16 value = format == KV_BF16 ? v_load_bf16((const uint16_t *)ENTRY(v, j) + 16 * l)
                                                    : v_load(decoded + (j - block) * d + 16 * l);
                for (int64_t h = 0; h < heads; h++)
                    if (j < count[h]) sums[h] = v_fmadd(v_set1(weights[h][j]), value, sums[h]);
            }
            for (int64_t h = 0; h < heads; h++) v_store(acc + h * d + 16 * l, sums[h]);
        }
    }
}
#undef ENTRY

/* Rows that attend over the same entries (tokens of one sequence in a prefill piece), each with its own
 * query heads of one KV group (q[r]: `group` <= MAX_GROUP heads x d) and entry count n[r]: entry j in slot
 * slots[j], or first + j without slots, of the group's stores k/v. softmax(q k^T / sqrt(d)) v in float32,
 * the probabilities rounded to bf16 before they weight the values (as torch's CPU flash attention does
 * for bf16), each head's result rounded once -> out[r] [group, d].
 *
 * A row's arithmetic does not depend on the rows beside it: each score is the same lane sum (sum4, a
 * missing partner key counted as zeros), each softmax runs over the row's own scores, and each output
 * accumulates the row's entries in order. So a prefill token computes exactly what its decode step
 * (one row) computes, while the rows share each key block's conversion to float32 and each value load.
 * Entries are `width` bytes in `format` (KV_*). d is a multiple of 16, at most 16 * MAX_LANES. Scratch:
 * scores rows x group x max(n), keys KEY_BLOCK x d (a key block, then a decoded value block), acc
 * rows x group x d floats. */
static void attend(const uint16_t *const *q, const int64_t *n, int64_t rows, const uint8_t *k, const uint8_t *v,
                   const int64_t *slots, int64_t first, int64_t format, int64_t width, int64_t group, int64_t d,
                   float *scores, float *keys, float *acc, uint16_t *const *out) {
    const int64_t heads = rows * group;
    int64_t most = 0;
    for (int64_t r = 0; r < rows; r++) most = n[r] > most ? n[r] : most;
    score_keys(q, n, rows, k, slots, first, format, width, group, d, most, scores, keys);
    float total[SHARED_ROWS * MAX_GROUP], *weights[SHARED_ROWS * MAX_GROUP];
    int64_t count[SHARED_ROWS * MAX_GROUP];
    for (int64_t h = 0; h < heads; h++) {
        weights[h] = scores + h * most, count[h] = n[h / group];
        total[h] = softmax_numerators(weights[h], count[h]);
    }
    weigh_values(v, slots, first, format, width, d, most, heads, weights, count, acc, keys);
    for (int64_t h = 0; h < heads; h++)
        for (int64_t i = 0; i < d; i++) out[h / group][(h % group) * d + i] = bf16(acc[h * d + i] / total[h]);
}

/* Groups of at most MAX_ROWS rows for `count` rows of one weight pair, appended at `groups`; the new count. */
static int64_t add_groups(uint64_t *first_weights, uint64_t *second_weights, int64_t *counts, int64_t groups,
                          uint64_t first_weight, uint64_t second_weight, int64_t count) {
    for (; count > 0; count -= MAX_ROWS, groups++) {
        first_weights[groups] = first_weight;
        if (second_weights) second_weights[groups] = second_weight;
        counts[groups] = count < MAX_ROWS ? count : MAX_ROWS;
    }
    return groups;
}

/* y [rows, O] = x [rows, I] times one weight, any number of rows (in groups of MAX_ROWS, one call); 0 on
 * success, 1 out of memory. */
static int product(uint64_t weight, int64_t out_features, int64_t in_features, const uint16_t *x, int64_t rows,
                   uint16_t *y, int threads) {
    uint64_t weights[(rows + MAX_ROWS - 1) / MAX_ROWS];
    int64_t counts[(rows + MAX_ROWS - 1) / MAX_ROWS];
    const int64_t groups = add_groups(weights, NULL, counts, 0, weight, 0, rows);
    return llama4_linear_groups(weights, counts, groups, out_features, in_features, x, y, threads);
}

/* silu(gate) * up per row of gu [rows, 2w] (gate first), each op rounded to bf16 as torch's -> act [rows, w].
 * w is a multiple of 16 (the kernel's input widths are multiples of 32). */
static void swiglu_activation(const uint16_t *gu, int64_t rows, int64_t w, uint16_t *act) {
    const v16 one = v_set1(1.0f);
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < w; i += 16) {
            const v16 g = v_load_bf16(gu + r * 2 * w + i);
            const v16 e = v_exp(v_sub(v_zero(), g));
            const v16 silu = v_round_bf16(v_div(g, v_add(one, e)));
            const v16 y = v_mul(silu, v_load_bf16(gu + r * 2 * w + w + i));
            v_store_bf16(act + r * w + i, y);
        }
}

static int64_t largest_count(const struct llama4_step *s) {
    int64_t most = 0;
    for (int64_t r = 0; r < s->rows; r++)
        if (s->count[r] > most) most = s->count[r];
    return most;
}

/* The attention of one row block (rows of block_start[b] .. block_start[b + 1] - 1) over one KV group. */
struct attention_job {
    const struct llama4_layer *L;
    const struct llama4_step *S;
    const uint16_t *qkv;
    uint16_t *attended;
    const int64_t *block_start;
    float *scores;
    int64_t per_thread, most, width;
};

static void attention_item(void *ctx, int64_t task, int thread) {
    const struct attention_job *J = ctx;
    const struct llama4_layer *L = J->L;
    const struct llama4_step *S = J->S;
    const int64_t Hkv = L->kv_heads, d = L->head_dim, group = L->heads / Hkv, most = J->most;
    const int64_t b = task / Hkv, g = task % Hkv, r0 = J->block_start[b], count = J->block_start[b + 1] - r0;
    float *mine = J->scores + (int64_t)thread * J->per_thread;
    const uint16_t *q[SHARED_ROWS];
    uint16_t *out[SHARED_ROWS];
    for (int64_t i = 0; i < count; i++) {
        q[i] = J->qkv + (r0 + i) * J->width + g * group * d;
        out[i] = J->attended + (r0 + i) * L->heads * d + g * group * d;
    }
    const int64_t *entries = S->first ? NULL : S->gather + r0 * S->gather_width;
    attend(q, S->count + r0, count, S->k_store + g * S->head_stride, S->v_store + g * S->head_stride, entries,
           S->first ? S->first[r0] : 0, S->kv_format, S->entry_bytes, group, d, mine,
           mine + SHARED_ROWS * group * most, mine + SHARED_ROWS * group * most + KEY_BLOCK * d, out);
}

/* The attention half for every row: h += wo(attention(rms_norm(h))). All rows' keys and values are written
 * before any row attends; a row sees only its count[r] entries. */
static int attention_half(const struct llama4_layer *L, const struct llama4_step *S, int threads) {
    const int64_t rows = S->rows, D = L->dim, H = L->heads, Hkv = L->kv_heads, d = L->head_dim, group = H / Hkv;
    const int64_t width = (H + 2 * Hkv) * d;
    const int64_t most = largest_count(S);
    const int64_t per_thread = SHARED_ROWS * group * (most + d) + KEY_BLOCK * d;
    uint16_t *x = aligned_alloc(64, (size_t)(rows * (D + width + H * d + D)) * 2 + 64 * 4);
    float *scores = malloc((size_t)(threads * per_thread) * sizeof(float) + 64);
    int64_t *block_start = malloc((size_t)(rows + 1) * sizeof(int64_t));
    if (!x || !scores || !block_start) {
        free(x);
        free(scores);
        free(block_start);
        return 1;
    }
    uint16_t *qkv = x + rows * D, *attended = qkv + rows * width, *o = attended + rows * H * d;
    for (int64_t r = 0; r < rows; r++) rms_norm(S->h + r * D, L->attn_norm, D, L->eps, x + r * D);
    int failed = product(L->qkv, width, D, x, rows, qkv, threads);
    for (int64_t r = 0; r < rows && !failed; r++) {
        uint16_t *heads = qkv + r * width; /* q heads, then k heads, then v heads */
        for (int64_t i = 0; i < H + Hkv; i++) {
            uint16_t *head = heads + i * d;
            if (L->use_rope) rotate(head, S->rope + r * d, d);
            if (L->qk_norm) rms_norm(head, NULL, d, L->eps, head);
        }
        if (L->tune_temperature)
            for (int64_t i = 0; i < H * d; i++) heads[i] = bf16(f32(heads[i]) * S->q_scale[r]);
        for (int64_t g = 0; g < Hkv; g++) {
            const int64_t at = g * S->head_stride + S->write[r] * S->entry_bytes;
            store_entry(heads + (H + g) * d, d, S->kv_format, S->k_store + at);
            store_entry(heads + (H + Hkv + g) * d, d, S->kv_format, S->v_store + at);
        }
    }
    /* row blocks: up to SHARED_ROWS consecutive rows over the same entries (one sequence's tokens) */
    int64_t blocks = 0;
    for (int64_t r = 0; r < rows && !failed; r++) {
        const int shares = r > 0 && r - block_start[blocks - 1] < SHARED_ROWS
                           && (S->first ? S->first[r] == S->first[r - 1] : S->gather_width == 0);
        if (!shares) block_start[blocks++] = r;
    }
    block_start[blocks] = rows;
    struct attention_job job = {L, S, qkv, attended, block_start, scores, per_thread, most, width};
    if (!failed) llama4_pool_parallel(blocks * Hkv, threads, attention_item, &job);
    failed = failed || product(L->wo, D, H * d, attended, rows, o, threads);
    for (int64_t r = 0; r < rows && !failed; r++)
        for (int64_t i = 0; i < D; i++) S->h[r * D + i] = bf16(f32(S->h[r * D + i]) + f32(o[r * D + i]));
    free(x);
    free(scores);
    free(block_start);
    return failed;
}

/* The feed-forward half for every row: h += ffn(rms_norm(h)). MoE: the shared expert on x plus the top-1
 * expert (by raw router logit; ties to the lowest index) on x times the expert's sigmoid score. The shared
 * expert's rows and the chosen experts' rows, sorted by expert (token order kept), go through one kernel
 * call per matrix, in groups of at most MAX_ROWS rows per weight (Llama 4's shared expert has the routed
 * experts' width). */
static int ffn_half(const struct llama4_layer *L, const struct llama4_step *S, int threads) {
    const int64_t rows = S->rows, D = L->dim, E = L->num_experts, w = L->hidden;
    const int64_t most_groups = 2 * ((rows + MAX_ROWS - 1) / MAX_ROWS) + E;
    uint16_t *x = aligned_alloc(64, (size_t)(2 * rows * (2 * D + 3 * w) + rows * (E > 0 ? E : 1)) * 2 + 64 * 8);
    int64_t *ints = malloc((size_t)(3 * rows + 2 * E + 3 * most_groups) * sizeof(int64_t));
    float *score = malloc((size_t)rows * sizeof(float));
    if (!x || !ints || !score) {
        free(x);
        free(ints);
        free(score);
        return 1;
    }
    uint16_t *scaled = x + rows * D, *gu = scaled + rows * D, *act = gu + 2 * rows * 2 * w, *y = act + 2 * rows * w,
             *logits = y + 2 * rows * D;
    int64_t *expert_of = ints, *slot_of = expert_of + rows, *counts = slot_of + rows, *per_expert = counts + most_groups,
            *next = per_expert + E;
    uint64_t *gate_up = (uint64_t *)(next + E), *down = gate_up + most_groups;
    for (int64_t r = 0; r < rows; r++) rms_norm(S->h + r * D, L->ffn_norm, D, L->eps, x + r * D);
    int64_t groups = add_groups(gate_up, down, counts, 0, L->shared_gate_up, L->shared_down, rows);
    int64_t routed = 0; /* rows after x (score-scaled, sorted by expert) */
    if (E > 0) {
        if (product(L->router, E, D, x, rows, logits, threads)) {
            free(x);
            free(ints);
            free(score);
            return 1;
        }
        memset(per_expert, 0, (size_t)E * sizeof(int64_t));
        for (int64_t r = 0; r < rows; r++) {
            int64_t best = 0;
            for (int64_t e = 1; e < E; e++)
                if (f32(logits[r * E + e]) > f32(logits[r * E + best])) best = e;
            expert_of[r] = best;
            per_expert[best]++;
            score[r] = round_bf16(1.0f / (1.0f + expf(-f32(logits[r * E + best]))));
        }
        for (int64_t e = 0; e < E; e++) {
            next[e] = routed;
            routed += per_expert[e];
            groups = add_groups(gate_up, down, counts, groups, L->gate_up[e], L->down[e], per_expert[e]);
        }
        for (int64_t r = 0; r < rows; r++) {
            const int64_t slot = slot_of[r] = next[expert_of[r]]++;
            for (int64_t i = 0; i < D; i++) scaled[slot * D + i] = bf16(f32(x[r * D + i]) * score[r]);
        }
    }
    /* x and the sorted scaled rows are contiguous: one call per matrix for all groups */
    int failed = llama4_linear_groups(gate_up, counts, groups, 2 * w, D, x, gu, threads);
    if (!failed) swiglu_activation(gu, rows + routed, w, act);
    failed = failed || llama4_linear_groups(down, counts, groups, D, w, act, y, threads);
    const uint16_t *routed_y = y + rows * D;
    for (int64_t r = 0; r < rows && !failed; r++)
        for (int64_t i = 0; i < D; i++) {
            float out = f32(y[r * D + i]);
            if (E > 0) out = round_bf16(out + f32(routed_y[slot_of[r] * D + i]));
            S->h[r * D + i] = bf16(f32(S->h[r * D + i]) + out);
        }
    free(x);
    free(ints);
    free(score);
    return failed;
}

/* One decoder layer for every row of the call; 0 on success, 1 if memory ran out (h may then hold the
 * attention half: the caller discards the pass). */
int llama4_decode_layer(const struct llama4_layer *layer, const struct llama4_step *step) {
    const int threads = step->threads > 0 ? (int)step->threads : 1;
    const int failed = attention_half(layer, step, threads) || ffn_half(layer, step, threads);
    /* the next layer (or the output head) follows after the caller's Python between them: keep the workers
     * polling through it rather than waking them from their sleep for its first product */
    if (threads > 1) llama4_pool_warm(LAYER_GAP_NS);
    return failed;
}
