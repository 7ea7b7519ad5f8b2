/* cpu_kernels.h: the CPU kernels behind the backend tables of kernels.c (internal to the
 * kernels room). Shapes and meanings are those of the spar_kernels members (kernels.h).
 *
 * Defines: the scalar softmax block kernels, the scalar (oracle) and blocked linear
 *          segment kernels.
 */
#ifndef SPAR_CPU_KERNELS_H
#define SPAR_CPU_KERNELS_H

#include <math.h>

#include "kernels.h"

/* The exact merge of two softmax partials of a row (DESIGN.md 3.1): given the running
 * lse_a (-inf: nothing yet) and a block's lse_b, returns the merged log-sum-exp and sets
 * the weights of the running output (*wa) and of the block's normalised output (*wb).
 * Computed as max + log1p(exp(min - max)) so that neither exponential overflows. */
static inline double spar__merge_weights(double lse_a, double lse_b, double *wa, double *wb) {
    if (isinf(lse_a) && lse_a < 0) {
        *wa = 0.0, *wb = 1.0;
        return lse_b;
    }
    double hi = lse_a > lse_b ? lse_a : lse_b, lo = lse_a > lse_b ? lse_b : lse_a;
    double lse = hi + log1p(exp(lo - hi));
    *wa = exp(lse_a - lse), *wb = exp(lse_b - lse);
    return lse;
}

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

/* Decode attention with AVX-512 (decode_avx512.c), the shapes of spar_decode_attention.
 * Usable when spar__decode_avx512_usable: head_dim a multiple of 16, at most 64 queries
 * per kv head, a processor with AVX-512F. */
void spar__decode_avx512(const spar_attn_dims *dims, int64_t n, const float *k, const float *v,
                         int64_t stride, const float *q, float *o, float *lse);
bool spar__decode_avx512_usable(const spar_attn_dims *dims);

#endif
