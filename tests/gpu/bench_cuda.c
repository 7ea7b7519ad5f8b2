/* bench_cuda.c: times spar's device-resident CUDA kernels on random data and prints one
 * JSON line per figure (tests/gpu/bench_gpu.py runs it beside PyTorch and adds the ratios).
 *
 *   bench_cuda softmax N H D CAUSAL [f32|bf16] [REPS]   forward and backward of one block
 *                                                     of N queries against N keys
 *   bench_cuda linear N H D [f32|bf16] [REPS]          causal linear attention forward
 *                                                     with ALiBi decays in one segment
 *
 * FLOPs follow the FlashAttention benchmarks: forward 4 N^2 H D (half of it causal),
 * backward 2.5 times the forward. Times are the median of REPS runs (default 10) after
 * two warm-up runs, measured with CUDA events on one stream. Exit 77 without a GPU.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda/cuda_kernels.h" // defines: spar_cuda_* launchers, events, device name

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* A device tensor of n random values in [-1, 1) (bf16 or f32); NULL on failure. */
static void *random_device(size_t n, spar_cuda_dtype dtype, uint64_t seed) {
    size_t each = dtype == SPAR_CUDA_BF16 ? 2 : 4;
    unsigned char *h = malloc(n * each);
    void *dev = NULL;
    if (!h) return NULL;
    for (size_t i = 0; i < n; i++) {
        seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
        float f = (float)((double)(seed >> 11) / 9007199254740992.0 * 2.0 - 1.0);
        uint32_t u;
        memcpy(&u, &f, 4);
        if (each == 2) {
            uint16_t b = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
            memcpy(h + 2 * i, &b, 2);
        } else {
            memcpy(h + 4 * i, &u, 4);
        }
    }
    if (spar_cuda_malloc(&dev, n * each) != 0 || spar_cuda_copy(dev, h, n * each) != 0) {
        spar_cuda_free(dev);
        dev = NULL;
    }
    free(h);
    return dev;
}

typedef int (*bench_fn)(void *ctx, spar_cuda_stream stream);

/* Median milliseconds of fn over reps runs after two warm-ups; negative on failure. */
static double time_ms(bench_fn fn, void *ctx, spar_cuda_stream stream, int reps) {
    spar_cuda_event a, b;
    float *ms = malloc(sizeof(float) * (size_t)reps);
    double median = -1.0;
    if (!ms || spar_cuda_event_create(&a, true) || spar_cuda_event_create(&b, true)) return -1.0;
    int bad = fn(ctx, stream) || fn(ctx, stream) || spar_cuda_stream_sync(stream);
    for (int r = 0; !bad && r < reps; r++) {
        bad = spar_cuda_event_record(a, stream) || fn(ctx, stream) ||
              spar_cuda_event_record(b, stream) || spar_cuda_event_sync(b) ||
              spar_cuda_event_elapsed_ms(a, b, &ms[r]);
    }
    if (!bad) {
        qsort(ms, (size_t)reps, sizeof(float), cmp_float);
        median = ms[reps / 2];
    }
    spar_cuda_event_destroy(a), spar_cuda_event_destroy(b), free(ms);
    return median;
}

typedef struct softmax_ctx {
    spar_attn_dims dims;
    bool causal;
    spar_cuda_dtype dtype;
    spar_cuda_qblock q;
    spar_cuda_kvblock kv;
} softmax_ctx;

static int run_fwd(void *p, spar_cuda_stream s) {
    softmax_ctx *c = p;
    return spar_cuda_softmax_fwd(&c->dims, c->causal, c->dtype, &c->q, &c->kv, s);
}

static int run_bwd(void *p, spar_cuda_stream s) {
    softmax_ctx *c = p;
    return spar_cuda_softmax_bwd(&c->dims, c->causal, c->dtype, &c->q, &c->kv, s);
}

static void header(char *out, size_t len) {
    char name[128] = "?";
    int sms = 0, driver = 0;
    spar_cuda_device_name(name, sizeof name, &sms, &driver);
    snprintf(out, len, "\"gpu\":\"%s\",\"sms\":%d,\"cuda_driver\":%d", name, sms, driver);
}

