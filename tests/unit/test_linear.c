/* test_linear.c: the linear-attention kernels (kernels/kernels.h): the segment kernels
 * linear_fwd_local / linear_bwd_local of the scalar and blocked backends, and the state
 * functions spar_linear_state, _fwd_state, _dstate, _bwd_state, _combine and spar_alibi_decay.
 *
 * The reference is the definition written out in float64, here and sharing no code with the
 * kernels: o_i = sum_{j<=i} lambda_h^(i-j) (q_i.k_j) v_j (causal) or o = q (K^T V), and for
 * loss = sum o.dout its gradients dq, dk, dv (a kv head sums over its query group). Central
 * differences of a float64 forward check the gradient formulas themselves. The segment tests
 * cut a sequence into pieces and rebuild the whole from local results and decayed states, the
 * LASP-2 prefix: exact up to float rounding. Shapes: head_dim 1 and odd, GQA (H=4, G=2), MQA
 * (H=3, G=1), lengths around the blocked kernel's block of 64 tokens, uniform and ALiBi decays.
 * Leaves out: MPI (tests/numerics/check_linear.py runs the distributed methods).
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

#include "kernels.h"      // defines: spar_linear_dims, spar_kernels, spar__kernels_scalar,
                          //          spar__kernels_blocked, spar_linear_*, spar_alibi_decay
#include "spar_status.h"  // defines: SPAR_OK
#include "kernel_cases.h" // defines: kc_seed, kc_random_floats, kc_zero_floats, kc_to_double,
                          //          kc_check_close, kc_check_close_f, kc_max

/* The oracle, the blocked kernel, and whatever "auto" picks in this build (blas). */
#define NB 3
static const spar_kernels *backends[NB];

static void init_backends(void) {
    backends[0] = &spar__kernels_scalar;
    backends[1] = &spar__kernels_blocked;
    backends[2] = spar_kernels_select("auto");
}

/* --- the problem --------------------------------------------------------------------------- */

enum decay_kind { DECAY_09, DECAY_ONE, DECAY_ALIBI };
static const char *const decay_name[3] = {"0.9", "1.0", "alibi"};

/* One problem: q, dout: [n, H, d]; k, v: [n, G, d], as floats and as doubles (suffix d). */
typedef struct problem {
    int64_t n;
    spar_linear_dims dims; /* dims.decay points at decay below */
    double decay[8];
    enum decay_kind kind;
    float *q, *k, *v, *dout;
    double *qd, *kd, *vd, *doutd;
} problem;

static int64_t q_count(const problem *p) {
    return p->n * p->dims.heads * p->dims.head_dim;
}

static int64_t kv_count(const problem *p) {
    return p->n * p->dims.kv_heads * p->dims.head_dim;
}

/* Uniform decays (state_heads = G) or ALiBi ones (state_heads = H). */
static void make_problem(problem *p, int heads, int kv_heads, int d, int64_t n,
                         enum decay_kind kind, uint64_t seed) {
    assert_true(heads <= 8 && heads % kv_heads == 0);
    *p = (problem){.n = n, .kind = kind};
    for (int h = 0; h < heads; h++)
        p->decay[h] = kind == DECAY_09 ? 0.9 : 1.0;
    if (kind == DECAY_ALIBI) spar_alibi_decay(heads, p->decay);
    p->dims =
        (spar_linear_dims){heads, kv_heads, d, kind == DECAY_ALIBI ? heads : kv_heads, p->decay};
    kc_seed(seed * 0x9E3779B97F4A7C15ull + 7);
    p->q = kc_random_floats(q_count(p));
    p->k = kc_random_floats(kv_count(p));
    p->v = kc_random_floats(kv_count(p));
    p->dout = kc_random_floats(q_count(p));
    p->qd = kc_to_double(q_count(p), p->q), p->kd = kc_to_double(kv_count(p), p->k);
    p->vd = kc_to_double(kv_count(p), p->v), p->doutd = kc_to_double(q_count(p), p->dout);
}

static void free_problem(problem *p) {
    free(p->q), free(p->k), free(p->v), free(p->dout);
    free(p->qd), free(p->kd), free(p->vd), free(p->doutd);
}

