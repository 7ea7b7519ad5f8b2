/* decode_avx512.c: decode attention of one query token over a KV cache with AVX-512
 * intrinsics, for head dims that are a multiple of 16 (internal to the kernels room;
 * decode.c chooses it when the processor has AVX-512F).
 *
 * Decode reads every cached key and value once per token, so it should run at memory
 * speed. The generic path (decode.c) hands each tile to sgemm, which first packs (copies)
 * the tile; here each row is used straight from memory: a key row's 16-float chunks meet
 * every query of the group in registers, and a value row is added into output
 * accumulators that stay in registers for the whole tile. Rows PREFETCH_BYTES ahead are
 * prefetched a few at a time while the tile is computed, and the kv heads of a row are
 * served together so that a row is read from memory once. Measured against a triad over
 * as many bytes (README, "Generation with offloaded attention"): 0.69-0.89 at d=64, about
 * 0.6 at d=128. Leaves out: other head dims and machines without AVX-512 (decode.c's
 * generic path).
 */
#include <math.h>
#include <stdbool.h>

#include "cpu_kernels.h"
#include "exp_simd.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#define TILE 128          /* keys per tile: its scores stay in L1 */
#define QB 4              /* queries whose output accumulators share one pass over the values */
#define CB 4              /* 16-float columns of each accumulated output row: QB x CB registers */
#define MAX_PER 64        /* queries per kv head (more: decode.c's generic path) */
#define HEADS_PER_PASS 8  /* kv heads whose columns of a tile are read in one pass */
#define PREFETCH_BYTES 16384 /* prefetched ahead of the rows in use, per head (k and v);
                                hints to L2 or farther distances measured no better */

#define AVX512 __attribute__((target("avx512f")))

/* Sixteen dot products at once: a[p] holds 16 partial sums of pair p; returns the 16
 * totals, lane p = pair p. Adds neighbours pairwise (unpack, then across 128-bit lanes)
 * instead of reducing each register alone: 45 operations instead of 16 x 8. */
AVX512 static inline __m512 sum16(const __m512 a[16]) {
    __m512 r[8], w[4];
    for (int i = 0; i < 8; i++) /* per 128-bit lane: [x0+x2, y0+y2, x1+x3, y1+y3] */
        r[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                             _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++) { /* per 128-bit lane: one partial of pairs 4i..4i+3 */
        __m512d x = _mm512_castps_pd(r[2 * i]), y = _mm512_castps_pd(r[2 * i + 1]);
        w[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), /* moved as pairs, */
                             _mm512_castpd_ps(_mm512_unpackhi_pd(x, y))); /* added as floats */
    }
    __m512 w01 = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x44),
                               _mm512_shuffle_f32x4(w[0], w[1], 0xEE));
    __m512 w23 = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], 0x44),
                               _mm512_shuffle_f32x4(w[2], w[3], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w01, w23, 0x88),
                         _mm512_shuffle_f32x4(w01, w23, 0xDD));
}

/* Scores of qj queries (1, 2 or 4) from j0 against 16/qj keys from t: pair p = 4 g + u
 * is query j0 + g / (4/qj) against key t + (g % (4/qj)) * 4 + u, so that each query's
 * keys come out contiguous. */
AVX512 static inline __attribute__((always_inline)) void
scores16(int qj, int d, float scale, const float *q, const float *k, int64_t stride,
         float s[][TILE], int j0, int t) {
    int nk = 16 / qj, gq = 4 / qj;
    __m512 a[16];
    for (int p = 0; p < 16; p++)
        a[p] = _mm512_setzero_ps();
    for (int e = 0; e < d; e += 16)
        for (int u = 0; u < nk; u++) {
            __m512 kc = _mm512_loadu_ps(k + (t + u) * stride + e);
            for (int jj = 0; jj < qj; jj++) {
                int p = (jj * gq + u / 4) * 4 + u % 4;
                a[p] = _mm512_fmadd_ps(_mm512_loadu_ps(q + (j0 + jj) * d + e), kc, a[p]);
            }
        }
    __m512 r = _mm512_mul_ps(_mm512_set1_ps(scale), sum16(a));
    if (qj == 1) {
        _mm512_storeu_ps(&s[j0][t], r);
    } else if (qj == 2) {
        _mm256_storeu_ps(&s[j0][t], _mm512_castps512_ps256(r));
        _mm256_storeu_ps(&s[j0 + 1][t],
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(r), 1)));
    } else {
        _mm_storeu_ps(&s[j0][t], _mm512_castps512_ps128(r));
        _mm_storeu_ps(&s[j0 + 1][t], _mm512_extractf32x4_ps(r, 1));
        _mm_storeu_ps(&s[j0 + 2][t], _mm512_extractf32x4_ps(r, 2));
        _mm_storeu_ps(&s[j0 + 3][t], _mm512_extractf32x4_ps(r, 3));
    }
}

