/* linear_attn.c: linear attention across ranks, LASP-2 and LASP-1 (DESIGN.md 3.4-3.5).
 *
 * Rank r holds the contiguous chunk [a_r, b_r). Its memory state, per state head, is
 * M_r = sum_j lambda^(b_r-1-j) k_j^T v_j; the state entering it is the decayed prefix
 * S_r = sum_{s<r} lambda^(a_r - b_s) M_s, written with true chunk lengths so uneven chunks
 * are exact. Then o = [within the chunk] + lambda^(i+1) q_i S_r. Backward mirrors it: the
 * chunk's state gradient dS_r = sum_i lambda^(i+1) q_i^T dout_i, and the gradient
 * reaching its own memory state DKV_r = sum_{s>r} lambda^(a_s - b_r) dS_s.
 *
 * LASP-2 gathers every M_s (forward) and every dS_s (backward) in one all-gather each,
 * overlapped with the within-chunk work, which needs no communication. LASP-1 passes
 * S along the chain r-1 -> r -> r+1 (backward: DKV along r+1 -> r -> r-1). Without the
 * causal mask there is no decay and no within-chunk term: o = q T with T = sum_s M_s.
 * io->states keeps what forward learnt for backward: every M_s (LASP-2), or S_r and
 * T (LASP-1).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine_internal.h"

enum { CHANNEL_STATE = 2 };

/* Without the causal mask nothing decays, so a kv head's state serves its whole group. */
spar_linear_dims spar_linear_dims_of(const spar_attn_problem *prob) {
    spar_linear_dims ld = {prob->dims.heads, prob->dims.kv_heads, prob->dims.head_dim,
                           prob->dims.kv_heads, prob->decay};
    for (int h = 1; h < prob->dims.heads && prob->causal; h++)
        if (prob->decay[h] != prob->decay[0]) ld.state_heads = prob->dims.heads;
    return ld;
}

static int64_t state_floats(const spar_linear_dims *ld) {
    return (int64_t)ld->state_heads * ld->head_dim * ld->head_dim;
}

int64_t spar_linear_states_floats(const spar_attn_problem *prob) {
    spar_linear_dims ld = spar_linear_dims_of(prob);
    return (int64_t)prob->part->ranks * state_floats(&ld);
}

/* One rank's view: its chunk, the dims, scratch states. */
typedef struct chain {
    spar_comm *comm;
    const spar_attn_problem *prob;
    const spar_attn_io *io;
    spar_linear_dims ld;
    int rank, size;
    int64_t start, len;         /* the chunk [start, start+len) */
    int64_t sf;                 /* floats of one state */
    float *mine, *s_in, *other; /* [sf] each */
    double *exps;               /* [size] */
} chain;

static int chain_init(chain *c, spar_comm *comm, const spar_attn_problem *prob,
                      const spar_attn_io *io) {
    *c = (chain){.comm = comm,
                 .prob = prob,
                 .io = io,
                 .ld = spar_linear_dims_of(prob),
                 .rank = spar_comm_rank(comm),
                 .size = spar_comm_size(comm)};
    if (prob->part->kind != SPAR_PARTITION_CONTIGUOUS || prob->part->ranks != c->size)
        return spar_errorf(SPAR_EINVAL,
                           "linear attention needs a contiguous partition over "
                           "all %d ranks",
                           c->size);
    c->start = spar_partition_global(prob->part, c->rank, 0);
    c->len = spar_partition_local_len(prob->part, c->rank);
    c->sf = state_floats(&c->ld);
    size_t bytes = sizeof(float) * (size_t)c->sf;
    c->mine = malloc(bytes), c->s_in = malloc(bytes), c->other = malloc(bytes);
    c->exps = malloc(sizeof(double) * (size_t)c->size);
    return c->mine && c->s_in && c->other && c->exps ? SPAR_OK : SPAR_ENOMEM;
}

static void chain_free(chain *c) {
    free(c->mine), free(c->s_in), free(c->other), free(c->exps);
}

static int64_t chunk_start(const chain *c, int s) {
    return spar_partition_global(c->prob->part, s, 0);
}

static int64_t chunk_end(const chain *c, int s) {
    return chunk_start(c, s) + spar_partition_local_len(c->prob->part, s);
}

