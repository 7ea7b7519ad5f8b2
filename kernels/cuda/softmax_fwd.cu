// softmax_fwd.cu: softmax attention block forward on device-resident tensors
// (spar_cuda_softmax_fwd, cuda_kernels.h): the queries of the block attend to its keys and
// the result is merged exactly into their running (o, lse) (DESIGN.md 3.1). One pass over
// K/V per query tile, online softmax in the log2 domain, no N x N buffer; with causal, the
// key tiles after the tile's last query are never loaded.
//
// Two kernels:
//   fwd_tc    bfloat16 storage, head_dim a multiple of 8 up to 128 (padded to 64 or 128),
//             16-byte aligned rows: tensor cores (mma.sync m16n8k16, fp32 accumulation)
//             for S = Q K^T and O += P V, scores and probabilities in registers, K/V
//             tiles copied asynchronously one stage ahead (details at the kernel).
//   fwd_simt  everything else (fp32 storage, any head_dim <= 256, templated on 64, 128
//             and 256 columns): 64 queries per block, 4 threads per query row, each
//             owning every 4th column of q and of the output in registers; key tiles of
//             32 rows in shared memory, scores reduced across the 4 threads by shuffles.
#include <stdint.h>

#include "cuda_common.cuh" // defines: SPAR_CUDA_CHECK, spar__load, spar__merge_lse,
                           //          spar__load_rows_async, the cuda_mma.cuh instructions

