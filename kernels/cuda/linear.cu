// linear.cu: causal linear attention with decay inside one segment, on device-resident
// tensors (spar_cuda_linear_fwd_local, spar_cuda_linear_bwd_local; DESIGN.md 3.4):
//   o_i = sum_{j <= i} lambda^(i-j) (q_i . k_j) v_j,   lambda = decay of query head h.
// One chunked scan kernel does all four products. It walks the segment in chunks of 32
// tokens (forward or in reverse), and per chunk adds the intra-chunk part (masked, decayed
// A B^T, times C) to the inter-chunk part (A times the running d x 32 state), then decays
// the state and adds the chunk's B^T C. Work and memory are linear in n.
//   forward:  A = q, B = k, C = v  -> o
//   dq:       A = dout, B = v, C = k  -> dq          (the forward shape again)
//   dk:       reversed, A = v, B = dout, C = q -> dk  (sum over i >= j becomes j' <= i')
//   dv:       reversed, A = k, B = q, C = dout -> dv
// A thread block owns one query head and 32 columns of C (and of the output), so a head
// of d columns runs on ceil(d/32) blocks that each recompute the chunk's scores. dk and dv
// belong to kv heads shared by a group of query heads: those outputs are zeroed first
// and accumulated with fp32 atomics. float32 or bfloat16 inputs, fp32 arithmetic.
#include <math.h>
#include <stdint.h>

#include "cuda_common.cuh" // defines: SPAR_CUDA_CHECK, spar__load, spar__decays

namespace {

constexpr int BC = 32, CV = 32, THREADS = 256; // tokens per chunk, output columns per block

struct Operand {
    const void *p;
    bool query_head; // true: [n, heads, d], false: [n, kv_heads, d]
};

struct ScanArgs {
    int heads, kv_heads, d;
    int64_t n;
    bool reverse, accumulate;
    Operand a, b, c, out;
    spar__decays decay;
};

__device__ __forceinline__ int64_t row_of(const ScanArgs &s, const Operand &x, int64_t t, int h) {
    int head = x.query_head ? h : h / (s.heads / s.kv_heads);
    int count = x.query_head ? s.heads : s.kv_heads;
    return (t * count + head) * s.d;
}

size_t scan_smem(int d) { // A, B [BC][d + 1]; C [BC][CV + 1]; scores [BC][BC + 1]; state [d][CV]
    return sizeof(float) * ((size_t)2 * BC * (d + 1) + (size_t)BC * (CV + 1) +
                            (size_t)BC * (BC + 1) + (size_t)d * CV);
}

// The chunk's rows of A, B (all columns) and C (this block's columns) into shared memory.
template <typename T>
__device__ void load_chunk(const ScanArgs &s, float *as, float *bs, float *cs, int64_t p0, int len,
                           int h, int c0) {
    const int d = s.d, ld = d + 1;
    for (int x = threadIdx.x; x < BC * d; x += blockDim.x) {
        int r = x / d, col = x - r * d;
        float va = 0.0f, vb = 0.0f;
        if (r < len) {
            int64_t t = s.reverse ? s.n - 1 - (p0 + r) : p0 + r;
            va = spar__load((const T *)s.a.p, row_of(s, s.a, t, h) + col);
            vb = spar__load((const T *)s.b.p, row_of(s, s.b, t, h) + col);
        }
        as[r * ld + col] = va, bs[r * ld + col] = vb;
    }
    for (int x = threadIdx.x; x < BC * CV; x += blockDim.x) {
        int r = x / CV, col = x % CV;
        float vc = 0.0f;
        if (r < len && c0 + col < d) {
            int64_t t = s.reverse ? s.n - 1 - (p0 + r) : p0 + r;
            vc = spar__load((const T *)s.c.p, row_of(s, s.c, t, h) + c0 + col);
        }
        cs[r * (CV + 1) + col] = vc;
    }
}

template <typename T> __global__ void __launch_bounds__(THREADS) scan(ScanArgs s) {
    extern __shared__ float sm[];
    __shared__ float pw[BC + 1]; // lambda^0 .. lambda^BC
    const int d = s.d, ld = d + 1, h = blockIdx.y, c0 = blockIdx.x * CV;
    float *as = sm, *bs = as + BC * ld, *cs = bs + BC * ld, *ss = cs + BC * (CV + 1);
    float *st = ss + BC * (BC + 1); // [d][CV]: sum over earlier tokens of decayed B^T C
    if (threadIdx.x <= BC)
        pw[threadIdx.x] = spar__cuda_pow(s.decay.log_decay[h], (float)threadIdx.x);
    for (int x = threadIdx.x; x < d * CV; x += blockDim.x)
        st[x] = 0.0f;
    for (int64_t p0 = 0; p0 < s.n; p0 += BC) {
        const int len = s.n - p0 < BC ? (int)(s.n - p0) : BC;
        __syncthreads(); // the previous chunk's state update is done
        load_chunk<T>(s, as, bs, cs, p0, len, h, c0);
        __syncthreads();
        for (int e = threadIdx.x; e < BC * BC; e += blockDim.x) { // masked, decayed scores
            int r = e / BC, j = e % BC;
            float v = 0.0f;
            if (j <= r && r < len) {
                for (int x = 0; x < d; x++)
                    v += as[r * ld + x] * bs[j * ld + x];
                v *= pw[r - j];
            }
            ss[r * (BC + 1) + j] = v;
        }
        __syncthreads();
        for (int e = threadIdx.x; e < BC * CV; e += blockDim.x) { // intra + inter
            int r = e / CV, col = e % CV;
            if (r >= len || c0 + col >= d) continue;
            float intra = 0.0f, inter = 0.0f;
            for (int j = 0; j <= r; j++)
                intra += ss[r * (BC + 1) + j] * cs[j * (CV + 1) + col];
            for (int x = 0; x < d; x++)
                inter += as[r * ld + x] * st[x * CV + col];
            int64_t t = s.reverse ? s.n - 1 - (p0 + r) : p0 + r;
            float *o = (float *)s.out.p + row_of(s, s.out, t, h) + c0 + col;
            float val = intra + pw[r + 1] * inter;
            if (s.accumulate)
                atomicAdd(o, val);
            else
                *o = val;
        }
        __syncthreads();
        for (int e = threadIdx.x; e < d * CV; e += blockDim.x) { // state update
            int x = e / CV, col = e % CV;
            float acc = 0.0f;
            for (int j = 0; j < len; j++)
                acc += pw[len - 1 - j] * bs[j * ld + x] * cs[j * (CV + 1) + col];
            st[e] = pw[len] * st[e] + acc;
        }
    }
}

template <typename T> int launch(const ScanArgs &s, cudaStream_t stream) {
    size_t smem = scan_smem(s.d);
    SPAR_TRY(spar__cuda_smem_optin(scan<T>, smem));
    dim3 grid((unsigned)((s.d + CV - 1) / CV), (unsigned)s.heads);
    scan<T><<<grid, THREADS, smem, stream>>>(s);
    spar__cuda_launched();
    return SPAR_OK;
}

int run(const ScanArgs &s, spar_cuda_dtype dtype, cudaStream_t stream) {
    if (s.n == 0) return SPAR_OK;
    return dtype == SPAR_CUDA_F32 ? launch<float>(s, stream) : launch<__nv_bfloat16>(s, stream);
}

ScanArgs scan_args(const spar_linear_dims *dims, int64_t n) {
    ScanArgs s = {};
    s.heads = dims->heads, s.kv_heads = dims->kv_heads, s.d = dims->head_dim, s.n = n;
    for (int h = 0; h < dims->heads; h++)
        s.decay.log_decay[h] = (float)log(dims->decay[h]);
    return s;
}

} // namespace

