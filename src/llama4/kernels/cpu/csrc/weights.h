/* What a product reads: one [O, I] weight in the kernels' blocked layouts, described once when the weight is
 * packed (the Python side keeps the struct alive as long as the weight). Every product entry and the fused
 * layer take weights as addresses of this struct, so one call may mix formats (int4 experts beside an int8
 * or bf16 shared expert).
 *
 * All layouts cut the weight into blocks of 64 outputs x 32 inputs (outputs zero-padded to a multiple of
 * 64), the 64-output block columns one after another, each column's input blocks in order:
 *   LLAMA4_BF16: oneDNN's AB16b64a2b, 16 input pairs x 64 outputs x the pair (bf16), 4 KB a block;
 *   LLAMA4_INT8: 32 inputs x 64 outputs, signed codes (1 byte each), 2 KB a block; one scale per output
 *                (`scale` [O/64][1][64]);
 *   LLAMA4_INT4: unsigned codes 0..15, two a byte, 1 KB a block, stored as eight 8-output columns one after
 *                another (each column's input blocks in order, 128 bytes a block: quant_linear.c's int4 cells);
 *                a scale and a zero point per output and `group` inputs (`scale` [O/64][I/group][64]; `zero`
 *                the same, uint8, or NULL: 8, the symmetric codes).
 * A code stands for scale * (code - zero) (int8: scale * code). Scales are float32 or (`bf16_scales`) bf16.
 */
#ifndef LLAMA4_WEIGHTS_H
#define LLAMA4_WEIGHTS_H

#include <stdint.h>

enum { LLAMA4_BF16 = 0, LLAMA4_INT8 = 1, LLAMA4_INT4 = 2 };

struct llama4_weight {
    int64_t format;
    int64_t group; /* LLAMA4_INT4: inputs per scale, a multiple of 32 */
    int64_t bf16_scales;
    const void *data, *scale;
    const uint8_t *zero;
};

/* A call's rows as the quantized products read them (llama4_prepare_rows, each row alone): xf [rows][I] the
 * bf16 rows in float32 (int8 weights); xq [rows][I] each 32-input block's int8 codes, xd [rows][I/32] its
 * scale and xqsum [rows][I/32] its code sum (int4 weights). A pointer is NULL where no weight of the call
 * needs it. */
struct llama4_rows {
    float *xf, *xd, *xqsum;
    int8_t *xq;
};

static inline struct llama4_rows llama4_rows_at(const struct llama4_rows *X, int64_t row, int64_t in_features) {
    const int64_t blocks = in_features / 32;
    struct llama4_rows at = {X->xf ? X->xf + row * in_features : 0, X->xd ? X->xd + row * blocks : 0,
                             X->xqsum ? X->xqsum + row * blocks : 0, X->xq ? X->xq + row * in_features : 0};
    return at;
}

/* One block column of a quantized weight (quant_linear.c): outputs first..first+63 (those below
 * out_features) of `rows` (at most 16) rows, rounded to bf16 into y (row stride out_features). */
void llama4_quant_column(const struct llama4_weight *w, int64_t ob, int64_t in_features, const struct llama4_rows *X,
                         int64_t rows, uint16_t *y, int64_t out_features, int64_t first);
/* x [rows, I] bf16 -> the parts of X that are not NULL. */
void llama4_prepare_rows(const uint16_t *x, int64_t rows, int64_t in_features, const struct llama4_rows *X);

#endif