static int bench_softmax(int64_t n, int heads, int d, bool causal, spar_cuda_dtype dtype,
                         int reps) {
    size_t fq = (size_t)n * (size_t)heads * (size_t)d, fl = (size_t)n * (size_t)heads;
    softmax_ctx c = {{heads, heads, d, (float)(1.0 / sqrt((double)d))}, causal, dtype, {0}, {0}};
    int64_t *pos = malloc(sizeof(int64_t) * (size_t)n);
    void *qpos = NULL, *o, *lse, *delta, *dq, *dk, *dv;
    if (!pos) return 1;
    for (int64_t i = 0; i < n; i++)
        pos[i] = i;
    int bad = spar_cuda_malloc(&qpos, sizeof(int64_t) * (size_t)n) ||
              spar_cuda_copy(qpos, pos, sizeof(int64_t) * (size_t)n);
    bad = bad || spar_cuda_malloc(&o, 4 * fq) || spar_cuda_malloc(&lse, 4 * fl) ||
          spar_cuda_malloc(&delta, 4 * fl) || spar_cuda_malloc(&dq, 4 * fq) ||
          spar_cuda_malloc(&dk, 4 * fq) || spar_cuda_malloc(&dv, 4 * fq);
    if (bad) return 1;
    c.q = (spar_cuda_qblock){n,     causal ? qpos : NULL,        (int64_t)heads * d,
                             heads, random_device(fq, dtype, 1), o,
                             lse,   random_device(fq, dtype, 2), delta,
                             dq};
    c.kv = (spar_cuda_kvblock){n,
                               causal ? qpos : NULL,
                               (int64_t)heads * d,
                               random_device(fq, dtype, 3),
                               random_device(fq, dtype, 4),
                               dk,
                               dv};
    if (!c.q.q || !c.q.dout || !c.kv.k || !c.kv.v) return 1;
    /* a real lse and delta for the backward: one forward from the empty partial */
    float *init = malloc(4 * fl);
    for (size_t i = 0; init && i < fl; i++)
        init[i] = -INFINITY;
    bad = !init || spar_cuda_memset(o, 0, 4 * fq, NULL) || spar_cuda_copy(lse, init, 4 * fl) ||
          run_fwd(&c, NULL) ||
          spar_cuda_softmax_bwd_delta(n, heads, d, dtype, o, c.q.dout, delta, NULL) ||
          spar_cuda_memset(dq, 0, 4 * fq, NULL) || spar_cuda_memset(dk, 0, 4 * fq, NULL) ||
          spar_cuda_memset(dv, 0, 4 * fq, NULL) || spar_cuda_stream_sync(NULL);
    free(init), free(pos);
    double fwd = bad ? -1 : time_ms(run_fwd, &c, NULL, reps);
    double bwd = bad ? -1 : time_ms(run_bwd, &c, NULL, reps);
    if (fwd < 0 || bwd < 0) return 1;
    double flops = 4.0 * (double)n * (double)n * heads * d * (causal ? 0.5 : 1.0);
    char hw[256];
    header(hw, sizeof hw);
    const char *dt = dtype == SPAR_CUDA_BF16 ? "bf16" : "f32";
    printf("{\"bench\":\"spar_cuda\",\"kind\":\"softmax_fwd\",\"dtype\":\"%s\",\"n\":%lld,"
           "\"heads\":%d,\"head_dim\":%d,\"causal\":%s,\"ms\":%.4f,\"tflops\":%.3f,%s}\n",
           dt, (long long)n, heads, d, causal ? "true" : "false", fwd, flops / fwd / 1e9, hw);
    printf("{\"bench\":\"spar_cuda\",\"kind\":\"softmax_bwd\",\"dtype\":\"%s\",\"n\":%lld,"
           "\"heads\":%d,\"head_dim\":%d,\"causal\":%s,\"ms\":%.4f,\"tflops\":%.3f,%s}\n",
           dt, (long long)n, heads, d, causal ? "true" : "false", bwd, 2.5 * flops / bwd / 1e9, hw);
    return 0;
}

typedef struct linear_ctx {
    spar_linear_dims dims;
    spar_cuda_dtype dtype;
    int64_t n;
    void *q, *k, *v;
    float *o;
} linear_ctx;

static int run_linear(void *p, spar_cuda_stream s) {
    linear_ctx *c = p;
    return spar_cuda_linear_fwd_local(&c->dims, c->dtype, c->n, c->q, c->k, c->v, c->o, s);
}

static int bench_linear(int64_t n, int heads, int d, spar_cuda_dtype dtype, int reps) {
    size_t fq = (size_t)n * (size_t)heads * (size_t)d;
    double *decay = malloc(sizeof(double) * (size_t)heads);
    linear_ctx c = {{heads, heads, d, heads, decay}, dtype, n, NULL, NULL, NULL, NULL};
    if (!decay) return 1;
    spar_alibi_decay(heads, decay);
    c.q = random_device(fq, dtype, 5), c.k = random_device(fq, dtype, 6);
    c.v = random_device(fq, dtype, 7);
    if (!c.q || !c.k || !c.v || spar_cuda_malloc((void **)&c.o, 4 * fq)) return 1;
    double ms = time_ms(run_linear, &c, NULL, reps);
    if (ms < 0) return 1;
    char hw[256];
    header(hw, sizeof hw);
    printf("{\"bench\":\"spar_cuda\",\"kind\":\"linear_fwd\",\"dtype\":\"%s\",\"n\":%lld,"
           "\"heads\":%d,\"head_dim\":%d,\"causal\":true,\"ms\":%.4f,\"ns_per_token\":%.3f,%s}\n",
           dtype == SPAR_CUDA_BF16 ? "bf16" : "f32", (long long)n, heads, d, ms,
           ms * 1e6 / (double)n, hw);
    free(decay);
    return 0;
}

int main(int argc, char **argv) {
    char why[256] = "";
    if (spar_kernels_cuda_devices(why, sizeof why) == 0) {
        printf("skip: no CUDA device: %s\n", why);
        return 77;
    }
    bool softmax = argc >= 6 && strcmp(argv[1], "softmax") == 0;
    bool linear = argc >= 5 && strcmp(argv[1], "linear") == 0;
    if (!softmax && !linear) {
        fprintf(stderr, "usage: bench_cuda softmax N H D CAUSAL [f32|bf16] [REPS]\n"
                        "       bench_cuda linear N H D [f32|bf16] [REPS]\n");
        return 2;
    }
    int at = softmax ? 6 : 5;
    int64_t n = atoll(argv[2]);
    int heads = atoi(argv[3]), d = atoi(argv[4]);
    spar_cuda_dtype dtype =
        argc > at && strcmp(argv[at], "f32") == 0 ? SPAR_CUDA_F32 : SPAR_CUDA_BF16;
    int reps = argc > at + 1 ? atoi(argv[at + 1]) : 10;
    if (n < 1 || heads < 1 || d < 1 || reps < 1) {
        fprintf(stderr, "bench_cuda: N, H, D and REPS must be positive\n");
        return 2;
    }
    int rc = softmax ? bench_softmax(n, heads, d, atoi(argv[5]) != 0, dtype, reps)
                     : bench_linear(n, heads, d, dtype, reps);
    if (rc) fprintf(stderr, "bench_cuda: failed (see the CUDA error above)\n");
    return rc;
}
