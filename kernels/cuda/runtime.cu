// runtime.cu: the CUDA runtime behind kernels.h and cuda_kernels.h: which devices this
// process sees and uses, device and pinned host memory, streams, events and copies. The
// engine stages messages through pinned host buffers with these (the MPI of Debian is
// not CUDA-aware); nothing here decides what to stage or when.
#include <stdio.h>
#include <string.h>

#include "cuda_common.cuh" // defines: SPAR_CUDA_CHECK

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
    SPAR_CUDA_CHECK(cudaSetDevice(*device));
    return SPAR_OK;
}

extern "C" int spar_cuda_malloc(void **ptr, size_t bytes) {
    *ptr = nullptr;
    if (cudaMalloc(ptr, bytes ? bytes : 1) != cudaSuccess) {
        (void)cudaGetLastError(); // an allocation failure is not sticky: clear it
        *ptr = nullptr;
        return spar_errorf(SPAR_ENOMEM, "CUDA: cannot allocate %zu bytes on the device", bytes);
    }
    return SPAR_OK;
}

extern "C" void spar_cuda_free(void *ptr) {
    if (ptr) cudaFree(ptr);
}

extern "C" int spar_cuda_host_alloc(void **ptr, size_t bytes) {
    *ptr = nullptr;
    if (cudaMallocHost(ptr, bytes ? bytes : 1) != cudaSuccess) {
        (void)cudaGetLastError();
        *ptr = nullptr;
        return spar_errorf(SPAR_ENOMEM, "CUDA: cannot allocate %zu bytes of pinned host memory",
                           bytes);
    }
    return SPAR_OK;
}

extern "C" void spar_cuda_host_free(void *ptr) {
    if (ptr) cudaFreeHost(ptr);
}

extern "C" int spar_cuda_memset(void *ptr, int value, size_t bytes, spar_cuda_stream stream) {
    if (bytes == 0) return SPAR_OK;
    SPAR_CUDA_CHECK(cudaMemsetAsync(ptr, value, bytes, stream));
    return SPAR_OK;
}

extern "C" int spar_cuda_copy(void *dst, const void *src, size_t bytes) {
    if (bytes == 0) return SPAR_OK;
    SPAR_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault));
    return SPAR_OK;
}

extern "C" int spar_cuda_copy_async(void *dst, const void *src, size_t bytes,
                                    spar_cuda_stream stream) {
    if (bytes == 0) return SPAR_OK;
    SPAR_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream));
    return SPAR_OK;
}

extern "C" int spar_cuda_stream_create(spar_cuda_stream *stream) {
    cudaStream_t s = nullptr;
    SPAR_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    *stream = s;
    return SPAR_OK;
}

extern "C" void spar_cuda_stream_destroy(spar_cuda_stream stream) {
    if (stream) cudaStreamDestroy(stream);
}

extern "C" int spar_cuda_stream_sync(spar_cuda_stream stream) {
    SPAR_CUDA_CHECK(cudaStreamSynchronize(stream));
    return SPAR_OK;
}

extern "C" int spar_cuda_copy_stream(spar_cuda_stream *stream) {
    // One per process and device in use; ranks sharing a GPU each have their own.
    static cudaStream_t copies = nullptr;
    if (!copies) SPAR_TRY(spar_cuda_stream_create(&copies));
    *stream = copies;
    return SPAR_OK;
}

extern "C" int spar_cuda_event_create(spar_cuda_event *event, bool timing) {
    cudaEvent_t e = nullptr;
    SPAR_CUDA_CHECK(
        cudaEventCreateWithFlags(&e, timing ? cudaEventDefault : cudaEventDisableTiming));
    *event = e;
    return SPAR_OK;
}

extern "C" void spar_cuda_event_destroy(spar_cuda_event event) {
    if (event) cudaEventDestroy(event);
}

extern "C" int spar_cuda_event_record(spar_cuda_event event, spar_cuda_stream stream) {
    SPAR_CUDA_CHECK(cudaEventRecord(event, stream));
    return SPAR_OK;
}

extern "C" int spar_cuda_stream_wait(spar_cuda_stream stream, spar_cuda_event event) {
    SPAR_CUDA_CHECK(cudaStreamWaitEvent(stream, event, 0));
    return SPAR_OK;
}

extern "C" int spar_cuda_event_sync(spar_cuda_event event) {
    SPAR_CUDA_CHECK(cudaEventSynchronize(event));
    return SPAR_OK;
}

extern "C" int spar_cuda_event_query(spar_cuda_event event) {
    cudaError_t e = cudaEventQuery(event);
    if (e == cudaErrorNotReady) return 0;
    SPAR_CUDA_CHECK(e);
    return 1;
}

extern "C" int spar_cuda_event_elapsed_ms(spar_cuda_event start, spar_cuda_event end, float *ms) {
    SPAR_CUDA_CHECK(cudaEventElapsedTime(ms, start, end));
    return SPAR_OK;
}

extern "C" int spar_cuda_device_name(char *name, size_t len, int *sms, int *driver_version) {
    int dev = 0;
    cudaDeviceProp prop;
    SPAR_CUDA_CHECK(cudaGetDevice(&dev));
    SPAR_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
    SPAR_CUDA_CHECK(cudaDriverGetVersion(driver_version));
    snprintf(name, len, "%s", prop.name);
    *sms = prop.multiProcessorCount;
    return SPAR_OK;
}
