/* kernels.h: local attention math on one rank, behind one interface.
 *
 * A kernel backend is a table of function pointers chosen once at start-up
 * (spar_kernels_select); the engine never branches on the backend in its loops.
 * The scalar backend (kernels/cpu/softmax_scalar.c) is the oracle: plain loops, double
 * accumulators, O(block) scratch per call, no N x N buffers. Faster backends are tested
 * against it.
 *
 * Layout: token-major, row-major float32. A block of n tokens is
 *   q: [n, heads, head_dim]      k, v: [n, kv_heads, head_dim]
 *   o: [n, heads, head_dim]      lse: [n, heads]  (natural log of the softmax denominator)
 * Query head h reads kv head h / (heads / kv_heads) (GQA/MQA when kv_heads < heads).
 *
 * Defines: spar_attn_dims, spar_qblock, spar_kvblock, spar_kernels, spar_kernels_select,
 *          spar_softmax_init_partial, spar_softmax_merge, spar_softmax_bwd_delta,
 *          spar_vec_add, spar_to_bf16.
 *          Linear attention: spar_linear_dims, the segment functions spar_linear_*,
 *          spar_alibi_decay.
 *          Decoder layers: spar_matmul, spar_rmsnorm, spar_rope, spar_swiglu, spar_argmax,
 *          spar_decode_attention; yardsticks spar_kernels_sgemm_gflops,
 *          spar_kernels_triad_gbs; the CUDA backend spar_kernels_cuda (kernels/cuda/).
 * Leaves out: MPI (never here).
 */
#ifndef SPAR_KERNELS_H
#define SPAR_KERNELS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct spar_attn_dims {
    int heads;    /* H */
    int kv_heads; /* G, divides H */
    int head_dim; /* d >= 1 */
    float scale;  /* softmax scale, usually 1/sqrt(d) */
} spar_attn_dims;

/* A block of queries with what the passes read and write for them. A stride is the
 * number of floats from one token to the next: heads*head_dim (and heads for lse) for a
 * dense tensor, more for a view of some heads of a wider tensor.
 *   q, o, dout, dq: [n, stride_q]  (H heads of head_dim used from each row)
 *   lse, delta:     [n, stride_lse] (H used)
 * Forward reads q and merges into (o, lse); backward reads q, dout, lse, delta and
 * accumulates into dq. Unused pointers may be NULL. */
typedef struct spar_qblock {
    int64_t n;
    const int64_t *pos; /* [n] global positions, increasing; NULL when not causal */
    int64_t stride_q, stride_lse;
    const float *q;
    float *o, *lse;
    const float *dout, *delta;
    float *dq;
    bool bf16; /* q and dout hold bfloat16 (stride in elements as for the rest): a device's
                  kernels only (spar_kernels_device) */
} spar_qblock;

/* A block of keys and values, and (backward) the accumulators of their gradients.
 *   k, v, dk, dv: [n, stride_kv]  (G heads of head_dim used from each row) */
typedef struct spar_kvblock {
    int64_t n;
    const int64_t *pos; /* [n] global positions, increasing; NULL when not causal */
    int64_t stride_kv;
    const float *k, *v;
    float *dk, *dv;
    bool bf16; /* k and v hold bfloat16: a device's kernels only */
} spar_kvblock;

/* Tokens per block of the blocked linear-attention kernel (intra-block products). */
#define SPAR_LINEAR_BLOCK 64

/* Linear attention (DESIGN.md 3.4-3.5): O = (Q K^T (.) D) V with D_ij = decay^(i-j) for
 * j <= i (causal), O = Q (K^T V) otherwise; no softmax, no scale. The functions work on
 * one contiguous segment of n tokens (local index i = 0..n-1), dense layout:
 *   q, o, dout, dq: [n, H, d]   k, v, dk, dv: [n, G, d]
 *   states m, s, ds, dkv: [state_heads, d, d], row a = key dimension, column b = value.
 * State head s serves query heads s (state_heads == H) or the group s (state_heads == G,
 * possible when every head decays alike); it reads kv head s / (H/G) or s. */