/* "who what (shape)", the name a failed check prints. */
static const char *label(const problem *p, const char *who, const char *what) {
    static char buf[256];
    snprintf(buf, sizeof buf, "%s %s (n=%lld H=%d G=%d d=%d decay %s, state heads %d)", who, what,
             (long long)p->n, p->dims.heads, p->dims.kv_heads, p->dims.head_dim,
             decay_name[p->kind], p->dims.state_heads);
    return buf;
}

static float *nan_floats(int64_t count) {
    float *x = kc_zero_floats(count);
    for (int64_t i = 0; i < count; i++)
        x[i] = NAN;
    return x;
}

/* --- the float64 reference ----------------------------------------------------------------- */

/* w[h][e] = lambda_h^e for e = 0..n-1 by repeated products (causal), or 1 (not causal). */
static double *decay_weights(const problem *p, bool causal) {
    int64_t n = p->n > 0 ? p->n : 1;
    double *w = malloc(sizeof *w * (size_t)(n * p->dims.heads));
    assert_non_null(w);
    for (int h = 0; h < p->dims.heads; h++)
        for (int64_t e = 0; e < n; e++)
            w[h * n + e] = !causal ? 1.0 : e == 0 ? 1.0 : w[h * n + e - 1] * p->decay[h];
    return w;
}

static double dot(const double *a, const double *b, int d) {
    double s = 0.0;
    for (int c = 0; c < d; c++)
        s += a[c] * b[c];
    return s;
}

/* o: [n, H, d] = the definition; key j is seen by query i iff j <= i (causal) or always. */
static void ref_forward(const problem *p, bool causal, const double *q, const double *k,
                        const double *v, double *o) {
    int hh = p->dims.heads, g = p->dims.kv_heads, d = p->dims.head_dim, per = hh / g;
    double *w = decay_weights(p, causal);
    memset(o, 0, sizeof *o * (size_t)q_count(p));
    for (int64_t i = 0; i < p->n; i++)
        for (int h = 0; h < hh; h++)
            for (int64_t j = 0; j < (causal ? i + 1 : p->n); j++) {
                const double *kj = k + (j * g + h / per) * d, *vj = v + (j * g + h / per) * d;
                double a = w[h * p->n + (causal ? i - j : 0)] * dot(q + (i * hh + h) * d, kj, d);
                for (int c = 0; c < d; c++)
                    o[(i * hh + h) * d + c] += a * vj[c];
            }
    free(w);
}

/* Gradients of loss = sum o.dout: with a_ij = w (q_i.k_j) and b_ij = w (dout_i.v_j),
 * dq_i = sum_j b_ij k_j, dk_j = sum_i b_ij q_i, dv_j = sum_i a_ij dout_i. */
static void ref_backward(const problem *p, bool causal, double *dq, double *dk, double *dv) {
    int hh = p->dims.heads, g = p->dims.kv_heads, d = p->dims.head_dim, per = hh / g;
    double *w = decay_weights(p, causal);
    memset(dq, 0, sizeof *dq * (size_t)q_count(p));
    memset(dk, 0, sizeof *dk * (size_t)kv_count(p));
    memset(dv, 0, sizeof *dv * (size_t)kv_count(p));
    for (int64_t i = 0; i < p->n; i++)
        for (int h = 0; h < hh; h++)
            for (int64_t j = 0; j < (causal ? i + 1 : p->n); j++) {
                int64_t qi = (i * hh + h) * d, kj = (j * g + h / per) * d;
                double wij = w[h * p->n + (causal ? i - j : 0)];
                double a = wij * dot(p->qd + qi, p->kd + kj, d);
                double b = wij * dot(p->doutd + qi, p->vd + kj, d);
                for (int c = 0; c < d; c++) {
                    dq[qi + c] += b * p->kd[kj + c];
                    dk[kj + c] += b * p->qd[qi + c];
                    dv[kj + c] += a * p->doutd[qi + c];
                }
            }
    free(w);
}

/* The reference's three gradients, t[0] = dq: [n, H, d], t[1] = dk, t[2] = dv: [n, G, d]. */
typedef struct ref_grads {
    double *t[3];
} ref_grads;
static const char *const grad_name[3] = {"dq", "dk", "dv"};