/* out = the decayed sum of the ranks' states, exponent per rank (< 0 skips it):
 * entering (before): a_r - b_s for s < r; leaving (after): a_s - b_r for s > r; all: 0. */
enum prefix { BEFORE, AFTER, ALL };

static void combine(chain *c, const float *states, enum prefix which, float *out) {
    for (int s = 0; s < c->size; s++) {
        if (!c->prob->causal || which == ALL)
            c->exps[s] = 0.0;
        else if (which == BEFORE)
            c->exps[s] = s < c->rank ? (double)(c->start - chunk_end(c, s)) : -1.0;
        else
            c->exps[s] = s > c->rank ? (double)(chunk_start(c, s) - (c->start + c->len)) : -1.0;
    }
    spar_linear_combine(&c->ld, c->size, states, c->exps, out);
}

/* The chunk's own work, which needs no other rank: forward output or gradients. */
static int within_chunk(chain *c, bool backward) {
    const spar_attn_io *io = c->io;
    const spar_kernels *kern = c->prob->kernels;
    int64_t nq = c->len * c->ld.heads * c->ld.head_dim,
            nkv = c->len * c->ld.kv_heads * c->ld.head_dim;
    if (!c->prob->causal) { /* everything goes through T */
        memset(backward ? io->dq : io->o, 0, sizeof(float) * (size_t)nq);
        if (backward) {
            memset(io->dk, 0, sizeof(float) * (size_t)nkv);
            memset(io->dv, 0, sizeof(float) * (size_t)nkv);
        }
        return SPAR_OK;
    }
    if (!backward) return kern->linear_fwd_local(&c->ld, c->len, io->q, io->k, io->v, io->o);
    return kern->linear_bwd_local(&c->ld, c->len, io->q, io->k, io->v, io->dout, io->dq, io->dk,
                                  io->dv);
}

/* LASP-2, one pass: gather the per-rank states while the chunk computes its own part. */
static int lasp2_pass(chain *c, bool backward, spar_metrics *m) {
    const spar_attn_io *io = c->io;
    bool causal = c->prob->causal;
    int64_t *counts = malloc(sizeof(int64_t) * (size_t)c->size);
    float *gathered = backward ? malloc(sizeof(float) * (size_t)(c->sf * c->size)) : io->states;
    if (!counts || !gathered) {
        free(counts);
        if (backward) free(gathered);
        return SPAR_ENOMEM;
    }
    for (int s = 0; s < c->size; s++)
        counts[s] = c->sf;
    int rc = backward
                 ? c->prob->kernels->linear_dstate(&c->ld, causal, c->len, io->q, io->dout, c->mine)
                 : c->prob->kernels->linear_state(&c->ld, causal, c->len, io->k, io->v, c->mine);
    spar_comm_op *op = NULL;
    if (rc == 0) rc = spar_comm_allgather_start(c->comm, c->mine, gathered, counts, &op);
    double t0 = spar__now();
    if (rc == 0) rc = within_chunk(c, backward);
    double compute = spar__now() - t0;
    if (rc == 0)
        rc = spar__wait_timed(c->comm, &op,
                              backward ? "the all-gather of the state gradients (lasp2)"
                                       : "the all-gather of the memory states (lasp2)",
                              m);
    if (rc == 0) {
        combine(c, io->states, BEFORE, c->s_in); /* forward's states, kept in io->states */
        const spar_kernels *kern = c->prob->kernels;
        if (!backward) {
            rc = kern->linear_fwd_state(&c->ld, causal, c->len, io->q, c->s_in, io->o);
        } else {
            combine(c, gathered, AFTER, c->other);
            rc = kern->linear_bwd_state(&c->ld, causal, c->len, io->k, io->v, io->dout, c->s_in,
                                        c->other, io->dq, io->dk, io->dv);
        }
    }
    m->compute_seconds = compute;
    free(counts);
    if (backward && rc == 0) free(gathered); /* else possibly in flight: left alone */
    return rc;
}

static int run_pass(spar_comm *comm, const spar_attn_problem *prob, const spar_attn_io *io,
                    spar_metrics *metrics, bool backward, bool lasp1);

int spar__lasp2_forward(spar_comm *comm, const spar_attn_problem *prob, const spar_attn_io *io,
                        spar_metrics *m) {
    return run_pass(comm, prob, io, m, false, false);
}

