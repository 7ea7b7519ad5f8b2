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
                  const spar_tensors *mine, spar_run_result *res) {
    int rank = spar_comm_rank(comm);
    int64_t n = prob->part->n;
    spar_tensors ref = {0}, got = {0};
    if (rank == 0) SPAR_TRY(spar__tensors_alloc(&got, n, prob, mine->backward));
    for (int i = T_O; i < T_COUNT; i++)
        if (spar__tensor_in_use(mine, i))
            SPAR_TRY(spar__rows_gather(comm, prob->part, mine->row[spar__tensor_spec(i)->rows],
                                       mine->t[i], got.t[i]));
    if (rank != 0) return SPAR_OK;
    spar_partition whole;
    spar_partition_init(&whole, SPAR_PARTITION_CONTIGUOUS, n, 1);
    spar_attn_problem local = *prob;
    local.part = &whole;
    /* On the CPU's kernels even for run.device=cuda: a GPU run is checked against code
     * that shares nothing with it but the method. */
    local.kernels = spar_kernels_select(cfg->v[SPAR_KEY_RUN_KERNEL].s);
    if (!local.kernels) local.kernels = spar_kernels_select("auto");
    double t0 = spar_comm_wtime();
    local.progress_ctx = &t0;
    const spar_method *m = spar_method_find("local");
    spar_print0("# verify: recomputing the whole sequence on rank 0 (local method, %s kernels)\n",
                local.kernels->name);
    int rc = spar__tensors_alloc(&ref, n, &local, mine->backward);
    spar_attn_io io = spar__tensors_io(&ref);
    if (rc == 0) rc = spar__tensors_load(NULL, cfg, &whole, &ref);
    if (rc == 0) rc = m->forward(NULL, &local, &io, NULL);
    if (rc == 0 && mine->backward) rc = m->backward(NULL, &local, &io, NULL);
    for (int i = T_O; i < T_COUNT && rc == 0; i++) {
        res->err[i - T_O] =
            spar__tensor_in_use(mine, i)
                ? rel_l2(got.t[i], ref.t[i], n * mine->row[spar__tensor_spec(i)->rows])
                : NAN;
    }
    res->verified = rc == 0;
    spar__tensors_free(&ref);
    spar__tensors_free(&got);
    return rc;
}

/* Every output in turn; after a failure the later files are still gone through (rank 0
 * drains what the others send) so that no rank is left waiting. Returns the first error. */
static int write_outputs(spar_comm *comm, const spar_config *cfg, const spar_partition *part,
                         const spar_attn_dims *dims, const spar_tensors *t) {
    int status = SPAR_OK;
    for (int i = T_O; i < T_COUNT; i++) {
        const char *path = cfg->v[spar__tensor_spec(i)->output_key].s;
        if (!*path || !spar__tensor_in_use(t, i)) continue;
        int64_t shape[3] = {part->n,
                            spar__tensor_spec(i)->rows == ROW_KV ? dims->kv_heads : dims->heads,
                            dims->head_dim};
        int rc = spar__rows_write_npy(
            comm, part, path, spar__tensor_spec(i)->rows == ROW_LSE ? 2 : 3, shape, t->t[i]);
        status = status ? status : rc;
    }
    return status;
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

static int finish(spar_run_result *res, int code) {
    free(res->fwd.bytes_sent);
    free(res->bwd.bytes_sent);
    free(res->peak_mib);
    free(res->hosts);
    return code;
}

/* Everything after the plan is known on every rank. Returns an exit code. */
int spar__run_plan(spar_comm *comm, const spar_config *cfg) {
    if (strcmp(cfg->v[SPAR_KEY_RUN_MODE].s, "generate") == 0) return spar__generate_plan(comm, cfg);
    int rank = spar_comm_rank(comm), worst = 0;
    spar__print_settings(cfg, spar_comm_size(comm), spar_comm_transport(comm));
    spar_experiment x;
    int rc = spar__experiment_setup(&x, comm, cfg);
    if (rc != 0) return spar_status_is_input_error(rc) ? SPAR_EXIT_BAD_INPUT : SPAR_EXIT_FAILURE;
    spar_metrics m[2];
    memset(m, 0, sizeof m);
    spar_run_result res = {
        .cfg = cfg, .transport = spar_comm_transport(comm), .library = spar_comm_library(comm)};
    for (int pass = 0; pass < (x.backward ? 2 : 1); pass++) {
        if ((rc = spar__run_pass(comm, x.method, &x.prob, &x.t, pass == 1, &m[pass])) != 0) {
            spar_log_error("%s %s pass failed (%s); stopping every rank", x.method->name,
                           pass ? "backward" : "forward", spar_strerror(rc));
            spar_comm_abort(comm, SPAR_EXIT_FAILURE);
        }
    }
    /* From here a failure on one rank cannot be agreed on safely (the others may be
     * inside a gather with it), except for output writing, which drains regardless. */
    if (collect_figures(comm, m, x.backward, &res) != 0) spar_comm_abort(comm, SPAR_EXIT_FAILURE);
    bool whole = x.method->whole_sequence;
    rc = (!whole || rank == 0) ? write_outputs(comm, cfg, &x.part, &x.prob.dims, &x.t) : SPAR_OK;
    int code = SPAR_EXIT_FAILURE;
    if (spar_comm_agree(comm, rc, &worst) == 0 && worst == 0) {
        if (cfg->v[SPAR_KEY_RUN_VERIFY].b && whole)
            spar_print0("# verify: the local method is the reference itself; nothing to compare\n");
        else if (cfg->v[SPAR_KEY_RUN_VERIFY].b && verify(comm, cfg, &x.prob, &x.t, &res) != 0)
            spar_comm_abort(comm, SPAR_EXIT_FAILURE);
        code = report(comm, cfg, &res);
    }
    spar__experiment_free(&x);
    return finish(&res, code);
}
