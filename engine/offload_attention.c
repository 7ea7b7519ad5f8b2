/* offload_attention.c: offloaded decode, the attention side (offload.h has the layout
 * and the message order).
 *
 * An attention rank holds, for every request, the K/V rows of its share (its kv-head
 * group, or its positions) and runs only attention: per layer and micro-batch it
 * receives q and the new k, v, appends them, attends and returns o (by positions: a
 * partial o with its lse). Every control message is checked against what this rank
 * expects (step, micro-batch, sender, request ids, positions) before a payload is read:
 * a mismatch is an error naming the sender and the field, never a silent misread.
 */
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#include "offload.h"

typedef struct served { /* one micro-batch of one compute rank */
    int count;
    int32_t *ids;
    spar__cache *caches; /* [count] */
    float *buf, *reply;  /* receive and reply buffers */
    float *lse;          /* by heads: the lse the reply leaves out [heads_per] */
} served;

typedef struct server {
    spar_comm *comm;
    const spar_model *m;
    const spar_requests *r;
    spar__split sp;
    int a;       /* attention index 0..K-1 */
    int *M;      /* micro-batches per compute rank */
    served **mb; /* [compute][M] */
    spar_generation *out;
} server;

static int check_header(server *w, const spar__header *h, int c, int m, int step) {
    const served *s = &w->mb[c][m];
    const char *what = NULL;
    int64_t want = 0, got = 0;
    if (h->compute_rank != c || h->micro_batch != m || h->step != step)
        what = "step, micro-batch or sender", want = step, got = h->step;
    else if (step > 0 && !h->stop && h->count != s->count)
        what = "request count", want = s->count, got = h->count;
    for (int i = 0; !what && step > 0 && !h->stop && i < h->count; i++) {
        int64_t expect = spar__token_position(w->r, s->ids[i], step);
        if (h->ids[i] != s->ids[i])
            what = "request id", want = s->ids[i], got = h->ids[i];
        else if (h->positions[i] != expect)
            what = "position", want = expect, got = h->positions[i];
    }
    for (int i = 0; !what && step == 0 && i < h->count; i++)
        if (h->ids[i] < 0 || h->ids[i] >= w->r->count ||
            h->positions[i] != w->r->prompt_len[h->ids[i]])
            what = "admitted request or prompt length", want = 0, got = h->ids[i];
    if (!what) return SPAR_OK;
    return spar_errorf(SPAR_EFORMAT,
                       "offload: attention rank %d rejects the control message from compute "
                       "rank %d (step %d, micro-batch %d): %s %lld, expected %lld",
                       w->sp.compute + w->a, c, step, m, what, (long long)got, (long long)want);
}

/* Step 0: the micro-batch's requests and their prompts' K/V. */
static int admit(server *w, int c, int m, const spar__header *h) {
    served *s = &w->mb[c][m];
    const spar_model_dims *md = &w->m->dims;
    int64_t part = spar__kv_floats(&w->sp), most = 1, q = spar__q_floats(&w->sp);
    s->count = h->count;
    s->ids = malloc(sizeof(int32_t) * (size_t)(h->count + 1));
    s->caches = calloc((size_t)h->count + 1, sizeof *s->caches);
    if (!s->ids || !s->caches) return SPAR_ENOMEM;
    for (int i = 0; i < h->count; i++) {
        s->ids[i] = h->ids[i];
        int64_t len = w->r->prompt_len[h->ids[i]], cap = len + w->r->generate;
        int64_t rows = w->sp.by_heads ? cap : cap / w->sp.K + 1;
        SPAR_TRY(spar__cache_alloc(&s->caches[i], md->layers, rows, w->sp.kv_per, md->head_dim));
        most = len > most ? len : most;
    }
    int64_t per_token = q + 2 * part;
    int64_t floats =
        (2 * most * part > h->count * per_token ? 2 * most * part : h->count * per_token);
    s->buf = malloc(sizeof(float) * (size_t)(floats + 1));
    s->reply = malloc(sizeof(float) * (size_t)(h->count * spar__reply_floats(&w->sp) + 1));
    s->lse = malloc(sizeof(float) * (size_t)w->sp.heads_per);
    return s->buf && s->reply && s->lse ? SPAR_OK : SPAR_ENOMEM;
}

