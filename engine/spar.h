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
 * Defines: spar_softmax_problem, spar_attn_io, spar_metrics, spar_method,
 *          spar_method_find, spar_attn_flops.
 * Leaves out: linear attention and offloaded decode (later issues).
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

typedef struct spar_softmax_problem {
    spar_attn_dims dims;
    bool causal;
    const spar_partition *part;  /* the split of the sequence over the ranks */
    const spar_kernels *kernels; /* backend from spar_kernels_select */
    int64_t query_block;         /* queries per kernel call; between calls pending transfers
                                    make progress (0 = a default) */
    int head_groups;             /* allgather: kv-head groups pipelined (0 = auto) */
    spar_progress_fn progress;   /* may be NULL */
    void *progress_ctx;
} spar_softmax_problem;

/* A rank's tensors, its local tokens in local order (dense, token-major):
 *   q, o, dout, dq: [n_local, H, d]   k, v, dk, dv: [n_local, G, d]   lse: [n_local, H]
 * Forward reads q, k, v and writes o, lse. Backward reads q, k, v, o, lse, dout and
 * writes dq, dk, dv (fp32). */
typedef struct spar_attn_io {
    const float *q, *k, *v;
    float *o, *lse;
    const float *dout;
    float *dq, *dk, *dv;
} spar_attn_io;

typedef struct spar_metrics {
    double seconds;         /* wall time of the pass on this rank */
    double compute_seconds; /* time inside kernels */
    double wait_seconds;    /* time blocked on transfers after computing */
    double flops;           /* this rank's useful floating-point operations */
    uint64_t bytes_sent;    /* bytes this rank sent in the pass (see spar_comm_bytes_sent) */
    int steps;              /* ring steps or head groups */
} spar_metrics;

typedef int (*spar_pass_fn)(spar_comm *comm, const spar_softmax_problem *prob,
                            const spar_attn_io *io, spar_metrics *metrics);

/* A sequence-parallel method: its forward and backward passes. Both are collective over
 * comm, except for a method with whole_sequence set, which runs on the calling rank
 * alone (comm may be NULL) with prob->part describing one rank. */
typedef struct spar_method {
    const char *name;
    spar_pass_fn forward, backward;
    bool whole_sequence;
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
 * "local": the whole sequence on the calling rank, the reference path.
 * Returns NULL for another name. */
const spar_method *spar_method_find(const char *name);

/* Useful flops of a pass for the queries of `rank`: 4 d per visible (query, key, head)
 * forward, 10 d backward. */
double spar_attn_flops(const spar_softmax_problem *prob, int rank, bool backward);

#endif