namespace {

constexpr float LOG2E = 1.4426950408889634f, LN2 = 0.6931471805599453f;

struct FwdArgs {
    int heads, kv_heads, d;
    float scale_log2; // softmax scale times log2(e): scores in the log2 domain
    bool causal, vec; // vec: 16-byte loads are aligned (d, strides multiples of 8)
    int64_t nq, nk, stride_q, stride_lse, stride_kv;
    const void *q, *k, *v;
    const int64_t *qpos, *kpos;
    float *o, *lse;
};

// ---- fwd_simt -----------------------------------------------------------------------
constexpr int SQ = 64, SK = 32, LANES = 4; // queries per block, keys per tile, threads/row

template <typename T, int DMAX> __global__ void __launch_bounds__(SQ *LANES) fwd_simt(FwdArgs a) {
    constexpr int PER = DMAX / LANES;
    extern __shared__ float tile[]; // keys [SK][d], then values [SK][d]
    __shared__ int64_t kpos_s[SK];
    const int d = a.d, h = blockIdx.y, g = h / (a.heads / a.kv_heads);
    const int row = threadIdx.x / LANES, sub = threadIdx.x % LANES;
    const int64_t i0 = (int64_t)blockIdx.x * SQ, i = i0 + row;
    const int64_t last = (i0 + SQ < a.nq ? i0 + SQ : a.nq) - 1;
    const bool live = i < a.nq;
    const T *q = (const T *)a.q, *k = (const T *)a.k, *v = (const T *)a.v;
    float *ks = tile, *vs = tile + SK * d;
    float qr[PER], acc[PER], m = -INFINITY, l = 0.0f;
#pragma unroll
    for (int x = 0; x < PER; x++) {
        int c = sub + LANES * x;
        qr[x] = live && c < d ? a.scale_log2 * spar__load(q, i * a.stride_q + (int64_t)h * d + c)
                              : 0.0f;
        acc[x] = 0.0f;
    }
    const int64_t qp = a.causal && live ? a.qpos[i] : 0, qlast = a.causal ? a.qpos[last] : 0;
    for (int64_t j0 = 0; j0 < a.nk; j0 += SK) {
        if (a.causal && a.kpos[j0] > qlast) break; // positions increase: nothing later is seen
        const int len = a.nk - j0 < SK ? (int)(a.nk - j0) : SK;
        __syncthreads(); // the previous tile is no longer read
        for (int x = threadIdx.x; x < len * d; x += blockDim.x) {
            int r = x / d, c = x - r * d;
            int64_t src = (j0 + r) * a.stride_kv + (int64_t)g * d + c;
            ks[x] = spar__load(k, src), vs[x] = spar__load(v, src);
        }
        if (a.causal && threadIdx.x < len) kpos_s[threadIdx.x] = a.kpos[j0 + threadIdx.x];
        __syncthreads();
        float s[SK], mt = m;
#pragma unroll
        for (int t = 0; t < SK; t++) {
            float part = 0.0f;
#pragma unroll
            for (int x = 0; x < PER; x++) {
                int c = sub + LANES * x;
                if (t < len && c < d) part += qr[x] * ks[t * d + c];
            }
            part += __shfl_xor_sync(0xffffffffu, part, 1);
            part += __shfl_xor_sync(0xffffffffu, part, 2);
            bool seen = t < len && (!a.causal || kpos_s[t] <= qp);
            s[t] = seen ? part : -INFINITY;
            mt = fmaxf(mt, s[t]);
        }
        if (mt == -INFINITY) continue; // this row has seen no key yet
        float corr = exp2f(m - mt);
        l *= corr;
#pragma unroll
        for (int x = 0; x < PER; x++)
            acc[x] *= corr;
#pragma unroll
        for (int t = 0; t < SK; t++) {
            float p = exp2f(s[t] - mt);
            l += p;
#pragma unroll
            for (int x = 0; x < PER; x++) {
                int c = sub + LANES * x;
                if (t < len && c < d) acc[x] += p * vs[t * d + c];
            }
        }
        m = mt;
    }
    if (!live || l == 0.0f) return; // no visible key: the running partial stays as it is
    float *orow = a.o + i * a.stride_q + (int64_t)h * d, *lp = a.lse + i * a.stride_lse + h;
    float la = *lp, wa, wb;
    __syncwarp(0xFu << (threadIdx.x & 28)); // the row's 4 threads have read lse
    float lse = spar__merge_lse(la, (m + log2f(l)) * LN2, &wa, &wb);
    wb /= l;
#pragma unroll
    for (int x = 0; x < PER; x++) {
        int c = sub + LANES * x;
        if (c < d) orow[c] = wa * orow[c] + wb * acc[x];
    }
    if (sub == 0) *lp = lse;
}

// ---- fwd_tc -------------------------------------------------------------------------
using bf16 = __nv_bfloat16;
constexpr int TC_WARPS = 4, TC_BQ = 16 * TC_WARPS, TC_BK = 64; // queries, keys per tile

// Shared memory of fwd_tc: the Q tile, then two stages of a K tile and a V tile, rows
// DP + 8 bf16 apart so that the 8 rows one ldmatrix reads fall in different banks. About
// 85 KiB at DP = 128: two blocks fit on a multiprocessor.
template <int DP> struct TcLayout {
    static constexpr int LD = DP + 8;
    static constexpr size_t Q = 0, KV = Q + sizeof(bf16) * TC_BQ * LD,
                            STAGE = sizeof(bf16) * 2 * TC_BK * LD, BYTES = KV + 2 * STAGE;
};

// bfloat16 storage, d a multiple of 8 up to DP (64 or 128), 16-byte aligned rows. A block
// is 4 warps and 64 queries of one head; each warp owns 16 query rows, whose Q fragments,
// scores, probabilities and fp32 output stay in registers (cuda_mma.cuh: a score tile
// packed to bf16 is the A operand of P V). K and V tiles of 64 keys are copied
// asynchronously into one stage while the warps compute on the other.
template <int DP> __global__ void __launch_bounds__(TC_WARPS * 32) fwd_tc(FwdArgs a) {
    using L = TcLayout<DP>;
    constexpr int LD = L::LD, KT = DP / 16, NT = TC_BK / 8, OT = DP / 8;
    extern __shared__ __align__(128) unsigned char raw[];
    __shared__ int64_t kpos_s[2][TC_BK];
    bf16 *qs = (bf16 *)(raw + L::Q);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, d = a.d;
    const int h = blockIdx.y, g = h / (a.heads / a.kv_heads);
    // With causal, later query tiles see more keys: they go first, so that the last blocks
    // to start (the tail of the launch) are the short ones.
    const int64_t i0 = (int64_t)(a.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x) * TC_BQ;
    const int qlen = a.nq - i0 < TC_BQ ? (int)(a.nq - i0) : TC_BQ;
    const bf16 *k = (const bf16 *)a.k, *v = (const bf16 *)a.v;
    const int64_t qlast = a.causal ? a.qpos[i0 + qlen - 1] : 0;
    // This lane's two rows (r, r + 8 of the warp's 16) and their positions.
    const int row0 = warp * 16 + lane / 4;
    int64_t qp[2] = {0, 0}, qfirst = 0;
    if (a.causal) {
        qp[0] = a.qpos[i0 + (row0 < qlen ? row0 : qlen - 1)];
        qp[1] = a.qpos[i0 + (row0 + 8 < qlen ? row0 + 8 : qlen - 1)];
        qfirst = a.qpos[i0 + (warp * 16 < qlen ? warp * 16 : qlen - 1)];
    }
    auto load_kv = [&](int stage, int64_t j0) {
        bf16 *ks = (bf16 *)(raw + L::KV + stage * L::STAGE), *vs = ks + TC_BK * LD;
        int klen = a.nk - j0 < TC_BK ? (int)(a.nk - j0) : TC_BK;
        spar__load_rows_async<DP, TC_BK, LD, TC_WARPS * 32>(ks, k, j0, klen, a.stride_kv,
                                                            (int64_t)g * d, d);
        spar__load_rows_async<DP, TC_BK, LD, TC_WARPS * 32>(vs, v, j0, klen, a.stride_kv,
                                                            (int64_t)g * d, d);
        if (threadIdx.x < TC_BK)
            kpos_s[stage][threadIdx.x] =
                a.causal && threadIdx.x < klen ? a.kpos[j0 + threadIdx.x] : INT64_MAX;
    };
    spar__load_rows_async<DP, TC_BQ, LD, TC_WARPS * 32>(qs, (const bf16 *)a.q, i0, qlen, a.stride_q,
                                                        (int64_t)h * d, d);
    load_kv(0, 0);
    spar__cp_async_commit();

    uint32_t qf[KT][4];
    float o[OT][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
#pragma unroll
    for (int t = 0; t < OT; t++)
        o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.0f;
    for (int64_t j0 = 0, stage = 0;; j0 += TC_BK, stage ^= 1) {
        const bool more = j0 + TC_BK < a.nk && (!a.causal || a.kpos[j0 + TC_BK] <= qlast);
        if (more) load_kv((int)stage ^ 1, j0 + TC_BK); // the stage every warp left last time
        spar__cp_async_commit();
        spar__cp_async_wait<1>(); // this thread's copies of the current stage are in
        __syncthreads();          // and so are everyone's
        if (j0 == 0)
#pragma unroll
            for (int kt = 0; kt < KT; kt++)
                spar__ldsm_x4(qf[kt], qs + (warp * 16 + lane % 16) * LD + kt * 16 + lane / 16 * 8);
        const bf16 *ks = (const bf16 *)(raw + L::KV + stage * L::STAGE), *vs = ks + TC_BK * LD;
        const int klen = a.nk - j0 < TC_BK ? (int)(a.nk - j0) : TC_BK;

        float s[NT][4]; // S = Q K^T, this warp's 16 rows x 64 keys
#pragma unroll
        for (int t = 0; t < NT; t++)
            s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.0f;
#pragma unroll
        for (int kt = 0; kt < KT; kt++)
#pragma unroll
            for (int t = 0; t < NT; t += 2) {
                uint32_t b[4];
                spar__ldsm_x4(b, ks + (t * 8 + lane % 8 + lane / 16 * 8) * LD + kt * 16 +
                                     lane / 8 % 2 * 8);
                spar__mma_bf16(s[t], qf[kt], b[0], b[1]);
                spar__mma_bf16(s[t + 1], qf[kt], b[2], b[3]);
            }

        // Online softmax in the log2 domain; masks only where the tile needs them.
        const bool edge = klen < TC_BK || (a.causal && kpos_s[stage][TC_BK - 1] > qfirst);
        float mt[2] = {m[0], m[1]};
#pragma unroll
        for (int t = 0; t < NT; t++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int col = t * 8 + 2 * (lane % 4) + (e & 1);
                float x = s[t][e] * a.scale_log2;
                if (edge && (col >= klen || (a.causal && kpos_s[stage][col] > qp[e / 2])))
                    x = -INFINITY;
                s[t][e] = x;
                mt[e / 2] = fmaxf(mt[e / 2], x);
            }
        float base[2], corr[2];
#pragma unroll
        for (int r = 0; r < 2; r++) { // the 4 lanes of a row hold its 64 columns
            mt[r] = fmaxf(mt[r], __shfl_xor_sync(0xffffffffu, mt[r], 1));
            mt[r] = fmaxf(mt[r], __shfl_xor_sync(0xffffffffu, mt[r], 2));
            base[r] = mt[r] == -INFINITY ? 0.0f : mt[r]; // no key seen yet: p = 0, not NaN
            corr[r] = exp2f(m[r] - base[r]);
            m[r] = mt[r], l[r] *= corr[r];
        }
#pragma unroll
        for (int t = 0; t < OT; t++)
            o[t][0] *= corr[0], o[t][1] *= corr[0], o[t][2] *= corr[1], o[t][3] *= corr[1];
#pragma unroll
        for (int t = 0; t < NT; t++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                s[t][e] = exp2f(s[t][e] - base[e / 2]);
                l[e / 2] += s[t][e];
            }

#pragma unroll
        for (int kk = 0; kk < TC_BK / 16; kk++) { // O += P V, 16 keys at a time
            uint32_t p[4] = {spar__pack_bf16(s[2 * kk][0], s[2 * kk][1]),
                             spar__pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                             spar__pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             spar__pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int t = 0; t < OT; t += 2) {
                uint32_t b[4];
                spar__ldsm_x4_t(b, vs + (kk * 16 + lane % 16) * LD + t * 8 + lane / 16 * 8);
                spar__mma_bf16(o[t], p, b[0], b[1]);
                spar__mma_bf16(o[t + 1], p, b[2], b[3]);
            }
        }
        __syncthreads(); // every warp is done with this stage before it is refilled
        if (!more) break;
    }
    spar__cp_async_wait<0>(); // nothing may still be landing when the block ends

    // Merge into the running partial: rows r and r + 8; the 4 lanes of a row share it.
    float la[2] = {0.0f, 0.0f};
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        if (row0 + 8 * r < qlen) la[r] = a.lse[(i0 + row0 + 8 * r) * a.stride_lse + h];
    }
    __syncwarp(); // every lane has read the old lse before one of them writes
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int row = row0 + 8 * r;
        if (row >= qlen || l[r] == 0.0f) continue; // no visible key: the partial stays
        const int64_t i = i0 + row;
        float wa, wb, lse = spar__merge_lse(la[r], (m[r] + log2f(l[r])) * LN2, &wa, &wb);
        wb /= l[r];
        float *orow = a.o + i * a.stride_q + (int64_t)h * d;
#pragma unroll
        for (int t = 0; t < OT; t++) {
            int col = t * 8 + 2 * (lane % 4);
            if (col < d) {
                orow[col] = wa * orow[col] + wb * o[t][2 * r];
                orow[col + 1] = wa * orow[col + 1] + wb * o[t][2 * r + 1];
            }
        }
        if (lane % 4 == 0) a.lse[i * a.stride_lse + h] = lse;
    }
}

