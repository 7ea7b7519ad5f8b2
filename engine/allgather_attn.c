/* allgather_attn.c: all-gather attention (LASP-2H, Llama-3 style; DESIGN.md 3.3).
 *
 * K and V are gathered once, cut into kv-head groups: while group g computes, group g+1
 * travels. A group's gathered buffer holds, per rank s in rank order, [K_s | V_s] with
 * K_s: [C_s, gh, d]. Backward gathers again, accumulates dQ locally and the fp32
 * [dK_s | dV_s] partials of every rank's tokens in the same layout, and returns them with
 * one reduce-scatter per group, which completes while the next group computes.
 * Memory is O(N gh d) per buffer: the method trades memory for a single collective.
 */
#include <stdlib.h>
#include <string.h>

#include "engine_internal.h"

#define AUTO_HEAD_GROUPS 4

typedef struct gather {
    spar_comm *comm;
    const spar_attn_problem *prob;
    const spar_attn_io *io;
    int rank, size, ngroups, max_gh;
    int64_t *counts; /* [size] floats of rank s's [K|V] (or [dK|dV]) for the current group */
    int64_t *displs; /* [size] where rank s's block starts in a gathered buffer */
    float *send[2];  /* the local [K|V] of a group, packed */
    float *all[2];   /* gathered [K|V] of a group, every rank */
    float *grad[2];  /* backward: [dK|dV] partials of every rank's tokens */
    float *mine[2];  /* backward: this rank's summed [dK|dV] of a group */
    float *delta;    /* backward: [C, H] */
    spar__chunk qc, held;
} gather;

/* Group gi covers kv heads [first, first + count). */
static void group_heads(const gather *ga, int gi, int *first, int *count) {
    int g = ga->prob->dims.kv_heads, base = g / ga->ngroups, extra = g % ga->ngroups;
    *count = base + (gi < extra ? 1 : 0);
    *first = gi * base + (gi < extra ? gi : extra);
}

static void set_counts(gather *ga, int gi) {
    int first, gh;
    group_heads(ga, gi, &first, &gh);
    int64_t total = 0;
    for (int s = 0; s < ga->size; s++) {
        ga->counts[s] =
            2 * spar_partition_local_len(ga->prob->part, s) * gh * ga->prob->dims.head_dim;
        ga->displs[s] = total;
        total += ga->counts[s];
    }
}

static int gather_init(gather *ga, spar_comm *comm, const spar_attn_problem *prob,
                       const spar_attn_io *io, bool backward) {
    *ga = (gather){.comm = comm,
                   .prob = prob,
                   .io = io,
                   .rank = spar_comm_rank(comm),
                   .size = spar_comm_size(comm)};
    if (prob->part->ranks != ga->size)
        return spar_errorf(SPAR_EINVAL, "partition is for %d ranks but the job has %d",
                           prob->part->ranks, ga->size);
    int g = prob->dims.kv_heads;
    ga->ngroups = prob->head_groups > 0 ? prob->head_groups : AUTO_HEAD_GROUPS;
    ga->ngroups = ga->ngroups < g ? ga->ngroups : g;
    ga->max_gh = (g + ga->ngroups - 1) / ga->ngroups;
    int64_t n = prob->part->n, c = spar_partition_local_len(prob->part, ga->rank);
    size_t d = (size_t)prob->dims.head_dim, all = 2 * (size_t)n * (size_t)ga->max_gh * d;
    size_t local = 2 * (size_t)c * (size_t)ga->max_gh * d;
    ga->counts = malloc(sizeof(int64_t) * (size_t)ga->size);
    ga->displs = malloc(sizeof(int64_t) * (size_t)ga->size);
    bool ok = ga->counts && ga->displs;
    for (int i = 0; i < 2; i++) {
        ok = ok && (ga->send[i] = malloc(local * sizeof(float))) &&
             (ga->all[i] = malloc(all * sizeof(float)));
        if (backward)
            ok = ok && (ga->grad[i] = malloc(all * sizeof(float))) &&
                 (ga->mine[i] = malloc(local * sizeof(float)));
    }
    if (backward)
        ok = ok && (ga->delta = malloc(sizeof(float) * (size_t)(c * prob->dims.heads) + 1));
    if (!ok) return SPAR_ENOMEM;
    return spar__chunk_init(&ga->qc, prob->part, ga->rank,
                            spar_partition_max_local_len(prob->part));
}