static ref_grads make_ref_grads(const problem *p, bool causal) {
    ref_grads r = {{malloc(sizeof(double) * (size_t)(q_count(p) + 1)),
                    malloc(sizeof(double) * (size_t)(kv_count(p) + 1)),
                    malloc(sizeof(double) * (size_t)(kv_count(p) + 1))}};
    assert_true(r.t[0] && r.t[1] && r.t[2]);
    ref_backward(p, causal, r.t[0], r.t[1], r.t[2]);
    return r;
}

static void free_ref_grads(ref_grads *r) {
    free(r->t[0]), free(r->t[1]), free(r->t[2]);
}

/* --- 1, 2: the local kernels against the reference ------------------------------------------ */

static const int64_t lengths[] = {1, 2, 63, 64, 65, 130, 200};
static const int head_shapes[][2] = {{4, 2}, {3, 1}}; /* GQA, MQA */
static const int head_dims[] = {1, 5, 24, 33};

typedef void (*local_check)(const problem *p, double worst[NB][3]);

/* Runs check over every length x head shape x head_dim x decay. */
static void for_each_local_case(local_check check, double worst[NB][3]) {
    uint64_t seed = 1;
    for (size_t ni = 0; ni < sizeof lengths / sizeof lengths[0]; ni++)
        for (int hs = 0; hs < 2; hs++)
            for (size_t di = 0; di < sizeof head_dims / sizeof head_dims[0]; di++)
                for (int kind = DECAY_09; kind <= DECAY_ALIBI; kind++) {
                    problem p;
                    make_problem(&p, head_shapes[hs][0], head_shapes[hs][1], head_dims[di],
                                 lengths[ni], (enum decay_kind)kind, seed++);
                    check(&p, worst);
                    free_problem(&p);
                }
}

/* worst[b][0]: backend b against the reference; worst[1][1]: blocked against scalar. */
static void check_forward_case(const problem *p, double worst[NB][3]) {
    double *ref = malloc(sizeof *ref * (size_t)q_count(p));
    assert_non_null(ref);
    ref_forward(p, true, p->qd, p->kd, p->vd, ref);
    float *o[NB];
    for (int b = 0; b < NB; b++) {
        o[b] = nan_floats(q_count(p)); /* o is overwritten, every element */
        assert_int_equal(backends[b]->linear_fwd_local(&p->dims, p->n, p->q, p->k, p->v, o[b]),
                         SPAR_OK);
        worst[b][0] = kc_max(worst[b][0], kc_check_close(label(p, backends[b]->name, "o"),
                                                         q_count(p), o[b], ref, 1e-5));
    }
    worst[1][1] = kc_max(worst[1][1], kc_check_close_f(label(p, "blocked vs scalar", "o"),
                                                       q_count(p), o[1], o[0], 1e-5));
    for (int b = 0; b < NB; b++)
        free(o[b]);
    free(ref);
}

static void local_forward_of_both_backends_matches_float64_definition(void **state) {
    (void)state;
    double worst[NB][3] = {{0}};
    for_each_local_case(check_forward_case, worst);
    printf("# fwd_local rel L2 vs float64: scalar %.2e, blocked %.2e, %s %.2e; blocked vs scalar "
           "%.2e (tol 1e-5)\n",
           worst[0][0], worst[1][0], backends[2]->name, worst[2][0], worst[1][1]);
}

/* worst[b][t]: backend b, gradient t, against the reference. */
static void check_backward_case(const problem *p, double worst[NB][3]) {
    ref_grads r = make_ref_grads(p, true);
    for (int b = 0; b < NB; b++) {
        float *g[3] = {nan_floats(q_count(p)), nan_floats(kv_count(p)), nan_floats(kv_count(p))};
        assert_int_equal(backends[b]->linear_bwd_local(&p->dims, p->n, p->q, p->k, p->v, p->dout,
                                                       g[0], g[1], g[2]),
                         SPAR_OK);
        for (int t = 0; t < 3; t++) {
            int64_t count = t == 0 ? q_count(p) : kv_count(p);
            worst[b][t] =
                kc_max(worst[b][t], kc_check_close(label(p, backends[b]->name, grad_name[t]), count,
                                                   g[t], r.t[t], 1e-5));
            free(g[t]);
        }
    }
    free_ref_grads(&r);
}