typedef struct spar_linear_dims {
    int heads, kv_heads, head_dim;
    int state_heads;
    const double *decay; /* [heads] lambda_h in (0, 1] */
} spar_linear_dims;

/* A backend's device memory, for methods that keep their tensors there (NULL in a
 * host-only table). The softmax members take the same views as spar_kernels' but every
 * pointer in them (positions too) is device memory, and the inputs may be bfloat16
 * (spar_qblock.bf16, spar_kvblock.bf16, both alike); they return once the device is done,
 * as host kernels do. Uploads issued with upload_async run on a copy stream beside the
 * kernels (src must come from alloc_host); upload_wait makes the host wait for them. */
typedef struct spar_kernels_device {
    int (*softmax_fwd_block)(const spar_attn_dims *dims, bool causal, const spar_qblock *q,
                             const spar_kvblock *kv);
    int (*softmax_bwd_block)(const spar_attn_dims *dims, bool causal, const spar_qblock *q,
                             const spar_kvblock *kv);
    /* spar_softmax_init_partial and spar_softmax_bwd_delta on device tensors (dout in
     * bfloat16 when bf16). */
    int (*init_partial)(int64_t n, int heads, int head_dim, float *o, float *lse);
    int (*bwd_delta)(int64_t n, int heads, int head_dim, const float *o, const void *dout,
                     bool bf16, float *delta);
    int (*alloc)(void **p, size_t bytes);      /* device memory */
    int (*alloc_host)(void **p, size_t bytes); /* pinned host memory */
    void (*free)(void *p);
    void (*free_host)(void *p);
    int (*zero)(void *p, size_t bytes);
    /* Synchronous copy either way (the pointers say which). */
    int (*copy)(void *dst, const void *src, size_t bytes);
    int (*upload_async)(void *dst, const void *src, size_t bytes);
    int (*upload_wait)(void);
} spar_kernels_device;

typedef struct spar_kernels {
    const char *name;
    /* Its device memory, or NULL: every member below works on host tensors. */
    const spar_kernels_device *device;
    /* Softmax attention of the queries against the keys, merged exactly into the running
     * partial (o, lse) of those queries (DESIGN.md 3.1). With causal, key j is visible to
     * query i iff kv.pos[j] <= q.pos[i]. A query that sees no key here is left unchanged.
     * Start (o, lse) from spar_softmax_init_partial. */
    int (*softmax_fwd_block)(const spar_attn_dims *dims, bool causal, const spar_qblock *q,
                             const spar_kvblock *kv);
    /* Gradients of one block, given the final lse and delta = rowsum(dout * o) of the
     * queries (flash-attention backward): with p = exp(scale q.k - lse),
     *   dv += p dout,  ds = p (dout.v - delta),  dq += scale ds k,  dk += scale ds q,
     * accumulated into dq, dk, dv (GQA: a kv head sums over its query group). */
    int (*softmax_bwd_block)(const spar_attn_dims *dims, bool causal, const spar_qblock *q,
                             const spar_kvblock *kv);
    /* Causal output from inside the segment only (the state entering it counts as zero):
     * o_i = sum_{j <= i} lambda^(i-j) (q_i . k_j) v_j. o is overwritten. */
    int (*linear_fwd_local)(const spar_linear_dims *dims, int64_t n, const float *q, const float *k,
                            const float *v, float *o);
    /* The gradients of linear_fwd_local for output gradient dout; dq, dk, dv overwritten. */
    int (*linear_bwd_local)(const spar_linear_dims *dims, int64_t n, const float *q, const float *k,
                            const float *v, const float *dout, float *dq, float *dk, float *dv);
    /* The state products, as spar_linear_state, _fwd_state, _dstate and _bwd_state below
     * (those are the oracle versions, which the scalar and blocked backends use). */
    int (*linear_state)(const spar_linear_dims *dims, bool causal, int64_t n, const float *k,
                        const float *v, float *m);
    int (*linear_fwd_state)(const spar_linear_dims *dims, bool causal, int64_t n, const float *q,
                            const float *s, float *o);
    int (*linear_dstate)(const spar_linear_dims *dims, bool causal, int64_t n, const float *q,
                         const float *dout, float *ds);
    int (*linear_bwd_state)(const spar_linear_dims *dims, bool causal, int64_t n, const float *k,
                            const float *v, const float *dout, const float *s, const float *dkv,
                            float *dq, float *dk, float *dv);
} spar_kernels;

