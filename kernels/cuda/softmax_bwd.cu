// softmax_bwd.cu: softmax attention block backward on device-resident tensors
// (spar_cuda_softmax_bwd, cuda_kernels.h), FlashAttention-2 style: with the queries' final
// lse and delta = rowsum(dout * o), p = exp(scale q.k - lse) is recomputed, never stored:
//   dv += p dout,  ds = p (dout.v - delta),  dq += scale ds k,  dk += scale ds q.
// Key-tile-major: one thread block per (tile of keys, kv head) keeps its K, V and their
// dK, dV accumulators on chip and walks the query tiles of every query head of its group
// (GQA sums there, no atomics on dk, dv); dq, shared by the key tiles, is accumulated with
// fp32 atomics. With causal, query tiles that end before the key tile's first position
// are skipped. No N x N buffer. Two kernels:
//   bwd_mma   bfloat16, head_dim <= 128 (padded to 64 or 128): tensor cores (wmma, fp32
//             accumulation) for S = Q K^T, dP = dO V^T, dV += P^T dO, dK += dS^T Q and
//             dQ = dS K; 64 keys and 4 warps per block, dK and dV in register fragments,
//             P and dS rounded to bf16 as the operands of the last three products.
//   bwd_simt  fp32 storage (any head_dim <= 256) and bf16 beyond 128: fp32 arithmetic on
//             CUDA cores, tiles of 32 rows (16 beyond 128) in shared memory.
// Also spar_cuda_softmax_bwd_delta, the backward pass's row term.
#include <mma.h>
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

// ---- bwd_mma: bfloat16, head_dim <= 128, tensor cores ---------------------------------
namespace wmma = nvcuda::wmma;
using bf16 = __nv_bfloat16;
constexpr int MB = 64, MW = 4; // keys per block (and queries per tile), warps

// Shared memory of bwd_mma: bf16 tiles of Q, dO, K, V; fp32 S and dP (their space is
// reused to stage the block's dQ rows, and at the end dK and dV); bf16 P and scale * dS;
// lse, delta and positions of the tiles.
template <int DP> struct BwdLayout {
    static constexpr int LDH = DP + 8, LDS = MB + 4, LDP = MB + 8, LDO = DP + 4;
    static constexpr size_t Q = 0, DO = Q + sizeof(bf16) * MB * LDH,
                            K = DO + sizeof(bf16) * MB * LDH, V = K + sizeof(bf16) * MB * LDH,
                            S = V + sizeof(bf16) * MB * LDH, DPS = S + sizeof(float) * MB * LDS,
                            P = DPS + sizeof(float) * MB * LDS, DS = P + sizeof(bf16) * MB * LDP,
                            ROW = DS + sizeof(bf16) * MB * LDP, POS = ROW + sizeof(float) * 2 * MB,
                            BYTES = POS + sizeof(int64_t) * 2 * MB;
    static_assert(sizeof(float) * MB * LDO <= P - S, "the staging rows fit in S and dP");
};

using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// S = Q K^T and dP = dO V^T for this warp's 16 query rows, into fp32 shared memory.
template <int DP> __device__ void scores(unsigned char *raw, int warp) {
    using L = BwdLayout<DP>;
    const bf16 *qs = (const bf16 *)(raw + L::Q), *dos = (const bf16 *)(raw + L::DO);
    const bf16 *ks = (const bf16 *)(raw + L::K), *vs = (const bf16 *)(raw + L::V);
    float *ss = (float *)(raw + L::S), *dps = (float *)(raw + L::DPS);
#pragma unroll
    for (int nt = 0; nt < MB / 16; nt++) {
        Acc sf, pf;
        wmma::fill_fragment(sf, 0.0f);
        wmma::fill_fragment(pf, 0.0f);
#pragma unroll
        for (int kt = 0; kt < DP / 16; kt++) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> qa, da;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> kb, vb;
            wmma::load_matrix_sync(qa, qs + warp * 16 * L::LDH + kt * 16, L::LDH);
            wmma::load_matrix_sync(kb, ks + nt * 16 * L::LDH + kt * 16, L::LDH);
            wmma::mma_sync(sf, qa, kb, sf);
            wmma::load_matrix_sync(da, dos + warp * 16 * L::LDH + kt * 16, L::LDH);
            wmma::load_matrix_sync(vb, vs + nt * 16 * L::LDH + kt * 16, L::LDH);
            wmma::mma_sync(pf, da, vb, pf);
        }
        wmma::store_matrix_sync(ss + warp * 16 * L::LDS + nt * 16, sf, L::LDS, wmma::mem_row_major);
        wmma::store_matrix_sync(dps + warp * 16 * L::LDS + nt * 16, pf, L::LDS,
                                wmma::mem_row_major);
    }
}

