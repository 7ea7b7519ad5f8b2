// softmax_bwd.cu: softmax attention block backward on device-resident tensors
// (spar_cuda_softmax_bwd, cuda_kernels.h), FlashAttention-2 style: with the queries' final
// lse and delta = rowsum(dout * o), p = exp(scale q.k - lse) is recomputed, never stored:
//   dv += p dout,  ds = p (dout.v - delta),  dq += scale ds k,  dk += scale ds q.
// Key-tile-major: one thread block per (tile of keys, kv head) keeps its K, V and their
// dK, dV accumulators on chip and walks the query tiles of every query head of its group
// (GQA sums there, no atomics on dk, dv); dq, shared by the key tiles, is accumulated with
// fp32 atomics. With causal, query tiles that end before the key tile's first position
// are skipped. No N x N buffer. Two kernels:
//   bwd_tc    bfloat16, head_dim a multiple of 8 up to 128 (padded to 64 or 128), 16-byte
//             aligned rows: tensor cores (mma.sync, fp32 accumulation) for S^T = K Q^T,
//             dP^T = V dO^T, dV += P^T dO, dK += dS^T Q and dQ = dS K; 64 keys and 4
//             warps per block, dK, dV, scores and probabilities in registers, P and dS
//             rounded to bf16 as the operands of the last three products.
//   bwd_simt  everything else (fp32, other head_dims): fp32 arithmetic on CUDA cores,
//             tiles of 32 rows (16 beyond 128) in shared memory.
// Also spar_cuda_softmax_bwd_delta, the backward pass's row term.
#include <stdint.h>

#include "cuda_common.cuh" // defines: SPAR_CUDA_CHECK, spar__load, spar__cuda_check_attn

