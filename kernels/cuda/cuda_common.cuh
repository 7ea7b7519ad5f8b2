// cuda_common.cuh: what the .cu files of kernels/cuda share: the CUDA check macro, loads
// of float32 or bfloat16 storage as float, the decays as launch arguments, and the
// opt-in to more than 48 KiB of shared memory.
//
// Defines: SPAR_CUDA_CHECK, spar__cuda_launched, spar__load, spar__decays,
//          spar__cuda_smem_optin, spar__cuda_pow, spar__merge_lse, spar__cuda_check_attn,
//          spar__cuda_check_linear, spar__load_rows_async.
#ifndef SPAR_CUDA_COMMON_CUH
#define SPAR_CUDA_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

// Through the include path, not this folder: the CPU emulation (tests/gpu/emu) puts its own
// cuda_mma.cuh first.
#include <cuda_mma.cuh> // defines: spar__cp_async16 and the other warp instructions

extern "C" {
#include "cuda_kernels.h" // defines: spar_cuda_* (the C interface these files implement)
#include "spar_status.h"  // defines: SPAR_CHECK_GENERIC, SPAR_TRY, status codes
}

// A failed CUDA call prints the call, file:line and CUDA's reason, and returns
// SPAR_ECOMM from the enclosing function (a device failure, not bad input).
#define SPAR_CUDA_CHECK(expr)                                                                      \
    do {                                                                                           \
        cudaError_t spar_cuda_rc_ = (expr);                                                        \
        SPAR_CHECK_GENERIC(spar_cuda_rc_ != cudaSuccess, #expr, cudaGetErrorString(spar_cuda_rc_), \
                           SPAR_ECOMM);                                                            \
    } while (0)

// After a launch: a bad configuration shows here, not at the next synchronisation.
#define spar__cuda_launched() SPAR_CUDA_CHECK(cudaGetLastError())

__device__ __forceinline__ float spar__load(const float *p, long long i) {
    return p[i];
}
__device__ __forceinline__ float spar__load(const __nv_bfloat16 *p, long long i) {
    return __bfloat162float(p[i]);
}

// Rows [row0, row0 + rows) of a bf16 tensor, columns [col0, col0 + d), as 16-byte
// asynchronous copies (cuda_mma.cuh) by a block of THREADS threads into an [R][DP] tile of
// shared memory with rows LD apart, zeros past `rows` and d. d, stride and col0 are
// multiples of 8 and src is 16-byte aligned; the caller commits and waits.
template <int DP, int R, int LD, int THREADS>
__device__ __forceinline__ void spar__load_rows_async(__nv_bfloat16 *dst, const __nv_bfloat16 *src,
                                                      int64_t row0, int rows, int64_t stride,
                                                      int64_t col0, int d) {
    for (int x = threadIdx.x; x < R * DP / 8; x += THREADS) {
        int r = x / (DP / 8), c = x % (DP / 8) * 8;
        bool valid = r < rows && c < d;
        spar__cp_async16(dst + r * LD + c, valid ? src + (row0 + r) * stride + col0 + c : src,
                         valid);
    }
}

// Natural logs of the per-head decays, by value in the launch arguments (float: the
// exponents stay below the segment length, so exp(e log lambda) keeps fp32 accuracy).
struct spar__decays {
    float log_decay[SPAR_CUDA_MAX_HEADS];
};

// lambda^e from its log; log_decay = 0 (no decay) gives 1 for every e.
__device__ __forceinline__ float spar__cuda_pow(float log_decay, float e) {
    return log_decay == 0.0f ? 1.0f : expf(log_decay * e);
}

// The exact merge of a running partial (lse_a, -inf: empty) with a block's lse_b
// (DESIGN.md 3.1): returns the merged lse and the weights of both outputs.
__device__ __forceinline__ float spar__merge_lse(float la, float lb, float *wa, float *wb) {
    if (la == -INFINITY) {
        *wa = 0.0f, *wb = 1.0f;
        return lb;
    }
    float hi = fmaxf(la, lb), lo = fminf(la, lb), lse = hi + log1pf(expf(lo - hi));
    *wa = expf(la - lse), *wb = expf(lb - lse);
    return lse;
}

// Shapes every softmax launcher accepts; a causal block needs both position arrays.
static inline int spar__cuda_check_attn(const spar_attn_dims *dims, bool causal,
                                        const int64_t *qpos, const int64_t *kpos) {
    if (dims->heads < 1 || dims->kv_heads < 1 || dims->heads % dims->kv_heads != 0)
        return spar_errorf(SPAR_EINVAL,
                           "CUDA attention: heads %d, kv_heads %d (kv_heads must "
                           "divide heads)",
                           dims->heads, dims->kv_heads);
    if (dims->head_dim < 1 || dims->head_dim > SPAR_CUDA_MAX_HEAD_DIM || dims->heads > 65535)
        return spar_errorf(SPAR_EUNSUP,
                           "CUDA attention: head_dim %d, heads %d (allowed: "
                           "head_dim 1..%d, heads up to 65535)",
                           dims->head_dim, dims->heads, SPAR_CUDA_MAX_HEAD_DIM);
    if (causal && (!qpos || !kpos))
        return spar_errorf(SPAR_EINVAL, "CUDA attention: causal without positions");
    return SPAR_OK;
}

// Shapes every linear-attention launcher accepts (linear.cu).
int spar__cuda_check_linear(const spar_linear_dims *dims);

// Kernels with more than the default 48 KiB of shared memory must say so first. The
// default covers static and dynamic together: 4 KiB are left for the kernels' static
// arrays (1 KiB at most).
template <typename Kernel> static int spar__cuda_smem_optin(Kernel kernel, size_t bytes) {
    if (bytes + 4096 <= 48 * 1024) return SPAR_OK;
    SPAR_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
    return SPAR_OK;
}

#endif
