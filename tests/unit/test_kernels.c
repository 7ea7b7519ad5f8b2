/* test_kernels.c: the forward softmax block kernel and the element-wise pieces around the
 * kernels: partial init and merge, spar_softmax_bwd_delta, spar_vec_add (kernels/kernels.h).
 * The backward kernel has its own file, test_kernels_bwd.c.
 *
 * The reference is written the naive way on purpose: the full score row in double, its
 * maximum, the sum of exponentials, then the weighted sum of values. It shares no code
 * with the online softmax it checks. Shapes are chosen to be awkward: head_dim 1 and odd
 * sizes, GQA (H=6, G=2), MQA (H=4, G=1), nq != nk, and sorted but irregular positions (the
 * cases, inputs and checks are kernel_cases.h's, shared with test_kernels_bwd.c).
 * Strided views (some heads of a wider tensor) must compute bit for bit what a dense call on
 * copies of those heads computes, and touch nothing else.
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

#include "kernels.h"      // defines: spar_kernels_select, spar_qblock, spar_kvblock, spar_vec_add,
                          //          spar_softmax_init_partial, spar_softmax_merge,
                          //          spar_softmax_bwd_delta
#include "kernel_cases.h" // defines: kc_case, kc_cases, kc_inputs, kc_make_inputs,
                          //          kc_check_close, kc_gather_heads, kc_seed, ...

/* --- the float64 reference ---------------------------------------------------------------- */

/* o: [nq, H, d] double; lse: [nq, H] double (-inf and o = 0 for a row that sees no key).
 * Keys [k0, k1) of the data are used. */
static void reference(const kc_case *c, const kc_inputs *a, int64_t k0, int64_t k1, double *o,
                      double *lse) {
    int hh = c->heads, g = c->kv_heads, d = c->head_dim;
    double *score = malloc(sizeof *score * (size_t)(c->nk > 0 ? c->nk : 1));
    assert_non_null(score);
    for (int64_t i = 0; i < c->nq; i++) {
        for (int h = 0; h < hh; h++) {
            int kvh = h / (hh / g);
            const float *qi = a->q + (i * hh + h) * d;
            double *oi = o + (i * hh + h) * d;
            double smax = -INFINITY, sum = 0.0;
            for (int64_t j = k0; j < k1; j++) {
                bool visible = !c->causal || a->k_pos[j] <= a->q_pos[i];
                score[j] = -INFINITY;
                if (!visible) continue;
                double s = 0.0;
                for (int x = 0; x < d; x++)
                    s += (double)qi[x] * (double)a->k[(j * g + kvh) * d + x];
                score[j] = (double)a->dims.scale * s;
                smax = score[j] > smax ? score[j] : smax;
            }
            for (int x = 0; x < d; x++)
                oi[x] = 0.0;
            if (isinf(smax)) {
                lse[i * hh + h] = -INFINITY;
                continue;
            }
            for (int64_t j = k0; j < k1; j++)
                sum += isinf(score[j]) ? 0.0 : exp(score[j] - smax);
            for (int64_t j = k0; j < k1; j++) {
                if (isinf(score[j])) continue;
                double p = exp(score[j] - smax) / sum;
                for (int x = 0; x < d; x++)
                    oi[x] += p * (double)a->v[(j * g + kvh) * d + x];
            }
            lse[i * hh + h] = smax + log(sum);
        }
    }
    free(score);
}

/* --- helpers over the kernel ----------------------------------------------------------- */

typedef struct partial {
    float *o, *lse;
} partial;

static partial new_partial(const kc_case *c) {
    partial p = {malloc(sizeof(float) * (size_t)(c->nq * c->heads * c->head_dim)),
                 malloc(sizeof(float) * (size_t)(c->nq * c->heads))};
    assert_true(p.o && p.lse);
    spar_softmax_init_partial(c->nq, c->heads, c->head_dim, p.o, p.lse);
    return p;
}

static void free_partial(partial *p) {
    free(p->o), free(p->lse);
}

