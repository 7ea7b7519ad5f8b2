/* offload_compute.c: offloaded decode, the compute side, and the entry point that gives
 * every rank its role (offload.h has the layout and the message order).
 *
 * A compute rank keeps the weights and runs the dense layers. Prefill runs here (each
 * prompt through every layer, causal attention over itself), and the prompts' K/V go to
 * the attention ranks layer by layer. Each decode step then runs layer by layer over the
 * micro-batches: the pre-attention half of every micro-batch is computed and its q, k, v
 * sent before the first reply is awaited, so that while the attention ranks serve one
 * micro-batch the compute rank works on the next.
 */
#include <stdlib.h>
#include <string.h>

#include "offload.h"

typedef struct mbatch {
    int first, count; /* into the rank's requests */
    spar__rows s;
    float **send, **recv; /* per attention rank */
    spar_comm_op **ops;
    int32_t *ids, *next;
} mbatch;

typedef struct compute {
    spar_comm *comm;
    const spar_model *m;
    const spar_requests *r;
    spar__split sp;
    int c, M, owned;
    mbatch *mb;
    float *logits;   /* [owned, V] */
    int32_t *tokens; /* [owned, generate] */
    spar_generation *out;
    uint64_t header_bytes;
    int lie_at; /* test hook SPAR_TEST_FAULT=header:STEP: that step's headers lie; else -1 */
    spar__prefill_plan plan; /* plan.method NULL: each rank prefills its own prompts */
} compute;

static int request_of(const compute *w, int i) {
    return w->c + i * w->sp.compute;
}

static void mbatch_free(compute *w, mbatch *b) {
    for (int a = 0; b->send && a < w->sp.K; a++)
        free(b->send[a]), free(b->recv[a]);
    free(b->send), free(b->recv), free(b->ops), free(b->ids), free(b->next);
    spar__rows_free(&b->s);
}

static int mbatch_alloc(compute *w, mbatch *b, int m) {
    spar__micro_batch(w->owned, w->M, m, &b->first, &b->count);
    int n = b->count > 0 ? b->count : 1, K = w->sp.K;
    int64_t per = spar__q_floats(&w->sp) + 2 * spar__kv_floats(&w->sp);
    b->send = calloc((size_t)K, sizeof(float *));
    b->recv = calloc((size_t)K, sizeof(float *));
    b->ops = calloc((size_t)K, sizeof(spar_comm_op *));
    b->ids = malloc(sizeof(int32_t) * (size_t)n);
    b->next = malloc(sizeof(int32_t) * (size_t)n);
    if (!b->send || !b->recv || !b->ops || !b->ids || !b->next) return SPAR_ENOMEM;
    for (int a = 0; a < K; a++) {
        b->send[a] = malloc(sizeof(float) * (size_t)(n * per));
        b->recv[a] = malloc(sizeof(float) * (size_t)(n * spar__reply_floats(&w->sp)));
        if (!b->send[a] || !b->recv[a]) return SPAR_ENOMEM;
    }
    for (int i = 0; i < b->count; i++)
        b->ids[i] = request_of(w, b->first + i);
    return spar__rows_alloc(&b->s, &w->m->dims, n);
}

/* A header for micro-batch b to every attention rank. */
static int send_headers(compute *w, const mbatch *b, int m, int step, bool stop) {
    int64_t *pos = malloc(sizeof(int64_t) * (size_t)(b->count + 1));
    if (!pos) return SPAR_ENOMEM;
    for (int i = 0; i < b->count; i++) /* admission: the prompt lengths */
        pos[i] =
            step == 0 ? w->r->prompt_len[b->ids[i]] : spar__token_position(w->r, b->ids[i], step);
    if (step == w->lie_at && b->count) pos[0] += 1;
    spar__header h = {.step = step,
                      .micro_batch = m,
                      .compute_rank = w->c,
                      .count = b->count,
                      .stop = stop,
                      .ids = b->ids,
                      .positions = pos};
    int rc = SPAR_OK;
    for (int a = 0; a < w->sp.K && rc == 0; a++)
        rc = spar__header_send(w->comm, w->sp.compute + a, &h, &w->header_bytes);
    free(pos);
    return rc;
}

