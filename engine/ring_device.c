/* ring_device.c: Ring Self-Attention with the tensors in the kernel backend's device
 * memory (spar_kernels.device; run.device=cuda).
 *
 * The queries, outputs and lse (backward: also dout, dq, delta) stay on the device for
 * the whole pass. K/V blocks travel between ranks as in ring_attn.c, through pinned host
 * buffers: a block that has arrived is uploaded on the copy stream as soon as it is seen
 * complete between two kernel calls, so that the upload overlaps the compute on the held
 * block; the next step waits for it. Backward, the [dK | dV] partial of the held block is
 * computed on the device, downloaded, and summed on the host into the accumulator that
 * travels (ring_attn.c). The results go back to host memory at the end of the pass.
 * With prob->bf16 the queries, dout and the travelling K/V blocks are bfloat16 (half the
 * bytes on the ring, tensor cores on the device); gradients and outputs stay fp32.
 */
#include <stdlib.h>
#include <string.h>

#include "ring_internal.h"

typedef struct dev_ring {
    ring rg;
    const spar_kernels_device *dev;
    spar_kernels kern;       /* the backend's table with its device softmax members */
    spar_attn_problem prob;  /* the problem with kern */
    spar_attn_io io;         /* device tensors: q, o, lse, dout, dq */
    float *delta, *part;     /* device: backward's delta, the held block's [dK | dV] */
    float *kv[2];            /* device [K | V] of the held block and the next */
    int64_t *qpos, *kpos[2]; /* device positions of the queries and of kv[] */
    grad_bufs host;          /* pinned: kv[] travels; backward: part[], acc_in */
    int next;                /* the kv[] the arriving block goes to */
    size_t next_bytes;
} dev_ring;

static int dev_alloc(dev_ring *r, void *p, size_t bytes) {
    return r->dev->alloc((void **)p, bytes > 16 ? bytes : 16);
}

static int host_alloc(dev_ring *r, void *p, size_t bytes) {
    return r->dev->alloc_host((void **)p, bytes > 16 ? bytes : 16);
}

/* A K/V block of `src` as it travels and sits on the device (fp32 or bf16). */
static size_t kv_bytes(const dev_ring *r, int src) {
    return spar__ring_block_bytes(&r->rg, src) / sizeof(float) * spar__ring_kv_elem(&r->rg);
}

/* Element e of a [K | V] buffer in its storage. */
static float *kv_at(const dev_ring *r, float *buf, size_t e) {
    return (float *)((char *)buf + e * spar__ring_kv_elem(&r->rg));
}

/* A query-side input (q or dout, [len, H, d]) into device memory, as bf16 if so asked. */
static int upload_input(dev_ring *r, const float *host, float *dev, int64_t n) {
    if (!r->prob.bf16) return r->dev->copy(dev, host, sizeof(float) * (size_t)n);
    uint16_t *tmp = malloc(sizeof(uint16_t) * (size_t)(n > 0 ? n : 1));
    if (!tmp) return SPAR_ENOMEM;
    spar_to_bf16(n, host, tmp);
    int rc = r->dev->copy(dev, tmp, sizeof(uint16_t) * (size_t)n);
    free(tmp);
    return rc;
}

/* The local [K | V] block into pinned memory, the way it travels. */
static void pack_local(dev_ring *r, const spar_attn_io *io) {
    if (!r->prob.bf16) {
        spar__ring_pack_local(&r->rg, io, r->host.kv[0]);
        return;
    }
    int64_t n = r->rg.qc.len * (int64_t)r->rg.row;
    spar_to_bf16(n, io->k, (uint16_t *)r->host.kv[0]);
    spar_to_bf16(n, io->v, (uint16_t *)r->host.kv[0] + n);
}

static void dev_free(dev_ring *r) {
    const spar_kernels_device *d = r->dev;
    d->free((void *)r->io.q), d->free(r->io.o), d->free(r->io.lse);
    d->free((void *)r->io.dout), d->free(r->io.dq), d->free(r->delta), d->free(r->part);
    d->free(r->kv[0]), d->free(r->kv[1]);
    d->free(r->qpos), d->free(r->kpos[0]), d->free(r->kpos[1]);
    d->free_host(r->host.kv[0]), d->free_host(r->host.kv[1]);
    d->free_host(r->host.part[0]), d->free_host(r->host.part[1]), d->free_host(r->host.acc_in);
    spar__ring_free(&r->rg);
}

/* Buffers on both sides, and what the pass reads uploaded: the queries and their
 * positions, the local block; backward also o, lse and dout. */
