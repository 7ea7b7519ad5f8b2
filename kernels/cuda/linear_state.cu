// linear_state.cu: the O(n d^2) state products of linear attention on device-resident
// tensors (spar_cuda_linear_state, _fwd_state, _dstate, _bwd_state; meanings in kernels.h
// at spar_linear_state and its neighbours). Two kernels:
//   outer   out[s] = sum over the state's heads of sum_i w_i x_i^T y_i   (a d x d state)
//           state:  x = k, y = v of the state's kv head, w_i = lambda^(n-1-i)
//           dstate: x = q, y = dout of each query head of the state, w_i = lambda_h^(i+1)
//           A thread block owns a 32 x 32 tile of one state and walks the tokens in
//           chunks of 32 staged in shared memory.
//   rowmat  out_i += w_i x_i M (or M^T), M a d x d state
//           fwd_state: o += c q s        dq: dq += c dout s^T       (c = lambda_h^(i+1))
//           dk: dk += e v dkv^T          dv: dv += e k dkv           (e = lambda^(n-1-j))
//           A thread block owns 32 tokens, one head or state and 32 output columns; the
//           matching 32 columns of M sit in shared memory. Outputs are added with fp32
//           atomics (several states may feed one kv head).
// Without causal every weight is 1. float32 or bfloat16 inputs; states are fp32.
#include <math.h>
#include <stdint.h>

#include "cuda_common.cuh" // defines: SPAR_CUDA_CHECK, spar__load, spar__decays

namespace {

constexpr int TILE = 32, THREADS = 256;

struct Dims {
    int heads, kv_heads, state_heads, d;
    int64_t n;
    bool causal;
    spar__decays decay;
};

__device__ __forceinline__ int kv_of_state(const Dims &m, int s) {
    return m.state_heads == m.heads ? s / (m.heads / m.kv_heads) : s;
}

// w_i: lambda^(i+1) (toward the entering state) or lambda^(n-1-i) (toward the leaving one).
__device__ __forceinline__ float weight(const Dims &m, float log_decay, int64_t i, bool entering) {
    if (!m.causal) return 1.0f;
    return spar__cuda_pow(log_decay, (float)(entering ? i + 1 : m.n - 1 - i));
}

struct OuterArgs {
    Dims m;
    bool dstate; // false: the memory state of k, v
    const void *x, *y;
    float *out;
};

template <typename T> __global__ void __launch_bounds__(THREADS) outer(OuterArgs o) {
    __shared__ float xs[TILE][TILE], ys[TILE][TILE + 1];
    const Dims &m = o.m;
    const int d = m.d, tiles = (d + TILE - 1) / TILE, s = blockIdx.y;
    const int a0 = blockIdx.x / tiles * TILE, b0 = blockIdx.x % tiles * TILE;
    const int hps = m.heads / m.state_heads, b = threadIdx.x % TILE, arow = threadIdx.x / TILE;
    const int units = o.dstate ? hps : 1;
    float acc[TILE * TILE / THREADS] = {};
    for (int u = 0; u < units; u++) {
        int head = o.dstate ? s * hps + u : kv_of_state(m, s);
        int count = o.dstate ? m.heads : m.kv_heads;
        float lg = m.decay.log_decay[o.dstate ? head : s * hps];
        for (int64_t i0 = 0; i0 < m.n; i0 += TILE) {
            __syncthreads();
            for (int e = threadIdx.x; e < TILE * TILE; e += blockDim.x) {
                int r = e / TILE, c = e % TILE;
                int64_t i = i0 + r, row = (i * count + head) * d;
                bool in = i < m.n;
                xs[r][c] = in && a0 + c < d ? weight(m, lg, i, o.dstate) *
                                                  spar__load((const T *)o.x, row + a0 + c)
                                            : 0.0f;
                ys[r][c] = in && b0 + c < d ? spar__load((const T *)o.y, row + b0 + c) : 0.0f;
            }
            __syncthreads();
#pragma unroll
            for (int k = 0; k < TILE * TILE / THREADS; k++) {
                int a = arow + k * (THREADS / TILE);
                for (int r = 0; r < TILE; r++)
                    acc[k] += xs[r][a] * ys[r][b];
            }
        }
    }
#pragma unroll
    for (int k = 0; k < TILE * TILE / THREADS; k++) {
        int a = a0 + arow + k * (THREADS / TILE);
        if (a < d && b0 + b < d) o.out[((int64_t)s * d + a) * d + b0 + b] = acc[k];
    }
}

enum Mode { FWD_STATE, DQ, DK, DV };

struct RowMatArgs {
    Dims m;
    Mode mode;
    const void *x;
    const float *mat; // [state_heads, d, d]
    float *out;
};

size_t rowmat_smem(int d) { // M columns [d][TILE + 1], x rows [TILE][d + 1]
    return sizeof(float) * ((size_t)d * (TILE + 1) + (size_t)TILE * (d + 1));
}

template <typename T> __global__ void __launch_bounds__(THREADS) rowmat(RowMatArgs r) {
    extern __shared__ float sm[];
    const Dims &m = r.m;
    const int d = m.d, ld = d + 1, u = blockIdx.y, c0 = blockIdx.z * TILE;
    const int64_t i0 = (int64_t)blockIdx.x * TILE;
    const bool per_head = r.mode == FWD_STATE || r.mode == DQ;
    const bool trans = r.mode == DQ || r.mode == DK;
    const int hps = m.heads / m.state_heads;
    const int state = per_head ? u / hps : u, head = per_head ? u : kv_of_state(m, u);
    const int count = per_head ? m.heads : m.kv_heads;
    const float lg = m.decay.log_decay[per_head ? u : u * hps];
    float *ms = sm, *xs = sm + d * (TILE + 1);
    const float *mat = r.mat + (int64_t)state * d * d;
    for (int e = threadIdx.x; e < d * TILE; e += blockDim.x) {
        int a = e / TILE, c = e % TILE;
        float v = 0.0f;
        if (c0 + c < d) v = trans ? mat[(int64_t)(c0 + c) * d + a] : mat[(int64_t)a * d + c0 + c];
        ms[a * (TILE + 1) + c] = v;
    }
    for (int e = threadIdx.x; e < TILE * d; e += blockDim.x) {
        int t = e / d, a = e - t * d;
        int64_t i = i0 + t;
        xs[t * ld + a] = i < m.n ? weight(m, lg, i, per_head) *
                                       spar__load((const T *)r.x, (i * count + head) * d + a)
                                 : 0.0f;
    }
    __syncthreads();
    const int c = threadIdx.x % TILE;
    for (int t = threadIdx.x / TILE; t < TILE; t += THREADS / TILE) {
        int64_t i = i0 + t;
        if (i >= m.n || c0 + c >= d) continue;
        float acc = 0.0f;
        for (int a = 0; a < d; a++)
            acc += xs[t * ld + a] * ms[a * (TILE + 1) + c];
        atomicAdd(r.out + (i * count + head) * d + c0 + c, acc);
    }
}

Dims dims_of(const spar_linear_dims *dims, bool causal, int64_t n) {
    Dims m = {};
    m.heads = dims->heads, m.kv_heads = dims->kv_heads, m.state_heads = dims->state_heads;
    m.d = dims->head_dim, m.n = n, m.causal = causal;
    for (int h = 0; h < dims->heads; h++)
        m.decay.log_decay[h] = (float)log(dims->decay[h]);
    return m;
}

int run_outer(const OuterArgs &o, spar_cuda_dtype dtype, cudaStream_t stream) {
    int tiles = (o.m.d + TILE - 1) / TILE;
    dim3 grid((unsigned)(tiles * tiles), (unsigned)o.m.state_heads);
    if (dtype == SPAR_CUDA_F32)
        outer<float><<<grid, THREADS, 0, stream>>>(o);
    else
        outer<__nv_bfloat16><<<grid, THREADS, 0, stream>>>(o);
    spar__cuda_launched();
    return SPAR_OK;
}

template <typename T> int launch_rowmat(const RowMatArgs &r, cudaStream_t stream) {
    size_t smem = rowmat_smem(r.m.d);
    SPAR_TRY(spar__cuda_smem_optin(rowmat<T>, smem));
    int units = r.mode == FWD_STATE || r.mode == DQ ? r.m.heads : r.m.state_heads;
    dim3 grid((unsigned)((r.m.n + TILE - 1) / TILE), (unsigned)units,
              (unsigned)((r.m.d + TILE - 1) / TILE));
    rowmat<T><<<grid, THREADS, smem, stream>>>(r);
    spar__cuda_launched();
    return SPAR_OK;
}

int run_rowmat(const RowMatArgs &r, spar_cuda_dtype dtype, cudaStream_t stream) {
    if (r.m.n == 0) return SPAR_OK;
    return dtype == SPAR_CUDA_F32 ? launch_rowmat<float>(r, stream)
                                  : launch_rowmat<__nv_bfloat16>(r, stream);
}

} // namespace