/* The prompt's k or v rows that attention rank a holds, packed. */
static void share_rows(const compute *w, int a, const float *x, int64_t len, float *out) {
    const spar__split *sp = &w->sp;
    int64_t row = (int64_t)sp->md->kv_heads * sp->md->head_dim, part = spar__kv_floats(sp);
    int64_t col = sp->by_heads ? a * part : 0, n = 0;
    for (int64_t p = 0; p < len; p++)
        if (spar__holds(sp, a, p))
            memcpy(out + n++ * part, x + p * row + col, sizeof(float) * (size_t)part);
}

/* One layer's K/V of a whole prompt (k, v [len, G d]), each attention rank's share. */
static int send_prompt_kv(void *ctx, int layer, const float *k, const float *v, int64_t len) {
    compute *w = ctx;
    (void)layer; /* the layers go in order: the attention rank counts them */
    int64_t part = spar__kv_floats(&w->sp);
    float *buf = malloc(sizeof(float) * (size_t)(2 * len * part + 1));
    int rc = buf ? SPAR_OK : SPAR_ENOMEM;
    for (int a = 0; a < w->sp.K && rc == 0; a++) {
        int64_t rows = spar__prompt_rows(&w->sp, a, len);
        share_rows(w, a, k, len, buf);
        share_rows(w, a, v, len, buf + rows * part);
        rc = spar_comm_send_for(w->comm, buf, sizeof(float) * (size_t)(2 * rows * part),
                                w->sp.compute + a, SPAR__TAG_PREFILL, spar_comm_timeout(w->comm),
                                "a prompt's K/V to be taken");
    }
    free(buf);
    return rc;
}

/* The first token of owned request i from its prompt's last logits (kept too). */
static void first_token(compute *w, int i, const float *last) {
    int64_t V = w->m->dims.vocab;
    float *mine = w->logits + (int64_t)i * V;
    if (mine != last) memcpy(mine, last, sizeof(float) * (size_t)V);
    w->tokens[(int64_t)i * w->r->generate] = (int32_t)spar_argmax(V, mine);
}

/* Request b's prompt through the model on this rank alone; its K/V sent. */
static int prefill(compute *w, int i) {
    const spar_model *m = w->m;
    int b = request_of(w, i);
    int64_t len = w->r->prompt_len[b];
    spar__rows s;
    float *logits = malloc(sizeof(float) * (size_t)(len * m->dims.vocab));
    int rc = logits ? spar__rows_alloc(&s, &m->dims, len) : SPAR_ENOMEM;
    for (int64_t p = 0; rc == 0 && p < len; p++)
        s.pos[p] = p;
    if (rc == 0) spar__embed(m, len, w->r->prompt[b], s.x);
    for (int l = 0; rc == 0 && l < m->dims.layers; l++) {
        spar__pre_attention(m, l, &s);
        rc = send_prompt_kv(w, l, s.k, s.v, len);
        if (rc == 0) rc = spar__attend_prompt(m, &s);
        if (rc == 0) spar__post_attention(m, l, &s);
    }
    if (rc == 0) {
        spar__logits(m, &s, logits);
        first_token(w, i, logits + (len - 1) * m->dims.vocab);
    }
    if (logits) spar__rows_free(&s);
    free(logits);
    return rc;
}

/* Every prompt by all compute ranks together, in the order the attention ranks take
 * them (owner by owner); a prompt too short to split goes to its owner alone. */