// ---- launchers ----------------------------------------------------------------------
template <typename T, int DMAX> int launch_simt(const FwdArgs &a, cudaStream_t stream) {
    size_t smem = sizeof(float) * 2 * SK * (size_t)a.d;
    SPAR_TRY(spar__cuda_smem_optin(fwd_simt<T, DMAX>, smem));
    dim3 grid((unsigned)((a.nq + SQ - 1) / SQ), (unsigned)a.heads);
    fwd_simt<T, DMAX><<<grid, SQ * LANES, smem, stream>>>(a);
    spar__cuda_launched();
    return SPAR_OK;
}

template <typename T> int launch_simt_d(const FwdArgs &a, cudaStream_t stream) {
    if (a.d <= 64) return launch_simt<T, 64>(a, stream);
    if (a.d <= 128) return launch_simt<T, 128>(a, stream);
    return launch_simt<T, 256>(a, stream);
}

template <int DP> int launch_tc(const FwdArgs &a, cudaStream_t stream) {
    size_t smem = TcLayout<DP>::BYTES;
    SPAR_TRY(spar__cuda_smem_optin(fwd_tc<DP>, smem));
    dim3 grid((unsigned)((a.nq + TC_BQ - 1) / TC_BQ), (unsigned)a.heads);
    fwd_tc<DP><<<grid, TC_WARPS * 32, smem, stream>>>(a);
    spar__cuda_launched();
    return SPAR_OK;
}

