/* kernels.c: the table of kernel backends and the start-up choice among them. */
#include <stdio.h>
#include <string.h>

#include "cpu/cpu_kernels.h"
#include "spar_status.h"

/* The oracle state products have no failure path but the table's type returns one. */
static int fwd_state_plain(const spar_linear_dims *dims, bool causal, int64_t n, const float *q,
                           const float *s, float *o) {
    spar_linear_fwd_state(dims, causal, n, q, s, o);
    return 0;
}

static int bwd_state_plain(const spar_linear_dims *dims, bool causal, int64_t n, const float *k,
                           const float *v, const float *dout, const float *s, const float *dkv,
                           float *dq, float *dk, float *dv) {
    spar_linear_bwd_state(dims, causal, n, k, v, dout, s, dkv, dq, dk, dv);
    return 0;
}

#define PLAIN_STATES                                                                               \
    .linear_state = spar_linear_state, .linear_fwd_state = fwd_state_plain,                        \
    .linear_dstate = spar_linear_dstate, .linear_bwd_state = bwd_state_plain

const spar_kernels spar__kernels_scalar = {
    .name = "scalar",
    .softmax_fwd_block = spar__softmax_fwd_block_scalar,
    .softmax_bwd_block = spar__softmax_bwd_block_scalar,
    .linear_fwd_local = spar__linear_fwd_local_scalar,
    .linear_bwd_local = spar__linear_bwd_local_scalar,
    PLAIN_STATES,
};

/* Softmax shares the scalar kernels until SIMD ones arrive; linear attention is blocked. */
const spar_kernels spar__kernels_blocked = {
    .name = "blocked",
    .softmax_fwd_block = spar__softmax_fwd_block_scalar,
    .softmax_bwd_block = spar__softmax_bwd_block_scalar,
    .linear_fwd_local = spar__linear_fwd_local_blocked,
    .linear_bwd_local = spar__linear_bwd_local_blocked,
    PLAIN_STATES,
};

static int none_softmax(const spar_attn_dims *dims, bool causal, const spar_qblock *q,
                        const spar_kvblock *kv) {
    (void)dims, (void)causal, (void)q, (void)kv;
    return 0;
}

static int none_linear_fwd(const spar_linear_dims *dims, int64_t n, const float *q, const float *k,
                           const float *v, float *o) {
    (void)dims, (void)n, (void)q, (void)k, (void)v, (void)o;
    return 0;
}

static int none_linear_bwd(const spar_linear_dims *dims, int64_t n, const float *q, const float *k,
                           const float *v, const float *dout, float *dq, float *dk, float *dv) {
    (void)dims, (void)n, (void)q, (void)k, (void)v, (void)dout, (void)dq, (void)dk, (void)dv;
    return 0;
}

static int none_state(const spar_linear_dims *dims, bool causal, int64_t n, const float *x,
                      const float *y, float *m) {
    (void)dims, (void)causal, (void)n, (void)x, (void)y, (void)m;
    return 0;
}

static int none_bwd_state(const spar_linear_dims *dims, bool causal, int64_t n, const float *k,
                          const float *v, const float *dout, const float *s, const float *dkv,
                          float *dq, float *dk, float *dv) {
    (void)dims, (void)causal, (void)n, (void)k, (void)v, (void)dout, (void)s, (void)dkv;
    (void)dq, (void)dk, (void)dv;
    return 0;
}

const spar_kernels spar_kernels_none = {
    .name = "none",
    .softmax_fwd_block = none_softmax,
    .softmax_bwd_block = none_softmax,
    .linear_fwd_local = none_linear_fwd,
    .linear_bwd_local = none_linear_bwd,
    .linear_state = none_state, /* states of any value: the messages keep their size */
    .linear_fwd_state = none_state,
    .linear_dstate = none_state,
    .linear_bwd_state = none_bwd_state,
};

#ifdef SPAR_HAVE_BLAS
#include <cblas.h>
#include <omp.h>
#include <stdlib.h>

