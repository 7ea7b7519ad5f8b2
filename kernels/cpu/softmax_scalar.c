/* softmax_scalar.c: the scalar softmax-attention block kernels, the oracle.
 *
 * Forward: one pass over the keys per (query, head) with an online softmax (running max
 * m, denominator l, unnormalised output acc). Backward: the flash-attention recurrences
 * with the final lse, so probabilities are recomputed rather than stored. Everything is
 * accumulated in double so that the oracle's own rounding stays far below the fp32
 * tolerances it is used to check. Scratch is O(block): one head_dim row forward, the
 * block's dK/dV in double backward. Speed is deliberately not a goal here.
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

static bool visible(bool causal, const spar_qblock *qb, int64_t i, const spar_kvblock *kb,
                    int64_t j) {
    return !causal || kb->pos[j] <= qb->pos[i];
}

/* Merge one row's block result (m + log l, acc / l) into the running (o, lse). */
static void merge_row(int d, double m, double l, const double *acc, float *o, float *lse) {
    double wa, wb, lse_new = spar__merge_weights(*lse, m + log(l), &wa, &wb);
    wb /= l; /* acc is unnormalised */
    for (int c = 0; c < d; c++)
        o[c] = (float)(wa * o[c] + wb * acc[c]);
    *lse = (float)lse_new;
}

/* Online softmax of query i, head h, against every visible key of its kv head. */
static void attend_row(const spar_attn_dims *dims, bool causal, const spar_qblock *qb, int64_t i,
                       int h, const spar_kvblock *kb, double *acc) {
    int d = dims->head_dim, g = h / (dims->heads / dims->kv_heads);
    const float *q = qb->q + i * qb->stride_q + (int64_t)h * d;
    double m = -INFINITY, l = 0.0;
    memset(acc, 0, sizeof(double) * (size_t)d);
    for (int64_t j = 0; j < kb->n; j++) {
        if (!visible(causal, qb, i, kb, j)) continue;
        const float *k = kb->k + j * kb->stride_kv + (int64_t)g * d;
        const float *v = kb->v + j * kb->stride_kv + (int64_t)g * d;
        double s = dims->scale * dot(q, k, d);
        if (s > m) { /* rescale what we have to the new maximum */
            double r = exp(m - s);
            l *= r;
            for (int c = 0; c < d; c++)
                acc[c] *= r;
            m = s;
        }
        double p = exp(s - m);
        l += p;
        for (int c = 0; c < d; c++)
            acc[c] += p * (double)v[c];
    }
    if (l > 0.0)
        merge_row(d, m, l, acc, qb->o + i * qb->stride_q + (int64_t)h * d,
                  qb->lse + i * qb->stride_lse + h);
}

int spar__softmax_fwd_block_scalar(const spar_attn_dims *dims, bool causal, const spar_qblock *qb,
                                   const spar_kvblock *kb) {
    double *acc = malloc(sizeof(double) * (size_t)dims->head_dim);
    if (!acc) return SPAR_ENOMEM;
    for (int64_t i = 0; i < qb->n; i++)
        for (int h = 0; h < dims->heads; h++)
            attend_row(dims, causal, qb, i, h, kb, acc);
    free(acc);
    return SPAR_OK;
}

/* Gradients from query i, head h: dq_row (double, d) gets sum_j ds k_j; dkv (double,
 * [nk, G, 2, d]) gets ds q_i into the dk half and p dout_i into the dv half. */
static void backprop_row(const spar_attn_dims *dims, bool causal, const spar_qblock *qb, int64_t i,
                         int h, const spar_kvblock *kb, double *dq_row, double *dkv) {
    int d = dims->head_dim, g_count = dims->kv_heads, g = h / (dims->heads / g_count);
    const float *q = qb->q + i * qb->stride_q + (int64_t)h * d;
    const float *dout = qb->dout + i * qb->stride_q + (int64_t)h * d;
    double lse = qb->lse[i * qb->stride_lse + h], delta = qb->delta[i * qb->stride_lse + h];
    for (int64_t j = 0; j < kb->n; j++) {
        if (!visible(causal, qb, i, kb, j)) continue;
        const float *k = kb->k + j * kb->stride_kv + (int64_t)g * d;
        const float *v = kb->v + j * kb->stride_kv + (int64_t)g * d;
        double p = exp(dims->scale * dot(q, k, d) - lse);
        double ds = p * (dot(dout, v, d) - delta);
        double *dk = dkv + (j * g_count + g) * 2 * d, *dv = dk + d;
        for (int c = 0; c < d; c++) {
            dq_row[c] += ds * (double)k[c];
            dk[c] += ds * (double)q[c];
            dv[c] += p * (double)dout[c];
        }
    }
}

int spar__softmax_bwd_block_scalar(const spar_attn_dims *dims, bool causal, const spar_qblock *qb,
                                   const spar_kvblock *kb) {
    int d = dims->head_dim, g_count = dims->kv_heads;
    size_t dkv_len = (size_t)(kb->n * g_count) * 2 * (size_t)d;
    double *dq_row = malloc(sizeof(double) * (size_t)d);
    double *dkv = calloc(dkv_len ? dkv_len : 1, sizeof(double));
    if (!dq_row || !dkv) {
        free(dq_row);
        free(dkv);
        return SPAR_ENOMEM;
    }
    for (int64_t i = 0; i < qb->n; i++) {
        for (int h = 0; h < dims->heads; h++) {
            memset(dq_row, 0, sizeof(double) * (size_t)d);
            backprop_row(dims, causal, qb, i, h, kb, dq_row, dkv);
            float *dq = qb->dq + i * qb->stride_q + (int64_t)h * d;
            for (int c = 0; c < d; c++)
                dq[c] = (float)(dq[c] + dims->scale * dq_row[c]);
        }
    }
    for (int64_t j = 0; j < kb->n; j++) {
        for (int g = 0; g < g_count; g++) {
            const double *src = dkv + (j * g_count + g) * 2 * d;
            float *dk = kb->dk + j * kb->stride_kv + (int64_t)g * d;
            float *dv = kb->dv + j * kb->stride_kv + (int64_t)g * d;
            for (int c = 0; c < d; c++) {
                dk[c] = (float)(dk[c] + dims->scale * src[c]);
                dv[c] = (float)(dv[c] + src[d + c]);
            }
        }
    }
    free(dq_row);
    free(dkv);
    return SPAR_OK;
}
