/* run.c: `spar run`: one experiment from plan to outputs, result table and record.
 *
 * Order of work: rank 0 validates and broadcasts the plan; every rank builds its
 * partition and loads its rows; the chosen method runs (timed between barriers);
 * rank 0 writes outputs in global order, verifies against the local method when asked,
 * prints the table and appends the record. Input problems found on any rank make every
 * rank exit 2; a failure while ranks exchange data aborts the whole job.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "launcher.h"

typedef struct tensors {
    float *q, *k, *v, *o, *lse;
    int64_t n;             /* tokens held */
    int64_t q_row, kv_row; /* floats per token */
} tensors;

static void tensors_free(tensors *t) {
    free(t->q), free(t->k), free(t->v), free(t->o), free(t->lse);
    memset(t, 0, sizeof *t);
}

static int tensors_alloc(tensors *t, int64_t n, const spar_attn_dims *dims) {
    t->n = n;
    t->q_row = (int64_t)dims->heads * dims->head_dim;
    t->kv_row = (int64_t)dims->kv_heads * dims->head_dim;
    size_t nq = (size_t)(n * t->q_row), nkv = (size_t)(n * t->kv_row);
    t->q = malloc(nq * sizeof(float));
    t->k = malloc(nkv * sizeof(float));
    t->v = malloc(nkv * sizeof(float));
    t->o = malloc(nq * sizeof(float));
    t->lse = malloc((size_t)(n * dims->heads) * sizeof(float));
    if (!t->q || !t->k || !t->v || !t->o || !t->lse) {
        tensors_free(t);
        return spar_errorf(SPAR_ENOMEM, "cannot allocate %.1f MiB for %lld tokens",
                           (double)(2 * nq + 2 * nkv) * 4.0 / 1048576.0, (long long)n);
    }
    return SPAR_OK;
}

static spar_row_source source_for(const spar_config *cfg, int key, uint64_t stream) {
    return (spar_row_source){cfg->v[key].s[0] ? cfg->v[key].s : NULL, 0,
                             (uint64_t)cfg->v[SPAR_KEY_DATA_SEED].i, stream};
}

/* The data offset of each input file (validated on rank 0; re-read here on the rank
 * that reads it). */
static int resolve_source(spar_row_source *src) {
    if (!src->path) return SPAR_OK;
    spar_npy_info info;
    spar_err err;
    if (spar__npy_read_info(src->path, &info, &err) != 0)
        return spar_errorf(SPAR_EFORMAT, "%s", err.msg);
    src->data_offset = info.data_offset;
    return SPAR_OK;
}

/* Inputs for this rank (or the whole sequence when part has one rank and comm NULL). */
static int load_inputs(spar_comm *comm, const spar_config *cfg, const spar_partition *part,
                       tensors *t) {
    static const int keys[3] = {SPAR_KEY_DATA_Q, SPAR_KEY_DATA_K, SPAR_KEY_DATA_V};
    float *dst[3] = {t->q, t->k, t->v};
    int64_t rows[3] = {t->q_row, t->kv_row, t->kv_row};
    int status = SPAR_OK;
    for (int i = 0; i < 3; i++) {
        spar_row_source src = source_for(cfg, keys[i], (uint64_t)i + 1);
        int rc = (!comm || spar_comm_rank(comm) == 0) ? resolve_source(&src) : SPAR_OK;
        if (rc == 0)
            rc = comm ? spar__rows_scatter(comm, part, &src, rows[i], dst[i])
                      : spar__rows_fill(&src, part, 0, rows[i], dst[i]);
        status = status ? status : rc;
    }
    return status;
}

static void show_progress(void *ctx, const char *phase, int64_t done, int64_t total) {
    double t0 = *(const double *)ctx;
    printf("# progress: %s %lld/%lld (%.0f%%), %.2f s\n", phase, (long long)done, (long long)total,
           100.0 * (double)done / (double)total, spar_comm_wtime() - t0);
    fflush(stdout);
}

static double rel_l2(const float *got, const float *ref, int64_t n) {
    double num = 0.0, den = 0.0;
    for (int64_t i = 0; i < n; i++) {
        double d = (double)got[i] - (double)ref[i];
        num += d * d;
        den += (double)ref[i] * (double)ref[i];
    }
    return den > 0.0 ? sqrt(num / den) : sqrt(num);
}

/* Rank 0: recompute everything with the local method and compare. The other ranks only
 * send their o and lse. */
