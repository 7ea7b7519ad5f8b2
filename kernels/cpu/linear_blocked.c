/* linear_blocked.c: causal linear attention inside a segment, Lightning-style.
 *
 * The segment is cut into blocks of B tokens. Within a block the work is a masked
 * product, (Q_b K_b^T (.) D) V_b with D_ij = lambda^(i-j) for j <= i; across blocks it
 * goes through a running d x d state KV, so the cost is O(n (B + d) d) per head instead
 * of O(n^2 d). With i local to the block (p0 its first token, L its length):
 *   o_i  = [intra]_i + lambda^(i+1) q_i KV,     KV <- lambda^L KV + sum_j lambda^(L-1-j) k_j^T v_j
 * Backward runs the same recurrence forward for dq and a reverse one for dk and dv:
 *   DKV <- lambda^L DKV + sum_i lambda^(i+1) q_i^T dout_i   (the gradient of later blocks).
 * One query head at a time (its decay may be its own); double accumulators.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"
#include "spar_status.h"

#define B SPAR__LINEAR_BLOCK

/* Scratch of one call: powers of lambda, a block matrix, the running state, a row. */
typedef struct scratch {
    double pw[B + 2];  /* lambda^0 .. lambda^(B+1) */
    double mat[B * B]; /* masked block product */
    double *state;     /* [d, d] */
    double *row;       /* [d] */
} scratch;

static int scratch_init(scratch **out, int d) {
    scratch *s = malloc(sizeof *s);
    if (!s) return SPAR_ENOMEM;
    s->state = malloc(sizeof(double) * (size_t)d * (size_t)d);
    s->row = malloc(sizeof(double) * (size_t)d);
    if (!s->state || !s->row) {
        free(s->state), free(s->row), free(s);
        return SPAR_ENOMEM;
    }
    *out = s;
    return SPAR_OK;
}

static void scratch_free(scratch *s) {
    free(s->state), free(s->row), free(s);
}

static void powers(scratch *s, double lambda) {
    s->pw[0] = 1.0;
    for (int e = 1; e < B + 2; e++)
        s->pw[e] = s->pw[e - 1] * lambda;
}

/* Token-major views of one head: row i of head h in a [n, heads, d] tensor. */
typedef struct head_view {
    int64_t stride; /* floats between tokens */
    int64_t offset; /* floats to this head in a token */
} head_view;

static const float *row_of(const float *base, head_view v, int64_t i) {
    return base + i * v.stride + v.offset;
}

static double dot(const float *a, const float *b, int d) {
    double s = 0.0;
    for (int c = 0; c < d; c++)
        s += (double)a[c] * (double)b[c];
    return s;
}

/* mat[i][j] = lambda^(i-j) (x_i . y_j) for j <= i < len, 0 above the diagonal. */
static void masked_products(scratch *s, int64_t p0, int64_t len, const float *x, head_view vx,
                            const float *y, head_view vy, int d) {
    for (int64_t i = 0; i < len; i++)
        for (int64_t j = 0; j < B; j++)
            s->mat[i * B + j] =
                j <= i ? s->pw[i - j] * dot(row_of(x, vx, p0 + i), row_of(y, vy, p0 + j), d) : 0.0;
}

/* state <- lambda^len state + sum_j lambda^(len-1-j) x_j^T y_j over the block. */
static void update_state(scratch *s, int64_t p0, int64_t len, const float *x, head_view vx,
                         const float *y, head_view vy, int d) {
    for (int a = 0; a < d * d; a++)
        s->state[a] *= s->pw[len];
    for (int64_t j = 0; j < len; j++) {
        const float *xj = row_of(x, vx, p0 + j), *yj = row_of(y, vy, p0 + j);
        double c = s->pw[len - 1 - j];
        for (int a = 0; a < d; a++)
            for (int b = 0; b < d; b++)
                s->state[a * d + b] += c * (double)xj[a] * (double)yj[b];
    }
}

static void forward_head(scratch *s, int64_t n, int d, const float *q, head_view vq, const float *k,
                         const float *v, head_view vkv, float *o) {
    memset(s->state, 0, sizeof(double) * (size_t)(d * d));
    for (int64_t p0 = 0; p0 < n; p0 += B) {
        int64_t len = n - p0 < B ? n - p0 : B;
        masked_products(s, p0, len, q, vq, k, vkv, d);
        for (int64_t i = 0; i < len; i++) {
            const float *qi = row_of(q, vq, p0 + i);
            for (int b = 0; b < d; b++) { /* inter: lambda^(i+1) q_i KV */
                double acc = 0.0;
                for (int a = 0; a < d; a++)
                    acc += (double)qi[a] * s->state[a * d + b];
                s->row[b] = s->pw[i + 1] * acc;
            }
            for (int64_t j = 0; j <= i; j++) /* intra */
                for (int b = 0; b < d; b++)
                    s->row[b] += s->mat[i * B + j] * (double)row_of(v, vkv, p0 + j)[b];
            float *oi = o + (p0 + i) * vq.stride + vq.offset;
            for (int b = 0; b < d; b++)
                oi[b] = (float)s->row[b];
        }
        update_state(s, p0, len, k, vkv, v, vkv, d);
    }
}

int spar__linear_fwd_local_blocked(const spar_linear_dims *dims, int64_t n, const float *q,
                                   const float *k, const float *v, float *o) {
    int d = dims->head_dim, per = dims->heads / dims->kv_heads;
    scratch *s;
    SPAR_TRY(scratch_init(&s, d));
    for (int h = 0; h < dims->heads; h++) {
        powers(s, dims->decay[h]);
        head_view vq = {(int64_t)dims->heads * d, (int64_t)h * d};
        head_view vkv = {(int64_t)dims->kv_heads * d, (int64_t)(h / per) * d};
        forward_head(s, n, d, q, vq, k, v, vkv, o);
    }
    scratch_free(s);
    return SPAR_OK;
}

