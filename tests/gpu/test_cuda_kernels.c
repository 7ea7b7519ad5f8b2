/* test_cuda_kernels.c: the CUDA softmax-attention kernels against the scalar oracle, on
 * random inputs of awkward shapes: GQA and MQA, head dims 1, 17, 64, 96, 128, 256, query
 * and key counts that fill no tile, causal and not (with queries that see no key of the
 * block), strided views of some heads of wider tensors. Each case runs
 *   float32, through the kernel table (spar_kernels_cuda: host-staged), tolerance 1e-5;
 *   bfloat16, through the device launchers (cuda_kernels.h; tensor cores forward for
 *   head_dim <= 128), against the oracle on the same bf16-rounded inputs, tolerance 1e-2.
 * Forward: o and lse merged into a running partial; backward: dq, dk, dv accumulated onto
 * nonzero gradients with the lse and delta of an oracle forward pass; delta on the device
 * against spar_softmax_bwd_delta. Relative L2 error; the worst elements are printed on
 * failure. Without a usable GPU it exits 77 and says why (ctest: skipped).
 */
#include "gpu_check.h" // defines: random data, bf16 rounding, upload, compare, gpu_or_skip

#ifndef SPAR_HAVE_CUDA
int main(void) {
    printf("skip: no CUDA device: this build has no CUDA (configured without nvcc, or "
           "SPAR_WITH_CUDA=OFF)\n");
    return 77;
}
#else

typedef struct attn_case {
    int H, G, d;
    int64_t nq, nk;
    bool causal;
    int extra; /* heads of the wider rows the views sit in */
} attn_case;

/* Inputs of one case; bf16 rounds q, k, v, dout so that the oracle sees what the device
 * reads. Queries at 3i+1, keys at 2j+3: with causal the first query sees no key. */
typedef struct attn_data {
    int64_t sq, skv, sl;
    size_t fq, fk, fl;
    float *q, *k, *v, *dout;
    int64_t *qp, *kp;
    spar_attn_dims dims;
    char name[96];
} attn_data;

static int data_init(attn_data *t, const attn_case *c, bool bf16) {
    uint64_t seed = (uint64_t)(c->H * 131 + c->d * 7 + c->nq * 3 + c->nk + bf16);
    t->sq = (int64_t)(c->H + c->extra) * c->d, t->skv = (int64_t)(c->G + c->extra) * c->d;
    t->sl = c->H + c->extra;
    t->fq = (size_t)(c->nq * t->sq), t->fk = (size_t)(c->nk * t->skv),
    t->fl = (size_t)(c->nq * t->sl);
    t->q = random_floats(t->fq, &seed, 2.0f), t->dout = random_floats(t->fq, &seed, 1.0f);
    t->k = random_floats(t->fk, &seed, 2.0f), t->v = random_floats(t->fk, &seed, 1.0f);
    t->qp = malloc(sizeof(int64_t) * (size_t)c->nq),
    t->kp = malloc(sizeof(int64_t) * (size_t)c->nk);
    if (!t->q || !t->dout || !t->k || !t->v || !t->qp || !t->kp) return 1;
    for (int64_t i = 0; i < c->nq; i++)
        t->qp[i] = 3 * i + 1;
    for (int64_t j = 0; j < c->nk; j++)
        t->kp[j] = 2 * j + 3;
    if (bf16) {
        round_bf16(t->q, t->fq), round_bf16(t->dout, t->fq);
        round_bf16(t->k, t->fk), round_bf16(t->v, t->fk);
    }
    t->dims = (spar_attn_dims){c->H, c->G, c->d, (float)(1.0 / sqrt((double)c->d))};
    snprintf(t->name, sizeof t->name, "%s H=%d G=%d d=%d nq=%lld nk=%lld causal=%d view=%d",
             bf16 ? "bf16" : "f32 ", c->H, c->G, c->d, (long long)c->nq, (long long)c->nk,
             c->causal, c->extra);
    return 0;
}

static void data_free(attn_data *t) {
    free(t->q), free(t->k), free(t->v), free(t->dout), free(t->qp), free(t->kp);
}

/* The device tensors of a case: every pointer of the two blocks, freed together. */
typedef struct device_blocks {
    spar_cuda_qblock q;
    spar_cuda_kvblock kv;
    void *owned[12];
    int count;
} device_blocks;

static void *own(device_blocks *b, void *p) {
    b->owned[b->count++] = p;
    return p;
}

static void device_free(device_blocks *b) {
    for (int i = 0; i < b->count; i++)
        spar_cuda_free(b->owned[i]);
}