/* Runs keys [k0, k1) into partial p, all tensors dense. */
static void run_block(const spar_kernels *kern, const kc_case *c, const kc_inputs *a, int64_t k0,
                      int64_t k1, partial *p) {
    int hh = c->heads, g = c->kv_heads, d = c->head_dim;
    spar_qblock qb = {.n = c->nq,
                      .pos = a->q_pos,
                      .stride_q = (int64_t)hh * d,
                      .stride_lse = hh,
                      .q = a->q,
                      .o = p->o,
                      .lse = p->lse};
    spar_kvblock kb = {.n = k1 - k0,
                       .pos = a->k_pos ? a->k_pos + k0 : NULL,
                       .stride_kv = (int64_t)g * d,
                       .k = a->k + k0 * g * d,
                       .v = a->v + k0 * g * d};
    assert_int_equal(kern->softmax_fwd_block(&a->dims, c->causal, &qb, &kb), 0);
}

/* --- tests --------------------------------------------------------------------------------- */

static void select_finds_scalar_and_auto_and_rejects_unknown_names(void **state) {
    (void)state;
    const spar_kernels *scalar = spar_kernels_select("scalar");
    assert_non_null(scalar);
    assert_ptr_equal(scalar, &spar__kernels_scalar);
    assert_string_equal(scalar->name, "scalar");
    assert_non_null(spar_kernels_select("auto"));
    assert_non_null(spar_kernels_select("auto")->softmax_fwd_block);
    assert_non_null(spar_kernels_select("auto")->softmax_bwd_block);
    assert_non_null(scalar->softmax_bwd_block);
    assert_null(spar_kernels_select("cuda-that-is-not-built"));
    assert_null(spar_kernels_select(""));
}

static void init_partial_means_no_keys_seen(void **state) {
    (void)state;
    float o[3 * 2 * 5], lse[3 * 2];
    memset(o, 0x7f, sizeof o), memset(lse, 0x7f, sizeof lse);
    spar_softmax_init_partial(3, 2, 5, o, lse);
    for (size_t i = 0; i < sizeof o / sizeof o[0]; i++)
        assert_true(o[i] == 0.0f);
    for (size_t i = 0; i < sizeof lse / sizeof lse[0]; i++)
        assert_true(isinf(lse[i]) && lse[i] < 0);
}

static void check_backend_matches_reference(const char *backend) {
    const spar_kernels *kern = spar_kernels_select(backend);
    assert_non_null(kern);
    double worst_o = 0.0, worst_lse = 0.0;
    for (size_t ci = 0; ci < kc_case_count; ci++) {
        const kc_case *c = &kc_cases[ci];
        kc_inputs a = kc_make_inputs(c, ci + 1, false);
        int64_t no = c->nq * c->heads * c->head_dim, nl = c->nq * c->heads;
        double *ro = malloc(sizeof *ro * (size_t)no), *rl = malloc(sizeof *rl * (size_t)nl);
        assert_true(ro && rl);
        reference(c, &a, 0, c->nk, ro, rl);
        partial p = new_partial(c);
        run_block(kern, c, &a, 0, c->nk, &p);
        kc_current_case = c;
        worst_o = kc_max(worst_o, kc_check_close("o", no, p.o, ro, 1e-5));
        worst_lse = kc_max(worst_lse, kc_check_close("lse", nl, p.lse, rl, 1e-5));
        free_partial(&p), free(ro), free(rl), kc_free_inputs(&a);
    }
    printf("# %s forward vs float64: worst rel L2 o %.2e lse %.2e (tol 1e-5)\n", backend, worst_o,
           worst_lse);
}

static void scalar_kernel_matches_float64_reference(void **state) {
    (void)state;
    check_backend_matches_reference("scalar");
}

static void auto_kernel_matches_float64_reference(void **state) {
    (void)state;
    check_backend_matches_reference("auto");
}

