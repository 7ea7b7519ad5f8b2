/* validate.c: rules that involve several keys, the world size or the file system.
 *
 * Run on rank 0 before the plan is broadcast (and by `spar config check`), so that bad
 * input stops the job before any rank allocates or computes anything.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "launcher.h"

static int64_t key_int(const spar_config *cfg, int id) {
    return cfg->v[id].i;
}

static const char *key_str(const spar_config *cfg, int id) {
    return cfg->v[id].s;
}

static void set_text(spar_config *cfg, int id, const char *text) {
    snprintf(cfg->v[id].s, sizeof cfg->v[id].s, "%s", text);
}

/* run.device=cuda: a device, and its own kernels. */
static int check_device(const spar_config *cfg, spar_err *err) {
    if (strcmp(key_str(cfg, SPAR_KEY_RUN_DEVICE), "cuda") != 0) return SPAR_OK;
    char why[256] = "";
    if (spar_kernels_cuda_devices(why, sizeof why) == 0)
        return spar__err_set(err, SPAR_EUNSUP, "key run.device: 'cuda': %s (allowed: cpu)", why);
    if (strcmp(key_str(cfg, SPAR_KEY_RUN_KERNEL), "auto") != 0)
        return spar__err_set(err, SPAR_EINVAL,
                             "key run.kernel: '%s' with run.device=cuda (allowed: auto; the "
                             "device has its own kernels)",
                             key_str(cfg, SPAR_KEY_RUN_KERNEL));
    return SPAR_OK;
}

/* run.dtype=bf16: the GPU's ring only (other paths hand the kernels fp32 tensors). After
 * check_methods: the method is resolved. */
static int check_dtype(const spar_config *cfg, spar_err *err) {
    if (strcmp(key_str(cfg, SPAR_KEY_RUN_DTYPE), "bf16") != 0) return SPAR_OK;
    if (strcmp(key_str(cfg, SPAR_KEY_RUN_DEVICE), "cuda") != 0)
        return spar__err_set(err, SPAR_EINVAL,
                             "key run.dtype: 'bf16' with run.device=%s (allowed: fp32; bf16 "
                             "storage is for run.device=cuda)",
                             key_str(cfg, SPAR_KEY_RUN_DEVICE));
    if (strcmp(key_str(cfg, SPAR_KEY_PAR_METHOD), "ring") != 0)
        return spar__err_set(err, SPAR_EINVAL,
                             "key run.dtype: 'bf16' with parallel.method=%s (allowed: fp32; on "
                             "the GPU only the ring keeps bf16 tensors so far)",
                             key_str(cfg, SPAR_KEY_PAR_METHOD));
    return SPAR_OK;
}

/* The method and partition for this attention type, "auto" resolved here so that every
 * rank runs (and every record shows) the same thing. */
static int check_methods(spar_config *cfg, spar_err *err) {
    if (!spar_kernels_select(key_str(cfg, SPAR_KEY_RUN_KERNEL)))
        return spar__err_set(err, SPAR_EUNSUP,
                             "key run.kernel: '%s' is not in this build (allowed: %s)",
                             key_str(cfg, SPAR_KEY_RUN_KERNEL), spar_kernels_names());
    if (strcmp(key_str(cfg, SPAR_KEY_RUN_KERNEL), "none") == 0 && cfg->v[SPAR_KEY_RUN_VERIFY].b)
        return spar__err_set(err, SPAR_EINVAL,
                             "key run.verify: true with run.kernel=none (allowed: false; that "
                             "kernel computes nothing)");
    bool linear = strcmp(key_str(cfg, SPAR_KEY_ATTN_TYPE), "linear") == 0;
    bool causal = cfg->v[SPAR_KEY_ATTN_CAUSAL].b;
    if (strcmp(key_str(cfg, SPAR_KEY_PAR_METHOD), "auto") == 0)
        set_text(cfg, SPAR_KEY_PAR_METHOD, linear ? "lasp2" : "ring");
    if (strcmp(key_str(cfg, SPAR_KEY_SEQ_PARTITION), "auto") == 0)
        set_text(cfg, SPAR_KEY_SEQ_PARTITION, !linear && causal ? "zigzag" : "contiguous");
    const char *method = key_str(cfg, SPAR_KEY_PAR_METHOD);
    const spar_method *m = spar_method_find(method);
    if (!m || (linear ? !m->linear : !m->softmax))
        return spar__err_set(err, SPAR_EINVAL,
                             "key parallel.method: '%s' does not compute %s attention (allowed: "
                             "%s|local)",
                             method, linear ? "linear" : "softmax",
                             linear ? "lasp2|lasp1" : "ring|allgather");
    const char *part = key_str(cfg, SPAR_KEY_SEQ_PARTITION);
    if (linear && !m->whole_sequence && strcmp(part, "contiguous") != 0)
        return spar__err_set(err, SPAR_EINVAL,
                             "key sequence.partition: '%s' with linear attention (allowed: "
                             "contiguous; every token costs the same, so there is no causal "
                             "imbalance to even out)",
                             part);
    return SPAR_OK;
}

