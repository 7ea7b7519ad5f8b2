/* blocks.c: the block scheduler shared by every method (see engine_internal.h). */
#include <stdlib.h>
#include <time.h>

#include "engine_internal.h"

double spar__now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int spar__chunk_init(spar__chunk *c, const spar_partition *part, int rank, int64_t max_len) {
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
            c->groups[i] = (spar__group){seg[i].local_start, seg[i].len, seg[i].start,
                                         seg[i].start + seg[i].len - 1};
    } else { /* stripe: one masked group over the whole chunk */
        c->ngroups = 1;
        c->groups[0] = (spar__group){0, c->len, c->pos[0], c->pos[c->len - 1]};
    }
    return SPAR_OK;
}

void spar__chunk_free(spar__chunk *c) {
    free(c->pos);
    c->pos = NULL;
}

/* Backward: scores again, dP, dV, dQ and dK, 2 d each. */
double spar_attn_flops(const spar_attn_problem *prob, int rank, bool backward) {
    const spar_partition *part = prob->part;
    if (prob->type == SPAR_ATTN_LINEAR) {
        /* the visible half of each masked B x B product; backward: the dQ sweep, dP and P,
         * their two products, and three state products */
        double d = prob->dims.head_dim, bd = SPAR_LINEAR_BLOCK * d;
        double per_token = backward ? 6.0 * bd + 10.0 * d * d : 2.0 * bd + 4.0 * d * d;
        return (double)spar_partition_local_len(part, rank) * prob->dims.heads * per_token;
    }
    double pairs = prob->causal ? (double)spar_partition_causal_pairs(part, rank)
                                : (double)spar_partition_local_len(part, rank) * (double)part->n;
    return pairs * prob->dims.heads * (backward ? 10.0 : 4.0) * prob->dims.head_dim;
}

void spar__pass_init(spar__pass *pass, const spar_attn_problem *prob, const spar_attn_io *io,
                     const spar__chunk *qc, bool backward, const float *delta) {
    int h = prob->dims.heads, d = prob->dims.head_dim;
    *pass = (spar__pass){.prob = prob, .dims = prob->dims, .backward = backward, .qc = qc};
    pass->q = (spar_qblock){.n = qc->len,
                            .pos = qc->pos,
                            .stride_q = (int64_t)h * d,
                            .stride_lse = h,
                            .q = io->q,
                            .o = io->o,
                            .lse = io->lse,
                            .dout = io->dout,
                            .delta = delta,
                            .dq = io->dq};
}

void spar__metrics_finish(spar_metrics *m, const spar__pass *pass, spar_comm *comm, int rank,
                          double t_start, uint64_t bytes0, int steps) {
    m->seconds = spar__now() - t_start;
    m->compute_seconds = pass->compute_seconds;
    /* the no-op kernels do no useful arithmetic: no rate to report */
    m->flops = pass->prob->kernels == &spar_kernels_none
                   ? 0.0
                   : spar_attn_flops(pass->prob, rank, pass->backward);
    m->bytes_sent = comm ? spar_comm_bytes_sent(comm) - bytes0 : 0;
    m->steps = steps;
}

int spar__wait_timed(spar_comm *comm, spar_comm_op **op, const char *what, spar_metrics *m) {
    double t0 = spar__now();
    int rc = spar_comm_op_wait_for(comm, op, spar_comm_timeout(comm), -1, what);
    m->wait_seconds += spar__now() - t0;
    return rc;
}

static const float *at(const float *base, int64_t i, int64_t stride) {
    return base ? base + i * stride : NULL;
}

static float *at_mut(float *base, int64_t i, int64_t stride) {
    return base ? base + i * stride : NULL;
}

/* An input that may hold bfloat16 (2 bytes an element) instead of floats. */
static const float *at_in(const float *base, int64_t i, int64_t stride, bool bf16) {
    if (!bf16) return at(base, i, stride);
    return base ? (const float *)((const char *)base + 2 * i * stride) : NULL;
}

/* The view of tokens [i, i+n) of a query block. */
static spar_qblock q_view(const spar_qblock *q, const int64_t *pos, int64_t i, int64_t n) {
    spar_qblock v = *q;
    v.n = n;
    v.pos = pos + i;
    v.q = at_in(q->q, i, q->stride_q, q->bf16);
    v.o = at_mut(q->o, i, q->stride_q);
    v.dout = at_in(q->dout, i, q->stride_q, q->bf16);
    v.dq = at_mut(q->dq, i, q->stride_q);
    v.lse = at_mut(q->lse, i, q->stride_lse);
    v.delta = at(q->delta, i, q->stride_lse);
    return v;
}

static spar_kvblock kv_view(const spar_kvblock *kv, const int64_t *pos, int64_t j, int64_t n) {
    spar_kvblock v = *kv;
    v.n = n;
    v.pos = pos + j;
    v.k = at_in(kv->k, j, kv->stride_kv, kv->bf16);
    v.v = at_in(kv->v, j, kv->stride_kv, kv->bf16);
    v.dk = at_mut(kv->dk, j, kv->stride_kv);
    v.dv = at_mut(kv->dv, j, kv->stride_kv);
    return v;
}

/* Let the pending transfers move while we compute: an Isend that is only tested at
 * the end would hide nothing. */
static int make_progress(spar__pass *pass) {
    for (int i = 0; i < SPAR__MAX_PENDING; i++) {
        int done = 0;
        if (pass->pending[i] && *pass->pending[i])
            SPAR_TRY(spar_comm_op_test(pass->comm, *pass->pending[i], &done));
        if (i == 0 && done && pass->arrived && !pass->arrived_seen) {
            pass->arrived_seen = true;
            SPAR_TRY(pass->arrived(pass->arrived_ctx));
        }
    }
    return SPAR_OK;
}

static int run_group_pair(spar__pass *pass, const spar__group *qg, const spar__chunk *kc,
                          const spar__group *kg, const spar_kvblock *kv) {
    const spar_attn_problem *prob = pass->prob;
    bool masked = prob->causal;
    if (prob->causal) {
        if (kg->pos_min > qg->pos_max) return SPAR_OK;  /* every key is in every query's future */
        if (kg->pos_max <= qg->pos_min) masked = false; /* every key is visible */
    }
    int64_t qb = prob->query_block > 0 ? prob->query_block : SPAR__DEFAULT_QUERY_BLOCK;
    spar_kvblock keys = kv_view(kv, kv->pos ? kv->pos : kc->pos, kg->local_start, kg->len);
    const spar_kernels *kern = prob->kernels;
    for (int64_t i = qg->local_start; i < qg->local_start + qg->len; i += qb) {
        int64_t nq = qg->local_start + qg->len - i < qb ? qg->local_start + qg->len - i : qb;
        spar_qblock queries = q_view(&pass->q, pass->q.pos, i, nq);
        double t0 = spar__now();
        SPAR_TRY(pass->backward ? kern->softmax_bwd_block(&pass->dims, masked, &queries, &keys)
                                : kern->softmax_fwd_block(&pass->dims, masked, &queries, &keys));
        pass->compute_seconds += spar__now() - t0;
        SPAR_TRY(make_progress(pass));
    }
    return SPAR_OK;
}

int spar__pass_chunk(spar__pass *pass, const spar__chunk *kc, const spar_kvblock *kv) {
    for (int a = 0; a < pass->qc->ngroups; a++)
        for (int b = 0; b < kc->ngroups; b++)
            SPAR_TRY(run_group_pair(pass, &pass->qc->groups[a], kc, &kc->groups[b], kv));
    return SPAR_OK;
}