bool aligned16(const void *p) {
    return ((uintptr_t)p & 15u) == 0;
}

} // namespace

extern "C" int spar_cuda_softmax_fwd(const spar_attn_dims *dims, bool causal, spar_cuda_dtype dtype,
                                     const spar_cuda_qblock *qb, const spar_cuda_kvblock *kb,
                                     spar_cuda_stream stream) {
    SPAR_TRY(spar__cuda_check_attn(dims, causal, qb->pos, kb->pos));
    if (qb->n == 0 || kb->n == 0) return SPAR_OK;
    FwdArgs a = {dims->heads,  dims->kv_heads, dims->head_dim, dims->scale * LOG2E,
                 causal,       false,          qb->n,          kb->n,
                 qb->stride_q, qb->stride_lse, kb->stride_kv,  qb->q,
                 kb->k,        kb->v,          qb->pos,        kb->pos,
                 qb->o,        qb->lse};
    a.vec = a.d % 8 == 0 && a.stride_q % 8 == 0 && a.stride_kv % 8 == 0 && aligned16(a.q) &&
            aligned16(a.k) && aligned16(a.v);
    if (dtype == SPAR_CUDA_F32) return launch_simt_d<float>(a, stream);
    if (a.vec && a.d <= 64) return launch_tc<64>(a, stream);
    if (a.vec && a.d <= 128) return launch_tc<128>(a, stream);
    return launch_simt_d<bf16>(a, stream);
}
