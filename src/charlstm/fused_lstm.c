/* The recurrence of one LSTM layer, forward and backward, on x86 CPUs with bf16 instructions.
 *
 * A character LSTM spends its time in a loop of T small steps: per step a [B, K] x [K, 4H]
 * product (K = input + hidden width) and a few element-wise gate operations on [B, 4H].
 * Library kernels pay a fixed cost per call that dwarfs the arithmetic at these sizes, so this
 * file runs the whole loop in one call: each step's product in bf16 with fp32 sums and the
 * input projection folded in, and the gates in AVX-512 on sums still in L1. The products run
 * on one of two back ends: Intel's AMX tiles (Xeon since Sapphire Rapids) or AVX-512 BF16 dot
 * products (AMD Zen 4 and later, Intel Cooper Lake); both read the same packed weights.
 * What is not sequential in time, the weight gradient, is left to one large PyTorch product,
 * for which the backward writes the gates' gradient transposed.
 *
 * Layouts (row-major unless stated; B is a multiple of 16, H of 32, K = E + H with E a
 * multiple of 32; gate order i, f, g, o as in torch.nn.LSTM):
 *   xh     [T, B, K] bf16: row t holds [x_t | h_{t-1}]; the kernel writes h_t into row t + 1
 *   packed weights: a [K, N] matrix as [N/16][K/32] blocks of 16 x 32 bf16, each block the
 *          pairs-of-rows ("VNNI") layout an AMX B tile loads; each 64-byte row of a block is
 *          also the B operand of one AVX-512 BF16 dot product (16 columns x 2 rows)
 *   saved  [T][H/16][B] blocks of 16 units: c in fp32, then i, f, g, o and tanh(c) in fp16
 *          (all five lie in [-1, 1], where fp16 keeps 11 bits), for the backward
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define HAVE_X86_BUILD 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define HAVE_X86_BUILD 0
#endif

#if HAVE_X86_BUILD

#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define TARGET_AMX \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")))
/* What the backward needs of 16 units of one row at one step. */
typedef struct {
    float c[16];
    uint16_t i[16], f[16], g[16], o[16], tc[16];
} saved_block;
_Static_assert(sizeof(saved_block) == 16 * 14, "SAVED_BYTES_PER_UNIT below is 14");

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* AVX-512 (F, BW, VL, BF16) present and the OS saving AVX-512 state. */
static int avx512_bf16_usable(void) {
    unsigned a, b, c, d, xcr0_low, xcr0_high;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1)) return 0; /* OSXSAVE */
    __asm__("xgetbv" : "=a"(xcr0_low), "=d"(xcr0_high) : "c"(0));
    if ((xcr0_low & 0xe6) != 0xe6) return 0; /* SSE, AVX and AVX-512 state enabled */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    if (!((b >> 16) & (b >> 30) & (b >> 31) & 1)) return 0; /* F, BW, VL */
    return __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 5) & 1); /* avx512_bf16 */
}

/* AMX-BF16 present and the kernel willing to hand this process tile state (on top of the
 * AVX-512 that the gates use). */
static int amx_usable(void) {
    unsigned a, b, c, d;
    if (!avx512_bf16_usable() || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    if (!((d >> 22) & 1) || !((d >> 24) & 1)) return 0; /* amx-bf16, amx-tile */
    const long arch_req_xcomp_perm = 0x1023, xfeature_xtiledata = 18;
    return syscall(SYS_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata) == 0;
}

/* Every tile 16 rows of 64 bytes: A tiles 16 x 32 bf16, B tiles 16 x 32 (pairs), C 16 x 16 fp32.
 * A constant in static storage: the compiler cannot see that ldtilecfg reads a local struct
 * and may drop the stores that fill it. */
static const tile_config TILES __attribute__((aligned(64))) = {
    .palette_id = 1,
    .colsb = {64, 64, 64, 64, 64, 64, 64, 64},
    .rows = {16, 16, 16, 16, 16, 16, 16, 16},
};

TARGET_AMX static void configure_tiles(void) { _tile_loadconfig(&TILES); }

TARGET_AMX static void release_tiles(void) { _tile_release(); }

TARGET static inline __m512 exp_ps(__m512 x) {
    /* 2^n e^r with x = n ln2 + r, |r| <= ln2 / 2, e^r by its Taylor series to r^6: relative
     * error under 2e-7. scalef turns huge |n| into inf or 0, so no clamping is needed. */
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

TARGET static inline __m512 sigmoid_ps(__m512 x) {
    /* 1 / (1 + e^-x) with a 14-bit reciprocal refined by one Newton step (division is slow);
     * x is kept above -80 so that 1 + e^-x stays finite and the refinement never sees inf. */
    x = _mm512_max_ps(x, _mm512_set1_ps(-80.0f));
    __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), x)));
    __m512 y = _mm512_rcp14_ps(d);
    return _mm512_mul_ps(y, _mm512_fnmadd_ps(d, y, _mm512_set1_ps(2.0f)));
}

TARGET static inline __m512 tanh_ps(__m512 x) {
    return _mm512_fmsub_ps(sigmoid_ps(_mm512_add_ps(x, x)), _mm512_set1_ps(2.0f),
                           _mm512_set1_ps(1.0f));
}

TARGET static inline void store_bf16(uint16_t *dst, __m512 v) {
    _mm256_storeu_si256((__m256i *)dst, (__m256i)_mm512_cvtneps_pbh(v));
}

TARGET static inline __m512 load_bf16(const uint16_t *src) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)src));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

TARGET static inline void store_fp16(uint16_t *dst, __m512 v) {
    _mm256_storeu_si256((__m256i *)dst,
                        _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

TARGET static inline __m512 load_fp16(const uint16_t *src) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)src));
}

/* Dropout on the layer's output, drawn from a counter-based hash of (seed, element index) so
 * that the backward recomputes the forward's mask instead of storing it. Element (t, b, j)
 * has index t * step_stride + b * H + j, in 64 bits so that T * B * H >= 2^32 cannot wrap
 * around to an earlier element's mask. */