static void local_backward_of_both_backends_matches_float64_gradients(void **state) {
    (void)state;
    double worst[NB][3] = {{0}};
    for_each_local_case(check_backward_case, worst);
    for (int b = 0; b < NB; b++)
        printf("# bwd_local %s rel L2 vs float64: dq %.2e, dk %.2e, dv %.2e (tol 1e-5)\n",
               backends[b]->name, worst[b][0], worst[b][1], worst[b][2]);
}

/* loss = sum o.dout of the float64 forward at (q, k, v). */
static double ref_loss(const problem *p, const double *q, const double *k, const double *v) {
    double *o = malloc(sizeof *o * (size_t)q_count(p)), loss = 0.0;
    assert_non_null(o);
    ref_forward(p, true, q, k, v, o);
    for (int64_t x = 0; x < q_count(p); x++)
        loss += o[x] * p->doutd[x];
    free(o);
    return loss;
}

static void local_backward_matches_finite_differences_of_the_loss(void **state) {
    (void)state;
    problem p;
    make_problem(&p, 2, 1, 3, 6, DECAY_09, 99);
    p.decay[0] = p.decay[1] = 0.8;
    const double h = 1e-3;
    double worst = 0.0, largest = 0.0;
    for (int b = 0; b < NB; b++) {
        float *g[3] = {nan_floats(q_count(&p)), nan_floats(kv_count(&p)), nan_floats(kv_count(&p))};
        assert_int_equal(
            backends[b]->linear_bwd_local(&p.dims, p.n, p.q, p.k, p.v, p.dout, g[0], g[1], g[2]),
            SPAR_OK);
        double *x[3] = {p.qd, p.kd, p.vd};
        for (int t = 0; t < 3; t++) {
            for (int64_t e = 0; e < (t == 0 ? q_count(&p) : kv_count(&p)); e++) {
                double keep = x[t][e];
                x[t][e] = keep + h;
                double up = ref_loss(&p, p.qd, p.kd, p.vd);
                x[t][e] = keep - h;
                double down = ref_loss(&p, p.qd, p.kd, p.vd);
                x[t][e] = keep;
                double fd = (up - down) / (2.0 * h), err = fabs((double)g[t][e] - fd);
                if (!(err <= 1e-4 + 1e-3 * fabs(fd)))
                    fprintf(stderr, "%s %s[%lld] = %.9g, central difference %.9g\n",
                            backends[b]->name, grad_name[t], (long long)e, (double)g[t][e], fd);
                assert_true(err <= 1e-4 + 1e-3 * fabs(fd));
                worst = kc_max(worst, err), largest = kc_max(largest, fabs(fd));
            }
            free(g[t]);
        }
    }
    assert_true(largest > 1e-2); /* the gradients checked are not all zero */
    printf("# bwd_local vs central differences (h 1e-3): worst abs error %.2e "
           "(tol 1e-4 + 1e-3 |grad|)\n",
           worst);
    free_problem(&p);
}

/* --- 3: segments rebuilt from local results and decayed states (LASP-2) ---------------------- */

/* Segment t is tokens [cut[t], cut[t + 1]); count <= 3 segments. */
typedef struct segments {
    int count;
    int64_t cut[4];
} segments;

static int64_t state_len(const problem *p) {
    return (int64_t)p->dims.state_heads * p->dims.head_dim * p->dims.head_dim;
}

/* Exponents of the states entering segment t: an earlier segment u decays by the distance from
 * its end to t's start; the others are left out (-1). */
static void entering_exps(const segments *sg, int t, double exps[3]) {
    for (int u = 0; u < sg->count; u++)
        exps[u] = u < t ? (double)(sg->cut[t] - sg->cut[u + 1]) : -1.0;
}

/* Exponents of the state gradients returning to segment u from the later segments t. */
static void returning_exps(const segments *sg, int u, double exps[3]) {
    for (int t = 0; t < sg->count; t++)
        exps[t] = t > u ? (double)(sg->cut[t] - sg->cut[u + 1]) : -1.0;
}

/* o of the whole sequence, segment by segment: local output plus the entering state. The state
 * entering the second segment must be the first segment's state, bit for bit. */
