/* linear_blas.c: causal linear attention inside a segment with OpenBLAS block products.
 *
 * The algorithm of linear_blocked.c (blocks of B tokens, a running d x d state across
 * them), with every product an sgemm. Forward, per block: S = Q_b K_b^T, masked and
 * decayed in place (D_ij = lambda^(i-j), j <= i), then
 *   O_b = [S (.) D | diag(lambda^(i+1)) Q_b] [V_b ; KV]       (one sgemm, k = len + d)
 *   KV <- lambda^L KV + (diag(lambda^(L-1-j)) K_b)^T V_b.
 * The state lives under the block's V rows in one buffer (head_state.stack), so the intra
 * and inter products are a single call. Backward runs the same sweep for dQ (with V, K in
 * the roles of K, V: the state is then KV^T) and a reverse one with
 * DKV <- lambda^L DKV + (diag(lambda^(i+1)) Q_b)^T dO_b for dK, dV.
 *
 * Loops: blocks outer, heads inner. One block of rows of every head is read once from
 * memory and then stays in cache, so time per token does not grow once the tensors
 * outgrow the last-level cache. Each OpenMP thread owns a range of heads (backward: of kv
 * heads, whose dK/dV rows no other thread writes). fp32 throughout; checked against the
 * scalar oracle (tests/unit/test_linear.c).
 */
#include <cblas.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"
#include "spar_status.h"

#define B SPAR_LINEAR_BLOCK

/* One head's running sweep. */
typedef struct head_state {
    float *stack;    /* [B + d, d]: rows B-len..B-1 this block's z rows, rows B.. the state */
    float pw[B + 2]; /* lambda^0 .. lambda^(B+1) */
    float rev[B];    /* rev[t] = lambda^(B-1-t): row i of the mask is rev + B-1-i */
} head_state;

/* One thread's heads [h0, h1) and scratch. */
typedef struct sweep {
    int h0, h1, d;
    head_state *hs;
    float *a;   /* [B, B + d]: masked block product beside the scaled x rows */
    float *p;   /* [B, B] */
    float *tmp; /* [B, d] */
    float *yt;  /* [d, B]: a block's rows transposed */
} sweep;

static void sweep_free(sweep *w) {
    for (int i = 0; w->hs && i < w->h1 - w->h0; i++)
        free(w->hs[i].stack);
    free(w->hs), free(w->a), free(w->p), free(w->tmp), free(w->yt);
}

/* The calling thread's share of `count` items, contiguous. */
static void thread_share(int count, int *lo, int *hi) {
    int t = omp_get_thread_num(), nt = omp_get_num_threads();
    *lo = (int)((int64_t)count * t / nt), *hi = (int)((int64_t)count * (t + 1) / nt);
}

static int sweep_alloc(sweep *w, int h0, int h1, int d, const double *decay) {
    *w = (sweep){.h0 = h0, .h1 = h1, .d = d};
    w->hs = calloc((size_t)(h1 - h0) + 1, sizeof *w->hs);
    w->a = malloc(sizeof(float) * (size_t)(B * (B + d)));
    w->p = malloc(sizeof(float) * (size_t)(B * B));
    w->tmp = malloc(sizeof(float) * (size_t)(B * d));
    w->yt = malloc(sizeof(float) * (size_t)(B * d));
    if (!w->hs || !w->a || !w->p || !w->tmp || !w->yt) return SPAR_ENOMEM;
    for (int h = h0; h < h1; h++) {
        head_state *hs = &w->hs[h - h0];
        if (!(hs->stack = malloc(sizeof(float) * (size_t)((B + d) * d)))) return SPAR_ENOMEM;
        double x = 1.0;
        for (int e = 0; e < B + 2; e++, x *= decay[h])
            hs->pw[e] = (float)x;
        for (int t = 0; t < B; t++)
            hs->rev[t] = hs->pw[B - 1 - t];
    }
    return SPAR_OK;
}

static void reset_states(sweep *w) {
    int d = w->d;
    for (int i = 0; i < w->h1 - w->h0; i++)
        memset(w->hs[i].stack + (size_t)B * d, 0, sizeof(float) * (size_t)(d * d));
}

/* m[i][j] <- lambda^(i-j) m[i][j] for j <= i, 0 above the diagonal (len x len, ld ldm). */
static void mask_decay(const head_state *hs, float *m, int ldm, int len) {
    for (int i = 0; i < len; i++) {
        float *row = m + (size_t)i * ldm;
        const float *r = hs->rev + (B - 1 - i);
        for (int j = 0; j <= i; j++)
            row[j] *= r[j];
        for (int j = i + 1; j < len; j++)
            row[j] = 0.0f;
    }
}

