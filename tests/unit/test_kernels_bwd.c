/* test_kernels_bwd.c: the backward softmax block kernel (kernels/kernels.h); the forward
 * kernel, the merge, spar_softmax_bwd_delta and spar_vec_add are in test_kernels.c.
 *
 * The reference is the textbook backward in float64 with whole probability rows, written
 * here and sharing no code with the kernel's flash-attention recurrences:
 *   P = softmax(scale Q K^T) (masked), O = P V, dV = P^T dO, dP = dO V^T,
 *   dS = P * (dP - rowsum(dO * O)), dQ = scale dS K, dK = scale dS^T Q,
 * where a kv head sums over the query heads of its group. The kernel is fed what the engine
 * feeds it: fp32 o and lse from the forward kernel and delta from spar_softmax_bwd_delta.
 * Central differences of a float64 forward check the gradient formulas themselves,
 * independently of that reference. Shapes are the forward tests' awkward ones (head_dim 1
 * and odd, GQA, MQA, nq != nk, irregular positions), and strided views must compute bit for
 * bit what dense copies compute.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#include <cmocka.h>

#include "kernels.h" // defines: spar_kernels_select, spar_qblock, spar_kvblock,
                     //          spar_softmax_init_partial, spar_softmax_bwd_delta

/* --- inputs (as in test_kernels.c) --------------------------------------------------------- */

static uint64_t rng_state;