/* The segment's memory state m[s] = sum_j c_j k_j^T v_j, with c_j = lambda_s^(n-1-j)
 * (causal) or 1. m: [state_heads, d, d], overwritten. Returns 0 or SPAR_ENOMEM. */
int spar_linear_state(const spar_linear_dims *dims, bool causal, int64_t n, const float *k,
                      const float *v, float *m);

/* The state entering the segment, s: o_i += c_i q_i s, c_i = lambda^(i+1) (causal) or 1. */
void spar_linear_fwd_state(const spar_linear_dims *dims, bool causal, int64_t n, const float *q,
                           const float *s, float *o);

/* The gradient of the entering state: ds[s] = sum over the state's query heads of
 * sum_i c_i q_i^T dout_i, c_i = lambda^(i+1) (causal) or 1. ds overwritten. Returns 0 or
 * SPAR_ENOMEM. */
int spar_linear_dstate(const spar_linear_dims *dims, bool causal, int64_t n, const float *q,
                       const float *dout, float *ds);

/* Gradients through the states: with s the state that entered the segment and dkv the
 * gradient of the segment's own memory state m (from later segments),
 *   dq_i += c_i dout_i s^T,  dk_j += e_j dkv v_j,  dv_j += e_j dkv^T k_j,
 * c_i = lambda^(i+1), e_j = lambda^(n-1-j) (causal) or 1. s or dkv may be NULL (zero). */
void spar_linear_bwd_state(const spar_linear_dims *dims, bool causal, int64_t n, const float *k,
                           const float *v, const float *dout, const float *s, const float *dkv,
                           float *dq, float *dk, float *dv);

/* out[s] = sum_i lambda_s^(exps[i]) states[i][s] over the i with exps[i] >= 0 (a decayed
 * prefix of segment states). states: [count, state_heads, d, d]; out overwritten. */
void spar_linear_combine(const spar_linear_dims *dims, int count, const float *states,
                         const double *exps, float *out);

/* ALiBi decays lambda_h = exp(-slope_h): slope_h = 2^(-8(h+1)/H) for H a power of two;
 * otherwise the slopes of the nearest lower power of two, then every other slope of the
 * next power of two. decay: [heads]. */
void spar_alibi_decay(int heads, double *decay);

/* The backend named `name` ("scalar", or "auto" for the best this host runs), or NULL
 * for an unknown name. */
const spar_kernels *spar_kernels_select(const char *name);

/* CUDA devices visible to this process (0, with the reason in why, when there are none
 * or the build has no CUDA), and the CUDA backend (NULL without CUDA in the build): every
 * member on the GPU, host tensors staged through the device (kernels/cuda/staged.c).
 * Launchers on device-resident fp32/bf16 tensors and the staging primitives (pinned
 * buffers, streams, events) are declared in kernels/cuda/cuda_kernels.h. */
int spar_kernels_cuda_devices(char *why, size_t len);
const spar_kernels *spar_kernels_cuda(void);
/* The device this process uses: local_rank mod the devices visible (ranks of one host
 * share its GPUs in turn); *device says which. */
int spar_kernels_cuda_use_device(int local_rank, int *device);

/* "|"-separated list of the backends this build has, for help texts. */
const char *spar_kernels_names(void);

/* Threads the kernels may use (0 = the runtime's default); returns the number in force. */
int spar_kernels_set_threads(int threads);

