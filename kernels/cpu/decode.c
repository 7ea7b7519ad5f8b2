/* decode.c: attention of one query token over a KV cache (kernels.h), the memory-bound
 * heart of decoding.
 *
 * Each kv head's keys and values are read once for its whole query group (GQA), tile by
 * tile: the group's scores for the tile's keys, an online softmax across tiles (running
 * max and sum, rescaled when the max grows; the exponentials vectorised), then the
 * tile's values. Keys are stored transposed in blocks of 16 positions (kernels.h), so a
 * score block is 16 lanes wide and each loaded vector of keys feeds one FMA per query of
 * the group, with no horizontal sums; values are rows, and each query's output row stays
 * in registers across the tile.
 */
#include <math.h>

#include "exp_simd.h"
#include "kernels.h"
#include "spar_status.h"

#define TILE 128 /* keys per tile: the tile's values (128 x d floats) stay in L1/L2 */
#define MAX_GROUP 64
#define KB SPAR_KBLOCK

/* s[j][t] = scale q_j . k_t for the tile's keys (blocks of KB rows of kt, padded). Two
 * blocks and two elements at a time: four independent accumulator chains. */
SPAR_SIMD_CLONES static void scores(int per, int d, float scale, const float *q, const float *kt,
                                    int blocks, float (*s)[TILE]) {
    for (int b = 0; b < blocks; b += 2) {
        const float *k0 = kt + (int64_t)b * d * KB;
        const float *k1 = b + 1 < blocks ? k0 + d * KB : k0; /* an odd last block: twice */
        for (int j = 0; j < per; j++) {
            float a0[KB] = {0}, a1[KB] = {0}, a2[KB] = {0}, a3[KB] = {0};
            const float *qj = q + j * d;
            int e = 0;
            for (; e + 1 < d; e += 2) {
                float x = qj[e], y = qj[e + 1];
                for (int l = 0; l < KB; l++) {
                    a0[l] += x * k0[e * KB + l];
                    a1[l] += y * k0[(e + 1) * KB + l];
                    a2[l] += x * k1[e * KB + l];
                    a3[l] += y * k1[(e + 1) * KB + l];
                }
            }
            for (; e < d; e++)
                for (int l = 0; l < KB; l++) {
                    a0[l] += qj[e] * k0[e * KB + l];
                    a2[l] += qj[e] * k1[e * KB + l];
                }
            for (int l = 0; l < KB; l++) {
                s[j][b * KB + l] = (a0[l] + a1[l]) * scale;
                if (b + 1 < blocks) s[j][(b + 1) * KB + l] = (a2[l] + a3[l]) * scale;
            }
        }
    }
}

/* o_j += sum_t p[j][t] v_t over the tile's len keys: each pair of value rows is loaded
 * once from memory and added into every query's output row (in L1). */
SPAR_SIMD_CLONES static void values(int per, int d, int len, const float *restrict v,
                                    int64_t stride, float (*restrict p)[TILE], float *restrict o) {
    int t = 0;
    for (; t + 1 < len; t += 2) {
        const float *v0 = v + t * stride, *v1 = v0 + stride;
        for (int j = 0; j < per; j++) {
            float w0 = p[j][t], w1 = p[j][t + 1], *restrict oj = o + j * d;
            for (int e = 0; e < d; e++)
                oj[e] += w0 * v0[e] + w1 * v1[e];
        }
    }
    for (; t < len; t++)
        for (int j = 0; j < per; j++) {
            float w = p[j][t], *restrict oj = o + j * d;
            const float *vt = v + t * stride;
            for (int e = 0; e < d; e++)
                oj[e] += w * vt[e];
        }
}

/* One kv head: queries q[j] (j < per) over positions 0..n-1. */
static void group(const spar_attn_dims *dims, int64_t n, const float *kt, const float *v,
                  int64_t stride, const float *q, float *o, float *lse) {
    int d = dims->head_dim, per = dims->heads / dims->kv_heads;
    float m[MAX_GROUP], l[MAX_GROUP], s[MAX_GROUP][TILE];
    for (int j = 0; j < per; j++) {
        m[j] = -INFINITY, l[j] = 0.0f;
        for (int e = 0; e < d; e++)
            o[j * d + e] = 0.0f;
    }
    for (int64_t t0 = 0; t0 < n; t0 += TILE) {
        int len = n - t0 < TILE ? (int)(n - t0) : TILE;
        scores(per, d, dims->scale, q, kt + t0 * d, (len + KB - 1) / KB, s);
        for (int j = 0; j < per; j++) { /* online softmax: rescale to the new max */
            float mx = m[j];
            for (int t = 0; t < len; t++)
                mx = s[j][t] > mx ? s[j][t] : mx;
            float c = expf(m[j] - mx), sum = exp_row(s[j], len, mx);
            l[j] = l[j] * c + sum, m[j] = mx;
            for (int e = 0; e < d; e++)
                o[j * d + e] *= c;
        }
        values(per, d, len, v + t0 * stride, stride, s, o);
    }
    for (int j = 0; j < per; j++) {
        float inv = l[j] > 0.0f ? 1.0f / l[j] : 0.0f;
        for (int e = 0; e < d; e++)
            o[j * d + e] *= inv;
        lse[j] = l[j] > 0.0f ? m[j] + logf(l[j]) : -INFINITY;
    }
}

int spar_decode_attention(const spar_attn_dims *dims, int64_t n, const float *kt,
                          int64_t kt_head_stride, const float *v, int64_t stride_v, const float *q,
                          float *o, float *lse) {
    int per = dims->heads / dims->kv_heads, d = dims->head_dim;
    if (per > MAX_GROUP) return SPAR_EUNSUP; /* validation refuses such models first */
    for (int g = 0; g < dims->kv_heads; g++)
        group(dims, n, kt + g * kt_head_stride, v + (int64_t)g * d, stride_v,
              q + (int64_t)g * per * d, o + (int64_t)g * per * d, lse + (int64_t)g * per);
    return SPAR_OK;
}
