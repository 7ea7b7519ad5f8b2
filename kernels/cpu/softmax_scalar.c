/* softmax_scalar.c: the scalar softmax-attention block kernel, the oracle.
 *
 * One pass over the keys per (query, head) with an online softmax (running max m,
 * denominator l, unnormalised output acc), all in double so that the oracle's own
 * rounding stays far below the fp32 tolerances it is used to check. Scratch is one
 * head_dim row. Speed is deliberately not a goal here.
 */
#include <math.h>
#include <stdlib.h>

#include "kernels.h"
#include "spar_status.h"

/* Merge one row's block result (m + log l, acc / l) into the running (o, lse). */
static void merge_row(int d, double m, double l, const double *acc, float *o, float *lse) {
    double lse_b = m + log(l);
    double lse_a = *lse;
    double hi = lse_a > lse_b ? lse_a : lse_b;
    double lse_new = isinf(lse_a) ? lse_b : hi + log1p(exp((lse_a < lse_b ? lse_a : lse_b) - hi));
    double wa = isinf(lse_a) ? 0.0 : exp(lse_a - lse_new);
    double wb = exp(lse_b - lse_new) / l;
    for (int c = 0; c < d; c++)
        o[c] = (float)(wa * o[c] + wb * acc[c]);
    *lse = (float)lse_new;
}

/* Online softmax of one query row q (d) against nk keys of kv head g. */
static void attend_row(const spar_attn_dims *dims, const float *q, int64_t q_pos, int64_t nk,
                       const float *k, const float *v, const int64_t *k_pos, bool causal, int g,
                       double *acc, float *o, float *lse) {
    int d = dims->head_dim;
    int64_t kv_stride = (int64_t)dims->kv_heads * d;
    double m = -INFINITY, l = 0.0;
    for (int c = 0; c < d; c++)
        acc[c] = 0.0;
    for (int64_t j = 0; j < nk; j++) {
        if (causal && k_pos[j] > q_pos) continue;
        const float *kj = k + j * kv_stride + (int64_t)g * d;
        const float *vj = v + j * kv_stride + (int64_t)g * d;
        double s = 0.0;
        for (int c = 0; c < d; c++)
            s += (double)q[c] * (double)kj[c];
        s *= dims->scale;
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
            acc[c] += p * (double)vj[c];
    }
    if (l > 0.0) merge_row(d, m, l, acc, o, lse);
}

static int softmax_fwd_block_scalar(const spar_attn_dims *dims, int64_t nq, const float *q,
                                    const int64_t *q_pos, int64_t nk, const float *k,
                                    const float *v, const int64_t *k_pos, bool causal, float *o,
                                    float *lse) {
    int h_count = dims->heads, d = dims->head_dim;
    int group = h_count / dims->kv_heads; /* query heads per kv head */
    double *acc = malloc(sizeof(double) * (size_t)d);
    if (!acc) return SPAR_ENOMEM;
    for (int64_t i = 0; i < nq; i++) {
        for (int h = 0; h < h_count; h++) {
            int64_t row = i * h_count + h;
            attend_row(dims, q + row * d, causal ? q_pos[i] : 0, nk, k, v, k_pos, causal, h / group,
                       acc, o + row * d, lse + row);
        }
    }
    free(acc);
    return SPAR_OK;
}

const spar_kernels spar__kernels_scalar = {
    .name = "scalar",
    .softmax_fwd_block = softmax_fwd_block_scalar,
};
