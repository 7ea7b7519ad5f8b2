/* linear_state_blas.c: the O(n d^2) state products of kernels.h's spar_linear_* (states,
 * their use by queries, and their gradients) as OpenBLAS sgemm over blocks of B rows.
 * Checked against the scalar oracle (tests/unit/test_linear.c).
 */
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"
#include "spar_status.h"

#define B SPAR_LINEAR_BLOCK

static int heads_per_state(const spar_linear_dims *dims) {
    return dims->heads / dims->state_heads;
}

static int kv_of_state(const spar_linear_dims *dims, int s) {
    return dims->state_heads == dims->heads ? s / (dims->heads / dims->kv_heads) : s;
}

/* Row coefficients of rows [p0, p0+len): lambda^(p0+i+1) (from_start) or
 * lambda^(n-1-(p0+i)); all 1 without the mask. */
static void coefficients(double lambda, bool causal, int64_t n, int64_t p0, int len,
                         bool from_start, float *c) {
    for (int i = 0; i < len; i++) {
        double e = from_start ? (double)(p0 + i + 1) : (double)(n - 1 - (p0 + i));
        c[i] = causal ? (float)pow(lambda, e) : 1.0f;
    }
}

/* tmp[i] = c_i x[p0+i] for a block (x a head's rows with leading dimension ldx). */
static void scaled_rows(const float *x, int ldx, int64_t p0, int len, int d, const float *c,
                        float *tmp) {
    for (int i = 0; i < len; i++)
        for (int a = 0; a < d; a++)
            tmp[i * d + a] = c[i] * x[(size_t)(p0 + i) * ldx + a];
}

/* out[p0+i] += c_i (x_b m or x_b m^T)[i]. */
static void add_rows_times(const float *x, int ldx, const float *m, bool transpose, int64_t p0,
                           int len, int d, const float *c, float *tmp, float *out, int ldo) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, transpose ? CblasTrans : CblasNoTrans, len, d, d, 1.0f,
                x + (size_t)p0 * ldx, ldx, m, d, 0.0f, tmp, d);
    for (int i = 0; i < len; i++)
        for (int a = 0; a < d; a++)
            out[(size_t)(p0 + i) * ldo + a] += c[i] * tmp[i * d + a];
}

typedef struct rows_work {
    float c[B], *tmp; /* [B, d] */
} rows_work;

int spar__linear_state_blas(const spar_linear_dims *dims, bool causal, int64_t n, const float *k,
                            const float *v, float *m) {
    int d = dims->head_dim, ldkv = dims->kv_heads * d;
    rows_work w = {.tmp = malloc(sizeof(float) * (size_t)(B * d))};
    if (!w.tmp) return SPAR_ENOMEM;
    for (int s = 0; s < dims->state_heads; s++) {
        int g = kv_of_state(dims, s);
        float *ms = m + (size_t)s * d * d;
        memset(ms, 0, sizeof(float) * (size_t)(d * d));
        for (int64_t p0 = 0; p0 < n; p0 += B) {
            int len = n - p0 < B ? (int)(n - p0) : B;
            coefficients(dims->decay[s * heads_per_state(dims)], causal, n, p0, len, false, w.c);
            scaled_rows(k + g * d, ldkv, p0, len, d, w.c, w.tmp);
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, d, d, len, 1.0f, w.tmp, d,
                        v + (size_t)p0 * ldkv + g * d, ldkv, 1.0f, ms, d);
        }
    }
    free(w.tmp);
    return SPAR_OK;
}

int spar__linear_fwd_state_blas(const spar_linear_dims *dims, bool causal, int64_t n,
                                const float *q, const float *s, float *o) {
    int d = dims->head_dim, ldq = dims->heads * d;
    rows_work w = {.tmp = malloc(sizeof(float) * (size_t)(B * d))};
    if (!w.tmp) return SPAR_ENOMEM;
    for (int h = 0; h < dims->heads; h++) {
        const float *st = s + (size_t)(h / heads_per_state(dims)) * d * d;
        for (int64_t p0 = 0; p0 < n; p0 += B) {
            int len = n - p0 < B ? (int)(n - p0) : B;
            coefficients(dims->decay[h], causal, n, p0, len, true, w.c);
            add_rows_times(q + h * d, ldq, st, false, p0, len, d, w.c, w.tmp, o + h * d, ldq);
        }
    }
    free(w.tmp);
    return SPAR_OK;
}

int spar__linear_dstate_blas(const spar_linear_dims *dims, bool causal, int64_t n, const float *q,
                             const float *dout, float *ds) {
    int d = dims->head_dim, ldq = dims->heads * d;
    rows_work w = {.tmp = malloc(sizeof(float) * (size_t)(B * d))};
    if (!w.tmp) return SPAR_ENOMEM;
    memset(ds, 0, sizeof(float) * (size_t)dims->state_heads * (size_t)(d * d));
    for (int h = 0; h < dims->heads; h++) {
        float *st = ds + (size_t)(h / heads_per_state(dims)) * d * d;
        for (int64_t p0 = 0; p0 < n; p0 += B) {
            int len = n - p0 < B ? (int)(n - p0) : B;
            coefficients(dims->decay[h], causal, n, p0, len, true, w.c);
            scaled_rows(q + h * d, ldq, p0, len, d, w.c, w.tmp);
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, d, d, len, 1.0f, w.tmp, d,
                        dout + (size_t)p0 * ldq + h * d, ldq, 1.0f, st, d);
        }
    }
    free(w.tmp);
    return SPAR_OK;
}

int spar__linear_bwd_state_blas(const spar_linear_dims *dims, bool causal, int64_t n,
                                const float *k, const float *v, const float *dout, const float *s,
                                const float *dkv, float *dq, float *dk, float *dv) {
    int d = dims->head_dim, ldq = dims->heads * d, ldkv = dims->kv_heads * d;
    rows_work w = {.tmp = malloc(sizeof(float) * (size_t)(B * d))};
    if (!w.tmp) return SPAR_ENOMEM;
    for (int h = 0; s && h < dims->heads; h++) { /* dq_i += c_i dout_i s^T */
        const float *st = s + (size_t)(h / heads_per_state(dims)) * d * d;
        for (int64_t p0 = 0; p0 < n; p0 += B) {
            int len = n - p0 < B ? (int)(n - p0) : B;
            coefficients(dims->decay[h], causal, n, p0, len, true, w.c);
            add_rows_times(dout + h * d, ldq, st, true, p0, len, d, w.c, w.tmp, dq + h * d, ldq);
        }
    }
    for (int sh = 0; dkv && sh < dims->state_heads; sh++) { /* dk += e dkv v, dv += e dkv^T k */
        int g = kv_of_state(dims, sh);
        const float *st = dkv + (size_t)sh * d * d;
        for (int64_t p0 = 0; p0 < n; p0 += B) {
            int len = n - p0 < B ? (int)(n - p0) : B;
            coefficients(dims->decay[sh * heads_per_state(dims)], causal, n, p0, len, false, w.c);
            add_rows_times(v + g * d, ldkv, st, true, p0, len, d, w.c, w.tmp, dk + g * d, ldkv);
            add_rows_times(k + g * d, ldkv, st, false, p0, len, d, w.c, w.tmp, dv + g * d, ldkv);
        }
    }
    free(w.tmp);
    return SPAR_OK;
}