static void gather_free(gather *ga) {
    for (int i = 0; i < 2; i++)
        free(ga->send[i]), free(ga->all[i]), free(ga->grad[i]), free(ga->mine[i]);
    free(ga->counts), free(ga->displs), free(ga->delta);
    spar__chunk_free(&ga->qc);
    spar__chunk_free(&ga->held);
}

/* Copies kv heads [first, first+gh) of every local token between the dense [C, G, d]
 * tensors and the packed [X | Y] group layout ([C, gh, d] each). */
static void pack_group(const gather *ga, int first, int gh, const float *x, const float *y,
                       float *packed) {
    int64_t c = ga->qc.len, g = ga->prob->dims.kv_heads, d = ga->prob->dims.head_dim;
    for (int64_t i = 0; i < c; i++) {
        memcpy(packed + i * gh * d, x + (i * g + first) * d, sizeof(float) * (size_t)(gh * d));
        memcpy(packed + (c + i) * gh * d, y + (i * g + first) * d,
               sizeof(float) * (size_t)(gh * d));
    }
}

static void unpack_group(const gather *ga, int first, int gh, const float *packed, float *x,
                         float *y) {
    int64_t c = ga->qc.len, g = ga->prob->dims.kv_heads, d = ga->prob->dims.head_dim;
    for (int64_t i = 0; i < c; i++) {
        memcpy(x + (i * g + first) * d, packed + i * gh * d, sizeof(float) * (size_t)(gh * d));
        memcpy(y + (i * g + first) * d, packed + (c + i) * gh * d,
               sizeof(float) * (size_t)(gh * d));
    }
}

/* What the waits await, for the error of one that gives up. */
#define GATHER_WHAT "the all-gather of a head group's K/V (MPI_Iallgatherv)"
#define REDUCE_WHAT "the reduce-scatter of a head group's dK/dV (MPI_Ireduce_scatter)"

static int start_gather(gather *ga, int gi, spar_comm_op **op) {
    int first, gh;
    group_heads(ga, gi, &first, &gh);
    set_counts(ga, gi);
    pack_group(ga, first, gh, ga->io->k, ga->io->v, ga->send[gi & 1]);
    return spar_comm_allgather_start(ga->comm, ga->send[gi & 1], ga->all[gi & 1], ga->counts, op);
}

/* The local queries of group gi's heads against every rank's gathered keys; backward
 * also accumulates [dK|dV] partials into ga->grad. */
static int compute_group(gather *ga, spar__pass *pass, int gi) {
    const spar_attn_problem *prob = ga->prob;
    int first, gh, per = prob->dims.heads / prob->dims.kv_heads, d = prob->dims.head_dim;
    group_heads(ga, gi, &first, &gh);
    set_counts(ga, gi);
    pass->dims.heads = gh * per;
    pass->dims.kv_heads = gh;
    int64_t q_off = (int64_t)first * per * d, lse_off = (int64_t)first * per;
    const spar_attn_io *io = ga->io;
    pass->q.q = io->q + q_off;
    pass->q.o = io->o ? io->o + q_off : NULL;
    pass->q.dout = io->dout ? io->dout + q_off : NULL;
    pass->q.dq = io->dq ? io->dq + q_off : NULL;
    pass->q.lse = io->lse + lse_off;
    pass->q.delta = ga->delta ? ga->delta + lse_off : NULL;
    float *all = ga->all[gi & 1], *grad = pass->backward ? ga->grad[gi & 1] : NULL;
    if (grad) memset(grad, 0, sizeof(float) * (size_t)(2 * prob->part->n * gh * d));
    for (int s = 0; s < ga->size; s++) {
        SPAR_TRY(
            spar__chunk_init(&ga->held, prob->part, s, spar_partition_max_local_len(prob->part)));
        int64_t n = ga->held.len * gh * d, at = ga->displs[s];
        spar_kvblock kv = {ga->held.len,
                           NULL,
                           (int64_t)gh * d,
                           all + at,
                           all + at + n,
                           grad ? grad + at : NULL,
                           grad ? grad + at + n : NULL,
                           false};
        SPAR_TRY(spar__pass_chunk(pass, &ga->held, &kv));
    }
    return SPAR_OK;
}