/* state <- lambda^len state + (diag(c) x_b)^T y_b. */
static void update_state(sweep *w, const head_state *hs, const float *xb, int ldx, const float *c,
                         const float *yb, int ldy, int len) {
    int d = w->d;
    for (int j = 0; j < len; j++)
        for (int e = 0; e < d; e++)
            w->tmp[j * d + e] = c[j] * xb[(size_t)j * ldx + e];
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, d, d, len, 1.0f, w->tmp, d, yb, ldy,
                hs->pw[len], hs->stack + (size_t)B * d, d);
}

/* m = x_b y_b^T (len x len, ld ldm). y_b is first copied transposed: OpenBLAS runs the
 * NN product on its small-matrix kernels, about 1.5x the rate of the NT form at these
 * sizes, which goes through its packing path. */
static void block_product(sweep *w, const float *xb, int ldx, const float *yb, int ldy, int len,
                          float *m, int ldm) {
    int d = w->d;
    for (int j = 0; j < len; j++)
        for (int e = 0; e < d; e++)
            w->yt[e * B + j] = yb[(size_t)j * ldy + e];
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, len, len, d, 1.0f, xb, ldx, w->yt, B,
                0.0f, m, ldm);
}

/* Row operands of one head at one block: x, y, z with their leading dimensions. */
typedef struct rows {
    const float *x, *y, *z;
    int ldx, ldyz;
} rows;

/* out_b = [(x_b y_b^T) (.) D | diag(lambda^(i+1)) x_b] [z_b ; state], then the state
 * <- lambda^len state + (diag(lambda^(len-1-j)) y_b)^T z_b. out_b is overwritten. */
static void fwd_block(sweep *w, head_state *hs, const rows *r, int p0, int len, float *out,
                      int ldo) {
    int d = w->d, lda = B + d;
    const float *xb = r->x + (size_t)p0 * r->ldx, *yb = r->y + (size_t)p0 * r->ldyz,
                *zb = r->z + (size_t)p0 * r->ldyz;
    float *zs = hs->stack + (size_t)(B - len) * d;
    block_product(w, xb, r->ldx, yb, r->ldyz, len, w->a, lda);
    mask_decay(hs, w->a, lda, len);
    for (int i = 0; i < len; i++) {
        float c = hs->pw[i + 1], *dst = w->a + (size_t)i * lda + len;
        for (int e = 0; e < d; e++)
            dst[e] = c * xb[(size_t)i * r->ldx + e];
        memcpy(zs + (size_t)i * d, zb + (size_t)i * r->ldyz, sizeof(float) * (size_t)d);
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, len, d, len + d, 1.0f, w->a, lda, zs, d,
                0.0f, out + (size_t)p0 * ldo, ldo);
    float c[B];
    for (int j = 0; j < len; j++)
        c[j] = hs->pw[len - 1 - j];
    update_state(w, hs, yb, r->ldyz, c, zs, d, len);
}

int spar__linear_fwd_local_blas(const spar_linear_dims *dims, int64_t n, const float *q,
                                const float *k, const float *v, float *o) {
    int d = dims->head_dim, per = dims->heads / dims->kv_heads, status = SPAR_OK;
    int ldq = dims->heads * d, ldkv = dims->kv_heads * d;
#pragma omp parallel
    {
        sweep w;
        int h0, h1;
        thread_share(dims->heads, &h0, &h1);
        int rc = sweep_alloc(&w, h0, h1, d, dims->decay);
        if (rc == 0) reset_states(&w);
        for (int64_t p0 = 0; rc == 0 && p0 < n; p0 += B) {
            int len = n - p0 < B ? (int)(n - p0) : B;
            for (int h = h0; h < h1; h++) {
                int g = h / per;
                rows r = {.x = q + h * d, .y = k + g * d, .z = v + g * d, .ldx = ldq, .ldyz = ldkv};
                fwd_block(&w, &w.hs[h - h0], &r, (int)p0, len, o + h * d, ldq);
            }
        }
        sweep_free(&w);
        if (rc != 0) {
#pragma omp atomic write
            status = rc;
        }
    }
    return status;
}

/* out[p0+i] += c_i (x_b m or x_b m^T)[i], c_i = lambda^(len-1-i). */
static void add_through_state(sweep *w, const head_state *hs, const float *xb, int ldx,
                              bool transpose, int len, float *outb, int ldo) {
    int d = w->d;
    const float *m = hs->stack + (size_t)B * d;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, transpose ? CblasTrans : CblasNoTrans, len, d, d, 1.0f,
                xb, ldx, m, d, 0.0f, w->tmp, d);
    for (int i = 0; i < len; i++) {
        float c = hs->pw[len - 1 - i];
        for (int e = 0; e < d; e++)
            outb[(size_t)i * ldo + e] += c * w->tmp[i * d + e];
    }
}