int spar__lasp2_backward(spar_comm *comm, const spar_attn_problem *prob, const spar_attn_io *io,
                         spar_metrics *m) {
    return run_pass(comm, prob, io, m, true, false);
}

/* LASP-1 without the mask: every rank needs T = sum of all states; they rotate around the
 * ring (P-1 hops) and each rank adds what passes. `mine` holds this rank's state. */
static int rotate_sum(chain *c, float *total, spar_metrics *m) {
    memcpy(total, c->mine, sizeof(float) * (size_t)c->sf);
    float *bufs[2] = {c->mine, c->other};
    for (int step = 0, cur = 0; step + 1 < c->size; step++, cur ^= 1) {
        spar_comm_op *op = NULL;
        size_t bytes = sizeof(float) * (size_t)c->sf;
        SPAR_TRY(spar_comm_ring_start(c->comm, CHANNEL_STATE, bufs[cur], bytes, bufs[cur ^ 1],
                                      bytes, &op));
        SPAR_TRY(spar__wait_timed(c->comm, &op, "a state rotating around the ring (lasp1)", m));
        spar_vec_add(c->sf, total, bufs[cur ^ 1]);
    }
    return SPAR_OK;
}

/* LASP-1 causal, one pass. Forward: S_r from r-1, S_{r+1} = lambda^C S_r + M_r to r+1.
 * Backward: DKV_r from r+1, DKV_{r-1} = dS_r + lambda^C DKV_r to r-1. The chunk's own work
 * runs while the state travels down the chain. */
static int lasp1_chain(chain *c, bool backward, spar_metrics *m) {
    const spar_attn_io *io = c->io;
    size_t bytes = sizeof(float) * (size_t)c->sf;
    int from = backward ? c->rank + 1 : c->rank - 1, to = backward ? c->rank - 1 : c->rank + 1;
    bool has_from = from >= 0 && from < c->size, has_to = to >= 0 && to < c->size;
    float *incoming = backward ? c->other : c->s_in;
    spar_comm_op *op = NULL;
    if (has_from)
        SPAR_TRY(spar_comm_sendrecv_start(c->comm, CHANNEL_STATE, NULL, 0, -1, incoming, bytes,
                                          from, &op));
    else
        memset(incoming, 0, bytes);
    SPAR_TRY(backward
                 ? c->prob->kernels->linear_dstate(&c->ld, true, c->len, io->q, io->dout, c->mine)
                 : c->prob->kernels->linear_state(&c->ld, true, c->len, io->k, io->v, c->mine));
    double t0 = spar__now();
    SPAR_TRY(within_chunk(c, backward));
    m->compute_seconds = spar__now() - t0;
    SPAR_TRY(spar__wait_timed(c->comm, &op,
                              backward ? "the state gradient from the next rank (lasp1)"
                                       : "the state from the previous rank (lasp1)",
                              m));
    if (!backward) { /* keep S_r for the backward pass */
        memcpy(io->states, c->s_in, bytes);
        SPAR_TRY(c->prob->kernels->linear_fwd_state(&c->ld, true, c->len, io->q, c->s_in, io->o));
    } else {
        memcpy(c->s_in, io->states, bytes);
        SPAR_TRY(c->prob->kernels->linear_bwd_state(&c->ld, true, c->len, io->k, io->v, io->dout,
                                                    c->s_in, incoming, io->dq, io->dk, io->dv));
    }
    if (!has_to) return SPAR_OK;
    /* outgoing = lambda^C incoming + mine, left in `mine` */
    float *pair = malloc(2 * bytes);
    if (!pair) return SPAR_ENOMEM;
    memcpy(pair, incoming, bytes);
    memcpy(pair + c->sf, c->mine, bytes);
    double exps[2] = {(double)c->len, 0.0};
    spar_linear_combine(&c->ld, 2, pair, exps, c->mine);
    free(pair);
    int rc = spar_comm_sendrecv_start(c->comm, CHANNEL_STATE, c->mine, bytes, to, NULL, 0, -1, &op);
    if (rc == 0) rc = spar__wait_timed(c->comm, &op, "the state sent down the chain (lasp1)", m);
    return rc;
}