typedef struct {
    uint32_t threshold; /* keep an element if its 24-bit hash is below this: keep * 2^24 */
    float scale;        /* 1 / keep */
    uint32_t seed_a, seed_b;
    uint64_t step_stride; /* B * H: every step its own mask */
} dropout_mask;

/* The index of element k (= b * H + j) of step t in its mask's sequence. */
static inline uint64_t mask_index(const dropout_mask *m, int t, size_t k) {
    return (uint64_t)t * m->step_stride + k;
}

/* mix32 on one word: a bijection, and mix32(0) = 0 (see dropout_factor). */
static inline uint32_t mix32_scalar(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    return x ^ (x >> 16);
}

TARGET static inline __m512i mix32(__m512i x) {
    /* A 32-bit integer hash with good avalanche (xor-shift-multiply, twice). */
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7feb352d));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32((int)0x846ca68bu));
    return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}

/* The mask times the scale for elements [first, first + 16): 0 or 1 / keep each. `first` is a
 * multiple of 16 (H is of 32), so the 16 share their high 32 bits: the lanes hash the low 32 as
 * ever, and a nonzero high word moves the second seed, so that masks below 2^32 stay the same
 * and those above do not repeat them. */
TARGET static inline __m512 dropout_factor(const dropout_mask *m, uint64_t first) {
    const uint32_t high = (uint32_t)(first >> 32);
    const uint32_t seed_b = high ? m->seed_b + mix32_scalar(high) : m->seed_b;
    __m512i index = _mm512_add_epi32(_mm512_set1_epi32((int)(uint32_t)first),
                                     _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
                                                       13, 14, 15));
    __m512i x = mix32(_mm512_xor_si512(index, _mm512_set1_epi32((int)m->seed_a)));
    x = mix32(_mm512_add_epi32(x, _mm512_set1_epi32((int)seed_b)));
    __mmask16 keep = _mm512_cmplt_epu32_mask(_mm512_srli_epi32(x, 8),
                                             _mm512_set1_epi32((int)m->threshold));
    return _mm512_maskz_mov_ps(keep, _mm512_set1_ps(m->scale));
}

/* What one forward step reads and writes (see lstm_forward). */
typedef struct {
    int B, H, K;
    const uint16_t *a;     /* [B, K]: [x_t | h_{t-1}] */
    const uint16_t *w;     /* packed [K, 4H] */
    const float *bias;     /* [4H], or with ids: */
    const int32_t *ids;    /* [B]: each row's input id, whose row of `bias` [V, 4H] it adds */
    const float *c0;       /* [B, H], the cell state before step 0 */
    const saved_block *s_prev; /* what the previous step saved, NULL at step 0 */
    saved_block *saved;        /* what this step saves: [H / 16][B] */
    uint16_t *h_out;       /* [B, H]: h after dropout */
    const dropout_mask *drop; /* NULL: no dropout */
    uint64_t first;        /* index of this step's first output element, for the mask */
    uint16_t *h_next;      /* row t + 1 of xh (at column E), NULL at the last step */
    float *h_last, *c_last; /* [B, H] at the last step, else NULL */
} forward_args;

/* The gates of row b for units [16u, 16u + 16) from their pre-activations pre[0..3] (i, f, g,
 * o; 16 floats each, 64-byte aligned): the new cell and hidden state, and what the backward
 * needs. */
TARGET static void forward_row(const forward_args *p, int u, int b, const float *const pre[4]) {
    const int H = p->H, j = 16 * u;
    const float *bias = p->ids ? p->bias + (size_t)p->ids[b] * 4 * H : p->bias;
    __m512 i = sigmoid_ps(_mm512_add_ps(_mm512_load_ps(pre[0]), _mm512_loadu_ps(bias + j)));
    __m512 f = sigmoid_ps(_mm512_add_ps(_mm512_load_ps(pre[1]), _mm512_loadu_ps(bias + H + j)));
    __m512 g = tanh_ps(_mm512_add_ps(_mm512_load_ps(pre[2]), _mm512_loadu_ps(bias + 2 * H + j)));
    __m512 o = sigmoid_ps(_mm512_add_ps(_mm512_load_ps(pre[3]), _mm512_loadu_ps(bias + 3 * H + j)));
    __m512 cp = p->s_prev ? _mm512_loadu_ps(p->s_prev[(size_t)u * p->B + b].c)
                          : _mm512_loadu_ps(p->c0 + (size_t)b * H + j);
    __m512 c = _mm512_fmadd_ps(f, cp, _mm512_mul_ps(i, g));
    __m512 tc = tanh_ps(c);
    __m512 h = _mm512_mul_ps(o, tc);
    saved_block *s = p->saved + (size_t)u * p->B + b;
    _mm512_storeu_ps(s->c, c);
    store_fp16(s->i, i);
    store_fp16(s->f, f);
    store_fp16(s->g, g);
    store_fp16(s->o, o);
    store_fp16(s->tc, tc);
    const __m512 kept =
        p->drop ? _mm512_mul_ps(h, dropout_factor(p->drop, p->first + (size_t)b * H + j)) : h;
    store_bf16(p->h_out + (size_t)b * H + j, kept);
    if (p->h_next) store_bf16(p->h_next + (size_t)b * p->K + j, h);
    if (p->h_last) {
        _mm512_storeu_ps(p->h_last + (size_t)b * H + j, h);
        _mm512_storeu_ps(p->c_last + (size_t)b * H + j, c);
    }
}

/* forward_row on rows [from, to) of unit block u, whose gates lie in AMX tiles:
 * tiles[4 * (b / 16) + gate][b % 16]. */
TARGET static void forward_tile_rows(const forward_args *p, int u, int from, int to,
                                     float (*tiles)[16][16]) {
    for (int b = from; b < to; b++) {
        const int tile = 4 * (b / 16), row = b % 16;
        const float *const pre[4] = {tiles[tile][row], tiles[tile + 1][row],
                                     tiles[tile + 2][row], tiles[tile + 3][row]};
        forward_row(p, u, b, pre);
    }
}

