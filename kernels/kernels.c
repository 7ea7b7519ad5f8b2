/* kernels.c: the table of kernel backends and the start-up choice among them. */
#include <string.h>

#include "cpu/cpu_kernels.h"

const spar_kernels spar__kernels_scalar = {
    .name = "scalar",
    .softmax_fwd_block = spar__softmax_fwd_block_scalar,
    .softmax_bwd_block = spar__softmax_bwd_block_scalar,
    .linear_fwd_local = spar__linear_fwd_local_scalar,
    .linear_bwd_local = spar__linear_bwd_local_scalar,
};

/* Softmax shares the scalar kernels until SIMD ones arrive; linear attention is blocked. */
const spar_kernels spar__kernels_blocked = {
    .name = "blocked",
    .softmax_fwd_block = spar__softmax_fwd_block_scalar,
    .softmax_bwd_block = spar__softmax_bwd_block_scalar,
    .linear_fwd_local = spar__linear_fwd_local_blocked,
    .linear_bwd_local = spar__linear_bwd_local_blocked,
};

#ifdef SPAR_HAVE_BLAS
#include <omp.h>

/* OpenBLAS sgemm for the softmax block products, blocked linear attention. */
static const spar_kernels kernels_blas = {
    .name = "blas",
    .softmax_fwd_block = spar__softmax_fwd_block_blas,
    .softmax_bwd_block = spar__softmax_bwd_block_blas,
    .linear_fwd_local = spar__linear_fwd_local_blocked,
    .linear_bwd_local = spar__linear_bwd_local_blocked,
};

void openblas_set_num_threads(int num_threads); /* from OpenBLAS */
#endif

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
    return NULL;
}

const char *spar_kernels_names(void) {
#ifdef SPAR_HAVE_BLAS
    return "auto|blas|blocked|scalar";
#else
    return "auto|blocked|scalar";
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
