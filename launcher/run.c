/* run.c: `spar run`: one experiment from plan to outputs, result table and record.
 *
 * Order of work: rank 0 validates and broadcasts the plan; every rank builds its
 * partition and loads its rows; the method's forward pass runs, then its backward pass
 * when asked (each timed between barriers); rank 0 writes outputs in global order,
 * verifies against the local method when asked, prints the table and appends the
 * record. Input problems found on any rank make every rank exit 2; a failure while ranks
 * exchange data aborts the whole job.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "launcher.h"

/* Every tensor of a run, by the shape of its rows. */
enum row_kind { ROW_Q, ROW_KV, ROW_LSE };
enum { T_Q, T_K, T_V, T_DOUT, T_O, T_LSE, T_DQ, T_DK, T_DV, T_COUNT };

static const struct tensor_spec {
    const char *name;
    int input_key, output_key; /* -1: none */
    enum row_kind rows;
    uint64_t stream; /* random inputs: the generator's stream */
    bool backward_only;
} specs[T_COUNT] = {
    {"q", SPAR_KEY_DATA_Q, -1, ROW_Q, 1, false},  {"k", SPAR_KEY_DATA_K, -1, ROW_KV, 2, false},
    {"v", SPAR_KEY_DATA_V, -1, ROW_KV, 3, false}, {"do", SPAR_KEY_DATA_DO, -1, ROW_Q, 4, true},
    {"o", -1, SPAR_KEY_OUT_O, ROW_Q, 0, false},   {"lse", -1, SPAR_KEY_OUT_LSE, ROW_LSE, 0, false},
    {"dq", -1, SPAR_KEY_OUT_DQ, ROW_Q, 0, true},  {"dk", -1, SPAR_KEY_OUT_DK, ROW_KV, 0, true},
    {"dv", -1, SPAR_KEY_OUT_DV, ROW_KV, 0, true},
};

typedef struct tensors {
    float *t[T_COUNT];
    float *states;  /* linear attention: what forward leaves for backward */
    int64_t n;      /* tokens held */
    int64_t row[3]; /* floats per token, by row_kind */
    bool backward, linear;
} tensors;

static void tensors_free(tensors *t) {
    for (int i = 0; i < T_COUNT; i++)
        free(t->t[i]);
    free(t->states);
    memset(t, 0, sizeof *t);
}

static bool in_use(const tensors *t, int i) {
    if (i == T_LSE && t->linear) return false; /* no softmax, no log-sum-exp */
    return t->backward || !specs[i].backward_only;
}

/* Tensors for n tokens of prob (its type decides lse and the linear states). */
static int tensors_alloc(tensors *t, int64_t n, const spar_attn_problem *prob, bool backward) {
    const spar_attn_dims *dims = &prob->dims;
    *t = (tensors){.n = n, .backward = backward, .linear = prob->type == SPAR_ATTN_LINEAR};
    if (t->linear &&
        !(t->states = malloc(sizeof(float) * (size_t)spar_linear_states_floats(prob) + 1)))
        return spar_errorf(SPAR_ENOMEM, "cannot allocate the linear attention states");
    t->row[ROW_Q] = (int64_t)dims->heads * dims->head_dim;
    t->row[ROW_KV] = (int64_t)dims->kv_heads * dims->head_dim;
    t->row[ROW_LSE] = dims->heads;
    double bytes = 0.0;
    for (int i = 0; i < T_COUNT; i++) {
        if (!in_use(t, i)) continue;
        size_t floats = (size_t)(n * t->row[specs[i].rows]);
        bytes += (double)floats * 4.0;
        if (!(t->t[i] = malloc(floats * sizeof(float) + 1))) {
            tensors_free(t);
            return spar_errorf(SPAR_ENOMEM, "cannot allocate %.1f MiB for %lld tokens",
                               bytes / 1048576.0, (long long)n);
        }
    }
    return SPAR_OK;
}

static spar_attn_io io_of(const tensors *t) {
    return (spar_attn_io){t->t[T_Q],    t->t[T_K],  t->t[T_V],  t->t[T_O],  t->t[T_LSE],
                          t->t[T_DOUT], t->t[T_DQ], t->t[T_DK], t->t[T_DV], t->states};
}

/* One input tensor: from its .npy file (rank 0 reads, data offset re-read here) or
 * random from the seed. */