/* Keys that belong to the other attention type are refused rather than ignored. */
static int check_type_keys(const spar_config *cfg, spar_err *err) {
    bool linear = strcmp(key_str(cfg, SPAR_KEY_ATTN_TYPE), "linear") == 0;
    if (linear && key_int(cfg, SPAR_KEY_ATTN_HEAD_DIM) > 1024) /* d x d states per head */
        return spar__err_set(err, SPAR_EINVAL,
                             "key attention.head_dim: %lld with attention.type=linear (allowed: "
                             "at most 1024; each head keeps a d x d state)",
                             (long long)key_int(cfg, SPAR_KEY_ATTN_HEAD_DIM));
    if (linear && !isnan(cfg->v[SPAR_KEY_ATTN_SCALE].f))
        return spar__err_set(err, SPAR_EINVAL,
                             "key attention.scale: %g with attention.type=linear (allowed: auto; "
                             "linear attention has no softmax and no scale)",
                             cfg->v[SPAR_KEY_ATTN_SCALE].f);
    if (linear && *key_str(cfg, SPAR_KEY_OUT_LSE))
        return spar__err_set(err, SPAR_EINVAL,
                             "key output.lse: '%s' with attention.type=linear (allowed: empty; "
                             "there is no softmax, so no log-sum-exp)",
                             key_str(cfg, SPAR_KEY_OUT_LSE));
    if (!linear && cfg->v[SPAR_KEY_ATTN_DECAY].f != 1.0)
        return spar__err_set(err, SPAR_EINVAL,
                             "key attention.decay: '%s' with attention.type=softmax (allowed: 1; "
                             "the decay belongs to linear attention)",
                             key_str(cfg, SPAR_KEY_ATTN_DECAY));
    return SPAR_OK;
}

/* Gradient files only make sense with a backward pass: say so rather than ignore them. */
static int check_backward(const spar_config *cfg, spar_err *err) {
    static const int keys[] = {SPAR_KEY_DATA_DO, SPAR_KEY_OUT_DQ, SPAR_KEY_OUT_DK, SPAR_KEY_OUT_DV};
    if (cfg->v[SPAR_KEY_RUN_BACKWARD].b) return SPAR_OK;
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
        if (*key_str(cfg, keys[i]))
            return spar__err_set(err, SPAR_EINVAL,
                                 "key %s: '%s' is given but run.backward is false (allowed: "
                                 "set run.backward=true, or leave %s empty)",
                                 spar__keys[keys[i]].name, key_str(cfg, keys[i]),
                                 spar__keys[keys[i]].name);
    return SPAR_OK;
}

int spar__check_heads(spar_config *cfg, spar_err *err) {
    int64_t h = key_int(cfg, SPAR_KEY_ATTN_HEADS), g = key_int(cfg, SPAR_KEY_ATTN_KV_HEADS);
    if (g == 0) /* resolve the default here so that every rank sees the same number */
        cfg->v[SPAR_KEY_ATTN_KV_HEADS].i = g = h;
    if (g > h || h % g != 0)
        return spar__err_set(err, SPAR_EINVAL,
                             "key attention.kv_heads: %lld does not divide "
                             "attention.heads=%lld (allowed: a divisor of the heads)",
                             (long long)g, (long long)h);
    return SPAR_OK;
}

int spar__check_plan_ranks(const spar_config *cfg, int world_size, spar_err *err) {
    int64_t want = key_int(cfg, SPAR_KEY_PAR_RANKS);
    if (world_size > 0 && want > 0 && want != world_size)
        return spar__err_set(err, SPAR_EINVAL,
                             "key parallel.ranks: the plan needs %lld ranks but "
                             "the job has %d (start it with -np %lld, or set parallel.ranks=0)",
                             (long long)want, world_size, (long long)want);
    return SPAR_OK;
}

static int check_ranks(const spar_config *cfg, int world_size, spar_err *err) {
    int64_t want = key_int(cfg, SPAR_KEY_PAR_RANKS), n = key_int(cfg, SPAR_KEY_SEQ_LENGTH);
    SPAR_TRY(spar__check_plan_ranks(cfg, world_size, err));
    int64_t p = world_size > 0 ? world_size : want;
    if (p > 0 && n < p)
        return spar__err_set(err, SPAR_EINVAL,
                             "key sequence.length: %lld is smaller than the "
                             "number of ranks (%lld): every rank needs at least one token",
                             (long long)n, (long long)p);
    return SPAR_OK;
}

