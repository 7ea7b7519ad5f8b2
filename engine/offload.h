/* offload.h: what both sides of offloaded decode agree on (internal to the engine room).
 *
 * Ranks 0..C-1 compute, ranks C..C+K-1 hold the KV cache. Compute rank c owns requests
 * c, c + C, ...; its requests are cut into M contiguous micro-batches. The cache is split
 * by kv-head groups when K divides G (attention rank a holds kv heads [a G/K, (a+1) G/K)
 * and serves query heads [a H/K, (a+1) H/K)), otherwise by positions: position p of every
 * request lives on attention rank p mod K, which returns a partial (o, lse) over its
 * positions for all heads, merged exactly on the compute side.
 *
 * Messages from compute rank c to attention rank a, in this order:
 *   admission: per micro-batch a StepHeader (step 0, positions = prompt lengths); then per
 *     request of each micro-batch in order, per layer, PREFILL: k rows then v rows of the
 *     prompt, the holder's share;
 *   decode step s = 1..generate-1: per micro-batch a StepHeader (positions of the tokens);
 *     then per layer, per micro-batch, QKV on channel m mod 4 and the reply on the same;
 *   end: one StepHeader with stop.
 * An attention rank serves compute ranks in rank order at each of these stages.
 */
#ifndef SPAR_OFFLOAD_H
#define SPAR_OFFLOAD_H

#include "model.h"

enum {
    SPAR__TAG_HEADER = 7200,
    SPAR__TAG_PREFILL = 7201,
    SPAR__TAG_PREFILL_LOGITS = 7202, /* shared prefill: last position's logits to the owner */
    SPAR__OFFLOAD_VERSION = 1
};

typedef struct spar__split {
    int compute, K;        /* compute ranks C, attention ranks K */
    bool by_heads;         /* K divides G */
    int heads_per, kv_per; /* by heads: query and kv heads per attention rank */
    const spar_model_dims *md;
} spar__split;

spar__split spar__split_of(const spar_model_dims *md, int world, int attention_ranks);

/* Requests of compute rank c, micro-batch m: first index into the rank's list, count. */
void spar__micro_batch(int owned, int micro_batches, int m, int *first, int *count);
/* Requests compute rank c owns. */
int spar__owned(int requests, int compute, int c);

/* Rows of a prompt of length len that attention rank a holds. */
int64_t spar__prompt_rows(const spar__split *sp, int a, int64_t len);
/* Floats of one token's row of q, k (or v) and reply that go to / come from rank a. */
int64_t spar__q_floats(const spar__split *sp);
int64_t spar__kv_floats(const spar__split *sp);
int64_t spar__reply_floats(const spar__split *sp); /* o (and lse by positions) */
/* The position of the token request `id` processes at decode step `step` (>= 1). */
static inline int64_t spar__token_position(const spar_requests *r, int id, int step) {
    return (int64_t)r->prompt_len[id] + step - 1;
}

/* Does attention rank a hold position p? */
bool spar__holds(const spar__split *sp, int a, int64_t p);

typedef struct spar__header {
    int step, micro_batch, compute_rank, count;
    bool stop;
    int32_t *ids;       /* [count] */
    int64_t *positions; /* [count] */
} spar__header;

/* Sends h to rank dest (counting its bytes in *header_bytes). */
int spar__header_send(spar_comm *comm, int dest, const spar__header *h, uint64_t *header_bytes);
/* Receives one header from src into h (ids and positions malloc'ed; free with
 * spar__header_free); SPAR_EFORMAT, with an error naming the sender, if it does not
 * parse or holds more than max_count requests; SPAR_ECOMM after the communicator's
 * timeout (comm.timeout) without one. */
int spar__header_recv(spar_comm *comm, int src, int max_count, spar__header *h);
/* The same for a message already received: len bytes from rank src. */
int spar__header_decode(const void *buf, size_t len, int src, int max_count, spar__header *h);
void spar__header_free(spar__header *h);

/* A prompt prefilled by all compute ranks (offload_prefill.c): comm is the compute ranks'
 * communicator, method a softmax method that is not whole_sequence, kind the split of
 * each prompt over them. */
typedef struct spar__prefill_plan {
    spar_comm *comm;
    const spar_method *method;
    enum spar_partition_kind kind;
} spar__prefill_plan;

/* Called on the owner with one layer's K/V of the whole prompt: k, v [len, G d] in
 * position order. */
typedef int (*spar__kv_sink)(void *ctx, int layer, const float *k, const float *v, int64_t len);

/* Collective over plan->comm: tokens [len] (len >= 2 x ranks) through the model; the
 * owner's sink gets each layer's K/V and the owner gets logits [vocab] of the last
 * position. */
int spar__prefill_shared(const spar__prefill_plan *plan, const spar_model *m,
                         const int32_t *tokens, int64_t len, int owner, spar__kv_sink sink,
                         void *sink_ctx, float *logits);

/* The attention side of spar_generate_offload. */
int spar__offload_serve(spar_comm *comm, const spar_model *m, const spar_requests *r,
                        const spar__split *sp, int micro_batches, spar_generation *out);

#endif