/* One step of the forward on AMX, unit block by unit block: the four gates of units
 * [16u, 16u + 16) for every row go to a scratch of tiles, and while AMX computes block u the
 * vector units finish block u - 1 a few rows at a time, so the two kinds of work overlap.
 * scratch: 2 x (B / 16) x 4 tiles of 16 x 16 fp32. */
TARGET_AMX static void forward_step_amx(const forward_args *p, float (*scratch)[16][16]) {
    const int B = p->B, K = p->K, kc_n = K / 32, units = p->H / 16, row_tiles = B / 16;
    const int steps = (B + 31) / 32 * 2 * kc_n; /* tile iterations per unit block */
    int pending = -1, done = 0;                 /* unit block u - 1 and its rows finished */
    for (int u = 0; u < units; u++) {
        float (*tiles)[16][16] = scratch + (u & 1) * row_tiles * 4;
        float (*prev)[16][16] = scratch + ((u + 1) & 1) * row_tiles * 4;
        int step = 0;
        for (int m0 = 0; m0 < B; m0 += 32) {
            const int two = m0 + 16 < B, rt = m0 / 16;
            for (int pass = 0; pass < 2; pass++) { /* gates (i, f), then (g, o) */
                const int gate = 2 * pass;
                const uint16_t *w0 = p->w + (size_t)(gate * units + u) * kc_n * 512;
                const uint16_t *w1 = p->w + (size_t)((gate + 1) * units + u) * kc_n * 512;
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                for (int kc = 0; kc < kc_n; kc++) {
                    _tile_loadd(4, p->a + (size_t)m0 * K + kc * 32, K * 2);
                    _tile_loadd(6, w0 + (size_t)kc * 512, 64);
                    _tile_loadd(7, w1 + (size_t)kc * 512, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_dpbf16ps(1, 4, 7);
                    if (two) {
                        _tile_loadd(5, p->a + (size_t)(m0 + 16) * K + kc * 32, K * 2);
                        _tile_dpbf16ps(2, 5, 6);
                        _tile_dpbf16ps(3, 5, 7);
                    }
                    step++;
                    if (pending >= 0) { /* the share of block u - 1's rows due by now */
                        const int due = (int)((int64_t)B * step / steps);
                        forward_tile_rows(p, pending, done, due, prev);
                        done = due;
                    }
                }
                _tile_stored(0, tiles[4 * rt + gate], 64);
                _tile_stored(1, tiles[4 * rt + gate + 1], 64);
                if (two) {
                    _tile_stored(2, tiles[4 * rt + 4 + gate], 64);
                    _tile_stored(3, tiles[4 * rt + 4 + gate + 1], 64);
                }
            }
        }
        if (pending >= 0) forward_tile_rows(p, pending, done, B, prev);
        pending = u;
        done = 0;
    }
    forward_tile_rows(p, pending, 0, B, scratch + ((units - 1) & 1) * row_tiles * 4);
}

/* Rows that the AVX-512 products compute together: their sums for four column blocks take 24
 * of the 32 vector registers, leaving room for the four weight vectors and a broadcast. */
#define GROUP 6

/* sums[r][q] = row r of a (rows of stride lda) times column block q of a packed matrix,
 * whose block q starts at w[q] and holds `pairs` vectors of 16 columns x 2 rows. Inlined with a
 * constant `rows` so that the sums stay in registers. */
TARGET static inline __attribute__((always_inline)) void dot_rows(int rows, const uint16_t *a,
                                                                  size_t lda, int pairs,
                                                                  const uint16_t *const w[4],
                                                                  float (*sums)[4][16]) {
    __m512 acc[GROUP][4];
#pragma GCC unroll 6
    for (int r = 0; r < rows; r++)
#pragma GCC unroll 4
        for (int q = 0; q < 4; q++) acc[r][q] = _mm512_setzero_ps();
    for (int k = 0; k < pairs; k++) {
        __m512bh b[4];
#pragma GCC unroll 4
        for (int q = 0; q < 4; q++) b[q] = (__m512bh)_mm512_loadu_si512(w[q] + 32 * k);
#pragma GCC unroll 6
        for (int r = 0; r < rows; r++) {
            int32_t pair;
            memcpy(&pair, a + r * lda + 2 * k, sizeof pair);
            const __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
            for (int q = 0; q < 4; q++) acc[r][q] = _mm512_dpbf16_ps(acc[r][q], x, b[q]);
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < rows; r++)
#pragma GCC unroll 4
        for (int q = 0; q < 4; q++) _mm512_store_ps(sums[r][q], acc[r][q]);
}

/* dot_rows for 1 to GROUP rows, each count compiled on its own. */
TARGET static void dot_group(int rows, const uint16_t *a, size_t lda, int pairs,
                             const uint16_t *const w[4], float (*sums)[4][16]) {
    switch (rows) {
    case 6: dot_rows(6, a, lda, pairs, w, sums); break;
    case 5: dot_rows(5, a, lda, pairs, w, sums); break;
    case 4: dot_rows(4, a, lda, pairs, w, sums); break;
    case 3: dot_rows(3, a, lda, pairs, w, sums); break;
    case 2: dot_rows(2, a, lda, pairs, w, sums); break;
    default: dot_rows(1, a, lda, pairs, w, sums); break;
    }
}

/* One step of the forward with AVX-512 BF16 dot products: for each unit block, GROUP rows at
 * a time, the four gates' sums in registers, then their gates while the sums are in L1. */
TARGET static void forward_step_avx512(const forward_args *p) {
    const int units = p->H / 16, kc_n = p->K / 32;
    float sums[GROUP][4][16] __attribute__((aligned(64)));
    for (int u = 0; u < units; u++) {
        const uint16_t *w[4];
        for (int q = 0; q < 4; q++) w[q] = p->w + (size_t)(q * units + u) * kc_n * 512;
        for (int b0 = 0; b0 < p->B; b0 += GROUP) {
            const int rows = p->B - b0 < GROUP ? p->B - b0 : GROUP;
            dot_group(rows, p->a + (size_t)b0 * p->K, p->K, p->K / 2, w, sums);
            for (int r = 0; r < rows; r++) {
                const float *const pre[4] = {sums[r][0], sums[r][1], sums[r][2], sums[r][3]};
                forward_row(p, u, b0 + r, pre);
            }
        }
    }
}

/* forward(T, B, E, H, xh, w, bias, ids, c0, saved, h_out, h_last, c_last, drop, amx)
 *   xh [T, B, E + H] bf16: x_t in every row, h0 in row 0; h_t is written into row t + 1
 *   w: the packed [E + H, 4H] matrix [W_ih | W_hh]^T; bias [4H] fp32: b_ih + b_hh
 *   ids [T, B] int32 or NULL: with ids, bias is a [V, 4H] table and row b at step t adds
 *   its row ids[t][b] (a layer whose input is a lookup: E = 0 and the table holds W_ih x + b)
 *   h_out [T, B, H] bf16 out, after dropout; h_last, c_last [B, H] fp32 out: the state after
 *   step T (no dropout on the output); drop: the output's mask, NULL for none;
 *   amx: the products on AMX tiles, else AVX-512 BF16
 * From Python each array arrives as its address and size in bytes, checked (see py_forward). */
TARGET static int lstm_forward(int T, int B, int E, int H, uint16_t *xh, const uint16_t *w,
                               const float *bias, const int32_t *ids, const float *c0,
                               saved_block *saved,
                               uint16_t *h_out, float *h_last, float *c_last,
                               const dropout_mask *drop, int amx) {
    const int K = E + H;
    float (*scratch)[16][16] = NULL;
    if (amx) {
        scratch = aligned_alloc(64, (size_t)2 * (B / 16) * 4 * 1024);
        if (!scratch) return -1;
        configure_tiles();
    }
    for (int t = 0; t < T; t++) {
        const int last = t == T - 1;
        forward_args p = {
            .B = B, .H = H, .K = K,
            .a = xh + (size_t)t * B * K, .w = w, .bias = bias, .c0 = c0,
            .ids = ids ? ids + (size_t)t * B : NULL,
            .s_prev = t > 0 ? saved + (size_t)(t - 1) * B * (H / 16) : NULL,
            .saved = saved + (size_t)t * B * (H / 16),
            .h_out = h_out + (size_t)t * B * H,
            .h_next = last ? NULL : xh + (size_t)(t + 1) * B * K + E,
            .h_last = last ? h_last : NULL, .c_last = last ? c_last : NULL,
            .drop = drop, .first = drop ? mask_index(drop, t, 0) : 0,
        };
        if (amx)
            forward_step_amx(&p, scratch);
        else
            forward_step_avx512(&p);
    }
    if (amx) {
        release_tiles();
        free(scratch);
    }
    return 0;
}

/* r = the transpose of the 16 x 16 matrix of 32-bit words `rows`. */
TARGET static void transpose_words(const float (*rows)[16], __m512 *r) {
    __m512 t[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_load_ps(rows[i]);
    for (int i = 0; i < 16; i += 2) { /* interleave 32-bit, then 64-bit, then 128-bit lanes */
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
        __m512d c = _mm512_castps_pd(t[i + 2]), d = _mm512_castps_pd(t[i + 3]);
        r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    }
}

/* The 16 x 16 block `rows` (fp32) transposed, in bf16, into 16 rows of `out` (row stride ld). */
TARGET static void store_columns(const float (*rows)[16], uint16_t *out, size_t ld) {
    __m512 r[16];
    transpose_words(rows, r);
    for (int i = 0; i < 16; i++) store_bf16(out + (size_t)i * ld, r[i]);
}

/* out[B, N] = a[B, 4H] bf16 x w (packed [4H, N]) on AMX: columns [0, E) go to dx in bf16
 * (row stride E), columns [E, E + H) to dh in fp32 (row stride H). */
TARGET_AMX static void backward_product_amx(int B, int E, int H, const uint16_t *a, const uint16_t *w,
                                    uint16_t *dx, float *dh) {
    float wide[32][32] __attribute__((aligned(64))); /* dx tiles on their way to bf16 */
    const int G = 4 * H, kc_n = G / 32, N = E + H;
    for (int m0 = 0; m0 < B; m0 += 32) {
        const int two = m0 + 16 < B;
        for (int n0 = 0; n0 < N; n0 += 32) {
            const uint16_t *w0 = w + (size_t)(n0 / 16) * kc_n * 512;
            const uint16_t *w1 = w0 + (size_t)kc_n * 512;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int kc = 0; kc < kc_n; kc++) {
                _tile_loadd(4, a + (size_t)m0 * G + kc * 32, G * 2);
                _tile_loadd(6, w0 + (size_t)kc * 512, 64);
                _tile_loadd(7, w1 + (size_t)kc * 512, 64);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 4, 7);
                if (two) {
                    _tile_loadd(5, a + (size_t)(m0 + 16) * G + kc * 32, G * 2);
                    _tile_dpbf16ps(2, 5, 6);
                    _tile_dpbf16ps(3, 5, 7);
                }
            }
            float *dst = n0 < E ? wide[0] : dh + (size_t)m0 * H + (n0 - E);
            const int ld = n0 < E ? 32 : H;
            _tile_stored(0, dst, ld * 4);
            _tile_stored(1, dst + 16, ld * 4);
            if (two) {
                _tile_stored(2, dst + 16 * ld, ld * 4);
                _tile_stored(3, dst + 16 * ld + 16, ld * 4);
            }
            if (n0 < E) {
                for (int r = 0; r < (two ? 32 : 16); r++) {
                    uint16_t *row = dx + (size_t)(m0 + r) * E + n0;
                    store_bf16(row, _mm512_load_ps(wide[r]));
                    store_bf16(row + 16, _mm512_load_ps(wide[r] + 16));
                }
            }
        }
    }
}

/* backward_product_amx with AVX-512 BF16 dot products, four column blocks and GROUP rows at
 * a time. */
TARGET static void backward_product_avx512(int B, int E, int H, const uint16_t *a,
                                           const uint16_t *w, uint16_t *dx, float *dh) {
    const int G = 4 * H, kc_n = G / 32, blocks = (E + H) / 16;
    float sums[GROUP][4][16] __attribute__((aligned(64)));
    for (int n = 0; n < blocks; n += 4) {
        const uint16_t *wq[4]; /* past the last block, repeat it: computed, never stored */
        for (int q = 0; q < 4; q++)
            wq[q] = w + (size_t)(n + q < blocks ? n + q : blocks - 1) * kc_n * 512;
        for (int b0 = 0; b0 < B; b0 += GROUP) {
            const int rows = B - b0 < GROUP ? B - b0 : GROUP;
            dot_group(rows, a + (size_t)b0 * G, G, G / 2, wq, sums);
            for (int r = 0; r < rows; r++)
                for (int q = 0; q < 4 && n + q < blocks; q++) {
                    const int column = 16 * (n + q);
                    const __m512 v = _mm512_load_ps(sums[r][q]);
                    if (column < E)
                        store_bf16(dx + (size_t)(b0 + r) * E + column, v);
                    else
                        _mm512_storeu_ps(dh + (size_t)(b0 + r) * H + column - E, v);
                }
        }
    }
}

/* backward(T, B, E, H, dh_out, w_back, saved, c0, dg_t, ld, dx, dh, dc, dbias, ids, drop, amx)
 *   dh_out [T, B, H] bf16: gradient of the layer's output (after dropout) at every step
 *   dh, dc [B, H] fp32: on entry the gradient of the final state, on exit that of the first
 *   dg_t [4H, ld] bf16 out: the gradient of the gate pre-activations, transposed (column
 *        t * B + b for row b at step t), so that the weight gradient is one plain product
 *   dx [T, B, E] bf16 out: gradient of the layer's input; dbias [4H] fp32, accumulated
 *   ids [T, B] int32 or NULL: with ids (a lookup layer), dbias is the [V, 4H] table's gradient,
 *   and row b at step t accumulates into its row ids[t][b]
 *   drop: the forward's mask, recomputed from its seed
 *   amx: the products on AMX tiles, else AVX-512 BF16
 * From Python each array arrives as its address and size in bytes, checked (see py_backward). */
TARGET static int lstm_backward(int T, int B, int E, int H, const uint16_t *dh_out,
                                const uint16_t *w, const saved_block *saved, const float *c0,
                                uint16_t *dg_t, size_t ld, uint16_t *dx, float *dh, float *dc,
                                float *dbias, const int32_t *ids, const dropout_mask *drop,
                                int amx) {
    const int G = 4 * H, units = H / 16;
    const __m512 one = _mm512_set1_ps(1.0f);
    uint16_t *dg = aligned_alloc(64, (size_t)B * G * 2); /* this step's, row-major: an A operand */
    float (*block)[16][16] = aligned_alloc(64, 4 * 16 * 16 * 4); /* 16 rows x 16 units x 4 gates */
    if (!dg || !block) {
        free(dg);
        free(block);
        return -1;
    }
    if (amx) configure_tiles();
    for (int t = T - 1; t >= 0; t--) {
        const saved_block *s_now = saved + (size_t)t * B * (H / 16);
        const saved_block *s_prev = t > 0 ? saved + (size_t)(t - 1) * B * (H / 16) : NULL;
        for (int u = 0; u < units; u++) {
            const int j = 16 * u;
            __m512 sum[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                             _mm512_setzero_ps()};
            for (int b = 0; b < B; b++) {
                const saved_block *s = s_now + (size_t)u * B + b;
                const size_t k = (size_t)b * H + j;
                __m512 i = load_fp16(s->i), f = load_fp16(s->f);
                __m512 g = load_fp16(s->g), o = load_fp16(s->o), tc = load_fp16(s->tc);
                __m512 cp = s_prev ? _mm512_loadu_ps(s_prev[(size_t)u * B + b].c)
                                   : _mm512_loadu_ps(c0 + k);
                __m512 from_out = load_bf16(dh_out + (size_t)t * B * H + k);
                if (drop)
                    from_out = _mm512_mul_ps(from_out,
                                             dropout_factor(drop, mask_index(drop, t, k)));
                __m512 dht = _mm512_add_ps(from_out, _mm512_loadu_ps(dh + k));
                __m512 dct = _mm512_fmadd_ps(_mm512_mul_ps(dht, o), _mm512_fnmadd_ps(tc, tc, one),
                                             _mm512_loadu_ps(dc + k));
                __m512 d[4] = {
                    _mm512_mul_ps(_mm512_mul_ps(dct, g), _mm512_fnmadd_ps(i, i, i)),
                    _mm512_mul_ps(_mm512_mul_ps(dct, cp), _mm512_fnmadd_ps(f, f, f)),
                    _mm512_mul_ps(_mm512_mul_ps(dct, i), _mm512_fnmadd_ps(g, g, one)),
                    _mm512_mul_ps(_mm512_mul_ps(dht, tc), _mm512_fnmadd_ps(o, o, o)),
                };
                _mm512_storeu_ps(dc + k, _mm512_mul_ps(dct, f));
                for (int q = 0; q < 4; q++) {
                    store_bf16(dg + (size_t)b * G + q * H + j, d[q]);
                    _mm512_store_ps(block[q][b % 16], d[q]);
                    if (ids) {
                        float *dt = dbias + (size_t)ids[(size_t)t * B + b] * G + q * H + j;
                        _mm512_storeu_ps(dt, _mm512_add_ps(_mm512_loadu_ps(dt), d[q]));
                    } else {
                        sum[q] = _mm512_add_ps(sum[q], d[q]);
                    }
                }
                if (b % 16 == 15) /* 16 rows done: their gradients as columns of dg_t */
                    for (int q = 0; q < 4; q++)
                        store_columns(block[q], dg_t + (size_t)(q * H + j) * ld + (size_t)t * B +
                                                    (b - 15), ld);
            }
            for (int q = 0; q < 4 && !ids; q++) {
                float *db = dbias + q * H + j;
                _mm512_storeu_ps(db, _mm512_add_ps(_mm512_loadu_ps(db), sum[q]));
            }
        }
        if (amx)
            backward_product_amx(B, E, H, dg, w, dx + (size_t)t * B * E, dh);
        else
            backward_product_avx512(B, E, H, dg, w, dx + (size_t)t * B * E, dh);
    }
    if (amx) release_tiles();
    free(dg);
    free(block);
    return 0;
}

/* Columns [c0, c0 + 16) of row n of [W_ih | 0 | W_hh] (fp32, 4H x (E + H) with W_ih's E
 * columns padded to Ep): a 16-column chunk lies in one of the three parts, or straddles the end
 * of W_ih, which a masked load handles. */
TARGET static __m512 stacked_row(const float *w_ih, int e, const float *w_hh, int ep, int h,
                                 int n, int c0) {
    if (c0 >= ep) return _mm512_loadu_ps(w_hh + (size_t)n * h + (c0 - ep));
    if (c0 >= e) return _mm512_setzero_ps();
    const __mmask16 keep = e - c0 >= 16 ? 0xffff : (__mmask16)((1u << (e - c0)) - 1);
    return _mm512_maskz_loadu_ps(keep, w_ih + (size_t)n * e + c0);
}

/* pack(w_ih, w_hh, E, Ep, H, forward, backward): the packed bf16 layouts of the stacked weights
 * [W_ih | 0 | W_hh] (4H x K, K = Ep + H): `forward` packs its transpose (K x 4H), the B
 * operand of the forward's product, `backward` the matrix itself (4H x K). */
TARGET static void pack_weights(const float *w_ih, const float *w_hh, int e, int ep, int h,
                                uint16_t *forward, uint16_t *backward) {
    const int k_all = ep + h, g_all = 4 * h;
    /* forward: block (n / 16, k / 32) row r holds the pairs (W[n][k], W[n][k + 1]) of
     * k = 32 kc + 2r for n in the block's 16 rows: a transpose of 16 x 16 words. */
    float words[16][16] __attribute__((aligned(64)));
    for (int nb = 0; nb < g_all / 16; nb++)
        for (int kc = 0; kc < k_all / 32; kc++) {
            for (int c = 0; c < 16; c++) {
                const int n = 16 * nb + c;
                __m512 lo = stacked_row(w_ih, e, w_hh, ep, h, n, 32 * kc);
                __m512 hi = stacked_row(w_ih, e, w_hh, ep, h, n, 32 * kc + 16);
                _mm512_store_ps(words[c], _mm512_castsi512_ps((__m512i)_mm512_cvtne2ps_pbh(hi, lo)));
            }
            uint16_t *dst = forward + ((size_t)nb * (k_all / 32) + kc) * 512;
            __m512 r[16];
            transpose_words(words, r);
            for (int i = 0; i < 16; i++) _mm512_storeu_ps((float *)(dst + 32 * i), r[i]);
        }
    /* backward: block (n / 16, k / 32) row r interleaves rows k = 32 kc + 2r and k + 1 of W at
     * the block's 16 columns n. */
    const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                           24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
                                           16, 0);
    for (int nb = 0; nb < k_all / 16; nb++)
        for (int kc = 0; kc < g_all / 32; kc++) {
            uint16_t *dst = backward + ((size_t)nb * (g_all / 32) + kc) * 512;
            for (int r = 0; r < 16; r++) {
                const int k = 32 * kc + 2 * r;
                __m512 even = stacked_row(w_ih, e, w_hh, ep, h, k, 16 * nb);
                __m512 odd = stacked_row(w_ih, e, w_hh, ep, h, k + 1, 16 * nb);
                __m512i both = (__m512i)_mm512_cvtne2ps_pbh(odd, even);
                _mm512_storeu_si512(dst + 32 * r, _mm512_permutexvar_epi16(pairs, both));
            }
        }
}

