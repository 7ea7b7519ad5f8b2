/* test_decode.c: the dense pieces of a decoder and decode attention (kernels.h).
 *
 * spar_decode_attention is checked against a float64 reference written the naive way
 * (whole score row, its maximum, the sum of exponentials) on awkward shapes: one key,
 * a tile and a bit, GQA, MQA, MHA, odd head dims, keys in a wider strided cache. RMSNorm,
 * RoPE, SwiGLU, argmax and the product are checked against their formulas.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>

#include <cmocka.h>

#include "kernels.h" // defines: spar_decode_attention, spar_rmsnorm, spar_rope, spar_swiglu,
                     //          spar_argmax, spar_matmul, spar_attn_dims

static double uniform(uint64_t *s) {
    *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
    return (double)(*s >> 11) / 9007199254740992.0 * 2.0 - 1.0;
}

static void fill(float *x, int64_t n, uint64_t seed, double scale) {
    for (int64_t i = 0; i < n; i++)
        x[i] = (float)(scale * uniform(&seed));
}

/* One case: H query heads, G kv heads, d, n keys, cache rows of `extra` more kv heads. */
static void decode_case(int H, int G, int d, int64_t n, int extra) {
    int64_t stride = (int64_t)(G + extra) * d;
    float *q = malloc(sizeof(float) * (size_t)(H * d)), *o = malloc(sizeof(float) * (size_t)(H * d));
    float *k = malloc(sizeof(float) * (size_t)(n * stride + 1)), *v = malloc(sizeof(float) * (size_t)(n * stride + 1));
    float *lse = malloc(sizeof(float) * (size_t)H);
    assert_non_null(q), assert_non_null(o), assert_non_null(k), assert_non_null(v), assert_non_null(lse);
    fill(q, H * d, 1, 2.0), fill(k, n * stride, 2, 2.0), fill(v, n * stride, 3, 1.0);
    spar_attn_dims dims = {H, G, d, (float)(1.0 / sqrt((double)d))};
    assert_int_equal(spar_decode_attention(&dims, n, k, v, stride, q, o, lse), 0);
    double num = 0, den = 0, *s = malloc(sizeof(double) * (size_t)(n + 1));
    assert_non_null(s);
    for (int h = 0; h < H; h++) {
        int g = h / (H / G);
        double mx = -INFINITY, sum = 0;
        for (int64_t j = 0; j < n; j++) {
            double dot = 0;
            for (int e = 0; e < d; e++)
                dot += (double)q[h * d + e] * k[j * stride + g * d + e];
            s[j] = dot * dims.scale;
            mx = s[j] > mx ? s[j] : mx;
        }
        for (int64_t j = 0; j < n; j++)
            sum += exp(s[j] - mx);
        if (n == 0) {
            assert_true(isinf(lse[h]) && lse[h] < 0);
            continue;
        }
        assert_true(fabs(lse[h] - (mx + log(sum))) < 1e-5 * fmax(1.0, fabs(mx)));
        for (int e = 0; e < d; e++) {
            double ref = 0;
            for (int64_t j = 0; j < n; j++)
                ref += exp(s[j] - mx) / sum * v[j * stride + g * d + e];
            num += (o[h * d + e] - ref) * (o[h * d + e] - ref), den += ref * ref;
        }
    }
    assert_true(n == 0 || sqrt(num / den) < 1e-5);
    free(q), free(o), free(k), free(v), free(lse), free(s);
}

static void decode_attention_shapes(void **state) {
    (void)state;
    decode_case(4, 4, 8, 1, 0);    /* one key, MHA */
    decode_case(6, 2, 10, 65, 1);  /* a tile and one more, GQA, strided */
    decode_case(4, 1, 7, 200, 2);  /* MQA, odd d */
    decode_case(8, 2, 64, 1000, 0); /* many tiles */
    decode_case(2, 2, 4, 0, 0);    /* nothing cached: the empty partial */
    /* head dims that are multiples of 16 take the AVX-512 path where the processor has it:
     * 1, 2, 3 and 8 queries per kv head, partial key blocks and tiles, more kv heads than
     * one pass reads, d beyond one block of output columns */
    decode_case(1, 1, 16, 17, 0);
    decode_case(6, 2, 32, 129, 1);
    decode_case(6, 3, 128, 300, 0);
    decode_case(16, 2, 48, 515, 0);
    decode_case(10, 10, 80, 257, 2);
    decode_case(4, 4, 64, 0, 0);
}

static void dense_pieces(void **state) {
    (void)state;
    float x[6] = {1, -2, 3, 0.5f, 0, -1}, w[3] = {1, 2, 0.5f}, out[6];
    spar_rmsnorm(2, 3, x, w, 1e-5, out);
    double r0 = 1.0 / sqrt((1 + 4 + 9) / 3.0 + 1e-5);
    assert_true(fabs(out[1] - (-2 * r0 * 2)) < 1e-6);
    float t[4] = {1, 2, 3, 4}; /* one head of d 4: pairs (1,3) and (2,4) */
    int64_t pos = 3;
    spar_rope(1, 1, 4, &pos, 100.0, t);
    double a0 = 3.0, a1 = 3.0 * pow(100.0, -0.5);
    assert_true(fabs(t[0] - (1 * cos(a0) - 3 * sin(a0))) < 1e-6);
    assert_true(fabs(t[2] - (3 * cos(a0) + 1 * sin(a0))) < 1e-6);
    assert_true(fabs(t[1] - (2 * cos(a1) - 4 * sin(a1))) < 1e-6);
    float gate[2] = {1, -3}, up[2] = {2, 5}, g2[2];
    spar_swiglu(2, gate, up, g2);
    assert_true(fabs(g2[1] - (-3 / (1 + exp(3.0)) * 5)) < 1e-6);
    float y[5] = {1, 7, 7, -2, 3};
    assert_int_equal(spar_argmax(5, y), 1);
    float a[6] = {1, 2, 3, 4, 5, 6}, b[6] = {1, 0, 0, 1, 1, 1}, c[4] = {1, 1, 1, 1};
    spar_matmul(2, 2, 3, a, b, c, true); /* [1 2 3; 4 5 6] [1 0; 0 1; 1 1] + 1 */
    assert_true(c[0] == 5 && c[1] == 6 && c[2] == 11 && c[3] == 12);
}

int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(decode_attention_shapes),
                                       cmocka_unit_test(dense_pieces)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
