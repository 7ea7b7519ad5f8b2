/* linear_common.c: the O(n d^2) pieces of linear attention that every backend shares:
 * memory states, the entering state's contribution, state gradients, decayed prefixes,
 * and the ALiBi decays. Plain loops with double accumulators (see kernels.h). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "spar_status.h"

/* Query heads per state head (1 when states are per query head). */
static int heads_per_state(const spar_linear_dims *dims) {
    return dims->heads / dims->state_heads;
}

static int kv_of_state(const spar_linear_dims *dims, int s) {
    return dims->state_heads == dims->heads ? s / (dims->heads / dims->kv_heads) : s;
}

static int state_of_head(const spar_linear_dims *dims, int h) {
    return h / heads_per_state(dims);
}

/* Every query head of one state decays alike: take the first one's. */
static double decay_of_state(const spar_linear_dims *dims, int s) {
    return dims->decay[s * heads_per_state(dims)];
}

int spar_linear_state(const spar_linear_dims *dims, bool causal, int64_t n, const float *k,
                      const float *v, float *m) {
    int64_t d = dims->head_dim, g_count = dims->kv_heads;
    double *acc = calloc((size_t)(d * d), sizeof(double));
    if (!acc) return SPAR_ENOMEM;
    for (int s = 0; s < dims->state_heads; s++) {
        int g = kv_of_state(dims, s);
        double lambda = decay_of_state(dims, s);
        memset(acc, 0, sizeof(double) * (size_t)d * (size_t)d);
        for (int64_t j = 0; j < n; j++) {
            double c = causal ? pow(lambda, (double)(n - 1 - j)) : 1.0;
            const float *kj = k + (j * g_count + g) * d, *vj = v + (j * g_count + g) * d;
            for (int a = 0; a < d; a++)
                for (int b = 0; b < d; b++)
                    acc[a * d + b] += c * (double)kj[a] * (double)vj[b];
        }
        for (int64_t i = 0; i < d * d; i++)
            m[s * d * d + i] = (float)acc[i];
    }
    free(acc);
    return SPAR_OK;
}

void spar_linear_fwd_state(const spar_linear_dims *dims, bool causal, int64_t n, const float *q,
                           const float *s, float *o) {
    int d = dims->head_dim, h_count = dims->heads;
    for (int64_t i = 0; i < n; i++) {
        for (int h = 0; h < h_count; h++) {
            double c = causal ? pow(dims->decay[h], (double)(i + 1)) : 1.0;
            const float *qi = q + (i * h_count + h) * d;
            const float *st = s + (int64_t)state_of_head(dims, h) * d * d;
            float *oi = o + (i * h_count + h) * d;
            for (int b = 0; b < d; b++) {
                double acc = 0.0;
                for (int a = 0; a < d; a++)
                    acc += (double)qi[a] * (double)st[a * d + b];
                oi[b] = (float)(oi[b] + c * acc);
            }
        }
    }
}

int spar_linear_dstate(const spar_linear_dims *dims, bool causal, int64_t n, const float *q,
                       const float *dout, float *ds) {
    int d = dims->head_dim, h_count = dims->heads;
    double *acc = calloc((size_t)dims->state_heads * (size_t)d * (size_t)d, sizeof(double));
    if (!acc) return SPAR_ENOMEM;
    for (int64_t i = 0; i < n; i++) {
        for (int h = 0; h < h_count; h++) {
            double c = causal ? pow(dims->decay[h], (double)(i + 1)) : 1.0;
            const float *qi = q + (i * h_count + h) * d, *doi = dout + (i * h_count + h) * d;
            double *st = acc + (int64_t)state_of_head(dims, h) * d * d;
            for (int a = 0; a < d; a++)
                for (int b = 0; b < d; b++)
                    st[a * d + b] += c * (double)qi[a] * (double)doi[b];
        }
    }
    for (int64_t i = 0; i < (int64_t)dims->state_heads * d * d; i++)
        ds[i] = (float)acc[i];
    free(acc);
    return SPAR_OK;
}