static int setup(dev_ring *r, spar_comm *comm, const spar_attn_problem *prob,
                 const spar_attn_io *io, bool backward) {
    *r = (dev_ring){.dev = prob->kernels->device, .kern = *prob->kernels, .prob = *prob};
    r->kern.softmax_fwd_block = r->dev->softmax_fwd_block;
    r->kern.softmax_bwd_block = r->dev->softmax_bwd_block;
    r->prob.kernels = &r->kern;
    SPAR_TRY(spar__ring_init(&r->rg, comm, prob));
    spar_log_debug("ring %s: tensors in %s device memory", backward ? "backward" : "forward",
                   prob->kernels->name);
    int64_t len = r->rg.qc.len, rows = len * prob->dims.heads;
    size_t qb = sizeof(float) * (size_t)(rows * prob->dims.head_dim), lb = sizeof(float) * rows;
    size_t blk = kv_bytes(r, r->rg.rank);
    size_t max_blk = 2 * (size_t)r->rg.max_len * r->rg.row * sizeof(float);
    size_t pos = sizeof(int64_t) * (size_t)r->rg.max_len;
    SPAR_TRY(dev_alloc(r, &r->io.q, qb));
    SPAR_TRY(dev_alloc(r, &r->io.o, qb));
    SPAR_TRY(dev_alloc(r, &r->io.lse, lb));
    SPAR_TRY(dev_alloc(r, &r->qpos, pos));
    for (int i = 0; i < 2; i++) {
        SPAR_TRY(dev_alloc(r, &r->kv[i], max_blk));
        SPAR_TRY(dev_alloc(r, &r->kpos[i], pos));
        SPAR_TRY(host_alloc(r, &r->host.kv[i], max_blk));
    }
    SPAR_TRY(upload_input(r, io->q, (float *)r->io.q, rows * prob->dims.head_dim));
    SPAR_TRY(r->dev->copy(r->qpos, r->rg.qc.pos, sizeof(int64_t) * (size_t)len));
    pack_local(r, io);
    SPAR_TRY(r->dev->copy(r->kv[0], r->host.kv[0], blk));
    if (!backward)
        return r->dev->init_partial(len, prob->dims.heads, prob->dims.head_dim, r->io.o, r->io.lse);
    SPAR_TRY(dev_alloc(r, &r->io.dout, qb));
    SPAR_TRY(dev_alloc(r, &r->io.dq, qb));
    SPAR_TRY(dev_alloc(r, &r->delta, lb));
    SPAR_TRY(dev_alloc(r, &r->part, max_blk));
    for (int i = 0; i < 2; i++)
        SPAR_TRY(host_alloc(r, &r->host.part[i], max_blk));
    SPAR_TRY(host_alloc(r, &r->host.acc_in, max_blk));
    SPAR_TRY(r->dev->copy(r->io.o, io->o, qb));
    SPAR_TRY(r->dev->copy(r->io.lse, io->lse, lb));
    SPAR_TRY(upload_input(r, io->dout, (float *)r->io.dout, rows * prob->dims.head_dim));
    SPAR_TRY(r->dev->zero(r->io.dq, qb));
    return r->dev->bwd_delta(len, prob->dims.heads, prob->dims.head_dim, r->io.o, r->io.dout,
                             prob->bf16, r->delta);
}

/* The pass's hook: the next block is in pinned memory, send it up beside the compute. */
static int upload_next(void *ctx) {
    dev_ring *r = ctx;
    return r->dev->upload_async(r->kv[r->next], r->host.kv[r->next], r->next_bytes);
}

/* Step `step` holds kv[cur]: its positions go up, the exchange that brings the block of
 * the next step (if any) starts (op), and that block will be uploaded into kv[cur ^ 1] once
 * it has arrived. */
static int begin_step(dev_ring *r, spar__pass *pass, int step, int cur, spar_kvblock *kv,
                      spar_comm_op **op) {
    ring *rg = &r->rg;
    SPAR_TRY(spar__chunk_init(&rg->held, r->prob.part, spar__ring_source(rg, step), rg->max_len));
    SPAR_TRY(r->dev->copy(r->kpos[cur], rg->held.pos, sizeof(int64_t) * (size_t)rg->held.len));
    SPAR_TRY(spar__ring_start_next_kv(rg, step, r->host.kv[cur], r->host.kv[cur ^ 1], op));
    bool more = step + 1 < rg->size;
    r->next = cur ^ 1;
    r->next_bytes = more ? kv_bytes(r, spar__ring_source(rg, step + 1)) : 0;
    pass->arrived = more ? upload_next : NULL;
    pass->arrived_ctx = r, pass->arrived_seen = false;
    size_t n = (size_t)rg->held.len * rg->row;
    *kv = (spar_kvblock){.n = rg->held.len,
                         .pos = r->kpos[cur],
                         .stride_kv = (int64_t)rg->row,
                         .k = r->kv[cur],
                         .v = kv_at(r, r->kv[cur], n),
                         .bf16 = r->prob.bf16};
    return SPAR_OK;
}

/* After the step's compute: the next block has arrived (waited for) and is uploaded. */
static int end_step(dev_ring *r, spar__pass *pass, spar_comm_op **op, const char *what,
                    spar_metrics *m) {
    SPAR_TRY(spar__wait_timed(r->rg.comm, op, what, m));
    if (!pass->arrived) return SPAR_OK;
    if (!pass->arrived_seen) SPAR_TRY(upload_next(r)); /* arrived only while we waited */
    double t0 = spar__now();
    int rc = r->dev->upload_wait();
    m->wait_seconds += spar__now() - t0;
    return rc;
}

