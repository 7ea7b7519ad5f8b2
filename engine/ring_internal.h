/* ring_internal.h: what the ring's two files share (ring_attn.c: tensors in host memory;
 * ring_device.c: tensors in the kernel backend's device memory). The blocks that travel
 * are in host memory in both: comm moves host buffers (pinned ones for a device).
 *
 * Defines: ring, grad_bufs, CHANNEL_KV, CHANNEL_GRAD and the spar__ring_* helpers.
 */
#ifndef SPAR_RING_INTERNAL_H
#define SPAR_RING_INTERNAL_H

#include "engine_internal.h"

enum { CHANNEL_KV = 0, CHANNEL_GRAD = 1 };

typedef struct ring {
    spar_comm *comm;
    const spar_attn_problem *prob;
    int rank, size;
    int64_t max_len;
    size_t row; /* elements per token of one of K, V, dK, dV: G d */
    spar__chunk qc, held;
} ring;

/* Backward buffers: K/V in flight, this step's gradient partial and the one still being
 * sent, and the accumulator arriving from rank-1 (delta: host runs only). */
typedef struct grad_bufs {
    float *kv[2], *part[2], *acc_in, *delta;
} grad_bufs;

int spar__ring_init(ring *rg, spar_comm *comm, const spar_attn_problem *prob);
void spar__ring_free(ring *rg);
/* Bytes per element of the K/V blocks that travel: 4, or 2 with prob->bf16. */
static inline size_t spar__ring_kv_elem(const ring *rg) {
    return rg->prob->bf16 ? 2 : sizeof(float);
}

/* Source rank of the block held at `step`, and a rank's [K | V] (or [dK | dV]) size in
 * bytes as fp32; the exchange of K/V blocks scales it by spar__ring_kv_elem. */
int spar__ring_source(const ring *rg, int step);
size_t spar__ring_block_bytes(const ring *rg, int src);
/* Posts the exchange that brings the block of the next step (none after the last). */
int spar__ring_start_next_kv(ring *rg, int step, float *held, float *next, spar_comm_op **op);
/* The local [K | V] block, packed the way it travels. */
void spar__ring_pack_local(const ring *rg, const spar_attn_io *io, float *dst);
/* After computing step `step` into part (host): fold in what earlier ranks added to this
 * block, then pass the sum on (to the block's owner after the last step). */
int spar__ring_forward_gradients(ring *rg, int step, float *part, grad_bufs *b, spar_comm_op **op,
                                 spar_metrics *m);

#endif