/* dq_i += c_i dout_i s^T for every query row. */
static void dq_through_state(const spar_linear_dims *dims, bool causal, int64_t n,
                             const float *dout, const float *s, float *dq) {
    int d = dims->head_dim, h_count = dims->heads;
    for (int64_t i = 0; i < n; i++) {
        for (int h = 0; h < h_count; h++) {
            double c = causal ? pow(dims->decay[h], (double)(i + 1)) : 1.0;
            const float *doi = dout + (i * h_count + h) * d;
            const float *st = s + (int64_t)state_of_head(dims, h) * d * d;
            float *dqi = dq + (i * h_count + h) * d;
            for (int a = 0; a < d; a++) {
                double acc = 0.0;
                for (int b = 0; b < d; b++)
                    acc += (double)st[a * d + b] * (double)doi[b];
                dqi[a] = (float)(dqi[a] + c * acc);
            }
        }
    }
}

/* dk_j += e_j dkv v_j and dv_j += e_j dkv^T k_j, summed over the states reading kv head g. */
static void dkv_through_state(const spar_linear_dims *dims, bool causal, int64_t n, const float *k,
                              const float *v, const float *dkv, float *dk, float *dv) {
    int d = dims->head_dim, g_count = dims->kv_heads;
    for (int s = 0; s < dims->state_heads; s++) {
        int g = kv_of_state(dims, s);
        double lambda = decay_of_state(dims, s);
        const float *st = dkv + (int64_t)s * d * d;
        for (int64_t j = 0; j < n; j++) {
            double e = causal ? pow(lambda, (double)(n - 1 - j)) : 1.0;
            int64_t row = (j * g_count + g) * d;
            for (int a = 0; a < d; a++) {
                double acc_k = 0.0, acc_v = 0.0;
                for (int b = 0; b < d; b++) {
                    acc_k += (double)st[a * d + b] * (double)v[row + b];
                    acc_v += (double)st[b * d + a] * (double)k[row + b];
                }
                dk[row + a] = (float)(dk[row + a] + e * acc_k);
                dv[row + a] = (float)(dv[row + a] + e * acc_v);
            }
        }
    }
}

void spar_linear_bwd_state(const spar_linear_dims *dims, bool causal, int64_t n, const float *k,
                           const float *v, const float *dout, const float *s, const float *dkv,
                           float *dq, float *dk, float *dv) {
    if (s) dq_through_state(dims, causal, n, dout, s, dq);
    if (dkv) dkv_through_state(dims, causal, n, k, v, dkv, dk, dv);
}

void spar_linear_combine(const spar_linear_dims *dims, int count, const float *states,
                         const double *exps, float *out) {
    int64_t dd = (int64_t)dims->head_dim * dims->head_dim;
    for (int s = 0; s < dims->state_heads; s++) {
        double lambda = decay_of_state(dims, s);
        for (int64_t x = 0; x < dd; x++) {
            double acc = 0.0;
            for (int i = 0; i < count; i++)
                if (exps[i] >= 0)
                    acc += pow(lambda, exps[i]) *
                           (double)states[((int64_t)i * dims->state_heads + s) * dd + x];
            out[s * dd + x] = (float)acc;
        }
    }
}

void spar_alibi_decay(int heads, double *decay) {
    int p2 = 1;
    while (p2 * 2 <= heads)
        p2 *= 2;
    for (int h = 0; h < heads; h++) {
        double slope;
        if (h < p2) /* the power-of-two rule */
            slope = pow(2.0, -8.0 * (h + 1) / p2);
        else /* every other slope of the next power of two: indices 0, 2, 4, ... */
            slope = pow(2.0, -8.0 * (2 * (h - p2) + 1) / (2 * p2));
        decay[h] = exp(-slope);
    }
}
