/* generate.c: `spar run` with run.mode=generate: greedy decoding of a batch with a
 * decoder model, on one rank (parallel.method=local) or offloaded (offload: the KV cache
 * and attention on the last parallel.attention_ranks ranks).
 *
 * Rank 0 reads or draws the prompts and sends them to every rank (attention ranks need
 * the lengths); compute ranks load the weights (attention ranks hold none). After the
 * run rank 0 prints a table, writes the tokens and logits, and appends a "generate"
 * record: tokens/s, time between tokens, bytes per token per layer next to the formula,
 * compute ranks' idle fraction, and the KV cache read rate and size per attention rank.
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "launcher.h"

/* Rank 0's prompts to every rank (status first, so that a bad file stops all). */
static int share_prompts(spar_comm *comm, const spar_config *cfg, spar_prompts *p) {
    int rc = spar_comm_rank(comm) == 0 ? spar__prompts_load(cfg, p) : SPAR_OK, worst = 0;
    SPAR_TRY(spar_comm_agree(comm, rc, &worst));
    if (worst != 0) return worst;
    int B = (int)cfg->v[SPAR_KEY_WORK_BATCH].i;
    if (spar_comm_rank(comm) != 0) {
        *p = (spar_prompts){.batch = B, .owns_rows = true};
        p->len = malloc(sizeof(int32_t) * (size_t)B);
        p->rows = calloc((size_t)B, sizeof(int32_t *));
        if (!p->len || !p->rows) return SPAR_ENOMEM; /* (a failed bcast would follow) */
    }
    SPAR_TRY(spar_comm_bcast(comm, p->len, sizeof(int32_t) * (size_t)B, 0));
    for (int b = 0; b < B; b++) {
        if (spar_comm_rank(comm) != 0 &&
            !(p->rows[b] = malloc(sizeof(int32_t) * (size_t)p->len[b])))
            return SPAR_ENOMEM;
        SPAR_TRY(spar_comm_bcast(comm, p->rows[b], sizeof(int32_t) * (size_t)p->len[b], 0));
    }
    return SPAR_OK;
}

static int write_npy(const char *path, const char *descr, int ndim, const int64_t *shape,
                     const void *data, size_t bytes) {
    char tmp[2100];
    snprintf(tmp, sizeof tmp, "%s.tmp-%d", path, (int)getpid());
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644), rc = SPAR_OK;
    if (fd < 0 || spar__npy_write_header_as(fd, descr, ndim, shape) < 0 ||
        write(fd, data, bytes) != (ssize_t)bytes)
        rc = spar_errorf(SPAR_EIO, "cannot write '%s': %s", path, strerror(errno));
    if (fd >= 0) close(fd);
    if (rc == 0 && rename(tmp, path) != 0)
        rc = spar_errorf(SPAR_EIO, "cannot rename '%s' to '%s': %s", tmp, path, strerror(errno));
    if (rc != 0) unlink(tmp);
    return rc;
}

/* What every rank measured, gathered on rank 0. */
typedef struct figures {
    double decode_bytes, header_bytes, idle_seconds, kv_read, kv_held, attend_seconds, triad_gbs;
    char host[64]; /* for the record's hosts, in rank order */
} figures;

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double percentile(double *x, int n, double q) {
    if (n <= 0) return NAN;
    qsort(x, (size_t)n, sizeof *x, cmp_double);
    int i = (int)ceil(q * n) - 1;
    return x[i < 0 ? 0 : i >= n ? n - 1 : i];
}

