/* bench.c: `spar bench`: every point of an experiment's sweep grid, measured in one job.
 *
 * Per point: bench.warmup unmeasured runs, then bench.repeats measured ones (median,
 * min and max of the slowest rank's time per pass), one more with kernels that do no
 * arithmetic (the method's communication alone), and OpenBLAS sgemm on the same threads
 * at the shape of the kernels' own block products, so that efficiency is a ratio taken
 * on the same noisy machine at the same moment. Rank 0 prints a table and appends one
 * JSON line per point to output.results.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "launcher.h"

typedef struct stats {
    double median, min, max;
} stats;

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static stats summarize(double *x, int n) {
    qsort(x, (size_t)n, sizeof *x, cmp_double);
    double med = n % 2 ? x[n / 2] : 0.5 * (x[n / 2 - 1] + x[n / 2]);
    return (stats){med, x[0], x[n - 1]};
}

/* What one point measured (on every rank; per-rank arrays on rank 0). */
typedef struct point {
    stats time[2];       /* fwd, bwd: slowest rank per repeat */
    double flops[2];     /* all ranks */
    double compute[2];   /* slowest rank's kernel time, last repeat */
    double wait[2];      /* slowest rank's blocked time, last repeat */
    double comm_only[2]; /* the pass with no-op kernels */
    double kernel_gflops[2], sgemm_gflops, ratio[2];
    double bytes[2]; /* largest of any rank */
    double peak_mib; /* largest of any rank */
} point;

static double max_over_ranks(spar_comm *comm, double x) {
    spar_comm_allreduce_max_double(comm, &x);
    return x;
}

static double sum_over_ranks(spar_comm *comm, double x) {
    spar_comm_allreduce_sum_double(comm, &x);
    return x;
}

/* Runs the passes `times` times; with `times_out`, records the slowest rank's seconds. */
static int repeat(spar_comm *comm, spar_experiment *x, int times, double *times_out[2],
                  spar_metrics last[2]) {
    for (int r = 0; r < times; r++) {
        for (int pass = 0; pass < (x->backward ? 2 : 1); pass++) {
            SPAR_TRY(spar__run_pass(comm, x->method, &x->prob, &x->t, pass == 1, &last[pass]));
            if (times_out) times_out[pass][r] = max_over_ranks(comm, last[pass].seconds);
        }
    }
    return SPAR_OK;
}

/* sgemm at the kernels' own shape: softmax, a query block against a tile of keys (inner
 * size d); linear, a block's masked product times its values (B x B by B x d). */
static double sgemm_yardstick(const spar_experiment *x) {
    int d = x->prob.dims.head_dim, qb = (int)(x->prob.query_block > 0 ? x->prob.query_block : 256);
    if (x->prob.type == SPAR_ATTN_LINEAR)
        return spar_kernels_sgemm_gflops(SPAR_LINEAR_BLOCK, d, SPAR_LINEAR_BLOCK, 0.3);
    return spar_kernels_sgemm_gflops(qb, 256, d, 0.3);
}