#endif /* HAVE_X86_BUILD */

/* The back ends this CPU and OS can run, as bits: decided on first use. */
enum { USES_AVX512 = 1, USES_AMX = 2 };
static int usable = -1;

static int usable_backends(void) {
    if (usable < 0) {
#if HAVE_X86_BUILD
        usable = (avx512_bf16_usable() ? USES_AVX512 : 0) | (amx_usable() ? USES_AMX : 0);
#else
        usable = 0;
#endif
    }
    return usable;
}

static PyObject *py_backends(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    const int found = usable_backends();
    if (found & USES_AMX) return Py_BuildValue("(ss)", "amx", "avx512");
    if (found & USES_AVX512) return Py_BuildValue("(s)", "avx512");
    return PyTuple_New(0);
}

/* The kernel can run with the products on AMX (amx = 1) or on AVX-512 BF16 (amx = 0). */
static int check_usable(int amx) {
    if (!(usable_backends() & (amx ? USES_AMX : USES_AVX512))) {
        PyErr_SetString(PyExc_RuntimeError, amx ? "this CPU cannot run the LSTM kernel on AMX"
                                                : "this CPU has no AVX-512 BF16 for the LSTM kernel");
        return 0;
    }
    return 1;
}

#if HAVE_X86_BUILD
/* A mask keeping each element with probability `keep` (no mask for keep >= 1), fresh at every
 * step of the sequence. */
