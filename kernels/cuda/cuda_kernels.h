/* cuda_kernels.h: the CUDA kernels on device-resident tensors, and the few runtime
 * primitives the engine needs to keep tensors on a GPU and stage them for the network
 * (Debian's Open MPI is not CUDA-aware: messages go through pinned host buffers, copied
 * asynchronously on a stream of their own while the kernels run on another).
 *
 * Plain C: CUDA's stream and event handles are named by their opaque struct types, so a C
 * file includes this header without the CUDA headers. Every function returns 0 or a
 * negative SPAR_E* status (a CUDA failure prints the call, file:line and CUDA's reason and
 * returns SPAR_ECOMM; a shape this build does not handle returns SPAR_EUNSUP).
 *
 * Storage: the inputs q, k, v, dout are float32 or bfloat16 (spar_cuda_dtype); every
 * output and accumulator (o, lse, dq, dk, dv, delta, the linear-attention states) is
 * float32, so partial results merge in fp32 (DESIGN.md 3.1). Layouts and meanings are
 * those of kernels.h; all pointers are device pointers, positions are int64 on the device.
 * Every launcher only enqueues work on `stream` (NULL: the legacy default stream).
 *
 * Defines: spar_cuda_dtype, spar_cuda_qblock, spar_cuda_kvblock, the launchers
 *          spar_cuda_softmax_*, spar_cuda_linear_*, and the primitives spar_cuda_malloc,
 *          _free, _host_alloc, _host_free, _memset, _copy, _copy_async, _stream_*,
 *          _event_*, _copy_stream, _device_name.
 * Leaves out: MPI, and any choice of what to stage when (the engine's).
 */
#ifndef SPAR_CUDA_KERNELS_H
#define SPAR_CUDA_KERNELS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels.h" // defines: spar_attn_dims, spar_linear_dims