/* Keys cut into `parts` uneven blocks, each into its own partial, merged in order. */
static void check_merge_of_blocks(int parts) {
    const spar_kernels *kern = spar_kernels_select("scalar");
    double worst_split = 0.0, worst_ref = 0.0;
    for (size_t ci = 0; ci < kc_case_count; ci++) {
        const kc_case *c = &kc_cases[ci];
        if (c->nk < parts) continue;
        kc_inputs a = kc_make_inputs(c, 100 + ci, false);
        int64_t no = c->nq * c->heads * c->head_dim, nl = c->nq * c->heads;
        partial whole = new_partial(c), merged = new_partial(c);
        run_block(kern, c, &a, 0, c->nk, &whole);
        int64_t cut[4];
        kc_split_keys(c->nk, parts, cut);
        for (int b = 0; b < parts; b++) {
            partial block = new_partial(c);
            run_block(kern, c, &a, cut[b], cut[b + 1], &block);
            spar_softmax_merge(c->nq, c->heads, c->head_dim, merged.o, merged.lse, block.o,
                               block.lse);
            free_partial(&block);
        }
        double *ro = malloc(sizeof *ro * (size_t)no), *rl = malloc(sizeof *rl * (size_t)nl);
        assert_true(ro && rl);
        reference(c, &a, 0, c->nk, ro, rl);
        kc_current_case = c;
        worst_split = kc_max(
            worst_split, kc_check_close_f("o merged vs one block", no, merged.o, whole.o, 1e-6));
        worst_split = kc_max(worst_split, kc_check_close_f("lse merged vs one block", nl,
                                                           merged.lse, whole.lse, 1e-6));
        worst_ref =
            kc_max(worst_ref, kc_check_close("o merged vs reference", no, merged.o, ro, 1e-5));
        worst_ref =
            kc_max(worst_ref, kc_check_close("lse merged vs reference", nl, merged.lse, rl, 1e-5));
        free(ro), free(rl), free_partial(&whole), free_partial(&merged), kc_free_inputs(&a);
    }
    printf("# %d merged blocks: worst rel L2 vs one block %.2e (tol 1e-6), vs float64 %.2e "
           "(tol 1e-5)\n",
           parts, worst_split, worst_ref);
}

static void merging_two_key_blocks_equals_one_block(void **state) {
    (void)state;
    check_merge_of_blocks(2);
}

static void merging_three_key_blocks_equals_one_block(void **state) {
    (void)state;
    check_merge_of_blocks(3);
}

static void merging_an_empty_partial_is_the_identity(void **state) {
    (void)state;
    const kc_case *c = &kc_cases[2];
    kc_inputs a = kc_make_inputs(c, 7, false);
    size_t so = sizeof(float) * (size_t)(c->nq * c->heads * c->head_dim);
    size_t sl = sizeof(float) * (size_t)(c->nq * c->heads);
    partial full = new_partial(c), empty = new_partial(c), keep = new_partial(c);
    run_block(spar_kernels_select("scalar"), c, &a, 0, c->nk, &full);
    memcpy(keep.o, full.o, so), memcpy(keep.lse, full.lse, sl);

    /* empty into full: full unchanged. lse = -inf alone marks a partial empty, so its o
     * may hold anything, NaN included, without leaking into the merge. */
    for (int64_t i = 0; i < c->nq * c->heads * c->head_dim; i++)
        empty.o[i] = NAN;
    spar_softmax_merge(c->nq, c->heads, c->head_dim, full.o, full.lse, empty.o, empty.lse);
    assert_memory_equal(full.o, keep.o, so);
    assert_memory_equal(full.lse, keep.lse, sl);

    /* full into empty (o still NaN): empty becomes full exactly */
    spar_softmax_merge(c->nq, c->heads, c->head_dim, empty.o, empty.lse, full.o, full.lse);
    assert_memory_equal(empty.o, keep.o, so);
    assert_memory_equal(empty.lse, keep.lse, sl);
    free_partial(&full), free_partial(&empty), free_partial(&keep), kc_free_inputs(&a);
}

/* Queries at positions 10..19 first meet keys 0..9, then keys 15..24: queries 10..14
 * see none of the second block and must keep their partial bit for bit. */