static void report(const spar_config *cfg, spar_comm *comm, const spar_generation *g,
                   const figures *all, const spar_model_dims *md) {
    int P = spar_comm_size(comm), B = (int)cfg->v[SPAR_KEY_WORK_BATCH].i;
    int G = (int)cfg->v[SPAR_KEY_WORK_GENERATE].i;
    bool offload = strcmp(cfg->v[SPAR_KEY_PAR_METHOD].s, "offload") == 0;
    int K = offload ? (int)cfg->v[SPAR_KEY_PAR_ATTN_RANKS].i : 0, C = offload ? P - K : 1;
    double bytes = 0, headers = 0, idle = 0, kv_read = 0, kv_held = 0, steps = (double)(G - 1);
    double busy_gbs = 0, fraction = INFINITY, triad = 0; /* the slowest attention rank's */
    for (int r = 0; r < P; r++) {
        const figures *f = &all[r];
        bytes += f->decode_bytes, headers += f->header_bytes;
        if (r < C) idle = fmax(idle, f->idle_seconds);
        kv_read = fmax(kv_read, f->kv_read), kv_held = fmax(kv_held, f->kv_held);
        double rate = f->attend_seconds > 0 ? f->kv_read / f->attend_seconds / 1e9 : 0;
        if (r >= C && f->triad_gbs > 0 && rate / f->triad_gbs < fraction)
            fraction = rate / f->triad_gbs, busy_gbs = rate, triad = f->triad_gbs;
    }
    if (!isfinite(fraction)) fraction = 0;
    double per_tok = steps > 0 ? (bytes - headers) / (B * steps * md->layers) : 0;
    double formula = offload ? spar_offload_bytes_per_token_layer(md, K) : 0;
    double *st = malloc(sizeof(double) * (size_t)(G > 1 ? G - 1 : 1));
    for (int i = 0; st && i < G - 1; i++)
        st[i] = g->step_seconds[i];
    double p50 = st ? percentile(st, G - 1, 0.5) : NAN,
           p99 = st ? percentile(st, G - 1, 0.99) : NAN;
    free(st);
    double tps = g->decode_seconds > 0 ? B * steps / g->decode_seconds : 0;
    const char *split = !offload ? "-" : md->kv_heads % K == 0 ? "heads" : "positions";
    printf(
        "# method  ranks compute attn  split        B gen layers  prefill_s   tok/s  step_p50_ms "
        "step_p99_ms  B/tok/layer  formula  idle  kv_GB/s  triad  x_triad  kv_MiB/rank\n");
    printf("%-8s %6d %7d %4d  %-9s %4d %3d %6d %10.3f %7.1f %12.3f %12.3f %12.0f %8.0f %5.2f "
           "%8.2f %6.2f %8.2f %12.2f\n",
           cfg->v[SPAR_KEY_PAR_METHOD].s, P, C, K, split, B, G, md->layers, g->prefill_seconds, tps,
           p50 * 1e3, p99 * 1e3, per_tok, formula,
           g->decode_seconds > 0 ? idle / g->decode_seconds : 0, busy_gbs, triad, fraction,
           kv_held / 1048576.0);
    const char *path = cfg->v[SPAR_KEY_OUT_RESULTS].s;
    if (!*path) return;
    char *buf = NULL, *hosts = calloc((size_t)P, 64);
    for (int r = 0; hosts && r < P; r++)
        memcpy(hosts + 64 * r, all[r].host, 64);
    size_t len = 0;
    FILE *f = hosts ? open_memstream(&buf, &len) : NULL;
    if (!f) {
        free(hosts);
        return;
    }
    fprintf(f,
            "{\"record\":\"generate\",\"ranks\":%d,\"compute_ranks\":%d,\"attention_ranks\":%d,"
            "\"split\":\"%s\"",
            P, C, K, split);
    const struct {
        const char *key;
        double value;
    } fields[] = {{"prefill_seconds", g->prefill_seconds},
                  {"decode_seconds", g->decode_seconds},
                  {"tokens_per_s", tps},
                  {"step_ms_p50", p50 * 1e3},
                  {"step_ms_p99", p99 * 1e3},
                  {"bytes_per_token_layer", per_tok},
                  {"bytes_per_token_layer_formula", formula},
                  {"header_bytes_per_step", steps > 0 ? headers / steps : 0},
                  {"idle_fraction", g->decode_seconds > 0 ? idle / g->decode_seconds : 0},
                  {"kv_read_bytes_max", kv_read},
                  {"kv_held_bytes_max", kv_held},
                  {"kv_read_gbs_busy", busy_gbs},
                  {"triad_gbs", triad},
                  {"kv_read_fraction_of_triad", fraction}};
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) { /* no step: null */
        fprintf(f, ",\"%s\":", fields[i].key);
        spar__json_number(f, fields[i].value);
    }
    fputc(',', f);
    spar__json_common(f, cfg, P, hosts, spar_comm_library(comm), spar_comm_transport(comm));
    fputs("}\n", f);
    fclose(f);
    spar__append_line(path, buf, len);
    free(buf), free(hosts);
}

static int outputs(const spar_config *cfg, const spar_generation *g, const spar_model_dims *md) {
    int64_t B = cfg->v[SPAR_KEY_WORK_BATCH].i, G = cfg->v[SPAR_KEY_WORK_GENERATE].i;
    int64_t tshape[2] = {B, G}, lshape[2] = {B, md->vocab};
    const char *tok = cfg->v[SPAR_KEY_OUT_TOKENS].s, *lg = cfg->v[SPAR_KEY_OUT_LOGITS].s;
    if (*tok)
        SPAR_TRY(write_npy(tok, "<i4", 2, tshape, g->tokens, sizeof(int32_t) * (size_t)(B * G)));
    if (*lg)
        SPAR_TRY(
            write_npy(lg, "<f4", 2, lshape, g->logits, sizeof(float) * (size_t)(B * md->vocab)));
    return SPAR_OK;
}

