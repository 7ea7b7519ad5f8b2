/* experiment.c: one experiment on this rank: its partition, problem and spar_tensors, and the
 * passes of its method. Shared by `spar run` (one execution, outputs, verification) and
 * `spar bench` (warm-ups and repeats).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "launcher.h"

/* Every tensor of a run, by the shape of its rows. */

static const spar_tensor_spec specs[T_COUNT] = {
    {"q", SPAR_KEY_DATA_Q, -1, ROW_Q, 1, false},  {"k", SPAR_KEY_DATA_K, -1, ROW_KV, 2, false},
    {"v", SPAR_KEY_DATA_V, -1, ROW_KV, 3, false}, {"do", SPAR_KEY_DATA_DO, -1, ROW_Q, 4, true},
    {"o", -1, SPAR_KEY_OUT_O, ROW_Q, 0, false},   {"lse", -1, SPAR_KEY_OUT_LSE, ROW_LSE, 0, false},
    {"dq", -1, SPAR_KEY_OUT_DQ, ROW_Q, 0, true},  {"dk", -1, SPAR_KEY_OUT_DK, ROW_KV, 0, true},
    {"dv", -1, SPAR_KEY_OUT_DV, ROW_KV, 0, true},
};

const spar_tensor_spec *spar__tensor_spec(int i) {
    return &specs[i];
}

void spar__tensors_free(spar_tensors *t) {
    for (int i = 0; i < T_COUNT; i++)
        free(t->t[i]);
    free(t->states);
    memset(t, 0, sizeof *t);
}

bool spar__tensor_in_use(const spar_tensors *t, int i) {
    if (i == T_LSE && t->linear) return false; /* no softmax, no log-sum-exp */
    return t->backward || !specs[i].backward_only;
}

/* Tensors for n tokens of prob (its type decides lse and the linear states). */
int spar__tensors_alloc(spar_tensors *t, int64_t n, const spar_attn_problem *prob, bool backward) {
    const spar_attn_dims *dims = &prob->dims;
    *t = (spar_tensors){.n = n, .backward = backward, .linear = prob->type == SPAR_ATTN_LINEAR};
    if (t->linear &&
        !(t->states = malloc(sizeof(float) * (size_t)spar_linear_states_floats(prob) + 1)))
        return spar_errorf(SPAR_ENOMEM, "cannot allocate the linear attention states");
    t->row[ROW_Q] = (int64_t)dims->heads * dims->head_dim;
    t->row[ROW_KV] = (int64_t)dims->kv_heads * dims->head_dim;
    t->row[ROW_LSE] = dims->heads;
    double bytes = 0.0;
    for (int i = 0; i < T_COUNT; i++) {
        if (!spar__tensor_in_use(t, i)) continue;
        size_t floats = (size_t)(n * t->row[specs[i].rows]);
        bytes += (double)floats * 4.0;
        if (!(t->t[i] = malloc(floats * sizeof(float) + 1))) {
            spar__tensors_free(t);
            return spar_errorf(SPAR_ENOMEM, "cannot allocate %.1f MiB for %lld tokens",
                               bytes / 1048576.0, (long long)n);
        }
    }
    return SPAR_OK;
}

spar_attn_io spar__tensors_io(const spar_tensors *t) {
    return (spar_attn_io){t->t[T_Q],    t->t[T_K],  t->t[T_V],  t->t[T_O],  t->t[T_LSE],
                          t->t[T_DOUT], t->t[T_DQ], t->t[T_DK], t->t[T_DV], t->states};
}

/* One input tensor: from its .npy file (rank 0 reads, data offset re-read here) or
 * random from the seed. */
static int load_input(spar_comm *comm, const spar_config *cfg, const spar_partition *part,
                      spar_tensors *t, int i) {
    const char *path = cfg->v[specs[i].input_key].s;
    spar_row_source src = {*path ? path : NULL, 0, (uint64_t)cfg->v[SPAR_KEY_DATA_SEED].i,
                           specs[i].stream};
    int status = SPAR_OK;
    if (src.path && (!comm || spar_comm_rank(comm) == 0)) {
        spar_npy_info info;
        spar_err err;
        /* A failure still takes part in the exchange below (zeros go out; the status comes
         * back), so that the other ranks' receives stay matched. */
        if (spar__npy_read_info(src.path, &info, &err) != 0)
            status = spar_errorf(SPAR_EFORMAT, "%s", err.msg);
        src.data_offset = status ? -1 : info.data_offset;
    }
    int64_t row = t->row[specs[i].rows];
    int rc = comm ? spar__rows_scatter(comm, part, &src, row, t->t[i])
                  : spar__rows_fill(&src, part, 0, row, t->t[i]);
    return status ? status : rc;
}

/* Inputs for this rank (or the whole sequence when comm is NULL and part has one rank).
 * Every input is attempted so that the ranks' exchanges stay matched. */
int spar__tensors_load(spar_comm *comm, const spar_config *cfg, const spar_partition *part,
                       spar_tensors *t) {
    int status = SPAR_OK;
    for (int i = 0; i < T_COUNT; i++) {
        if (specs[i].input_key < 0 || !spar__tensor_in_use(t, i)) continue;
        int rc = load_input(comm, cfg, part, t, i);
        status = status ? status : rc;
    }
    return status;
}