static void query_that_sees_no_key_of_a_block_is_left_unchanged(void **state) {
    (void)state;
    kc_case c = {6, 2, 24, 10, 20, true, KC_POS_SAME};
    kc_inputs a = kc_make_inputs(&c, 11, false);
    for (int64_t i = 0; i < c.nq; i++)
        a.q_pos[i] = 10 + i;
    for (int64_t j = 0; j < c.nk; j++)
        a.k_pos[j] = j < 10 ? j : j + 5;
    const spar_kernels *kern = spar_kernels_select("scalar");
    size_t row_o = sizeof(float) * (size_t)(c.heads * c.head_dim),
           row_l = sizeof(float) * (size_t)c.heads;
    partial p = new_partial(&c), keep = new_partial(&c);
    run_block(kern, &c, &a, 0, 10, &p);
    memcpy(keep.o, p.o, row_o * (size_t)c.nq), memcpy(keep.lse, p.lse, row_l * (size_t)c.nq);

    run_block(kern, &c, &a, 10, 20, &p);
    for (int64_t i = 0; i < c.nq; i++) {
        int same =
            memcmp(p.o + i * c.heads * c.head_dim, keep.o + i * c.heads * c.head_dim, row_o) == 0 &&
            memcmp(p.lse + i * c.heads, keep.lse + i * c.heads, row_l) == 0;
        if (a.q_pos[i] < 15)
            assert_true(same); /* saw no key of the second block */
        else
            assert_false(same); /* saw some: the partial moved */
    }
    /* and the result over both blocks is still the attention over all 20 keys */
    int64_t no = c.nq * c.heads * c.head_dim, nl = c.nq * c.heads;
    double *ro = malloc(sizeof *ro * (size_t)no), *rl = malloc(sizeof *rl * (size_t)nl);
    assert_true(ro && rl);
    reference(&c, &a, 0, c.nk, ro, rl);
    kc_current_case = &c;
    kc_check_close("o", no, p.o, ro, 1e-5);
    kc_check_close("lse", nl, p.lse, rl, 1e-5);

    /* a block wholly in every query's future changes nothing at all */
    memcpy(keep.o, p.o, row_o * (size_t)c.nq), memcpy(keep.lse, p.lse, row_l * (size_t)c.nq);
    for (int64_t j = 0; j < c.nk; j++)
        a.k_pos[j] = 1000 + j;
    run_block(kern, &c, &a, 0, c.nk, &p);
    assert_memory_equal(p.o, keep.o, row_o * (size_t)c.nq);
    assert_memory_equal(p.lse, keep.lse, row_l * (size_t)c.nq);
    free(ro), free(rl), free_partial(&p), free_partial(&keep), kc_free_inputs(&a);
}

/* --- strided views ------------------------------------------------------------------------- */

/* Heads outside [h0, h0 + count) of x: [n, wide, w] set to NaN: a kernel that reads them
 * spreads NaN into what it writes. */
static void poison_other_heads(int64_t n, int wide, int h0, int count, int w, float *x) {
    for (int64_t i = 0; i < n; i++)
        for (int h = 0; h < wide; h++)
            for (int c = 0; c < w && (h < h0 || h >= h0 + count); c++)
                x[(i * wide + h) * w + c] = NAN;
}

/* The forward call covers query heads 2..5 of an 8-head tensor (stride_q = 8d, stride_lse
 * = 8) and kv heads 1..2 of a 4-head one (stride_kv = 4d), over two key blocks. It must
 * write exactly what a dense call on copies of those heads writes, and no other byte. */