/* An element count times bytes that must fit in memory addresses at all. */
static int check_sizes(const spar_config *cfg, spar_err *err) {
    double n = (double)key_int(cfg, SPAR_KEY_SEQ_LENGTH);
    double row =
        (double)key_int(cfg, SPAR_KEY_ATTN_HEADS) * (double)key_int(cfg, SPAR_KEY_ATTN_HEAD_DIM);
    if (n * row * 4.0 > 9.0e18)
        return spar__err_set(err, SPAR_EINVAL,
                             "sequence.length x heads x head_dim = %.3g elements "
                             "is too large to address",
                             n * row);
    return SPAR_OK;
}

double spar__host_memory_bytes(void) {
    long pages = sysconf(_SC_PHYS_PAGES), size = sysconf(_SC_PAGE_SIZE);
    return pages > 0 && size > 0 ? (double)pages * (double)size : 0.0;
}

/* Tasks of this srun step on this node: SLURM_STEP_TASKS_PER_NODE ("2(x3),1": 2 tasks on
 * each of the first 3 nodes, then 1) at index SLURM_NODEID. 0 when not under srun or
 * unreadable. (Open MPI sets no local size of its own when srun starts the ranks.) */
static int slurm_tasks_here(void) {
    const char *list = getenv("SLURM_STEP_TASKS_PER_NODE"), *id = getenv("SLURM_NODEID");
    if (!list || !id) return 0;
    long node = strtol(id, NULL, 10);
    for (const char *p = list; *p && node >= 0;) {
        char *end;
        long tasks = strtol(p, &end, 10), times = 1;
        if (end == p || tasks < 0) return 0;
        if (strncmp(end, "(x", 2) == 0) {
            times = strtol(end + 2, &end, 10);
            if (*end++ != ')' || times < 1) return 0;
        }
        if (node < times) return tasks > INT_MAX ? 0 : (int)tasks;
        node -= times;
        if (*end == ',')
            end++;
        else if (*end)
            return 0;
        p = end;
    }
    return 0;
}

/* Ranks started on rank 0's host (the launchers say how many); they share its memory. */
static double ranks_on_this_host(double p) {
    static const char *vars[] = {"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"};
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++) {
        const char *v = getenv(vars[i]);
        if (v && atoi(v) > 0) return fmin((double)atoi(v), p);
    }
    int slurm = slurm_tasks_here();
    return slurm > 0 ? fmin((double)slurm, p) : 1.0;
}

/* What one rank holds, at least: its tensors (q, k, v, o, lse; do and the gradients with
 * run.backward) and the K/V its method keeps besides (the ring's two blocks in flight,
 * all-gather's whole sequence per head group). Refused here, with the sizes, when the
 * ranks on this host would not fit in its memory: an allocation far past it fails later
 * with only "cannot allocate", or succeeds and brings the OOM killer. */
static int check_memory(const spar_config *cfg, int world_size, spar_err *err) {
    int64_t want = key_int(cfg, SPAR_KEY_PAR_RANKS),
            groups = key_int(cfg, SPAR_KEY_PAR_HEAD_GROUPS);
    double p = world_size > 0 ? world_size : (double)want;
    if (p <= 0) return SPAR_OK; /* config check without parallel.ranks: not known */
    const char *method = key_str(cfg, SPAR_KEY_PAR_METHOD);
    const spar_method *m = spar_method_find(method);
    double n = (double)key_int(cfg, SPAR_KEY_SEQ_LENGTH);
    double c = m && m->whole_sequence ? n : ceil(n / p); /* this rank's tokens, at most */
    double h = (double)key_int(cfg, SPAR_KEY_ATTN_HEADS);
    double g = (double)key_int(cfg, SPAR_KEY_ATTN_KV_HEADS);
    double d = (double)key_int(cfg, SPAR_KEY_ATTN_HEAD_DIM);
    double passes = cfg->v[SPAR_KEY_RUN_BACKWARD].b ? 2.0 : 1.0;
    double floats = c * (2 * h * d + 2 * g * d + h) * passes;
    if (strcmp(method, "ring") == 0) floats += 2 * 2 * c * g * d;
    if (strcmp(method, "allgather") == 0) /* 0 head groups = min(kv_heads, 4) */
        floats += 2 * 2 * n * ceil(g / fmin(g, groups > 0 ? (double)groups : 4.0)) * d * passes;
    double need = 4.0 * floats, local = ranks_on_this_host(p), host = spar__host_memory_bytes();
    if (host <= 0 || need * local <= host) return SPAR_OK;
    return spar__err_set(err, SPAR_EINVAL,
                         "sequence.length=%lld: each of the %.0f rank(s) on this host would hold "
                         "at least %.3g GiB (%.0f tokens x %lld heads x head_dim %lld, method "
                         "%s) but this host has %.3g GiB of memory (allowed: a shorter sequence, "
                         "fewer or smaller heads, or more ranks on more hosts)",
                         (long long)key_int(cfg, SPAR_KEY_SEQ_LENGTH), local, need / 1073741824.0,
                         c, (long long)key_int(cfg, SPAR_KEY_ATTN_HEADS),
                         (long long)key_int(cfg, SPAR_KEY_ATTN_HEAD_DIM), method,
                         host / 1073741824.0);
}

