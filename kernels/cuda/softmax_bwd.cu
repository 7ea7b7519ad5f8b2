// softmax_bwd.cu: softmax attention block backward on device-resident tensors
// (spar_cuda_softmax_bwd, cuda_kernels.h), FlashAttention-2 style: with the queries' final
// lse and delta = rowsum(dout * o), p = exp(scale q.k - lse) is recomputed, never stored:
//   dv += p dout,  ds = p (dout.v - delta),  dq += scale ds k,  dk += scale ds q.
// Key-tile-major: one thread block per (tile of keys, kv head) keeps its K, V and their
// dK, dV accumulators in shared memory and walks the query tiles of every query head of
// its group (GQA sums there, no atomics on dk, dv); dq, shared by the key tiles, is
// accumulated with fp32 atomics. With causal, query tiles that end before the key tile's
// first position are skipped. float32 or bfloat16 storage, fp32 arithmetic on CUDA cores
// (tiles of 32 rows for head_dim <= 128, 16 beyond); no N x N buffer.
// Also spar_cuda_softmax_bwd_delta, the backward pass's row term.
#include <stdint.h>

#include "cuda_common.cuh" // defines: SPAR_CUDA_CHECK, spar__load, spar__cuda_check_attn

namespace {

constexpr int THREADS = 256;

struct BwdArgs {
    int heads, kv_heads, d;
    float scale;
    bool causal;
    int64_t nq, nk, stride_q, stride_lse, stride_kv;
    const void *q, *k, *v, *dout;
    const float *lse, *delta;
    const int64_t *qpos, *kpos;
    float *dq, *dk, *dv;
};

// Shared memory of bwd_simt, in floats: K, V, dK, dV, Q, dO tiles [BT][d + 1] (the extra
// column keeps rows of consecutive threads in different banks), P and dS [BT][BT + 1], and
// lse, delta [BT].
size_t bwd_smem(int bt, int d) {
    return sizeof(float) * ((size_t)6 * bt * (d + 1) + (size_t)2 * bt * (bt + 1) + 2 * (size_t)bt);
}

template <typename T>
__device__ void load_tile(float *dst, const T *src, int64_t row0, int rows, int bt, int64_t stride,
                          int64_t col0, int d, int ld) {
    for (int x = threadIdx.x; x < bt * d; x += blockDim.x) {
        int r = x / d, c = x - r * d;
        dst[r * ld + c] = r < rows ? spar__load(src, (row0 + r) * stride + col0 + c) : 0.0f;
    }
}

// p and ds of every (query, key) pair of the tiles: 0 where the key is not visible, for
// padding rows, and for queries that saw no key at all (lse = -inf).
template <int BT>
__device__ void probabilities(const BwdArgs &a, float *sm, int qlen, int klen,
                              const int64_t *qpos_s, const int64_t *kpos_s) {
    const int d = a.d, ld = d + 1;
    const float *ks = sm, *vs = ks + BT * ld, *qs = vs + 3 * BT * ld, *dos = qs + BT * ld;
    float *ps = (float *)dos + BT * ld, *dss = ps + BT * (BT + 1);
    const float *lse_s = dss + BT * (BT + 1), *delta_s = lse_s + BT;
    for (int e = threadIdx.x; e < BT * BT; e += blockDim.x) {
        int r = e / BT, c = e % BT;
        float p = 0.0f, ds = 0.0f;
        if (r < qlen && c < klen && lse_s[r] != -INFINITY &&
            (!a.causal || kpos_s[c] <= qpos_s[r])) {
            float s = 0.0f, dp = 0.0f;
            for (int x = 0; x < d; x++)
                s += qs[r * ld + x] * ks[c * ld + x], dp += dos[r * ld + x] * vs[c * ld + x];
            p = expf(a.scale * s - lse_s[r]);
            ds = p * (dp - delta_s[r]);
        }
        ps[r * (BT + 1) + c] = p, dss[r * (BT + 1) + c] = ds;
    }
}

template <typename T, int BT> __global__ void __launch_bounds__(THREADS) bwd_simt(BwdArgs a) {
    extern __shared__ float sm[];
    __shared__ int64_t qpos_s[BT], kpos_s[BT];
    const int d = a.d, ld = d + 1, g = blockIdx.y, per = a.heads / a.kv_heads;
    float *ks = sm, *vs = ks + BT * ld, *dks = vs + BT * ld, *dvs = dks + BT * ld;
    float *qs = dvs + BT * ld, *dos = qs + BT * ld, *ps = dos + BT * ld, *dss = ps + BT * (BT + 1);
    float *lse_s = dss + BT * (BT + 1), *delta_s = lse_s + BT;
    const int64_t j0 = (int64_t)blockIdx.x * BT;
    const int klen = a.nk - j0 < BT ? (int)(a.nk - j0) : BT;
    load_tile(ks, (const T *)a.k, j0, klen, BT, a.stride_kv, (int64_t)g * d, d, ld);
    load_tile(vs, (const T *)a.v, j0, klen, BT, a.stride_kv, (int64_t)g * d, d, ld);
    for (int x = threadIdx.x; x < BT * ld; x += blockDim.x)
        dks[x] = 0.0f, dvs[x] = 0.0f;
    if (threadIdx.x < BT)
        kpos_s[threadIdx.x] = a.causal && threadIdx.x < klen ? a.kpos[j0 + threadIdx.x] : 0;
    const int64_t kfirst = a.causal ? a.kpos[j0] : 0;
    for (int h = g * per; h < (g + 1) * per; h++) {
        for (int64_t i0 = 0; i0 < a.nq; i0 += BT) {
            const int qlen = a.nq - i0 < BT ? (int)(a.nq - i0) : BT;
            if (a.causal && a.qpos[i0 + qlen - 1] < kfirst) continue; // sees none of these keys
            __syncthreads(); // the previous query tile is no longer read
            load_tile(qs, (const T *)a.q, i0, qlen, BT, a.stride_q, (int64_t)h * d, d, ld);
            load_tile(dos, (const T *)a.dout, i0, qlen, BT, a.stride_q, (int64_t)h * d, d, ld);
            if (threadIdx.x < BT) {
                int r = threadIdx.x;
                lse_s[r] = r < qlen ? a.lse[(i0 + r) * a.stride_lse + h] : -INFINITY;
                delta_s[r] = r < qlen ? a.delta[(i0 + r) * a.stride_lse + h] : 0.0f;
                qpos_s[r] = a.causal && r < qlen ? a.qpos[i0 + r] : -1;
            }
            __syncthreads();
            probabilities<BT>(a, sm, qlen, klen, qpos_s, kpos_s);
            __syncthreads();
            for (int e = threadIdx.x; e < BT * d; e += blockDim.x) { // dV, dK of key row c
                int c = e / d, x = e - c * d;
                float accv = 0.0f, acck = 0.0f;
                for (int r = 0; r < qlen; r++) {
                    accv += ps[r * (BT + 1) + c] * dos[r * ld + x];
                    acck += dss[r * (BT + 1) + c] * qs[r * ld + x];
                }
                dvs[c * ld + x] += accv, dks[c * ld + x] += acck;
            }
            for (int e = threadIdx.x; e < qlen * d; e += blockDim.x) { // dQ of query row r
                int r = e / d, x = e - r * d;
                float acc = 0.0f;
                for (int c = 0; c < klen; c++)
                    acc += dss[r * (BT + 1) + c] * ks[c * ld + x];
                atomicAdd(a.dq + (i0 + r) * a.stride_q + (int64_t)h * d + x, a.scale * acc);
            }
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < klen * d; e += blockDim.x) {
        int c = e / d, x = e - c * d;
        int64_t at = (j0 + c) * a.stride_kv + (int64_t)g * d + x;
        a.dk[at] += a.scale * dks[c * ld + x], a.dv[at] += dvs[c * ld + x];
    }
}

template <typename T>
__global__ void delta_kernel(int64_t rows, int d, const float *o, const T *dout, float *delta) {
    int64_t row = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= rows) return;
    float acc = 0.0f;
    for (int c = 0; c < d; c++)
        acc += o[row * d + c] * spar__load(dout, row * d + c);
    delta[row] = acc;
}

template <typename T, int BT> int launch(const BwdArgs &a, cudaStream_t stream) {
    size_t smem = bwd_smem(BT, a.d);
    SPAR_TRY(spar__cuda_smem_optin(bwd_simt<T, BT>, smem));
    dim3 grid((unsigned)((a.nk + BT - 1) / BT), (unsigned)a.kv_heads);
    bwd_simt<T, BT><<<grid, THREADS, smem, stream>>>(a);
    spar__cuda_launched();
    return SPAR_OK;
}

} // namespace