/* OpenBLAS sgemm for the block products of both attention types. */
static const spar_kernels kernels_blas = {
    .name = "blas",
    .softmax_fwd_block = spar__softmax_fwd_block_blas,
    .softmax_bwd_block = spar__softmax_bwd_block_blas,
    .linear_fwd_local = spar__linear_fwd_local_blas,
    .linear_bwd_local = spar__linear_bwd_local_blas,
    .linear_state = spar__linear_state_blas,
    .linear_fwd_state = spar__linear_fwd_state_blas,
    .linear_dstate = spar__linear_dstate_blas,
    .linear_bwd_state = spar__linear_bwd_state_blas,
};

void openblas_set_num_threads(int num_threads); /* from OpenBLAS */
#endif

#ifdef SPAR_HAVE_CUDA
/* The CUDA backend (kernels/cuda/): every member, on host tensors staged through the
 * device (staged.c); the device-resident launchers are in cuda/cuda_kernels.h. */
#include "cuda/cuda_kernels.h"
#endif

int spar_kernels_cuda_devices(char *why, size_t len) {
#ifdef SPAR_HAVE_CUDA
    return spar__cuda_devices(why, len);
#else
    snprintf(why, len, "this build has no CUDA (configured without nvcc, or SPAR_WITH_CUDA=OFF)");
    return 0;
#endif
}

int spar_kernels_cuda_use_device(int local_rank, int *device) {
#ifdef SPAR_HAVE_CUDA
    return spar__cuda_use_device(local_rank, device);
#else
    (void)local_rank, (void)device;
    return SPAR_EUNSUP;
#endif
}

const spar_kernels *spar_kernels_cuda(void) {
#ifdef SPAR_HAVE_CUDA
    return &spar__kernels_cuda;
#else
    return NULL;
#endif
}

/* Best first: "auto" takes the first entry this build has. */
static const spar_kernels *const backends[] = {
#ifdef SPAR_HAVE_BLAS
    &kernels_blas,
#endif
    &spar__kernels_blocked,
    &spar__kernels_scalar,
};

const spar_kernels *spar_kernels_select(const char *name) {
    size_t count = sizeof backends / sizeof backends[0];
    if (!name || strcmp(name, "auto") == 0) return backends[0];
    for (size_t i = 0; i < count; i++)
        if (strcmp(backends[i]->name, name) == 0) return backends[i];
    if (strcmp(name, "none") == 0) return &spar_kernels_none;
    return NULL;
}

const char *spar_kernels_names(void) {
#ifdef SPAR_HAVE_BLAS
    return "auto|blas|blocked|scalar|none";
#else
    return "auto|blocked|scalar|none";
#endif
}

int spar_kernels_set_threads(int threads) {
#ifdef SPAR_HAVE_BLAS
    /* Our threads split the heads; each sgemm then runs on the thread that calls it. */
    openblas_set_num_threads(1);
    if (threads > 0) omp_set_num_threads(threads);
    return omp_get_max_threads();
#else
    (void)threads;
    return 1;
#endif
}

double spar_kernels_sgemm_gflops(int m, int n, int k, double min_seconds) {
#ifdef SPAR_HAVE_BLAS
    double flops = 0.0, start = omp_get_wtime(), elapsed = 0.0;
    int failed = 0;
#pragma omp parallel reduction(+ : flops)
    {
        float *a = calloc((size_t)m * (size_t)k, sizeof(float));
        float *b = calloc((size_t)k * (size_t)n, sizeof(float));
        float *c = calloc((size_t)m * (size_t)n, sizeof(float));
        if (!a || !b || !c) {
#pragma omp atomic write
            failed = 1;
        }
        for (size_t i = 0; !failed && i < (size_t)m * (size_t)k; i++)
            a[i] = (float)(i % 7) * 0.25f;
        for (size_t i = 0; !failed && i < (size_t)k * (size_t)n; i++)
            b[i] = (float)(i % 5) * 0.5f;
#pragma omp barrier
        while (!failed && omp_get_wtime() - start < min_seconds) {
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, 1.0f, a, k, b, n, 0.0f,
                        c, n);
            flops += 2.0 * m * n * k;
        }
        free(a), free(b), free(c);
    }
    elapsed = omp_get_wtime() - start;
    return failed || elapsed <= 0 ? 0.0 : flops / elapsed / 1e9;
#else
    (void)m, (void)n, (void)k, (void)min_seconds;
    return 0.0;
#endif
}
