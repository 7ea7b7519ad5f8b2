/* cpu_kernels.h: the CPU kernels behind the backend tables of kernels.c (internal to the
 * kernels room). Shapes and meanings are those of the spar_kernels members (kernels.h).
 *
 * Defines: the scalar softmax block kernels, the scalar (oracle) and blocked linear
 *          segment kernels.
 */
#ifndef SPAR_CPU_KERNELS_H
#define SPAR_CPU_KERNELS_H

#include "kernels.h"

int spar__softmax_fwd_block_scalar(const spar_attn_dims *dims, bool causal, const spar_qblock *qb,
                                   const spar_kvblock *kb);
int spar__softmax_bwd_block_scalar(const spar_attn_dims *dims, bool causal, const spar_qblock *qb,
                                   const spar_kvblock *kb);

/* OpenBLAS for the block products, SIMD clones for the softmax (softmax_blas.c). */
int spar__softmax_fwd_block_blas(const spar_attn_dims *dims, bool causal, const spar_qblock *qb,
                                 const spar_kvblock *kb);
int spar__softmax_bwd_block_blas(const spar_attn_dims *dims, bool causal, const spar_qblock *qb,
                                 const spar_kvblock *kb);

int spar__linear_fwd_local_blas(const spar_linear_dims *dims, int64_t n, const float *q,
                                const float *k, const float *v, float *o);
int spar__linear_bwd_local_blas(const spar_linear_dims *dims, int64_t n, const float *q,
                                const float *k, const float *v, const float *dout, float *dq,
                                float *dk, float *dv);

/* The state products of kernels.h's spar_linear_* on OpenBLAS (linear_blas.c). */
int spar__linear_state_blas(const spar_linear_dims *dims, bool causal, int64_t n, const float *k,
                            const float *v, float *m);
int spar__linear_fwd_state_blas(const spar_linear_dims *dims, bool causal, int64_t n,
                                const float *q, const float *s, float *o);
int spar__linear_dstate_blas(const spar_linear_dims *dims, bool causal, int64_t n, const float *q,
                             const float *dout, float *ds);
int spar__linear_bwd_state_blas(const spar_linear_dims *dims, bool causal, int64_t n,
                                const float *k, const float *v, const float *dout, const float *s,
                                const float *dkv, float *dq, float *dk, float *dv);

int spar__linear_fwd_local_scalar(const spar_linear_dims *dims, int64_t n, const float *q,
                                  const float *k, const float *v, float *o);
int spar__linear_bwd_local_scalar(const spar_linear_dims *dims, int64_t n, const float *q,
                                  const float *k, const float *v, const float *dout, float *dq,
                                  float *dk, float *dv);

/* Blocked (Lightning-style) with blocks of SPAR__LINEAR_BLOCK tokens. */
#define SPAR__LINEAR_BLOCK SPAR_LINEAR_BLOCK
int spar__linear_fwd_local_blocked(const spar_linear_dims *dims, int64_t n, const float *q,
                                   const float *k, const float *v, float *o);
int spar__linear_bwd_local_blocked(const spar_linear_dims *dims, int64_t n, const float *q,
                                   const float *k, const float *v, const float *dout, float *dq,
                                   float *dk, float *dv);

#endif
