/* linear_scalar.c: the oracle for causal linear attention inside a segment.
 *
 * The definition written out, O(n^2 d) per head: o_i = sum_{j<=i} lambda^(i-j) (q_i.k_j) v_j,
 * and its gradients with w = lambda^(i-j):
 *   dq_i = sum_{j<=i} w (dout_i.v_j) k_j,  dk_j = sum_{i>=j} w (dout_i.v_j) q_i,
 *   dv_j = sum_{i>=j} w (q_i.k_j) dout_i.
 * Double accumulators; no blocking, no running state.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"
#include "spar_status.h"

static double dot(const float *a, const float *b, int d) {
    double s = 0.0;
    for (int c = 0; c < d; c++)
        s += (double)a[c] * (double)b[c];
    return s;
}

int spar__linear_fwd_local_scalar(const spar_linear_dims *dims, int64_t n, const float *q,
                                  const float *k, const float *v, float *o) {
    int d = dims->head_dim, h_count = dims->heads, g_count = dims->kv_heads;
    int per = h_count / g_count;
    double *acc = malloc(sizeof(double) * (size_t)d);
    if (!acc) return SPAR_ENOMEM;
    for (int64_t i = 0; i < n; i++) {
        for (int h = 0; h < h_count; h++) {
            const float *qi = q + (i * h_count + h) * d;
            memset(acc, 0, sizeof(double) * (size_t)d);
            for (int64_t j = 0; j <= i; j++) {
                int64_t row = (j * g_count + h / per) * d;
                double w = pow(dims->decay[h], (double)(i - j)) * dot(qi, k + row, d);
                for (int c = 0; c < d; c++)
                    acc[c] += w * (double)v[row + c];
            }
            for (int c = 0; c < d; c++)
                o[(i * h_count + h) * d + c] = (float)acc[c];
        }
    }
    free(acc);
    return SPAR_OK;
}

int spar__linear_bwd_local_scalar(const spar_linear_dims *dims, int64_t n, const float *q,
                                  const float *k, const float *v, const float *dout, float *dq,
                                  float *dk, float *dv) {
    int d = dims->head_dim, h_count = dims->heads, g_count = dims->kv_heads;
    int per = h_count / g_count;
    size_t q_len = (size_t)(n * h_count * d), kv_len = (size_t)(n * g_count * d);
    double *gq = calloc(q_len + 1, sizeof(double)), *gk = calloc(kv_len + 1, sizeof(double));
    double *gv = calloc(kv_len + 1, sizeof(double));
    if (!gq || !gk || !gv) {
        free(gq), free(gk), free(gv);
        return SPAR_ENOMEM;
    }
    for (int64_t i = 0; i < n; i++) {
        for (int h = 0; h < h_count; h++) {
            int64_t qrow = (i * h_count + h) * d;
            for (int64_t j = 0; j <= i; j++) {
                int64_t row = (j * g_count + h / per) * d;
                double w = pow(dims->decay[h], (double)(i - j));
                double dov = w * dot(dout + qrow, v + row, d), qk = w * dot(q + qrow, k + row, d);
                for (int c = 0; c < d; c++) {
                    gq[qrow + c] += dov * (double)k[row + c];
                    gk[row + c] += dov * (double)q[qrow + c];
                    gv[row + c] += qk * (double)dout[qrow + c];
                }
            }
        }
    }
    for (size_t x = 0; x < q_len; x++)
        dq[x] = (float)gq[x];
    for (size_t x = 0; x < kv_len; x++)
        dk[x] = (float)gk[x], dv[x] = (float)gv[x];
    free(gq), free(gk), free(gv);
    return SPAR_OK;
}
