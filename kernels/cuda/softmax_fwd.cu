// softmax_fwd.cu: softmax attention block forward on a CUDA device, behind the kernel
// interface of kernels.h (spar_kernels.softmax_fwd_block), with host staging: the
// block's rows are copied to the device, the kernel merges the block into the running
// (o, lse) there, and o, lse are copied back. This is the first GPU kernel; it is built
// wherever nvcc is found and tested against the scalar oracle where a GPU is present
// (tests/gpu). Tensors resident on the device (run.device=cuda) come later.
//
// Kernel: one thread block per (tile of 64 queries, query head); each thread owns one
// query row, with its running max, denominator and output accumulator in registers and
// local memory; key/value tiles of KT rows are staged through shared memory once per
// block, so K/V are read once per query tile (no N x N buffer).
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

extern "C" {
#include "kernels.h"
#include "spar_status.h"
}

namespace {

constexpr int QT = 64;       // queries per thread block
constexpr int KT = 16;       // keys per shared-memory tile
constexpr int MAX_D = 256;   // largest head_dim

struct Args {
    int heads, kv_heads, d;
    float scale;
    bool causal;
    long long nq, nk, stride_q, stride_lse, stride_kv;
    const float *q, *k, *v;
    const long long *qpos, *kpos;
    float *o, *lse;
};

__global__ void fwd_kernel(Args a) {
    extern __shared__ float tile[]; // [KT][d] keys, then [KT][d] values
    float *ks = tile, *vs = tile + KT * a.d;
    int h = blockIdx.y, g = h / (a.heads / a.kv_heads);
    long long i = (long long)blockIdx.x * QT + threadIdx.x;
    bool live = i < a.nq;
    float acc[MAX_D];
    float m = -INFINITY, l = 0.0f;
    for (int c = 0; c < a.d; c++)
        acc[c] = 0.0f;
    const float *qi = a.q + (live ? i : 0) * a.stride_q + (long long)h * a.d;
    long long qp = a.causal && live ? a.qpos[i] : 0;
    for (long long j0 = 0; j0 < a.nk; j0 += KT) {
        int len = a.nk - j0 < KT ? (int)(a.nk - j0) : KT;
        __syncthreads();
        for (int x = threadIdx.x; x < len * a.d; x += blockDim.x) {
            long long row = j0 + x / a.d;
            int c = x % a.d;
            ks[x] = a.k[row * a.stride_kv + (long long)g * a.d + c];
            vs[x] = a.v[row * a.stride_kv + (long long)g * a.d + c];
        }
        __syncthreads();
        if (!live) continue;
        for (int t = 0; t < len; t++) {
            if (a.causal && a.kpos[j0 + t] > qp) continue;
            float s = 0.0f;
            for (int c = 0; c < a.d; c++)
                s += qi[c] * ks[t * a.d + c];
            s *= a.scale;
            float mx = s > m ? s : m, cm = expf(m - mx), p = expf(s - mx);
            l = l * cm + p;
            for (int c = 0; c < a.d; c++)
                acc[c] = acc[c] * cm + p * vs[t * a.d + c];
            m = mx;
        }
    }
    if (!live || l == 0.0f) return; // no visible key: the running partial is unchanged
    float *oi = a.o + i * a.stride_q + (long long)h * a.d;
    float *li = a.lse + i * a.stride_lse + h;
    float lb = m + logf(l), la = *li;
    // exact merge with the running partial (DESIGN.md 3.1)
    float hi = la > lb ? la : lb, lo = la > lb ? lb : la;
    float lse = isinf(la) && la < 0 ? lb : hi + log1pf(expf(lo - hi));
    float wa = isinf(la) && la < 0 ? 0.0f : expf(la - lse), wb = expf(lb - lse) / l;
    for (int c = 0; c < a.d; c++)
        oi[c] = wa * oi[c] + wb * acc[c];
    *li = lse;
}

// Device buffers, grown as needed and kept between calls.
struct Buffer {
    void *p = nullptr;
    size_t cap = 0;
};

int reserve(Buffer &b, size_t bytes) {
    if (bytes <= b.cap) return SPAR_OK;
    if (b.p) cudaFree(b.p);
    b.p = nullptr, b.cap = 0;
    if (cudaMalloc(&b.p, bytes ? bytes : 1) != cudaSuccess) return SPAR_ENOMEM;
    b.cap = bytes;
    return SPAR_OK;
}

Buffer dq, dk, dv, dqpos, dkpos, dout, dlse;

int check(cudaError_t e, const char *what) {
    if (e == cudaSuccess) return SPAR_OK;
    fprintf(stderr, "error: CUDA %s: %s\n", what, cudaGetErrorString(e));
    return SPAR_ECOMM; // a device failure, not bad input
}

} // namespace

