/* kernel_cases.c: the inputs, cases and checks the kernel tests share (kernel_cases.h). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#include <cmocka.h>

#include "kernel_cases.h" // defines: kc_case, kc_inputs, kc_cases, kc_check_close, ...

/* --- random inputs ------------------------------------------------------------------------ */

static uint64_t rng_state;

void kc_seed(uint64_t state) {
    rng_state = state;
}

static uint64_t xorshift64(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static double uniform01(void) {
    return (double)(xorshift64() >> 11) * 0x1.0p-53;
}

float kc_randn(void) {
    return (float)(uniform01() + uniform01() + uniform01() + uniform01() - 2.0);
}

float *kc_random_floats(int64_t count) {
    float *x = malloc(sizeof *x * (size_t)(count > 0 ? count : 1));
    assert_non_null(x);
    for (int64_t i = 0; i < count; i++)
        x[i] = kc_randn();
    return x;
}

float *kc_zero_floats(int64_t count) {
    float *x = calloc((size_t)(count > 0 ? count : 1), sizeof *x);
    assert_non_null(x);
    return x;
}

double *kc_to_double(int64_t n, const float *x) {
    double *y = malloc(sizeof *y * (size_t)(n > 0 ? n : 1));
    assert_non_null(y);
    for (int64_t i = 0; i < n; i++)
        y[i] = (double)x[i];
    return y;
}

/* --- the cases ---------------------------------------------------------------------------- */

const kc_case kc_cases[] = {
    {1, 1, 1, 7, 7, true, KC_POS_SAME},           /* head_dim 1 */
    {6, 2, 24, 5, 9, false, KC_POS_NONE},         /* GQA, nq != nk, no positions */
    {6, 2, 24, 12, 12, true, KC_POS_SAME},        /* GQA causal */
    {4, 1, 40, 11, 13, true, KC_POS_STRIPE},      /* MQA, stripe: query 0 sees no key */
    {3, 3, 80, 8, 8, true, KC_POS_SAME},          /* H = G */
    {2, 2, 33, 9, 17, true, KC_POS_RANDOM},       /* odd head_dim, irregular positions */
    {6, 2, 33, 14, 6, true, KC_POS_RANDOM},       /* GQA, nq > nk, irregular positions */
    {4, 1, 1, 3, 1, false, KC_POS_NONE},          /* MQA, a single key */
    {4, 4, 80, 5, 16, false, KC_POS_STRIPE},      /* positions given but not causal */
    {6, 3, 40, 6, 10, true, KC_POS_QUERIES_LATE}, /* causal but every key visible */
};
const size_t kc_case_count = sizeof kc_cases / sizeof kc_cases[0];

/* Sorted positions with random gaps of 1..4. */
static void random_positions(int64_t n, int64_t *pos) {
    int64_t t = (int64_t)(xorshift64() % 3);
    for (int64_t i = 0; i < n; i++) {
        pos[i] = t;
        t += 1 + (int64_t)(xorshift64() % 4);
    }
}

kc_inputs kc_make_inputs(const kc_case *c, uint64_t seed, bool with_dout) {
    kc_seed(seed * 0x9E3779B97F4A7C15ull + 1);
    int hh = c->heads, g = c->kv_heads, d = c->head_dim;
    kc_inputs in = {.dims = {hh, g, d, (float)(1.0 / sqrt(d))}};
    in.q = kc_random_floats(c->nq * hh * d);
    in.k = kc_random_floats(c->nk * g * d);
    in.v = kc_random_floats(c->nk * g * d);
    if (with_dout) in.dout = kc_random_floats(c->nq * hh * d);
    if (c->pos == KC_POS_NONE) return in;
    in.q_pos = malloc(sizeof *in.q_pos * (size_t)c->nq);
    in.k_pos = malloc(sizeof *in.k_pos * (size_t)c->nk);
    assert_true(in.q_pos && in.k_pos);
    for (int64_t i = 0; i < c->nq; i++)
        in.q_pos[i] = c->pos == KC_POS_STRIPE         ? 3 * i + 1
                      : c->pos == KC_POS_QUERIES_LATE ? 100 + i
                                                      : i;
    for (int64_t j = 0; j < c->nk; j++)
        in.k_pos[j] = c->pos == KC_POS_STRIPE ? 3 * j + 2 : j;
    if (c->pos == KC_POS_RANDOM)
        random_positions(c->nq, in.q_pos), random_positions(c->nk, in.k_pos);
    return in;
}

void kc_free_inputs(kc_inputs *in) {
    free(in->q), free(in->k), free(in->v), free(in->dout), free(in->q_pos), free(in->k_pos);
}

void kc_split_keys(int64_t nk, int parts, int64_t cut[4]) {
    cut[0] = 0, cut[1] = nk / 3 + 1, cut[2] = 2 * nk / 3 + 1, cut[3] = nk;
    if (parts == 2) cut[1] = nk / 2 + 1 > nk - 1 ? nk - 1 : nk / 2 + 1, cut[2] = nk;
}

/* --- strided views ------------------------------------------------------------------------ */

void kc_gather_heads(int64_t n, int heads, int h0, int count, int w, const float *wide,
                     float *dense) {
    for (int64_t i = 0; i < n; i++)
        memcpy(dense + i * count * w, wide + (i * heads + h0) * w,
               sizeof(float) * (size_t)(count * w));
}

void kc_scatter_heads(int64_t n, int heads, int h0, int count, int w, const float *dense,
                      float *wide) {
    for (int64_t i = 0; i < n; i++)
        memcpy(wide + (i * heads + h0) * w, dense + i * count * w,
               sizeof(float) * (size_t)(count * w));
}

/* --- checks ------------------------------------------------------------------------------- */

const kc_case *kc_current_case;

void kc_print_case(const kc_case *c) {
    if (c)
        fprintf(stderr, "case H=%d G=%d d=%d nq=%lld nk=%lld causal=%d pos=%d\n", c->heads,
                c->kv_heads, c->head_dim, (long long)c->nq, (long long)c->nk, c->causal, c->pos);
}

double kc_check_close(const char *what, int64_t n, const float *got, const double *ref,
                      double tol) {
    double num = 0.0, den = 0.0, worst = -1.0;
    int64_t worst_i = -1, bad = 0;
    for (int64_t i = 0; i < n; i++) {
        if (isinf(ref[i]) && ref[i] < 0) {
            if (!(isinf(got[i]) && got[i] < 0)) {
                kc_print_case(kc_current_case);
                fprintf(stderr, "%s[%lld] = %g but the reference is -inf\n", what, (long long)i,
                        (double)got[i]);
                fail();
            }
            continue;
        }
        double diff = fabs((double)got[i] - ref[i]);
        if (!(diff <= worst)) /* also catches NaN */
            worst = diff, worst_i = i;
        bad += !(diff <= tol + 10.0 * tol * fabs(ref[i]));
        num += diff * diff;
        den += ref[i] * ref[i];
    }
    double err = den > 0.0 ? sqrt(num / den) : sqrt(num);
    if (!(err <= tol) || bad > 0) {
        kc_print_case(kc_current_case);
        fprintf(stderr,
                "%s: rel L2 %.3g (tol %.1g), %lld elements off, worst [%lld] got %.9g "
                "ref %.9g\n",
                what, err, tol, (long long)bad, (long long)worst_i, (double)got[worst_i],
                ref[worst_i]);
    }
    assert_true(err <= tol);
    assert_int_equal(bad, 0);
    return err;
}

double kc_check_close_f(const char *what, int64_t n, const float *got, const float *ref,
                        double tol) {
    double *r = kc_to_double(n, ref);
    double err = kc_check_close(what, n, got, r, tol);
    free(r);
    return err;
}

double kc_max(double a, double b) {
    return a > b ? a : b;
}