static int verify(spar_comm *comm, const spar_config *cfg, const spar_softmax_problem *prob,
                  const tensors *mine, spar_run_result *res) {
    int rank = spar_comm_rank(comm);
    int64_t n = prob->part->n;
    tensors ref = {0}, got = {0};
    int rc = rank == 0 ? tensors_alloc(&got, n, &prob->dims) : SPAR_OK;
    if (rc != 0) return rc;
    SPAR_TRY(spar__rows_gather(comm, prob->part, mine->q_row, mine->o, got.o));
    SPAR_TRY(spar__rows_gather(comm, prob->part, prob->dims.heads, mine->lse, got.lse));
    if (rank != 0) return SPAR_OK;
    spar_partition whole;
    spar_partition_init(&whole, SPAR_PARTITION_CONTIGUOUS, n, 1);
    spar_softmax_problem local = *prob;
    local.part = &whole;
    double t0 = spar_comm_wtime();
    local.progress_ctx = &t0;
    spar_print0("# verify: recomputing the whole sequence on rank 0 (local method)\n");
    if ((rc = tensors_alloc(&ref, n, &prob->dims)) == 0 &&
        (rc = load_inputs(NULL, cfg, &whole, &ref)) == 0 &&
        (rc = spar_local_attn_forward(&local, ref.q, ref.k, ref.v, ref.o, ref.lse, NULL)) == 0) {
        res->verified = true;
        res->err_o = rel_l2(got.o, ref.o, n * got.q_row);
        res->err_lse = rel_l2(got.lse, ref.lse, n * prob->dims.heads);
    }
    tensors_free(&ref);
    tensors_free(&got);
    return rc;
}

static int write_outputs(spar_comm *comm, const spar_config *cfg, const spar_partition *part,
                         const spar_attn_dims *dims, const tensors *t) {
    int64_t shape_o[3] = {part->n, dims->heads, dims->head_dim},
            shape_lse[2] = {part->n, dims->heads};
    if (cfg->v[SPAR_KEY_OUT_O].s[0])
        SPAR_TRY(spar__rows_write_npy(comm, part, cfg->v[SPAR_KEY_OUT_O].s, 3, shape_o, t->o));
    if (cfg->v[SPAR_KEY_OUT_LSE].s[0])
        SPAR_TRY(
            spar__rows_write_npy(comm, part, cfg->v[SPAR_KEY_OUT_LSE].s, 2, shape_lse, t->lse));
    return SPAR_OK;
}

/* Per-rank figures to rank 0; totals everywhere. */
static int collect_figures(spar_comm *comm, const spar_metrics *m, spar_run_result *res) {
    int p = spar_comm_size(comm);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double sent = (double)spar_comm_ring_bytes_sent(comm), peak = (double)ru.ru_maxrss / 1024.0;
    char host[64];
    snprintf(host, sizeof host, "%s", spar_comm_host(comm));
    res->ranks = p;
    res->bytes_sent = calloc((size_t)p, sizeof(double));
    res->peak_mib = calloc((size_t)p, sizeof(double));
    res->hosts = calloc((size_t)p, 64);
    if (!res->bytes_sent || !res->peak_mib || !res->hosts) return SPAR_ENOMEM;
    SPAR_TRY(spar_comm_gather(comm, &sent, sizeof sent, res->bytes_sent, 0));
    SPAR_TRY(spar_comm_gather(comm, &peak, sizeof peak, res->peak_mib, 0));
    SPAR_TRY(spar_comm_gather(comm, host, sizeof host, res->hosts, 0));
    res->seconds = m->seconds;
    res->compute_seconds = m->compute_seconds;
    res->wait_seconds = m->wait_seconds;
    res->flops = m->flops;
    SPAR_TRY(spar_comm_allreduce_max_double(comm, &res->seconds));
    SPAR_TRY(spar_comm_allreduce_max_double(comm, &res->compute_seconds));
    SPAR_TRY(spar_comm_allreduce_max_double(comm, &res->wait_seconds));
    SPAR_TRY(spar_comm_allreduce_sum_double(comm, &res->flops));
    res->gflops_per_s = res->seconds > 0 ? res->flops / res->seconds / 1e9 : 0.0;
    return SPAR_OK;
}

static int compute(spar_comm *comm, const spar_softmax_problem *prob, bool local, tensors *t,
                   spar_metrics *m) {
    SPAR_TRY(spar_comm_barrier(comm));
    if (!local) return spar_ring_attn_forward(comm, prob, t->q, t->k, t->v, t->o, t->lse, m);
    if (spar_comm_rank(comm) == 0)
        return spar_local_attn_forward(prob, t->q, t->k, t->v, t->o, t->lse, m);
    *m = (spar_metrics){0};
    return SPAR_OK;
}

static void problem_from_config(const spar_config *cfg, const spar_partition *part,
                                spar_softmax_problem *prob) {
    int d = (int)cfg->v[SPAR_KEY_ATTN_HEAD_DIM].i;
    double scale = cfg->v[SPAR_KEY_ATTN_SCALE].f;
    *prob = (spar_softmax_problem){
        .dims = {(int)cfg->v[SPAR_KEY_ATTN_HEADS].i, (int)cfg->v[SPAR_KEY_ATTN_KV_HEADS].i, d,
                 (float)(isnan(scale) ? 1.0 / sqrt((double)d) : scale)},
        .causal = cfg->v[SPAR_KEY_ATTN_CAUSAL].b,
        .part = part,
        .kernels = spar_kernels_select(cfg->v[SPAR_KEY_RUN_KERNEL].s),
        .query_block = cfg->v[SPAR_KEY_RUN_QUERY_BLOCK].i,
        .progress = show_progress,
    };
}

