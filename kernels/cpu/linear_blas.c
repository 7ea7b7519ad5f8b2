/* linear_blas.c: causal linear attention inside a segment with OpenBLAS block products.
 *
 * The algorithm of linear_blocked.c (blocks of B tokens, a running d x d state across
 * them), with every product an sgemm: per block, S = Q_b K_b^T, masked and decayed in
 * place (D_ij = lambda^(i-j), j <= i), O_b = S V_b + diag(lambda^(i+1)) Q_b KV, then
 * KV <- lambda^L KV + (diag(lambda^(L-1-j)) K_b)^T V_b. Backward runs the same sweep for
 * dQ and a reverse one with DKV <- lambda^L DKV + (diag(lambda^(i+1)) Q_b)^T dO_b for dK,
 * dV. Heads (backward: kv heads, whose dK/dV they own) are shared among OpenMP threads.
 * fp32 throughout; checked against the scalar oracle (tests/unit/test_linear.c).
 */
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"
#include "spar_status.h"

#define B SPAR_LINEAR_BLOCK

typedef struct work {
    float pw[B + 2];          /* lambda^0 .. lambda^(B+1) */
    float s[B * B], p[B * B]; /* block matrices */
    float *kv;                /* [d, d] running state */
    float *tmp;               /* [B, d] */
} work;

static int work_alloc(work **out, int d) {
    work *w = malloc(sizeof *w);
    if (!w) return SPAR_ENOMEM;
    w->kv = malloc(sizeof(float) * (size_t)(d * d));
    w->tmp = malloc(sizeof(float) * (size_t)(B * d));
    if (!w->kv || !w->tmp) {
        free(w->kv), free(w->tmp), free(w);
        return SPAR_ENOMEM;
    }
    *out = w;
    return SPAR_OK;
}

static void work_free(work *w) {
    if (w) free(w->kv), free(w->tmp), free(w);
}

static void powers(work *w, double lambda) {
    double x = 1.0;
    for (int e = 0; e < B + 2; e++, x *= lambda)
        w->pw[e] = (float)x;
}

/* m[i][j] <- lambda^(i-j) m[i][j] for j <= i, 0 above the diagonal (len x len of B x B). */
static void mask_decay(const work *w, float *m, int len) {
    for (int i = 0; i < len; i++)
        for (int j = 0; j < len; j++)
            m[i * B + j] = j <= i ? m[i * B + j] * w->pw[i - j] : 0.0f;
}

/* One head's view: base pointers at the head, floats between tokens. */
typedef struct view {
    const float *q, *k, *v, *dout;
    float *o, *dq, *dk, *dv;
    int ldq, ldkv;
} view;

/* m = x_b y_b^T for rows [p0, p0+len) (x, y with their leading dimensions). */
static void block_product(const float *x, int ldx, const float *y, int ldy, int p0, int len, int d,
                          float *m) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, len, len, d, 1.0f, x + (size_t)p0 * ldx,
                ldx, y + (size_t)p0 * ldy, ldy, 0.0f, m, B);
}

/* state <- lambda^len state + (diag(c) x_b)^T y_b, c_j = lambda^(len-1-j) (or, reverse,
 * lambda^(j+1)). */
static void update_state(work *w, const float *x, int ldx, const float *y, int ldy, int p0, int len,
                         int d, bool reverse) {
    for (int j = 0; j < len; j++) {
        float c = reverse ? w->pw[j + 1] : w->pw[len - 1 - j];
        for (int a = 0; a < d; a++)
            w->tmp[j * d + a] = c * x[(size_t)(p0 + j) * ldx + a];
    }
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, d, d, len, 1.0f, w->tmp, d,
                y + (size_t)p0 * ldy, ldy, w->pw[len], w->kv, d);
}

/* out_b[i] += c_i (x_b state^T or x_b state)[i], c_i = lambda^(i+1) or lambda^(len-1-i). */
static void add_through_state(work *w, const float *x, int ldx, bool transpose, int p0, int len,
                              int d, bool from_end, float *out, int ldo) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, transpose ? CblasTrans : CblasNoTrans, len, d, d, 1.0f,
                x + (size_t)p0 * ldx, ldx, w->kv, d, 0.0f, w->tmp, d);
    for (int i = 0; i < len; i++) {
        float c = from_end ? w->pw[len - 1 - i] : w->pw[i + 1];
        for (int a = 0; a < d; a++)
            out[(size_t)(p0 + i) * ldo + a] += c * w->tmp[i * d + a];
    }
}

/* The forward recurrence over blocks, for the output (x = q, y = k, z = v, state read as
 * is) and, with x = dout, y = v, z = k and the state read transposed, for dq:
 *   out_b = ((x_b y_b^T) (.) D) z_b + diag(lambda^(i+1)) x_b KV(^T),
 *   KV <- lambda^L KV + (diag(lambda^(L-1-j)) k_b)^T v_b. */
