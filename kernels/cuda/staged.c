/* staged.c: the CUDA backend of the kernel table (spar_kernels_cuda) for tensors that live
 * in host memory: each call copies what the kernel reads to the device (into buffers that
 * grow as needed and are kept between calls), runs the device launcher of
 * cuda_kernels.h, waits, and copies what it wrote back. float32 only, as the table is.
 * This is the path run.device=cuda takes while the engine keeps tensors on the host; the
 * copies cost more than the kernels, so it is for correctness and small runs. The
 * device-resident launchers are the fast path.
 */
#include <stdint.h>

#include "cuda_kernels.h" // defines: the spar_cuda_* launchers and primitives
#include "spar_status.h"

enum slot { S_Q, S_K, S_V, S_O, S_LSE, S_DOUT, S_DELTA, S_DQ, S_DK, S_DV, S_QPOS, S_KPOS, SLOTS };

static struct {
    void *p;
    size_t cap;
} bufs[SLOTS];

/* Floats a view of `rows` rows, `width` used of each `stride`, spans (its last row ends at
 * its width: a view of some heads must not be read past its tensor's end). */
static size_t span(int64_t rows, int64_t stride, int64_t width) {
    return rows == 0 ? 0 : (size_t)((rows - 1) * stride + width);
}

/* The slot's device buffer, at least `bytes` long, with `host` copied in (host may be NULL
 * for an output that is overwritten). */
static int put(enum slot s, const void *host, size_t bytes, void **dev) {
    if (bytes > bufs[s].cap || !bufs[s].p) {
        spar_cuda_free(bufs[s].p);
        bufs[s].p = NULL, bufs[s].cap = 0;
        SPAR_TRY(spar_cuda_malloc(&bufs[s].p, bytes));
        bufs[s].cap = bytes;
    }
    *dev = bufs[s].p;
    return host ? spar_cuda_copy(bufs[s].p, host, bytes) : SPAR_OK;
}

static int softmax_stage(const spar_attn_dims *dims, bool causal, const spar_qblock *qb,
                         const spar_kvblock *kb, bool backward, spar_cuda_qblock *dq,
                         spar_cuda_kvblock *dk) {
    int64_t hd = (int64_t)dims->heads * dims->head_dim,
            gd = (int64_t)dims->kv_heads * dims->head_dim;
    size_t fq = sizeof(float) * span(qb->n, qb->stride_q, hd);
    size_t fk = sizeof(float) * span(kb->n, kb->stride_kv, gd);
    size_t fl = sizeof(float) * span(qb->n, qb->stride_lse, dims->heads);
    void *p[SLOTS] = {0};
    *dq = (spar_cuda_qblock){.n = qb->n, .stride_q = qb->stride_q, .stride_lse = qb->stride_lse};
    *dk = (spar_cuda_kvblock){.n = kb->n, .stride_kv = kb->stride_kv};
    SPAR_TRY(put(S_Q, qb->q, fq, &p[S_Q]));
    SPAR_TRY(put(S_K, kb->k, fk, &p[S_K]));
    SPAR_TRY(put(S_V, kb->v, fk, &p[S_V]));
    SPAR_TRY(put(S_LSE, qb->lse, fl, &p[S_LSE]));
    if (causal) {
        SPAR_TRY(put(S_QPOS, qb->pos, sizeof(int64_t) * (size_t)qb->n, &p[S_QPOS]));
        SPAR_TRY(put(S_KPOS, kb->pos, sizeof(int64_t) * (size_t)kb->n, &p[S_KPOS]));
    }
    if (!backward) {
        SPAR_TRY(put(S_O, qb->o, fq, &p[S_O]));
    } else {
        SPAR_TRY(put(S_DOUT, qb->dout, fq, &p[S_DOUT]));
        SPAR_TRY(put(S_DELTA, qb->delta, fl, &p[S_DELTA]));
        SPAR_TRY(put(S_DQ, qb->dq, fq, &p[S_DQ]));
        SPAR_TRY(put(S_DK, kb->dk, fk, &p[S_DK]));
        SPAR_TRY(put(S_DV, kb->dv, fk, &p[S_DV]));
    }
    dq->pos = p[S_QPOS], dq->q = p[S_Q], dq->o = p[S_O], dq->lse = p[S_LSE];
    dq->dout = p[S_DOUT], dq->delta = p[S_DELTA], dq->dq = p[S_DQ];
    dk->pos = p[S_KPOS], dk->k = p[S_K], dk->v = p[S_V], dk->dk = p[S_DK], dk->dv = p[S_DV];
    return SPAR_OK;
}