static int load_input(spar_comm *comm, const spar_config *cfg, const spar_partition *part,
                      tensors *t, int i) {
    const char *path = cfg->v[specs[i].input_key].s;
    spar_row_source src = {*path ? path : NULL, 0, (uint64_t)cfg->v[SPAR_KEY_DATA_SEED].i,
                           specs[i].stream};
    if (src.path && (!comm || spar_comm_rank(comm) == 0)) {
        spar_npy_info info;
        spar_err err;
        if (spar__npy_read_info(src.path, &info, &err) != 0)
            return spar_errorf(SPAR_EFORMAT, "%s", err.msg);
        src.data_offset = info.data_offset;
    }
    int64_t row = t->row[specs[i].rows];
    return comm ? spar__rows_scatter(comm, part, &src, row, t->t[i])
                : spar__rows_fill(&src, part, 0, row, t->t[i]);
}

/* Inputs for this rank (or the whole sequence when comm is NULL and part has one rank).
 * Every input is attempted so that the ranks' exchanges stay matched. */
static int load_inputs(spar_comm *comm, const spar_config *cfg, const spar_partition *part,
                       tensors *t) {
    int status = SPAR_OK;
    for (int i = 0; i < T_COUNT; i++) {
        if (specs[i].input_key < 0 || !in_use(t, i)) continue;
        int rc = load_input(comm, cfg, part, t, i);
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

/* Rank 0: gather every output, recompute the whole sequence with the local method and
 * compare. The other ranks only send their outputs. */
static int verify(spar_comm *comm, const spar_config *cfg, const spar_attn_problem *prob,
                  const tensors *mine, spar_run_result *res) {
    int rank = spar_comm_rank(comm);
    int64_t n = prob->part->n;
    tensors ref = {0}, got = {0};
    if (rank == 0) SPAR_TRY(tensors_alloc(&got, n, prob, mine->backward));
    for (int i = T_O; i < T_COUNT; i++)
        if (in_use(mine, i))
            SPAR_TRY(spar__rows_gather(comm, prob->part, mine->row[specs[i].rows], mine->t[i],
                                       got.t[i]));
    if (rank != 0) return SPAR_OK;
    spar_partition whole;
    spar_partition_init(&whole, SPAR_PARTITION_CONTIGUOUS, n, 1);
    spar_attn_problem local = *prob;
    local.part = &whole;
    double t0 = spar_comm_wtime();
    local.progress_ctx = &t0;
    const spar_method *m = spar_method_find("local");
    spar_print0("# verify: recomputing the whole sequence on rank 0 (local method)\n");
    int rc = tensors_alloc(&ref, n, &local, mine->backward);
    spar_attn_io io = io_of(&ref);
    if (rc == 0) rc = load_inputs(NULL, cfg, &whole, &ref);
    if (rc == 0) rc = m->forward(NULL, &local, &io, NULL);
    if (rc == 0 && mine->backward) rc = m->backward(NULL, &local, &io, NULL);
    for (int i = T_O; i < T_COUNT && rc == 0; i++) {
        res->err[i - T_O] =
            in_use(mine, i) ? rel_l2(got.t[i], ref.t[i], n * mine->row[specs[i].rows]) : NAN;
    }
    res->verified = rc == 0;
    tensors_free(&ref);
    tensors_free(&got);
    return rc;
}

static int write_outputs(spar_comm *comm, const spar_config *cfg, const spar_partition *part,
                         const spar_attn_dims *dims, const tensors *t) {
    for (int i = T_O; i < T_COUNT; i++) {
        const char *path = cfg->v[specs[i].output_key].s;
        if (!*path || !in_use(t, i)) continue;
        int64_t shape[3] = {part->n, specs[i].rows == ROW_KV ? dims->kv_heads : dims->heads,
                            dims->head_dim};
        SPAR_TRY(spar__rows_write_npy(comm, part, path, specs[i].rows == ROW_LSE ? 2 : 3, shape,
                                      t->t[i]));
    }
    return SPAR_OK;
}

/* One pass's figures: per-rank bytes to rank 0, slowest time and total flops everywhere. */
static int collect_pass(spar_comm *comm, const spar_metrics *m, spar_pass_result *pass) {
    double sent = (double)m->bytes_sent;
    pass->ran = true;
    pass->bytes_sent = calloc((size_t)spar_comm_size(comm), sizeof(double));
    if (!pass->bytes_sent) return SPAR_ENOMEM;
    SPAR_TRY(spar_comm_gather(comm, &sent, sizeof sent, pass->bytes_sent, 0));
    pass->seconds = m->seconds;
    pass->compute_seconds = m->compute_seconds;
    pass->wait_seconds = m->wait_seconds;
    pass->flops = m->flops;
    SPAR_TRY(spar_comm_allreduce_max_double(comm, &pass->seconds));
    SPAR_TRY(spar_comm_allreduce_max_double(comm, &pass->compute_seconds));
    SPAR_TRY(spar_comm_allreduce_max_double(comm, &pass->wait_seconds));
    SPAR_TRY(spar_comm_allreduce_sum_double(comm, &pass->flops));
    pass->gflops_per_s = pass->seconds > 0 ? pass->flops / pass->seconds / 1e9 : 0.0;
    return SPAR_OK;
}

static int collect_figures(spar_comm *comm, const spar_metrics m[2], bool backward,
                           spar_run_result *res) {
    int p = spar_comm_size(comm);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double peak = (double)ru.ru_maxrss / 1024.0;
    char host[64];
    snprintf(host, sizeof host, "%s", spar_comm_host(comm));
    res->ranks = p;
    res->peak_mib = calloc((size_t)p, sizeof(double));
    res->hosts = calloc((size_t)p, 64);
    if (!res->peak_mib || !res->hosts) return SPAR_ENOMEM;
    SPAR_TRY(spar_comm_gather(comm, &peak, sizeof peak, res->peak_mib, 0));
    SPAR_TRY(spar_comm_gather(comm, host, sizeof host, res->hosts, 0));
    SPAR_TRY(collect_pass(comm, &m[0], &res->fwd));
    return backward ? collect_pass(comm, &m[1], &res->bwd) : SPAR_OK;
}

/* One pass of the method: every rank for a distributed method, rank 0 for local. */
static int run_pass(spar_comm *comm, const spar_method *method, const spar_attn_problem *prob,
                    const tensors *t, bool backward, spar_metrics *m) {
    SPAR_TRY(spar_comm_barrier(comm));
    *m = (spar_metrics){0};
    if (method->whole_sequence && spar_comm_rank(comm) != 0) return SPAR_OK;
    spar_attn_io io = io_of(t);
    return (backward ? method->backward : method->forward)(comm, prob, &io, m);
}

/* The decay of every head: one number for all, or the ALiBi rule. decay: [heads]. */
static void decay_from_config(const spar_config *cfg, int heads, double *decay) {
    double lambda = cfg->v[SPAR_KEY_ATTN_DECAY].f;
    if (isnan(lambda)) /* alibi */
        spar_alibi_decay(heads, decay);
    else
        for (int h = 0; h < heads; h++)
            decay[h] = lambda;
}

static void problem_from_config(const spar_config *cfg, const spar_partition *part,
                                const double *decay, spar_attn_problem *prob) {
    int d = (int)cfg->v[SPAR_KEY_ATTN_HEAD_DIM].i;
    double scale = cfg->v[SPAR_KEY_ATTN_SCALE].f;
    bool linear = strcmp(cfg->v[SPAR_KEY_ATTN_TYPE].s, "linear") == 0;
    *prob = (spar_attn_problem){
        .type = linear ? SPAR_ATTN_LINEAR : SPAR_ATTN_SOFTMAX,
        .decay = decay,
        .dims = {(int)cfg->v[SPAR_KEY_ATTN_HEADS].i, (int)cfg->v[SPAR_KEY_ATTN_KV_HEADS].i, d,
                 (float)(isnan(scale) ? 1.0 / sqrt((double)d) : scale)},
        .causal = cfg->v[SPAR_KEY_ATTN_CAUSAL].b,
        .part = part,
        .kernels = spar_kernels_select(cfg->v[SPAR_KEY_RUN_KERNEL].s),
        .query_block = cfg->v[SPAR_KEY_RUN_QUERY_BLOCK].i,
        .head_groups = (int)cfg->v[SPAR_KEY_PAR_HEAD_GROUPS].i,
        .progress = show_progress,
    };
}

static enum spar_partition_kind partition_kind(const char *name) {
    if (strcmp(name, "zigzag") == 0) return SPAR_PARTITION_ZIGZAG;
    if (strcmp(name, "stripe") == 0) return SPAR_PARTITION_STRIPE;
    return SPAR_PARTITION_CONTIGUOUS;
}

/* Rank 0 prints the table, appends the record and judges the verification; every
 * rank returns the same exit code. */
static int report(spar_comm *comm, const spar_config *cfg, const spar_run_result *res) {
    int verdict = SPAR_OK, worst = 0;
    if (spar_comm_rank(comm) == 0) {
        spar__print_result_table(res);
        double tol = cfg->v[SPAR_KEY_RUN_VERIFY_TOL].f, err = spar__max_error(res);
        if (res->verified && !(err <= tol))
            verdict = spar_errorf(SPAR_EVERIFY,
                                  "verification FAILED: relative L2 error %.3e "
                                  "exceeds run.verify_tol=%.3g",
                                  err, tol);
        else if (res->verified)
            printf("# verify: passed (largest relative L2 error %.3e; tolerance %.3g)\n", err, tol);
        const char *path = cfg->v[SPAR_KEY_OUT_RESULTS].s;
        if (*path && spar__append_record(path, res) != 0 && verdict == 0) verdict = SPAR_EIO;
        fflush(stdout);
    }
    if (spar_comm_agree(comm, verdict, &worst) != 0) return SPAR_EXIT_FAILURE;
    return worst == SPAR_EVERIFY ? SPAR_EXIT_VERIFY : worst ? SPAR_EXIT_FAILURE : SPAR_EXIT_OK;
}

static int finish(tensors *t, spar_run_result *res, int code) {
    tensors_free(t);
    free(res->fwd.bytes_sent);
    free(res->bwd.bytes_sent);
    free(res->peak_mib);
    free(res->hosts);
    return code;
}

/* Everything after the plan is known on every rank. Returns an exit code. */
int spar__run_plan(spar_comm *comm, const spar_config *cfg) {
    int rank = spar_comm_rank(comm), p = spar_comm_size(comm), worst = 0;
    const spar_method *method = spar_method_find(cfg->v[SPAR_KEY_PAR_METHOD].s);
    bool whole = method->whole_sequence, backward = cfg->v[SPAR_KEY_RUN_BACKWARD].b;
    int64_t n = cfg->v[SPAR_KEY_SEQ_LENGTH].i;
    spar_partition part;
    spar_partition_init(
        &part, whole ? SPAR_PARTITION_CONTIGUOUS : partition_kind(cfg->v[SPAR_KEY_SEQ_PARTITION].s),
        n, whole ? 1 : p);
    spar_attn_problem prob;
    int heads = (int)cfg->v[SPAR_KEY_ATTN_HEADS].i;
    double *decay = malloc(sizeof(double) * (size_t)heads);
    if (!decay) return SPAR_EXIT_FAILURE; /* every rank: the same small allocation */
    decay_from_config(cfg, heads, decay);
    problem_from_config(cfg, &part, decay, &prob);
    double t0 = spar_comm_wtime();
    prob.progress_ctx = &t0;
    spar__print_settings(cfg, p, spar_comm_transport(comm));
    spar_kernels_set_threads((int)cfg->v[SPAR_KEY_RUN_THREADS].i);

    tensors t = {0};
    int64_t n_local = whole ? (rank == 0 ? n : 0) : spar_partition_local_len(&part, rank);
    int rc = n_local > 0 ? tensors_alloc(&t, n_local, &prob, backward) : SPAR_OK;
    if (rc == 0 && n_local > 0) rc = load_inputs(whole ? NULL : comm, cfg, &part, &t);
    if (spar_comm_agree(comm, rc, &worst) != 0 || worst != 0) {
        tensors_free(&t);
        free(decay);
        return spar_status_is_input_error(worst) ? SPAR_EXIT_BAD_INPUT : SPAR_EXIT_FAILURE;
    }
    t.backward = backward;
    t.linear = prob.type == SPAR_ATTN_LINEAR;
    spar_metrics m[2];
    memset(m, 0, sizeof m);
    spar_run_result res = {
        .cfg = cfg, .transport = spar_comm_transport(comm), .library = spar_comm_library(comm)};
    for (int pass = 0; pass < (backward ? 2 : 1); pass++) {
        if ((rc = run_pass(comm, method, &prob, &t, pass == 1, &m[pass])) != 0) {
            spar_log_error("%s %s pass failed (%s); stopping every rank", method->name,
                           pass ? "backward" : "forward", spar_strerror(rc));
            spar_comm_abort(comm, SPAR_EXIT_FAILURE);
        }
    }
    /* From here a failure on one rank cannot be agreed on safely (the others may be
     * inside a gather with it), except for output writing, which drains regardless. */
    if (collect_figures(comm, m, backward, &res) != 0) spar_comm_abort(comm, SPAR_EXIT_FAILURE);
    rc = (!whole || rank == 0) ? write_outputs(comm, cfg, &part, &prob.dims, &t) : SPAR_OK;
    int code = SPAR_EXIT_FAILURE;
    if (spar_comm_agree(comm, rc, &worst) == 0 && worst == 0) {
        if (cfg->v[SPAR_KEY_RUN_VERIFY].b && whole)
            spar_print0("# verify: the local method is the reference itself; nothing to compare\n");
        else if (cfg->v[SPAR_KEY_RUN_VERIFY].b && verify(comm, cfg, &prob, &t, &res) != 0)
            spar_comm_abort(comm, SPAR_EXIT_FAILURE);
        code = report(comm, cfg, &res);
    }
    free(decay);
    return finish(&t, &res, code);
}
