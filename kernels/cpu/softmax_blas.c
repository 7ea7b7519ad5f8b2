/* softmax_blas.c: the fast CPU softmax-attention block kernels.
 *
 * Flash-attention on the CPU: per query head, keys in tiles of KT; the two products of a
 * tile (S = scale Q K^T and P V, and backward's four) go to OpenBLAS sgemm, which picks
 * its SIMD code at run time; the element-wise softmax work in between (max, exp, sums)
 * is plain C compiled for AVX-512, AVX2 and a portable fallback, chosen at run time by
 * the loader (target_clones). Heads (backward: kv heads, whose dK/dV they own) are shared
 * among OpenMP threads. Scratch is O(query block x KT) per thread; nothing is N x N.
 * Checked against the scalar oracle (tests/unit/test_kernels*.c).
 */
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"
#include "exp_simd.h"
#include "spar_status.h"

#define KT 512 /* keys per tile */

/* dst[j] = exp(src[j] - shift) and the sum, while finding max(src) (*max_out): one pass
 * for what would otherwise take two (the maximum, then the exponentials). */
SPAR_SIMD_CLONES static float exp_row_tracking(const float *src, float *dst, int64_t n, float shift,
                                               float *max_out) {
    float part[LANES] = {0}, top[LANES];
    for (int l = 0; l < LANES; l++)
        top[l] = -INFINITY;
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int l = 0; l < LANES; l++) {
            float x = src[j + l], e = exp_nonpositive(x - shift);
            dst[j + l] = e;
            part[l] += e;
            top[l] = x > top[l] ? x : top[l];
        }
    float sum = 0.0f, m = -INFINITY;
    for (; j < n; j++) {
        dst[j] = exp_nonpositive(src[j] - shift);
        sum += dst[j];
        m = src[j] > m ? src[j] : m;
    }
    for (int l = 0; l < LANES; l++) {
        sum += part[l];
        m = top[l] > m ? top[l] : m;
    }
    *max_out = m;
    return sum;
}

SPAR_SIMD_CLONES static float max_row(const float *row, int64_t n) {
    float part[LANES];
    for (int l = 0; l < LANES; l++)
        part[l] = -INFINITY;
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int l = 0; l < LANES; l++)
            part[l] = row[j + l] > part[l] ? row[j + l] : part[l];
    float m = -INFINITY;
    for (; j < n; j++)
        m = row[j] > m ? row[j] : m;
    for (int l = 0; l < LANES; l++)
        m = part[l] > m ? part[l] : m;
    return m;
}

/* ds[j] = p[j] * (dp[j] - delta), in place in dp. */
SPAR_SIMD_CLONES static void ds_row(const float *p, float *dp, int64_t n, float delta) {
    for (int64_t j = 0; j < n; j++)
        dp[j] = p[j] * (dp[j] - delta);
}

/* Keys of the tile [k0, k0+kn) that query position qp may see: a prefix, since positions
 * increase. */
static int64_t visible_prefix(const spar_kvblock *kb, int64_t k0, int64_t kn, int64_t qp) {
    int64_t lo = 0, hi = kn;
    while (lo < hi) {
        int64_t mid = (lo + hi) / 2;
        if (kb->pos[k0 + mid] <= qp)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Per-thread scratch for one query block. */
typedef struct tile {
    float *s, *dp, *acc, *m, *l;
} tile;

static int tile_alloc(tile *t, int64_t nq, int d, bool backward) {
    (void)backward; /* forward uses dp for the probabilities */
    *t =
        (tile){malloc(sizeof(float) * (size_t)(nq * KT)), malloc(sizeof(float) * (size_t)(nq * KT)),
               malloc(sizeof(float) * (size_t)(nq * d + 1)), malloc(sizeof(float) * (size_t)nq),
               malloc(sizeof(float) * (size_t)nq)};
    return t->s && t->acc && t->m && t->l && t->dp ? SPAR_OK : SPAR_ENOMEM;
}

static void tile_free(tile *t) {
    free(t->s), free(t->dp), free(t->acc), free(t->m), free(t->l);
}

/* S = scale q_h k_tile^T with future keys at -inf (causal). */
static void scores(const spar_attn_dims *dims, bool causal, const spar_qblock *qb,
                   const spar_kvblock *kb, int h, int64_t k0, int64_t kn, float *s) {
    int d = dims->head_dim, g = h / (dims->heads / dims->kv_heads);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)qb->n, (int)kn, d, dims->scale,
                qb->q + (int64_t)h * d, (int)qb->stride_q, kb->k + k0 * kb->stride_kv + g * d,
                (int)kb->stride_kv, 0.0f, s, KT);
    if (!causal || kb->pos[k0 + kn - 1] <= qb->pos[0]) return; /* the whole tile is visible */
    for (int64_t i = 0; i < qb->n; i++)
        for (int64_t j = visible_prefix(kb, k0, kn, qb->pos[i]); j < kn; j++)
            s[i * KT + j] = -INFINITY;
}