extern "C" int spar__cuda_devices(char *why, size_t len) {
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
        snprintf(why, len, "no usable CUDA device (%s)", cudaGetErrorString(e));
        return 0;
    }
    if (count == 0) snprintf(why, len, "no CUDA device visible");
    return count;
}

extern "C" int spar__cuda_use_device(int local_rank, int *device) {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) return SPAR_EUNSUP;
    *device = local_rank % count; // ranks of one host share its GPUs in turn
    return check(cudaSetDevice(*device), "set device");
}

extern "C" int spar__cuda_softmax_fwd_block(const spar_attn_dims *dims, bool causal,
                                            const spar_qblock *qb, const spar_kvblock *kb) {
    if (dims->head_dim > MAX_D) return SPAR_EUNSUP;
    if (qb->n == 0 || kb->n == 0) return SPAR_OK;
    size_t qbytes = sizeof(float) * (size_t)(qb->n * qb->stride_q);
    size_t kvbytes = sizeof(float) * (size_t)(kb->n * kb->stride_kv);
    size_t lbytes = sizeof(float) * (size_t)(qb->n * qb->stride_lse);
    SPAR_TRY(reserve(dq, qbytes));
    SPAR_TRY(reserve(dout, qbytes));
    SPAR_TRY(reserve(dk, kvbytes));
    SPAR_TRY(reserve(dv, kvbytes));
    SPAR_TRY(reserve(dlse, lbytes));
    SPAR_TRY(reserve(dqpos, sizeof(long long) * (size_t)qb->n));
    SPAR_TRY(reserve(dkpos, sizeof(long long) * (size_t)kb->n));
    SPAR_TRY(check(cudaMemcpy(dq.p, qb->q, qbytes, cudaMemcpyHostToDevice), "copy q"));
    SPAR_TRY(check(cudaMemcpy(dout.p, qb->o, qbytes, cudaMemcpyHostToDevice), "copy o"));
    SPAR_TRY(check(cudaMemcpy(dlse.p, qb->lse, lbytes, cudaMemcpyHostToDevice), "copy lse"));
    SPAR_TRY(check(cudaMemcpy(dk.p, kb->k, kvbytes, cudaMemcpyHostToDevice), "copy k"));
    SPAR_TRY(check(cudaMemcpy(dv.p, kb->v, kvbytes, cudaMemcpyHostToDevice), "copy v"));
    if (causal) {
        SPAR_TRY(check(cudaMemcpy(dqpos.p, qb->pos, sizeof(long long) * (size_t)qb->n,
                                  cudaMemcpyHostToDevice), "copy positions"));
        SPAR_TRY(check(cudaMemcpy(dkpos.p, kb->pos, sizeof(long long) * (size_t)kb->n,
                                  cudaMemcpyHostToDevice), "copy positions"));
    }
    Args a = {dims->heads, dims->kv_heads, dims->head_dim, dims->scale, causal,
              (long long)qb->n, (long long)kb->n, (long long)qb->stride_q,
              (long long)qb->stride_lse, (long long)kb->stride_kv,
              (const float *)dq.p, (const float *)dk.p, (const float *)dv.p,
              (const long long *)dqpos.p, (const long long *)dkpos.p,
              (float *)dout.p, (float *)dlse.p};
    dim3 grid((unsigned)((qb->n + QT - 1) / QT), (unsigned)dims->heads);
    size_t smem = sizeof(float) * 2 * KT * (size_t)dims->head_dim;
    fwd_kernel<<<grid, QT, smem>>>(a);
    SPAR_TRY(check(cudaGetLastError(), "kernel launch"));
    SPAR_TRY(check(cudaMemcpy(qb->o, dout.p, qbytes, cudaMemcpyDeviceToHost), "copy o back"));
    return check(cudaMemcpy(qb->lse, dlse.p, lbytes, cudaMemcpyDeviceToHost), "copy lse back");
}