static void
forward_on_a_head_subset_view_equals_a_dense_copy_and_touches_no_other_head(void **state) {
    (void)state;
    enum { WH = 8, WG = 4, H0 = 2, G0 = 1, D = 33, NQ = 7, NK = 9, KCUT = 4 };
    kc_case c = {4, 2, D, NQ, NK, true, KC_POS_RANDOM}; /* the dense problem */
    kc_inputs a = kc_make_inputs(&c, 21, false);        /* a.q, a.k, a.v: the dense copies */
    const spar_kernels *kern = spar_kernels_select("scalar");
    float *wq = kc_random_floats(NQ * WH * D), *wk = kc_random_floats(NK * WG * D);
    float *wv = kc_random_floats(NK * WG * D), *wo = kc_random_floats(NQ * WH * D);
    float *wl = kc_random_floats(NQ * WH), *want_o = malloc(sizeof(float) * NQ * WH * D);
    float *want_l = malloc(sizeof(float) * NQ * WH), *got = malloc(sizeof(float) * NQ * WH * D);
    assert_true(want_o && want_l && got);
    poison_other_heads(NQ, WH, H0, 4, D, wq);
    poison_other_heads(NK, WG, G0, 2, D, wk), poison_other_heads(NK, WG, G0, 2, D, wv);
    kc_scatter_heads(NQ, WH, H0, 4, D, a.q, wq);
    kc_scatter_heads(NK, WG, G0, 2, D, a.k, wk), kc_scatter_heads(NK, WG, G0, 2, D, a.v, wv);

    partial dense = new_partial(&c); /* the view's heads start as "no keys seen" too */
    kc_scatter_heads(NQ, WH, H0, 4, D, dense.o, wo),
        kc_scatter_heads(NQ, WH, H0, 4, 1, dense.lse, wl);
    memcpy(want_o, wo, sizeof(float) * NQ * WH * D), memcpy(want_l, wl, sizeof(float) * NQ * WH);
    run_block(kern, &c, &a, 0, KCUT, &dense), run_block(kern, &c, &a, KCUT, NK, &dense);
    for (int b = 0; b < 2; b++) {
        int64_t k0 = b ? KCUT : 0, k1 = b ? NK : KCUT;
        spar_qblock qb = {.n = NQ,
                          .pos = a.q_pos,
                          .stride_q = WH * D,
                          .stride_lse = WH,
                          .q = wq + H0 * D,
                          .o = wo + H0 * D,
                          .lse = wl + H0};
        spar_kvblock kb = {.n = k1 - k0,
                           .pos = a.k_pos + k0,
                           .stride_kv = WG * D,
                           .k = wk + (k0 * WG + G0) * D,
                           .v = wv + (k0 * WG + G0) * D};
        assert_int_equal(kern->softmax_fwd_block(&a.dims, true, &qb, &kb), 0);
    }
    /* the view's heads: bit for bit the dense call's, which is the attention itself */
    kc_gather_heads(NQ, WH, H0, 4, D, wo, got);
    assert_memory_equal(got, dense.o, sizeof(float) * NQ * 4 * D);
    kc_gather_heads(NQ, WH, H0, 4, 1, wl, got);
    assert_memory_equal(got, dense.lse, sizeof(float) * NQ * 4);
    double ro[NQ * 4 * D], rl[NQ * 4];
    reference(&c, &a, 0, NK, ro, rl);
    kc_current_case = &c;
    kc_check_close("o (dense copy)", NQ * 4 * D, dense.o, ro, 1e-5);
    /* every other head: not one byte changed */
    kc_scatter_heads(NQ, WH, H0, 4, D, dense.o, want_o),
        kc_scatter_heads(NQ, WH, H0, 4, 1, dense.lse, want_l);
    assert_memory_equal(wo, want_o, sizeof(float) * NQ * WH * D);
    assert_memory_equal(wl, want_l, sizeof(float) * NQ * WH);
    free(wq), free(wk), free(wv), free(wo), free(wl), free(want_o), free(want_l), free(got);
    free_partial(&dense), kc_free_inputs(&a);
}

/* --- spar_vec_add ------------------------------------------------------------------------- */

/* y += x is the fp32 sum of each pair, nothing more: sums that are exact in fp32 come out
 * exact, rounded ones as the test's own fp32 addition rounds them, and y[n] past the end
 * and n = 0 touch nothing. 37 floats: odd, so a vectorised version has a tail. */
static void vec_add_adds_each_pair_exactly_in_fp32_and_nothing_past_n(void **state) {
    (void)state;
    enum { N = 37 };
    float y[N + 1], x[N], want[N + 1];
    for (int i = 0; i < N; i++) { /* dyadic values: every sum is exact */
        y[i] = (float)i * 0.25f - 3.0f, x[i] = 1.5f - (float)i * 0.125f;
        want[i] = (float)((double)y[i] + (double)x[i]);
    }
    y[N] = want[N] = 42.0f;
    spar_vec_add(N, y, x);
    assert_memory_equal(y, want, sizeof y);
    assert_true(y[0] == -1.5f && y[4] == -1.0f);

    kc_seed(99); /* random values: the result is the fp32 sum, rounding included */
    for (int i = 0; i < N; i++)
        y[i] = kc_randn() * 1e3f, x[i] = kc_randn() * 1e-3f, want[i] = y[i] + x[i];
    spar_vec_add(N, y, x);
    assert_memory_equal(y, want, sizeof y);

    spar_vec_add(0, y, x);
    assert_memory_equal(y, want, sizeof y);
}

