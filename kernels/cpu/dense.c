/* dense.c: the dense layers of a decoder (kernels.h): matrix products, RMSNorm, RoPE,
 * SwiGLU and greedy choice. The products run on OpenBLAS where the build has it, on
 * plain loops otherwise; the rest is elementwise. */
#include <math.h>
#include <string.h>

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
