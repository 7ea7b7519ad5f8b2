/* model.h: the decoder pieces shared by local and offloaded generation (internal to the
 * engine room; the public API is spar.h).
 *
 * Defines: spar__rows (a batch of token rows and their scratch), the dense halves of a
 *          layer, spar__cache (one request's K/V on one holder) and attention of one
 *          query token over a cache.
 */
#ifndef SPAR_MODEL_H
#define SPAR_MODEL_H

#include "spar.h"

/* n token rows going through the model: x [n, D] the residual stream, pos [n] their
 * positions, q [n, H d], k, v [n, G d], o [n, H d], lse [n, H]; h, gate, up scratch. */
typedef struct spar__rows {
    int64_t n;
    float *x, *h, *q, *k, *v, *o, *lse, *gate, *up;
    int64_t *pos;
} spar__rows;

int spar__rows_alloc(spar__rows *s, const spar_model_dims *md, int64_t n);
void spar__rows_free(spar__rows *s);

void spar__embed(const spar_model *m, int64_t n, const int32_t *tokens, float *x);
/* h = rmsnorm(x); q, k, v = h Wq, Wk, Wv; RoPE at s->pos on q and k. */
void spar__pre_attention(const spar_model *m, int layer, spar__rows *s);
/* x += o Wo; x += Wdown (silu(h Wgate) * (h Wup)), h = rmsnorm(x). */
void spar__post_attention(const spar_model *m, int layer, spar__rows *s);
/* logits [n, V] of the rows. */
void spar__logits(const spar_model *m, spar__rows *s, float *logits);

/* Causal attention of s's rows over themselves (a prompt): o, lse. */
int spar__attend_prompt(const spar_model *m, spar__rows *s);

/* One request's K/V rows on one holder: [layers, cap, row] with row = held kv heads x d. */
typedef struct spar__cache {
    int layers;
    int64_t cap, row, len; /* len: rows held (the same in every layer) */
    float *k, *v;
} spar__cache;

int spar__cache_alloc(spar__cache *c, int layers, int64_t cap, int kv_heads, int head_dim);
void spar__cache_free(spar__cache *c);
/* Row `index` of `layer` (checked against the capacity). */
int spar__cache_put(spar__cache *c, int layer, int64_t index, const float *k, const float *v);
/* One query token q [heads, d] over rows 0..rows-1 of the cache's layer: o [heads, d],
 * lse [heads]; with no rows the empty partial (o = 0, lse = -inf). */
int spar__attend_one(const spar_kernels *kern, const spar_attn_dims *dims, const spar__cache *c,
                     int layer, int64_t rows, const float *q, float *o, float *lse);

spar_attn_dims spar__model_attn_dims(const spar_model_dims *md, int heads, int kv_heads);

#endif