/* Backward, after group gi computed: finish group gi-1's sums, then send group gi's. */
static int reduce_group(gather *ga, int gi, spar_comm_op **reduce_op, int *prev_first, int *prev_gh,
                        spar_metrics *m) {
    SPAR_TRY(spar__wait_timed(ga->comm, reduce_op, REDUCE_WHAT, m));
    if (gi > 0)
        unpack_group(ga, *prev_first, *prev_gh, ga->mine[(gi - 1) & 1], ga->io->dk, ga->io->dv);
    set_counts(ga, gi);
    SPAR_TRY(spar_comm_reduce_scatter_start(ga->comm, ga->grad[gi & 1], ga->mine[gi & 1],
                                            ga->counts, reduce_op));
    group_heads(ga, gi, prev_first, prev_gh);
    return SPAR_OK;
}

/* Forward and backward share the pipeline: gather group gi+1 while computing group gi;
 * backward also reduce-scatters group gi's partials while group gi+1 computes. */
static int run_groups(gather *ga, spar__pass *pass, spar_metrics *m) {
    spar_comm_op *gather_op = NULL, *reduce_op = NULL;
    pass->comm = ga->comm;
    pass->pending[0] = &gather_op;
    pass->pending[1] = &reduce_op;
    SPAR_TRY(start_gather(ga, 0, &gather_op));
    int prev_first = 0, prev_gh = 0;
    for (int gi = 0; gi < ga->ngroups; gi++) {
        SPAR_TRY(spar__wait_timed(ga->comm, &gather_op, GATHER_WHAT, m));
        if (gi + 1 < ga->ngroups) SPAR_TRY(start_gather(ga, gi + 1, &gather_op));
        SPAR_TRY(compute_group(ga, pass, gi));
        if (pass->backward) SPAR_TRY(reduce_group(ga, gi, &reduce_op, &prev_first, &prev_gh, m));
        if (ga->prob->progress && ga->rank == 0)
            ga->prob->progress(ga->prob->progress_ctx,
                               pass->backward ? "allgather backward head group"
                                              : "allgather forward head group",
                               gi + 1, ga->ngroups);
    }
    if (pass->backward) {
        SPAR_TRY(spar__wait_timed(ga->comm, &reduce_op, REDUCE_WHAT, m));
        unpack_group(ga, prev_first, prev_gh, ga->mine[(ga->ngroups - 1) & 1], ga->io->dk,
                     ga->io->dv);
    }
    return SPAR_OK;
}

static int allgather_pass(spar_comm *comm, const spar_attn_problem *prob, const spar_attn_io *io,
                          spar_metrics *metrics, bool backward) {
    double t_start = spar__now();
    uint64_t bytes0 = spar_comm_bytes_sent(comm);
    spar_metrics m = {0};
    gather ga;
    spar__pass pass;
    int h = prob->dims.heads, d = prob->dims.head_dim;
    int rc = gather_init(&ga, comm, prob, io, backward);
    if (rc == 0) {
        if (backward) {
            spar_softmax_bwd_delta(ga.qc.len, h, d, io->o, io->dout, ga.delta);
            memset(io->dq, 0, sizeof(float) * (size_t)(ga.qc.len * h * d));
        } else {
            spar_softmax_init_partial(ga.qc.len, h, d, io->o, io->lse);
        }
        spar__pass_init(&pass, prob, io, &ga.qc, backward, ga.delta);
        rc = run_groups(&ga, &pass, &m);
    }
    if (rc == 0) {
        spar__metrics_finish(&m, &pass, comm, ga.rank, t_start, bytes0, ga.ngroups);
        gather_free(&ga); /* on failure a transfer may be in flight: buffers left alone */
    }
    if (metrics) *metrics = m;
    return rc;
}

int spar__allgather_forward(spar_comm *comm, const spar_attn_problem *prob, const spar_attn_io *io,
                            spar_metrics *m) {
    return allgather_pass(comm, prob, io, m, false);
}

int spar__allgather_backward(spar_comm *comm, const spar_attn_problem *prob, const spar_attn_io *io,
                             spar_metrics *m) {
    return allgather_pass(comm, prob, io, m, true);
}