static uint64_t xorshift64(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static double uniform01(void) {
    return (double)(xorshift64() >> 11) * 0x1.0p-53;
}

/* Irwin-Hall sum of four uniforms, centred: bell-shaped, within [-2, 2]. */
static float randn_like(void) {
    return (float)(uniform01() + uniform01() + uniform01() + uniform01() - 2.0);
}

static float *random_floats(int64_t count) {
    float *x = malloc(sizeof *x * (size_t)(count > 0 ? count : 1));
    assert_non_null(x);
    for (int64_t i = 0; i < count; i++)
        x[i] = randn_like();
    return x;
}

static float *zero_floats(int64_t count) {
    float *x = calloc((size_t)(count > 0 ? count : 1), sizeof *x);
    assert_non_null(x);
    return x;
}

enum pos_kind { POS_NONE, POS_SAME, POS_STRIPE, POS_RANDOM, POS_QUERIES_LATE };

typedef struct attn_case {
    int heads, kv_heads, head_dim;
    int64_t nq, nk;
    bool causal;
    enum pos_kind pos;
} attn_case;

static const attn_case cases[] = {
    {1, 1, 1, 7, 7, true, POS_SAME},           /* head_dim 1 */
    {6, 2, 24, 5, 9, false, POS_NONE},         /* GQA, nq != nk, no positions */
    {6, 2, 24, 12, 12, true, POS_SAME},        /* GQA causal */
    {4, 1, 40, 11, 13, true, POS_STRIPE},      /* MQA, stripe: query 0 sees no key */
    {3, 3, 80, 8, 8, true, POS_SAME},          /* H = G */
    {2, 2, 33, 9, 17, true, POS_RANDOM},       /* odd head_dim, irregular positions */
    {6, 2, 33, 14, 6, true, POS_RANDOM},       /* GQA, nq > nk, irregular positions */
    {4, 1, 1, 3, 1, false, POS_NONE},          /* MQA, a single key */
    {4, 4, 80, 5, 16, false, POS_STRIPE},      /* positions given but not causal */
    {6, 3, 40, 6, 10, true, POS_QUERIES_LATE}, /* causal but every key visible */
};
#define CASE_COUNT (sizeof cases / sizeof cases[0])

/* One problem: inputs, the upstream gradient, and the kernel's forward results. */
typedef struct bwd_data {
    const attn_case *c;
    spar_attn_dims dims;
    float *q, *k, *v, *dout; /* [nq, H, d], [nk, G, d] x2, [nq, H, d] */
    int64_t *q_pos, *k_pos;  /* NULL for POS_NONE */
    float *o, *lse, *delta;  /* forward kernel: [nq, H, d], [nq, H]; delta: [nq, H] */
} bwd_data;

static void random_positions(int64_t n, int64_t *pos) {
    int64_t t = (int64_t)(xorshift64() % 3);
    for (int64_t i = 0; i < n; i++) {
        pos[i] = t;
        t += 1 + (int64_t)(xorshift64() % 4);
    }
}

/* The three accumulators, so that checks loop over them: t[0] = dq: [nq, H, d],
 * t[1] = dk and t[2] = dv: [nk, G, d]; n[i] floats each. */
typedef struct grads {
    float *t[3];
    int64_t n[3];
} grads;
static const char *const grad_name[3] = {"dq", "dk", "dv"};

/* The problem's queries as one dense block, every pointer the passes use. */
static spar_qblock dense_queries(const bwd_data *a, float *dq) {
    int hh = a->c->heads;
    spar_qblock qb = {.n = a->c->nq,
                      .pos = a->q_pos,
                      .stride_q = (int64_t)hh * a->c->head_dim,
                      .stride_lse = hh,
                      .q = a->q,
                      .o = a->o,
                      .lse = a->lse,
                      .dout = a->dout,
                      .delta = a->delta,
                      .dq = dq};
    return qb;
}

/* Keys [k0, k1) as one dense block, with their gradients in g (NULL: forward only). */
static spar_kvblock dense_keys(const bwd_data *a, int64_t k0, int64_t k1, const grads *g) {
    int64_t row = (int64_t)a->c->kv_heads * a->c->head_dim, off = k0 * row;
    spar_kvblock kb = {.n = k1 - k0,
                       .pos = a->k_pos ? a->k_pos + k0 : NULL,
                       .stride_kv = row,
                       .k = a->k + off,
                       .v = a->v + off,
                       .dk = g ? g->t[1] + off : NULL,
                       .dv = g ? g->t[2] + off : NULL};
    return kb;
}

/* Random inputs, then the forward kernel over all keys and delta, as the engine does. */
static bwd_data make_data(const attn_case *c, uint64_t seed) {
    rng_state = seed * 0x9E3779B97F4A7C15ull + 1;
    int hh = c->heads, g = c->kv_heads, d = c->head_dim;
    bwd_data a = {.c = c, .dims = {hh, g, d, (float)(1.0 / sqrt(d))}};
    a.q = random_floats(c->nq * hh * d);
    a.k = random_floats(c->nk * g * d);
    a.v = random_floats(c->nk * g * d);
    a.dout = random_floats(c->nq * hh * d);
    if (c->pos != POS_NONE) {
        a.q_pos = malloc(sizeof *a.q_pos * (size_t)c->nq);
        a.k_pos = malloc(sizeof *a.k_pos * (size_t)c->nk);
        assert_true(a.q_pos && a.k_pos);
        for (int64_t i = 0; i < c->nq; i++)
            a.q_pos[i] = c->pos == POS_STRIPE         ? 3 * i + 1
                         : c->pos == POS_QUERIES_LATE ? 100 + i
                                                      : i;
        for (int64_t j = 0; j < c->nk; j++)
            a.k_pos[j] = c->pos == POS_STRIPE ? 3 * j + 2 : j;
        if (c->pos == POS_RANDOM)
            random_positions(c->nq, a.q_pos), random_positions(c->nk, a.k_pos);
    }
    a.o = zero_floats(c->nq * hh * d), a.lse = zero_floats(c->nq * hh);
    a.delta = zero_floats(c->nq * hh);
    spar_softmax_init_partial(c->nq, hh, d, a.o, a.lse);
    spar_qblock qb = dense_queries(&a, NULL);
    spar_kvblock kb = dense_keys(&a, 0, c->nk, NULL);
    assert_int_equal(spar__kernels_scalar.softmax_fwd_block(&a.dims, c->causal, &qb, &kb), 0);
    spar_softmax_bwd_delta(c->nq, hh, d, a.o, a.dout, a.delta);
    return a;
}

static void free_data(bwd_data *a) {
    free(a->q), free(a->k), free(a->v), free(a->dout), free(a->q_pos), free(a->k_pos);
    free(a->o), free(a->lse), free(a->delta);
}

/* Accumulators for a problem, zero or random (a non-zero start). */
static grads new_grads(const attn_case *c, bool random) {
    grads g = {{NULL, NULL, NULL},
               {c->nq * c->heads * c->head_dim, c->nk * c->kv_heads * c->head_dim,
                c->nk * c->kv_heads * c->head_dim}};
    for (int t = 0; t < 3; t++)
        g.t[t] = random ? random_floats(g.n[t]) : zero_floats(g.n[t]);
    return g;
}

static grads copy_grads(const grads *src) {
    grads g = *src;
    for (int t = 0; t < 3; t++) {
        g.t[t] = zero_floats(g.n[t]);
        memcpy(g.t[t], src->t[t], sizeof(float) * (size_t)g.n[t]);
    }
    return g;
}

static void free_grads(grads *g) {
    free(g->t[0]), free(g->t[1]), free(g->t[2]);
}

/* Accumulates the gradients of keys [k0, k1) into g, all tensors dense. */
static void run_bwd_block(const spar_kernels *kern, const bwd_data *a, int64_t k0, int64_t k1,
                          grads *g) {
    spar_qblock qb = dense_queries(a, g->t[0]);
    spar_kvblock kb = dense_keys(a, k0, k1, g);
    assert_int_equal(kern->softmax_bwd_block(&a->dims, a->c->causal, &qb, &kb), 0);
}

/* --- the float64 reference ------------------------------------------------------------------ */

/* A problem in float64: the same shapes, positions and scale as the kernel's. */
typedef struct ref_in {
    const attn_case *c;
    double scale;
    const int64_t *q_pos, *k_pos;
    double *q, *k, *v; /* [nq, H, d], [nk, G, d], [nk, G, d] */
} ref_in;

static double *to_double(int64_t n, const float *x) {
    double *y = malloc(sizeof *y * (size_t)(n > 0 ? n : 1));
    assert_non_null(y);
    for (int64_t i = 0; i < n; i++)
        y[i] = (double)x[i];
    return y;
}

static ref_in ref_from(const bwd_data *a) {
    const attn_case *c = a->c;
    int64_t nq = c->nq * c->heads * c->head_dim, nk = c->nk * c->kv_heads * c->head_dim;
    ref_in r = {.c = c, .scale = (double)a->dims.scale, .q_pos = a->q_pos, .k_pos = a->k_pos};
    r.q = to_double(nq, a->q), r.k = to_double(nk, a->k), r.v = to_double(nk, a->v);
    return r;
}

static void free_ref(ref_in *r) {
    free(r->q), free(r->k), free(r->v);
}

/* p[j]: the probability of key j for query i, head h, from the whole score row (0 where
 * masked). Returns false when the query sees no key (p all 0). */
static bool ref_probs(const ref_in *r, int64_t i, int h, double *p) {
    const attn_case *c = r->c;
    int hh = c->heads, gg = c->kv_heads, d = c->head_dim, g = h / (hh / gg);
    double smax = -INFINITY, sum = 0.0;
    for (int64_t j = 0; j < c->nk; j++) {
        p[j] = -INFINITY;
        if (c->causal && r->k_pos[j] > r->q_pos[i]) continue;
        double s = 0.0;
        for (int x = 0; x < d; x++)
            s += r->q[(i * hh + h) * d + x] * r->k[(j * gg + g) * d + x];
        p[j] = r->scale * s;
        smax = p[j] > smax ? p[j] : smax;
    }
    for (int64_t j = 0; j < c->nk; j++) {
        p[j] = isinf(p[j]) ? 0.0 : exp(p[j] - smax); /* all masked: smax = -inf too */
        sum += p[j];
    }
    for (int64_t j = 0; j < c->nk && sum > 0.0; j++)
        p[j] /= sum;
    return sum > 0.0;
}

/* o: [nq, H, d] = P V (0 for a query that sees no key). p: scratch of nk doubles. */
static void ref_forward(const ref_in *r, double *o, double *p) {
    const attn_case *c = r->c;
    int hh = c->heads, gg = c->kv_heads, d = c->head_dim;
    for (int64_t i = 0; i < c->nq; i++) {
        for (int h = 0; h < hh; h++) {
            double *oi = o + (i * hh + h) * d;
            memset(oi, 0, sizeof *oi * (size_t)d);
            ref_probs(r, i, h, p);
            for (int64_t j = 0; j < c->nk; j++)
                for (int x = 0; x < d; x++)
                    oi[x] += p[j] * r->v[(j * gg + h / (hh / gg)) * d + x];
        }
    }
}

/* dq: [nq, H, d], dk, dv: [nk, G, d], all set (not accumulated) from dout: [nq, H, d]. */
static void ref_backward(const ref_in *r, const double *dout, double *dq, double *dk, double *dv) {
    const attn_case *c = r->c;
    int hh = c->heads, gg = c->kv_heads, d = c->head_dim;
    double *p = malloc(sizeof *p * (size_t)(c->nk + 1)), *o = malloc(sizeof *o * (size_t)d);
    assert_true(p && o);
    memset(dq, 0, sizeof *dq * (size_t)(c->nq * hh * d));
    memset(dk, 0, sizeof *dk * (size_t)(c->nk * gg * d)),
        memset(dv, 0, sizeof *dv * (size_t)(c->nk * gg * d));
    for (int64_t i = 0; i < c->nq; i++) {
        for (int h = 0; h < hh; h++) {
            int g = h / (hh / gg);
            const double *qi = r->q + (i * hh + h) * d, *doi = dout + (i * hh + h) * d;
            if (!ref_probs(r, i, h, p)) continue;
            double rowsum = 0.0; /* rowsum(dO * O), O = P V of this row */
            for (int x = 0; x < d; x++) {
                o[x] = 0.0;
                for (int64_t j = 0; j < c->nk; j++)
                    o[x] += p[j] * r->v[(j * gg + g) * d + x];
                rowsum += doi[x] * o[x];
            }
            for (int64_t j = 0; j < c->nk; j++) {
                const double *kj = r->k + (j * gg + g) * d, *vj = r->v + (j * gg + g) * d;
                double dp = 0.0;
                for (int x = 0; x < d; x++)
                    dp += doi[x] * vj[x];
                double ds = p[j] * (dp - rowsum);
                for (int x = 0; x < d; x++) {
                    dq[(i * hh + h) * d + x] += r->scale * ds * kj[x];
                    dk[(j * gg + g) * d + x] += r->scale * ds * qi[x];
                    dv[(j * gg + g) * d + x] += p[j] * doi[x];
                }
            }
        }
    }
    free(p), free(o);
}

/* --- checks --------------------------------------------------------------------------------- */

static const attn_case *current_case; /* named when a check fails */

/* Asserts relative L2 error <= tol and every element within tol + 10 tol |ref|; prints the
 * worst element on failure. Returns the relative L2 error. */
static double check_close(const char *what, int64_t n, const float *got, const double *ref,
                          double tol) {
    double num = 0.0, den = 0.0, worst = -1.0;
    int64_t worst_i = 0, bad = 0;
    for (int64_t i = 0; i < n; i++) {
        double diff = fabs((double)got[i] - ref[i]);
        if (!(diff <= worst)) /* also catches NaN */
            worst = diff, worst_i = i;
        bad += !(diff <= tol + 10.0 * tol * fabs(ref[i]));
        num += diff * diff;
        den += ref[i] * ref[i];
    }
    double err = den > 0.0 ? sqrt(num / den) : sqrt(num);
    if (!(err <= tol) || bad > 0) {
        const attn_case *c = current_case;
        if (c)
            fprintf(stderr, "case H=%d G=%d d=%d nq=%lld nk=%lld causal=%d pos=%d\n", c->heads,
                    c->kv_heads, c->head_dim, (long long)c->nq, (long long)c->nk, c->causal,
                    c->pos);
        fprintf(stderr,
                "%s: rel L2 %.3g (tol %.1g), %lld elements off, worst [%lld] got %.9g ref %.9g\n",
                what, err, tol, (long long)bad, (long long)worst_i, (double)got[worst_i],
                ref[worst_i]);
    }
    assert_true(err <= tol);
    assert_int_equal(bad, 0);
    return err;
}

static double check_close_f(const char *what, int64_t n, const float *got, const float *ref,
                            double tol) {
    double *r = to_double(n, ref);
    double err = check_close(what, n, got, r, tol);
    free(r);
    return err;
}

static double max_d(double a, double b) {
    return a > b ? a : b;
}

/* --- tests ---------------------------------------------------------------------------------- */

static void check_backend_backward_matches_reference(const char *backend) {
    const spar_kernels *kern = spar_kernels_select(backend);
    assert_non_null(kern);
    double worst[3] = {0.0, 0.0, 0.0};
    for (size_t ci = 0; ci < CASE_COUNT; ci++) {
        const attn_case *c = &cases[ci];
        bwd_data a = make_data(c, ci + 1);
        grads g = new_grads(c, false);
        run_bwd_block(kern, &a, 0, c->nk, &g);

        ref_in r = ref_from(&a);
        double *dout = to_double(g.n[0], a.dout), *ref[3];
        for (int t = 0; t < 3; t++)
            ref[t] = to_double(g.n[t], g.t[t]); /* storage, set by ref_backward */
        ref_backward(&r, dout, ref[0], ref[1], ref[2]);
        current_case = c;
        for (int t = 0; t < 3; t++) {
            worst[t] = max_d(worst[t], check_close(grad_name[t], g.n[t], g.t[t], ref[t], 1e-5));
            free(ref[t]);
        }
        free(dout), free_ref(&r), free_grads(&g), free_data(&a);
    }
    printf("# %s backward vs float64: worst rel L2 dq %.2e dk %.2e dv %.2e (tol 1e-5)\n", backend,
           worst[0], worst[1], worst[2]);
}

static void scalar_backward_matches_float64_reference(void **state) {
    (void)state;
    check_backend_backward_matches_reference("scalar");
}

static void auto_backward_matches_float64_reference(void **state) {
    (void)state;
    check_backend_backward_matches_reference("auto");
}

/* Keys cut into `parts` uneven blocks, the kernel called once per block (last block first
 * when `reverse`: a ring delivers blocks in any order), accumulating into one dq. */
static void check_split_backward(int parts, bool reverse) {
    const spar_kernels *kern = spar_kernels_select("scalar");
    double worst = 0.0;
    for (size_t ci = 0; ci < CASE_COUNT; ci++) {
        const attn_case *c = &cases[ci];
        if (c->nk < parts) continue;
        bwd_data a = make_data(c, 200 + ci);
        grads whole = new_grads(c, false), split = new_grads(c, false);
        run_bwd_block(kern, &a, 0, c->nk, &whole);
        int64_t cut[4] = {0, c->nk / 3 + 1, 2 * c->nk / 3 + 1, c->nk};
        if (parts == 2)
            cut[1] = c->nk / 2 + 1 > c->nk - 1 ? c->nk - 1 : c->nk / 2 + 1, cut[2] = c->nk;
        for (int b = 0; b < parts; b++) {
            int bb = reverse ? parts - 1 - b : b;
            run_bwd_block(kern, &a, cut[bb], cut[bb + 1], &split);
        }
        current_case = c;
        for (int t = 0; t < 3; t++)
            worst =
                max_d(worst, check_close_f(grad_name[t], split.n[t], split.t[t], whole.t[t], 1e-6));
        free_grads(&whole), free_grads(&split), free_data(&a);
    }
    printf("# backward over %d key blocks%s: worst rel L2 vs one block %.2e (tol 1e-6)\n", parts,
           reverse ? " in reverse order" : "", worst);
}

static void backward_over_two_key_blocks_equals_one_block(void **state) {
    (void)state;
    check_split_backward(2, false);
}

static void backward_over_three_key_blocks_in_any_order_equals_one_block(void **state) {
    (void)state;
    check_split_backward(3, false);
    check_split_backward(3, true);
}

/* loss = sum(o * W) with o from the float64 forward; dout = W. */
static double loss_of(const ref_in *r, const double *w, double *o, double *p) {
    const attn_case *c = r->c;
    double loss = 0.0;
    ref_forward(r, o, p);
    for (int64_t i = 0; i < c->nq * c->heads * c->head_dim; i++)
        loss += o[i] * w[i];
    return loss;
}

/* Central differences (h = 1e-3) of the float64 loss against the kernel's gradient, element
 * by element: |kernel - fd| <= 1e-4 + 1e-3 |fd|. Returns the worst |kernel - fd|. */
static double check_finite_differences(const attn_case *c, uint64_t seed) {
    const double step = 1e-3;
    bwd_data a = make_data(c, seed);
    grads g = new_grads(c, false);
    run_bwd_block(&spar__kernels_scalar, &a, 0, c->nk, &g);
    ref_in r = ref_from(&a);
    double *w = to_double(g.n[0], a.dout), *o = to_double(g.n[0], a.o);
    double *p = malloc(sizeof *p * (size_t)c->nk), *inputs[3] = {r.q, r.k, r.v};
    assert_non_null(p);
    double worst = 0.0, largest = 0.0;
    for (int t = 0; t < 3; t++) {
        for (int64_t e = 0; e < g.n[t]; e++) {
            double x = inputs[t][e];
            inputs[t][e] = x + step;
            double up = loss_of(&r, w, o, p);
            inputs[t][e] = x - step;
            double down = loss_of(&r, w, o, p);
            inputs[t][e] = x;
            double fd = (up - down) / (2.0 * step), err = fabs((double)g.t[t][e] - fd);
            if (!(err <= 1e-4 + 1e-3 * fabs(fd)))
                fprintf(stderr, "%s[%lld]: kernel %.9g, finite difference %.9g\n", grad_name[t],
                        (long long)e, (double)g.t[t][e], fd);
            assert_true(err <= 1e-4 + 1e-3 * fabs(fd));
            worst = max_d(worst, err), largest = max_d(largest, fabs(fd));
        }
    }
    assert_true(largest > 1e-2); /* the gradients checked are not all zero */
    free(w), free(o), free(p), free_ref(&r), free_grads(&g), free_data(&a);
    return worst;
}

static void backward_matches_finite_differences_of_the_loss(void **state) {
    (void)state;
    static const attn_case tiny[] = {
        {2, 1, 3, 5, 5, true, POS_RANDOM}, /* MQA, causal, irregular positions */
        {4, 2, 2, 4, 6, false, POS_NONE},  /* GQA, nq != nk */
        {2, 2, 3, 5, 7, true, POS_STRIPE}, /* causal, query 0 sees no key */
    };
    double worst = 0.0;
    for (size_t i = 0; i < sizeof tiny / sizeof tiny[0]; i++) {
        current_case = &tiny[i];
        worst = max_d(worst, check_finite_differences(&tiny[i], 300 + i));
    }
    printf("# backward vs central differences (h 1e-3): worst abs error %.2e "
           "(tol 1e-4 + 1e-3 |grad|)\n",
           worst);
}

/* A block wholly in every query's future adds nothing: dq, dk, dv keep every bit. */
static void block_in_every_querys_future_leaves_gradients_unchanged(void **state) {
    (void)state;
    const attn_case *c = &cases[2]; /* GQA causal, positions 0..11 */
    bwd_data a = make_data(c, 17);
    grads g = new_grads(c, true), keep = copy_grads(&g);
    for (int64_t j = 0; j < c->nk; j++)
        a.k_pos[j] = 1000 + j;
    run_bwd_block(&spar__kernels_scalar, &a, 0, c->nk, &g);
    for (int t = 0; t < 3; t++)
        assert_memory_equal(g.t[t], keep.t[t], sizeof(float) * (size_t)g.n[t]);
    free_grads(&g), free_grads(&keep), free_data(&a);
}

/* The kernel adds to what dq, dk, dv hold: starting from values s gives s + (the result
 * from zero), up to the one fp32 rounding of each sum. */
static void backward_adds_to_what_the_accumulators_hold(void **state) {
    (void)state;
    double worst = 0.0;
    for (size_t ci = 0; ci < CASE_COUNT; ci++) {
        const attn_case *c = &cases[ci];
        bwd_data a = make_data(c, 400 + ci);
        grads zero = new_grads(c, false), start = new_grads(c, true), sum = copy_grads(&start);
        run_bwd_block(&spar__kernels_scalar, &a, 0, c->nk, &zero);
        run_bwd_block(&spar__kernels_scalar, &a, 0, c->nk, &sum);
        current_case = c;
        for (int t = 0; t < 3; t++) {
            for (int64_t i = 0; i < start.n[t]; i++)
                start.t[t][i] += zero.t[t][i]; /* start + result from zero, in the test */
            worst = max_d(worst, check_close_f(grad_name[t], sum.n[t], sum.t[t], start.t[t], 1e-6));
        }
        free_grads(&zero), free_grads(&start), free_grads(&sum), free_data(&a);
    }
    printf("# backward onto non-zero accumulators: worst rel L2 vs start + result %.2e "
           "(tol 1e-6)\n",
           worst);
}

/* --- strided views ------------------------------------------------------------------------- */

/* A new [n, wide, w] tensor whose heads [h0, h0 + count) are src: [n, count, w] and whose
 * other heads are NaN: a kernel that reads them spreads NaN into what it writes. */
static float *widen(int64_t n, int wide, int h0, int count, int w, const float *src) {
    float *dst = zero_floats(n * wide * w);
    for (int64_t i = 0; i < n * wide * w; i++)
        dst[i] = NAN;
    for (int64_t i = 0; i < n; i++)
        memcpy(dst + (i * wide + h0) * w, src + i * count * w, sizeof(float) * (size_t)(count * w));
    return dst;
}

/* Heads [h0, h0 + count) of a: [n, wide, w] copied to (to_dense) or from b: [n, count, w]. */
static void copy_heads(int64_t n, int wide, int h0, int count, int w, float *a, float *b,
                       bool to_dense) {
    size_t row = sizeof(float) * (size_t)(count * w);
    for (int64_t i = 0; i < n; i++)
        to_dense ? memcpy(b + i * count * w, a + (i * wide + h0) * w, row)
                 : memcpy(a + (i * wide + h0) * w, b + i * count * w, row);
}

/* The backward call covers query heads 2..5 of 8-head tensors (q, dout, dq: stride_q = 8d;
 * lse, delta: stride_lse = 8) and kv heads 1..2 of 4-head ones (k, v, dk, dv: stride_kv =
 * 4d); the accumulators start non-zero. It must add exactly what a dense call on copies of
 * those heads adds, and change no other byte. Unread heads of the inputs hold NaN. */
static void
backward_on_a_head_subset_view_equals_a_dense_copy_and_touches_no_other_head(void **state) {
    (void)state;
    enum { WH = 8, WG = 4, H0 = 2, G0 = 1, D = 33, NQ = 7, NK = 9 };
    const attn_case c = {4, 2, D, NQ, NK, true, POS_RANDOM}; /* the dense problem */
    bwd_data a = make_data(&c, 23); /* dense copies, with o, lse, delta of the forward */
    float *wq = widen(NQ, WH, H0, 4, D, a.q), *wdout = widen(NQ, WH, H0, 4, D, a.dout);
    float *wlse = widen(NQ, WH, H0, 4, 1, a.lse), *wdelta = widen(NQ, WH, H0, 4, 1, a.delta);
    float *wk = widen(NK, WG, G0, 2, D, a.k), *wv = widen(NK, WG, G0, 2, D, a.v);
    /* per accumulator (dq, dk, dv): tokens, heads of the wide tensor, first head used, used */
    const int64_t rows[3] = {NQ, NK, NK};
    const int wide_heads[3] = {WH, WG, WG}, first[3] = {H0, G0, G0}, used[3] = {4, 2, 2};
    grads dense = new_grads(&c, false), got = new_grads(&c, false), wide = dense, want;
    for (int t = 0; t < 3; t++) {
        wide.n[t] = rows[t] * wide_heads[t] * D, wide.t[t] = random_floats(wide.n[t]);
        copy_heads(rows[t], wide_heads[t], first[t], used[t], D, wide.t[t], dense.t[t], true);
    }
    want = copy_grads(&wide); /* dense and wide start from the same non-zero values */

    run_bwd_block(&spar__kernels_scalar, &a, 0, NK, &dense);
    spar_qblock qb = {.n = NQ,
                      .pos = a.q_pos,
                      .stride_q = WH * D,
                      .stride_lse = WH,
                      .q = wq + H0 * D,
                      .lse = wlse + H0,
                      .dout = wdout + H0 * D,
                      .delta = wdelta + H0,
                      .dq = wide.t[0] + H0 * D};
    spar_kvblock kb = {.n = NK,
                       .pos = a.k_pos,
                       .stride_kv = WG * D,
                       .k = wk + G0 * D,
                       .v = wv + G0 * D,
                       .dk = wide.t[1] + G0 * D,
                       .dv = wide.t[2] + G0 * D};
    assert_int_equal(spar__kernels_scalar.softmax_bwd_block(&a.dims, true, &qb, &kb), 0);

    for (int t = 0; t < 3; t++) {
        /* the view's heads: bit for bit the dense call's */
        copy_heads(rows[t], wide_heads[t], first[t], used[t], D, wide.t[t], got.t[t], true);
        assert_memory_equal(got.t[t], dense.t[t], sizeof(float) * (size_t)dense.n[t]);
        /* every other head: not one byte changed */
        copy_heads(rows[t], wide_heads[t], first[t], used[t], D, want.t[t], dense.t[t], false);
        assert_memory_equal(wide.t[t], want.t[t], sizeof(float) * (size_t)wide.n[t]);
    }
    free(wq), free(wdout), free(wlse), free(wdelta), free(wk), free(wv);
    free_grads(&wide), free_grads(&want), free_grads(&dense), free_grads(&got), free_data(&a);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(scalar_backward_matches_float64_reference),
        cmocka_unit_test(auto_backward_matches_float64_reference),
        cmocka_unit_test(backward_over_two_key_blocks_equals_one_block),
        cmocka_unit_test(backward_over_three_key_blocks_in_any_order_equals_one_block),
        cmocka_unit_test(backward_matches_finite_differences_of_the_loss),
        cmocka_unit_test(block_in_every_querys_future_leaves_gradients_unchanged),
        cmocka_unit_test(backward_adds_to_what_the_accumulators_hold),
        cmocka_unit_test(
            backward_on_a_head_subset_view_equals_a_dense_copy_and_touches_no_other_head),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
