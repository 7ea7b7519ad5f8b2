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
 * Leaves out: offloaded decode (a later issue).
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
    spar_progress_fn progress;   /* may be NULL */
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

#endif