static void segments_forward(const problem *p, const spar_kernels *kern, const segments *sg,
                             const float *m, float *o) {
    int64_t hd = (int64_t)p->dims.heads * p->dims.head_dim;
    int64_t gd = (int64_t)p->dims.kv_heads * p->dims.head_dim, sl = state_len(p);
    float *s_in = kc_zero_floats(sl);
    double exps[3];
    for (int t = 0; t < sg->count; t++) {
        int64_t t0 = sg->cut[t], nt = sg->cut[t + 1] - t0;
        entering_exps(sg, t, exps);
        spar_linear_combine(&p->dims, sg->count, m, exps, s_in);
        if (t == 1) assert_memory_equal(s_in, m, sizeof(float) * (size_t)sl);
        assert_int_equal(kern->linear_fwd_local(&p->dims, nt, p->q + t0 * hd, p->k + t0 * gd,
                                                p->v + t0 * gd, o + t0 * hd),
                         SPAR_OK);
        spar_linear_fwd_state(&p->dims, true, nt, p->q + t0 * hd, s_in, o + t0 * hd);
    }
    free(s_in);
}

/* dq, dk, dv of the whole sequence, segment by segment: local gradients, then the entering
 * state (dq) and the decayed state gradients of the later segments (dk, dv). */
static void segments_backward(const problem *p, const spar_kernels *kern, const segments *sg,
                              const float *m, float *g[3]) {
    int64_t hd = (int64_t)p->dims.heads * p->dims.head_dim;
    int64_t gd = (int64_t)p->dims.kv_heads * p->dims.head_dim, sl = state_len(p);
    float *ds = kc_zero_floats(3 * sl), *s_in = kc_zero_floats(sl), *dkv = kc_zero_floats(sl);
    double exps[3];
    for (int t = 0; t < sg->count; t++)
        spar_linear_dstate(&p->dims, true, sg->cut[t + 1] - sg->cut[t], p->q + sg->cut[t] * hd,
                           p->dout + sg->cut[t] * hd, ds + t * sl);
    for (int u = 0; u < sg->count; u++) {
        int64_t u0 = sg->cut[u], nu = sg->cut[u + 1] - u0;
        const float *k = p->k + u0 * gd, *v = p->v + u0 * gd, *dout = p->dout + u0 * hd;
        assert_int_equal(kern->linear_bwd_local(&p->dims, nu, p->q + u0 * hd, k, v, dout,
                                                g[0] + u0 * hd, g[1] + u0 * gd, g[2] + u0 * gd),
                         SPAR_OK);
        entering_exps(sg, u, exps);
        spar_linear_combine(&p->dims, sg->count, m, exps, s_in);
        returning_exps(sg, u, exps);
        spar_linear_combine(&p->dims, sg->count, ds, exps, dkv);
        spar_linear_bwd_state(&p->dims, true, nu, k, v, dout, u > 0 ? s_in : NULL,
                              u < sg->count - 1 ? dkv : NULL, g[0] + u0 * hd, g[1] + u0 * gd,
                              g[2] + u0 * gd);
    }
    free(ds), free(s_in), free(dkv);
}

/* worst[0]: o, worst[1 + t]: gradient t, over both backends. */
static void check_segments(const problem *p, const segments *sg, const double *o_ref,
                           const ref_grads *r, double worst[4]) {
    int64_t gd = (int64_t)p->dims.kv_heads * p->dims.head_dim, sl = state_len(p);
    float *m = kc_zero_floats(3 * sl);
    for (int t = 0; t < sg->count; t++)
        spar_linear_state(&p->dims, true, sg->cut[t + 1] - sg->cut[t], p->k + sg->cut[t] * gd,
                          p->v + sg->cut[t] * gd, m + t * sl);
    char what[64];
    for (int b = 0; b < NB; b++) {
        float *o = nan_floats(q_count(p));
        segments_forward(p, backends[b], sg, m, o);
        snprintf(what, sizeof what, "o from %d segments cut at %lld, %lld", sg->count,
                 (long long)sg->cut[1], (long long)sg->cut[2]);
        worst[0] = kc_max(worst[0], kc_check_close(label(p, backends[b]->name, what), q_count(p), o,
                                                   o_ref, 1e-5));
        float *g[3] = {nan_floats(q_count(p)), nan_floats(kv_count(p)), nan_floats(kv_count(p))};
        segments_backward(p, backends[b], sg, m, g);
        for (int t = 0; t < 3; t++) {
            snprintf(what, sizeof what, "%s from %d segments cut at %lld, %lld", grad_name[t],
                     sg->count, (long long)sg->cut[1], (long long)sg->cut[2]);
            worst[1 + t] = kc_max(worst[1 + t], kc_check_close(label(p, backends[b]->name, what),
                                                               t == 0 ? q_count(p) : kv_count(p),
                                                               g[t], r->t[t], 1e-5));
            free(g[t]);
        }
        free(o);
    }
    free(m);
}