#ifdef __cplusplus
extern "C" {
#endif

typedef struct CUstream_st *spar_cuda_stream; /* a cudaStream_t */
typedef struct CUevent_st *spar_cuda_event;   /* a cudaEvent_t */

typedef enum spar_cuda_dtype {
    SPAR_CUDA_F32 = 0,  /* float32 */
    SPAR_CUDA_BF16 = 1, /* bfloat16 (__nv_bfloat16), float32 accumulation */
} spar_cuda_dtype;

/* Heads the launchers accept (decays travel in the launch arguments). */
#define SPAR_CUDA_MAX_HEADS 256
/* The largest head_dim of every kernel. */
#define SPAR_CUDA_MAX_HEAD_DIM 256

/* Queries on the device; strides in elements, as spar_qblock.
 *   q, dout: [n, stride_q] dtype     o, dq: [n, stride_q] float32
 *   lse, delta: [n, stride_lse] float32   pos: [n] int64 (NULL when not causal) */
typedef struct spar_cuda_qblock {
    int64_t n;
    const int64_t *pos;
    int64_t stride_q, stride_lse;
    const void *q;
    float *o, *lse;
    const void *dout;
    const float *delta;
    float *dq;
} spar_cuda_qblock;

/* Keys and values on the device.  k, v: [n, stride_kv] dtype  dk, dv: [n, stride_kv] f32 */
typedef struct spar_cuda_kvblock {
    int64_t n;
    const int64_t *pos;
    int64_t stride_kv;
    const void *k, *v;
    float *dk, *dv;
} spar_cuda_kvblock;

/* ---- Softmax attention (meanings: spar_kernels.softmax_fwd_block / _bwd_block) ---- */

/* Merges the block into the running (o, lse) of the queries. bf16 with head_dim <= 128
 * runs on tensor cores; the rest on a tiled fp32 kernel. */
int spar_cuda_softmax_fwd(const spar_attn_dims *dims, bool causal, spar_cuda_dtype dtype,
                          const spar_cuda_qblock *q, const spar_cuda_kvblock *kv,
                          spar_cuda_stream stream);
/* Accumulates dq, dk, dv (needs q.lse, q.delta, q.dout). */
int spar_cuda_softmax_bwd(const spar_attn_dims *dims, bool causal, spar_cuda_dtype dtype,
                          const spar_cuda_qblock *q, const spar_cuda_kvblock *kv,
                          spar_cuda_stream stream);
/* delta[i, h] = sum_c dout[i, h, c] o[i, h, c].  o: [n, H, d] f32, dout: [n, H, d] dtype,
 * delta: [n, H] f32 (dense). */
int spar_cuda_softmax_bwd_delta(int64_t n, int heads, int head_dim, spar_cuda_dtype dtype,
                                const float *o, const void *dout, float *delta,
                                spar_cuda_stream stream);

/* ---- Linear attention (meanings: the spar_kernels.linear_* members, dense layout) ---- */

int spar_cuda_linear_fwd_local(const spar_linear_dims *dims, spar_cuda_dtype dtype, int64_t n,
                               const void *q, const void *k, const void *v, float *o,
                               spar_cuda_stream stream);
int spar_cuda_linear_bwd_local(const spar_linear_dims *dims, spar_cuda_dtype dtype, int64_t n,
                               const void *q, const void *k, const void *v, const void *dout,
                               float *dq, float *dk, float *dv, spar_cuda_stream stream);
int spar_cuda_linear_state(const spar_linear_dims *dims, bool causal, spar_cuda_dtype dtype,
                           int64_t n, const void *k, const void *v, float *m,
                           spar_cuda_stream stream);
int spar_cuda_linear_fwd_state(const spar_linear_dims *dims, bool causal, spar_cuda_dtype dtype,
                               int64_t n, const void *q, const float *s, float *o,
                               spar_cuda_stream stream);
int spar_cuda_linear_dstate(const spar_linear_dims *dims, bool causal, spar_cuda_dtype dtype,
                            int64_t n, const void *q, const void *dout, float *ds,
                            spar_cuda_stream stream);
/* s or dkv may be NULL (zero). */
int spar_cuda_linear_bwd_state(const spar_linear_dims *dims, bool causal, spar_cuda_dtype dtype,
                               int64_t n, const void *k, const void *v, const void *dout,
                               const float *s, const float *dkv, float *dq, float *dk, float *dv,
                               spar_cuda_stream stream);

/* ---- Runtime primitives (kernels/cuda/runtime.cu) ---- */

int spar_cuda_malloc(void **ptr, size_t bytes);
void spar_cuda_free(void *ptr);
/* Page-locked host memory: the staging buffers of asynchronous copies. */
int spar_cuda_host_alloc(void **ptr, size_t bytes);
void spar_cuda_host_free(void *ptr);
int spar_cuda_memset(void *ptr, int value, size_t bytes, spar_cuda_stream stream);
/* Synchronous copy in any direction (unified addressing tells which). */
int spar_cuda_copy(void *dst, const void *src, size_t bytes);
/* Asynchronous copy on `stream`; asynchronous for the host only with pinned memory. */
int spar_cuda_copy_async(void *dst, const void *src, size_t bytes, spar_cuda_stream stream);
int spar_cuda_stream_create(spar_cuda_stream *stream); /* non-blocking w.r.t. stream 0 */
void spar_cuda_stream_destroy(spar_cuda_stream stream);
int spar_cuda_stream_sync(spar_cuda_stream stream);
/* The process's copy stream (created on first use, lives until exit): staging copies go
 * there so that they overlap the kernels on the compute stream. */
int spar_cuda_copy_stream(spar_cuda_stream *stream);
/* timing: false makes a lighter event for ordering only. */
int spar_cuda_event_create(spar_cuda_event *event, bool timing);
void spar_cuda_event_destroy(spar_cuda_event event);
int spar_cuda_event_record(spar_cuda_event event, spar_cuda_stream stream);
/* Work enqueued on `stream` after this waits for the event (no host wait). */
int spar_cuda_stream_wait(spar_cuda_stream stream, spar_cuda_event event);
int spar_cuda_event_sync(spar_cuda_event event);
/* 1 when the event's work is done, 0 when not yet, or a status. */
int spar_cuda_event_query(spar_cuda_event event);
int spar_cuda_event_elapsed_ms(spar_cuda_event start, spar_cuda_event end, float *ms);
/* The current device's name, its multiprocessor count and the driver's CUDA version
 * (e.g. 13000 for 13.0). */
int spar_cuda_device_name(char *name, size_t len, int *sms, int *driver_version);

/* ---- Internal to the kernels room (kernels.c) ---- */

/* The kernel table on host-resident float32 tensors, staged through the device
 * (kernels/cuda/staged.c). */
extern const spar_kernels spar__kernels_cuda;
/* Its device memory, for methods that keep tensors on the GPU (kernels/cuda/resident.c). */
extern const spar_kernels_device spar__cuda_device;
/* What spar_kernels_cuda_devices and spar_kernels_cuda_use_device do (runtime.cu). */
int spar__cuda_devices(char *why, size_t len);
int spar__cuda_use_device(int local_rank, int *device);

#ifdef __cplusplus
}
#endif

#endif
