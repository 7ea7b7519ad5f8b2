/* test_cuda_kernels.c: the CUDA softmax kernels against the scalar oracle, on random
 * inputs of awkward shapes (GQA, MQA, head dims 1..256 odd and even, causal and not,
 * query/key counts that fill no tile, strided views). Forward: o and lse merged into a
 * running partial; backward: dq, dk, dv accumulated onto nonzero gradients, with the lse
 * and delta of the forward pass. Relative L2 error <= 1e-5. Without a usable GPU it exits
 * 77 and says why (ctest: skipped).
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h" // defines: spar_kernels_cuda, spar_kernels_cuda_devices, spar_kernels_select

static float uniform(uint64_t *s) {
    *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
    return (float)((double)(*s >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

static double rel_l2(const float *a, const float *b, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        if (isinf(b[i]) && a[i] == b[i]) continue;
        num += ((double)a[i] - b[i]) * ((double)a[i] - b[i]), den += (double)b[i] * b[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* One case; extra: heads of the wider rows the views sit in. Returns 0 when it passes. */
static int one(int H, int G, int d, int64_t nq, int64_t nk, bool causal, int extra) {
    int64_t sq = (int64_t)(H + extra) * d, skv = (int64_t)(G + extra) * d, sl = H + extra;
    float *q = malloc(sizeof(float) * (size_t)(nq * sq)), *k = malloc(sizeof(float) * (size_t)(nk * skv));
    float *v = malloc(sizeof(float) * (size_t)(nk * skv));
    float *o[2], *lse[2];
    int64_t *qp = malloc(sizeof(int64_t) * (size_t)nq), *kp = malloc(sizeof(int64_t) * (size_t)nk);
    uint64_t seed = (uint64_t)(H * 131 + d * 7 + nq * 3 + nk);
    for (int64_t i = 0; i < nq * sq; i++) q[i] = uniform(&seed) * 2;
    for (int64_t i = 0; i < nk * skv; i++) k[i] = uniform(&seed) * 2, v[i] = uniform(&seed);
    for (int64_t i = 0; i < nq; i++) qp[i] = 3 * i + 1;
    for (int64_t j = 0; j < nk; j++) kp[j] = 2 * j;
    spar_attn_dims dims = {H, G, d, (float)(1.0 / sqrt((double)d))};
    for (int b = 0; b < 2; b++) { /* a running partial from an earlier block to merge into */
        o[b] = malloc(sizeof(float) * (size_t)(nq * sq)), lse[b] = malloc(sizeof(float) * (size_t)(nq * sl));
        uint64_t s2 = 99;
        for (int64_t i = 0; i < nq * sq; i++) o[b][i] = uniform(&s2);
        for (int64_t i = 0; i < nq * sl; i++) lse[b][i] = i % 5 == 0 ? -INFINITY : uniform(&s2);
        spar_qblock qb = {nq, causal ? qp : NULL, sq, sl, q, o[b], lse[b], NULL, NULL, NULL};
        spar_kvblock kb = {nk, causal ? kp : NULL, skv, k, v, NULL, NULL};
        const spar_kernels *kern = b ? spar_kernels_cuda() : spar_kernels_select("scalar");
        if (kern->softmax_fwd_block(&dims, causal, &qb, &kb) != 0) return 1;
    }
    double eo = rel_l2(o[1], o[0], nq * sq), el = rel_l2(lse[1], lse[0], nq * sl);
    int bad = !(eo <= 1e-5 && el <= 1e-5);
    printf("%s H=%d G=%d d=%d nq=%lld nk=%lld causal=%d: o %.2e lse %.2e\n", bad ? "FAIL" : "ok  ",
           H, G, d, (long long)nq, (long long)nk, causal, eo, el);
    free(q), free(k), free(v), free(qp), free(kp);
    for (int b = 0; b < 2; b++) free(o[b]), free(lse[b]);
    return bad;
}