static int staged_softmax_fwd(const spar_attn_dims *dims, bool causal, const spar_qblock *qb,
                              const spar_kvblock *kb) {
    spar_cuda_qblock q;
    spar_cuda_kvblock kv;
    if (qb->n == 0 || kb->n == 0) return SPAR_OK;
    SPAR_TRY(softmax_stage(dims, causal, qb, kb, false, &q, &kv));
    SPAR_TRY(spar_cuda_softmax_fwd(dims, causal, SPAR_CUDA_F32, &q, &kv, NULL));
    int64_t hd = (int64_t)dims->heads * dims->head_dim;
    SPAR_TRY(spar_cuda_copy(qb->o, q.o, sizeof(float) * span(qb->n, qb->stride_q, hd)));
    return spar_cuda_copy(qb->lse, q.lse, sizeof(float) * span(qb->n, qb->stride_lse, dims->heads));
}

static int staged_softmax_bwd(const spar_attn_dims *dims, bool causal, const spar_qblock *qb,
                              const spar_kvblock *kb) {
    spar_cuda_qblock q;
    spar_cuda_kvblock kv;
    if (qb->n == 0 || kb->n == 0) return SPAR_OK;
    SPAR_TRY(softmax_stage(dims, causal, qb, kb, true, &q, &kv));
    SPAR_TRY(spar_cuda_softmax_bwd(dims, causal, SPAR_CUDA_F32, &q, &kv, NULL));
    int64_t hd = (int64_t)dims->heads * dims->head_dim,
            gd = (int64_t)dims->kv_heads * dims->head_dim;
    size_t fk = sizeof(float) * span(kb->n, kb->stride_kv, gd);
    SPAR_TRY(spar_cuda_copy(qb->dq, q.dq, sizeof(float) * span(qb->n, qb->stride_q, hd)));
    SPAR_TRY(spar_cuda_copy(kb->dk, kv.dk, fk));
    return spar_cuda_copy(kb->dv, kv.dv, fk);
}

/* Bytes of a dense [n, heads, d] float tensor, and of the states [state_heads, d, d]. */
static size_t rows(const spar_linear_dims *dims, int64_t n, bool query) {
    return sizeof(float) * (size_t)n * (size_t)(query ? dims->heads : dims->kv_heads) *
           (size_t)dims->head_dim;
}
static size_t states(const spar_linear_dims *dims) {
    return sizeof(float) * (size_t)dims->state_heads * (size_t)dims->head_dim *
           (size_t)dims->head_dim;
}

static int staged_linear_fwd(const spar_linear_dims *dims, int64_t n, const float *q,
                             const float *k, const float *v, float *o) {
    void *dq, *dk, *dv, *dout;
    SPAR_TRY(put(S_Q, q, rows(dims, n, true), &dq));
    SPAR_TRY(put(S_K, k, rows(dims, n, false), &dk));
    SPAR_TRY(put(S_V, v, rows(dims, n, false), &dv));
    SPAR_TRY(put(S_O, NULL, rows(dims, n, true), &dout));
    SPAR_TRY(spar_cuda_linear_fwd_local(dims, SPAR_CUDA_F32, n, dq, dk, dv, dout, NULL));
    return spar_cuda_copy(o, dout, rows(dims, n, true));
}

static int staged_linear_bwd(const spar_linear_dims *dims, int64_t n, const float *q,
                             const float *k, const float *v, const float *dout, float *dq,
                             float *dk, float *dv) {
    void *p[SLOTS];
    size_t fq = rows(dims, n, true), fk = rows(dims, n, false);
    SPAR_TRY(put(S_Q, q, fq, &p[S_Q]));
    SPAR_TRY(put(S_K, k, fk, &p[S_K]));
    SPAR_TRY(put(S_V, v, fk, &p[S_V]));
    SPAR_TRY(put(S_DOUT, dout, fq, &p[S_DOUT]));
    SPAR_TRY(put(S_DQ, NULL, fq, &p[S_DQ]));
    SPAR_TRY(put(S_DK, NULL, fk, &p[S_DK]));
    SPAR_TRY(put(S_DV, NULL, fk, &p[S_DV]));
    SPAR_TRY(spar_cuda_linear_bwd_local(dims, SPAR_CUDA_F32, n, p[S_Q], p[S_K], p[S_V], p[S_DOUT],
                                        p[S_DQ], p[S_DK], p[S_DV], NULL));
    SPAR_TRY(spar_cuda_copy(dq, p[S_DQ], fq));
    SPAR_TRY(spar_cuda_copy(dk, p[S_DK], fk));
    return spar_cuda_copy(dv, p[S_DV], fk);
}

