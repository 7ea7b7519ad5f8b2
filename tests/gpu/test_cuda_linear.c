/* test_cuda_linear.c: the CUDA linear-attention kernels (decay; intra-segment forward and
 * backward, memory state, entering state, state gradients) against the scalar oracle of
 * kernels.h, on random inputs: GQA, head dims 17, 64, 96, 128, 256, segment lengths that
 * fill no chunk, ALiBi decays (a state per query head), one decay for all heads (a state
 * per kv head), no decay; causal and not for the state products. Each case runs
 *   float32 through the kernel table (spar_kernels_cuda: host-staged), tolerance 1e-5;
 *   bfloat16 through the device launchers (cuda_kernels.h) against the oracle on the same
 *   bf16-rounded inputs, tolerance 1e-2.
 * Outputs that the kernels overwrite start as garbage, those they accumulate into start
 * as the same random values on both sides. Without a usable GPU it exits 77 and says why.
 */
#include "gpu_check.h" // defines: random data, bf16 rounding, upload, compare, gpu_or_skip

#ifndef SPAR_HAVE_CUDA
int main(void) {
    printf("skip: no CUDA device: this build has no CUDA (configured without nvcc, or "
           "SPAR_WITH_CUDA=OFF)\n");
    return 77;
}
#else

typedef struct lin_case {
    int H, G, d;
    int64_t n;
    int decay_kind; /* 0 ALiBi, 1 one decay 0.97 for all heads, 2 none */
    bool per_kv_state;
} lin_case;

enum { O, DQ, DK, DV, M, DS, OS, SQ, SK, SV, OUTS }; /* the outputs compared */
static const char *const out_names[OUTS] = {"local o",  "local dq", "local dk", "local dv",
                                            "state m",  "dstate",   "state o",  "state dq",
                                            "state dk", "state dv"};
static const bool accumulates[OUTS] = {false, false, false, false, false,
                                       false, true,  true,  true,  true};

typedef struct lin_data {
    spar_linear_dims dims;
    double decay[64];
    int64_t n;
    size_t fq, fk, fs, sizes[OUTS];
    float *q, *k, *v, *dout, *s, *dkv, *init[OUTS];
    char name[96];
} lin_data;

static int data_init(lin_data *t, const lin_case *c, bool bf16) {
    uint64_t seed = (uint64_t)(c->H * 31 + c->d * 5 + c->n * 7 + c->decay_kind + bf16);
    int states = c->per_kv_state ? c->G : c->H;
    if (c->decay_kind == 0) spar_alibi_decay(c->H, t->decay);
    for (int h = 0; c->decay_kind && h < c->H; h++)
        t->decay[h] = c->decay_kind == 1 ? 0.97 : 1.0;
    t->dims = (spar_linear_dims){c->H, c->G, c->d, states, t->decay};
    t->n = c->n;
    t->fq = (size_t)(c->n * c->H * c->d), t->fk = (size_t)(c->n * c->G * c->d);
    t->fs = (size_t)states * (size_t)c->d * (size_t)c->d;
    size_t sizes[OUTS] = {t->fq, t->fq, t->fk, t->fk, t->fs, t->fs, t->fq, t->fq, t->fk, t->fk};
    memcpy(t->sizes, sizes, sizeof sizes);
    t->q = random_floats(t->fq, &seed, 1.0f), t->dout = random_floats(t->fq, &seed, 1.0f);
    t->k = random_floats(t->fk, &seed, 1.0f), t->v = random_floats(t->fk, &seed, 1.0f);
    t->s = random_floats(t->fs, &seed, 1.0f), t->dkv = random_floats(t->fs, &seed, 1.0f);
    int bad = !t->q || !t->dout || !t->k || !t->v || !t->s || !t->dkv;
    for (int x = 0; x < OUTS; x++) {
        t->init[x] = random_floats(sizes[x], &seed, 1.0f);
        for (size_t i = 0; t->init[x] && !accumulates[x] && i < sizes[x]; i++)
            t->init[x][i] = 7.0f; /* to be overwritten */
        bad |= !t->init[x];
    }
    if (bf16 && !bad) {
        round_bf16(t->q, t->fq), round_bf16(t->dout, t->fq);
        round_bf16(t->k, t->fk), round_bf16(t->v, t->fk);
    }
    snprintf(t->name, sizeof t->name, "%s H=%d G=%d states=%d d=%d n=%lld decay=%s",
             bf16 ? "bf16" : "f32 ", c->H, c->G, states, c->d, (long long)c->n,
             c->decay_kind == 0   ? "alibi"
             : c->decay_kind == 1 ? "0.97"
                                  : "none");
    return bad;
}

static void data_free(lin_data *t) {
    free(t->q), free(t->k), free(t->v), free(t->dout), free(t->s), free(t->dkv);
    for (int x = 0; x < OUTS; x++)
        free(t->init[x]);
}