/* One score the plain way, for the keys past the last whole block. */
AVX512 static inline float score1(int d, const float *qj, const float *kt) {
    __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qj), _mm512_loadu_ps(kt));
    for (int e = 16; e < d; e += 16)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(qj + e), _mm512_loadu_ps(kt + e), acc);
    return _mm512_reduce_add_ps(acc);
}

/* Touch the lines of rows [from, to) of k and v (to < left: the rows that exist). */
AVX512 static inline void prefetch_rows(const float *k, const float *v, int64_t stride, int d,
                                        int64_t from, int64_t to, int64_t left) {
    for (int64_t t = from; t < to && t < left; t++)
        for (int e = 0; e < d; e += 16) {
            _mm_prefetch((const char *)(k + t * stride + e), _MM_HINT_T0);
            _mm_prefetch((const char *)(v + t * stride + e), _MM_HINT_T0);
        }
}

/* s[j][t] = scale * q_j . k_t for the tile's len keys; q: [per, d], k rows stride apart.
 * The rows ahead rows on (of k and v; left rows exist from k on) are prefetched along
 * the way, a few per block of keys: issued in one burst, prefetches fill the line buffers
 * and stall the work they should hide behind. */
AVX512 static void tile_scores(int per, int d, int len, float scale, const float *q,
                               const float *k, const float *v, int64_t stride, int ahead,
                               int64_t left, float s[][TILE]) {
    for (int j0 = 0; j0 < per;) {
        int qj = per - j0 >= 4 ? 4 : per - j0 >= 2 ? 2 : 1, nk = 16 / qj, t = 0;
        for (; t + nk <= len; t += nk) {
            if (j0 == 0) prefetch_rows(k, v, stride, d, t + ahead, t + ahead + nk, left);
            if (qj == 4)
                scores16(4, d, scale, q, k, stride, s, j0, t);
            else if (qj == 2)
                scores16(2, d, scale, q, k, stride, s, j0, t);
            else
                scores16(1, d, scale, q, k, stride, s, j0, t);
        }
        if (j0 == 0) prefetch_rows(k, v, stride, d, t + ahead, len + ahead, left);
        for (; t < len; t++)
            for (int jj = 0; jj < qj; jj++)
                s[j0 + jj][t] = scale * score1(d, q + (j0 + jj) * d, k + t * stride);
        j0 += qj;
    }
}

/* o[j][c..] = o[j][c..] * rescale[j] + sum_t p[j][t] v_t[c..] for queries j0..j0+nq-1 and
 * columns c0..c0+16*nc-1, the accumulators in registers across the tile. */
AVX512 static inline __attribute__((always_inline)) void
tile_values_block(int d, int len, const float *v, int64_t stride, float s[][TILE], int j0, int nq,
                  int c0, int nc, const float *rescale, float *o) {
    __m512 acc[QB][CB];
    for (int j = 0; j < nq; j++)
        for (int c = 0; c < nc; c++)
            acc[j][c] = _mm512_mul_ps(_mm512_set1_ps(rescale[j0 + j]),
                                      _mm512_loadu_ps(o + (j0 + j) * d + c0 + 16 * c));
    for (int t = 0; t < len; t++) {
        const float *vt = v + t * stride + c0;
        __m512 row[CB];
        for (int c = 0; c < nc; c++)
            row[c] = _mm512_loadu_ps(vt + 16 * c);
        for (int j = 0; j < nq; j++) {
            __m512 p = _mm512_set1_ps(s[j0 + j][t]);
            for (int c = 0; c < nc; c++)
                acc[j][c] = _mm512_fmadd_ps(p, row[c], acc[j][c]);
        }
    }
    for (int j = 0; j < nq; j++)
        for (int c = 0; c < nc; c++)
            _mm512_storeu_ps(o + (j0 + j) * d + c0 + 16 * c, acc[j][c]);
}

/* The tile's values into every query's output, block by block of QB queries x CB columns. */
AVX512 static void tile_values(int per, int d, int len, const float *v, int64_t stride,
                               float s[][TILE], const float *rescale, float *o) {
    for (int c0 = 0; c0 < d; c0 += 16 * CB) {
        int nc = (d - c0) / 16 < CB ? (d - c0) / 16 : CB;
        for (int j0 = 0; j0 < per; j0 += QB) {
            int nq = per - j0 < QB ? per - j0 : QB;
            /* constant shapes, so that the accumulators live in registers */
            if (nc == CB && nq == 4)
                tile_values_block(d, len, v, stride, s, j0, 4, c0, CB, rescale, o);
            else if (nc == CB && nq == 2)
                tile_values_block(d, len, v, stride, s, j0, 2, c0, CB, rescale, o);
            else if (nc == CB && nq == 1)
                tile_values_block(d, len, v, stride, s, j0, 1, c0, CB, rescale, o);
            else
                tile_values_block(d, len, v, stride, s, j0, nq, c0, nc, rescale, o);
        }
    }
}