// Shapes every linear-attention launcher accepts.
int spar__cuda_check_linear(const spar_linear_dims *dims) {
    if (dims->heads < 1 || dims->kv_heads < 1 || dims->heads % dims->kv_heads != 0 ||
        (dims->state_heads != dims->heads && dims->state_heads != dims->kv_heads))
        return spar_errorf(SPAR_EINVAL,
                           "CUDA linear attention: heads %d, kv_heads %d, state "
                           "heads %d (kv_heads must divide heads; states per head or per kv head)",
                           dims->heads, dims->kv_heads, dims->state_heads);
    if (dims->heads > SPAR_CUDA_MAX_HEADS || dims->head_dim < 1 ||
        dims->head_dim > SPAR_CUDA_MAX_HEAD_DIM)
        return spar_errorf(SPAR_EUNSUP,
                           "CUDA linear attention: heads %d, head_dim %d (allowed: "
                           "heads up to %d, head_dim 1..%d)",
                           dims->heads, dims->head_dim, SPAR_CUDA_MAX_HEADS,
                           SPAR_CUDA_MAX_HEAD_DIM);
    return SPAR_OK;
}

extern "C" int spar_cuda_linear_fwd_local(const spar_linear_dims *dims, spar_cuda_dtype dtype,
                                          int64_t n, const void *q, const void *k, const void *v,
                                          float *o, spar_cuda_stream stream) {
    SPAR_TRY(spar__cuda_check_linear(dims));
    ScanArgs s = scan_args(dims, n);
    s.a = {q, true}, s.b = {k, false}, s.c = {v, false}, s.out = {o, true};
    return run(s, dtype, stream);
}

extern "C" int spar_cuda_linear_bwd_local(const spar_linear_dims *dims, spar_cuda_dtype dtype,
                                          int64_t n, const void *q, const void *k, const void *v,
                                          const void *dout, float *dq, float *dk, float *dv,
                                          spar_cuda_stream stream) {
    SPAR_TRY(spar__cuda_check_linear(dims));
    size_t kv_bytes = sizeof(float) * (size_t)n * (size_t)dims->kv_heads * (size_t)dims->head_dim;
    SPAR_TRY(spar_cuda_memset(dk, 0, kv_bytes, stream)); // dk, dv: sums over a query group
    SPAR_TRY(spar_cuda_memset(dv, 0, kv_bytes, stream));
    ScanArgs s = scan_args(dims, n);
    s.a = {dout, true}, s.b = {v, false}, s.c = {k, false}, s.out = {dq, true};
    SPAR_TRY(run(s, dtype, stream));
    s.reverse = true, s.accumulate = true;
    s.a = {v, false}, s.b = {dout, true}, s.c = {q, true}, s.out = {dk, false};
    SPAR_TRY(run(s, dtype, stream));
    s.a = {k, false}, s.b = {q, true}, s.c = {dout, true}, s.out = {dv, false};
    return run(s, dtype, stream);
}
