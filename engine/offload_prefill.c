/* offload_prefill.c: one prompt prefilled by all compute ranks together
 * (parallel.prefill = ring or allgather), for offloaded generation.
 *
 * A long prompt is the one place where generation is compute-bound on attention: its
 * causal self-attention costs O(len^2). Here the prompt's tokens are partitioned over the
 * compute ranks (zigzag unless sequence.partition says otherwise), every rank runs the
 * dense layers on its own rows, and attention is the sequence-parallel method of the
 * attention runs, on the compute ranks' communicator. The request's owner gathers each
 * layer's K/V rows in position order and hands them to a sink (which sends them on to
 * the attention ranks), and gets the logits of the last position. Leaves out: overlapping
 * the gather with the next layer's work.
 */
#include <stdlib.h>
#include <string.h>

#include "offload.h"

typedef struct shared {
    const spar__prefill_plan *plan;
    const spar_model *m;
    spar_partition part;
    int me, ranks;
    int64_t len, max_local, row; /* row: floats of one token's k (or v) */
    spar__rows s;
    float *mine, *all, *k, *v; /* gather buffers; k, v [len, row] on the owner */
} shared;

static void shared_free(shared *x) {
    spar__rows_free(&x->s);
    free(x->mine), free(x->all), free(x->k), free(x->v);
}

static int shared_init(shared *x, const spar__prefill_plan *plan, const spar_model *m,
                       int64_t len, int owner) {
    *x = (shared){.plan = plan, .m = m, .len = len};
    x->me = spar_comm_rank(plan->comm), x->ranks = spar_comm_size(plan->comm);
    x->row = (int64_t)m->dims.kv_heads * m->dims.head_dim;
    SPAR_TRY(spar_partition_init(&x->part, plan->kind, len, x->ranks));
    x->max_local = spar_partition_max_local_len(&x->part);
    int64_t n = spar_partition_local_len(&x->part, x->me), block = 2 * x->max_local * x->row;
    SPAR_TRY(spar__rows_alloc(&x->s, &m->dims, n > 0 ? n : 1));
    x->s.n = n;
    spar_partition_local_positions(&x->part, x->me, x->s.pos);
    x->mine = malloc(sizeof(float) * (size_t)block);
    if (x->me == owner) {
        x->all = malloc(sizeof(float) * (size_t)(block * x->ranks));
        x->k = malloc(sizeof(float) * (size_t)(len * x->row));
        x->v = malloc(sizeof(float) * (size_t)(len * x->row));
        if (!x->all || !x->k || !x->v) return SPAR_ENOMEM;
    }
    return x->mine ? SPAR_OK : SPAR_ENOMEM;
}

/* This layer's k, v rows of every rank to the owner, put back in position order. */
static int gather_kv(shared *x, int owner) {
    int64_t n = x->s.n, half = x->max_local * x->row;
    memcpy(x->mine, x->s.k, sizeof(float) * (size_t)(n * x->row));
    memcpy(x->mine + half, x->s.v, sizeof(float) * (size_t)(n * x->row));
    SPAR_TRY(spar_comm_gather(x->plan->comm, x->mine, sizeof(float) * (size_t)(2 * half), x->all,
                              owner));
    if (x->me != owner) return SPAR_OK;
    for (int r = 0; r < x->ranks; r++) {
        const float *from = x->all + (int64_t)r * 2 * half;
        int64_t rn = spar_partition_local_len(&x->part, r);
        for (int64_t i = 0; i < rn; i++) {
            int64_t p = spar_partition_global(&x->part, r, i);
            memcpy(x->k + p * x->row, from + i * x->row, sizeof(float) * (size_t)x->row);
            memcpy(x->v + p * x->row, from + half + i * x->row, sizeof(float) * (size_t)x->row);
        }
    }
    return SPAR_OK;
}

/* Causal attention of the prompt, each rank's rows against all, by the plan's method. */
static int attend(shared *x) {
    const spar_model_dims *md = &x->m->dims;
    spar_attn_problem prob = {.type = SPAR_ATTN_SOFTMAX,
                              .dims = spar__model_attn_dims(md, md->heads, md->kv_heads),
                              .causal = true,
                              .part = &x->part,
                              .kernels = x->m->kernels};
    spar_attn_io io = {.q = x->s.q, .k = x->s.k, .v = x->s.v, .o = x->s.o, .lse = x->s.lse};
    return x->plan->method->forward(x->plan->comm, &prob, &io, NULL);
}

/* The logits of the prompt's last position, from the rank that holds it to the owner. */
static int last_logits(shared *x, int owner, float *logits) {
    int holder;
    int64_t local;
    spar_partition_owner(&x->part, x->len - 1, &holder, &local);
    int64_t V = x->m->dims.vocab, D = x->m->dims.hidden;
    if (x->me == holder) {
        spar__rows last = x->s; /* one row of x, its norm into h */
        last.n = 1, last.x = x->s.x + local * D, last.h = x->s.h + local * D;
        spar__logits(x->m, &last, logits);
        if (holder != owner)
            SPAR_TRY(spar_comm_send_for(x->plan->comm, logits, sizeof(float) * (size_t)V, owner,
                                        SPAR__TAG_PREFILL_LOGITS, spar_comm_timeout(x->plan->comm),
                                        "the prompt's last logits to be taken"));
    } else if (x->me == owner) {
        SPAR_TRY(spar_comm_recv_for(x->plan->comm, logits, sizeof(float) * (size_t)V, holder,
                                    SPAR__TAG_PREFILL_LOGITS, spar_comm_timeout(x->plan->comm),
                                    "the prompt's last logits"));
    }
    return SPAR_OK;
}

int spar__prefill_shared(const spar__prefill_plan *plan, const spar_model *m,
                         const int32_t *tokens, int64_t len, int owner, spar__kv_sink sink,
                         void *sink_ctx, float *logits) {
    shared x;
    int rc = shared_init(&x, plan, m, len, owner);
    int32_t *mine = rc == 0 ? malloc(sizeof(int32_t) * (size_t)(x.s.n + 1)) : NULL;
    if (rc == 0 && !mine) rc = SPAR_ENOMEM;
    for (int64_t i = 0; rc == 0 && i < x.s.n; i++)
        mine[i] = tokens[x.s.pos[i]];
    if (rc == 0) spar__embed(m, x.s.n, mine, x.s.x);
    for (int l = 0; rc == 0 && l < m->dims.layers; l++) {
        spar__pre_attention(m, l, &x.s);
        rc = gather_kv(&x, owner);
        if (rc == 0 && x.me == owner) rc = sink(sink_ctx, l, x.k, x.v, len);
        if (rc == 0) rc = attend(&x);
        if (rc == 0) spar__post_attention(m, l, &x.s);
    }
    if (rc == 0) rc = last_logits(&x, owner, logits);
    free(mine);
    shared_free(&x);
    return rc;
}
