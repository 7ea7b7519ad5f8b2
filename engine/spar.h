/* spar.h: the public library API, the sequence-parallel attention algorithms.
 *
 * The engine composes kernels (local math), comm (the network) and partition (who owns
 * which tokens). Every function is collective over the communicator unless it says
 * otherwise, and returns 0 or a negative SPAR_E* status (spar_strerror names it).
 *
 * Tensors are a rank's local tokens in local order (increasing global position, see
 * partition.h), token-major float32:
 *   q, o: [n_local, heads, head_dim]   k, v: [n_local, kv_heads, head_dim]
 *   lse: [n_local, heads], natural log of sum_j exp(scale * q_i . k_j) over visible keys.
 *
 * Defines: spar_softmax_problem, spar_metrics, spar_ring_attn_forward,
 *          spar_local_attn_forward, spar_attn_forward_flops.
 * Leaves out: backward passes, all-gather and linear attention (later issues).
 */
#ifndef SPAR_H
#define SPAR_H

#include <stdbool.h>
#include <stdint.h>

#include "comm.h"
#include "kernels.h"
#include "partition.h"
#include "spar_status.h"

/* Called on rank 0 after each unit of work (a ring step, a block of queries). */
typedef void (*spar_progress_fn)(void *ctx, const char *phase, int64_t done, int64_t total);

typedef struct spar_softmax_problem {
    spar_attn_dims dims;
    bool causal;
    const spar_partition *part;  /* the split of the sequence over the ranks */
    const spar_kernels *kernels; /* backend from spar_kernels_select */
    int64_t query_block;         /* queries per kernel call; between calls the ring
                                    makes progress (0 = a default) */
    spar_progress_fn progress;   /* may be NULL */
    void *progress_ctx;
} spar_softmax_problem;

typedef struct spar_metrics {
    double seconds;         /* wall time of the call on this rank */
    double compute_seconds; /* time inside kernels */
    double wait_seconds;    /* time blocked on the ring after computing */
    double flops;           /* this rank's useful floating-point operations */
    uint64_t ring_bytes;    /* bytes this rank sent around the ring */
    int steps;              /* ring steps (P) */
} spar_metrics;

/* Ring attention forward (DESIGN.md 3.2): P steps; at each, this rank's queries meet
 * the K/V block it holds while the next block travels from rank-1 to rank+1. With
 * causal attention, sub-blocks that are wholly masked are skipped and wholly visible
 * ones run unmasked, which with the zigzag partition gives every rank the same work.
 * Per rank sends 2 (P-1) C G d 4 bytes (C = the blocks it forwards). */
int spar_ring_attn_forward(spar_comm *comm, const spar_softmax_problem *prob, const float *q,
                           const float *k, const float *v, float *o, float *lse,
                           spar_metrics *metrics);

/* The whole sequence on the calling rank alone (not collective): the reference path.
 * prob->part must describe one rank (ranks == 1). */
int spar_local_attn_forward(const spar_softmax_problem *prob, const float *q, const float *k,
                            const float *v, float *o, float *lse, spar_metrics *metrics);

/* Useful flops of softmax attention forward for rank `rank` of part: 4 d per visible
 * (query, key, head) triple (two matrix products). */
double spar_attn_forward_flops(const spar_partition *part, int rank, const spar_attn_dims *dims,
                               bool causal);

#endif
