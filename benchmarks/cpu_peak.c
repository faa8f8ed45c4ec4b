/* The arithmetic peak of one core: independent AVX-512 FMA (fp32) and VDPBF16PS (bf16 dot
 * product) instructions on registers, with no memory traffic. What charlstm's GFLOP/s are set
 * against when PyTorch's own matmul runs below the hardware (MKL on AMD CPUs, for one).
 *
 *     gcc -O2 -march=native benchmarks/cpu_peak.c -o /tmp/cpu_peak && /tmp/cpu_peak
 *
 * It prints GFLOP/s of one core; run one copy per core (taskset -c N) for the whole CPU. Needs
 * AVX-512 with BF16 (AMD Zen 4 and later, Intel Cooper Lake and Sapphire Rapids). */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#define CHAINS 24         /* independent accumulators: more than latency x throughput */
#define ROUNDS 100000000L /* about a second per kind on a 3 GHz core */

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

__attribute__((target("avx512f,avx512bf16"))) static double bf16_gflops(void) {
    __m512 acc[CHAINS];
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_set1_ps((float)i);
    __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = a; /* pairs of bf16 1.0 */
    const double start = seconds();
    for (long r = 0; r < ROUNDS; r++) {
#pragma GCC unroll 24
        for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
        __asm__ volatile("" : "+v"(a)); /* keep the loop from being folded away */
    }
    const double elapsed = seconds() - start;
    float sink = 0;
    for (int i = 0; i < CHAINS; i++) sink += _mm512_reduce_add_ps(acc[i]);
    __asm__ volatile("" ::"m"(sink));
    return ROUNDS * CHAINS * 64.0 / elapsed / 1e9; /* 16 lanes x 2 products x 2 FLOPs */
}

__attribute__((target("avx512f"))) static double fp32_gflops(void) {
    __m512 acc[CHAINS];
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_set1_ps((float)i);
    __m512 m = _mm512_set1_ps(0.999999f);
    const double start = seconds();
    for (long r = 0; r < ROUNDS; r++) {
#pragma GCC unroll 24
        for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_fmadd_ps(acc[i], m, m);
        __asm__ volatile("" : "+v"(m));
    }
    const double elapsed = seconds() - start;
    float sink = 0;
    for (int i = 0; i < CHAINS; i++) sink += _mm512_reduce_add_ps(acc[i]);
    __asm__ volatile("" ::"m"(sink));
    return ROUNDS * CHAINS * 32.0 / elapsed / 1e9; /* 16 lanes x 2 FLOPs */
}

int main(void) {
    printf("one core: %.0f GFLOP/s fp32 (FMA), %.0f GFLOP/s bf16 (VDPBF16PS)\n", fp32_gflops(),
           bf16_gflops());
    return 0;
}
