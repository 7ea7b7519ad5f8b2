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
 * and odd, GQA, MQA, nq != nk, irregular positions: the cases, inputs and checks of
 * kernel_cases.h), and strided views must compute bit for bit what dense copies compute.
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

#include "kernels.h"      // defines: spar_kernels_select, spar_qblock, spar_kvblock,
                          //          spar_softmax_init_partial, spar_softmax_bwd_delta
#include "kernel_cases.h" // defines: kc_case, kc_cases, kc_inputs, kc_make_inputs,
                          //          kc_check_close, kc_scatter_heads, kc_to_double, ...

/* --- the problem and its gradients --------------------------------------------------------- */

/* One problem: inputs with the upstream gradient (in.dout), and the kernel's forward results. */
typedef struct bwd_data {
    const kc_case *c;
    kc_inputs in;
    float *o, *lse, *delta; /* forward kernel: [nq, H, d], [nq, H]; delta: [nq, H] */
} bwd_data;

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
                      .pos = a->in.q_pos,
                      .stride_q = (int64_t)hh * a->c->head_dim,
                      .stride_lse = hh,
                      .q = a->in.q,
                      .o = a->o,
                      .lse = a->lse,
                      .dout = a->in.dout,
                      .delta = a->delta,
                      .dq = dq};
    return qb;
}

/* Keys [k0, k1) as one dense block, with their gradients in g (NULL: forward only). */
static spar_kvblock dense_keys(const bwd_data *a, int64_t k0, int64_t k1, const grads *g) {
    int64_t row = (int64_t)a->c->kv_heads * a->c->head_dim, off = k0 * row;
    spar_kvblock kb = {.n = k1 - k0,
                       .pos = a->in.k_pos ? a->in.k_pos + k0 : NULL,
                       .stride_kv = row,
                       .k = a->in.k + off,
                       .v = a->in.v + off,
                       .dk = g ? g->t[1] + off : NULL,
                       .dv = g ? g->t[2] + off : NULL};
    return kb;
}

/* Random inputs, then the forward kernel over all keys and delta, as the engine does. */
static bwd_data make_data(const kc_case *c, uint64_t seed) {
    int hh = c->heads, d = c->head_dim;
    bwd_data a = {.c = c, .in = kc_make_inputs(c, seed, true)};
    a.o = kc_zero_floats(c->nq * hh * d), a.lse = kc_zero_floats(c->nq * hh);
    a.delta = kc_zero_floats(c->nq * hh);
    spar_softmax_init_partial(c->nq, hh, d, a.o, a.lse);
    spar_qblock qb = dense_queries(&a, NULL);
    spar_kvblock kb = dense_keys(&a, 0, c->nk, NULL);
    assert_int_equal(spar__kernels_scalar.softmax_fwd_block(&a.in.dims, c->causal, &qb, &kb), 0);
    spar_softmax_bwd_delta(c->nq, hh, d, a.o, a.in.dout, a.delta);
    return a;
}

static void free_data(bwd_data *a) {
    kc_free_inputs(&a->in), free(a->o), free(a->lse), free(a->delta);
}

/* Accumulators for a problem, zero or random (a non-zero start). */
static grads new_grads(const kc_case *c, bool random) {
    grads g = {{NULL, NULL, NULL},
               {c->nq * c->heads * c->head_dim, c->nk * c->kv_heads * c->head_dim,
                c->nk * c->kv_heads * c->head_dim}};
    for (int t = 0; t < 3; t++)
        g.t[t] = random ? kc_random_floats(g.n[t]) : kc_zero_floats(g.n[t]);
    return g;
}