/* Uploads the inputs; the fp32 tensors given (NULL: absent) go up as they are. */
static int device_init(device_blocks *b, const attn_case *c, const attn_data *t, float *o,
                       float *lse, float *delta, float *g[3]) {
    memset(b, 0, sizeof *b);
    b->q = (spar_cuda_qblock){.n = c->nq, .stride_q = t->sq, .stride_lse = t->sl};
    b->kv = (spar_cuda_kvblock){.n = c->nk, .stride_kv = t->skv};
    b->q.q = own(b, upload(t->q, t->fq, true)), b->q.dout = own(b, upload(t->dout, t->fq, true));
    b->kv.k = own(b, upload(t->k, t->fk, true)), b->kv.v = own(b, upload(t->v, t->fk, true));
    b->q.lse = own(b, upload(lse, t->fl, false));
    if (o) b->q.o = own(b, upload(o, t->fq, false));
    if (delta) b->q.delta = own(b, upload(delta, t->fl, false));
    if (g) {
        b->q.dq = own(b, upload(g[0], t->fq, false));
        b->kv.dk = own(b, upload(g[1], t->fk, false)),
        b->kv.dv = own(b, upload(g[2], t->fk, false));
    }
    if (c->causal) {
        b->q.pos = own(b, upload_bytes(t->qp, sizeof(int64_t) * (size_t)c->nq));
        b->kv.pos = own(b, upload_bytes(t->kp, sizeof(int64_t) * (size_t)c->nk));
    }
    for (int i = 0; i < b->count; i++)
        if (!b->owned[i]) return 1;
    return 0;
}

/* Forward of one case: [0] the oracle, [1] the GPU, from the same running partial. */
static int fwd_case(const attn_case *c, bool bf16) {
    attn_data t;
    float *o[2], *lse[2];
    int bad = data_init(&t, c, bf16);
    for (int b = 0; b < 2; b++) {
        uint64_t s2 = 99;
        o[b] = random_floats(t.fq, &s2, 1.0f), lse[b] = random_floats(t.fl, &s2, 1.0f);
        for (size_t i = 0; lse[b] && i < t.fl; i += 5)
            lse[b][i] = -INFINITY; /* empty partials */
        bad |= !o[b] || !lse[b];
    }
    if (bad) return 1;
    spar_qblock qb = {
        c->nq, c->causal ? t.qp : NULL, t.sq, t.sl, t.q, o[0], lse[0], NULL, NULL, NULL, false};
    spar_kvblock kb = {c->nk, c->causal ? t.kp : NULL, t.skv, t.k, t.v, NULL, NULL, false};
    bad |= spar_kernels_select("scalar")->softmax_fwd_block(&t.dims, c->causal, &qb, &kb) != 0;
    if (!bf16) {
        qb.o = o[1], qb.lse = lse[1];
        bad |= spar_kernels_cuda()->softmax_fwd_block(&t.dims, c->causal, &qb, &kb) != 0;
    } else {
        device_blocks dev;
        bad |= device_init(&dev, c, &t, o[1], lse[1], NULL, NULL);
        bad |= bad || spar_cuda_softmax_fwd(&t.dims, c->causal, SPAR_CUDA_BF16, &dev.q, &dev.kv,
                                            NULL) != 0;
        bad |= bad || spar_cuda_stream_sync(NULL) != 0;
        bad |= bad || download(o[1], dev.q.o, t.fq) || download(lse[1], dev.q.lse, t.fl);
        device_free(&dev);
    }
    double tol = bf16 ? TOL_BF16 : TOL_F32;
    if (bad)
        printf("FAIL %s forward: a kernel or copy failed\n", t.name);
    else
        bad = compare(t.name, "fwd o", o[1], o[0], t.fq, tol) |
              compare(t.name, "fwd lse", lse[1], lse[0], t.fl, tol);
    for (int b = 0; b < 2; b++)
        free(o[b]), free(lse[b]);
    data_free(&t);
    return bad;
}

/* The oracle's forward pass from nothing: the final o, lse and delta for the backward. */
static int oracle_forward(const attn_case *c, const attn_data *t, float *o, float *lse,
                          float *delta) {
    for (int64_t i = 0; i < c->nq; i++) {
        float *orow = o + i * t->sq, *lrow = lse + i * t->sl;
        spar_softmax_init_partial(1, c->H, c->d, orow, lrow);
    }
    spar_qblock qb = {c->nq, c->causal ? t->qp : NULL, t->sq, t->sl, t->q, o, lse, NULL, NULL, NULL,
                      false};
    spar_kvblock kb = {c->nk, c->causal ? t->kp : NULL, t->skv, t->k, t->v, NULL, NULL, false};
    if (spar_kernels_select("scalar")->softmax_fwd_block(&t->dims, c->causal, &qb, &kb) != 0)
        return 1;
    for (int64_t i = 0; i < c->nq; i++) /* row by row: the views are strided */
        spar_softmax_bwd_delta(1, c->H, c->d, o + i * t->sq, t->dout + i * t->sq,
                               delta + i * t->sl);
    return 0;
}

