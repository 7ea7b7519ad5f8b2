/* exp_simd.h: exponentials of non-positive floats, vectorised (internal to the kernels
 * room; included by the kernels that need them, each getting its own copy).
 *
 * Defines: SPAR_SIMD_CLONES (AVX-512, AVX2 and plain versions chosen at run time),
 *          exp_nonpositive, LANES, exp_row.
 */
#ifndef SPAR_EXP_SIMD_H
#define SPAR_EXP_SIMD_H

#include <stdint.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPAR_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SPAR_SIMD_CLONES
#endif

/* exp(x) for x <= 0 to ~2 ulp: x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6
 * polynomial, 2^n through the exponent bits; below -87 (and -inf) the result is 0. */
static inline float exp_nonpositive(float x) {
    float t = x * 1.44269504088896341f;
    float n = (t + 12582912.0f) - 12582912.0f; /* round to nearest */
    n = n < -126.0f ? -126.0f : n;
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union {
        int i;
        float f;
    } scale = {.i = ((int)n + 127) << 23};
    return x < -87.0f ? 0.0f : p * scale.f;
}

/* Reductions keep LANES partial results so that the compiler can vectorize them without
 * reassociating a single accumulator (which it may not do for floats). */
#define LANES 16

/* row[j] = exp(row[j] - shift); returns the sum. */
SPAR_SIMD_CLONES static float exp_row(float *row, int64_t n, float shift) {
    float part[LANES] = {0};
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int l = 0; l < LANES; l++) {
            float e = exp_nonpositive(row[j + l] - shift);
            row[j + l] = e;
            part[l] += e;
        }
    float sum = 0.0f;
    for (; j < n; j++) {
        row[j] = exp_nonpositive(row[j] - shift);
        sum += row[j];
    }
    for (int l = 0; l < LANES; l++)
        sum += part[l];
    return sum;
}

#endif
