/* kernels.h: local attention math on one rank, behind one interface.
 *
 * A kernel backend is a table of function pointers chosen once at start-up
 * (spar_kernels_select); the engine never branches on the backend in its loops.
 * The scalar backend (kernels/cpu/softmax_scalar.c) is the oracle: plain loops, double
 * accumulators, O(head_dim) scratch per call, no N x N buffers. Faster backends are
 * tested against it.
 *
 * Layout: token-major, row-major float32. A block of n tokens is
 *   q: [n, heads, head_dim]      k, v: [n, kv_heads, head_dim]
 *   o: [n, heads, head_dim]      lse: [n, heads]  (natural log of the softmax denominator)
 * Query head h reads kv head h / (heads / kv_heads) (GQA/MQA when kv_heads < heads).
 *
 * Defines: spar_attn_dims, spar_kernels, spar_kernels_select, spar_softmax_init_partial,
 *          spar_softmax_merge.
 * Leaves out: MPI (never here), backward and linear attention (later issues).
 */
#ifndef SPAR_KERNELS_H
#define SPAR_KERNELS_H

#include <stdbool.h>
#include <stdint.h>

typedef struct spar_attn_dims {
    int heads;    /* H */
    int kv_heads; /* G, divides H */
    int head_dim; /* d >= 1 */
    float scale;  /* softmax scale, usually 1/sqrt(d) */
} spar_attn_dims;

typedef struct spar_kernels {
    const char *name;
    /* Softmax attention of nq queries against nk keys, merged exactly into the running
     * partial (o, lse) of those queries (DESIGN.md 3.1). With causal, key j is visible
     * to query i iff k_pos[j] <= q_pos[i]; without it every key is visible and the
     * positions may be NULL. A query that sees no key in this block is left unchanged.
     *   q: [nq, H, d]  k, v: [nk, G, d]  q_pos: [nq]  k_pos: [nk]
     *   o: [nq, H, d]  lse: [nq, H]  (in/out; start from spar_softmax_init_partial) */
    int (*softmax_fwd_block)(const spar_attn_dims *dims, int64_t nq, const float *q,
                             const int64_t *q_pos, int64_t nk, const float *k, const float *v,
                             const int64_t *k_pos, bool causal, float *o, float *lse);
} spar_kernels;

/* The backend named `name` ("scalar", or "auto" for the best this host runs), or NULL
 * for an unknown name. */
const spar_kernels *spar_kernels_select(const char *name);

/* Comma-separated list of backend names, for help texts. */
const char *spar_kernels_names(void);

/* Sets a partial to "no keys seen": o = 0, lse = -inf.
 *   o: [n, H, d]  lse: [n, H] */
void spar_softmax_init_partial(int64_t n, int heads, int head_dim, float *o, float *lse);

/* Merges partial b into partial a, row by row (DESIGN.md 3.1):
 *   lse = max + log1p(exp(min - max)),  o = exp(lse_a - lse) o_a + exp(lse_b - lse) o_b.
 * A row with lse = -inf is an empty partial.
 *   o_a, o_b: [n, H, d]  lse_a, lse_b: [n, H] */
void spar_softmax_merge(int64_t n, int heads, int head_dim, float *o_a, float *lse_a,
                        const float *o_b, const float *lse_b);

/* The scalar backend (also reachable through spar_kernels_select("scalar")). */
extern const spar_kernels spar__kernels_scalar;

#endif