static void segments_with_decayed_states_rebuild_the_whole_sequence(void **state) {
    (void)state;
    static const struct {
        int heads, kv_heads, head_dim;
        enum decay_kind kind;
    } shapes[] = {
        {4, 2, 5, DECAY_09},     /* GQA, state per group */
        {3, 1, 24, DECAY_ONE},   /* MQA, one state, no decay */
        {4, 2, 24, DECAY_ALIBI}, /* GQA, state per query head */
        {3, 1, 5, DECAY_ALIBI},  /* MQA, state per query head */
    };
    static const segments splits[] = {
        {2, {0, 70, 150}},      {2, {0, 64, 150}},      {2, {0, 1, 150}},
        {3, {0, 40, 110, 150}}, {3, {0, 64, 128, 150}}, {3, {0, 1, 2, 150}},
    };
    double worst[4] = {0};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        problem p;
        make_problem(&p, shapes[s].heads, shapes[s].kv_heads, shapes[s].head_dim, 150,
                     shapes[s].kind, 500 + s);
        double *o_ref = malloc(sizeof *o_ref * (size_t)q_count(&p));
        assert_non_null(o_ref);
        ref_forward(&p, true, p.qd, p.kd, p.vd, o_ref);
        ref_grads r = make_ref_grads(&p, true);
        for (size_t c = 0; c < sizeof splits / sizeof splits[0]; c++)
            check_segments(&p, &splits[c], o_ref, &r, worst);
        free_ref_grads(&r), free(o_ref), free_problem(&p);
    }
    printf("# segments vs whole sequence, rel L2: o %.2e, dq %.2e, dk %.2e, dv %.2e (tol 1e-5)\n",
           worst[0], worst[1], worst[2], worst[3]);
}

/* --- 4: non-causal through one state ------------------------------------------------------- */

static void noncausal_attention_is_q_times_the_state_forward_and_backward(void **state) {
    (void)state;
    static const struct {
        int heads, kv_heads, head_dim;
        enum decay_kind kind;
    } shapes[] = {{4, 2, 5, DECAY_09},
                  {4, 2, 24, DECAY_ALIBI},
                  {3, 1, 33, DECAY_ONE},
                  {3, 1, 1, DECAY_ALIBI}};
    static const int64_t ns[] = {1, 65, 130};
    double worst[4] = {0};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (size_t c = 0; c < sizeof ns / sizeof ns[0]; c++) {
            problem p;
            make_problem(&p, shapes[s].heads, shapes[s].kv_heads, shapes[s].head_dim, ns[c],
                         shapes[s].kind, 700 + 10 * s + c);
            double *o_ref = malloc(sizeof *o_ref * (size_t)q_count(&p));
            assert_non_null(o_ref);
            ref_forward(&p, false, p.qd, p.kd, p.vd, o_ref);
            ref_grads r = make_ref_grads(&p, false);
            float *st = kc_zero_floats(state_len(&p)), *dst = kc_zero_floats(state_len(&p));
            float *o = kc_zero_floats(q_count(&p));
            spar_linear_state(&p.dims, false, p.n, p.k, p.v, st);
            spar_linear_fwd_state(&p.dims, false, p.n, p.q, st, o);
            worst[0] = kc_max(worst[0], kc_check_close(label(&p, "non-causal", "o"), q_count(&p), o,
                                                       o_ref, 1e-5));
            float *g[3] = {kc_zero_floats(q_count(&p)), kc_zero_floats(kv_count(&p)),
                           kc_zero_floats(kv_count(&p))};
            spar_linear_dstate(&p.dims, false, p.n, p.q, p.dout, dst);
            spar_linear_bwd_state(&p.dims, false, p.n, p.k, p.v, p.dout, st, dst, g[0], g[1], g[2]);
            for (int t = 0; t < 3; t++) {
                worst[1 + t] =
                    kc_max(worst[1 + t],
                           kc_check_close(label(&p, "non-causal", grad_name[t]),
                                          t == 0 ? q_count(&p) : kv_count(&p), g[t], r.t[t], 1e-5));
                free(g[t]);
            }
            free(st), free(dst), free(o), free(o_ref), free_ref_grads(&r), free_problem(&p);
        }
    printf("# non-causal vs float64, rel L2: o %.2e, dq %.2e, dk %.2e, dv %.2e (tol 1e-5)\n",
           worst[0], worst[1], worst[2], worst[3]);
}