static int receive_prompts(server *w, int c, int m) {
    served *s = &w->mb[c][m];
    int64_t part = spar__kv_floats(&w->sp);
    for (int i = 0; i < s->count; i++) {
        spar__cache *cache = &s->caches[i];
        int64_t rows = spar__prompt_rows(&w->sp, w->a, w->r->prompt_len[s->ids[i]]);
        for (int l = 0; l < w->m->dims.layers; l++) {
            SPAR_TRY(spar_comm_recv_for(w->comm, s->buf, sizeof(float) * (size_t)(2 * rows * part),
                                        c, SPAR__TAG_PREFILL, spar_comm_timeout(w->comm),
                                        "a prompt's K/V"));
            for (int64_t p = 0; p < rows; p++)
                SPAR_TRY(
                    spar__cache_put(cache, l, p, s->buf + p * part, s->buf + (rows + p) * part));
        }
        cache->len = rows;
    }
    return SPAR_OK;
}

/* One layer of one micro-batch: append, attend, reply. */
static int serve_layer(server *w, int c, int m, int layer, int step) {
    served *s = &w->mb[c][m];
    const spar__split *sp = &w->sp;
    int64_t qf = spar__q_floats(sp), kf = spar__kv_floats(sp), held = 0;
    for (int i = 0; i < s->count; i++)
        held += spar__holds(sp, w->a, spar__token_position(w->r, s->ids[i], step));
    spar_comm_op *op = NULL;
    SPAR_TRY(spar_comm_sendrecv_start(w->comm, m % 4, NULL, 0, -1, s->buf,
                                      sizeof(float) * (size_t)(s->count * qf + held * 2 * kf), c,
                                      &op));
    SPAR_TRY(spar_comm_op_wait_for(w->comm, &op, spar_comm_timeout(w->comm), c, "q, k, v"));
    spar_attn_dims dims = spar__model_attn_dims(sp->md, sp->heads_per, sp->kv_per);
    const float *kv = s->buf + s->count * qf;
    float *o = s->reply, *lse = s->reply + s->count * qf;
    double t0 = spar_comm_wtime();
    for (int i = 0, j = 0; i < s->count; i++) {
        spar__cache *cache = &s->caches[i];
        int64_t rows = cache->len;
        if (spar__holds(sp, w->a, spar__token_position(w->r, s->ids[i], step))) {
            SPAR_TRY(spar__cache_put(cache, layer, rows, kv + j * 2 * kf, kv + j * 2 * kf + kf));
            rows++, j++;
        }
        float *l = sp->by_heads ? s->lse : lse + (int64_t)i * sp->heads_per;
        SPAR_TRY(spar__attend_one(w->m->kernels, &dims, cache, layer, rows, s->buf + i * qf,
                                  o + i * qf, l));
        w->out->kv_bytes_read += (double)rows * (double)cache->row * 2.0 * sizeof(float);
    }
    w->out->attend_seconds += spar_comm_wtime() - t0;
    SPAR_TRY(spar_comm_sendrecv_start(w->comm, m % 4, s->reply,
                                      sizeof(float) * (size_t)(s->count * spar__reply_floats(sp)),
                                      c, NULL, 0, -1, &op));
    return spar_comm_op_wait(w->comm, &op);
}

/* The headers of every (compute rank, micro-batch) at a stage, each checked. */
static int headers(server *w, int step) {
    for (int c = 0; c < w->sp.compute; c++)
        for (int m = 0; m < w->M[c]; m++) {
            spar__header h;
            SPAR_TRY(spar__header_recv(w->comm, c, w->r->count, &h));
            int rc = check_header(w, &h, c, m, step);
            if (rc == 0 && step == 0) rc = admit(w, c, m, &h);
            spar__header_free(&h);
            SPAR_TRY(rc);
        }
    return SPAR_OK;
}

