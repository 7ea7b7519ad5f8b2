// cuda_common.cuh: what the .cu files of kernels/cuda share: the CUDA check macro, loads
// of float32 or bfloat16 storage as float, the decays as launch arguments, and the
// opt-in to more than 48 KiB of shared memory.
//
// Defines: SPAR_CUDA_CHECK, spar__cuda_launched, spar__load, spar__decays,
//          spar__cuda_smem_optin, spar__cuda_pow, spar__merge_lse, spar__cuda_check_attn,
//          spar__cuda_check_linear, spar__load_bf16_rows.
#ifndef SPAR_CUDA_COMMON_CUH
#define SPAR_CUDA_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

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

// Rows [row0, row0 + rows) of a bf16 tensor, columns [col0, col0 + d), into a zero-padded
// [64][DP] tile of shared memory with rows LDH apart; vec: 16-byte loads are aligned.
template <int DP, int LDH>
__device__ void spar__load_bf16_rows(__nv_bfloat16 *dst, const __nv_bfloat16 *src, int64_t row0,
                                     int rows, int64_t stride, int64_t col0, int d, bool vec) {
    if (vec) { // 8 bf16 per 16-byte load
        for (int x = threadIdx.x; x < 64 * DP / 8; x += blockDim.x) {
            int r = x / (DP / 8), c = x % (DP / 8) * 8;
            uint4 val = make_uint4(0, 0, 0, 0);
            if (r < rows && c < d) val = *(const uint4 *)(src + (row0 + r) * stride + col0 + c);
            *(uint4 *)(dst + r * LDH + c) = val;
        }
        return;
    }
    for (int x = threadIdx.x; x < 64 * DP; x += blockDim.x) {
        int r = x / DP, c = x % DP;
        dst[r * LDH + c] =
            r < rows && c < d ? src[(row0 + r) * stride + col0 + c] : __float2bfloat16(0.0f);
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