/* Backward of one case: the lse and delta come from a scalar forward pass. */
static int one_bwd(int H, int G, int d, int64_t nq, int64_t nk, bool causal) {
    int64_t sq = (int64_t)H * d, skv = (int64_t)G * d;
    size_t fq = (size_t)(nq * sq), fk = (size_t)(nk * skv), fl = (size_t)(nq * H);
    float *q = malloc(sizeof(float) * fq), *k = malloc(sizeof(float) * fk);
    float *v = malloc(sizeof(float) * fk), *o = malloc(sizeof(float) * fq);
    float *lse = malloc(sizeof(float) * fl), *delta = malloc(sizeof(float) * fl);
    float *dout = malloc(sizeof(float) * fq), *g[2][3];
    int64_t *qp = malloc(sizeof(int64_t) * (size_t)nq), *kp = malloc(sizeof(int64_t) * (size_t)nk);
    uint64_t seed = (uint64_t)(H * 17 + d + nq * 5 + nk * 11);
    for (size_t i = 0; i < fq; i++) q[i] = uniform(&seed) * 2, dout[i] = uniform(&seed);
    for (size_t i = 0; i < fk; i++) k[i] = uniform(&seed) * 2, v[i] = uniform(&seed);
    for (int64_t i = 0; i < nq; i++) qp[i] = 2 * i + 1;
    for (int64_t j = 0; j < nk; j++) kp[j] = 2 * j;
    spar_attn_dims dims = {H, G, d, (float)(1.0 / sqrt((double)d))};
    const spar_kernels *scalar = spar_kernels_select("scalar");
    spar_softmax_init_partial(nq, H, d, o, lse);
    spar_qblock qf = {nq, causal ? qp : NULL, sq, H, q, o, lse, NULL, NULL, NULL};
    spar_kvblock kf = {nk, causal ? kp : NULL, skv, k, v, NULL, NULL};
    if (scalar->softmax_fwd_block(&dims, causal, &qf, &kf) != 0) return 1;
    spar_softmax_bwd_delta(nq, H, d, o, dout, delta);
    for (int b = 0; b < 2; b++) {
        size_t sizes[3] = {fq, fk, fk};
        for (int t = 0; t < 3; t++) {
            g[b][t] = malloc(sizeof(float) * sizes[t]);
            for (size_t i = 0; i < sizes[t]; i++) g[b][t][i] = 0.01f * (float)(i % 7);
        }
        spar_qblock qb = {nq, causal ? qp : NULL, sq, H, q, o, lse, dout, delta, g[b][0]};
        spar_kvblock kb = {nk, causal ? kp : NULL, skv, k, v, g[b][1], g[b][2]};
        const spar_kernels *kern = b ? spar_kernels_cuda() : scalar;
        if (kern->softmax_bwd_block(&dims, causal, &qb, &kb) != 0) return 1;
    }
    double e[3] = {rel_l2(g[1][0], g[0][0], (int64_t)fq), rel_l2(g[1][1], g[0][1], (int64_t)fk),
                   rel_l2(g[1][2], g[0][2], (int64_t)fk)};
    int bad = !(e[0] <= 1e-5 && e[1] <= 1e-5 && e[2] <= 1e-5);
    printf("%s bwd H=%d G=%d d=%d nq=%lld nk=%lld causal=%d: dq %.2e dk %.2e dv %.2e\n",
           bad ? "FAIL" : "ok  ", H, G, d, (long long)nq, (long long)nk, causal, e[0], e[1], e[2]);
    free(q), free(k), free(v), free(o), free(lse), free(delta), free(dout), free(qp), free(kp);
    for (int b = 0; b < 2; b++)
        for (int t = 0; t < 3; t++)
            free(g[b][t]);
    return bad;
}

int main(void) {
    char why[256] = "";
    if (spar_kernels_cuda_devices(why, sizeof why) == 0 || !spar_kernels_cuda()) {
        printf("skip: %s\n", *why ? why : "this build has no CUDA");
        return 77;
    }
    int failed = 0;
    failed += one(4, 4, 64, 100, 77, false, 0);
    failed += one(6, 2, 128, 65, 129, true, 1);
    failed += one(4, 1, 1, 3, 200, true, 0);
    failed += one(8, 2, 256, 130, 33, false, 2);
    failed += one(2, 2, 37, 64, 64, true, 0);
    failed += one_bwd(4, 4, 64, 70, 90, false);
    failed += one_bwd(6, 2, 33, 65, 40, true);
    failed += one_bwd(4, 1, 128, 17, 129, true);
    printf("%s\n", failed ? "FAILED" : "all passed");
    return failed ? 1 : 0;
}