static int prefill_shared(compute *w) {
    int C = w->sp.compute;
    float *scratch = malloc(sizeof(float) * (size_t)w->m->dims.vocab);
    int rc = scratch ? SPAR_OK : SPAR_ENOMEM;
    for (int owner = 0; owner < C && rc == 0; owner++)
        for (int i = 0; i < spar__owned(w->r->count, C, owner) && rc == 0; i++) {
            int b = owner + i * C;
            int64_t len = w->r->prompt_len[b];
            if (len < 2 * C) {
                if (owner == w->c) rc = prefill(w, i);
                continue;
            }
            float *last = owner == w->c ? w->logits + (int64_t)i * w->m->dims.vocab : scratch;
            rc = spar__prefill_shared(&w->plan, w->m, w->r->prompt[b], len, owner,
                                      send_prompt_kv, w, last);
            if (rc == 0 && owner == w->c) first_token(w, i, last);
        }
    free(scratch);
    return rc;
}

/* q, k, v of micro-batch b (layer l) packed per attention rank and sent; replies posted. */
static int send_qkv(compute *w, mbatch *b, int m) {
    const spar__split *sp = &w->sp;
    int64_t qf = spar__q_floats(sp), kf = spar__kv_floats(sp);
    int64_t hd = (int64_t)sp->md->heads * sp->md->head_dim,
            gd = (int64_t)sp->md->kv_heads * sp->md->head_dim;
    for (int a = 0; a < sp->K; a++) {
        float *q = b->send[a], *kv = q + b->count * qf;
        int64_t held = 0;
        for (int i = 0; i < b->count; i++) {
            memcpy(q + i * qf, b->s.q + i * hd + (sp->by_heads ? a * qf : 0),
                   sizeof(float) * (size_t)qf);
            if (!spar__holds(sp, a, b->s.pos[i])) continue;
            memcpy(kv + held * 2 * kf, b->s.k + i * gd + (sp->by_heads ? a * kf : 0),
                   sizeof(float) * (size_t)kf);
            memcpy(kv + held * 2 * kf + kf, b->s.v + i * gd + (sp->by_heads ? a * kf : 0),
                   sizeof(float) * (size_t)kf);
            held++;
        }
        size_t bytes = sizeof(float) * (size_t)(b->count * qf + held * 2 * kf);
        size_t back = sizeof(float) * (size_t)(b->count * spar__reply_floats(sp));
        SPAR_TRY(spar_comm_sendrecv_start(w->comm, m % 4, b->send[a], bytes, sp->compute + a,
                                          b->recv[a], back, sp->compute + a, &b->ops[a]));
    }
    return SPAR_OK;
}

/* The replies of micro-batch b: o assembled (by heads) or merged (by positions). */
static int gather_o(compute *w, mbatch *b) {
    const spar__split *sp = &w->sp;
    const spar_model_dims *md = sp->md;
    int64_t qf = spar__q_floats(sp), hd = (int64_t)md->heads * md->head_dim;
    double t0 = spar_comm_wtime();
    for (int a = 0; a < sp->K; a++)
        SPAR_TRY(spar_comm_op_wait_for(w->comm, &b->ops[a], spar_comm_timeout(w->comm),
                                       sp->compute + a, "attention output"));
    w->out->idle_seconds += spar_comm_wtime() - t0;
    if (!sp->by_heads)
        spar_softmax_init_partial(b->count, md->heads, md->head_dim, b->s.o, b->s.lse);
    for (int a = 0; a < sp->K; a++) {
        const float *o = b->recv[a], *lse = o + b->count * qf;
        for (int i = 0; sp->by_heads && i < b->count; i++)
            memcpy(b->s.o + i * hd + a * qf, o + i * qf, sizeof(float) * (size_t)qf);
        if (!sp->by_heads)
            spar_softmax_merge(b->count, md->heads, md->head_dim, b->s.o, b->s.lse, o, lse);
    }
    return SPAR_OK;
}

