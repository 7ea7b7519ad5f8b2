// softmax_bwd.cu: softmax attention block backward on a CUDA device, behind
// spar_kernels.softmax_bwd_block, host-staged like softmax_fwd.cu. With the queries'
// final lse and delta = rowsum(dout * o) (kernels.h):
//   p = exp(scale q.k - lse),  dv += p dout,  ds = p (dout.v - delta),
//   dq += scale ds k,  dk += scale ds q   (GQA: a kv head sums over its query group).
// Two kernels recompute p rather than store it: one thread per (query, head) sums dq
// over the keys; one thread per (key, kv head) sums dk and dv over the queries of its
// group. No atomics, no N x N buffer. Built wherever nvcc is found, tested against the
// scalar oracle where a GPU is present (tests/gpu).
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>

extern "C" {
#include "kernels.h"
#include "spar_status.h"
}

namespace {

constexpr int THREADS = 64;

struct Args {
    int heads, kv_heads, d;
    float scale;
    bool causal;
    long long nq, nk, stride_q, stride_lse, stride_kv;
    const float *q, *k, *v, *dout, *lse, *delta;
    const long long *qpos, *kpos;
    float *dq, *dk, *dv;
};

__device__ bool visible(const Args &a, long long i, long long j) {
    return !a.causal || a.kpos[j] <= a.qpos[i];
}

// p and ds of query i (head h) and key j.
__device__ void prob(const Args &a, long long i, int h, long long j, float *p, float *ds) {
    int g = h / (a.heads / a.kv_heads);
    const float *qi = a.q + i * a.stride_q + (long long)h * a.d;
    const float *oi = a.dout + i * a.stride_q + (long long)h * a.d;
    const float *kj = a.k + j * a.stride_kv + (long long)g * a.d;
    const float *vj = a.v + j * a.stride_kv + (long long)g * a.d;
    float s = 0.0f, dp = 0.0f;
    for (int c = 0; c < a.d; c++)
        s += qi[c] * kj[c], dp += oi[c] * vj[c];
    float lse = a.lse[i * a.stride_lse + h];
    *p = isinf(lse) ? 0.0f : expf(s * a.scale - lse);
    *ds = *p * (dp - a.delta[i * a.stride_lse + h]);
}

__global__ void dq_kernel(Args a) {
    long long i = (long long)blockIdx.x * THREADS + threadIdx.x;
    int h = blockIdx.y, g = h / (a.heads / a.kv_heads);
    if (i >= a.nq) return;
    float *dqi = a.dq + i * a.stride_q + (long long)h * a.d;
    for (long long j = 0; j < a.nk; j++) {
        if (!visible(a, i, j)) continue;
        float p, ds;
        prob(a, i, h, j, &p, &ds);
        const float *kj = a.k + j * a.stride_kv + (long long)g * a.d;
        for (int c = 0; c < a.d; c++)
            dqi[c] += a.scale * ds * kj[c];
    }
}

__global__ void dkv_kernel(Args a) {
    long long j = (long long)blockIdx.x * THREADS + threadIdx.x;
    int g = blockIdx.y, per = a.heads / a.kv_heads;
    if (j >= a.nk) return;
    float *dkj = a.dk + j * a.stride_kv + (long long)g * a.d;
    float *dvj = a.dv + j * a.stride_kv + (long long)g * a.d;
    for (int h = g * per; h < (g + 1) * per; h++)
        for (long long i = 0; i < a.nq; i++) {
            if (!visible(a, i, j)) continue;
            float p, ds;
            prob(a, i, h, j, &p, &ds);
            const float *qi = a.q + i * a.stride_q + (long long)h * a.d;
            const float *oi = a.dout + i * a.stride_q + (long long)h * a.d;
            for (int c = 0; c < a.d; c++) {
                dkj[c] += a.scale * ds * qi[c];
                dvj[c] += p * oi[c];
            }
        }
}

struct Buffer {
    void *p = nullptr;
    size_t cap = 0;
};

// Copies host bytes to a device buffer grown as needed (to = false: allocation only).
int stage(Buffer &b, const void *host, size_t bytes, bool to) {
    if (bytes > b.cap) {
        if (b.p) cudaFree(b.p);
        b.p = nullptr, b.cap = 0;
        if (cudaMalloc(&b.p, bytes) != cudaSuccess) return SPAR_ENOMEM;
        b.cap = bytes;
    }
    if (to && host && cudaMemcpy(b.p, host, bytes, cudaMemcpyHostToDevice) != cudaSuccess) {
        fprintf(stderr, "error: CUDA copy to the device failed\n");
        return SPAR_ECOMM;
    }
    return SPAR_OK;
}

int back(void *host, const Buffer &b, size_t bytes) {
    cudaError_t e = cudaMemcpy(host, b.p, bytes, cudaMemcpyDeviceToHost);
    if (e == cudaSuccess) return SPAR_OK;
    fprintf(stderr, "error: CUDA copy from the device: %s\n", cudaGetErrorString(e));
    return SPAR_ECOMM;
}

Buffer bq, bk, bv, bo, blse, bdelta, bqpos, bkpos, bdq, bdk, bdv;

} // namespace