/* --- 5, 6: ALiBi decays and the decayed prefix --------------------------------------------- */

/* Asserts decay[h] = exp(-2^-e[h]) for the H heads. */
static void check_alibi(int heads, const int *e) {
    double decay[8];
    spar_alibi_decay(heads, decay);
    for (int h = 0; h < heads; h++) {
        double want = exp(-ldexp(1.0, -e[h]));
        if (!(fabs(decay[h] - want) <= 1e-15))
            fprintf(stderr, "H=%d: decay[%d] = %.17g, want exp(-2^-%d) = %.17g\n", heads, h,
                    decay[h], e[h], want);
        assert_true(fabs(decay[h] - want) <= 1e-15);
    }
}

static void alibi_decays_follow_the_power_of_two_slopes(void **state) {
    (void)state;
    check_alibi(8, (const int[]){1, 2, 3, 4, 5, 6, 7, 8});
    check_alibi(6, (const int[]){2, 4, 6, 8, 1, 3}); /* 4 heads' slopes, then every other of 8 */
    check_alibi(3, (const int[]){4, 8, 2});          /* 2 heads' slopes, then the first of 4 */
    check_alibi(1, (const int[]){8});
}

/* out[s] = sum over e >= 0 of lambda_s^e states[i][s]; a state with e < 0 holds NaN so that
 * reading it at all shows. */
static void check_combine(int heads, int kv_heads, int state_heads, const double *decay) {
    enum { D = 3, COUNT = 5 };
    static const double exps[COUNT] = {2.0, -1.0, 0.0, 5.5, -0.5};
    spar_linear_dims dims = {heads, kv_heads, D, state_heads, decay};
    int64_t sl = (int64_t)state_heads * D * D;
    kc_seed(42);
    float *states = kc_random_floats(COUNT * sl), *out = nan_floats(sl);
    double *ref = calloc((size_t)sl, sizeof *ref);
    assert_non_null(ref);
    for (int i = 0; i < COUNT; i++)
        for (int64_t x = 0; x < sl && exps[i] < 0; x++)
            states[i * sl + x] = NAN;
    for (int s = 0; s < state_heads; s++) {
        double lambda = decay[s * (heads / state_heads)];
        for (int i = 0; i < COUNT; i++)
            for (int64_t x = 0; x < D * D && exps[i] >= 0; x++)
                ref[s * D * D + x] +=
                    exp(exps[i] * log(lambda)) * states[(i * state_heads + s) * D * D + x];
    }
    spar_linear_combine(&dims, COUNT, states, exps, out);
    kc_check_close("spar_linear_combine", sl, out, ref, 1e-6);
    /* Nothing entering: every exponent negative gives the zero state. */
    static const double none[COUNT] = {-1.0, -1.0, -1.0, -1.0, -1.0};
    float *zero = kc_zero_floats(sl);
    spar_linear_combine(&dims, COUNT, states, none, out);
    assert_memory_equal(out, zero, sizeof(float) * (size_t)sl);
    free(states), free(out), free(ref), free(zero);
}

static void combine_skips_negative_exponents_and_decays_per_state_head(void **state) {
    (void)state;
    double alibi[3];
    spar_alibi_decay(3, alibi);
    check_combine(3, 1, 3, alibi); /* a state per query head, each its own decay */
    static const double per_group[4] = {0.5, 0.5, 0.9, 0.9};
    check_combine(4, 2, 2, per_group); /* a state per group, the groups' decays differ */
}

