/* dense.c: the dense layers of a decoder (kernels.h): matrix products, RMSNorm, RoPE,
 * SwiGLU and greedy choice. The products run on OpenBLAS where the build has it, on
 * plain loops otherwise; the rest is elementwise. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels.h"

#ifdef SPAR_HAVE_BLAS
#include <cblas.h>
#endif

void spar_matmul(int64_t m, int64_t n, int64_t k, const float *a, const float *b, float *c,
                 bool accumulate) {
#ifdef SPAR_HAVE_BLAS
    if (m > 0 && n > 0)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, (int)n, (int)k, 1.0f, a,
                    (int)k, b, (int)n, accumulate ? 1.0f : 0.0f, c, (int)n);
#else
    for (int64_t i = 0; i < m; i++) {
        float *row = c + i * n;
        if (!accumulate) memset(row, 0, sizeof(float) * (size_t)n);
        for (int64_t p = 0; p < k; p++) { /* row i of a times b: rows of b in turn */
            float x = a[i * k + p];
            const float *brow = b + p * n;
            for (int64_t j = 0; j < n; j++)
                row[j] += x * brow[j];
        }
    }
#endif
}

void spar_rmsnorm(int64_t n, int dim, const float *x, const float *w, double eps, float *out) {
    for (int64_t i = 0; i < n; i++) {
        const float *xi = x + i * dim;
        double ss = 0.0;
        for (int j = 0; j < dim; j++)
            ss += (double)xi[j] * xi[j];
        float r = (float)(1.0 / sqrt(ss / dim + eps));
        for (int j = 0; j < dim; j++)
            out[i * dim + j] = xi[j] * r * w[j];
    }
}

void spar_rope(int64_t n, int heads, int head_dim, const int64_t *pos, double base, float *x) {
    int half = head_dim / 2;
    for (int64_t i = 0; i < n; i++)
        for (int e = 0; e < half; e++) {
            /* angle in double: positions reach 10^6 and more */
            double angle = (double)pos[i] * pow(base, -2.0 * e / head_dim);
            float c = (float)cos(angle), s = (float)sin(angle);
            for (int h = 0; h < heads; h++) {
                float *v = x + (i * heads + h) * head_dim;
                float a = v[e], b = v[e + half];
                v[e] = a * c - b * s;
                v[e + half] = b * c + a * s;
            }
        }
}

void spar_swiglu(int64_t n, const float *gate, const float *up, float *out) {
    for (int64_t i = 0; i < n; i++) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

int64_t spar_argmax(int64_t n, const float *x) {
    int64_t best = 0;
    for (int64_t i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

double spar_kernels_triad_gbs(int64_t floats, double min_seconds) {
    float *a = malloc(sizeof(float) * (size_t)floats), *b = malloc(sizeof(float) * (size_t)floats),
          *c = malloc(sizeof(float) * (size_t)floats);
    double best = 0.0;
    if (a && b && c) {
        for (int64_t i = 0; i < floats; i++)
            a[i] = 0.0f, b[i] = 1.0f, c[i] = 2.0f;
        struct timespec t0, t1, start;
        clock_gettime(CLOCK_MONOTONIC, &start);
        for (int run = 0;; run++) {
            clock_gettime(CLOCK_MONOTONIC, &t0);
            for (int64_t i = 0; i < floats; i++)
                a[i] = b[i] + 0.5f * c[i];
            clock_gettime(CLOCK_MONOTONIC, &t1);
            double dt = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
            double gbs = dt > 0 ? 3.0 * sizeof(float) * (double)floats / dt / 1e9 : 0.0;
            best = gbs > best ? gbs : best;
            double total =
                (double)(t1.tv_sec - start.tv_sec) + 1e-9 * (double)(t1.tv_nsec - start.tv_nsec);
            if (run >= 2 && total >= min_seconds) break;
        }
        best += 0.0 * a[floats / 2]; /* the stores are used: not optimised away */
    }
    free(a), free(b), free(c);
    return best;
}