/* How far above the running maximum a score may be before the row is rescaled: the
 * exponentials then stay below e^32, far from fp32's range, so most tiles need neither a
 * separate maximum pass nor a rescale. */
#define RESCALE_MARGIN 32.0f

/* The running (m, l, acc) of every query row after one more tile. The first tile of a row
 * fixes m from its maximum; later ones keep it unless a score exceeds it by the margin. */
static void online_softmax_tile(const spar_attn_dims *dims, const spar_qblock *qb,
                                const spar_kvblock *kb, int h, int64_t k0, int64_t kn, tile *t) {
    int d = dims->head_dim, g = h / (dims->heads / dims->kv_heads);
    for (int64_t i = 0; i < qb->n; i++) {
        float *row = t->s + i * KT, *p = t->dp + i * KT, top;
        if (t->m[i] == -INFINITY) t->m[i] = max_row(row, kn);
        if (t->m[i] == -INFINITY) { /* nothing visible yet: keep the row empty */
            memset(p, 0, sizeof(float) * (size_t)kn);
            continue;
        }
        float sum = exp_row_tracking(row, p, kn, t->m[i], &top);
        if (top > t->m[i] + RESCALE_MARGIN) { /* rare: move the reference and redo the row */
            float alpha = expf(t->m[i] - top);
            t->l[i] *= alpha;
            for (int c = 0; c < d; c++)
                t->acc[i * d + c] *= alpha;
            t->m[i] = top;
            sum = exp_row_tracking(row, p, kn, top, &top);
        }
        t->l[i] += sum;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)qb->n, d, (int)kn, 1.0f, t->dp, KT,
                kb->v + k0 * kb->stride_kv + g * d, (int)kb->stride_kv, 1.0f, t->acc, d);
}

/* Fold the block's (m + log l, acc / l) into the running partial (DESIGN.md 3.1). */
static void merge_into(const spar_attn_dims *dims, const spar_qblock *qb, int h, const tile *t) {
    int d = dims->head_dim;
    for (int64_t i = 0; i < qb->n; i++) {
        if (t->l[i] <= 0.0f) continue;
        float *lse = qb->lse + i * qb->stride_lse + h, *o = qb->o + i * qb->stride_q + h * d;
        double wa, wb, lse_b = (double)t->m[i] + log((double)t->l[i]);
        double lse_new = spar__merge_weights(*lse, lse_b, &wa, &wb);
        wb /= t->l[i]; /* acc is unnormalised */
        for (int c = 0; c < d; c++)
            o[c] = (float)(wa * o[c] + wb * t->acc[i * d + c]);
        *lse = (float)lse_new;
    }
}

/* Tiles of keys that some query may see (positions increase: stop at the first tile
 * wholly in the future). */
static int64_t useful_keys(bool causal, const spar_qblock *qb, const spar_kvblock *kb) {
    if (!causal || kb->n == 0) return kb->n;
    return visible_prefix(kb, 0, kb->n, qb->pos[qb->n - 1]);
}