static const dropout_mask *make_mask(dropout_mask *m, double keep, unsigned long long seed,
                                     int B, int H) {
    if (keep >= 1.0) return NULL;
    m->step_stride = (uint64_t)B * (uint64_t)H;
    m->threshold = (uint32_t)(keep * 16777216.0 + 0.5);
    m->scale = (float)(1.0 / keep);
    m->seed_a = (uint32_t)seed;
    m->seed_b = (uint32_t)(seed >> 32);
    return m;
}

/* out[b * H + j] = the mask's factor (0 or 1 / keep) for element (b, j) of step t, as the
 * kernel draws it. */
TARGET static void fill_mask(const dropout_mask *m, int t, int B, int H, float *out) {
    for (size_t k = 0; k < (size_t)B * H; k += 16)
        _mm512_storeu_ps(out + k, dropout_factor(m, mask_index(m, t, k)));
}
#endif

/* The kernel indexes in int with these bounds (and T * B * H in 64 bits), and wants B, E and
 * H in multiples of its tiles. */
static int check_shape(int T, int B, int E, int H) {
    if (T < 1) {
        PyErr_SetString(PyExc_ValueError, "LSTM kernel: a sequence of no steps has nothing to run");
        return 0;
    }
    if (B <= 0 || B % 16 || E < 0 || E % 32 || H <= 0 || H % 32) {
        PyErr_SetString(PyExc_ValueError, "LSTM kernel shapes: B % 16, E % 32 and H % 32 must be 0");
        return 0;
    }
    if (B > (1 << 20) || E > (1 << 16) || H > (1 << 16)) {
        PyErr_SetString(PyExc_ValueError, "LSTM kernel shapes: B <= 2^20, E and H <= 2^16");
        return 0;
    }
    return 1;
}