// P and scale * dS in bf16 for this warp's 16 rows: 2 lanes per row, 32 columns each.
template <int DP> __device__ void probs(const BwdArgs &a, unsigned char *raw, int klen, int warp) {
    using L = BwdLayout<DP>;
    const float *ss = (const float *)(raw + L::S), *dps = (const float *)(raw + L::DPS);
    const float *lse_s = (const float *)(raw + L::ROW), *delta_s = lse_s + MB;
    const int64_t *qpos_s = (const int64_t *)(raw + L::POS), *kpos_s = qpos_s + MB;
    bf16 *ps = (bf16 *)(raw + L::P), *dss = (bf16 *)(raw + L::DS);
    const int lane = threadIdx.x % 32, r = warp * 16 + lane / 2, c0 = lane % 2 * 32;
    for (int c = c0; c < c0 + 32; c++) {
        bool seen = c < klen && lse_s[r] != -INFINITY && (!a.causal || kpos_s[c] <= qpos_s[r]);
        float p = seen ? expf(a.scale * ss[r * L::LDS + c] - lse_s[r]) : 0.0f;
        ps[r * L::LDP + c] = __float2bfloat16(p);
        dss[r * L::LDP + c] = __float2bfloat16(a.scale * p * (dps[r * L::LDS + c] - delta_s[r]));
    }
}

// dQ of this warp's 16 query rows, (scale dS) K, staged in fp32 and added to dq.
template <int DP>
__device__ void add_dq(const BwdArgs &a, unsigned char *raw, int64_t i0, int qlen, int h,
                       int warp) {
    using L = BwdLayout<DP>;
    const bf16 *ks = (const bf16 *)(raw + L::K), *dss = (const bf16 *)(raw + L::DS);
    float *stage = (float *)(raw + L::S) + warp * 16 * L::LDO;
#pragma unroll
    for (int ct = 0; ct < DP / 16; ct++) {
        Acc qf;
        wmma::fill_fragment(qf, 0.0f);
#pragma unroll
        for (int kt = 0; kt < MB / 16; kt++) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> sa;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> kb;
            wmma::load_matrix_sync(sa, dss + warp * 16 * L::LDP + kt * 16, L::LDP);
            wmma::load_matrix_sync(kb, ks + kt * 16 * L::LDH + ct * 16, L::LDH);
            wmma::mma_sync(qf, sa, kb, qf);
        }
        wmma::store_matrix_sync(stage + ct * 16, qf, L::LDO, wmma::mem_row_major);
    }
    __syncwarp();
    for (int x = threadIdx.x % 32; x < 16 * a.d; x += 32) {
        int rr = x / a.d, c = x - rr * a.d;
        if (warp * 16 + rr < qlen)
            atomicAdd(a.dq + (i0 + warp * 16 + rr) * a.stride_q + (int64_t)h * a.d + c,
                      stage[rr * L::LDO + c]);
    }
}

// dK or dV of this warp's 16 keys, from fragments through the staging rows, added to out.
template <int DP>
__device__ void add_dkv(const BwdArgs &a, unsigned char *raw, const Acc *acc, float *out,
                        int64_t j0, int klen, int warp) {
    using L = BwdLayout<DP>;
    float *stage = (float *)(raw + L::S) + warp * 16 * L::LDO;
    __syncwarp();
#pragma unroll
    for (int ct = 0; ct < DP / 16; ct++)
        wmma::store_matrix_sync(stage + ct * 16, acc[ct], L::LDO, wmma::mem_row_major);
    __syncwarp();
    for (int x = threadIdx.x % 32; x < 16 * a.d; x += 32) {
        int rr = x / a.d, c = x - rr * a.d;
        if (warp * 16 + rr < klen)
            out[(j0 + warp * 16 + rr) * a.stride_kv + (int64_t)blockIdx.y * a.d + c] +=
                stage[rr * L::LDO + c];
    }
}