static void start_pass(dev_ring *r, spar__pass *pass, spar_comm *comm, bool backward) {
    spar__pass_init(pass, &r->prob, &r->io, &r->rg.qc, backward, r->delta);
    pass->q.pos = r->qpos;
    pass->q.bf16 = r->prob.bf16;
    pass->comm = comm;
}

static void show_progress(const dev_ring *r, const char *what, int step) {
    const spar_attn_problem *prob = &r->prob;
    if (prob->progress && r->rg.rank == 0)
        prob->progress(prob->progress_ctx, what, step + 1, r->rg.size);
}

int spar__ring_forward_device(spar_comm *comm, const spar_attn_problem *prob,
                              const spar_attn_io *io, spar_metrics *metrics) {
    double t_start = spar__now();
    uint64_t bytes0 = spar_comm_bytes_sent(comm);
    spar_metrics m = {0};
    spar__pass pass;
    spar_comm_op *op = NULL;
    dev_ring r;
    int rc = setup(&r, comm, prob, io, false);
    if (rc == 0) start_pass(&r, &pass, comm, false);
    pass.pending[0] = &op;
    for (int step = 0, cur = 0; rc == 0 && step < r.rg.size; step++, cur ^= 1) {
        spar_kvblock kv;
        if ((rc = begin_step(&r, &pass, step, cur, &kv, &op)) != 0) break;
        rc = spar__pass_chunk(&pass, &r.rg.held, &kv);
        int wrc = end_step(&r, &pass, &op, "the K/V block of the next ring step (forward)", &m);
        rc = rc ? rc : wrc;
        if (rc == 0) show_progress(&r, "ring forward step", step);
    }
    int64_t rows = r.rg.qc.len * prob->dims.heads;
    if (rc == 0)
        rc = r.dev->copy(io->o, r.io.o, sizeof(float) * (size_t)(rows * prob->dims.head_dim));
    if (rc == 0) rc = r.dev->copy(io->lse, r.io.lse, sizeof(float) * (size_t)rows);
    if (rc == 0) spar__metrics_finish(&m, &pass, comm, r.rg.rank, t_start, bytes0, r.rg.size);
    if (!op) dev_free(&r); /* else in flight: left alone, as in ring_attn.c */
    if (metrics) *metrics = m;
    return rc;
}

static int backward_steps(dev_ring *r, spar__pass *pass, spar_comm_op **kv_op,
                          spar_comm_op **grad_op, spar_metrics *m) {
    ring *rg = &r->rg;
    for (int step = 0, cur = 0; step < rg->size; step++, cur ^= 1) {
        spar_kvblock kv;
        SPAR_TRY(begin_step(r, pass, step, cur, &kv, kv_op));
        size_t bytes = 2 * (size_t)kv.n * rg->row * sizeof(float);
        SPAR_TRY(r->dev->zero(r->part, bytes));
        kv.dk = r->part, kv.dv = r->part + kv.n * kv.stride_kv;
        SPAR_TRY(spar__pass_chunk(pass, &rg->held, &kv));
        SPAR_TRY(r->dev->copy(r->host.part[cur], r->part, bytes));
        SPAR_TRY(spar__ring_forward_gradients(rg, step, r->host.part[cur], &r->host, grad_op, m));
        SPAR_TRY(end_step(r, pass, kv_op, "the K/V block of the next ring step (backward)", m));
        show_progress(r, "ring backward step", step);
    }
    /* The accumulator of our own block, complete, arrives from rank-1 last. */
    return spar__wait_timed(rg->comm, grad_op, "this rank's own dK/dV (ring backward)", m);
}

int spar__ring_backward_device(spar_comm *comm, const spar_attn_problem *prob,
                               const spar_attn_io *io, spar_metrics *metrics) {
    double t_start = spar__now();
    uint64_t bytes0 = spar_comm_bytes_sent(comm);
    spar_metrics m = {0};
    spar__pass pass;
    spar_comm_op *kv_op = NULL, *grad_op = NULL;
    dev_ring r;
    int rc = setup(&r, comm, prob, io, true);
    if (rc == 0) {
        start_pass(&r, &pass, comm, true);
        pass.pending[0] = &kv_op;
        pass.pending[1] = &grad_op;
        rc = backward_steps(&r, &pass, &kv_op, &grad_op, &m);
    }
    if (rc == 0) {
        size_t n = (size_t)r.rg.qc.len * r.rg.row;
        const float *mine = r.rg.size == 1 ? r.host.part[0] : r.host.acc_in;
        memcpy(io->dk, mine, n * sizeof(float));
        memcpy(io->dv, mine + n, n * sizeof(float));
        size_t qb = sizeof(float) * (size_t)(r.rg.qc.len * prob->dims.heads * prob->dims.head_dim);
        rc = r.dev->copy(io->dq, r.io.dq, qb);
    }
    if (rc == 0) spar__metrics_finish(&m, &pass, comm, r.rg.rank, t_start, bytes0, r.rg.size);
    if (!kv_op && !grad_op) dev_free(&r); /* else in flight: left alone */
    if (metrics) *metrics = m;
    return rc;
}
