/* The products' entry points, the same for every kernel: amx_linear.c and vec_linear.c each define
 *   static void block_column(const uint16_t *block, int64_t in_blocks, int64_t in_features, const uint16_t *x,
 *                            int64_t rows, uint16_t *y, int64_t out_features, int64_t first);
 * (one block of 64 outputs, starting at output `first`, for `rows` rows of x, rounded into y) and then
 * include this file. */
#ifndef LLAMA4_LINEAR_GROUPS_H
#define LLAMA4_LINEAR_GROUPS_H

#include <stdint.h>

#include "pool.h"

struct groups_job {
    const uint64_t *weights;
    const int64_t *rows, *offsets;
    int64_t out_blocks, in_blocks, in_features, out_features;
    const uint16_t *x;
    uint16_t *y;
};

static void groups_item(void *ctx, int64_t item, int thread) {
    (void)thread;
    const struct groups_job *J = ctx;
    const int64_t g = item / J->out_blocks, ob = item % J->out_blocks;
    if (J->rows[g] == 0) return;
    const uint16_t *block = (const uint16_t *)(uintptr_t)J->weights[g] + ob * J->in_blocks * (64 * 32);
    block_column(block, J->in_blocks, J->in_features, J->x + J->offsets[g] * J->in_features, J->rows[g],
                 J->y + J->offsets[g] * J->out_features, J->out_features, ob * 64);
}

/* Groups of rows of x, each times its own packed [O, I] weight (the chosen experts of a decode batch, rows
 * sorted by expert): rows [offset_g, offset_g + rows[g]) of x [sum(rows), I] times weights[g] -> the same
 * rows of y [sum(rows), O]. 0 <= rows[g] <= 16; I a multiple of 32. One parallel pass over every group's
 * output blocks (64 outputs each), on up to `threads` threads. */
void llama4_linear_groups(const uint64_t *weights, const int64_t *rows, int64_t groups, int64_t out_features,
                          int64_t in_features, const uint16_t *x, uint16_t *y, int threads) {
    int64_t offsets[groups > 0 ? groups : 1];
    for (int64_t g = 0, at = 0; g < groups; at += rows[g], g++) offsets[g] = at;
    struct groups_job job = {weights, rows, offsets, (out_features + 63) / 64, in_features / 32, in_features,
                             out_features, x, y};
    llama4_pool_parallel(groups * job.out_blocks, threads, groups_item, &job);
}

/* y [rows, O] bf16 (row stride O) = x [rows, I] bf16 (row stride I; I a multiple of 32; 1 <= rows <= 16)
 * times the packed weight w of an [O, I] linear: one group. */
void llama4_linear(const uint16_t *w, int64_t out_features, int64_t in_features, const uint16_t *x, int64_t rows,
                   uint16_t *y, int threads) {
    const uint64_t weight = (uint64_t)(uintptr_t)w;
    llama4_linear_groups(&weight, &rows, 1, out_features, in_features, x, y, threads);
}

#endif