/* A dropout mask keeps each element with a probability in [0, 1] (1 and above: no mask). */
static int check_keep(double keep) {
    if (!(keep >= 0.0)) {
        PyErr_SetString(PyExc_ValueError, "LSTM kernel: a dropout rate must lie in [0, 1]");
        return 0;
    }
    return 1;
}

/* Memory the caller hands over: its address (tensor.data_ptr()) and the bytes it owns there.
 * The kernel derives every access from T, B, E and H, so each buffer is checked to hold what
 * those shapes make it touch: a wrong size is an error here, never a write past its end. */
typedef struct {
    unsigned long long at, bytes;
} buffer;

/* a * b, saturating: a size that overflows is one no buffer holds. */
static unsigned long long times(unsigned long long a, unsigned long long b) {
    return a && b > ULLONG_MAX / a ? ULLONG_MAX : a * b;
}

static int check_size(const buffer *b, unsigned long long need, const char *name) {
    if (b->bytes < need || (need && !b->at)) {
        PyErr_Format(PyExc_ValueError,
                     "LSTM kernel: %s holds %llu bytes where its shape needs %llu", name,
                     b->bytes, need);
        return 0;
    }
    return 1;
}

/* Every id in [0, vocab), checked before the kernel reads or writes any table row by id. */
static int check_ids(const buffer *ids, unsigned long long count, unsigned long long vocab) {
    const int32_t *id = (const int32_t *)(uintptr_t)ids->at;
    for (unsigned long long n = 0; n < count; n++)
        if (id[n] < 0 || (unsigned long long)id[n] >= vocab) {
            PyErr_Format(PyExc_IndexError, "LSTM kernel: id %d lies outside the table of %llu rows",
                         (int)id[n], vocab);
            return 0;
        }
    return 1;
}