extern "C" int spar_cuda_linear_state(const spar_linear_dims *dims, bool causal,
                                      spar_cuda_dtype dtype, int64_t n, const void *k,
                                      const void *v, float *m, spar_cuda_stream stream) {
    SPAR_TRY(spar__cuda_check_linear(dims));
    OuterArgs o = {dims_of(dims, causal, n), false, k, v, m};
    return run_outer(o, dtype, stream);
}

extern "C" int spar_cuda_linear_dstate(const spar_linear_dims *dims, bool causal,
                                       spar_cuda_dtype dtype, int64_t n, const void *q,
                                       const void *dout, float *ds, spar_cuda_stream stream) {
    SPAR_TRY(spar__cuda_check_linear(dims));
    OuterArgs o = {dims_of(dims, causal, n), true, q, dout, ds};
    return run_outer(o, dtype, stream);
}

extern "C" int spar_cuda_linear_fwd_state(const spar_linear_dims *dims, bool causal,
                                          spar_cuda_dtype dtype, int64_t n, const void *q,
                                          const float *s, float *o, spar_cuda_stream stream) {
    SPAR_TRY(spar__cuda_check_linear(dims));
    RowMatArgs r = {dims_of(dims, causal, n), FWD_STATE, q, s, o};
    return run_rowmat(r, dtype, stream);
}

extern "C" int spar_cuda_linear_bwd_state(const spar_linear_dims *dims, bool causal,
                                          spar_cuda_dtype dtype, int64_t n, const void *k,
                                          const void *v, const void *dout, const float *s,
                                          const float *dkv, float *dq, float *dk, float *dv,
                                          spar_cuda_stream stream) {
    SPAR_TRY(spar__cuda_check_linear(dims));
    Dims m = dims_of(dims, causal, n);
    if (s) SPAR_TRY(run_rowmat(RowMatArgs{m, DQ, dout, s, dq}, dtype, stream));
    if (!dkv) return SPAR_OK;
    SPAR_TRY(run_rowmat(RowMatArgs{m, DK, v, dkv, dk}, dtype, stream));
    return run_rowmat(RowMatArgs{m, DV, k, dkv, dv}, dtype, stream);
}