extern "C" int spar_cuda_softmax_bwd(const spar_attn_dims *dims, bool causal, spar_cuda_dtype dtype,
                                     const spar_cuda_qblock *qb, const spar_cuda_kvblock *kb,
                                     spar_cuda_stream stream) {
    SPAR_TRY(spar__cuda_check_attn(dims, causal, qb->pos, kb->pos));
    if (qb->n == 0 || kb->n == 0) return SPAR_OK;
    BwdArgs a = {dims->heads, dims->kv_heads, dims->head_dim, dims->scale,   causal,  qb->n,
                 kb->n,       qb->stride_q,   qb->stride_lse, kb->stride_kv, qb->q,   kb->k,
                 kb->v,       qb->dout,       qb->lse,        qb->delta,     qb->pos, kb->pos,
                 qb->dq,      kb->dk,         kb->dv};
    bool wide = a.d > 128;
    if (dtype == SPAR_CUDA_F32)
        return wide ? launch<float, 16>(a, stream) : launch<float, 32>(a, stream);
    return wide ? launch<__nv_bfloat16, 16>(a, stream) : launch<__nv_bfloat16, 32>(a, stream);
}

extern "C" int spar_cuda_softmax_bwd_delta(int64_t n, int heads, int head_dim,
                                           spar_cuda_dtype dtype, const float *o, const void *dout,
                                           float *delta, spar_cuda_stream stream) {
    int64_t rows = n * heads;
    if (rows == 0) return SPAR_OK;
    unsigned blocks = (unsigned)((rows + 255) / 256);
    if (dtype == SPAR_CUDA_F32)
        delta_kernel<float>
            <<<blocks, 256, 0, stream>>>(rows, head_dim, o, (const float *)dout, delta);
    else
        delta_kernel<__nv_bfloat16>
            <<<blocks, 256, 0, stream>>>(rows, head_dim, o, (const __nv_bfloat16 *)dout, delta);
    spar__cuda_launched();
    return SPAR_OK;
}
