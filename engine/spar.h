/* spar.h: the public library API, the sequence-parallel attention algorithms.
 *
 * The engine composes kernels (local math), comm (the network) and partition (who owns
 * which tokens). Every function is collective over the communicator unless it says
 * otherwise, and returns 0 or a negative SPAR_E* status (spar_strerror names it).
 *
 * Tensors are a rank's local tokens in local order (increasing global position, see
 * partition.h), token-major float32 (spar_attn_io); lse is the natural log of
 * sum_j exp(scale * q_i . k_j) over the keys query i sees.
 *
 * Defines: spar_attn_problem, spar_attn_io, spar_metrics, spar_method,
 *          spar_method_find, spar_attn_flops, spar_linear_states_floats,
 *          spar_linear_dims_of.
 *          Generation with a decoder (DESIGN.md 3.6): spar_model, spar_requests,
 *          spar_generation, spar_generate_local, spar_generate_offload.
 */
#ifndef SPAR_H
#define SPAR_H

#include <stdbool.h>
#include <stdint.h>

#include "comm.h"
#include "kernels.h"
#include "partition.h"
#include "spar_status.h"

/* Called on rank 0 after each unit of work (a ring step, a head group, a block of
 * queries). */
typedef void (*spar_progress_fn)(void *ctx, const char *phase, int64_t done, int64_t total);

enum spar_attn_type { SPAR_ATTN_SOFTMAX = 0, SPAR_ATTN_LINEAR = 1 };

typedef struct spar_attn_problem {
    enum spar_attn_type type;
    spar_attn_dims dims; /* linear attention ignores the scale */
    bool causal;
    const double *decay;         /* linear: [heads] lambda_h in (0, 1] */
    const spar_partition *part;  /* the split of the sequence over the ranks */
    const spar_kernels *kernels; /* backend from spar_kernels_select */
    int64_t query_block;         /* queries per kernel call; between calls pending transfers
                                    make progress (0 = a default) */
    int head_groups;             /* allgather: kv-head groups pipelined (0 = auto) */
    bool bf16; /* q, k, v, dout stored as bfloat16 for the kernels (a device's ring only) */
    spar_progress_fn progress; /* may be NULL */
    void *progress_ctx;
} spar_attn_problem;

/* A rank's tensors, its local tokens in local order (dense, token-major):
 *   q, o, dout, dq: [n_local, H, d]   k, v, dk, dv: [n_local, G, d]   lse: [n_local, H]
 * Forward reads q, k, v and writes o, lse. Backward reads q, k, v, o, lse, dout and
 * writes dq, dk, dv (fp32). */
typedef struct spar_attn_io {
    const float *q, *k, *v;
    float *o, *lse; /* lse: softmax only */
    const float *dout;
    float *dq, *dk, *dv;
    float *states; /* linear: what forward leaves for backward, spar_linear_states_floats */
} spar_attn_io;

typedef struct spar_metrics {
    double seconds;         /* wall time of the pass on this rank */
    double compute_seconds; /* time inside kernels */
    double wait_seconds;    /* time blocked on transfers after computing */
    double flops;           /* this rank's useful floating-point operations */
    uint64_t bytes_sent;    /* bytes this rank sent in the pass (see spar_comm_bytes_sent) */
    int steps;              /* ring steps or head groups */
} spar_metrics;

typedef int (*spar_pass_fn)(spar_comm *comm, const spar_attn_problem *prob, const spar_attn_io *io,
                            spar_metrics *metrics);

/* A sequence-parallel method: its forward and backward passes. Both are collective over
 * comm, except for a method with whole_sequence set, which runs on the calling rank
 * alone (comm may be NULL) with prob->part describing one rank. */
typedef struct spar_method {
    const char *name;
    spar_pass_fn forward, backward;
    bool whole_sequence;
    bool softmax, linear; /* the attention types it computes */
} spar_method;

/* "ring": Ring Self-Attention (DESIGN.md 3.2). Forward: P steps; at each, the local
 *   queries meet the K/V block held while the next block travels rank-1 -> rank+1.
 *   Backward: K/V rotate again and the fp32 dK/dV accumulators travel one step behind
 *   them, arriving at their owner after the last hop; dQ stays local.
 *   Bytes per rank, chunks of C tokens: forward 2(P-1) C G d 4; backward
 *   2(P-1) C G d 4 (K/V) + 2 P C G d 4 (dK/dV).
 * "allgather": LASP-2H / Llama-3 style (DESIGN.md 3.3). Forward: one all-gather of K/V,
 *   cut into kv-head groups so that group g+1 travels while group g computes. Backward:
 *   the gather again, dQ locally, and one reduce-scatter of fp32 dK/dV per group.
 *   Bytes per rank: forward 2(P-1) C G d 4; backward the same plus 2(N-C) G d 4.
 * "lasp2" (linear attention, DESIGN.md 3.5): each rank's d x d memory state per state head
 *   goes to every rank in one all-gather, overlapped with the chunk's own (intra) work;
 *   the decayed prefix of earlier chunks' states is summed locally. Backward: one
 *   all-gather of the state gradients. Bytes per rank per pass: (P-1) Hs d^2 4 whatever N
 *   is (Hs = spar_linear_dims.state_heads: G when every head decays alike, else H).
 * "lasp1" (linear): the serial chain: rank r waits for the state after chunks 0..r-1,
 *   adds its own and passes it on; backward runs the chain in reverse. Causal: one state
 *   (Hs d^2 4 bytes) per rank and pass; non-causal: states rotate around the ring.
 * "local": the whole sequence on the calling rank, the reference path (both types).
 * Linear attention needs the contiguous partition (every token costs the same, so there
 * is no causal imbalance to fix). Returns NULL for another name. */