static int decode_step(compute *w, int step, float *logits) {
    const spar_model *m = w->m;
    for (int mi = 0; mi < w->M; mi++) {
        mbatch *b = &w->mb[mi];
        SPAR_TRY(send_headers(w, b, mi, step, false));
        for (int i = 0; i < b->count; i++) {
            b->s.pos[i] = spar__token_position(w->r, b->ids[i], step);
            b->next[i] = w->tokens[(int64_t)(b->first + i) * w->r->generate + step - 1];
        }
        spar__embed(m, b->count, b->next, b->s.x);
    }
    for (int l = 0; l < m->dims.layers; l++) {
        for (int mi = 0; mi < w->M; mi++) {
            spar__pre_attention(m, l, &w->mb[mi].s);
            SPAR_TRY(send_qkv(w, &w->mb[mi], mi));
        }
        for (int mi = 0; mi < w->M; mi++) {
            SPAR_TRY(gather_o(w, &w->mb[mi]));
            spar__post_attention(m, l, &w->mb[mi].s);
        }
    }
    for (int mi = 0; mi < w->M; mi++) {
        mbatch *b = &w->mb[mi];
        spar__logits(m, &b->s, logits);
        for (int i = 0; i < b->count; i++) {
            float *row = logits + (int64_t)i * m->dims.vocab;
            w->tokens[(int64_t)(b->first + i) * w->r->generate + step] =
                (int32_t)spar_argmax(m->dims.vocab, row);
            memcpy(w->logits + (int64_t)(b->first + i) * m->dims.vocab, row,
                   sizeof(float) * (size_t)m->dims.vocab);
        }
    }
    return SPAR_OK;
}

/* Compute ranks other than 0 send their tokens and logits to rank 0, which places them. */
static int collect(compute *w) {
    int V = w->m->dims.vocab, G = w->r->generate, tag = SPAR__TAG_PREFILL + 1;
    if (w->c != 0) {
        SPAR_TRY(
            spar_comm_send(w->comm, w->tokens, sizeof(int32_t) * (size_t)(w->owned * G), 0, tag));
        return spar_comm_send(w->comm, w->logits, sizeof(float) * (size_t)w->owned * (size_t)V, 0,
                              tag);
    }
    for (int c = 0; c < w->sp.compute; c++) {
        int n = spar__owned(w->r->count, w->sp.compute, c);
        int32_t *tok = c == 0 ? w->tokens : malloc(sizeof(int32_t) * (size_t)(n * G + 1));
        float *lg = c == 0 ? w->logits : malloc(sizeof(float) * (size_t)(n * V + 1));
        int rc = tok && lg ? SPAR_OK : SPAR_ENOMEM;
        if (rc == 0 && c != 0)
            rc = spar_comm_recv(w->comm, tok, sizeof(int32_t) * (size_t)(n * G), c, tag);
        if (rc == 0 && c != 0)
            rc = spar_comm_recv(w->comm, lg, sizeof(float) * (size_t)n * (size_t)V, c, tag);
        for (int i = 0; rc == 0 && i < n; i++) {
            int b = c + i * w->sp.compute;
            memcpy(w->out->tokens + (int64_t)b * G, tok + (int64_t)i * G,
                   sizeof(int32_t) * (size_t)G);
            if (w->out->logits)
                memcpy(w->out->logits + (int64_t)b * V, lg + (int64_t)i * V,
                       sizeof(float) * (size_t)V);
        }
        if (c != 0) free(tok), free(lg);
        SPAR_TRY(rc);
    }
    return SPAR_OK;
}

