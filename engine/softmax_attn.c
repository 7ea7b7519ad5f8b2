/* softmax_attn.c: softmax attention forward, ring (distributed) and local (reference).
 *
 * Both paths share one block scheduler: a query chunk and a key chunk are each cut into
 * "groups" (runs of tokens whose positions form an interval: 1 for contiguous, 2 for
 * zigzag, the whole chunk for stripe). For causal attention each (query group, key
 * group) pair is skipped when every key lies after every query, run unmasked when every
 * key lies before, and masked otherwise. With zigzag this is exactly DESIGN.md 3.2's
 * schedule: from a lower source rank both query halves meet the first key half, from a
 * higher one the second query half meets all keys.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "spar.h"

#define DEFAULT_QUERY_BLOCK 256

typedef struct group {
    int64_t local_start, len, pos_min, pos_max;
} group;

/* A chunk of tokens held by one rank: its positions and position-interval groups. */
typedef struct chunk {
    int64_t len;
    int64_t *pos;
    group groups[2];
    int ngroups;
} chunk;

static int chunk_init(chunk *c, const spar_partition *part, int rank, int64_t max_len) {
    c->len = spar_partition_local_len(part, rank);
    if (!c->pos && !(c->pos = malloc(sizeof(int64_t) * (size_t)(max_len > 0 ? max_len : 1))))
        return SPAR_ENOMEM;
    spar_partition_local_positions(part, rank, c->pos);
    spar_segment seg[2];
    int64_t nseg = spar_partition_segments(part, rank, NULL);
    if (nseg <= 2) {
        spar_partition_segments(part, rank, seg);
        c->ngroups = (int)nseg;
        for (int i = 0; i < c->ngroups; i++)
            c->groups[i] = (group){seg[i].local_start, seg[i].len, seg[i].start,
                                   seg[i].start + seg[i].len - 1};
    } else { /* stripe: one masked group over the whole chunk */
        c->ngroups = 1;
        c->groups[0] = (group){0, c->len, c->pos[0], c->pos[c->len - 1]};
    }
    return SPAR_OK;
}

/* Optional hook run between kernel calls (the ring uses it to make progress). */
typedef int (*between_fn)(void *ctx);

typedef struct block_job {
    const spar_softmax_problem *prob;
    const float *q;
    float *o, *lse;
    const chunk *qc;
    between_fn between;
    void *between_ctx;
    double compute_seconds;
} block_job;

/* Queries of group qg against keys of group kg held in (k, v) of chunk kc. */
static int run_group_pair(block_job *job, const group *qg, const chunk *kc, const group *kg,
                          const float *k, const float *v) {
    const spar_softmax_problem *prob = job->prob;
    bool masked = prob->causal;
    if (prob->causal) {
        if (kg->pos_min > qg->pos_max) return SPAR_OK;  /* every key is in every query's future */
        if (kg->pos_max <= qg->pos_min) masked = false; /* every key is visible */
    }
    int h = prob->dims.heads, g = prob->dims.kv_heads, d = prob->dims.head_dim;
    int64_t qb = prob->query_block > 0 ? prob->query_block : DEFAULT_QUERY_BLOCK;
    const float *kk = k + kg->local_start * g * d, *vv = v + kg->local_start * g * d;
    for (int64_t i = qg->local_start; i < qg->local_start + qg->len; i += qb) {
        int64_t nq = qg->local_start + qg->len - i < qb ? qg->local_start + qg->len - i : qb;
        double t0 = spar_comm_wtime();
        SPAR_TRY(prob->kernels->softmax_fwd_block(
            &prob->dims, nq, job->q + i * h * d, job->qc->pos + i, kg->len, kk, vv,
            kc->pos + kg->local_start, masked, job->o + i * h * d, job->lse + i * h));
        job->compute_seconds += spar_comm_wtime() - t0;
        if (job->between) SPAR_TRY(job->between(job->between_ctx));
    }
    return SPAR_OK;
}

static int run_chunk_pair(block_job *job, const chunk *kc, const float *k, const float *v) {
    for (int a = 0; a < job->qc->ngroups; a++)
        for (int b = 0; b < kc->ngroups; b++)
            SPAR_TRY(run_group_pair(job, &job->qc->groups[a], kc, &kc->groups[b], k, v));
    return SPAR_OK;
}

double spar_attn_forward_flops(const spar_partition *part, int rank, const spar_attn_dims *dims,
                               bool causal) {
    double pairs = causal ? (double)spar_partition_causal_pairs(part, rank)
                          : (double)spar_partition_local_len(part, rank) * (double)part->n;
    return pairs * dims->heads * 4.0 * dims->head_dim;
}

static int progress_between(void *ctx) {
    int done;
    return spar_comm_ring_test((spar_comm *)ctx, &done);
}