/* dq of one head: intra through (dout_i . v_j) lambda^(i-j), inter through the running
 * state of k and v (the forward recurrence, read transposed). */
static void dq_head(scratch *s, int64_t n, int d, const float *k, const float *v, head_view vkv,
                    const float *dout, head_view vq, float *dq) {
    memset(s->state, 0, sizeof(double) * (size_t)(d * d));
    for (int64_t p0 = 0; p0 < n; p0 += B) {
        int64_t len = n - p0 < B ? n - p0 : B;
        masked_products(s, p0, len, dout, vq, v, vkv, d); /* (dout_i . v_j) lambda^(i-j) */
        for (int64_t i = 0; i < len; i++) {
            const float *doi = row_of(dout, vq, p0 + i);
            for (int a = 0; a < d; a++) { /* inter: lambda^(i+1) dout_i KV^T */
                double acc = 0.0;
                for (int b = 0; b < d; b++)
                    acc += s->state[a * d + b] * (double)doi[b];
                s->row[a] = s->pw[i + 1] * acc;
            }
            for (int64_t j = 0; j <= i; j++)
                for (int a = 0; a < d; a++)
                    s->row[a] += s->mat[i * B + j] * (double)row_of(k, vkv, p0 + j)[a];
            float *dqi = dq + (p0 + i) * vq.stride + vq.offset;
            for (int a = 0; a < d; a++)
                dqi[a] = (float)s->row[a];
        }
        update_state(s, p0, len, k, vkv, v, vkv, d);
    }
}

/* dk and dv of one block: intra through the transposed masked products, inter through
 * DKV (held in s->state), added into dk, dv (kv heads are shared by a query group). */
static void dkv_block(scratch *s, int64_t p0, int64_t len, int d, const float *q, const float *dout,
                      head_view vq, const float *k, const float *v, head_view vkv, float *dk,
                      float *dv) {
    for (int pass = 0; pass < 2; pass++) {
        /* pass 0: dk_j = sum_i w (dout_i.v_j) q_i + e_j DKV v_j
         * pass 1: dv_j = sum_i w (q_i.k_j) dout_i + e_j DKV^T k_j */
        if (pass == 0)
            masked_products(s, p0, len, dout, vq, v, vkv, d);
        else
            masked_products(s, p0, len, q, vq, k, vkv, d);
        const float *x = pass == 0 ? q : dout, *y = pass == 0 ? v : k;
        float *out = pass == 0 ? dk : dv;
        for (int64_t j = 0; j < len; j++) {
            const float *yj = row_of(y, vkv, p0 + j);
            double e = s->pw[len - 1 - j];
            for (int a = 0; a < d; a++) {
                double acc = 0.0;
                for (int b = 0; b < d; b++)
                    acc += (pass == 0 ? s->state[a * d + b] : s->state[b * d + a]) * (double)yj[b];
                s->row[a] = e * acc;
            }
            for (int64_t i = j; i < len; i++)
                for (int a = 0; a < d; a++)
                    s->row[a] += s->mat[i * B + j] * (double)row_of(x, vq, p0 + i)[a];
            float *oj = out + (p0 + j) * vkv.stride + vkv.offset;
            for (int a = 0; a < d; a++)
                oj[a] = (float)(oj[a] + s->row[a]);
        }
    }
}

/* DKV <- lambda^len DKV + sum_i lambda^(i+1) q_i^T dout_i over the block. */
static void update_dstate(scratch *s, int64_t p0, int64_t len, const float *q, const float *dout,
                          head_view vq, int d) {
    for (int a = 0; a < d * d; a++)
        s->state[a] *= s->pw[len];
    for (int64_t i = 0; i < len; i++) {
        const float *qi = row_of(q, vq, p0 + i), *doi = row_of(dout, vq, p0 + i);
        for (int a = 0; a < d; a++)
            for (int b = 0; b < d; b++)
                s->state[a * d + b] += s->pw[i + 1] * (double)qi[a] * (double)doi[b];
    }
}

int spar__linear_bwd_local_blocked(const spar_linear_dims *dims, int64_t n, const float *q,
                                   const float *k, const float *v, const float *dout, float *dq,
                                   float *dk, float *dv) {
    int d = dims->head_dim, per = dims->heads / dims->kv_heads;
    scratch *s;
    SPAR_TRY(scratch_init(&s, d));
    size_t kv_len = (size_t)(n * dims->kv_heads * d);
    memset(dk, 0, kv_len * sizeof(float));
    memset(dv, 0, kv_len * sizeof(float));
    for (int h = 0; h < dims->heads; h++) {
        powers(s, dims->decay[h]);
        head_view vq = {(int64_t)dims->heads * d, (int64_t)h * d};
        head_view vkv = {(int64_t)dims->kv_heads * d, (int64_t)(h / per) * d};
        dq_head(s, n, d, k, v, vkv, dout, vq, dq);
        memset(s->state, 0, sizeof(double) * (size_t)(d * d));
        int64_t last = n > 0 ? (n - 1) / B * B : 0;
        for (int64_t p0 = last; p0 >= 0 && n > 0; p0 -= B) {
            int64_t len = n - p0 < B ? n - p0 : B;
            dkv_block(s, p0, len, d, q, dout, vq, k, v, vkv, dk, dv);
            update_dstate(s, p0, len, q, dout, vq, d);
        }
    }
    scratch_free(s);
    return SPAR_OK;
}