/* delta on the device (dense rows, so only for cases without views) against the oracle's. */
static int delta_case(const attn_case *c, const attn_data *t, const float *o, const float *ref,
                      bool bf16) {
    float *got = malloc(sizeof(float) * t->fl);
    void *d_o = upload(o, t->fq, false), *d_do = upload(t->dout, t->fq, bf16), *d_delta = NULL;
    int bad = !got || !d_o || !d_do || spar_cuda_malloc(&d_delta, sizeof(float) * t->fl) != 0;
    bad =
        bad || spar_cuda_softmax_bwd_delta(c->nq, c->H, c->d, bf16 ? SPAR_CUDA_BF16 : SPAR_CUDA_F32,
                                           d_o, d_do, d_delta, NULL) != 0;
    bad = bad || download(got, d_delta, t->fl);
    bad = bad ? (printf("FAIL %s delta: a kernel or copy failed\n", t->name), 1)
              : compare(t->name, "delta", got, ref, t->fl, bf16 ? TOL_BF16 : TOL_F32);
    spar_cuda_free(d_o), spar_cuda_free(d_do), spar_cuda_free(d_delta), free(got);
    return bad;
}

/* Backward of one case: [0] the oracle, [1] the GPU, onto the same nonzero gradients. */
static int bwd_case(const attn_case *c, bool bf16) {
    attn_data t;
    int bad = data_init(&t, c, bf16);
    float *o = calloc(t.fq, sizeof(float)), *lse = calloc(t.fl, sizeof(float));
    float *delta = calloc(t.fl, sizeof(float)), *g[2][3];
    size_t sizes[3] = {t.fq, t.fk, t.fk};
    for (int b = 0; b < 2; b++)
        for (int x = 0; x < 3; x++) {
            g[b][x] = malloc(sizeof(float) * sizes[x]);
            for (size_t i = 0; g[b][x] && i < sizes[x]; i++)
                g[b][x][i] = 0.01f * (float)(i % 7);
            bad |= !g[b][x];
        }
    if (bad || !o || !lse || !delta || oracle_forward(c, &t, o, lse, delta)) return 1;
    spar_qblock qb = {
        c->nq, c->causal ? t.qp : NULL, t.sq, t.sl, t.q, o, lse, t.dout, delta, g[0][0], false};
    spar_kvblock kb = {c->nk, c->causal ? t.kp : NULL, t.skv, t.k, t.v, g[0][1], g[0][2], false};
    bad |= spar_kernels_select("scalar")->softmax_bwd_block(&t.dims, c->causal, &qb, &kb) != 0;
    if (!bf16) {
        qb.dq = g[1][0], kb.dk = g[1][1], kb.dv = g[1][2];
        bad |= spar_kernels_cuda()->softmax_bwd_block(&t.dims, c->causal, &qb, &kb) != 0;
    } else {
        device_blocks dev;
        bad |= device_init(&dev, c, &t, NULL, lse, delta, g[1]);
        bad |= bad || spar_cuda_softmax_bwd(&t.dims, c->causal, SPAR_CUDA_BF16, &dev.q, &dev.kv,
                                            NULL) != 0;
        bad |= bad || spar_cuda_stream_sync(NULL) != 0;
        bad |= bad || download(g[1][0], dev.q.dq, t.fq) || download(g[1][1], dev.kv.dk, t.fk) ||
               download(g[1][2], dev.kv.dv, t.fk);
        device_free(&dev);
    }
    double tol = bf16 ? TOL_BF16 : TOL_F32;
    if (bad)
        printf("FAIL %s backward: a kernel or copy failed\n", t.name);
    else
        bad = compare(t.name, "bwd dq", g[1][0], g[0][0], t.fq, tol) |
              compare(t.name, "bwd dk", g[1][1], g[0][1], t.fk, tol) |
              compare(t.name, "bwd dv", g[1][2], g[0][2], t.fk, tol);
    if (!bad && c->extra == 0) bad = delta_case(c, &t, o, delta, bf16);
    for (int b = 0; b < 2; b++)
        for (int x = 0; x < 3; x++)
            free(g[b][x]);
    free(o), free(lse), free(delta);
    data_free(&t);
    return bad;
}

int main(void) {
    int skip = gpu_or_skip();
    if (skip) return skip;
    static const attn_case cases[] = {
        {4, 4, 64, 100, 77, false, 0},
        {6, 2, 128, 65, 129, true, 1},
        {4, 1, 17, 3, 200, true, 0},
        {8, 2, 256, 130, 33, false, 2},
        {2, 2, 96, 64, 64, true, 0},
        {4, 2, 128, 200, 150, true, 0},
        {4, 4, 1, 5, 9, false, 0},
        {3, 3, 40, 70, 90, true, 0},
        {2, 1, 256, 40, 70, true, 0},
        {2, 1, 192, 50, 60, true, 0}, /* fp32: 48 KiB of dynamic shared memory, at the edge */
    };
    int failed = 0, count = (int)(sizeof cases / sizeof cases[0]);
    for (int i = 0; i < count; i++)
        for (int bf16 = 0; bf16 < 2; bf16++)
            failed += fwd_case(&cases[i], bf16) + bwd_case(&cases[i], bf16);
    printf("%s\n", failed ? "FAILED" : "all passed");
    return failed ? 1 : 0;
}
#endif