// One thread block per (64 keys, kv head), 4 warps: warp w owns query rows 16w.. of S, dP
// and dQ, and key rows 16w.. of dK and dV, whose fragments stay in registers throughout.
template <int DP> __global__ void __launch_bounds__(MW * 32) bwd_mma(BwdArgs a) {
    using L = BwdLayout<DP>;
    extern __shared__ __align__(128) unsigned char raw[];
    bf16 *qs = (bf16 *)(raw + L::Q), *dos = (bf16 *)(raw + L::DO);
    bf16 *ks = (bf16 *)(raw + L::K), *vs = (bf16 *)(raw + L::V);
    const bf16 *ps = (const bf16 *)(raw + L::P), *dss = (const bf16 *)(raw + L::DS);
    float *lse_s = (float *)(raw + L::ROW), *delta_s = lse_s + MB;
    int64_t *qpos_s = (int64_t *)(raw + L::POS), *kpos_s = qpos_s + MB;
    const int warp = threadIdx.x / 32, d = a.d, g = blockIdx.y, per = a.heads / a.kv_heads;
    const int64_t j0 = (int64_t)blockIdx.x * MB;
    const int klen = a.nk - j0 < MB ? (int)(a.nk - j0) : MB;
    spar__load_bf16_rows<DP, L::LDH>(ks, (const bf16 *)a.k, j0, klen, a.stride_kv, (int64_t)g * d,
                                     d, a.vec);
    spar__load_bf16_rows<DP, L::LDH>(vs, (const bf16 *)a.v, j0, klen, a.stride_kv, (int64_t)g * d,
                                     d, a.vec);
    if (threadIdx.x < MB)
        kpos_s[threadIdx.x] = a.causal && threadIdx.x < klen ? a.kpos[j0 + threadIdx.x] : 0;
    const int64_t kfirst = a.causal ? a.kpos[j0] : 0;
    Acc dk[DP / 16], dv[DP / 16];
#pragma unroll
    for (int ct = 0; ct < DP / 16; ct++)
        wmma::fill_fragment(dk[ct], 0.0f), wmma::fill_fragment(dv[ct], 0.0f);
    for (int h = g * per; h < (g + 1) * per; h++) {
        for (int64_t i0 = 0; i0 < a.nq; i0 += MB) {
            const int qlen = a.nq - i0 < MB ? (int)(a.nq - i0) : MB;
            if (a.causal && a.qpos[i0 + qlen - 1] < kfirst) continue;
            __syncthreads(); // the previous tile's Q, dO, P, dS and staging are free
            spar__load_bf16_rows<DP, L::LDH>(qs, (const bf16 *)a.q, i0, qlen, a.stride_q,
                                             (int64_t)h * d, d, a.vec);
            spar__load_bf16_rows<DP, L::LDH>(dos, (const bf16 *)a.dout, i0, qlen, a.stride_q,
                                             (int64_t)h * d, d, a.vec);
            if (threadIdx.x < MB) {
                int r = threadIdx.x;
                lse_s[r] = r < qlen ? a.lse[(i0 + r) * a.stride_lse + h] : -INFINITY;
                delta_s[r] = r < qlen ? a.delta[(i0 + r) * a.stride_lse + h] : 0.0f;
                qpos_s[r] = a.causal && r < qlen ? a.qpos[i0 + r] : -1;
            }
            __syncthreads();
            scores<DP>(raw, warp);
            __syncwarp();
            probs<DP>(a, raw, klen, warp);
            __syncthreads(); // dK and dV read every warp's rows of P and dS
#pragma unroll
            for (int kt = 0; kt < MB / 16; kt++) { // dV += P^T dO, dK += (scale dS)^T Q
                wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::col_major> pt, st;
                wmma::load_matrix_sync(pt, ps + kt * 16 * L::LDP + warp * 16, L::LDP);
                wmma::load_matrix_sync(st, dss + kt * 16 * L::LDP + warp * 16, L::LDP);
#pragma unroll
                for (int ct = 0; ct < DP / 16; ct++) {
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> ob, qb;
                    wmma::load_matrix_sync(ob, dos + kt * 16 * L::LDH + ct * 16, L::LDH);
                    wmma::mma_sync(dv[ct], pt, ob, dv[ct]);
                    wmma::load_matrix_sync(qb, qs + kt * 16 * L::LDH + ct * 16, L::LDH);
                    wmma::mma_sync(dk[ct], st, qb, dk[ct]);
                }
            }
            add_dq<DP>(a, raw, i0, qlen, h, warp);
        }
    }
    __syncthreads(); // the staging rows are free
    add_dkv<DP>(a, raw, dk, a.dk, j0, klen, warp);
    add_dkv<DP>(a, raw, dv, a.dv, j0, klen, warp);
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

template <int DP> int launch_mma(const BwdArgs &a, cudaStream_t stream) {
    size_t smem = BwdLayout<DP>::BYTES;
    SPAR_TRY(spar__cuda_smem_optin(bwd_mma<DP>, smem));
    dim3 grid((unsigned)((a.nk + MB - 1) / MB), (unsigned)a.kv_heads);
    bwd_mma<DP><<<grid, MW * 32, smem, stream>>>(a);
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
    if (!wide) return a.d <= 64 ? launch_mma<64>(a, stream) : launch_mma<128>(a, stream);
    return launch<__nv_bfloat16, 16>(a, stream);
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