/* Rank 0 prints the table, appends the record and judges the verification; every
 * rank returns the same exit code. */
static int report(spar_comm *comm, const spar_config *cfg, const spar_run_result *res) {
    int verdict = SPAR_OK, worst = 0;
    if (spar_comm_rank(comm) == 0) {
        spar__print_result_table(res);
        double tol = cfg->v[SPAR_KEY_RUN_VERIFY_TOL].f, err = fmax(res->err_o, res->err_lse);
        if (res->verified && !(err <= tol))
            verdict = spar_errorf(SPAR_EVERIFY,
                                  "verification FAILED: relative L2 error %.3e "
                                  "(o %.3e, lse %.3e) exceeds run.verify_tol=%.3g",
                                  err, res->err_o, res->err_lse, tol);
        else if (res->verified)
            printf("# verify: passed (relative L2 error o %.3e, lse %.3e; tolerance %.3g)\n",
                   res->err_o, res->err_lse, tol);
        const char *path = cfg->v[SPAR_KEY_OUT_RESULTS].s;
        if (*path && spar__append_record(path, res) != 0 && verdict == 0) verdict = SPAR_EIO;
        fflush(stdout);
    }
    if (spar_comm_agree(comm, verdict, &worst) != 0) return SPAR_EXIT_FAILURE;
    return worst == SPAR_EVERIFY ? SPAR_EXIT_VERIFY : worst ? SPAR_EXIT_FAILURE : SPAR_EXIT_OK;
}

static int finish(tensors *t, spar_run_result *res, int code) {
    tensors_free(t);
    free(res->bytes_sent);
    free(res->peak_mib);
    free(res->hosts);
    return code;
}

/* Everything after the plan is known on every rank. Returns an exit code. */
int spar__run_plan(spar_comm *comm, const spar_config *cfg) {
    int rank = spar_comm_rank(comm), p = spar_comm_size(comm), worst = 0;
    bool local = strcmp(cfg->v[SPAR_KEY_PAR_METHOD].s, "local") == 0;
    spar_partition part;
    enum spar_partition_kind kind =
        strcmp(cfg->v[SPAR_KEY_SEQ_PARTITION].s, "zigzag") == 0   ? SPAR_PARTITION_ZIGZAG
        : strcmp(cfg->v[SPAR_KEY_SEQ_PARTITION].s, "stripe") == 0 ? SPAR_PARTITION_STRIPE
                                                                  : SPAR_PARTITION_CONTIGUOUS;
    int64_t n = cfg->v[SPAR_KEY_SEQ_LENGTH].i;
    spar_partition_init(&part, local ? SPAR_PARTITION_CONTIGUOUS : kind, n, local ? 1 : p);
    spar_softmax_problem prob;
    problem_from_config(cfg, &part, &prob);
    double t0 = spar_comm_wtime();
    prob.progress_ctx = &t0;
    spar__print_settings(cfg, p, spar_comm_transport(comm));

    tensors t = {0};
    int64_t n_local = local ? (rank == 0 ? n : 0) : spar_partition_local_len(&part, rank);
    int rc = n_local > 0 ? tensors_alloc(&t, n_local, &prob.dims) : SPAR_OK;
    if (rc == 0 && n_local > 0)
        rc = local ? load_inputs(NULL, cfg, &part, &t) : load_inputs(comm, cfg, &part, &t);
    if (spar_comm_agree(comm, rc, &worst) != 0 || worst != 0) {
        tensors_free(&t);
        return spar_status_is_input_error(worst) ? SPAR_EXIT_BAD_INPUT : SPAR_EXIT_FAILURE;
    }
    spar_metrics m = {0};
    spar_run_result res = {
        .cfg = cfg, .transport = spar_comm_transport(comm), .library = spar_comm_library(comm)};
    if ((rc = compute(comm, &prob, local, &t, &m)) != 0) {
        spar_log_error("%s method failed (%s); stopping every rank", cfg->v[SPAR_KEY_PAR_METHOD].s,
                       spar_strerror(rc));
        spar_comm_abort(comm, SPAR_EXIT_FAILURE);
    }
    /* From here a failure on one rank cannot be agreed on safely (the others may be
     * inside a gather with it), except for output writing, which drains regardless. */
    if ((rc = collect_figures(comm, &m, &res)) != 0) spar_comm_abort(comm, SPAR_EXIT_FAILURE);
    if (!local || rank == 0) rc = write_outputs(comm, cfg, &part, &prob.dims, &t);
    if (spar_comm_agree(comm, rc, &worst) != 0 || worst != 0)
        return finish(&t, &res, SPAR_EXIT_FAILURE);
    if (cfg->v[SPAR_KEY_RUN_VERIFY].b && local)
        spar_print0("# verify: the local method is the reference itself; nothing to compare\n");
    else if (cfg->v[SPAR_KEY_RUN_VERIFY].b && verify(comm, cfg, &prob, &t, &res) != 0)
        spar_comm_abort(comm, SPAR_EXIT_FAILURE);
    return finish(&t, &res, report(comm, cfg, &res));
}
