/* gpu_check.h: what the GPU kernel tests share: seeded random data, bfloat16 rounding (the
 * oracle then sees exactly the values the device reads), device upload and download, and
 * the comparison with the oracle: relative L2 error within a tolerance, the worst elements
 * printed on failure.
 */
#ifndef SPAR_GPU_CHECK_H
#define SPAR_GPU_CHECK_H

#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/cuda_kernels.h" // defines: spar_cuda_malloc, spar_cuda_copy, the launchers

/* Tolerances of the issue: relative L2 error against the scalar oracle. */
#define TOL_F32 1e-5
#define TOL_BF16 1e-2

static inline float uniform(uint64_t *s) {
    *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
    return (float)((double)(*s >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

static inline float *random_floats(size_t n, uint64_t *seed, float amp) {
    float *x = malloc(sizeof(float) * (n ? n : 1));
    for (size_t i = 0; x && i < n; i++)
        x[i] = amp * uniform(seed);
    return x;
}

static inline uint16_t to_bf16(float f) { /* round to nearest even */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float from_bf16(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline void round_bf16(float *x, size_t n) {
    for (size_t i = 0; i < n; i++)
        x[i] = from_bf16(to_bf16(x[i]));
}

/* A device copy of n floats, as float32 or converted to bfloat16; NULL on failure. */
static inline void *upload(const float *x, size_t n, bool bf16) {
    void *dev = NULL;
    size_t bytes = n * (bf16 ? sizeof(uint16_t) : sizeof(float));
    if (spar_cuda_malloc(&dev, bytes) != 0) return NULL;
    if (!bf16) {
        if (spar_cuda_copy(dev, x, bytes) == 0) return dev;
    } else {
        uint16_t *h = malloc(bytes ? bytes : 1);
        for (size_t i = 0; h && i < n; i++)
            h[i] = to_bf16(x[i]);
        int rc = h ? spar_cuda_copy(dev, h, bytes) : -1;
        free(h);
        if (rc == 0) return dev;
    }
    spar_cuda_free(dev);
    return NULL;
}

static inline void *upload_bytes(const void *x, size_t bytes) {
    void *dev = NULL;
    if (spar_cuda_malloc(&dev, bytes) != 0) return NULL;
    if (spar_cuda_copy(dev, x, bytes) == 0) return dev;
    spar_cuda_free(dev);
    return NULL;
}

/* got vs ref over n floats: 0 when the relative L2 error is within tol and every -inf of
 * ref is matched; otherwise 1, with the worst elements printed. */
static inline int compare(const char *case_name, const char *what, const float *got,
                          const float *ref, size_t n, double tol) {
    double num = 0.0, den = 0.0;
    size_t worst[4] = {0}, inf_mismatch = 0;
    double wdiff[4] = {-1, -1, -1, -1};
    for (size_t i = 0; i < n; i++) {
        if (isinf(ref[i]) || isinf(got[i])) {
            inf_mismatch += got[i] != ref[i];
            continue;
        }
        double e = (double)got[i] - ref[i], ae = fabs(e);
        num += e * e, den += (double)ref[i] * ref[i];
        if (!(ae <= wdiff[3])) { /* NaN counts as the worst */
            int at = 3;
            while (at > 0 && !(ae <= wdiff[at - 1])) {
                wdiff[at] = wdiff[at - 1], worst[at] = worst[at - 1];
                at--;
            }
            wdiff[at] = ae, worst[at] = i;
        }
    }
    double rel = den > 0 ? sqrt(num / den) : sqrt(num);
    bool bad = !(rel <= tol) || inf_mismatch > 0;
    printf("%s %s %s: rel L2 %.2e (tol %.0e)%s\n", bad ? "FAIL" : "ok  ", case_name, what, rel, tol,
           inf_mismatch ? ", infinities differ" : "");
    for (int w = 0; bad && w < 4 && wdiff[w] >= 0; w++)
        printf("       worst [%zu]: got %.8g ref %.8g\n", worst[w], (double)got[worst[w]],
               (double)ref[worst[w]]);
    return bad;
}

/* Copies a device float tensor back; a failure fails the case. */
static inline int download(float *host, const void *dev, size_t n) {
    return spar_cuda_copy(host, dev, sizeof(float) * n) == 0 ? 0 : 1;
}

/* "skip: ..." and 77 (ctest: skipped) where no GPU is usable; 0 otherwise. */
static inline int gpu_or_skip(void) {
    char why[256] = "";
    if (spar_kernels_cuda_devices(why, sizeof why) > 0 && spar_kernels_cuda()) return 0;
    printf("skip: no CUDA device: %s\n", *why ? why : "this build has no CUDA");
    return 77;
}

#endif