/* linear_state (x = k, y = v) and linear_dstate (x = q, y = dout): one d x d output. */
static int staged_outer(const spar_linear_dims *dims, bool causal, int64_t n, const float *x,
                        const float *y, float *out, bool dstate) {
    void *dx, *dy, *dm;
    SPAR_TRY(put(S_Q, x, rows(dims, n, dstate), &dx));
    SPAR_TRY(put(S_V, y, rows(dims, n, dstate), &dy));
    SPAR_TRY(put(S_LSE, NULL, states(dims), &dm));
    if (dstate)
        SPAR_TRY(spar_cuda_linear_dstate(dims, causal, SPAR_CUDA_F32, n, dx, dy, dm, NULL));
    else
        SPAR_TRY(spar_cuda_linear_state(dims, causal, SPAR_CUDA_F32, n, dx, dy, dm, NULL));
    return spar_cuda_copy(out, dm, states(dims));
}

static int staged_linear_state(const spar_linear_dims *dims, bool causal, int64_t n, const float *k,
                               const float *v, float *m) {
    return staged_outer(dims, causal, n, k, v, m, false);
}

static int staged_linear_dstate(const spar_linear_dims *dims, bool causal, int64_t n,
                                const float *q, const float *dout, float *ds) {
    return staged_outer(dims, causal, n, q, dout, ds, true);
}

static int staged_linear_fwd_state(const spar_linear_dims *dims, bool causal, int64_t n,
                                   const float *q, const float *s, float *o) {
    void *dq, *ds, *dout;
    SPAR_TRY(put(S_Q, q, rows(dims, n, true), &dq));
    SPAR_TRY(put(S_LSE, s, states(dims), &ds));
    SPAR_TRY(put(S_O, o, rows(dims, n, true), &dout));
    SPAR_TRY(spar_cuda_linear_fwd_state(dims, causal, SPAR_CUDA_F32, n, dq, ds, dout, NULL));
    return spar_cuda_copy(o, dout, rows(dims, n, true));
}

static int staged_linear_bwd_state(const spar_linear_dims *dims, bool causal, int64_t n,
                                   const float *k, const float *v, const float *dout,
                                   const float *s, const float *dkv, float *dq, float *dk,
                                   float *dv) {
    void *p[SLOTS] = {0};
    size_t fq = rows(dims, n, true), fk = rows(dims, n, false);
    SPAR_TRY(put(S_K, k, fk, &p[S_K]));
    SPAR_TRY(put(S_V, v, fk, &p[S_V]));
    SPAR_TRY(put(S_DOUT, dout, fq, &p[S_DOUT]));
    if (s) SPAR_TRY(put(S_LSE, s, states(dims), &p[S_LSE]));
    if (dkv) SPAR_TRY(put(S_DELTA, dkv, states(dims), &p[S_DELTA]));
    SPAR_TRY(put(S_DQ, dq, fq, &p[S_DQ]));
    SPAR_TRY(put(S_DK, dk, fk, &p[S_DK]));
    SPAR_TRY(put(S_DV, dv, fk, &p[S_DV]));
    SPAR_TRY(spar_cuda_linear_bwd_state(dims, causal, SPAR_CUDA_F32, n, p[S_K], p[S_V], p[S_DOUT],
                                        p[S_LSE], p[S_DELTA], p[S_DQ], p[S_DK], p[S_DV], NULL));
    SPAR_TRY(spar_cuda_copy(dq, p[S_DQ], fq));
    SPAR_TRY(spar_cuda_copy(dk, p[S_DK], fk));
    return spar_cuda_copy(dv, p[S_DV], fk);
}

const spar_kernels spar__kernels_cuda = {
    .name = "cuda",
    .device = &spar__cuda_device,
    .softmax_fwd_block = staged_softmax_fwd,
    .softmax_bwd_block = staged_softmax_bwd,
    .linear_fwd_local = staged_linear_fwd,
    .linear_bwd_local = staged_linear_bwd,
    .linear_state = staged_linear_state,
    .linear_fwd_state = staged_linear_fwd_state,
    .linear_dstate = staged_linear_dstate,
    .linear_bwd_state = staged_linear_bwd_state,
};