static int serve(server *w) {
    const spar_requests *r = w->r;
    SPAR_TRY(headers(w, 0));
    for (int c = 0; c < w->sp.compute; c++)
        for (int m = 0; m < w->M[c]; m++)
            SPAR_TRY(receive_prompts(w, c, m));
    double t0 = spar_comm_wtime();
    uint64_t bytes0 = spar_comm_bytes_sent(w->comm);
    /* test hooks: stall:STEP stops the first attention rank (alive but silent, as if
     * hung), die:STEP kills it (as a crashed node would be) */
    const char *fault = getenv("SPAR_TEST_FAULT");
    int stall = fault && strncmp(fault, "stall:", 6) == 0 ? atoi(fault + 6) : -1;
    int die = fault && strncmp(fault, "die:", 4) == 0 ? atoi(fault + 4) : -1;
    for (int step = 1; step < r->generate; step++) {
        if (step == stall && w->a == 0) raise(SIGSTOP);
        if (step == die && w->a == 0) raise(SIGKILL);
        SPAR_TRY(headers(w, step));
        for (int l = 0; l < w->m->dims.layers; l++)
            for (int c = 0; c < w->sp.compute; c++)
                for (int m = 0; m < w->M[c]; m++)
                    SPAR_TRY(serve_layer(w, c, m, l, step));
        for (int c = 0; c < w->sp.compute; c++) /* the step's token is now held */
            for (int m = 0; m < w->M[c]; m++)
                for (int i = 0; i < w->mb[c][m].count; i++)
                    w->mb[c][m].caches[i].len += spar__holds(
                        &w->sp, w->a, spar__token_position(r, w->mb[c][m].ids[i], step));
    }
    w->out->decode_seconds = spar_comm_wtime() - t0;
    w->out->decode_bytes = spar_comm_bytes_sent(w->comm) - bytes0;
    for (int c = 0; c < w->sp.compute; c++) { /* each compute rank's stop */
        spar__header h;
        SPAR_TRY(spar__header_recv(w->comm, c, r->count, &h));
        bool ok = h.stop && h.compute_rank == c && h.step == r->generate;
        spar__header_free(&h);
        if (!ok)
            return spar_errorf(SPAR_EFORMAT,
                               "offload: attention rank %d expected the end of "
                               "compute rank %d's session",
                               w->sp.compute + w->a, c);
    }
    for (int c = 0; c < w->sp.compute; c++)
        for (int m = 0; m < w->M[c]; m++)
            for (int i = 0; i < w->mb[c][m].count; i++)
                w->out->kv_bytes_held += 2.0 * (double)w->mb[c][m].caches[i].len *
                                         (double)w->mb[c][m].caches[i].row *
                                         (double)w->m->dims.layers * sizeof(float);
    /* the yardstick: a triad over as many bytes as the cache, so both read from the same
     * level of the memory hierarchy */
    int64_t floats = (int64_t)(w->out->kv_bytes_held / 12.0);
    w->out->triad_gbs = spar_kernels_triad_gbs(floats > (1 << 20) ? floats : (1 << 20), 0.2);
    return SPAR_OK;
}

int spar__offload_serve(spar_comm *comm, const spar_model *m, const spar_requests *r,
                        const spar__split *sp, int micro_batches, spar_generation *out) {
    server w = {.comm = comm,
                .m = m,
                .r = r,
                .sp = *sp,
                .out = out,
                .a = spar_comm_rank(comm) - sp->compute};
    w.M = calloc((size_t)sp->compute, sizeof(int));
    w.mb = calloc((size_t)sp->compute, sizeof(served *));
    int rc = w.M && w.mb ? SPAR_OK : SPAR_ENOMEM;
    for (int c = 0; c < sp->compute && rc == 0; c++) { /* as the compute rank counts them */
        int owned = spar__owned(r->count, sp->compute, c);
        w.M[c] = micro_batches < owned ? micro_batches : (owned > 0 ? owned : 1);
        if (!(w.mb[c] = calloc((size_t)w.M[c], sizeof(served)))) rc = SPAR_ENOMEM;
    }
    if (rc == 0) rc = serve(&w);
    for (int c = 0; w.mb && c < sp->compute; c++)
        for (int mi = 0; w.mb[c] && mi < w.M[c]; mi++) {
            served *s = &w.mb[c][mi];
            for (int i = 0; s->caches && i < s->count; i++)
                spar__cache_free(&s->caches[i]);
            free(s->ids), free(s->caches), free(s->buf), free(s->reply), free(s->lse);
        }
    for (int c = 0; w.mb && c < sp->compute; c++)
        free(w.mb[c]);
    free(w.M), free(w.mb);
    return rc;
}
