/* ring_attn.c: Ring Self-Attention forward and backward (DESIGN.md 3.2).
 *
 * Blocks travel as [K | V] (2 C G d floats). Forward posts the exchange of the next
 * block before computing on the held one. Backward does the same on channel 0 and, on
 * channel 1, moves the fp32 [dK | dV] accumulator of each block one step behind it: a
 * rank computes its queries' contribution to the held block into a fresh buffer, adds
 * the accumulator that arrived from rank-1 (every earlier rank's contribution), and
 * sends the sum on to rank+1; after the last step the sum reaches the block's owner.
 * The accumulator sent at step t is awaited at step t+1, after that step's compute.
 * With a kernel backend that has device memory the passes run in ring_device.c.
 */
#include <stdlib.h>
#include <string.h>

#include "ring_internal.h"

int spar__ring_init(ring *rg, spar_comm *comm, const spar_attn_problem *prob) {
    *rg = (ring){
        .comm = comm, .prob = prob, .rank = spar_comm_rank(comm), .size = spar_comm_size(comm)};
    if (prob->part->ranks != rg->size)
        return spar_errorf(SPAR_EINVAL, "partition is for %d ranks but the job has %d",
                           prob->part->ranks, rg->size);
    rg->max_len = spar_partition_max_local_len(prob->part);
    rg->row = (size_t)prob->dims.kv_heads * (size_t)prob->dims.head_dim;
    return spar__chunk_init(&rg->qc, prob->part, rg->rank, rg->max_len);
}

void spar__ring_free(ring *rg) {
    spar__chunk_free(&rg->qc);
    spar__chunk_free(&rg->held);
}

int spar__ring_source(const ring *rg, int step) {
    return ((rg->rank - step) % rg->size + rg->size) % rg->size;
}

size_t spar__ring_block_bytes(const ring *rg, int src) {
    return 2 * (size_t)spar_partition_local_len(rg->prob->part, src) * rg->row * sizeof(float);
}

int spar__ring_start_next_kv(ring *rg, int step, float *held, float *next, spar_comm_op **op) {
    if (step + 1 >= rg->size) return SPAR_OK;
    size_t elem = spar__ring_kv_elem(rg);
    size_t send = spar__ring_block_bytes(rg, spar__ring_source(rg, step)) / 4 * elem;
    size_t recv = spar__ring_block_bytes(rg, spar__ring_source(rg, step + 1)) / 4 * elem;
    return spar_comm_ring_start(rg->comm, CHANNEL_KV, held, send, next, recv, op);
}

static float *alloc_blocks(const ring *rg) {
    return malloc(2 * (size_t)rg->max_len * rg->row * sizeof(float));
}

void spar__ring_pack_local(const ring *rg, const spar_attn_io *io, float *dst) {
    size_t n = (size_t)rg->qc.len * rg->row;
    memcpy(dst, io->k, n * sizeof(float));
    memcpy(dst + n, io->v, n * sizeof(float));
}

int spar__ring_forward(spar_comm *comm, const spar_attn_problem *prob, const spar_attn_io *io,
                       spar_metrics *metrics) {
    if (prob->kernels->device) return spar__ring_forward_device(comm, prob, io, metrics);
    double t_start = spar__now();
    uint64_t bytes0 = spar_comm_bytes_sent(comm);
    spar_metrics m = {0};
    ring rg;
    spar__pass pass;
    spar_comm_op *op = NULL;
    float *bufs[2] = {NULL, NULL};
    int rc = spar__ring_init(&rg, comm, prob);
    if (rc == 0 && (!(bufs[0] = alloc_blocks(&rg)) || !(bufs[1] = alloc_blocks(&rg))))
        rc = SPAR_ENOMEM;
    if (rc != 0) goto done;
    spar__ring_pack_local(&rg, io, bufs[0]);
    spar_softmax_init_partial(rg.qc.len, prob->dims.heads, prob->dims.head_dim, io->o, io->lse);
    spar__pass_init(&pass, prob, io, &rg.qc, false, NULL);
    pass.comm = comm;
    pass.pending[0] = &op;
    for (int step = 0, cur = 0; step < rg.size && rc == 0; step++, cur ^= 1) {
        if ((rc = spar__chunk_init(&rg.held, prob->part, spar__ring_source(&rg, step),
                                   rg.max_len)) != 0 ||
            (rc = spar__ring_start_next_kv(&rg, step, bufs[cur], bufs[cur ^ 1], &op)) != 0)
            break;
        size_t n = (size_t)rg.held.len * rg.row;
        spar_kvblock kv = {rg.held.len, NULL, (int64_t)rg.row, bufs[cur], bufs[cur] + n, NULL,
                           NULL,        false};
        rc = spar__pass_chunk(&pass, &rg.held, &kv);
        int wrc = spar__wait_timed(comm, &op, "the K/V block of the next ring step (forward)", &m);
        rc = rc ? rc : wrc;
        if (rc == 0 && prob->progress && rg.rank == 0)
            prob->progress(prob->progress_ctx, "ring forward step", step + 1, rg.size);
    }
    if (rc == 0) spar__metrics_finish(&m, &pass, comm, rg.rank, t_start, bytes0, rg.size);
done:
    /* On failure an operation may still be in flight: it is left alone (its buffers too),
     * since waiting on a failed peer would hang and the caller ends the job. */
    spar__ring_free(&rg);
    if (op) bufs[0] = bufs[1] = NULL;
    free(bufs[0]);
    free(bufs[1]);
    if (metrics) *metrics = m;
    return rc;
}