static grads copy_grads(const grads *src) {
    grads g = *src;
    for (int t = 0; t < 3; t++) {
        g.t[t] = kc_zero_floats(g.n[t]);
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
    assert_int_equal(kern->softmax_bwd_block(&a->in.dims, a->c->causal, &qb, &kb), 0);
}

/* --- the float64 reference ------------------------------------------------------------------ */

/* A problem in float64: the same shapes, positions and scale as the kernel's. */
typedef struct ref_in {
    const kc_case *c;
    double scale;
    const int64_t *q_pos, *k_pos;
    double *q, *k, *v; /* [nq, H, d], [nk, G, d], [nk, G, d] */
} ref_in;

static ref_in ref_from(const bwd_data *a) {
    const kc_case *c = a->c;
    int64_t nq = c->nq * c->heads * c->head_dim, nk = c->nk * c->kv_heads * c->head_dim;
    ref_in r = {
        .c = c, .scale = (double)a->in.dims.scale, .q_pos = a->in.q_pos, .k_pos = a->in.k_pos};
    r.q = kc_to_double(nq, a->in.q), r.k = kc_to_double(nk, a->in.k),
    r.v = kc_to_double(nk, a->in.v);
    return r;
}

static void free_ref(ref_in *r) {
    free(r->q), free(r->k), free(r->v);
}

/* p[j]: the probability of key j for query i, head h, from the whole score row (0 where
 * masked). Returns false when the query sees no key (p all 0). */
static bool ref_probs(const ref_in *r, int64_t i, int h, double *p) {
    const kc_case *c = r->c;
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
    const kc_case *c = r->c;
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
    const kc_case *c = r->c;
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

/* --- tests ---------------------------------------------------------------------------------- */

static void check_backend_backward_matches_reference(const char *backend) {
    const spar_kernels *kern = spar_kernels_select(backend);
    assert_non_null(kern);
    double worst[3] = {0.0, 0.0, 0.0};
    for (size_t ci = 0; ci < kc_case_count; ci++) {
        const kc_case *c = &kc_cases[ci];
        bwd_data a = make_data(c, ci + 1);
        grads g = new_grads(c, false);
        run_bwd_block(kern, &a, 0, c->nk, &g);

        ref_in r = ref_from(&a);
        double *dout = kc_to_double(g.n[0], a.in.dout), *ref[3];
        for (int t = 0; t < 3; t++)
            ref[t] = kc_to_double(g.n[t], g.t[t]); /* storage, set by ref_backward */
        ref_backward(&r, dout, ref[0], ref[1], ref[2]);
        kc_current_case = c;
        for (int t = 0; t < 3; t++) {
            worst[t] = kc_max(worst[t], kc_check_close(grad_name[t], g.n[t], g.t[t], ref[t], 1e-5));
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
    for (size_t ci = 0; ci < kc_case_count; ci++) {
        const kc_case *c = &kc_cases[ci];
        if (c->nk < parts) continue;
        bwd_data a = make_data(c, 200 + ci);
        grads whole = new_grads(c, false), split = new_grads(c, false);
        run_bwd_block(kern, &a, 0, c->nk, &whole);
        int64_t cut[4];
        kc_split_keys(c->nk, parts, cut);
        for (int b = 0; b < parts; b++) {
            int bb = reverse ? parts - 1 - b : b;
            run_bwd_block(kern, &a, cut[bb], cut[bb + 1], &split);
        }
        kc_current_case = c;
        for (int t = 0; t < 3; t++)
            worst = kc_max(
                worst, kc_check_close_f(grad_name[t], split.n[t], split.t[t], whole.t[t], 1e-6));
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
    const kc_case *c = r->c;
    double loss = 0.0;
    ref_forward(r, o, p);
    for (int64_t i = 0; i < c->nq * c->heads * c->head_dim; i++)
        loss += o[i] * w[i];
    return loss;
}

/* Central differences (h = 1e-3) of the float64 loss against the kernel's gradient, element
 * by element: |kernel - fd| <= 1e-4 + 1e-3 |fd|. Returns the worst |kernel - fd|. */
static double check_finite_differences(const kc_case *c, uint64_t seed) {
    const double step = 1e-3;
    bwd_data a = make_data(c, seed);
    grads g = new_grads(c, false);
    run_bwd_block(&spar__kernels_scalar, &a, 0, c->nk, &g);
    ref_in r = ref_from(&a);
    double *w = kc_to_double(g.n[0], a.in.dout), *o = kc_to_double(g.n[0], a.o);
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
            worst = kc_max(worst, err), largest = kc_max(largest, fabs(fd));
        }
    }
    assert_true(largest > 1e-2); /* the gradients checked are not all zero */
    free(w), free(o), free(p), free_ref(&r), free_grads(&g), free_data(&a);
    return worst;
}

static void backward_matches_finite_differences_of_the_loss(void **state) {
    (void)state;
    static const kc_case tiny[] = {
        {2, 1, 3, 5, 5, true, KC_POS_RANDOM}, /* MQA, causal, irregular positions */
        {4, 2, 2, 4, 6, false, KC_POS_NONE},  /* GQA, nq != nk */
        {2, 2, 3, 5, 7, true, KC_POS_STRIPE}, /* causal, query 0 sees no key */
    };
    double worst = 0.0;
    for (size_t i = 0; i < sizeof tiny / sizeof tiny[0]; i++) {
        kc_current_case = &tiny[i];
        worst = kc_max(worst, check_finite_differences(&tiny[i], 300 + i));
    }
    printf("# backward vs central differences (h 1e-3): worst abs error %.2e "
           "(tol 1e-4 + 1e-3 |grad|)\n",
           worst);
}

/* A block wholly in every query's future adds nothing: dq, dk, dv keep every bit. */
static void block_in_every_querys_future_leaves_gradients_unchanged(void **state) {
    (void)state;
    const kc_case *c = &kc_cases[2]; /* GQA causal, positions 0..11 */
    bwd_data a = make_data(c, 17);
    grads g = new_grads(c, true), keep = copy_grads(&g);
    for (int64_t j = 0; j < c->nk; j++)
        a.in.k_pos[j] = 1000 + j;
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
    for (size_t ci = 0; ci < kc_case_count; ci++) {
        const kc_case *c = &kc_cases[ci];
        bwd_data a = make_data(c, 400 + ci);
        grads zero = new_grads(c, false), start = new_grads(c, true), sum = copy_grads(&start);
        run_bwd_block(&spar__kernels_scalar, &a, 0, c->nk, &zero);
        run_bwd_block(&spar__kernels_scalar, &a, 0, c->nk, &sum);
        kc_current_case = c;
        for (int t = 0; t < 3; t++) {
            for (int64_t i = 0; i < start.n[t]; i++)
                start.t[t][i] += zero.t[t][i]; /* start + result from zero, in the test */
            worst =
                kc_max(worst, kc_check_close_f(grad_name[t], sum.n[t], sum.t[t], start.t[t], 1e-6));
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
    float *dst = kc_zero_floats(n * wide * w);
    for (int64_t i = 0; i < n * wide * w; i++)
        dst[i] = NAN;
    kc_scatter_heads(n, wide, h0, count, w, src, dst);
    return dst;
}

/* The backward call covers query heads 2..5 of 8-head tensors (q, dout, dq: stride_q = 8d;
 * lse, delta: stride_lse = 8) and kv heads 1..2 of 4-head ones (k, v, dk, dv: stride_kv =
 * 4d); the accumulators start non-zero. It must add exactly what a dense call on copies of
 * those heads adds, and change no other byte. Unread heads of the inputs hold NaN. */
static void
backward_on_a_head_subset_view_equals_a_dense_copy_and_touches_no_other_head(void **state) {
    (void)state;
    enum { WH = 8, WG = 4, H0 = 2, G0 = 1, D = 33, NQ = 7, NK = 9 };
    const kc_case c = {4, 2, D, NQ, NK, true, KC_POS_RANDOM}; /* the dense problem */
    bwd_data a = make_data(&c, 23); /* dense copies, with o, lse, delta of the forward */
    float *wq = widen(NQ, WH, H0, 4, D, a.in.q), *wdout = widen(NQ, WH, H0, 4, D, a.in.dout);
    float *wlse = widen(NQ, WH, H0, 4, 1, a.lse), *wdelta = widen(NQ, WH, H0, 4, 1, a.delta);
    float *wk = widen(NK, WG, G0, 2, D, a.in.k), *wv = widen(NK, WG, G0, 2, D, a.in.v);
    /* per accumulator (dq, dk, dv): tokens, heads of the wide tensor, first head used, used */
    const int64_t rows[3] = {NQ, NK, NK};
    const int wide_heads[3] = {WH, WG, WG}, first[3] = {H0, G0, G0}, used[3] = {4, 2, 2};
    grads dense = new_grads(&c, false), got = new_grads(&c, false), wide = dense, want;
    for (int t = 0; t < 3; t++) {
        wide.n[t] = rows[t] * wide_heads[t] * D, wide.t[t] = kc_random_floats(wide.n[t]);
        kc_gather_heads(rows[t], wide_heads[t], first[t], used[t], D, wide.t[t], dense.t[t]);
    }
    want = copy_grads(&wide); /* dense and wide start from the same non-zero values */

    run_bwd_block(&spar__kernels_scalar, &a, 0, NK, &dense);
    spar_qblock qb = {.n = NQ,
                      .pos = a.in.q_pos,
                      .stride_q = WH * D,
                      .stride_lse = WH,
                      .q = wq + H0 * D,
                      .lse = wlse + H0,
                      .dout = wdout + H0 * D,
                      .delta = wdelta + H0,
                      .dq = wide.t[0] + H0 * D};
    spar_kvblock kb = {.n = NK,
                       .pos = a.in.k_pos,
                       .stride_kv = WG * D,
                       .k = wk + G0 * D,
                       .v = wv + G0 * D,
                       .dk = wide.t[1] + G0 * D,
                       .dv = wide.t[2] + G0 * D};
    assert_int_equal(spar__kernels_scalar.softmax_bwd_block(&a.in.dims, true, &qb, &kb), 0);

    for (int t = 0; t < 3; t++) {
        /* the view's heads: bit for bit the dense call's */
        kc_gather_heads(rows[t], wide_heads[t], first[t], used[t], D, wide.t[t], got.t[t]);
        assert_memory_equal(got.t[t], dense.t[t], sizeof(float) * (size_t)dense.n[t]);
        /* every other head: not one byte changed */
        kc_scatter_heads(rows[t], wide_heads[t], first[t], used[t], D, dense.t[t], want.t[t]);
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