const spar_method *spar_method_find(const char *name);

/* Floats of spar_attn_io.states a linear-attention method needs on each rank. */
int64_t spar_linear_states_floats(const spar_attn_problem *prob);

/* The linear-attention view of a problem (state_heads chosen from the decays). */
spar_linear_dims spar_linear_dims_of(const spar_attn_problem *prob);

/* Useful flops of a pass for the queries of `rank`. Softmax: 4 d per visible (query,
 * key, head) forward, 10 d backward. Linear: per token and head, 2 B d (the visible
 * half of the masked block products, B = 64) + 4 d^2 (state update and read) forward,
 * 6 B d + 10 d^2 backward. */
double spar_attn_flops(const spar_attn_problem *prob, int rank, bool backward);

/* ---- Generation with a decoder model (DESIGN.md 3.6) -----------------------------------
 * A Llama-style decoder: token embedding; per layer x += Wo attn(rope(q), rope(k), v) with
 * q, k, v = rmsnorm(x) Wq, Wk, Wv, then x += Wdown (silu(h Wgate) * (h Wup)) with
 * h = rmsnorm(x); logits = rmsnorm(x) lm_head. Greedy: the next token is the argmax. */
typedef struct spar_model_dims {
    int layers, hidden, heads, kv_heads, head_dim, ffn, vocab;
    double rope_base, norm_eps;
} spar_model_dims;

/* One layer's weights (row-major, x W with x a row):
 *   attn_norm, ffn_norm [D]; wq [D, H d]; wk, wv [D, G d]; wo [H d, D];
 *   w_gate, w_up [D, F]; w_down [F, D]. */
typedef struct spar_layer_weights {
    const float *attn_norm, *wq, *wk, *wv, *wo, *ffn_norm, *w_gate, *w_up, *w_down;
} spar_layer_weights;

typedef struct spar_model {
    spar_model_dims dims;
    const float *embed;              /* [V, D] */
    const float *final_norm;         /* [D] */
    const float *lm_head;            /* [D, V] */
    const spar_layer_weights *layer; /* [layers] */
    const spar_kernels *kernels;
} spar_model;

/* A batch of requests: each prompt is decoded greedily for `generate` tokens. */
typedef struct spar_requests {
    int count;
    const int32_t *prompt_len;    /* [count], >= 1 */
    const int32_t *const *prompt; /* [count][prompt_len] token ids < vocab */
    int generate;                 /* tokens to produce per request, >= 1 */
} spar_requests;

typedef struct spar_generation {
    int32_t *tokens;        /* [count, generate], filled on rank 0 */
    float *logits;          /* [count, vocab]: the logits of the last token; rank 0 */
    double prefill_seconds; /* rank 0 */
    double decode_seconds;
    double *step_seconds;  /* [generate - 1]: each decode step on rank 0 (NULL: not kept) */
    uint64_t decode_bytes; /* sent by this rank during decode (payloads and headers) */
    uint64_t header_bytes; /* of those, control messages */
    double idle_seconds;   /* compute rank: waiting for attention results during decode */
    double kv_bytes_read;  /* attention rank: cache bytes read by attention during decode */
    double kv_bytes_held;  /* attention rank: cache bytes at the end */
    double attend_seconds; /* attention rank: in decode attention (reading the cache) */
    double triad_gbs;      /* attention rank: STREAM triad on a working set like its cache */
} spar_generation;

/* The whole batch on one process (comm may be NULL): the reference for offloading. */
int spar_generate_local(const spar_model *m, const spar_requests *r, spar_generation *out);

/* Offloaded decode over every rank of comm: ranks 0..C-1 compute (weights, dense layers;
 * requests dealt round-robin), the last `attention_ranks` hold the KV cache and run only
 * attention: by kv-head groups when they divide G, otherwise by positions (p mod K) with
 * exact log-sum-exp merging on the compute side. `micro_batches` micro-batches of each
 * compute rank's requests alternate so that dense layers and attention overlap. Tokens
 * and logits end on rank 0; every rank returns the same status. */
typedef struct spar_offload {
    int attention_ranks, micro_batches;
    /* Prefill: NULL = each prompt by the compute rank that serves it; else a softmax
     * method (ring, allgather) by which all compute ranks prefill each prompt together,
     * split as prefill_partition (prompts shorter than 2 x compute ranks: by their own). */
    const spar_method *prefill;
    enum spar_partition_kind prefill_partition;
} spar_offload;
int spar_generate_offload(spar_comm *comm, const spar_model *m, const spar_requests *r,
                          const spar_offload *cfg, spar_generation *out);

/* Bytes on the wire per token per layer in offloaded decode (payloads, both ways), for
 * K attention ranks: head split (2 H + 2 G) d 4; position split (K H + 2 G + K H) d 4
 * + K H 4 (q to every rank, the new k, v to one, a partial o and lse back from each). */
double spar_offload_bytes_per_token_layer(const spar_model_dims *dims, int attention_ranks);

#endif
