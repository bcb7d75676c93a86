/* The products' entry points, the same for every kernel: amx_linear.c and vec_linear.c each define
 *   static void block_column(const uint16_t *block, int64_t in_blocks, int64_t in_features, const uint16_t *x,
 *                            int64_t rows, uint16_t *y, int64_t out_features, int64_t first);
 * (one block of 64 outputs of a bf16 weight, starting at output `first`, for `rows` rows of x, rounded into
 * y) and then include this file; int8 and int4 weights go to quant_linear.c, in every build. */
#ifndef LLAMA4_LINEAR_GROUPS_H
#define LLAMA4_LINEAR_GROUPS_H

#include <stdint.h>

#include "pool.h"
#include "weights.h"

#include <stdlib.h>

struct groups_job {
    const uint64_t *weights;
    const int64_t *rows, *offsets;
    int64_t out_blocks, in_blocks, in_features, out_features;
    const uint16_t *x;
    struct llama4_rows prepared; /* x prepared for quantized weights (llama4_prepare_rows) */
    uint16_t *y;
};

static void groups_item(void *ctx, int64_t item, int thread) {
    (void)thread;
    const struct groups_job *J = ctx;
    const int64_t g = item / J->out_blocks, ob = item % J->out_blocks, rows = J->rows[g], at = J->offsets[g];
    if (rows == 0) return;
    const struct llama4_weight *w = (const struct llama4_weight *)(uintptr_t)J->weights[g];
    uint16_t *y = J->y + at * J->out_features;
    if (w->format == LLAMA4_BF16) {
        const uint16_t *block = (const uint16_t *)w->data + ob * J->in_blocks * (64 * 32);
        block_column(block, J->in_blocks, J->in_features, J->x + at * J->in_features, rows, y, J->out_features,
                     ob * 64);
    } else {
        const struct llama4_rows X = llama4_rows_at(&J->prepared, at, J->in_features);
        llama4_quant_column(w, ob, J->in_features, &X, rows, y, J->out_features, ob * 64);
    }
}

#define PREPARE_ROWS 16
#define PREPARE_ALONE (1 << 16)

struct prepare_job {
    const uint16_t *x;
    struct llama4_rows prepared;
    int64_t rows, in_features;
};

static void prepare_item(void *ctx, int64_t item, int thread) {
    (void)thread;
    const struct prepare_job *P = ctx;
    const int64_t first = item * PREPARE_ROWS, count = P->rows - first < PREPARE_ROWS ? P->rows - first : PREPARE_ROWS;
    const struct llama4_rows X = llama4_rows_at(&P->prepared, first, P->in_features);
    llama4_prepare_rows(P->x + first * P->in_features, count, P->in_features, &X);
}

/* The calling thread's scratch for prepared rows, grown as needed and kept (calls come from one thread at a
 * time: the model's). */
static void *prepared_rows(int64_t bytes) {
    static __thread void *scratch;
    static __thread int64_t capacity;
    if (bytes > capacity) {
        void *grown = realloc(scratch, (size_t)bytes);
        if (!grown) return NULL;
        scratch = grown;
        capacity = bytes;
    }
    return scratch;
}

/* Groups of rows of x, each times its own [O, I] weight (weights[g]: the address of a struct llama4_weight;
 * formats may differ): rows [offset_g, offset_g + rows[g]) of x [sum(rows), I] times weights[g] -> the same
 * rows of y [sum(rows), O] (the chosen experts of a decode batch, rows sorted by expert). 0 <= rows[g] <= 16;
 * I a multiple of 32. One parallel pass over every group's output blocks (64 outputs each), on up to
 * `threads` threads. 0 on success, 1 if memory for the prepared rows ran out (y not written). */
int llama4_linear_groups(const uint64_t *weights, const int64_t *rows, int64_t groups, int64_t out_features,
                         int64_t in_features, const uint16_t *x, uint16_t *y, int threads) {
    int64_t offsets[groups > 0 ? groups : 1], total = 0, int8 = 0, int4 = 0;
    for (int64_t g = 0; g < groups; total += rows[g], g++) {
        offsets[g] = total;
        const int64_t format = ((const struct llama4_weight *)(uintptr_t)weights[g])->format;
        int8 |= format == LLAMA4_INT8;
        int4 |= format == LLAMA4_INT4;
    }
    struct groups_job job = {weights, rows, offsets, (out_features + 63) / 64, in_features / 32, in_features,
                             out_features, x, {0, 0, 0, 0}, y};
    if ((int8 || int4) && total > 0) {
        const int64_t values = total * in_features, blocks = values / 32;
        char *scratch = prepared_rows((int8 ? values * 4 : 0) + (int4 ? blocks * 8 + values : 0));
        if (!scratch) return 1;
        if (int8) {
            job.prepared.xf = (float *)scratch;
            scratch += values * 4;
        }
        if (int4) {
            job.prepared.xd = (float *)scratch;
            job.prepared.xqsum = job.prepared.xd + blocks;
            job.prepared.xq = (int8_t *)(job.prepared.xqsum + blocks);
        }
        struct prepare_job prep = {x, job.prepared, total, in_features};
        if (values <= PREPARE_ALONE) /* a decode step's rows: not worth waking the pool */
            llama4_prepare_rows(x, total, in_features, &job.prepared);
        else /* a prefill's: as large as the whole input, prepared in parallel */
            llama4_pool_parallel((total + PREPARE_ROWS - 1) / PREPARE_ROWS, threads, prepare_item, &prep);
    }
    llama4_pool_parallel(groups * job.out_blocks, threads, groups_item, &job);
    return 0;
}

/* y [rows, O] bf16 (row stride O) = x [rows, I] bf16 (row stride I; I a multiple of 32; 1 <= rows <= 16)
 * times the [O, I] weight w (a struct llama4_weight): one group. 0 on success, 1 out of memory. */
int llama4_linear(const struct llama4_weight *w, int64_t out_features, int64_t in_features, const uint16_t *x,
                  int64_t rows, uint16_t *y, int threads) {
    const uint64_t weight = (uint64_t)(uintptr_t)w;
    return llama4_linear_groups(&weight, &rows, 1, out_features, in_features, x, y, threads);
}

#endif