static int grad_bufs_alloc(const ring *rg, grad_bufs *b) {
    *b = (grad_bufs){{alloc_blocks(rg), alloc_blocks(rg)},
                     {alloc_blocks(rg), alloc_blocks(rg)},
                     alloc_blocks(rg),
                     malloc(sizeof(float) * (size_t)(rg->qc.len * rg->prob->dims.heads) + 1)};
    return b->kv[0] && b->kv[1] && b->part[0] && b->part[1] && b->acc_in && b->delta ? SPAR_OK
                                                                                     : SPAR_ENOMEM;
}

static void grad_bufs_free(grad_bufs *b) {
    free(b->kv[0]), free(b->kv[1]), free(b->part[0]), free(b->part[1]);
    free(b->acc_in), free(b->delta);
}

int spar__ring_forward_gradients(ring *rg, int step, float *part, grad_bufs *b, spar_comm_op **op,
                                 spar_metrics *m) {
    size_t floats = spar__ring_block_bytes(rg, spar__ring_source(rg, step)) / sizeof(float);
    /* the accumulator for this block */
    SPAR_TRY(spar__wait_timed(rg->comm, op, "the dK/dV accumulator of a ring step (backward)", m));
    if (step > 0) spar_vec_add((int64_t)floats, part, b->acc_in);
    if (rg->size == 1) return SPAR_OK;
    return spar_comm_ring_start(rg->comm, CHANNEL_GRAD, part, floats * sizeof(float), b->acc_in,
                                spar__ring_block_bytes(rg, spar__ring_source(rg, step + 1)), op);
}

static int ring_backward_steps(ring *rg, const spar_attn_io *io, grad_bufs *b, spar__pass *pass,
                               spar_comm_op **kv_op, spar_comm_op **grad_op, spar_metrics *m) {
    const spar_attn_problem *prob = rg->prob;
    for (int step = 0, cur = 0; step < rg->size; step++, cur ^= 1) {
        SPAR_TRY(spar__chunk_init(&rg->held, prob->part, spar__ring_source(rg, step), rg->max_len));
        SPAR_TRY(spar__ring_start_next_kv(rg, step, b->kv[cur], b->kv[cur ^ 1], kv_op));
        size_t n = (size_t)rg->held.len * rg->row;
        memset(b->part[cur], 0, 2 * n * sizeof(float));
        spar_kvblock kv = {rg->held.len,   NULL,         (int64_t)rg->row, b->kv[cur],
                           b->kv[cur] + n, b->part[cur], b->part[cur] + n, false};
        SPAR_TRY(spar__pass_chunk(pass, &rg->held, &kv));
        SPAR_TRY(spar__ring_forward_gradients(rg, step, b->part[cur], b, grad_op, m));
        SPAR_TRY(
            spar__wait_timed(rg->comm, kv_op, "the K/V block of the next ring step (backward)", m));
        if (prob->progress && rg->rank == 0)
            prob->progress(prob->progress_ctx, "ring backward step", step + 1, rg->size);
    }
    /* The accumulator of our own block, complete, arrives from rank-1 last. */
    SPAR_TRY(spar__wait_timed(rg->comm, grad_op, "this rank's own dK/dV (ring backward)", m));
    const float *mine = rg->size == 1 ? b->part[0] : b->acc_in;
    size_t n = (size_t)rg->qc.len * rg->row;
    memcpy(io->dk, mine, n * sizeof(float));
    memcpy(io->dv, mine + n, n * sizeof(float));
    return SPAR_OK;
}

int spar__ring_backward(spar_comm *comm, const spar_attn_problem *prob, const spar_attn_io *io,
                        spar_metrics *metrics) {
    if (prob->kernels->device) return spar__ring_backward_device(comm, prob, io, metrics);
    double t_start = spar__now();
    uint64_t bytes0 = spar_comm_bytes_sent(comm);
    spar_metrics m = {0};
    ring rg;
    grad_bufs b = {0};
    spar__pass pass;
    spar_comm_op *kv_op = NULL, *grad_op = NULL;
    int rc = spar__ring_init(&rg, comm, prob);
    if (rc == 0) rc = grad_bufs_alloc(&rg, &b);
    if (rc == 0) {
        int h = prob->dims.heads, d = prob->dims.head_dim;
        spar__ring_pack_local(&rg, io, b.kv[0]);
        spar_softmax_bwd_delta(rg.qc.len, h, d, io->o, io->dout, b.delta);
        memset(io->dq, 0, sizeof(float) * (size_t)(rg.qc.len * h * d));
        spar__pass_init(&pass, prob, io, &rg.qc, true, b.delta);
        pass.comm = comm;
        pass.pending[0] = &kv_op;
        pass.pending[1] = &grad_op;
        rc = ring_backward_steps(&rg, io, &b, &pass, &kv_op, &grad_op, &m);
    }
    if (rc == 0) spar__metrics_finish(&m, &pass, comm, rg.rank, t_start, bytes0, rg.size);
    if (rc == 0 || (!kv_op && !grad_op)) /* else in flight: left alone, as in forward */
        grad_bufs_free(&b);
    spar__ring_free(&rg);
    if (metrics) *metrics = m;
    return rc;
}
