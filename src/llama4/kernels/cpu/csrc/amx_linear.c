/* y = x W^T for up to 16 rows of x, on a bf16 weight in oneDNN's packed layout (AB16b64a2b), with AMX.
 *
 * oneDNN packs an [O, I] linear weight as blocks of 64 outputs x 32 inputs, each block 16 rows of
 * (64 outputs x an input pair): the layout AMX's TDPBF16PS takes as its B operand, 16 outputs (64
 * bytes) at a time with a 256-byte row stride. The 64 outputs of one block over all inputs are
 * contiguous, so the product streams the weight once, front to back, with software prefetch; the rows
 * of x ride along in the A tile at no extra cost. Each output accumulates its input pairs in order in
 * a float32 tile, then rounds once to bf16 (nearest even): the same arithmetic as oneDNN's one-row
 * product, bit for bit, and a row's result does not depend on how many rows come with it.
 */
#include <cpuid.h>
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define OUT_BLOCK 64
#define IN_BLOCK 32
#define MAX_ROWS 16
#define PREFETCH_BYTES 8192
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

struct tile_config {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

/* 1 if this CPU and kernel let the process use AMX-BF16 (asking the kernel for the tile state). */
int llama4_kernel_supported(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    if (!(d & (1u << 24)) || !(d & (1u << 22)) || !(b & (1u << 16))) return 0; /* AMX-TILE, AMX-BF16, AVX512F */
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

static void configure_tiles(int rows) {
    struct tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 4; t++) { cfg.rows[t] = rows; cfg.colsb[t] = 64; } /* 0-3 C: rows x 16 float32 */
    cfg.rows[4] = rows; cfg.colsb[4] = 64;                                 /* 4 A: rows x 32 bf16 inputs */
    cfg.rows[5] = cfg.rows[6] = 16; cfg.colsb[5] = cfg.colsb[6] = 64;      /* 5-6 B: 16 pairs x 16 outputs */
    _tile_loadconfig(&cfg);
}

/* One block of 64 outputs for `rows` rows of x: y[m, first:first+64] for m < rows (tiles configured for
 * `rows` rows). */
static void block_product(const uint16_t *block, int64_t in_blocks, int64_t in_features, const uint16_t *x,
                          int64_t rows, uint16_t *y, int64_t out_features, int64_t first, float *out) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t b = 0; b < in_blocks; b++) {
        const uint16_t *part = block + b * (OUT_BLOCK * IN_BLOCK);
        const char *ahead = (const char *)part + PREFETCH_BYTES;
        for (int line = 0; line < OUT_BLOCK * IN_BLOCK * 2 / 64; line++)
            _mm_prefetch(ahead + 64 * line, _MM_HINT_T0);
        _tile_loadd(4, x + b * IN_BLOCK, in_features * 2);
        _tile_loadd(5, part, OUT_BLOCK * 4);
        _tile_dpbf16ps(0, 4, 5);
        _tile_loadd(6, part + 32, OUT_BLOCK * 4);
        _tile_dpbf16ps(1, 4, 6);
        _tile_loadd(5, part + 64, OUT_BLOCK * 4);
        _tile_dpbf16ps(2, 4, 5);
        _tile_loadd(6, part + 96, OUT_BLOCK * 4);
        _tile_dpbf16ps(3, 4, 6);
    }
    _tile_stored(0, out, OUT_BLOCK * 4);
    _tile_stored(1, out + 16, OUT_BLOCK * 4);
    _tile_stored(2, out + 32, OUT_BLOCK * 4);
    _tile_stored(3, out + 48, OUT_BLOCK * 4);
    const int64_t count = out_features - first < OUT_BLOCK ? out_features - first : OUT_BLOCK;
    for (int64_t m = 0; m < rows; m++)
        for (int j = 0; j < 4 && count > 16 * j; j++) {
            const int64_t n = count - 16 * j;
            const __mmask16 mask = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
            const __m256bh v = _mm512_cvtneps_pbh(_mm512_load_ps(out + m * OUT_BLOCK + 16 * j));
            _mm256_mask_storeu_epi16(y + m * out_features + first + 16 * j, mask, (__m256i)v);
        }
}

/* One block of 64 outputs for up to 16 rows. Tiles are configured for the block and released after it: no
 * tile state is left for the OS to save, nor for oneDNN to find. */
static void block_column(const uint16_t *block, int64_t in_blocks, int64_t in_features, const uint16_t *x,
                         int64_t rows, uint16_t *y, int64_t out_features, int64_t first) {
    float out[MAX_ROWS * OUT_BLOCK] __attribute__((aligned(64)));
    configure_tiles((int)rows);
    block_product(block, in_blocks, in_features, x, rows, y, out_features, first, out);
    _tile_release();
}

#include "linear_groups.h"