/* The rows of a lookup layer's table (V, 4H) fp32, or of its gradient: as many as it holds. */
static unsigned long long table_rows(const buffer *table, int H) {
    return table->bytes / times(16, (unsigned long long)H);
}

#define BUFFER "KK"
#define PARTS(b) &(b).at, &(b).bytes

static PyObject *py_forward(PyObject *self, PyObject *args) {
    (void)self;
    int T, B, E, H, amx;
    buffer xh, w, bias, ids, c0, saved, h_out, h_last, c_last;
    unsigned long long seed;
    double keep;
    if (!PyArg_ParseTuple(args, "iiii" BUFFER BUFFER BUFFER BUFFER BUFFER BUFFER BUFFER BUFFER
                          BUFFER "dKp", &T, &B, &E, &H, PARTS(xh), PARTS(w), PARTS(bias),
                          PARTS(ids), PARTS(c0), PARTS(saved), PARTS(h_out), PARTS(h_last),
                          PARTS(c_last), &keep, &seed, &amx))
        return NULL;
    if (!check_usable(amx) || !check_shape(T, B, E, H) || !check_keep(keep)) return NULL;
    const unsigned long long K = (unsigned long long)E + H, G = 4ull * H;
    const unsigned long long rows = times(T, B), units = times(rows, H), state = 4ull * B * H;
    if (!check_size(&xh, times(times(rows, K), 2), "xh") || !check_size(&w, K * G * 2, "w") ||
        !check_size(&bias, G * 4, "bias") ||
        !check_size(&ids, ids.at ? times(rows, 4) : 0, "ids") || !check_size(&c0, state, "c0") ||
        !check_size(&saved, times(units, 14), "saved") ||
        !check_size(&h_out, times(units, 2), "h_out") || !check_size(&h_last, state, "h_last") ||
        !check_size(&c_last, state, "c_last"))
        return NULL;
    if (ids.at && !check_ids(&ids, rows, table_rows(&bias, H))) return NULL;
#if HAVE_X86_BUILD
    dropout_mask mask;
    const dropout_mask *drop = make_mask(&mask, keep, seed, B, H);
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = lstm_forward(T, B, E, H, (uint16_t *)xh.at, (const uint16_t *)w.at,
                          (const float *)bias.at, (const int32_t *)ids.at, (const float *)c0.at,
                          (saved_block *)saved.at, (uint16_t *)h_out.at, (float *)h_last.at,
                          (float *)c_last.at, drop, amx);
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
#endif
    Py_RETURN_NONE;
}