/* The directory of `path` must accept a new file: try one. */
int spar__check_writable(const char *key, const char *path, spar_err *err) {
    struct stat st;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode))
        return spar__err_set(err, SPAR_EIO, "key %s: '%s' is a directory (allowed: a file path)",
                             key, path);
    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (!slash)
        snprintf(dir, sizeof dir, ".");
    else if (slash == dir)
        dir[1] = '\0';
    else
        *slash = '\0';
    char probe[PATH_MAX + 32];
    snprintf(probe, sizeof probe, "%s/.spar-probe-%d", dir, (int)getpid());
    int fd = open(probe, O_WRONLY | O_CREAT | O_EXCL, 0600);
    if (fd < 0)
        return spar__err_set(err, SPAR_EIO, "key %s: cannot write '%s': directory '%s': %s", key,
                             path, dir, strerror(errno));
    close(fd);
    unlink(probe);
    return SPAR_OK;
}

static int check_inputs(const spar_config *cfg, spar_err *err) {
    int64_t n = key_int(cfg, SPAR_KEY_SEQ_LENGTH), d = key_int(cfg, SPAR_KEY_ATTN_HEAD_DIM);
    int64_t shape_q[3] = {n, key_int(cfg, SPAR_KEY_ATTN_HEADS), d};
    int64_t shape_kv[3] = {n, key_int(cfg, SPAR_KEY_ATTN_KV_HEADS), d};
    static const struct {
        int id;
        int is_q;
    } inputs[] = {
        {SPAR_KEY_DATA_Q, 1}, {SPAR_KEY_DATA_K, 0}, {SPAR_KEY_DATA_V, 0}, {SPAR_KEY_DATA_DO, 1}};
    for (size_t i = 0; i < sizeof inputs / sizeof inputs[0]; i++) {
        const char *path = key_str(cfg, inputs[i].id);
        spar_npy_info info;
        if (*path)
            SPAR_TRY(spar__npy_check(spar__keys[inputs[i].id].name, path, 3,
                                     inputs[i].is_q ? shape_q : shape_kv, &info, err));
    }
    return SPAR_OK;
}

int spar__config_validate(spar_config *cfg, int world_size, spar_err *err) {
    if (strcmp(key_str(cfg, SPAR_KEY_RUN_MODE), "generate") == 0)
        return spar__validate_generate(cfg, world_size, err);
    if (strcmp(key_str(cfg, SPAR_KEY_PAR_METHOD), "offload") == 0)
        return spar__err_set(err, SPAR_EINVAL,
                             "key parallel.method: 'offload' with run.mode=attention (allowed: "
                             "ring|allgather|lasp2|lasp1|local; offload serves run.mode=generate)");
    SPAR_TRY(check_methods(cfg, err));
    SPAR_TRY(check_device(cfg, err));
    SPAR_TRY(check_dtype(cfg, err));
    SPAR_TRY(check_type_keys(cfg, err));
    SPAR_TRY(spar__check_heads(cfg, err));
    SPAR_TRY(check_backward(cfg, err));
    SPAR_TRY(check_ranks(cfg, world_size, err));
    SPAR_TRY(check_sizes(cfg, err));
    SPAR_TRY(check_memory(cfg, world_size, err));
    SPAR_TRY(check_inputs(cfg, err));
    static const int outputs[] = {SPAR_KEY_OUT_O,  SPAR_KEY_OUT_LSE, SPAR_KEY_OUT_DQ,
                                  SPAR_KEY_OUT_DK, SPAR_KEY_OUT_DV,  SPAR_KEY_OUT_RESULTS};
    for (size_t i = 0; i < sizeof outputs / sizeof outputs[0]; i++) {
        const char *path = key_str(cfg, outputs[i]);
        if (*path) SPAR_TRY(spar__check_writable(spar__keys[outputs[i]].name, path, err));
    }
    return SPAR_OK;
}
