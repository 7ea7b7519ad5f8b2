/* resident.c: the CUDA backend's device memory (spar_kernels_device, kernels.h) for
 * methods that keep their tensors on the GPU: the softmax block kernels on device
 * float32 views, device and pinned allocation, copies, and uploads on the process's copy
 * stream. Kernels run on the default stream and each call waits for it, so that the
 * engine's calls stay synchronous (and its compute timing true) while uploads on the
 * copy stream, a non-blocking stream, overlap them.
 */
#include <math.h>
#include <stdlib.h>

#include "cuda_kernels.h" // defines: the spar_cuda_* launchers and primitives
#include "spar_status.h"

static spar_cuda_qblock device_q(const spar_qblock *q) {
    return (spar_cuda_qblock){.n = q->n,
                              .pos = q->pos,
                              .stride_q = q->stride_q,
                              .stride_lse = q->stride_lse,
                              .q = q->q,
                              .o = q->o,
                              .lse = q->lse,
                              .dout = q->dout,
                              .delta = q->delta,
                              .dq = q->dq};
}

static spar_cuda_kvblock device_kv(const spar_kvblock *kv) {
    return (spar_cuda_kvblock){.n = kv->n,
                               .pos = kv->pos,
                               .stride_kv = kv->stride_kv,
                               .k = kv->k,
                               .v = kv->v,
                               .dk = kv->dk,
                               .dv = kv->dv};
}

/* The storage of the inputs: both sides alike, or a misuse. */
static int dtype(const spar_qblock *q, const spar_kvblock *kv, spar_cuda_dtype *dt) {
    if (q->bf16 != kv->bf16)
        return spar_errorf(SPAR_EINVAL, "CUDA attention: queries in %s, keys in %s",
                           q->bf16 ? "bf16" : "fp32", kv->bf16 ? "bf16" : "fp32");
    *dt = q->bf16 ? SPAR_CUDA_BF16 : SPAR_CUDA_F32;
    return SPAR_OK;
}

typedef int (*softmax_launcher)(const spar_attn_dims *, bool, spar_cuda_dtype,
                                const spar_cuda_qblock *, const spar_cuda_kvblock *,
                                spar_cuda_stream);

/* One block through `launch` (spar_cuda_softmax_fwd or _bwd), waited for. */
static int run_block(softmax_launcher launch, const spar_attn_dims *dims, bool causal,
                     const spar_qblock *q, const spar_kvblock *kv) {
    spar_cuda_dtype dt = SPAR_CUDA_F32;
    if (q->n == 0 || kv->n == 0) return SPAR_OK;
    SPAR_TRY(dtype(q, kv, &dt));
    spar_cuda_qblock dq = device_q(q);
    spar_cuda_kvblock dk = device_kv(kv);
    SPAR_TRY(launch(dims, causal, dt, &dq, &dk, NULL));
    return spar_cuda_stream_sync(NULL);
}

static int fwd_block(const spar_attn_dims *dims, bool causal, const spar_qblock *q,
                     const spar_kvblock *kv) {
    return run_block(spar_cuda_softmax_fwd, dims, causal, q, kv);
}

static int bwd_block(const spar_attn_dims *dims, bool causal, const spar_qblock *q,
                     const spar_kvblock *kv) {
    return run_block(spar_cuda_softmax_bwd, dims, causal, q, kv);
}

/* o = 0, lse = -inf: the bytes of -inf are no memset pattern, so lse goes up from the host. */
static int init_partial(int64_t n, int heads, int head_dim, float *o, float *lse) {
    size_t rows = (size_t)n * (size_t)heads;
    if (rows == 0) return SPAR_OK;
    float *host = malloc(sizeof(float) * rows);
    if (!host) return SPAR_ENOMEM;
    for (size_t i = 0; i < rows; i++)
        host[i] = -INFINITY;
    int rc = spar_cuda_copy(lse, host, sizeof(float) * rows);
    free(host);
    if (rc == 0) rc = spar_cuda_memset(o, 0, sizeof(float) * rows * (size_t)head_dim, NULL);
    return rc ? rc : spar_cuda_stream_sync(NULL);
}

static int bwd_delta(int64_t n, int heads, int head_dim, const float *o, const void *dout,
                     bool bf16, float *delta) {
    SPAR_TRY(spar_cuda_softmax_bwd_delta(n, heads, head_dim, bf16 ? SPAR_CUDA_BF16 : SPAR_CUDA_F32,
                                         o, dout, delta, NULL));
    return spar_cuda_stream_sync(NULL);
}

static int zero(void *p, size_t bytes) {
    SPAR_TRY(spar_cuda_memset(p, 0, bytes, NULL));
    return spar_cuda_stream_sync(NULL);
}

static int upload_async(void *dst, const void *src, size_t bytes) {
    spar_cuda_stream copy;
    SPAR_TRY(spar_cuda_copy_stream(&copy));
    return spar_cuda_copy_async(dst, src, bytes, copy);
}

static int upload_wait(void) {
    spar_cuda_stream copy;
    SPAR_TRY(spar_cuda_copy_stream(&copy));
    return spar_cuda_stream_sync(copy);
}

const spar_kernels_device spar__cuda_device = {
    .softmax_fwd_block = fwd_block,
    .softmax_bwd_block = bwd_block,
    .init_partial = init_partial,
    .bwd_delta = bwd_delta,
    .alloc = spar_cuda_malloc,
    .alloc_host = spar_cuda_host_alloc,
    .free = spar_cuda_free,
    .free_host = spar_cuda_host_free,
    .zero = zero,
    .copy = spar_cuda_copy,
    .upload_async = upload_async,
    .upload_wait = upload_wait,
};
