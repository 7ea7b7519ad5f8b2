// softmax_fwd.cu: softmax attention block forward on device-resident tensors
// (spar_cuda_softmax_fwd, cuda_kernels.h): the queries of the block attend to its keys and
// the result is merged exactly into their running (o, lse) (DESIGN.md 3.1). One pass over
// K/V per query tile, online softmax in the log2 domain, no N x N buffer; with causal, the
// key tiles after the tile's last query are never loaded.
//
// Two kernels:
//   fwd_mma   bfloat16 storage, head_dim <= 128 (padded to 64 or 128): tensor cores
//             (nvcuda::wmma 16x16x16, fp32 accumulation) for S = Q K^T and O += P V.
//             A thread block is 4 warps and 64 queries of one head; each warp owns 16
//             query rows; Q fragments and the fp32 O accumulators stay in registers
//             (rows rescaled per key tile through a probed map of the fragment layout),
//             K and V tiles of 64 keys are staged in shared memory.
//   fwd_simt  everything else (fp32 storage, any head_dim <= 256, templated on 64, 128
//             and 256 columns): 64 queries per block, 4 threads per query row, each
//             owning every 4th column of q and of the output in registers; key tiles of
//             32 rows in shared memory, scores reduced across the 4 threads by shuffles.
#include <mma.h>
#include <stdint.h>

#include "cuda_common.cuh" // defines: SPAR_CUDA_CHECK, spar__load, spar__merge_lse

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

// ---- fwd_mma ------------------------------------------------------------------------
namespace wmma = nvcuda::wmma;
using bf16 = __nv_bfloat16;
constexpr int MQ = 64, MK = 64, WARPS = 4; // queries per block, keys per tile, warps

// Shared memory of fwd_mma, rows padded against bank conflicts. P (bf16 probabilities)
// reuses Q's space (Q is read into fragments once, before the first key tile); at the
// end O is staged in fp32 where K and V were. About 70 KiB at DP = 128: three blocks fit
// on an sm_90 multiprocessor.
template <int DP> struct MmaLayout {
    static constexpr int LDH = DP + 8, LDS = MK + 4, LDP = MK + 8, LDO = DP + 4;
    static constexpr size_t Q = 0, P = 0, K = Q + sizeof(bf16) * MQ * LDH, O = K,
                            V = K + sizeof(bf16) * MK * LDH, S = V + sizeof(bf16) * MK * LDH,
                            ROW = S + sizeof(float) * MQ * LDS, POS = ROW + sizeof(float) * 3 * MQ,
                            BYTES = POS + sizeof(int64_t) * (MQ + MK);
    static_assert(sizeof(bf16) * MQ * LDP <= K - Q, "P fits in Q's space");
    static_assert(sizeof(float) * MQ * LDO <= S - K, "O fits in K's and V's space");
};

// One warp's online-softmax step on its 16 rows of scores: masks, new maxima, P in bf16,
// and the factor each row's output must be rescaled by (rowc).
template <int DP> __device__ void softmax_rows(const FwdArgs &a, unsigned char *raw, int klen) {
    using L = MmaLayout<DP>;
    float *ss = (float *)(raw + L::S), *rowm = (float *)(raw + L::ROW);
    float *rowl = rowm + MQ, *rowc = rowl + MQ;
    bf16 *ps = (bf16 *)(raw + L::P);
    const int64_t *qpos_s = (const int64_t *)(raw + L::POS), *kpos_s = qpos_s + MQ;
    const int lane = threadIdx.x % 32, r = threadIdx.x / 32 * 16 + lane / 2, c0 = lane % 2 * 32;
    float *srow = ss + r * L::LDS, mt = rowm[r], psum = 0.0f;
    for (int c = c0; c < c0 + 32; c++) {
        bool seen = c < klen && (!a.causal || kpos_s[c] <= qpos_s[r]);
        srow[c] = seen ? srow[c] * a.scale_log2 : -INFINITY;
        mt = fmaxf(mt, srow[c]);
    }
    mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 1));
    for (int c = c0; c < c0 + 32; c++) {
        float p = mt == -INFINITY ? 0.0f : exp2f(srow[c] - mt);
        psum += p;
        ps[r * L::LDP + c] = __float2bfloat16(p);
    }
    psum += __shfl_xor_sync(0xffffffffu, psum, 1);
    if (c0 == 0) {
        float corr = mt == -INFINITY ? 1.0f : exp2f(rowm[r] - mt);
        rowl[r] = rowl[r] * corr + psum, rowc[r] = corr;
        if (mt != -INFINITY) rowm[r] = mt;
    }
}

using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// Which row of its 16 x 16 tile each element of this lane's accumulator fragment holds:
// wmma does not document the layout, so each warp loads a tile of row numbers once.
__device__ void probe_rows(Acc &rows, float *scratch, int ld) {
    for (int x = threadIdx.x % 32; x < 256; x += 32)
        scratch[x / 16 * ld + x % 16] = (float)(x / 16);
    __syncwarp();
    wmma::load_matrix_sync(rows, scratch, ld, wmma::mem_row_major);
    __syncwarp();
}