static int measure(spar_comm *comm, spar_experiment *x, const spar_config *cfg, point *pt) {
    int warmup = (int)cfg->v[SPAR_KEY_BENCH_WARMUP].i, reps = (int)cfg->v[SPAR_KEY_BENCH_REPEATS].i;
    double *times[2] = {calloc((size_t)reps, sizeof(double)), calloc((size_t)reps, sizeof(double))};
    spar_metrics last[2] = {{0}}, none[2] = {{0}};
    int rc = times[0] && times[1] ? SPAR_OK : SPAR_ENOMEM;
    x->prob.progress = NULL;
    if (rc == 0) rc = repeat(comm, x, warmup, NULL, last);
    if (rc == 0) rc = repeat(comm, x, reps, times, last);
    const spar_kernels *real = x->prob.kernels;
    x->prob.kernels = &spar_kernels_none;
    if (rc == 0) rc = repeat(comm, x, 1, NULL, none);
    x->prob.kernels = real;
    pt->sgemm_gflops = rc == 0 ? sum_over_ranks(comm, sgemm_yardstick(x)) : 0.0;
    for (int pass = 0; rc == 0 && pass < (x->backward ? 2 : 1); pass++) {
        pt->time[pass] = summarize(times[pass], reps);
        pt->flops[pass] = sum_over_ranks(comm, last[pass].flops);
        pt->compute[pass] = max_over_ranks(comm, last[pass].compute_seconds);
        pt->wait[pass] = max_over_ranks(comm, last[pass].wait_seconds);
        pt->comm_only[pass] = max_over_ranks(comm, none[pass].seconds);
        pt->bytes[pass] = max_over_ranks(comm, (double)last[pass].bytes_sent);
        double mine = last[pass].compute_seconds > 0
                          ? last[pass].flops / last[pass].compute_seconds / 1e9
                          : 0;
        pt->kernel_gflops[pass] = sum_over_ranks(comm, mine);
        pt->ratio[pass] = pt->sgemm_gflops > 0 ? pt->kernel_gflops[pass] / pt->sgemm_gflops : 0;
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    pt->peak_mib = max_over_ranks(comm, (double)ru.ru_maxrss / 1024.0);
    free(times[0]), free(times[1]);
    return rc;
}

/* Fraction of the communication that compute hid: 1 - (time blocked) / (time the same
 * transfers take alone). */
static double hidden(const point *pt, int pass) {
    if (pt->comm_only[pass] <= 1e-9) return 1.0;
    double f = 1.0 - pt->wait[pass] / pt->comm_only[pass];
    return f < 0 ? 0 : f > 1 ? 1 : f;
}

static void print_header(void) {
    printf("# %-9s %-7s %6s %3s %8s %3s %3s %4s %3s %4s %10s %10s %8s %6s %8s %6s %9s %6s %9s\n",
           "method", "type", "causal", "P", "N", "H", "G", "d", "thr", "pass", "time_ms",
           "spread_ms", "GFLOP/s", "x_sgemm", "sgemm", "hidden", "MiB/rank", "t/comp", "peak_MiB");
}

static void print_row(const spar_config *c, int p, const point *pt, int pass) {
    printf("  %-9s %-7s %6s %3d %8lld %3lld %3lld %4lld %3lld %4s %10.2f %10.2f %8.2f %6.3f %8.1f "
           "%6.2f %9.3f %6.3f %9.1f\n",
           c->v[SPAR_KEY_PAR_METHOD].s, c->v[SPAR_KEY_ATTN_TYPE].s,
           c->v[SPAR_KEY_ATTN_CAUSAL].b ? "true" : "false", p,
           (long long)c->v[SPAR_KEY_SEQ_LENGTH].i, (long long)c->v[SPAR_KEY_ATTN_HEADS].i,
           (long long)c->v[SPAR_KEY_ATTN_KV_HEADS].i, (long long)c->v[SPAR_KEY_ATTN_HEAD_DIM].i,
           (long long)c->v[SPAR_KEY_RUN_THREADS].i, pass ? "bwd" : "fwd",
           pt->time[pass].median * 1e3, (pt->time[pass].max - pt->time[pass].min) * 1e3,
           pt->time[pass].median > 0 ? pt->flops[pass] / pt->time[pass].median / 1e9 : 0,
           pt->ratio[pass], pt->sgemm_gflops, hidden(pt, pass), pt->bytes[pass] / 1048576.0,
           pt->compute[pass] > 0 ? pt->time[pass].median / pt->compute[pass] : 0, pt->peak_mib);
    fflush(stdout);
}

static void json_pass(FILE *f, const char *name, const point *pt, int pass, bool ran) {
    if (!ran) {
        fprintf(f, ",\"%s\":null", name);
        return;
    }
    const stats *t = &pt->time[pass];
    fprintf(f,
            ",\"%s\":{\"seconds_median\":%.9g,\"seconds_min\":%.9g,\"seconds_max\":%.9g,"
            "\"gflops_per_s\":%.9g,\"kernel_gflops_per_s\":%.9g,\"ratio_to_sgemm\":%.6g,"
            "\"compute_seconds\":%.9g,\"wait_seconds\":%.9g,\"comm_only_seconds\":%.9g,"
            "\"hidden_fraction\":%.6g,\"bytes_sent_per_rank_max\":%.0f}",
            name, t->median, t->min, t->max, t->median > 0 ? pt->flops[pass] / t->median / 1e9 : 0,
            pt->kernel_gflops[pass], pt->ratio[pass], pt->compute[pass], pt->wait[pass],
            pt->comm_only[pass], hidden(pt, pass), pt->bytes[pass]);
}

/* Rank 0: the point's record, one JSON line with the settings of the run record. */
static int append_point(const spar_config *cfg, spar_comm *comm, const point *pt,
                        const char *hosts) {
    const char *path = cfg->v[SPAR_KEY_OUT_RESULTS].s;
    if (!*path) return SPAR_OK;
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (!f) return SPAR_ENOMEM;
    fprintf(f,
            "{\"record\":\"bench\",\"ranks\":%d,\"sgemm_gflops_per_s\":%.9g,\"peak_mib_max\":%.6g",
            spar_comm_size(comm), pt->sgemm_gflops, pt->peak_mib);
    json_pass(f, "forward", pt, 0, true);
    json_pass(f, "backward", pt, 1, cfg->v[SPAR_KEY_RUN_BACKWARD].b);
    fputc(',', f);
    spar__json_common(f, cfg, spar_comm_size(comm), hosts, spar_comm_library(comm),
                      spar_comm_transport(comm));
    fputs("}\n", f);
    fclose(f);
    int rc = spar__append_line(path, buf, len);
    free(buf);
    return rc;
}

/* Every rank: one point of the grid, its plan already in cfg. */
int spar__bench_point(spar_comm *comm, const spar_config *cfg, int index, int count) {
    spar_experiment x;
    point pt;
    memset(&pt, 0, sizeof pt);
    int rc = spar__experiment_setup(&x, comm, cfg);
    if (rc != 0) return rc;
    static bool header_printed; /* the first point measured (earlier ones may be skipped) */
    if (!header_printed && spar_comm_rank(comm) == 0) print_header();
    header_printed = true;
    spar_print0("# point %d/%d: measuring\n", index + 1, count);
    rc = measure(comm, &x, cfg, &pt);
    if (rc != 0) {
        spar_log_error("benchmark point %d failed (%s); stopping every rank", index + 1,
                       spar_strerror(rc));
        spar_comm_abort(comm, SPAR_EXIT_FAILURE);
    }
    char host[64], *hosts = calloc((size_t)spar_comm_size(comm), 64);
    snprintf(host, sizeof host, "%s", spar_comm_host(comm));
    if (!hosts || spar_comm_gather(comm, host, sizeof host, hosts, 0) != 0)
        spar_comm_abort(comm, SPAR_EXIT_FAILURE);
    if (spar_comm_rank(comm) == 0) {
        for (int pass = 0; pass < (x.backward ? 2 : 1); pass++)
            print_row(cfg, spar_comm_size(comm), &pt, pass);
        rc = append_point(cfg, comm, &pt, hosts);
    }
    free(hosts);
    spar__experiment_free(&x);
    return rc;
}