static PyObject *py_backward(PyObject *self, PyObject *args) {
    (void)self;
    int T, B, E, H, amx;
    buffer dh_out, w, saved, c0, dg_t, dx, dh, dc, dbias, ids;
    unsigned long long ld, seed;
    double keep;
    if (!PyArg_ParseTuple(args, "iiii" BUFFER BUFFER BUFFER BUFFER BUFFER "K" BUFFER BUFFER BUFFER
                          BUFFER BUFFER "dKp", &T, &B, &E, &H, PARTS(dh_out), PARTS(w),
                          PARTS(saved), PARTS(c0), PARTS(dg_t), &ld, PARTS(dx), PARTS(dh),
                          PARTS(dc), PARTS(dbias), PARTS(ids), &keep, &seed, &amx))
        return NULL;
    if (!check_usable(amx) || !check_shape(T, B, E, H) || !check_keep(keep)) return NULL;
    const unsigned long long K = (unsigned long long)E + H, G = 4ull * H;
    const unsigned long long rows = times(T, B), units = times(rows, H), state = 4ull * B * H;
    if (ld < rows) {
        PyErr_SetString(PyExc_ValueError, "LSTM kernel: dg_t's rows must hold T * B columns");
        return NULL;
    }
    if (!check_size(&dh_out, times(units, 2), "dh_out") || !check_size(&w, G * K * 2, "w") ||
        !check_size(&saved, times(units, 14), "saved") || !check_size(&c0, state, "c0") ||
        !check_size(&dg_t, times(times(G, ld), 2), "dg_t") ||
        !check_size(&dx, times(times(rows, E), 2), "dx") || !check_size(&dh, state, "dh") ||
        !check_size(&dc, state, "dc") || !check_size(&dbias, G * 4, "dbias") ||
        !check_size(&ids, ids.at ? times(rows, 4) : 0, "ids"))
        return NULL;
    if (ids.at && !check_ids(&ids, rows, table_rows(&dbias, H))) return NULL;
#if HAVE_X86_BUILD
    dropout_mask mask;
    const dropout_mask *drop = make_mask(&mask, keep, seed, B, H);
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = lstm_backward(T, B, E, H, (const uint16_t *)dh_out.at, (const uint16_t *)w.at,
                           (const saved_block *)saved.at, (const float *)c0.at,
                           (uint16_t *)dg_t.at, (size_t)ld, (uint16_t *)dx.at, (float *)dh.at,
                           (float *)dc.at, (float *)dbias.at, (const int32_t *)ids.at, drop,
                           amx);
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
#endif
    Py_RETURN_NONE;
}

static PyObject *py_pack(PyObject *self, PyObject *args) {
    (void)self;
    int E, Ep, H;
    buffer w_ih, w_hh, forward, backward;
    if (!PyArg_ParseTuple(args, BUFFER BUFFER "iii" BUFFER BUFFER, PARTS(w_ih), PARTS(w_hh), &E,
                          &Ep, &H, PARTS(forward), PARTS(backward)))
        return NULL;
    if (!check_usable(0) || !check_shape(1, 16, Ep, H)) return NULL;
    if (E < 0 || E > Ep) {
        PyErr_SetString(PyExc_ValueError, "pack: the input width must be within its padding");
        return NULL;
    }
    const unsigned long long G = 4ull * H, packed = G * ((unsigned long long)Ep + H) * 2;
    if (!check_size(&w_ih, G * E * 4, "w_ih") || !check_size(&w_hh, G * H * 4, "w_hh") ||
        !check_size(&forward, packed, "forward") || !check_size(&backward, packed, "backward"))
        return NULL;
#if HAVE_X86_BUILD
    Py_BEGIN_ALLOW_THREADS
    pack_weights((const float *)w_ih.at, (const float *)w_hh.at, E, Ep, H,
                 (uint16_t *)forward.at, (uint16_t *)backward.at);
    Py_END_ALLOW_THREADS
#endif
    Py_RETURN_NONE;
}

/* mask(keep, seed, B, H, t): the factors (0 or 1 / keep) the kernel's mask puts on the
 * B x H elements of step t, as fp32 bytes; for tests, which can ask for a step whose elements
 * lie past 2^32 without running (or allocating) that many. */
static PyObject *py_mask(PyObject *self, PyObject *args) {
    (void)self;
    double keep;
    unsigned long long seed;
    int B, H, t;
    if (!PyArg_ParseTuple(args, "dKiii", &keep, &seed, &B, &H, &t)) return NULL;
    if (!check_usable(0) || !check_shape(1, B, 0, H) || !check_keep(keep)) return NULL;
    if (t < 0) {
        PyErr_SetString(PyExc_ValueError, "mask: a step cannot be negative");
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)B * H * 4);
    if (!out) return NULL;
#if HAVE_X86_BUILD
    float *factors = (float *)PyBytes_AS_STRING(out);
    dropout_mask mask;
    const dropout_mask *m = make_mask(&mask, keep, seed, B, H);
    if (m)
        fill_mask(m, t, B, H, factors);
    else
        for (size_t k = 0; k < (size_t)B * H; k++) factors[k] = 1.0f;
#endif
    return out;
}

static PyMethodDef methods[] = {
    {"backends", py_backends, METH_NOARGS, "The back ends this CPU can run, fastest first."},
    {"forward", py_forward, METH_VARARGS, "Forward of one LSTM layer over T steps."},
    {"backward", py_backward, METH_VARARGS, "Backward of one LSTM layer over T steps."},
    {"pack", py_pack, METH_VARARGS, "The forward and backward packed layouts of a layer's weights."},
    {"mask", py_mask, METH_VARARGS, "A dropout mask's factors at one step, as the kernel draws it."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_fused_lstm",
    .m_doc = "The LSTM recurrence in one call per layer, on AMX or AVX-512 BF16.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__fused_lstm(void) {
    PyObject *m = PyModule_Create(&module);
    /* Bytes the forward saves per unit, row and step: the caller sizes `saved` with it. */
    if (m && PyModule_AddIntConstant(m, "SAVED_BYTES_PER_UNIT", 14) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