/* The largest of x[0..n-1] (n >= 1), sixteen lanes at a time: a scalar loop would be one
 * long chain of dependent comparisons. */
AVX512 static float row_max(const float *x, int n) {
    __m512 mx = _mm512_set1_ps(-INFINITY);
    int t = 0;
    for (; t + 16 <= n; t += 16)
        mx = _mm512_max_ps(mx, _mm512_loadu_ps(x + t));
    float r = _mm512_reduce_max_ps(mx);
    for (; t < n; t++)
        r = x[t] > r ? x[t] : r;
    return r;
}

/* The running softmax of one kv head's queries: max, denominator, and this tile's rescale. */
typedef struct {
    float m[MAX_PER], l[MAX_PER], c[MAX_PER];
} head_state;

/* One tile of len rows (from k, v: this head's columns) into one kv head's queries. */
AVX512 static void tile_head(int per, int d, float scale, int len, int ahead, int64_t left,
                             const float *k,
                             const float *v, int64_t stride, const float *q, float *o,
                             head_state *h, float s[][TILE]) {
    tile_scores(per, d, len, scale, q, k, v, stride, ahead, left, s);
    for (int j = 0; j < per; j++) { /* online softmax: rescale to the new max */
        float mx = fmaxf(h->m[j], row_max(s[j], len));
        h->c[j] = expf(h->m[j] - mx);
        h->l[j] = h->l[j] * h->c[j] + exp_row(s[j], len, mx), h->m[j] = mx;
    }
    tile_values(per, d, len, v, stride, s, h->c, o);
}

/* Heads g0..g0+nh-1 over rows 0..n-1, tile by tile: each tile's rows are read once for
 * all of these heads, so that the heads' columns of a row come from memory together. */
AVX512 static void head_batch(const spar_attn_dims *dims, int g0, int nh, int64_t n,
                              const float *k, const float *v, int64_t stride, const float *q,
                              float *o, float *lse) {
    int d = dims->head_dim, per = dims->heads / dims->kv_heads;
    int ahead = PREFETCH_BYTES / (2 * d * (int)sizeof(float)); /* rows, k and v */
    head_state h[HEADS_PER_PASS];
    float s[MAX_PER][TILE];
    for (int i = 0; i < nh * per; i++) {
        h[i / per].m[i % per] = -INFINITY, h[i / per].l[i % per] = 0.0f;
        for (int e = 0; e < d; e++)
            o[((int64_t)g0 * per + i) * d + e] = 0.0f;
    }
    for (int64_t t0 = 0; t0 < n; t0 += TILE) {
        int len = n - t0 < TILE ? (int)(n - t0) : TILE;
        for (int g = g0; g < g0 + nh; g++) {
            int64_t col = (int64_t)g * d, qo = (int64_t)g * per * d;
            tile_head(per, d, dims->scale, len, ahead, n - t0, k + t0 * stride + col,
                      v + t0 * stride + col, stride, q + qo, o + qo, &h[g - g0], s);
        }
    }
    for (int i = 0; i < nh * per; i++) {
        const head_state *hs = &h[i / per];
        float l = hs->l[i % per], inv = l > 0.0f ? 1.0f / l : 0.0f;
        float *oi = o + ((int64_t)g0 * per + i) * d;
        for (int e = 0; e < d; e++)
            oi[e] *= inv;
        lse[(int64_t)g0 * per + i] = l > 0.0f ? hs->m[i % per] + logf(l) : -INFINITY;
    }
}

AVX512 void spar__decode_avx512(const spar_attn_dims *dims, int64_t n, const float *k,
                                const float *v, int64_t stride, const float *q, float *o,
                                float *lse) {
    for (int g0 = 0; g0 < dims->kv_heads; g0 += HEADS_PER_PASS)
        head_batch(dims, g0,
                   dims->kv_heads - g0 < HEADS_PER_PASS ? dims->kv_heads - g0 : HEADS_PER_PASS,
                   n, k, v, stride, q, o, lse);
}

bool spar__decode_avx512_usable(const spar_attn_dims *dims) {
    return dims->head_dim % 16 == 0 && dims->heads / dims->kv_heads <= MAX_PER &&
           __builtin_cpu_supports("avx512f");
}

#else
void spar__decode_avx512(const spar_attn_dims *dims, int64_t n, const float *k, const float *v,
                         int64_t stride, const float *q, float *o, float *lse) {
    (void)dims, (void)n, (void)k, (void)v, (void)stride, (void)q, (void)o, (void)lse;
}

bool spar__decode_avx512_usable(const spar_attn_dims *dims) {
    (void)dims;
    return false;
}
#endif