int spar__softmax_fwd_block_blas(const spar_attn_dims *dims, bool causal, const spar_qblock *qb,
                                 const spar_kvblock *kb) {
    int status = SPAR_OK;
    int64_t nk = useful_keys(causal, qb, kb);
    if (qb->n == 0 || nk == 0) return SPAR_OK;
#pragma omp parallel
    {
        tile t;
        int rc = tile_alloc(&t, qb->n, dims->head_dim, false);
#pragma omp for schedule(dynamic)
        for (int h = 0; h < dims->heads; h++) {
            if (rc != 0) continue;
            for (int64_t i = 0; i < qb->n; i++)
                t.m[i] = -INFINITY, t.l[i] = 0.0f;
            memset(t.acc, 0, sizeof(float) * (size_t)(qb->n * dims->head_dim));
            for (int64_t k0 = 0; k0 < nk; k0 += KT) {
                int64_t kn = nk - k0 < KT ? nk - k0 : KT;
                scores(dims, causal, qb, kb, h, k0, kn, t.s);
                online_softmax_tile(dims, qb, kb, h, k0, kn, &t);
            }
            merge_into(dims, qb, h, &t);
        }
        tile_free(&t);
        if (rc != 0) {
#pragma omp atomic write
            status = rc;
        }
    }
    return status;
}

/* One tile of one query head's gradients: P from the final lse, dS = P (dP - delta),
 * then dV += P^T dout, dQ += scale dS K, dK += scale dS^T Q. */
static void backward_tile(const spar_attn_dims *dims, bool causal, const spar_qblock *qb,
                          const spar_kvblock *kb, int h, int64_t k0, int64_t kn, tile *t) {
    int d = dims->head_dim, g = h / (dims->heads / dims->kv_heads);
    int64_t nq = qb->n;
    const float *kt = kb->k + k0 * kb->stride_kv + g * d, *vt = kb->v + k0 * kb->stride_kv + g * d;
    const float *qh = qb->q + (int64_t)h * d, *doh = qb->dout + (int64_t)h * d;
    scores(dims, causal, qb, kb, h, k0, kn, t->s);
    for (int64_t i = 0; i < nq; i++) { /* a row that saw no key at all has lse = -inf */
        float lse = qb->lse[i * qb->stride_lse + h];
        if (isinf(lse))
            memset(t->s + i * KT, 0, sizeof(float) * (size_t)kn);
        else
            exp_row(t->s + i * KT, kn, lse);
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nq, (int)kn, d, 1.0f, doh,
                (int)qb->stride_q, vt, (int)kb->stride_kv, 0.0f, t->dp, KT);
    for (int64_t i = 0; i < nq; i++)
        ds_row(t->s + i * KT, t->dp + i * KT, kn, qb->delta[i * qb->stride_lse + h]);
    int ldkv = (int)kb->stride_kv, ldq = (int)qb->stride_q;
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)kn, d, (int)nq, 1.0f, t->s, KT, doh,
                ldq, 1.0f, kb->dv + k0 * kb->stride_kv + g * d, ldkv);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)nq, d, (int)kn, dims->scale, t->dp,
                KT, kt, ldkv, 1.0f, qb->dq + (int64_t)h * d, ldq);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)kn, d, (int)nq, dims->scale, t->dp,
                KT, qh, ldq, 1.0f, kb->dk + k0 * kb->stride_kv + g * d, ldkv);
}

int spar__softmax_bwd_block_blas(const spar_attn_dims *dims, bool causal, const spar_qblock *qb,
                                 const spar_kvblock *kb) {
    int status = SPAR_OK, per = dims->heads / dims->kv_heads;
    int64_t nk = useful_keys(causal, qb, kb);
    if (qb->n == 0 || nk == 0) return SPAR_OK;
#pragma omp parallel
    {
        tile t;
        int rc = tile_alloc(&t, qb->n, dims->head_dim, true);
        /* A thread owns a kv head: its dK, dV rows are written by no other thread. */
#pragma omp for schedule(dynamic)
        for (int g = 0; g < dims->kv_heads; g++) {
            for (int h = g * per; h < (g + 1) * per && rc == 0; h++)
                for (int64_t k0 = 0; k0 < nk; k0 += KT)
                    backward_tile(dims, causal, qb, kb, h, k0, nk - k0 < KT ? nk - k0 : KT, &t);
        }
        tile_free(&t);
        if (rc != 0) {
#pragma omp atomic write
            status = rc;
        }
    }
    return status;
}