/* Tensors of the backward pass at one head (base pointers at the head). */
typedef struct grads {
    const float *q, *k, *v, *dout;
    float *dk, *dv;
    int ldq, ldkv;
} grads;

/* One block of the reverse sweep: dK, dV of the block added (the kv head is shared by the
 * query group), intra through the transposed masked products, inter through DKV. */
static void dkv_block(sweep *w, head_state *hs, const grads *g, int p0, int len) {
    int d = w->d;
    const float *qb = g->q + (size_t)p0 * g->ldq, *dob = g->dout + (size_t)p0 * g->ldq,
                *kb = g->k + (size_t)p0 * g->ldkv, *vb = g->v + (size_t)p0 * g->ldkv;
    float *dkb = g->dk + (size_t)p0 * g->ldkv, *dvb = g->dv + (size_t)p0 * g->ldkv;
    block_product(w, dob, g->ldq, vb, g->ldkv, len, w->a, B); /* dP */
    mask_decay(hs, w->a, B, len);
    block_product(w, qb, g->ldq, kb, g->ldkv, len, w->p, B); /* P */
    mask_decay(hs, w->p, B, len);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, len, d, len, 1.0f, w->a, B, qb, g->ldq,
                1.0f, dkb, g->ldkv);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, len, d, len, 1.0f, w->p, B, dob, g->ldq,
                1.0f, dvb, g->ldkv);
    add_through_state(w, hs, vb, g->ldkv, true, len, dkb, g->ldkv);
    add_through_state(w, hs, kb, g->ldkv, false, len, dvb, g->ldkv);
    float c[B]; /* DKV <- lambda^len DKV + (diag(lambda^(j+1)) q_b)^T dO_b */
    for (int j = 0; j < len; j++)
        c[j] = hs->pw[j + 1];
    update_state(w, hs, qb, g->ldq, c, dob, g->ldq, len);
}

/* The two sweeps of one thread's kv heads [g0, g1) and their query heads. */
static void bwd_sweeps(sweep *w, const spar_linear_dims *dims, int64_t n, const grads *all,
                       float *dq) {
    int d = dims->head_dim, per = dims->heads / dims->kv_heads;
    reset_states(w);
    for (int64_t p0 = 0; p0 < n; p0 += B) { /* dQ: the forward sweep with (dO, V, K) */
        int len = n - p0 < B ? (int)(n - p0) : B;
        for (int h = w->h0; h < w->h1; h++) {
            int g = h / per;
            rows r = {.x = all->dout + h * d,
                      .y = all->v + g * d,
                      .z = all->k + g * d,
                      .ldx = all->ldq,
                      .ldyz = all->ldkv};
            fwd_block(w, &w->hs[h - w->h0], &r, (int)p0, len, dq + h * d, all->ldq);
        }
    }
    reset_states(w);
    for (int64_t p0 = n > 0 ? (n - 1) / B * B : 0; n > 0 && p0 >= 0; p0 -= B) {
        int len = n - p0 < B ? (int)(n - p0) : B;
        for (int h = w->h0; h < w->h1; h++) {
            int g = h / per;
            grads hg = {.q = all->q + h * d,
                        .k = all->k + g * d,
                        .v = all->v + g * d,
                        .dout = all->dout + h * d,
                        .dk = all->dk + g * d,
                        .dv = all->dv + g * d,
                        .ldq = all->ldq,
                        .ldkv = all->ldkv};
            dkv_block(w, &w->hs[h - w->h0], &hg, (int)p0, len);
        }
    }
}

int spar__linear_bwd_local_blas(const spar_linear_dims *dims, int64_t n, const float *q,
                                const float *k, const float *v, const float *dout, float *dq,
                                float *dk, float *dv) {
    int d = dims->head_dim, per = dims->heads / dims->kv_heads, status = SPAR_OK;
    size_t kv_len = (size_t)(n * dims->kv_heads * d);
    memset(dk, 0, kv_len * sizeof(float));
    memset(dv, 0, kv_len * sizeof(float));
    grads all = {.q = q,
                 .k = k,
                 .v = v,
                 .dout = dout,
                 .dk = dk,
                 .dv = dv,
                 .ldq = dims->heads * d,
                 .ldkv = dims->kv_heads * d};
#pragma omp parallel
    {
        sweep w;
        int g0, g1;
        thread_share(dims->kv_heads, &g0, &g1);
        int rc = sweep_alloc(&w, g0 * per, g1 * per, d, dims->decay);
        if (rc == 0) bwd_sweeps(&w, dims, n, &all, dq);
        sweep_free(&w);
        if (rc != 0) {
#pragma omp atomic write
            status = rc;
        }
    }
    return status;
}