static int run_compute(compute *w) {
    const spar_requests *r = w->r;
    double t0 = spar_comm_wtime();
    for (int mi = 0; mi < w->M; mi++) /* admission: headers, then the prompts' K/V */
        SPAR_TRY(send_headers(w, &w->mb[mi], mi, 0, false));
    if (w->plan.method)
        SPAR_TRY(prefill_shared(w));
    else
        for (int i = 0; i < w->owned; i++)
            SPAR_TRY(prefill(w, i));
    w->out->prefill_seconds = spar_comm_wtime() - t0;
    int most = 1;
    for (int mi = 0; mi < w->M; mi++)
        most = w->mb[mi].count > most ? w->mb[mi].count : most;
    float *logits = malloc(sizeof(float) * (size_t)most * (size_t)w->m->dims.vocab);
    if (!logits) return SPAR_ENOMEM;
    uint64_t bytes0 = spar_comm_bytes_sent(w->comm), headers0 = w->header_bytes;
    double t1 = spar_comm_wtime();
    int rc = SPAR_OK;
    for (int step = 1; step < r->generate && rc == 0; step++) {
        double ts = spar_comm_wtime();
        rc = decode_step(w, step, logits);
        if (w->out->step_seconds) w->out->step_seconds[step - 1] = spar_comm_wtime() - ts;
    }
    free(logits);
    w->out->decode_seconds = spar_comm_wtime() - t1;
    w->out->decode_bytes = spar_comm_bytes_sent(w->comm) - bytes0;
    w->out->header_bytes = w->header_bytes - headers0;
    mbatch none = {0};
    if (rc == 0) rc = send_headers(w, &none, 0, r->generate, true);
    return rc == 0 ? collect(w) : rc;
}

static int compute_side(spar_comm *comm, const spar_model *m, const spar_requests *r,
                        const spar__split *sp, int micro_batches, const spar__prefill_plan *plan,
                        spar_generation *out) {
    compute w = {.comm = comm, .m = m, .r = r, .sp = *sp, .c = spar_comm_rank(comm), .out = out,
                 .plan = *plan};
    const char *fault = getenv("SPAR_TEST_FAULT");
    w.lie_at = fault && strncmp(fault, "header:", 7) == 0 ? atoi(fault + 7) : -1;
    w.owned = spar__owned(r->count, sp->compute, w.c);
    w.M = micro_batches < w.owned ? micro_batches : (w.owned > 0 ? w.owned : 1);
    w.mb = calloc((size_t)w.M, sizeof *w.mb);
    w.logits = malloc(sizeof(float) * (size_t)(w.owned + 1) * (size_t)m->dims.vocab);
    w.tokens = malloc(sizeof(int32_t) * (size_t)(w.owned + 1) * (size_t)r->generate);
    int rc = w.mb && w.logits && w.tokens ? SPAR_OK : SPAR_ENOMEM;
    for (int mi = 0; mi < w.M && rc == 0; mi++)
        rc = mbatch_alloc(&w, &w.mb[mi], mi);
    if (rc == 0) rc = run_compute(&w);
    for (int mi = 0; w.mb && mi < w.M; mi++)
        mbatch_free(&w, &w.mb[mi]);
    free(w.mb), free(w.logits), free(w.tokens);
    return rc;
}

int spar_generate_offload(spar_comm *comm, const spar_model *m, const spar_requests *r,
                          const spar_offload *cfg, spar_generation *out) {
    int world = spar_comm_size(comm), K = cfg->attention_ranks;
    if (K < 1 || K >= world)
        return spar_errorf(SPAR_EINVAL,
                           "offload: %d attention ranks in a world of %d (allowed: "
                           "1 .. world - 1, leaving a compute rank)",
                           K, world);
    spar__split sp = spar__split_of(&m->dims, world, K);
    int micro = cfg->micro_batches > 0 ? cfg->micro_batches : 1;
    bool computes = spar_comm_rank(comm) < sp.compute;
    spar__prefill_plan plan = {.method = cfg->prefill, .kind = cfg->prefill_partition};
    /* shared prefill: a communicator of the compute ranks (collective over the world) */
    if (plan.method) SPAR_TRY(spar_comm_split(comm, computes ? 0 : 1, &plan.comm));
    int rc = computes ? compute_side(comm, m, r, &sp, micro, &plan, out)
                      : spar__offload_serve(comm, m, r, &sp, micro, out);
    if (plan.comm) spar_comm_free(plan.comm);
    return rc;
}