/* One ring step: post the next exchange, compute on the held block, wait. */
static int ring_step(spar_comm *comm, block_job *job, int step, chunk *held, float *bufs[2],
                     int cur, int64_t max_len, spar_metrics *m) {
    const spar_softmax_problem *prob = job->prob;
    int p = prob->part->ranks, r = spar_comm_rank(comm);
    size_t row = (size_t)prob->dims.kv_heads * (size_t)prob->dims.head_dim;
    int src = (r - step + p) % p;
    SPAR_TRY(chunk_init(held, prob->part, src, max_len));
    if (step + 1 < p) {
        int next_src = (r - step - 1 + 2 * p) % p;
        size_t send = 2 * (size_t)held->len * row * sizeof(float);
        size_t recv =
            2 * (size_t)spar_partition_local_len(prob->part, next_src) * row * sizeof(float);
        SPAR_TRY(spar_comm_ring_start(comm, bufs[cur], send, bufs[cur ^ 1], recv));
        m->ring_bytes += send;
    }
    const float *k = bufs[cur], *v = bufs[cur] + (size_t)held->len * row;
    SPAR_TRY(run_chunk_pair(job, held, k, v));
    double t0 = spar_comm_wtime();
    SPAR_TRY(spar_comm_ring_wait(comm));
    m->wait_seconds += spar_comm_wtime() - t0;
    return SPAR_OK;
}

int spar_ring_attn_forward(spar_comm *comm, const spar_softmax_problem *prob, const float *q,
                           const float *k, const float *v, float *o, float *lse,
                           spar_metrics *metrics) {
    double t_start = spar_comm_wtime();
    const spar_partition *part = prob->part;
    int r = spar_comm_rank(comm), p = part->ranks;
    if (p != spar_comm_size(comm))
        return spar_errorf(SPAR_EINVAL, "partition is for %d ranks but the job has %d", p,
                           spar_comm_size(comm));
    int64_t max_len = spar_partition_max_local_len(part);
    size_t row = (size_t)prob->dims.kv_heads * (size_t)prob->dims.head_dim;
    size_t block_floats = 2 * (size_t)max_len * row; /* K then V of the longest chunk */
    spar_metrics m = {0};
    chunk qc = {0}, held = {0};
    float *bufs[2] = {malloc(block_floats * sizeof(float)), malloc(block_floats * sizeof(float))};
    int rc = SPAR_ENOMEM;
    if (!bufs[0] || !bufs[1]) goto done;
    if ((rc = chunk_init(&qc, part, r, max_len)) != 0) goto done;
    /* Pack the local block as [K | V], the form in which it travels. */
    memcpy(bufs[0], k, (size_t)qc.len * row * sizeof(float));
    memcpy(bufs[0] + (size_t)qc.len * row, v, (size_t)qc.len * row * sizeof(float));
    spar_softmax_init_partial(qc.len, prob->dims.heads, prob->dims.head_dim, o, lse);
    block_job job = {prob, q, o, lse, &qc, progress_between, comm, 0.0};
    for (int step = 0, cur = 0; step < p; step++, cur ^= 1) {
        if ((rc = ring_step(comm, &job, step, &held, bufs, cur, max_len, &m)) != 0) goto done;
        if (prob->progress && r == 0) prob->progress(prob->progress_ctx, "ring step", step + 1, p);
    }
    m.compute_seconds = job.compute_seconds;
    m.flops = spar_attn_forward_flops(part, r, &prob->dims, prob->causal);
    m.steps = p;
    rc = SPAR_OK;
done:
    free(qc.pos);
    free(held.pos);
    free(bufs[0]);
    free(bufs[1]);
    m.seconds = spar_comm_wtime() - t_start;
    if (metrics) *metrics = m;
    return rc;
}

int spar_local_attn_forward(const spar_softmax_problem *prob, const float *q, const float *k,
                            const float *v, float *o, float *lse, spar_metrics *metrics) {
    double t_start = spar_comm_wtime();
    if (prob->part->ranks != 1)
        return spar_errorf(SPAR_EINVAL, "the local method needs a one-rank partition");
    chunk c = {0};
    SPAR_TRY(chunk_init(&c, prob->part, 0, prob->part->n));
    spar_softmax_init_partial(c.len, prob->dims.heads, prob->dims.head_dim, o, lse);
    block_job job = {prob, q, o, lse, &c, NULL, NULL, 0.0};
    /* Query blocks one at a time so that progress can be reported on long references. */
    int64_t qb = 8 * (prob->query_block > 0 ? prob->query_block : DEFAULT_QUERY_BLOCK);
    int rc = SPAR_OK;
    for (int64_t i = 0; i < c.len && rc == 0; i += qb) {
        group qg = {i, c.len - i < qb ? c.len - i : qb, i, 0};
        qg.pos_max = qg.pos_min + qg.len - 1;
        for (int b = 0; b < c.ngroups && rc == 0; b++)
            rc = run_group_pair(&job, &qg, &c, &c.groups[b], k, v);
        if (prob->progress)
            prob->progress(prob->progress_ctx, "local method, queries", i + qg.len, c.len);
    }
    free(c.pos);
    if (metrics) {
        *metrics = (spar_metrics){0};
        metrics->compute_seconds = job.compute_seconds;
        metrics->flops = spar_attn_forward_flops(prob->part, 0, &prob->dims, prob->causal);
        metrics->steps = 1;
        metrics->seconds = spar_comm_wtime() - t_start;
    }
    return rc;
}
