/* kernels.c: the table of kernel backends and the start-up choice among them. */
#include <string.h>

#include "kernels.h"

/* Best first: "auto" takes the first entry this host can run. Faster CPU and CUDA
 * backends join this list ahead of the scalar oracle. */
static const spar_kernels *const backends[] = {
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
    return "auto|scalar";
}