/* LASP-1 without the mask: T (forward) or dT (backward) by rotation, then the state terms. */
static int lasp1_unmasked(chain *c, bool backward, spar_metrics *m) {
    const spar_attn_io *io = c->io;
    float *t = io->states; /* forward: T for both passes */
    double t0 = spar__now();
    SPAR_TRY(within_chunk(c, backward));
    m->compute_seconds = spar__now() - t0;
    if (!backward) {
        SPAR_TRY(c->prob->kernels->linear_state(&c->ld, false, c->len, io->k, io->v, c->mine));
        SPAR_TRY(rotate_sum(c, t, m));
        SPAR_TRY(c->prob->kernels->linear_fwd_state(&c->ld, false, c->len, io->q, t, io->o));
        return SPAR_OK;
    }
    SPAR_TRY(c->prob->kernels->linear_dstate(&c->ld, false, c->len, io->q, io->dout, c->mine));
    SPAR_TRY(rotate_sum(c, c->s_in, m)); /* dT */
    SPAR_TRY(c->prob->kernels->linear_bwd_state(&c->ld, false, c->len, io->k, io->v, io->dout, t,
                                                c->s_in, io->dq, io->dk, io->dv));
    return SPAR_OK;
}

static int run_pass(spar_comm *comm, const spar_attn_problem *prob, const spar_attn_io *io,
                    spar_metrics *metrics, bool backward, bool lasp1) {
    double t_start = spar__now();
    uint64_t bytes0 = spar_comm_bytes_sent(comm);
    spar_metrics m = {0};
    chain c;
    int rc = chain_init(&c, comm, prob, io);
    if (rc == 0) {
        if (!lasp1)
            rc = lasp2_pass(&c, backward, &m);
        else
            rc = prob->causal ? lasp1_chain(&c, backward, &m) : lasp1_unmasked(&c, backward, &m);
    }
    if (rc == 0) {
        spar__pass done = {
            .prob = prob, .backward = backward, .compute_seconds = m.compute_seconds};
        spar__metrics_finish(&m, &done, comm, c.rank, t_start, bytes0, c.size);
    }
    if (rc == 0 && prob->progress && c.rank == 0)
        prob->progress(prob->progress_ctx,
                       backward ? (lasp1 ? "lasp1 backward" : "lasp2 backward")
                                : (lasp1 ? "lasp1 forward" : "lasp2 forward"),
                       1, 1);
    chain_free(&c);
    if (metrics) *metrics = m;
    return rc;
}

int spar__lasp1_forward(spar_comm *comm, const spar_attn_problem *prob, const spar_attn_io *io,
                        spar_metrics *m) {
    return run_pass(comm, prob, io, m, false, true);
}

int spar__lasp1_backward(spar_comm *comm, const spar_attn_problem *prob, const spar_attn_io *io,
                         spar_metrics *m) {
    return run_pass(comm, prob, io, m, true, true);
}

int spar__linear_local(const spar_attn_problem *prob, const spar_attn_io *io, bool backward) {
    spar_linear_dims ld = spar_linear_dims_of(prob);
    int64_t n = prob->part->n, sf = state_floats(&ld);
    if (prob->causal) {
        if (!backward) return prob->kernels->linear_fwd_local(&ld, n, io->q, io->k, io->v, io->o);
        return prob->kernels->linear_bwd_local(&ld, n, io->q, io->k, io->v, io->dout, io->dq,
                                               io->dk, io->dv);
    }
    float *t = malloc(sizeof(float) * (size_t)sf * 2);
    if (!t) return SPAR_ENOMEM;
    int64_t nq = n * ld.heads * ld.head_dim, nkv = n * ld.kv_heads * ld.head_dim;
    int rc = prob->kernels->linear_state(&ld, false, n, io->k, io->v, t);
    if (rc == 0 && !backward) {
        memset(io->o, 0, sizeof(float) * (size_t)nq);
        rc = prob->kernels->linear_fwd_state(&ld, false, n, io->q, t, io->o);
    } else if (rc == 0) {
        memset(io->dq, 0, sizeof(float) * (size_t)nq);
        memset(io->dk, 0, sizeof(float) * (size_t)nkv);
        memset(io->dv, 0, sizeof(float) * (size_t)nkv);
        rc = prob->kernels->linear_dstate(&ld, false, n, io->q, io->dout, t + sf);
        if (rc == 0)
            rc = prob->kernels->linear_bwd_state(&ld, false, n, io->k, io->v, io->dout, t, t + sf,
                                                 io->dq, io->dk, io->dv);
    }
    free(t);
    return rc;
}