extern "C" int spar__cuda_softmax_bwd_block(const spar_attn_dims *dims, bool causal,
                                            const spar_qblock *qb, const spar_kvblock *kb) {
    if (qb->n == 0 || kb->n == 0) return SPAR_OK;
    size_t qbytes = sizeof(float) * (size_t)(qb->n * qb->stride_q);
    size_t kvbytes = sizeof(float) * (size_t)(kb->n * kb->stride_kv);
    size_t lbytes = sizeof(float) * (size_t)(qb->n * qb->stride_lse);
    SPAR_TRY(stage(bq, qb->q, qbytes, true));
    SPAR_TRY(stage(bo, qb->dout, qbytes, true));
    SPAR_TRY(stage(bdq, qb->dq, qbytes, true));
    SPAR_TRY(stage(blse, qb->lse, lbytes, true));
    SPAR_TRY(stage(bdelta, qb->delta, lbytes, true));
    SPAR_TRY(stage(bk, kb->k, kvbytes, true));
    SPAR_TRY(stage(bv, kb->v, kvbytes, true));
    SPAR_TRY(stage(bdk, kb->dk, kvbytes, true));
    SPAR_TRY(stage(bdv, kb->dv, kvbytes, true));
    SPAR_TRY(stage(bqpos, qb->pos, sizeof(long long) * (size_t)qb->n, causal));
    SPAR_TRY(stage(bkpos, kb->pos, sizeof(long long) * (size_t)kb->n, causal));
    Args a = {dims->heads, dims->kv_heads, dims->head_dim, dims->scale, causal,
              (long long)qb->n, (long long)kb->n, (long long)qb->stride_q,
              (long long)qb->stride_lse, (long long)kb->stride_kv,
              (const float *)bq.p, (const float *)bk.p, (const float *)bv.p,
              (const float *)bo.p, (const float *)blse.p, (const float *)bdelta.p,
              (const long long *)bqpos.p, (const long long *)bkpos.p,
              (float *)bdq.p, (float *)bdk.p, (float *)bdv.p};
    dq_kernel<<<dim3((unsigned)((qb->n + THREADS - 1) / THREADS), (unsigned)dims->heads), THREADS>>>(a);
    dkv_kernel<<<dim3((unsigned)((kb->n + THREADS - 1) / THREADS), (unsigned)dims->kv_heads),
                 THREADS>>>(a);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) {
        fprintf(stderr, "error: CUDA kernel launch: %s\n", cudaGetErrorString(e));
        return SPAR_ECOMM;
    }
    SPAR_TRY(back(qb->dq, bdq, qbytes));
    SPAR_TRY(back(kb->dk, bdk, kvbytes));
    return back(kb->dv, bdv, kvbytes);
}