/* The fast backend's state products (kernel table) against the oracle functions, causal
 * and not, states per kv head and per query head, segment lengths around the block size. */
static void table_state_products_match_the_oracle_ones(void **state) {
    (void)state;
    const spar_kernels *fast = backends[2];
    static const int64_t seg_lengths[] = {1, 63, 64, 65, 200};
    static const int shapes[][2] = {{4, 2}, {3, 1}};
    double worst = 0.0;
    for (size_t li = 0; li < sizeof seg_lengths / sizeof seg_lengths[0]; li++)
        for (int si = 0; si < 2; si++)
            for (int kind = 0; kind < 3; kind++)
                for (int causal = 0; causal < 2; causal++) {
                    problem p;
                    make_problem(&p, shapes[si][0], shapes[si][1], 24, seg_lengths[li],
                                 (enum decay_kind)kind, (uint64_t)(li * 31 + si * 7 + kind));
                    int64_t sf = (int64_t)p.dims.state_heads * 24 * 24;
                    float *want = kc_zero_floats(2 * sf), *got = kc_zero_floats(2 * sf);
                    assert_int_equal(spar_linear_state(&p.dims, causal, p.n, p.k, p.v, want), 0);
                    assert_int_equal(fast->linear_state(&p.dims, causal, p.n, p.k, p.v, got), 0);
                    worst = kc_max(worst, kc_check_close_f(label(&p, fast->name, "state"), sf, got,
                                                           want, 1e-5));
                    assert_int_equal(
                        spar_linear_dstate(&p.dims, causal, p.n, p.q, p.dout, want + sf), 0);
                    assert_int_equal(
                        fast->linear_dstate(&p.dims, causal, p.n, p.q, p.dout, got + sf), 0);
                    worst = kc_max(worst, kc_check_close_f(label(&p, fast->name, "dstate"), sf,
                                                           got + sf, want + sf, 1e-5));
                    /* fwd_state and bwd_state add into outputs that start equal */
                    int64_t nq = q_count(&p), nkv = kv_count(&p);
                    float *a = kc_random_floats(nq + 2 * nkv),
                          *b = malloc(sizeof(float) * (size_t)(nq + 2 * nkv));
                    assert_non_null(b);
                    memcpy(b, a, sizeof(float) * (size_t)(nq + 2 * nkv));
                    spar_linear_fwd_state(&p.dims, causal, p.n, p.q, want, a);
                    assert_int_equal(fast->linear_fwd_state(&p.dims, causal, p.n, p.q, want, b), 0);
                    spar_linear_bwd_state(&p.dims, causal, p.n, p.k, p.v, p.dout, want, want + sf,
                                          a, a + nq, a + nq + nkv);
                    assert_int_equal(fast->linear_bwd_state(&p.dims, causal, p.n, p.k, p.v, p.dout,
                                                            want, want + sf, b, b + nq,
                                                            b + nq + nkv),
                                     0);
                    worst = kc_max(worst, kc_check_close_f(label(&p, fast->name, "o, dq, dk, dv"),
                                                           nq + 2 * nkv, b, a, 1e-5));
                    free(want), free(got), free(a), free(b);
                    free_problem(&p);
                }
    printf("# %s state products vs the oracle ones: worst rel L2 %.2e (tol 1e-5)\n", fast->name,
           worst);
}

int main(void) {
    init_backends();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(local_forward_of_both_backends_matches_float64_definition),
        cmocka_unit_test(local_backward_of_both_backends_matches_float64_gradients),
        cmocka_unit_test(local_backward_matches_finite_differences_of_the_loss),
        cmocka_unit_test(segments_with_decayed_states_rebuild_the_whole_sequence),
        cmocka_unit_test(noncausal_attention_is_q_times_the_state_forward_and_backward),
        cmocka_unit_test(alibi_decays_follow_the_power_of_two_slopes),
        cmocka_unit_test(combine_skips_negative_exponents_and_decays_per_state_head),
        cmocka_unit_test(table_state_products_match_the_oracle_ones),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