namespace {

constexpr int THREADS = 256;

struct BwdArgs {
    int heads, kv_heads, d;
    float scale;
    bool causal, vec; // vec: 16-byte bf16 loads are aligned
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

// ---- bwd_tc: bfloat16, head_dim a multiple of 8 up to 128, tensor cores -------------
using bf16 = __nv_bfloat16;
constexpr int TC_WARPS = 4, TC_THREADS = 32 * TC_WARPS, TC_BK = 16 * TC_WARPS, TC_BQ = 64;
constexpr float LOG2E = 1.4426950408889634f;

// Shared memory of bwd_tc: bf16 tiles of K, V (the block's keys), Q, dO (the current
// query tile), rows DP + 8 apart (ldmatrix reads 8 rows in different banks); the block's
// scale * dS^T in bf16 [keys][queries]; per query: lse in log2 units, delta, position.
// About 79 KiB at DP = 128: two blocks fit on a multiprocessor.
template <int DP> struct TcLayout {
    static constexpr int LD = DP + 8, LDS = TC_BQ + 8;
    static constexpr size_t K = 0, V = K + sizeof(bf16) * TC_BK * LD,
                            Q = V + sizeof(bf16) * TC_BK * LD, DO = Q + sizeof(bf16) * TC_BQ * LD,
                            DS = DO + sizeof(bf16) * TC_BQ * LD,
                            LSE = DS + sizeof(bf16) * TC_BK * LDS, DELTA = LSE + 4 * TC_BQ,
                            QPOS = DELTA + 4 * TC_BQ, BYTES = QPOS + 8 * TC_BQ;
};

// dQ of this warp's 16 queries += (scale dS) K over the block's keys, 32 columns at a
// time, added to dq with fp32 atomics (the other key blocks add theirs).
template <int DP>
__device__ void tc_add_dq(const BwdArgs &a, const unsigned char *raw, int64_t i0, int qlen, int h) {
    using L = TcLayout<DP>;
    const bf16 *ks = (const bf16 *)(raw + L::K), *ds = (const bf16 *)(raw + L::DS);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
    for (int c0 = 0; c0 < DP; c0 += 32) {
        float dq[4][4] = {};
#pragma unroll
        for (int kk = 0; kk < TC_BK / 16; kk++) {
            uint32_t sa[4], b[4]; // dS rows of these queries: dS^T read transposed
            spar__ldsm_x4_t(sa, ds + (kk * 16 + lane % 8 + lane / 16 * 8) * L::LDS + warp * 16 +
                                    lane / 8 % 2 * 8);
#pragma unroll
            for (int t = 0; t < 4; t += 2) {
                spar__ldsm_x4_t(b, ks + (kk * 16 + lane % 16) * L::LD + c0 + t * 8 + lane / 16 * 8);
                spar__mma_bf16(dq[t], sa, b[0], b[1]);
                spar__mma_bf16(dq[t + 1], sa, b[2], b[3]);
            }
        }
#pragma unroll
        for (int t = 0; t < 4; t++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int row = warp * 16 + lane / 4 + 8 * (e / 2),
                    col = c0 + t * 8 + 2 * (lane % 4) + e % 2;
                if (row < qlen && col < a.d)
                    atomicAdd(a.dq + (i0 + row) * a.stride_q + (int64_t)h * a.d + col, dq[t][e]);
            }
    }
}

// One thread block per (64 keys, kv head), 4 warps, warp w owning keys 16w..16w+15: it
// keeps their dK and dV in fp32 registers and walks the query tiles of every query head
// of the group. Per tile, S^T = K Q^T and dP^T = V dO^T (keys as rows, so that P^T and
// dS^T come out as the A operands of dV += P^T dO and dK += dS^T Q without leaving
// registers); dS^T then goes to shared memory for dQ = dS K, read back transposed.
template <int DP> __global__ void __launch_bounds__(TC_THREADS) bwd_tc(BwdArgs a) {
    using L = TcLayout<DP>;
    constexpr int LD = L::LD, KT = DP / 16, NT = TC_BQ / 8, OT = DP / 8;
    extern __shared__ __align__(128) unsigned char raw[];
    bf16 *ks = (bf16 *)(raw + L::K), *vs = (bf16 *)(raw + L::V), *qs = (bf16 *)(raw + L::Q);
    bf16 *dos = (bf16 *)(raw + L::DO), *ds = (bf16 *)(raw + L::DS);
    float *lse_s = (float *)(raw + L::LSE), *delta_s = (float *)(raw + L::DELTA);
    int64_t *qpos_s = (int64_t *)(raw + L::QPOS);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, d = a.d, g = blockIdx.y;
    const int per = a.heads / a.kv_heads;
    const int64_t j0 = (int64_t)blockIdx.x * TC_BK;
    const int klen = a.nk - j0 < TC_BK ? (int)(a.nk - j0) : TC_BK;
    const float scale_log2 = a.scale * LOG2E;
    spar__load_rows_async<DP, TC_BK, LD, TC_THREADS>(ks, (const bf16 *)a.k, j0, klen, a.stride_kv,
                                                     (int64_t)g * d, d);
    spar__load_rows_async<DP, TC_BK, LD, TC_THREADS>(vs, (const bf16 *)a.v, j0, klen, a.stride_kv,
                                                     (int64_t)g * d, d);
    spar__cp_async_commit();
    // This lane's two keys (rows r and r + 8 of the warp's 16) and their positions. Keys
    // past klen are masked: their zero rows would give p = exp(-lse), which may overflow.
    const int krow = warp * 16 + lane / 4;
    const bool kin[2] = {krow < klen, krow + 8 < klen};
    int64_t kp[2] = {0, 0};
    if (a.causal)
        for (int r = 0; r < 2; r++)
            if (kin[r]) kp[r] = a.kpos[j0 + krow + 8 * r];
    const int64_t kfirst = a.causal ? a.kpos[j0] : 0;
    float dk[OT][4] = {}, dv[OT][4] = {};
    for (int h = g * per; h < (g + 1) * per; h++) {
        for (int64_t i0 = 0; i0 < a.nq; i0 += TC_BQ) {
            const int qlen = a.nq - i0 < TC_BQ ? (int)(a.nq - i0) : TC_BQ;
            if (a.causal && a.qpos[i0 + qlen - 1] < kfirst) continue; // sees none of these keys
            __syncthreads(); // the previous tile's Q, dO and dS are no longer read
            spar__load_rows_async<DP, TC_BQ, LD, TC_THREADS>(qs, (const bf16 *)a.q, i0, qlen,
                                                             a.stride_q, (int64_t)h * d, d);
            spar__load_rows_async<DP, TC_BQ, LD, TC_THREADS>(dos, (const bf16 *)a.dout, i0, qlen,
                                                             a.stride_q, (int64_t)h * d, d);
            spar__cp_async_commit();
            if (threadIdx.x < TC_BQ) { // padding rows and queries that saw no key: p = 0
                int r = threadIdx.x;
                float lse = r < qlen ? a.lse[(i0 + r) * a.stride_lse + h] : -INFINITY;
                lse_s[r] = lse == -INFINITY ? INFINITY : lse * LOG2E;
                delta_s[r] = r < qlen ? a.delta[(i0 + r) * a.stride_lse + h] : 0.0f;
                qpos_s[r] = a.causal && r < qlen ? a.qpos[i0 + r] : INT64_MAX;
            }
            spar__cp_async_wait<0>();
            __syncthreads();

            float st[NT][4] = {}, dpt[NT][4] = {}; // S^T, dP^T: 16 keys x 64 queries
#pragma unroll
            for (int kt = 0; kt < KT; kt++) {
                uint32_t ka[4], va[4], b[4];
                spar__ldsm_x4(ka, ks + (warp * 16 + lane % 16) * LD + kt * 16 + lane / 16 * 8);
                spar__ldsm_x4(va, vs + (warp * 16 + lane % 16) * LD + kt * 16 + lane / 16 * 8);
#pragma unroll
                for (int t = 0; t < NT; t += 2) {
                    const int at =
                        (t * 8 + lane % 8 + lane / 16 * 8) * LD + kt * 16 + lane / 8 % 2 * 8;
                    spar__ldsm_x4(b, qs + at);
                    spar__mma_bf16(st[t], ka, b[0], b[1]);
                    spar__mma_bf16(st[t + 1], ka, b[2], b[3]);
                    spar__ldsm_x4(b, dos + at);
                    spar__mma_bf16(dpt[t], va, b[0], b[1]);
                    spar__mma_bf16(dpt[t + 1], va, b[2], b[3]);
                }
            }
#pragma unroll
            for (int t = 0; t < NT; t++) // P^T and scale dS^T
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int q = t * 8 + 2 * (lane % 4) + e % 2;
                    float p = exp2f(st[t][e] * scale_log2 - lse_s[q]);
                    if (!kin[e / 2] || (a.causal && kp[e / 2] > qpos_s[q])) p = 0.0f;
                    st[t][e] = p;
                    dpt[t][e] = a.scale * p * (dpt[t][e] - delta_s[q]);
                }
#pragma unroll
            for (int kk = 0; kk < TC_BQ / 16; kk++) { // dV += P^T dO, dK += dS^T Q
                uint32_t pa[4] = {spar__pack_bf16(st[2 * kk][0], st[2 * kk][1]),
                                  spar__pack_bf16(st[2 * kk][2], st[2 * kk][3]),
                                  spar__pack_bf16(st[2 * kk + 1][0], st[2 * kk + 1][1]),
                                  spar__pack_bf16(st[2 * kk + 1][2], st[2 * kk + 1][3])};
                uint32_t sa[4] = {spar__pack_bf16(dpt[2 * kk][0], dpt[2 * kk][1]),
                                  spar__pack_bf16(dpt[2 * kk][2], dpt[2 * kk][3]),
                                  spar__pack_bf16(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]),
                                  spar__pack_bf16(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3])};
                // dS^T of these 16 queries to shared memory for dQ (rows r and r + 8)
                uint32_t *dsw = (uint32_t *)(ds + krow * L::LDS + kk * 16 + 2 * (lane % 4));
                dsw[0] = sa[0], dsw[4] = sa[2];
                dsw[8 * L::LDS / 2] = sa[1], dsw[8 * L::LDS / 2 + 4] = sa[3];
#pragma unroll
                for (int t = 0; t < OT; t += 2) {
                    const int at = (kk * 16 + lane % 16) * LD + t * 8 + lane / 16 * 8;
                    uint32_t b[4];
                    spar__ldsm_x4_t(b, dos + at);
                    spar__mma_bf16(dv[t], pa, b[0], b[1]);
                    spar__mma_bf16(dv[t + 1], pa, b[2], b[3]);
                    spar__ldsm_x4_t(b, qs + at);
                    spar__mma_bf16(dk[t], sa, b[0], b[1]);
                    spar__mma_bf16(dk[t + 1], sa, b[2], b[3]);
                }
            }
            __syncthreads(); // every warp's dS^T rows are in
            tc_add_dq<DP>(a, raw, i0, qlen, h);
        }
    }
    spar__cp_async_wait<0>(); // K and V landed even where no query tile was seen