/* A backend that does no arithmetic in its block kernels: running a method with it times
 * the method's communication alone (the benchmark's overlap figure). */
extern const spar_kernels spar_kernels_none;

/* OpenBLAS sgemm FLOP/s of C[m,n] = A[m,k] B[k,n] on the kernels' threads (each thread
 * its own product, as the kernels use them), measured for at least min_seconds: the
 * yardstick for kernel efficiency. 0 when the build has no BLAS. */
double spar_kernels_sgemm_gflops(int m, int n, int k, double min_seconds);

/* Sets a partial to "no keys seen": o = 0, lse = -inf.
 *   o: [n, H, d]  lse: [n, H] */
void spar_softmax_init_partial(int64_t n, int heads, int head_dim, float *o, float *lse);

/* delta[i, h] = sum_c dout[i, h, c] * o[i, h, c], the backward pass's row term.
 *   o, dout: [n, H, d]  delta: [n, H] */
void spar_softmax_bwd_delta(int64_t n, int heads, int head_dim, const float *o, const float *dout,
                            float *delta);

/* y += x, n floats (accumulators arriving from another rank). */
void spar_vec_add(int64_t n, float *y, const float *x);
/* dst[i] = x[i] rounded to bfloat16 (nearest, ties to even; NaN stays NaN), as raw bits. */
void spar_to_bf16(int64_t n, const float *x, uint16_t *dst);

/* Merges partial b into partial a, row by row (DESIGN.md 3.1):
 *   lse = max + log1p(exp(min - max)),  o = exp(lse_a - lse) o_a + exp(lse_b - lse) o_b.
 * A row with lse = -inf is an empty partial.
 *   o_a, o_b: [n, H, d]  lse_a, lse_b: [n, H] */
void spar_softmax_merge(int64_t n, int heads, int head_dim, float *o_a, float *lse_a,
                        const float *o_b, const float *lse_b);

/* ---- The dense layers of a decoder (kernels/cpu/dense.c) ------------------------------
 * Row-major float32. RoPE rotates the halves of each head (x[e], x[e + d/2]) by the
 * angle pos * base^(-2e/d) (head_dim even). */

/* c[m, n] = a[m, k] b[k, n] (+ c when accumulate). */
void spar_matmul(int64_t m, int64_t n, int64_t k, const float *a, const float *b, float *c,
                 bool accumulate);
/* out[i] = x[i] / sqrt(mean(x[i]^2) + eps) * w, rows of dim floats (out may be x). */
void spar_rmsnorm(int64_t n, int dim, const float *x, const float *w, double eps, float *out);
/* In place on x [n, heads, head_dim]; pos [n]. */
void spar_rope(int64_t n, int heads, int head_dim, const int64_t *pos, double base, float *x);
/* out = silu(gate) * up, n floats (out may be gate). */
void spar_swiglu(int64_t n, const float *gate, const float *up, float *out);
/* Decode attention: one query token q [H, d] over n cached keys and values (rows of
 * stride_kv floats, kv head g at g d), o [H, d] and lse [H] overwritten (n = 0: the empty
 * partial). Each kv head's rows are read once for its whole query group. At most 64
 * query heads per kv head. */
int spar_decode_attention(const spar_attn_dims *dims, int64_t n, const float *k, const float *v,
                          int64_t stride_kv, const float *q, float *o, float *lse);

/* Memory bandwidth of a STREAM-style triad a = b + s c over arrays of `floats` floats
 * (bytes counted: two reads and a write per element), best of runs for min_seconds, on
 * the calling thread: the yardstick for decode's cache reads. */
double spar_kernels_triad_gbs(int64_t floats, double min_seconds);

/* The index of the largest of n values (the first on ties). */
int64_t spar_argmax(int64_t n, const float *x);

/* The scalar backend (the oracle) and the blocked one (Lightning-style linear attention:
 * intra-block by masked Q K^T V, inter-block through a running state). */
extern const spar_kernels spar__kernels_scalar;
extern const spar_kernels spar__kernels_blocked;

#endif