/* One pass of the method: every rank for a distributed method, rank 0 for local. */
int spar__run_pass(spar_comm *comm, const spar_method *method, const spar_attn_problem *prob,
                   const spar_tensors *t, bool backward, spar_metrics *m) {
    SPAR_TRY(spar_comm_barrier(comm));
    *m = (spar_metrics){0};
    if (method->whole_sequence && spar_comm_rank(comm) != 0) return SPAR_OK;
    spar_attn_io io = spar__tensors_io(t);
    return (backward ? method->backward : method->forward)(comm, prob, &io, m);
}

/* run.device=cuda: this rank's GPU, by its rank on this host (the launcher says which). */
static int use_gpu(int rank) {
    static const char *vars[] = {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID"};
    int local = 0, device = 0;
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++)
        if (getenv(vars[i])) {
            local = atoi(getenv(vars[i]));
            break;
        }
    int rc = spar_kernels_cuda_use_device(local, &device);
    if (rc == 0) spar_log_debug("rank %d (local rank %d) uses CUDA device %d", rank, local, device);
    return rc;
}

/* The decay of every head: one number for all, or the ALiBi rule. decay: [heads]. */
void spar__decay_from_config(const spar_config *cfg, int heads, double *decay) {
    double lambda = cfg->v[SPAR_KEY_ATTN_DECAY].f;
    if (isnan(lambda)) /* alibi */
        spar_alibi_decay(heads, decay);
    else
        for (int h = 0; h < heads; h++)
            decay[h] = lambda;
}

void spar__problem_from_config(const spar_config *cfg, const spar_partition *part,
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
        .kernels = strcmp(cfg->v[SPAR_KEY_RUN_DEVICE].s, "cuda") == 0
                       ? spar_kernels_cuda()
                       : spar_kernels_select(cfg->v[SPAR_KEY_RUN_KERNEL].s),
        .query_block = cfg->v[SPAR_KEY_RUN_QUERY_BLOCK].i,
        .head_groups = (int)cfg->v[SPAR_KEY_PAR_HEAD_GROUPS].i,
        .bf16 = strcmp(cfg->v[SPAR_KEY_RUN_DTYPE].s, "bf16") == 0,
        .progress = spar__show_progress,
    };
}

enum spar_partition_kind spar__partition_kind(const char *name) {
    if (strcmp(name, "zigzag") == 0) return SPAR_PARTITION_ZIGZAG;
    if (strcmp(name, "stripe") == 0) return SPAR_PARTITION_STRIPE;
    return SPAR_PARTITION_CONTIGUOUS;
}

int spar__experiment_setup(spar_experiment *x, spar_comm *comm, const spar_config *cfg) {
    int rank = spar_comm_rank(comm), p = spar_comm_size(comm), worst = 0;
    *x = (spar_experiment){.method = spar_method_find(cfg->v[SPAR_KEY_PAR_METHOD].s),
                           .backward = cfg->v[SPAR_KEY_RUN_BACKWARD].b};
    bool whole = x->method->whole_sequence;
    int64_t n = cfg->v[SPAR_KEY_SEQ_LENGTH].i;
    spar_partition_init(&x->part,
                        whole ? SPAR_PARTITION_CONTIGUOUS
                              : spar__partition_kind(cfg->v[SPAR_KEY_SEQ_PARTITION].s),
                        n, whole ? 1 : p);
    int heads = (int)cfg->v[SPAR_KEY_ATTN_HEADS].i, rc = SPAR_ENOMEM;
    if ((x->decay = malloc(sizeof(double) * (size_t)heads))) {
        spar__decay_from_config(cfg, heads, x->decay);
        spar__problem_from_config(cfg, &x->part, x->decay, &x->prob);
        x->t0 = spar_comm_wtime();
        x->prob.progress_ctx = &x->t0;
        if (rank == 0) spar__progress_configure(cfg);
        int gpu = strcmp(cfg->v[SPAR_KEY_RUN_DEVICE].s, "cuda") == 0 ? use_gpu(rank) : SPAR_OK;
        spar_kernels_set_threads((int)cfg->v[SPAR_KEY_RUN_THREADS].i);
        int64_t n_local = whole ? (rank == 0 ? n : 0) : spar_partition_local_len(&x->part, rank);
        rc = gpu != 0      ? gpu
             : n_local > 0 ? spar__tensors_alloc(&x->t, n_local, &x->prob, x->backward)
                           : SPAR_OK;
        if (rc == 0 && n_local > 0)
            rc = spar__tensors_load(whole ? NULL : comm, cfg, &x->part, &x->t);
    }
    x->t.backward = x->backward;
    x->t.linear = x->prob.type == SPAR_ATTN_LINEAR;
    if (spar_comm_agree(comm, rc, &worst) != 0) worst = SPAR_ECOMM;
    if (worst != 0) spar__experiment_free(x);
    return worst;
}

void spar__experiment_free(spar_experiment *x) {
    spar__tensors_free(&x->t);
    free(x->decay);
    x->decay = NULL;
}