static void forward_sweep(work *w, const view *h, int n, int d, const float *x, const float *y,
                          const float *z, bool transpose, float *out) {
    memset(w->kv, 0, sizeof(float) * (size_t)(d * d));
    for (int p0 = 0; p0 < n; p0 += B) {
        int len = n - p0 < B ? n - p0 : B;
        block_product(x, h->ldq, y, h->ldkv, p0, len, d, w->s);
        mask_decay(w, w->s, len);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, len, d, len, 1.0f, w->s, B,
                    z + (size_t)p0 * h->ldkv, h->ldkv, 0.0f, out + (size_t)p0 * h->ldq, h->ldq);
        add_through_state(w, x, h->ldq, transpose, p0, len, d, false, out, h->ldq);
        update_state(w, h->k, h->ldkv, h->v, h->ldkv, p0, len, d, false);
    }
}

int spar__linear_fwd_local_blas(const spar_linear_dims *dims, int64_t n, const float *q,
                                const float *k, const float *v, float *o) {
    int d = dims->head_dim, per = dims->heads / dims->kv_heads, status = SPAR_OK;
#pragma omp parallel
    {
        work *w = NULL;
        int rc = work_alloc(&w, d);
#pragma omp for schedule(dynamic)
        for (int h = 0; h < dims->heads; h++) {
            if (rc != 0) continue;
            int g = h / per;
            view hv = {.q = q + h * d,
                       .k = k + g * d,
                       .v = v + g * d,
                       .o = o + h * d,
                       .ldq = dims->heads * d,
                       .ldkv = dims->kv_heads * d};
            powers(w, dims->decay[h]);
            forward_sweep(w, &hv, (int)n, d, hv.q, hv.k, hv.v, false, hv.o);
        }
        work_free(w);
        if (rc != 0) {
#pragma omp atomic write
            status = rc;
        }
    }
    return status;
}

/* dK, dV of one head, added (the kv head is shared by the query group): intra through the
 * transposed masked products, inter through DKV (held in w->kv), blocks last to first. */
static void dkv_head(work *w, const view *h, int n, int d) {
    memset(w->kv, 0, sizeof(float) * (size_t)(d * d));
    for (int p0 = n > 0 ? (n - 1) / B * B : 0; p0 >= 0 && n > 0; p0 -= B) {
        int len = n - p0 < B ? n - p0 : B;
        block_product(h->dout, h->ldq, h->v, h->ldkv, p0, len, d, w->s); /* dP */
        mask_decay(w, w->s, len);
        block_product(h->q, h->ldq, h->k, h->ldkv, p0, len, d, w->p); /* P */
        mask_decay(w, w->p, len);
        float *dk = h->dk + (size_t)p0 * h->ldkv, *dv = h->dv + (size_t)p0 * h->ldkv;
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, len, d, len, 1.0f, w->s, B,
                    h->q + (size_t)p0 * h->ldq, h->ldq, 1.0f, dk, h->ldkv);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, len, d, len, 1.0f, w->p, B,
                    h->dout + (size_t)p0 * h->ldq, h->ldq, 1.0f, dv, h->ldkv);
        add_through_state(w, h->v, h->ldkv, true, p0, len, d, true, h->dk, h->ldkv);
        add_through_state(w, h->k, h->ldkv, false, p0, len, d, true, h->dv, h->ldkv);
        update_state(w, h->q, h->ldq, h->dout, h->ldq, p0, len, d, true);
    }
}

int spar__linear_bwd_local_blas(const spar_linear_dims *dims, int64_t n, const float *q,
                                const float *k, const float *v, const float *dout, float *dq,
                                float *dk, float *dv) {
    int d = dims->head_dim, per = dims->heads / dims->kv_heads, status = SPAR_OK;
    size_t kv_len = (size_t)(n * dims->kv_heads * d);
    memset(dk, 0, kv_len * sizeof(float));
    memset(dv, 0, kv_len * sizeof(float));
#pragma omp parallel
    {
        work *w = NULL;
        int rc = work_alloc(&w, d);
        /* A thread owns a kv head: its dK, dV rows are written by no other thread. */
#pragma omp for schedule(dynamic)
        for (int g = 0; g < dims->kv_heads; g++) {
            for (int h = g * per; h < (g + 1) * per && rc == 0; h++) {
                view hv = {.q = q + h * d,
                           .k = k + g * d,
                           .v = v + g * d,
                           .dout = dout + h * d,
                           .dq = dq + h * d,
                           .dk = dk + g * d,
                           .dv = dv + g * d,
                           .ldq = dims->heads * d,
                           .ldkv = dims->kv_heads * d};
                powers(w, dims->decay[h]);
                forward_sweep(w, &hv, (int)n, d, hv.dout, hv.v, hv.k, true, hv.dq);
                dkv_head(w, &hv, (int)n, d);
            }
        }
        work_free(w);
        if (rc != 0) {
#pragma omp atomic write
            status = rc;
        }
    }
    return status;
}

/* ---- the O(n d^2) state products, as sgemm over blocks of B rows ------------------- */

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