/* delta, the backward pass's row term, is rowsum(dout * o) to fp32 rounding. */
static void bwd_delta_is_the_rowwise_dot_of_dout_and_o(void **state) {
    (void)state;
    enum { N = 5, H = 3, D = 33 };
    kc_seed(5);
    float *o = kc_random_floats(N * H * D), *dout = kc_random_floats(N * H * D), delta[N * H];
    double want[N * H];
    for (int r = 0; r < N * H; r++) {
        want[r] = 0.0;
        for (int x = 0; x < D; x++)
            want[r] += (double)o[r * D + x] * (double)dout[r * D + x];
    }
    spar_softmax_bwd_delta(N, H, D, o, dout, delta);
    kc_check_close("delta", N * H, delta, want, 1e-7);
    free(o), free(dout);
}

/* Scores that jump by 40 and then 80 from one tile of keys to the next (exact in fp32:
 * d = 1, q = 1, k in {0, 40, 80}) push the fast kernel past its running maximum, so it
 * must move its reference and rescale; the result must still be the softmax. */
static void rising_scores_across_key_tiles_are_rescaled_exactly(void **state) {
    (void)state;
    enum { NK = 1536, NQ = 3 };
    spar_attn_dims dims = {1, 1, 1, 1.0f};
    float q[NQ] = {1.0f, 1.0f, 0.5f}, *k = malloc(sizeof(float) * NK),
          *v = malloc(sizeof(float) * NK);
    float o[NQ], lse[NQ];
    double ref_o[NQ], ref_lse[NQ];
    assert_non_null(k), assert_non_null(v);
    kc_seed(42);
    for (int j = 0; j < NK; j++)
        k[j] = j < 512 ? 0.0f : j < 1024 ? 40.0f : 80.0f, v[j] = kc_randn();
    for (int i = 0; i < NQ; i++) { /* float64 softmax, stable form */
        double m = 80.0 * q[i], l = 0.0, acc = 0.0;
        for (int j = 0; j < NK; j++) {
            double p = exp((double)q[i] * k[j] - m);
            l += p, acc += p * v[j];
        }
        ref_o[i] = acc / l, ref_lse[i] = m + log(l);
    }
    const spar_kernels *kern = spar_kernels_select("auto");
    spar_softmax_init_partial(NQ, 1, 1, o, lse);
    spar_qblock qb = {.n = NQ, .stride_q = 1, .stride_lse = 1, .q = q, .o = o, .lse = lse};
    spar_kvblock kb = {.n = NK, .stride_kv = 1, .k = k, .v = v};
    assert_int_equal(kern->softmax_fwd_block(&dims, false, &qb, &kb), 0);
    kc_check_close("rising scores: o", NQ, o, ref_o, 1e-5);
    kc_check_close("rising scores: lse", NQ, lse, ref_lse, 1e-5);
    free(k), free(v);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(select_finds_scalar_and_auto_and_rejects_unknown_names),
        cmocka_unit_test(init_partial_means_no_keys_seen),
        cmocka_unit_test(scalar_kernel_matches_float64_reference),
        cmocka_unit_test(auto_kernel_matches_float64_reference),
        cmocka_unit_test(merging_two_key_blocks_equals_one_block),
        cmocka_unit_test(merging_three_key_blocks_equals_one_block),
        cmocka_unit_test(merging_an_empty_partial_is_the_identity),
        cmocka_unit_test(query_that_sees_no_key_of_a_block_is_left_unchanged),
        cmocka_unit_test(
            forward_on_a_head_subset_view_equals_a_dense_copy_and_touches_no_other_head),
        cmocka_unit_test(vec_add_adds_each_pair_exactly_in_fp32_and_nothing_past_n),
        cmocka_unit_test(bwd_delta_is_the_rowwise_dot_of_dout_and_o),
        cmocka_unit_test(rising_scores_across_key_tiles_are_rescaled_exactly),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
