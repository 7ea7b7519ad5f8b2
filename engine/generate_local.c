/* generate_local.c: greedy generation of a batch on one process, the reference that
 * offloaded generation is checked against.
 *
 * Prefill: each prompt through every layer at once (causal attention over itself), its
 * K/V kept in the request's cache; the last row's logits give the first token. Decode:
 * one row per request, all requests together through the dense layers, each attending
 * over its own cache.
 */
#include <stdlib.h>
#include <string.h>

#include "model.h"

static double now(void) {
    return spar_comm_wtime();
}

/* The prompt of request b through the model; its cache filled, first token chosen. */
static int prefill(const spar_model *m, const spar_requests *r, int b, spar__cache *c,
                   float *logits, int32_t *first) {
    int64_t n = r->prompt_len[b];
    spar__rows s;
    float *all_logits = malloc(sizeof(float) * (size_t)m->dims.vocab * (size_t)n);
    int rc = all_logits ? spar__rows_alloc(&s, &m->dims, n) : SPAR_ENOMEM;
    if (rc != 0) {
        free(all_logits);
        return rc;
    }
    for (int64_t i = 0; i < n; i++)
        s.pos[i] = i;
    spar__embed(m, n, r->prompt[b], s.x);
    for (int l = 0; rc == 0 && l < m->dims.layers; l++) {
        spar__pre_attention(m, l, &s);
        for (int64_t i = 0; i < n && rc == 0; i++)
            rc = spar__cache_put(c, l, i, s.k + i * c->row, s.v + i * c->row);
        if (rc == 0) rc = spar__attend_prompt(m, &s);
        if (rc == 0) spar__post_attention(m, l, &s);
    }
    c->len = n;
    if (rc == 0) {
        spar__logits(m, &s, all_logits);
        memcpy(logits, all_logits + (n - 1) * m->dims.vocab, sizeof(float) * (size_t)m->dims.vocab);
        *first = (int32_t)spar_argmax(m->dims.vocab, logits);
    }
    spar__rows_free(&s);
    free(all_logits);
    return rc;
}

/* One decode step of every request: s holds one row per request at its position. */
static int decode_step(const spar_model *m, const spar_requests *r, spar__cache *caches,
                       spar__rows *s) {
    const spar_model_dims *md = &m->dims;
    spar_attn_dims dims = spar__model_attn_dims(md, md->heads, md->kv_heads);
    int64_t hd = (int64_t)md->heads * md->head_dim;
    for (int l = 0; l < md->layers; l++) {
        spar__pre_attention(m, l, s);
        for (int b = 0; b < r->count; b++) {
            spar__cache *c = &caches[b];
            SPAR_TRY(spar__cache_put(c, l, c->len, s->k + b * c->row, s->v + b * c->row));
            SPAR_TRY(spar__attend_one(m->kernels, &dims, c, l, c->len + 1, s->q + b * hd,
                                      s->o + b * hd, s->lse + (int64_t)b * md->heads));
        }
        spar__post_attention(m, l, s);
    }
    for (int b = 0; b < r->count; b++)
        caches[b].len++;
    return SPAR_OK;
}

int spar_generate_local(const spar_model *m, const spar_requests *r, spar_generation *out) {
    const spar_model_dims *md = &m->dims;
    int B = r->count, V = md->vocab, G = r->generate, rc = SPAR_OK;
    spar__cache *caches = calloc((size_t)B, sizeof *caches);
    int32_t *next = malloc(sizeof(int32_t) * (size_t)B);
    float *logits = malloc(sizeof(float) * (size_t)B * (size_t)V);
    spar__rows s = {0};
    if (!caches || !next || !logits || spar__rows_alloc(&s, md, B) != 0) rc = SPAR_ENOMEM;
    double t0 = now();
    for (int b = 0; b < B && rc == 0; b++) {
        rc = spar__cache_alloc(&caches[b], md->layers, r->prompt_len[b] + G, md->kv_heads,
                               md->head_dim);
        if (rc == 0) rc = prefill(m, r, b, &caches[b], logits + (int64_t)b * V, &next[b]);
        if (rc == 0) out->tokens[(int64_t)b * G] = next[b];
    }
    out->prefill_seconds = now() - t0;
    double t1 = now();
    for (int step = 1; step < G && rc == 0; step++) {
        double ts = now();
        for (int b = 0; b < B; b++)
            s.pos[b] = r->prompt_len[b] + step - 1;
        spar__embed(m, B, next, s.x);
        rc = decode_step(m, r, caches, &s);
        if (rc != 0) break;
        spar__logits(m, &s, logits);
        for (int b = 0; b < B; b++) {
            next[b] = (int32_t)spar_argmax(V, logits + (int64_t)b * V);
            out->tokens[(int64_t)b * G + step] = next[b];
        }
        if (out->step_seconds) out->step_seconds[step - 1] = now() - ts;
    }
    out->decode_seconds = now() - t1;
    if (rc == 0 && out->logits) memcpy(out->logits, logits, sizeof(float) * (size_t)B * (size_t)V);
    for (int b = 0; caches && b < B; b++)
        spar__cache_free(&caches[b]);
    spar__rows_free(&s);
    free(caches), free(next), free(logits);
    return rc;
}