/* Every product through a kernel table (the oracle or the host-staged CUDA one). */
static int run_table(const spar_kernels *kern, const lin_data *t, bool causal, float *r[OUTS]) {
    const spar_linear_dims *dm = &t->dims;
    int64_t n = t->n;
    int bad = 0;
    if (causal) {
        bad |= kern->linear_fwd_local(dm, n, t->q, t->k, t->v, r[O]) != 0;
        bad |= kern->linear_bwd_local(dm, n, t->q, t->k, t->v, t->dout, r[DQ], r[DK], r[DV]) != 0;
    }
    bad |= kern->linear_state(dm, causal, n, t->k, t->v, r[M]) != 0;
    bad |= kern->linear_dstate(dm, causal, n, t->q, t->dout, r[DS]) != 0;
    bad |= kern->linear_fwd_state(dm, causal, n, t->q, t->s, r[OS]) != 0;
    bad |= kern->linear_bwd_state(dm, causal, n, t->k, t->v, t->dout, t->s, t->dkv, r[SQ], r[SK],
                                  r[SV]) != 0;
    return bad;
}

/* Every product through the device launchers, bf16 inputs. */
static int run_device(const lin_data *t, bool causal, float *r[OUTS]) {
    const spar_linear_dims *dm = &t->dims;
    const spar_cuda_dtype bf = SPAR_CUDA_BF16;
    int64_t n = t->n;
    void *q = upload(t->q, t->fq, true), *k = upload(t->k, t->fk, true);
    void *v = upload(t->v, t->fk, true), *dout = upload(t->dout, t->fq, true);
    void *s = upload(t->s, t->fs, false), *dkv = upload(t->dkv, t->fs, false), *g[OUTS];
    int bad = !q || !k || !v || !dout || !s || !dkv;
    for (int x = 0; x < OUTS; x++)
        bad |= !(g[x] = upload(r[x], t->sizes[x], false));
    if (!bad && causal) {
        bad |= spar_cuda_linear_fwd_local(dm, bf, n, q, k, v, g[O], NULL) != 0;
        bad |= spar_cuda_linear_bwd_local(dm, bf, n, q, k, v, dout, g[DQ], g[DK], g[DV], NULL) != 0;
    }
    bad = bad || spar_cuda_linear_state(dm, causal, bf, n, k, v, g[M], NULL) != 0;
    bad = bad || spar_cuda_linear_dstate(dm, causal, bf, n, q, dout, g[DS], NULL) != 0;
    bad = bad || spar_cuda_linear_fwd_state(dm, causal, bf, n, q, s, g[OS], NULL) != 0;
    bad = bad || spar_cuda_linear_bwd_state(dm, causal, bf, n, k, v, dout, s, dkv, g[SQ], g[SK],
                                            g[SV], NULL) != 0;
    bad = bad || spar_cuda_stream_sync(NULL) != 0;
    for (int x = 0; x < OUTS; x++)
        if (!bad && (causal || x > DV)) bad |= download(r[x], g[x], t->sizes[x]);
    for (int x = 0; x < OUTS; x++)
        spar_cuda_free(g[x]);
    spar_cuda_free(q), spar_cuda_free(k), spar_cuda_free(v), spar_cuda_free(dout);
    spar_cuda_free(s), spar_cuda_free(dkv);
    return bad;
}

static int one(const lin_case *c, bool causal, bool bf16) {
    lin_data t;
    float *r[2][OUTS];
    int bad = data_init(&t, c, bf16);
    for (int b = 0; b < 2; b++)
        for (int x = 0; x < OUTS; x++) {
            r[b][x] = malloc(sizeof(float) * (t.sizes[x] ? t.sizes[x] : 1));
            if (r[b][x] && t.init[x]) memcpy(r[b][x], t.init[x], sizeof(float) * t.sizes[x]);
            bad |= !r[b][x];
        }
    if (bad) return 1;
    bad |= run_table(spar_kernels_select("scalar"), &t, causal, r[0]);
    bad |= bf16 ? run_device(&t, causal, r[1]) : run_table(spar_kernels_cuda(), &t, causal, r[1]);
    char name[128];
    snprintf(name, sizeof name, "%s causal=%d", t.name, causal);
    if (bad) printf("FAIL %s: a kernel or copy failed\n", name);
    for (int x = 0; !bad && x < OUTS; x++)
        if (causal || x > DV)
            bad |= compare(name, out_names[x], r[1][x], r[0][x], t.sizes[x],
                           bf16 ? TOL_BF16 : TOL_F32);
    for (int b = 0; b < 2; b++)
        for (int x = 0; x < OUTS; x++)
            free(r[b][x]);
    data_free(&t);
    return bad;
}

int main(void) {
    int skip = gpu_or_skip();
    if (skip) return skip;
    static const lin_case cases[] = {
        {4, 4, 64, 100, 0, false}, {6, 2, 128, 77, 0, false}, {4, 2, 17, 33, 1, true},
        {2, 1, 96, 130, 2, false}, {2, 2, 256, 65, 0, false}, {4, 1, 128, 200, 1, true},
        {3, 3, 40, 1, 0, false},
    };
    int failed = 0, count = (int)(sizeof cases / sizeof cases[0]);
    for (int i = 0; i < count; i++)
        for (int bf16 = 0; bf16 < 2; bf16++)
            for (int causal = 1; causal >= 0; causal--)
                failed += one(&cases[i], causal, bf16);
    printf("%s\n", failed ? "FAILED" : "all passed");
    return failed ? 1 : 0;
}
#endif