#pragma unroll
    for (int t = 0; t < OT; t++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            int row = krow + 8 * (e / 2), col = t * 8 + 2 * (lane % 4) + e % 2;
            if (row >= klen || col >= d) continue;
            int64_t at = (j0 + row) * a.stride_kv + (int64_t)g * d + col;
            a.dk[at] += dk[t][e], a.dv[at] += dv[t][e];
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

template <int DP> int launch_tc(const BwdArgs &a, cudaStream_t stream) {
    size_t smem = TcLayout<DP>::BYTES;
    SPAR_TRY(spar__cuda_smem_optin(bwd_tc<DP>, smem));
    dim3 grid((unsigned)((a.nk + TC_BK - 1) / TC_BK), (unsigned)a.kv_heads);
    bwd_tc<DP><<<grid, TC_THREADS, smem, stream>>>(a);
    spar__cuda_launched();
    return SPAR_OK;
}

bool aligned16(const void *p) {
    return ((uintptr_t)p & 15u) == 0;
}

} // namespace

extern "C" int spar_cuda_softmax_bwd(const spar_attn_dims *dims, bool causal, spar_cuda_dtype dtype,
                                     const spar_cuda_qblock *qb, const spar_cuda_kvblock *kb,
                                     spar_cuda_stream stream) {
    SPAR_TRY(spar__cuda_check_attn(dims, causal, qb->pos, kb->pos));
    if (qb->n == 0 || kb->n == 0) return SPAR_OK;
    BwdArgs a = {
        dims->heads,  dims->kv_heads, dims->head_dim, dims->scale, causal, false, qb->n,    kb->n,
        qb->stride_q, qb->stride_lse, kb->stride_kv,  qb->q,       kb->k,  kb->v, qb->dout, qb->lse,
        qb->delta,    qb->pos,        kb->pos,        qb->dq,      kb->dk, kb->dv};
    a.vec = a.d % 8 == 0 && a.stride_q % 8 == 0 && a.stride_kv % 8 == 0 && aligned16(a.q) &&
            aligned16(a.k) && aligned16(a.v) && aligned16(a.dout);
    bool wide = a.d > 128;
    if (dtype == SPAR_CUDA_F32)
        return wide ? launch<float, 16>(a, stream) : launch<float, 32>(a, stream);
    if (a.vec && !wide) return a.d <= 64 ? launch_tc<64>(a, stream) : launch_tc<128>(a, stream);
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
