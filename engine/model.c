/* model.c: a decoder's dense layers, its KV cache and its attention for one token,
 * shared by local and offloaded generation (spar.h).
 *
 * Rows are tokens: x [n, D]. The dense work of a layer is split at attention:
 * pre_attention makes q, k, v (RoPE applied) from x, post_attention adds the attention
 * output's projection and the SwiGLU MLP to x. What sits between (the attention) is
 * what offloading moves to other ranks.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"

int spar__rows_alloc(spar__rows *s, const spar_model_dims *md, int64_t n) {
    int64_t hd = (int64_t)md->heads * md->head_dim, gd = (int64_t)md->kv_heads * md->head_dim;
    int64_t big = md->ffn > md->vocab ? md->ffn : md->vocab;
    *s = (spar__rows){.n = n};
    s->x = calloc((size_t)(n * md->hidden), sizeof(float));
    s->h = calloc((size_t)(n * md->hidden), sizeof(float));
    s->q = calloc((size_t)(n * hd), sizeof(float));
    s->k = calloc((size_t)(n * gd), sizeof(float));
    s->v = calloc((size_t)(n * gd), sizeof(float));
    s->o = calloc((size_t)(n * hd), sizeof(float));
    s->lse = calloc((size_t)(n * md->heads), sizeof(float));
    s->gate = calloc((size_t)(n * big), sizeof(float));
    s->up = calloc((size_t)(n * md->ffn), sizeof(float));
    s->pos = calloc((size_t)n, sizeof(int64_t));
    if (!s->x || !s->h || !s->q || !s->k || !s->v || !s->o || !s->lse || !s->gate || !s->up ||
        !s->pos) {
        spar__rows_free(s);
        return SPAR_ENOMEM;
    }
    return SPAR_OK;
}

void spar__rows_free(spar__rows *s) {
    free(s->x), free(s->h), free(s->q), free(s->k), free(s->v), free(s->o), free(s->lse);
    free(s->gate), free(s->up), free(s->pos);
    *s = (spar__rows){0};
}

void spar__embed(const spar_model *m, int64_t n, const int32_t *tokens, float *x) {
    int d = m->dims.hidden;
    for (int64_t i = 0; i < n; i++)
        memcpy(x + i * d, m->embed + (int64_t)tokens[i] * d, sizeof(float) * (size_t)d);
}

void spar__pre_attention(const spar_model *m, int layer, spar__rows *s) {
    const spar_model_dims *md = &m->dims;
    const spar_layer_weights *w = &m->layer[layer];
    int hd = md->heads * md->head_dim, gd = md->kv_heads * md->head_dim;
    spar_rmsnorm(s->n, md->hidden, s->x, w->attn_norm, md->norm_eps, s->h);
    spar_matmul(s->n, hd, md->hidden, s->h, w->wq, s->q, false);
    spar_matmul(s->n, gd, md->hidden, s->h, w->wk, s->k, false);
    spar_matmul(s->n, gd, md->hidden, s->h, w->wv, s->v, false);
    spar_rope(s->n, md->heads, md->head_dim, s->pos, md->rope_base, s->q);
    spar_rope(s->n, md->kv_heads, md->head_dim, s->pos, md->rope_base, s->k);
}

void spar__post_attention(const spar_model *m, int layer, spar__rows *s) {
    const spar_model_dims *md = &m->dims;
    const spar_layer_weights *w = &m->layer[layer];
    spar_matmul(s->n, md->hidden, md->heads * md->head_dim, s->o, w->wo, s->x, true);
    spar_rmsnorm(s->n, md->hidden, s->x, w->ffn_norm, md->norm_eps, s->h);
    spar_matmul(s->n, md->ffn, md->hidden, s->h, w->w_gate, s->gate, false);
    spar_matmul(s->n, md->ffn, md->hidden, s->h, w->w_up, s->up, false);
    spar_swiglu(s->n * md->ffn, s->gate, s->up, s->gate);
    spar_matmul(s->n, md->hidden, md->ffn, s->gate, w->w_down, s->x, true);
}

void spar__logits(const spar_model *m, spar__rows *s, float *logits) {
    spar_rmsnorm(s->n, m->dims.hidden, s->x, m->final_norm, m->dims.norm_eps, s->h);
    spar_matmul(s->n, m->dims.vocab, m->dims.hidden, s->h, m->lm_head, logits, false);
}

/* ---- the KV cache of one request on one holder ---------------------------------------- */

int spar__cache_alloc(spar__cache *c, int layers, int64_t cap, int kv_heads, int head_dim) {
    *c = (spar__cache){.layers = layers, .cap = cap, .row = (int64_t)kv_heads * head_dim};
    size_t floats = (size_t)(layers * cap * c->row);
    c->k = malloc(sizeof(float) * (floats ? floats : 1));
    c->v = malloc(sizeof(float) * (floats ? floats : 1));
    if (!c->k || !c->v) {
        spar__cache_free(c);
        return SPAR_ENOMEM;
    }
    return SPAR_OK;
}

void spar__cache_free(spar__cache *c) {
    free(c->k), free(c->v);
    *c = (spar__cache){0};
}

int spar__cache_put(spar__cache *c, int layer, int64_t index, const float *k, const float *v) {
    if (index < 0 || index >= c->cap)
        return spar_errorf(SPAR_EINVAL, "KV cache row %lld outside its capacity %lld",
                           (long long)index, (long long)c->cap);
    size_t at = (size_t)((layer * c->cap + index) * c->row);
    memcpy(c->k + at, k, sizeof(float) * (size_t)c->row);
    memcpy(c->v + at, v, sizeof(float) * (size_t)c->row);
    return SPAR_OK;
}

int spar__attend_one(const spar_kernels *kern, const spar_attn_dims *dims, const spar__cache *c,
                     int layer, int64_t rows, const float *q, float *o, float *lse) {
    (void)kern; /* one kernel for every backend: decode is bound by reading the cache */
    size_t at = (size_t)(layer * c->cap * c->row);
    return spar_decode_attention(dims, rows, c->k + at, c->v + at, c->row, q, o, lse);
}

/* Causal attention of a whole prompt over itself (n rows, positions 0..n-1). */
int spar__attend_prompt(const spar_model *m, spar__rows *s) {
    const spar_model_dims *md = &m->dims;
    spar_attn_dims dims = spar__model_attn_dims(md, md->heads, md->kv_heads);
    spar_softmax_init_partial(s->n, md->heads, md->head_dim, s->o, s->lse);
    spar_qblock qb = {.n = s->n,
                      .pos = s->pos,
                      .stride_q = (int64_t)md->heads * md->head_dim,
                      .stride_lse = md->heads,
                      .q = s->q,
                      .o = s->o,
                      .lse = s->lse};
    spar_kvblock kb = {.n = s->n,
                       .pos = s->pos,
                       .stride_kv = (int64_t)md->kv_heads * md->head_dim,
                       .k = s->k,
                       .v = s->v};
    return m->kernels->softmax_fwd_block(&dims, true, &qb, &kb);
}

spar_attn_dims spar__model_attn_dims(const spar_model_dims *md, int heads, int kv_heads) {
    return (spar_attn_dims){heads, kv_heads, md->head_dim,
                            (float)(1.0 / sqrt((double)md->head_dim))};
}
