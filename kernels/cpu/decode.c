/* decode.c: attention of one query token over a KV cache (kernels.h), the memory-bound
 * heart of decoding.
 *
 * Each kv head's keys and values are read once for its whole query group (GQA): keys
 * in tiles, the group's scores for a tile (an sgemm where the build has OpenBLAS), an
 * online softmax across tiles (running max and sum, rescaled when the max grows, the
 * exponentials vectorised), then the tile's values. So the cache streams through once
 * instead of once per query head. Caches longer than 8 tiles prefetch the next tile
 * while a tile is computed (measured 1.2x at 8K keys, 1.07x at 32K; shorter caches sit in
 * the last-level cache, where the prefetches only cost). This is the generic path: head
 * dims that are multiples of 16 on processors with AVX-512 go to decode_avx512.c, which
 * reads each row straight from memory instead of through sgemm's packing copies.
 */
#include <math.h>
#include <stdbool.h>

#include "cpu_kernels.h"
#include "exp_simd.h"
#include "spar_status.h"

#ifdef SPAR_HAVE_BLAS
#include <cblas.h>
#define TILE 256 /* the tile's products as sgemm: group x tile x d */
#else
#define TILE 64
#endif
#define MAX_GROUP 64

/* One kv head g: queries q[j] (j < per, head_dim d) over keys/values rows 0..n-1. */
static void group(const spar_attn_dims *dims, int g, int64_t n, const float *k, const float *v,
                  int64_t stride, const float *q, float *o, float *lse) {
    int d = dims->head_dim, per = dims->heads / dims->kv_heads;
    float m[MAX_GROUP], l[MAX_GROUP], s[MAX_GROUP][TILE];
    for (int j = 0; j < per; j++) {
        m[j] = -INFINITY, l[j] = 0.0f;
        for (int e = 0; e < d; e++)
            o[j * d + e] = 0.0f;
    }
    bool prefetch = n > 8 * TILE; /* measured: a gain from DRAM, a loss from cache */
    for (int64_t t0 = 0; t0 < n; t0 += TILE) {
        int len = n - t0 < TILE ? (int)(n - t0) : TILE;
        for (int64_t t = t0 + TILE; prefetch && t < t0 + 2 * TILE && t < n; t++)
            for (int e = 0; e < d; e += 16) { /* the next tile's lines, while this one runs */
                __builtin_prefetch(k + t * stride + (int64_t)g * d + e);
                __builtin_prefetch(v + t * stride + (int64_t)g * d + e);
            }
#ifdef SPAR_HAVE_BLAS
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, per, len, d, dims->scale, q, d,
                    k + t0 * stride + (int64_t)g * d, (int)stride, 0.0f, &s[0][0], TILE);
#else
        for (int t = 0; t < len; t++) { /* the tile's keys: every query of the group */
            const float *kt = k + (t0 + t) * stride + (int64_t)g * d;
            for (int j = 0; j < per; j++) {
                const float *qj = q + j * d;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int e = 0; e < d; e++)
                    dot += qj[e] * kt[e];
                s[j][t] = dot * dims->scale;
            }
        }
#endif
        for (int j = 0; j < per; j++) { /* online softmax: rescale to the new max */
            float mx = m[j];
            for (int t = 0; t < len; t++)
                mx = s[j][t] > mx ? s[j][t] : mx;
            float c = expf(m[j] - mx), sum = exp_row(s[j], len, mx);
            l[j] = l[j] * c + sum, m[j] = mx;
            for (int e = 0; e < d; e++)
                o[j * d + e] *= c;
        }
#ifdef SPAR_HAVE_BLAS
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, per, d, len, 1.0f, &s[0][0], TILE,
                    v + t0 * stride + (int64_t)g * d, (int)stride, 1.0f, o, d);
#else
        for (int t = 0; t < len; t++) { /* the tile's values */
            const float *vt = v + (t0 + t) * stride + (int64_t)g * d;
            for (int j = 0; j < per; j++) {
                float p = s[j][t], *oj = o + j * d;
#pragma omp simd
                for (int e = 0; e < d; e++)
                    oj[e] += p * vt[e];
            }
        }
#endif
    }
    for (int j = 0; j < per; j++) {
        float inv = l[j] > 0.0f ? 1.0f / l[j] : 0.0f;
        for (int e = 0; e < d; e++)
            o[j * d + e] *= inv;
        lse[j] = l[j] > 0.0f ? m[j] + logf(l[j]) : -INFINITY;
    }
}

int spar_decode_attention(const spar_attn_dims *dims, int64_t n, const float *k, const float *v,
                          int64_t stride_kv, const float *q, float *o, float *lse) {
    int per = dims->heads / dims->kv_heads, d = dims->head_dim;
    if (per > MAX_GROUP) return SPAR_EUNSUP; /* validation refuses such models first */
    if (spar__decode_avx512_usable(dims)) {
        spar__decode_avx512(dims, n, k, v, stride_kv, q, o, lse);
        return 0;
    }
    for (int g = 0; g < dims->kv_heads; g++)
        group(dims, g, n, k, v, stride_kv, q + (int64_t)g * per * d, o + (int64_t)g * per * d,
              lse + (int64_t)g * per);
    return 0;
}