template <int DP> __global__ void __launch_bounds__(WARPS * 32) fwd_mma(FwdArgs a) {
    using L = MmaLayout<DP>;
    extern __shared__ __align__(128) unsigned char raw[];
    bf16 *qs = (bf16 *)(raw + L::Q), *ks = (bf16 *)(raw + L::K), *vs = (bf16 *)(raw + L::V);
    float *ss = (float *)(raw + L::S), *os = (float *)(raw + L::O), *rowm = (float *)(raw + L::ROW);
    float *rowl = rowm + MQ, *rowc = rowl + MQ;
    bf16 *ps = (bf16 *)(raw + L::P);
    int64_t *qpos_s = (int64_t *)(raw + L::POS), *kpos_s = qpos_s + MQ;
    const int warp = threadIdx.x / 32, d = a.d;
    const int h = blockIdx.y, g = h / (a.heads / a.kv_heads);
    const int64_t i0 = (int64_t)blockIdx.x * MQ;
    const int qlen = a.nq - i0 < MQ ? (int)(a.nq - i0) : MQ;
    spar__load_bf16_rows<DP, L::LDH>(qs, (const bf16 *)a.q, i0, qlen, a.stride_q, (int64_t)h * d, d,
                                     a.vec);
    if (threadIdx.x < MQ) {
        rowm[threadIdx.x] = -INFINITY, rowl[threadIdx.x] = 0.0f;
        qpos_s[threadIdx.x] = a.causal && threadIdx.x < qlen ? a.qpos[i0 + threadIdx.x] : -1;
    }
    Acc rows, of[DP / 16]; // O of this warp's 16 rows stays in registers
    probe_rows(rows, ss + warp * 16 * L::LDS, L::LDS);
#pragma unroll
    for (int ct = 0; ct < DP / 16; ct++)
        wmma::fill_fragment(of[ct], 0.0f);
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> qf[DP / 16];
#pragma unroll
    for (int kt = 0; kt < DP / 16; kt++)
        wmma::load_matrix_sync(qf[kt], qs + warp * 16 * L::LDH + kt * 16, L::LDH);
    const int64_t qlast = a.causal ? a.qpos[i0 + qlen - 1] : 0;
    for (int64_t j0 = 0; j0 < a.nk; j0 += MK) {
        if (a.causal && a.kpos[j0] > qlast) break;
        const int klen = a.nk - j0 < MK ? (int)(a.nk - j0) : MK;
        __syncthreads(); // every warp is done with the previous K, V tile (and with Q)
        spar__load_bf16_rows<DP, L::LDH>(ks, (const bf16 *)a.k, j0, klen, a.stride_kv,
                                         (int64_t)g * d, d, a.vec);
        spar__load_bf16_rows<DP, L::LDH>(vs, (const bf16 *)a.v, j0, klen, a.stride_kv,
                                         (int64_t)g * d, d, a.vec);
        if (threadIdx.x < MK)
            kpos_s[threadIdx.x] = a.causal && threadIdx.x < klen ? a.kpos[j0 + threadIdx.x] : 0;
        __syncthreads();
#pragma unroll
        for (int nt = 0; nt < MK / 16; nt++) { // S = Q K^T, this warp's 16 rows
            Acc sf;
            wmma::fill_fragment(sf, 0.0f);
#pragma unroll
            for (int kt = 0; kt < DP / 16; kt++) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> kf;
                wmma::load_matrix_sync(kf, ks + nt * 16 * L::LDH + kt * 16, L::LDH);
                wmma::mma_sync(sf, qf[kt], kf, sf);
            }
            wmma::store_matrix_sync(ss + warp * 16 * L::LDS + nt * 16, sf, L::LDS,
                                    wmma::mem_row_major);
        }
        __syncwarp();
        softmax_rows<DP>(a, raw, klen);
        __syncwarp();
#pragma unroll
        for (int ct = 0; ct < DP / 16; ct++) { // O = O * corr + P V
            for (int e = 0; e < of[ct].num_elements; e++)
                of[ct].x[e] *= rowc[warp * 16 + (int)rows.x[e]];
#pragma unroll
            for (int kt = 0; kt < MK / 16; kt++) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> pf;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> vf;
                wmma::load_matrix_sync(pf, ps + warp * 16 * L::LDP + kt * 16, L::LDP);
                wmma::load_matrix_sync(vf, vs + kt * 16 * L::LDH + ct * 16, L::LDH);
                wmma::mma_sync(of[ct], pf, vf, of[ct]);
            }
        }
    }
    __syncthreads(); // K and V are free: O goes there
#pragma unroll
    for (int ct = 0; ct < DP / 16; ct++)
        wmma::store_matrix_sync(os + warp * 16 * L::LDO + ct * 16, of[ct], L::LDO,
                                wmma::mem_row_major);
    __syncthreads();
    // Merge into the running partial: 2 threads per query row, alternate columns.
    const int r = threadIdx.x / 2, half = threadIdx.x % 2;
    if (r >= qlen || rowl[r] == 0.0f) return;
    const int64_t i = i0 + r;
    float *orow = a.o + i * a.stride_q + (int64_t)h * d, *lp = a.lse + i * a.stride_lse + h;
    float la = *lp, wa, wb;
    __syncwarp(0x3u << (threadIdx.x & 30));
    float lse = spar__merge_lse(la, (rowm[r] + log2f(rowl[r])) * LN2, &wa, &wb);
    wb /= rowl[r];
    for (int c = half; c < d; c += 2)
        orow[c] = wa * orow[c] + wb * os[r * L::LDO + c];
    if (half == 0) *lp = lse;
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

template <int DP> int launch_mma(const FwdArgs &a, cudaStream_t stream) {
    size_t smem = MmaLayout<DP>::BYTES;
    SPAR_TRY(spar__cuda_smem_optin(fwd_mma<DP>, smem));
    dim3 grid((unsigned)((a.nq + MQ - 1) / MQ), (unsigned)a.heads);
    fwd_mma<DP><<<grid, WARPS * 32, smem, stream>>>(a);
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
    if (a.d <= 64) return launch_mma<64>(a, stream);
    if (a.d <= 128) return launch_mma<128>(a, stream);
    return launch_simt_d<bf16>(a, stream);
}
