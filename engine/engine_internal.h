/* engine_internal.h: what the engine's files share and nobody else sees.
 *
 * The block scheduler: a rank's chunk of tokens is cut into "groups", runs of tokens
 * whose positions form an interval (1 for contiguous, 2 for zigzag, the whole chunk for
 * stripe). For causal attention each (query group, key group) pair is skipped when every
 * key lies after every query, run unmasked when every key lies before, and masked
 * otherwise. With zigzag this is exactly DESIGN.md 3.2's schedule: from a lower source
 * rank both query halves meet the first key half, from a higher one the second query
 * half meets all keys; forward and backward alike.
 *
 * Defines: spar__group, spar__chunk, spar__pass and their functions.
 */
#ifndef SPAR_ENGINE_INTERNAL_H
#define SPAR_ENGINE_INTERNAL_H

#include "spar.h"

#define SPAR__DEFAULT_QUERY_BLOCK 256
#define SPAR__MAX_PENDING 4

typedef struct spar__group {
    int64_t local_start, len, pos_min, pos_max;
} spar__group;

/* A chunk of tokens held by one rank: its positions and position-interval groups. */
typedef struct spar__chunk {
    int64_t len;
    int64_t *pos; /* [len] global positions */
    spar__group groups[2];
    int ngroups;
} spar__chunk;

/* Fills c for rank `rank` of part; c->pos is allocated once (for max_len tokens) and
 * reused by later calls. Free with spar__chunk_free. */
int spar__chunk_init(spar__chunk *c, const spar_partition *part, int rank, int64_t max_len);
void spar__chunk_free(spar__chunk *c);

/* One pass (forward or backward) of the local queries against blocks of keys. */
typedef struct spar__pass {
    const spar_attn_problem *prob;
    spar_attn_dims dims; /* the heads of this pass (a subset for head-group pipelines) */
    bool backward;
    spar_qblock q;                             /* the whole local query chunk */
    const spar__chunk *qc;                     /* its positions and groups */
    spar_comm *comm;                           /* for progress on pending operations; may be NULL */
    spar_comm_op **pending[SPAR__MAX_PENDING]; /* operations to test between kernel calls */
    /* Called once, between kernel calls, when *pending[0] is seen complete (a device ring
     * starts uploading the block that arrived); the owner re-arms it (arrived_seen = 0). */
    int (*arrived)(void *ctx);
    void *arrived_ctx;
    bool arrived_seen;
    double compute_seconds;
} spar__pass;

/* A pass over the local chunk qc with the dense tensors of io (all heads); delta may be
 * NULL forward. */
void spar__pass_init(spar__pass *pass, const spar_attn_problem *prob, const spar_attn_io *io,
                     const spar__chunk *qc, bool backward, const float *delta);

/* Every (query group, key group) pair of the local chunk against chunk kc, whose
 * tensors kv describes from its first token (positions: kv->pos, or kc->pos when NULL;
 * the queries' are pass->q.pos). */
int spar__pass_chunk(spar__pass *pass, const spar__chunk *kc, const spar_kvblock *kv);

/* Wall-clock seconds (monotonic). */
double spar__now(void);

/* A finished pass's figures: time since t_start, kernel time, flops of `rank`'s queries,
 * bytes sent since the comm counter read bytes0 (comm may be NULL: none). */
void spar__metrics_finish(spar_metrics *m, const spar__pass *pass, spar_comm *comm, int rank,
                          double t_start, uint64_t bytes0, int steps);

/* Waits for op, adding the time blocked to m->wait_seconds. Gives up after the
 * communicator's timeout (comm.timeout) with an error naming the peer and `what` was
 * awaited ("the K/V block of the next ring step"). */
int spar__wait_timed(spar_comm *comm, spar_comm_op **op, const char *what, spar_metrics *m);

/* The passes of each method (ring_attn.c, allgather_attn.c, local_attn.c). */
int spar__ring_forward(spar_comm *comm, const spar_attn_problem *prob, const spar_attn_io *io,
                       spar_metrics *m);
int spar__ring_backward(spar_comm *comm, const spar_attn_problem *prob, const spar_attn_io *io,
                        spar_metrics *m);
/* The same with the tensors in the kernel backend's device memory (ring_device.c). */
int spar__ring_forward_device(spar_comm *comm, const spar_attn_problem *prob,
                              const spar_attn_io *io, spar_metrics *m);
int spar__ring_backward_device(spar_comm *comm, const spar_attn_problem *prob,
                               const spar_attn_io *io, spar_metrics *m);
int spar__allgather_forward(spar_comm *comm, const spar_attn_problem *prob, const spar_attn_io *io,
                            spar_metrics *m);
int spar__allgather_backward(spar_comm *comm, const spar_attn_problem *prob, const spar_attn_io *io,
                             spar_metrics *m);
int spar__lasp2_forward(spar_comm *comm, const spar_attn_problem *prob, const spar_attn_io *io,
                        spar_metrics *m);
int spar__lasp2_backward(spar_comm *comm, const spar_attn_problem *prob, const spar_attn_io *io,
                         spar_metrics *m);
int spar__lasp1_forward(spar_comm *comm, const spar_attn_problem *prob, const spar_attn_io *io,
                        spar_metrics *m);
int spar__lasp1_backward(spar_comm *comm, const spar_attn_problem *prob, const spar_attn_io *io,
                         spar_metrics *m);
/* The whole sequence on one rank, linear attention (linear_attn.c). */
int spar__linear_local(const spar_attn_problem *prob, const spar_attn_io *io, bool backward);
int spar__local_forward(spar_comm *comm, const spar_attn_problem *prob, const spar_attn_io *io,
                        spar_metrics *m);
int spar__local_backward(spar_comm *comm, const spar_attn_problem *prob, const spar_attn_io *io,
                         spar_metrics *m);

#endif
