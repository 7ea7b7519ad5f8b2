/* merge.c: the element-wise pieces around the block kernels: exact merging of partial
 * softmax results (DESIGN.md 3.1) in fp32 storage
 * with double arithmetic per row so that many merges (one per ring step) add no
 * error beyond the final rounding. */
#include <math.h>
#include <string.h>

#include "cpu_kernels.h"

void spar_softmax_init_partial(int64_t n, int heads, int head_dim, float *o, float *lse) {
    int64_t rows = n * heads;
    for (int64_t r = 0; r < rows; r++) {
        lse[r] = -INFINITY;
        for (int c = 0; c < head_dim; c++)
            o[r * head_dim + c] = 0.0f;
    }
}

void spar_softmax_merge(int64_t n, int heads, int head_dim, float *o_a, float *lse_a,
                        const float *o_b, const float *lse_b) {
    int64_t rows = n * heads;
    for (int64_t r = 0; r < rows; r++) {
        if (isinf(lse_b[r]) && lse_b[r] < 0) continue; /* b saw no keys */
        if (isinf(lse_a[r]) && lse_a[r] < 0) {         /* a saw none: b as it is, bit for bit */
            lse_a[r] = lse_b[r];
            for (int c = 0; c < head_dim; c++)
                o_a[r * head_dim + c] = o_b[r * head_dim + c];
            continue;
        }
        double wa, wb, lse = spar__merge_weights(lse_a[r], lse_b[r], &wa, &wb);
        for (int c = 0; c < head_dim; c++) {
            int64_t i = r * head_dim + c;
            o_a[i] = (float)(wa * o_a[i] + wb * o_b[i]);
        }
        lse_a[r] = (float)lse;
    }
}

void spar_softmax_bwd_delta(int64_t n, int heads, int head_dim, const float *o, const float *dout,
                            float *delta) {
    for (int64_t r = 0; r < n * heads; r++) {
        double s = 0.0;
        for (int c = 0; c < head_dim; c++)
            s += (double)o[r * head_dim + c] * (double)dout[r * head_dim + c];
        delta[r] = (float)s;
    }
}

void spar_vec_add(int64_t n, float *y, const float *x) {
    for (int64_t i = 0; i < n; i++)
        y[i] += x[i];
}

void spar_to_bf16(int64_t n, const float *x, uint16_t *dst) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &x[i], sizeof u);
        if ((u & 0x7fffffffu) > 0x7f800000u) { /* NaN: keep it one (rounding could make inf) */
            dst[i] = (uint16_t)((u >> 16) | 0x40u);
            continue;
        }
        u += 0x7fffu + ((u >> 16) & 1u); /* to nearest, ties to even */
        dst[i] = (uint16_t)(u >> 16);
    }
}