int spar__generate_plan(spar_comm *comm, const spar_config *cfg) {
    int rank = spar_comm_rank(comm), P = spar_comm_size(comm), worst = 0;
    spar__print_settings(cfg, P, spar_comm_transport(comm));
    bool offload = strcmp(cfg->v[SPAR_KEY_PAR_METHOD].s, "offload") == 0;
    int K = offload ? (int)cfg->v[SPAR_KEY_PAR_ATTN_RANKS].i : 0;
    bool computes = offload ? rank < P - K : rank == 0;
    spar_prompts prompts = {0};
    spar_loaded_model lm = {0};
    int rc = share_prompts(comm, cfg, &prompts);
    if (rc == 0) {
        int mine = computes ? spar__model_load(cfg, &lm) : SPAR_OK;
        if (!computes) spar__model_dims_of(cfg, &lm.model.dims);
        if (spar_comm_agree(comm, mine, &worst) != 0 || worst != 0) rc = worst ? worst : SPAR_ECOMM;
    }
    lm.model.kernels = spar_kernels_select(cfg->v[SPAR_KEY_RUN_KERNEL].s);
    spar_kernels_set_threads((int)cfg->v[SPAR_KEY_RUN_THREADS].i);
    spar_model_dims md = lm.model.dims;
    int B = (int)cfg->v[SPAR_KEY_WORK_BATCH].i, G = (int)cfg->v[SPAR_KEY_WORK_GENERATE].i;
    spar_requests req = {B, prompts.len, (const int32_t *const *)prompts.rows, G};
    spar_generation g = {0};
    g.tokens = malloc(sizeof(int32_t) * (size_t)B * (size_t)G);
    g.logits = malloc(sizeof(float) * (size_t)B * (size_t)md.vocab);
    g.step_seconds = calloc((size_t)G, sizeof(double));
    if (rc == 0 && (!g.tokens || !g.logits || !g.step_seconds)) rc = SPAR_ENOMEM;
    if (rc == 0) rc = spar_comm_barrier(comm);
    if (rc == 0) {
        const char *prefill = cfg->v[SPAR_KEY_PAR_PREFILL].s;
        const char *split = cfg->v[SPAR_KEY_SEQ_PARTITION].s;
        /* waits give up after comm.timeout: the communicator carries it */
        spar_offload oc = {K, (int)cfg->v[SPAR_KEY_PAR_MICRO_BATCHES].i,
                           strcmp(prefill, "local") == 0 ? NULL : spar_method_find(prefill),
                           spar__partition_kind(strcmp(split, "auto") == 0 ? "zigzag" : split)};
        int run = offload     ? spar_generate_offload(comm, &lm.model, &req, &oc, &g)
                  : rank == 0 ? spar_generate_local(&lm.model, &req, &g)
                              : SPAR_OK;
        if (run != 0) {
            spar_log_error("generation failed (%s); stopping every rank", spar_strerror(run));
            /* a message that fails its checks is bad input, like a bad file: exit 2 */
            spar_comm_abort(comm, spar_status_is_input_error(run) ? SPAR_EXIT_BAD_INPUT
                                                                  : SPAR_EXIT_FAILURE);
        }
        figures mine = {
            (double)g.decode_bytes, (double)g.header_bytes, g.idle_seconds, g.kv_bytes_read,
            g.kv_bytes_held,        g.attend_seconds,       g.triad_gbs, ""};
        snprintf(mine.host, sizeof mine.host, "%s", spar_comm_host(comm));
        figures *all = calloc((size_t)P, sizeof *all);
        rc = all ? spar_comm_gather(comm, &mine, sizeof mine, all, 0) : SPAR_ENOMEM;
        if (rc == 0 && rank == 0) {
            report(cfg, comm, &g, all, &md);
            rc = outputs(cfg, &g, &md);
        }
        free(all);
    }
    spar_comm_agree(comm, rc, &worst);
    free(g.tokens), free(g.logits), free(g.step_seconds);
    spar__model_free(&lm);
    spar__prompts_free(&prompts);
    return worst == 0                          ? SPAR_EXIT_OK
           : spar_status_is_input_error(worst) ? SPAR_EXIT_BAD_INPUT
                                               : SPAR_EXIT_FAILURE;
}
