/* launcher.h: the spar program's internal API (launcher room).
 *
 * The one key table (SPAR_KEY_LIST) drives the YAML parser, --set, validation,
 * `spar config show`, the help texts and the schema document. A configuration is one
 * typed value per key plus where it came from. Rank 0 validates it and packs it into a
 * protobuf RunPlan that every rank unpacks, so all ranks run the same plan.
 *
 * Defines: the key table and spar_config; YAML and --set loading; validation; RunPlan
 *          packing; .npy headers; tensor scatter/gather by partition; reports.
 */
#ifndef SPAR_LAUNCHER_H
#define SPAR_LAUNCHER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "spar.h"

/* Exit codes of the spar program. */
enum { SPAR_EXIT_OK = 0, SPAR_EXIT_FAILURE = 1, SPAR_EXIT_BAD_INPUT = 2, SPAR_EXIT_VERIFY = 3 };

enum spar_key_type { SPAR_KT_BOOL, SPAR_KT_INT, SPAR_KT_FLOAT, SPAR_KT_ENUM, SPAR_KT_STRING };

/* X(id, name, type, default, allowed, min, max, doc). For ENUM, `allowed` lists the
 * values; for INT and FLOAT, [min, max] bounds the value ("auto" is accepted where the
 * default is "auto"). */
#define SPAR_KEY_LIST(X)                                                                           \
    X(ATTN_TYPE, "attention.type", ENUM, "softmax", "softmax|linear", 0, 0,                        \
      "softmax attention, or linear attention (no softmax, no scale; see attention.decay)")        \
    X(ATTN_CAUSAL, "attention.causal", BOOL, "true", "true|false", 0, 0,                           \
      "key j is visible to query i only when j <= i")                                              \
    X(ATTN_HEADS, "attention.heads", INT, "8", "integer >= 1", 1, 65536, "query heads H")          \
    X(ATTN_KV_HEADS, "attention.kv_heads", INT, "0", "integer dividing heads; 0 = heads", 0,       \
      65536, "key/value heads G (G < H is GQA/MQA)")                                               \
    X(ATTN_HEAD_DIM, "attention.head_dim", INT, "64", "integer >= 1", 1, 65536,                    \
      "head dimension d")                                                                          \
    X(ATTN_SCALE, "attention.scale", FLOAT, "auto", "auto or a number > 0", 1e-30, 1e30,           \
      "softmax scale; auto = 1/sqrt(head_dim)")                                                    \
    X(ATTN_DECAY, "attention.decay", FLOAT, "1", "alibi or a number in (0, 1]", 1e-300, 1.0,       \
      "linear attention: lambda for every head (1 = no decay), or alibi: lambda_h = "              \
      "exp(-slope_h) with the ALiBi slopes")                                                       \
    X(SEQ_LENGTH, "sequence.length", INT, "4096", "integer >= ranks (K, M, G = 2^10, 2^20, 2^30)", \
      1, (double)(1LL << 40), "global sequence length N")                                          \
    X(SEQ_PARTITION, "sequence.partition", ENUM, "auto", "auto|contiguous|zigzag|stripe", 0, 0,    \
      "how tokens are split over the ranks; auto = zigzag for causal softmax, else contiguous")    \
    X(PAR_METHOD, "parallel.method", ENUM, "auto",                                                 \
      "auto|ring|allgather|lasp2|lasp1|local|offload", 0, 0,                                       \
      "softmax: ring (K/V blocks around a ring) or allgather (LASP-2H); linear: lasp2 (one "       \
      "all-gather of memory states) or lasp1 (serial chain); local = whole sequence on rank 0; "   \
      "offload (run.mode=generate): KV cache and attention on the last parallel.attention_ranks; " \
      "auto = ring (softmax), lasp2 (linear), offload (generate on several ranks)")                \
    X(PAR_ATTN_RANKS, "parallel.attention_ranks", INT, "1", "integer >= 1, < ranks", 1, 1 << 20,   \
      "offload: ranks at the end of the world that hold the KV cache and run attention")           \
    X(PAR_MICRO_BATCHES, "parallel.micro_batches", INT, "2", "integer >= 1", 1, 1 << 20,           \
      "offload: micro-batches per compute rank, alternating so that dense layers and attention "   \
      "overlap")                                                                                   \
    X(PAR_PREFILL, "parallel.prefill", ENUM, "local", "local|ring|allgather", 0, 0,                \
      "offload: local = each prompt prefilled by the compute rank that serves it; ring or "        \
      "allgather = every compute rank takes a share of each prompt (split as sequence.partition, " \
      "auto = zigzag) and attention runs by that method")                                          \
    X(PAR_HEAD_GROUPS, "parallel.head_groups", INT, "0", "integer >= 0; 0 = min(kv_heads, 4)", 0,  \
      65536, "allgather: kv-head groups; group g+1 is gathered while group g computes")            \
    X(PAR_RANKS, "parallel.ranks", INT, "0", "integer >= 0", 0, 1 << 24,                           \
      "ranks the plan needs; 0 = whatever mpirun/srun starts")                                     \
    X(DATA_Q, "data.q", STRING, "", "path of a .npy file, float32 [N,H,d]", 0, 0,                  \
      "queries; random from data.seed when empty")                                                 \
    X(DATA_K, "data.k", STRING, "", "path of a .npy file, float32 [N,G,d]", 0, 0,                  \
      "keys; random from data.seed when empty")                                                    \
    X(DATA_V, "data.v", STRING, "", "path of a .npy file, float32 [N,G,d]", 0, 0,                  \
      "values; random from data.seed when empty")                                                  \
    X(DATA_DO, "data.do", STRING, "", "path of a .npy file, float32 [N,H,d]", 0, 0,                \
      "output gradient for run.backward; random from data.seed when empty")                        \
    X(DATA_SEED, "data.seed", INT, "1", "integer >= 0", 0, 9007199254740992.0,                     \
      "seed of the random inputs (the same data whatever the partition)")                          \
    X(OUT_O, "output.o", STRING, "", "path of a .npy file to write", 0, 0,                         \
      "attention output [N,H,d] in global token order; empty = not written")                       \
    X(OUT_LSE, "output.lse", STRING, "", "path of a .npy file to write", 0, 0,                     \
      "log-sum-exp [N,H] in global token order; empty = not written")                              \
    X(OUT_DQ, "output.dq", STRING, "", "path of a .npy file to write", 0, 0,                       \
      "query gradient [N,H,d] (needs run.backward=true); empty = not written")                     \
    X(OUT_DK, "output.dk", STRING, "", "path of a .npy file to write", 0, 0,                       \
      "key gradient [N,G,d] (needs run.backward=true); empty = not written")                       \
    X(OUT_DV, "output.dv", STRING, "", "path of a .npy file to write", 0, 0,                       \
      "value gradient [N,G,d] (needs run.backward=true); empty = not written")                     \
    X(OUT_RESULTS, "output.results", STRING, "", "path of a JSON-lines file", 0, 0,                \
      "one record per run is appended here; empty = none")                                         \
    X(RUN_MODE, "run.mode", ENUM, "attention", "attention|generate", 0, 0,                         \
      "attention: one attention problem (forward, backward); generate: greedy decoding with the "  \
      "model: section's decoder")                                                                  \
    X(MODEL_LAYERS, "model.layers", INT, "2", "integer >= 1", 1, 4096, "decoder layers")           \
    X(MODEL_HIDDEN, "model.hidden", INT, "0", "integer >= 0; 0 = heads x head_dim", 0, 1 << 20,    \
      "hidden size D of the residual stream")                                                      \
    X(MODEL_FFN, "model.ffn", INT, "0", "integer >= 0; 0 = 8 D / 3 rounded up to 8", 0, 1 << 22,   \
      "SwiGLU inner size F")                                                                       \
    X(MODEL_VOCAB, "model.vocab", INT, "256", "integer >= 2", 2, 1 << 24, "vocabulary size V")     \
    X(MODEL_ROPE_BASE, "model.rope_base", FLOAT, "10000", "number > 1", 1.0000001, 1e12,           \
      "RoPE base: angle of pair e at position p = p base^(-2e/head_dim)")                          \
    X(MODEL_NORM_EPS, "model.norm_eps", FLOAT, "1e-5", "number > 0", 1e-30, 1.0,                   \
      "RMSNorm epsilon")                                                                           \
    X(MODEL_WEIGHTS, "model.weights", STRING, "", "a directory of .npy files", 0, 0,               \
      "float32 weights (names and shapes in configs/README.md); random from data.seed when "       \
      "empty")                                                                                     \
    X(WORK_BATCH, "workload.batch", INT, "4", "integer >= 1", 1, 1 << 20, "requests B")            \
    X(WORK_PROMPT_LENGTHS, "workload.prompt_lengths", STRING, "16",                                \
      "comma-separated integers >= 1", 0, 0,                                                       \
      "random prompts' lengths, used in turn for requests 0, 1, ... (ignored with "                \
      "workload.prompts)")                                                                         \
    X(WORK_PROMPTS, "workload.prompts", STRING, "", "path of a .npy file, int32 [B, L]", 0, 0,     \
      "prompt token ids, one row per request, -1 after a shorter prompt's end; random from "       \
      "data.seed when empty")                                                                      \
    X(WORK_GENERATE, "workload.generate", INT, "16", "integer >= 1", 1, 1 << 20,                   \
      "tokens generated per request (greedy)")                                                     \
    X(OUT_TOKENS, "output.tokens", STRING, "", "path of a .npy file to write", 0, 0,               \
      "generated token ids, int32 [B, generate]; empty = not written")                             \
    X(OUT_LOGITS, "output.logits", STRING, "", "path of a .npy file to write", 0, 0,               \
      "logits of each request's last generated token, float32 [B, V]; empty = not written")        \
    X(RUN_NAME, "run.name", STRING, "", "any text", 0, 0, "a label carried into the record")       \
    X(RUN_BACKWARD, "run.backward", BOOL, "false", "true|false", 0, 0,                             \
      "run the backward pass after the forward pass")                                              \
    X(BENCH_WARMUP, "bench.warmup", INT, "1", "integer >= 0", 0, 1000,                             \
      "spar bench: unmeasured runs before the measured ones")                                      \
    X(BENCH_REPEATS, "bench.repeats", INT, "5", "integer >= 1", 1, 10000,                          \
      "spar bench: measured runs; the table shows their median and spread")                        \
    X(RUN_VERIFY, "run.verify", BOOL, "false", "true|false", 0, 0,                                 \
      "recompute on rank 0 with the local method and report the error")                            \
    X(RUN_VERIFY_TOL, "run.verify_tol", FLOAT, "1e-4", "number > 0", 1e-30, 1.0,                   \
      "largest relative L2 error that run.verify accepts (exit 3 beyond)")                         \
    X(RUN_KERNEL, "run.kernel", ENUM, "auto", "auto|blas|blocked|scalar|none", 0, 0,               \
      "kernel backend: blas (OpenBLAS block products, SIMD softmax), blocked, scalar (the "        \
      "oracle), none (no arithmetic: times communication and memory alone); auto = the "           \
      "fastest this build has")                                                                    \
    X(RUN_DEVICE, "run.device", ENUM, "cpu", "cpu|cuda", 0, 0,                                     \
      "where the kernels run: cpu, or cuda (a build with nvcc and a visible GPU; the ring keeps "  \
      "its tensors on the GPU, the other methods stage each block through host memory)")           \
    X(RUN_DTYPE, "run.dtype", ENUM, "fp32", "fp32|bf16", 0, 0,                                     \
      "storage of q, k, v and dout for the kernels: bf16 runs on tensor cores and halves the "    \
      "bytes on the ring (run.device=cuda, parallel.method=ring); accumulation and outputs stay " \
      "fp32, relative errors grow to about 1e-2 (set run.verify_tol to match)")                  \
    X(RUN_THREADS, "run.threads", INT, "1", "integer >= 0; 0 = all cores", 0, 4096,                \
      "kernel threads per rank (ranks per host x threads should not exceed its cores)")            \
    X(RUN_RESUME, "run.resume", BOOL, "true", "true|false", 0, 0,                                  \
      "a sweep skips the points whose record output.results already holds (a restarted job "       \
      "goes on where it stopped); false runs every point")                                         \
    X(RUN_PROGRESS, "run.progress", ENUM, "auto", "auto|bar|lines|off", 0, 0,                      \
      "what rank 0 shows during a run: bar (one line redrawn, with ETA), lines (timestamped, "     \
      "for batch logs), off; auto = bar when a terminal watches, else lines")                      \
    X(RUN_QUERY_BLOCK, "run.query_block", INT, "256", "integer >= 1", 1, 1 << 30,                  \
      "queries per kernel call; the ring makes progress between calls")                            \
    X(COMM_TIMEOUT, "comm.timeout", FLOAT, "1800", "number >= 0 (seconds); 0 = no limit", 0, 1e9,  \
      "how long any wait (ring step, all-gather, chain, decode exchange, end-of-run "              \
      "collective) lasts before the job stops, naming the peer (rank and host) or the "            \
      "collective: a stopped, hung or cut-off rank. A healthy rank can lag by a whole pass "       \
      "(allgather, lasp2, uneven causal work) or rank 0's run.verify recomputation, so the "       \
      "default is 30 min (PyTorch's process-group default); set a few seconds in tests")           \
    X(COMM_TRANSPORT, "comm.transport", ENUM, "auto", "auto|ucx|ob1", 0, 0,                        \
      "Open MPI PML: ucx where UCX works (auto), or ob1")

enum spar_key_id {
#define SPAR_KEY_ENUM(id, ...) SPAR_KEY_##id,
    SPAR_KEY_LIST(SPAR_KEY_ENUM)
#undef SPAR_KEY_ENUM
        SPAR_KEY_COUNT
};

typedef struct spar_key {
    const char *name;
    enum spar_key_type type;
    const char *def;
    const char *allowed;
    double min, max;
    const char *doc;
} spar_key;

extern const spar_key spar__keys[SPAR_KEY_COUNT];

enum spar_origin {
    SPAR_FROM_DEFAULT = 0,
    SPAR_FROM_FILE = 1,
    SPAR_FROM_COMMAND_LINE = 2,
    SPAR_FROM_SWEEP = 3,
    SPAR_FROM_INCLUDE = 4 /* a file's `include:` (which the file's own keys override) */
};

typedef struct spar_value {
    bool b;
    int64_t i;
    double f; /* NAN for "auto" */
    char s[1024];
} spar_value;

/* A `sweep:` block: lists of values for some keys; their grid is run in one job. */
#define SPAR_SWEEP_KEYS 8
#define SPAR_SWEEP_VALUES 32
typedef struct spar_sweep {
    int nkeys;
    int key[SPAR_SWEEP_KEYS];
    int nvalues[SPAR_SWEEP_KEYS];
    char value[SPAR_SWEEP_KEYS][SPAR_SWEEP_VALUES][64];
} spar_sweep;

typedef struct spar_config {
    spar_value v[SPAR_KEY_COUNT];
    enum spar_origin origin[SPAR_KEY_COUNT];
    int line[SPAR_KEY_COUNT]; /* line in the file where the key was set */
    char file[1024];
    spar_sweep sweep; /* from the file; not part of the run plan */
    /* rank 0: the grid point this configuration is (sweep.c); not part of the run plan */
    int point, points;
    char point_id[17];
} spar_config;

/* Error text is written to err (one line naming the key, the value and what is
 * allowed); functions return 0 or a negative SPAR_E* status. */
typedef struct spar_err {
    char msg[2048];
} spar_err;
int spar__err_set(spar_err *err, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* keys.c */
void spar__config_defaults(spar_config *cfg);
int spar__key_find(const char *name);
int spar__config_set(spar_config *cfg, const char *name, const char *text, enum spar_origin origin,
                     int line, spar_err *err);
int spar__config_set_arg(spar_config *cfg, const char *assignment, spar_err *err);
void spar__value_format(const spar_config *cfg, int id, char *out, size_t len);
/* Every value again through the key table's rules (for values that did not come as
 * text, such as a received plan). */
int spar__config_recheck(const spar_config *cfg, spar_err *err);
const char *spar__origin_name(enum spar_origin origin);

/* Checks that text is a valid value of key `name` (as --set would parse it). */
int spar__value_check(const char *name, const char *text, spar_err *err);

/* config_yaml.c: every scalar of the file under its dotted key; `sweep:` lists into
 * cfg->sweep. */
int spar__config_load_yaml(spar_config *cfg, const char *path, spar_err *err);
/* The same for a file's text held in memory (name: for messages and relative includes);
 * with read_includes false an `include:` is checked but refused, so nothing else is read. */
int spar__config_load_yaml_text(spar_config *cfg, const char *name, const unsigned char *text,
                                size_t len, bool read_includes, spar_err *err);

/* validate.c: cross-key rules; world_size 0 = not known (config check). */
int spar__config_validate(spar_config *cfg, int world_size, spar_err *err);
int spar__check_heads(spar_config *cfg, spar_err *err); /* kv_heads resolved and checked */
/* parallel.ranks, when set, equals the world size (0: not known yet). */
int spar__check_plan_ranks(const spar_config *cfg, int world_size, spar_err *err);
int spar__check_writable(const char *key, const char *path, spar_err *err);
/* validate_generate.c: the rules of run.mode=generate. */
int spar__validate_generate(spar_config *cfg, int world_size, spar_err *err);
/* Prompt lengths of workload.prompt_lengths, used in turn: length of request b. */
int64_t spar__prompt_length(const spar_config *cfg, int b);

/* plan.c: RunPlan packing. *out is malloc'ed. */
int spar__plan_pack(const spar_config *cfg, int world_size, uint8_t **out, size_t *len);
/* world_size > 0: the plan must have been made for that many ranks. */
int spar__plan_unpack(spar_config *cfg, const uint8_t *buf, size_t len, int world_size,
                      spar_err *err);

/* npy.c */
typedef struct spar_npy_info {
    int ndim;
    int64_t shape[8];
    char descr[16];
    bool fortran_order;
    int64_t data_offset;
} spar_npy_info;
int spar__npy_read_info(const char *path, spar_npy_info *info, spar_err *err);
/* The same for the first len bytes of a file held in memory (name: for messages). */
int spar__npy_parse_info(const unsigned char *buf, size_t len, const char *name,
                         spar_npy_info *info, spar_err *err);
/* Checks an input file for key `key`: float32, C order, exactly `shape`. */
int spar__npy_check(const char *key, const char *path, int ndim, const int64_t *shape,
                    spar_npy_info *info, spar_err *err);
/* Writes a v1.0 header for float32 C-order `shape`; returns the data offset or < 0. */
int64_t spar__npy_write_header(int fd, int ndim, const int64_t *shape);
/* The same for another dtype (descr such as "<i4"). */
int64_t spar__npy_write_header_as(int fd, const char *descr, int ndim, const int64_t *shape);

/* tensor_io.c: rows of [N, row_floats] tensors, moved by partition. */
typedef struct spar_row_source {
    const char *path; /* .npy file read by rank 0, or NULL for random data */
    int64_t data_offset;
    uint64_t seed, stream; /* random data: value = f(seed, stream, row, column) */
} spar_row_source;
int spar__rows_scatter(spar_comm *comm, const spar_partition *part, const spar_row_source *src,
                       int64_t row_floats, float *local);
int spar__rows_fill(const spar_row_source *src, const spar_partition *part, int rank,
                    int64_t row_floats, float *out);
/* Rank 0 writes an .npy of shape [N, dims...] atomically (temporary file, rename). */
int spar__rows_write_npy(spar_comm *comm, const spar_partition *part, const char *path, int ndim,
                         const int64_t *shape, const float *local);
/* Rank 0 receives the whole tensor in global order into full ([N, row_floats]). */
int spar__rows_gather(spar_comm *comm, const spar_partition *part, int64_t row_floats,
                      const float *local, float *full);

/* experiment.c: one experiment's tensors on this rank and the passes of its method. */
enum spar_row_kind { ROW_Q, ROW_KV, ROW_LSE };
enum { T_Q, T_K, T_V, T_DOUT, T_O, T_LSE, T_DQ, T_DK, T_DV, T_COUNT };

typedef struct spar_tensor_spec {
    const char *name;
    int input_key, output_key; /* -1: none */
    enum spar_row_kind rows;
    uint64_t stream; /* random inputs: the generator's stream */
    bool backward_only;
} spar_tensor_spec;

typedef struct spar_tensors {
    float *t[T_COUNT];
    float *states;  /* linear attention: what forward leaves for backward */
    int64_t n;      /* tokens held */
    int64_t row[3]; /* floats per token, by row kind */
    bool backward, linear;
} spar_tensors;

const spar_tensor_spec *spar__tensor_spec(int i);
bool spar__tensor_in_use(const spar_tensors *t, int i);
/* Tensors for n tokens of prob (its type decides lse and the linear states). */
int spar__tensors_alloc(spar_tensors *t, int64_t n, const spar_attn_problem *prob, bool backward);
void spar__tensors_free(spar_tensors *t);
spar_attn_io spar__tensors_io(const spar_tensors *t);
/* Inputs for this rank from files or the seed (comm NULL: part has one rank, no exchange);
 * every input is attempted so that the ranks' exchanges stay matched. */
int spar__tensors_load(spar_comm *comm, const spar_config *cfg, const spar_partition *part,
                       spar_tensors *t);
/* One pass of the method, between barriers: every rank for a distributed method, rank 0
 * for a whole-sequence one. */
int spar__run_pass(spar_comm *comm, const spar_method *method, const spar_attn_problem *prob,
                   const spar_tensors *t, bool backward, spar_metrics *m);
void spar__decay_from_config(const spar_config *cfg, int heads, double *decay);
/* prob->progress_ctx must then point at a double holding the start time (wtime). */
void spar__problem_from_config(const spar_config *cfg, const spar_partition *part,
                               const double *decay, spar_attn_problem *prob);
enum spar_partition_kind spar__partition_kind(const char *name);

/* One experiment on this rank: the plan's partition, problem and loaded tensors. */
typedef struct spar_experiment {
    spar_partition part;
    spar_attn_problem prob;
    double *decay; /* [heads], the problem's */
    const spar_method *method;
    bool backward;
    spar_tensors t;
    double t0; /* start of the progress clock */
} spar_experiment;
/* Collective: builds and loads everything; returns the status every rank agreed on. */
int spar__experiment_setup(spar_experiment *x, spar_comm *comm, const spar_config *cfg);
void spar__experiment_free(spar_experiment *x);

/* report.c */
typedef struct spar_pass_result {
    bool ran;
    double seconds, compute_seconds, wait_seconds, flops, gflops_per_s;
    double *bytes_sent; /* [ranks] */
} spar_pass_result;

/* Relative L2 errors against the local method, in output order. */
enum { SPAR_ERR_O, SPAR_ERR_LSE, SPAR_ERR_DQ, SPAR_ERR_DK, SPAR_ERR_DV, SPAR_ERR_COUNT };

typedef struct spar_run_result {
    const spar_config *cfg;
    int ranks;
    spar_pass_result fwd, bwd;
    double *peak_mib; /* [ranks] */
    char *hosts;      /* [ranks][64] */
    bool verified;
    double err[SPAR_ERR_COUNT]; /* NAN where not computed */
    const char *transport, *library;
} spar_run_result;
/* Largest of the computed errors (0 when none). */
double spar__max_error(const spar_run_result *res);
void spar__print_settings(const spar_config *cfg, int ranks, const char *transport);
void spar__print_result_table(const spar_run_result *res);
int spar__append_record(const char *path, const spar_run_result *res);
/* The fields every record shares (no braces): versions, time, settings, hosts [ranks][64],
 * MPI library and transport. */
void spar__json_common(FILE *f, const spar_config *cfg, int ranks, const char *hosts,
                       const char *library, const char *transport);
/* A JSON string (escaped) and a JSON number (null when not finite). */
void spar__json_string(FILE *f, const char *s);
void spar__json_number(FILE *f, double x);
/* One whole line appended with a single write() (O_APPEND): never interleaved or torn. */
int spar__append_line(const char *path, const char *line, size_t len);

/* sweep.c: the grid of a sweep: block, and the points a results file already holds. */
int spar__grid_points(const spar_sweep *sw);
/* The configuration of point `index`: the file, the point's values, then the --set
 * assignments (which may not name a swept key). */
int spar__point_config(const char *const *sets, int nsets, const spar_config *file, int index,
                       spar_config *out, spar_err *err);
/* Rank 0: every point valid for this world (0 = unknown), checked before anything runs;
 * reports the first error. */
int spar__check_grid(const char *const *sets, int nsets, const spar_config *file, int world,
                     spar_config *scratch);
/* The id of a point: command ("run" or "bench"), world size and every key's value. */
void spar__point_id(const spar_config *cfg, const char *command, int ranks, char id[17]);
typedef struct spar_done {
    char (*ids)[17];
    int count, cap;
} spar_done;
/* The ids of the finished points recorded in path (none when it does not exist). */
int spar__results_done(const char *path, spar_done *done);
bool spar__results_has(const spar_done *done, const char *id);
void spar__results_done_free(spar_done *done);

/* slurm.c: under a direct srun, the MPI world must have the step's task count (an
 * error naming the fix otherwise); the job's Slurm facts as a record field. */
int spar__slurm_check_world(int world_size);
/* Before MPI starts: srun with several tasks but no PMI at all (srun --mpi=none). */
int spar__slurm_check_launch(void);
void spar__json_slurm(FILE *f); /* ,"slurm":{...} or ,"slurm":null */

/* signals.c: SIGTERM and SIGINT (scancel, a time limit, Ctrl-C) end the program at
 * once with status 128+signal. While a point is armed, rank 0 first appends an
 * "interrupted" record for it (records already written are whole lines: nothing else
 * is left behind). */
void spar__signals_install(int rank);
void spar__signals_arm(const spar_config *cfg, const char *command);
void spar__signals_disarm(void);

/* jsonl.c: one JSON record flattened: nested keys joined with '.', a numeric array kept
 * as its largest element, a string array joined with ','. */
typedef struct spar_json_field {
    char key[96], text[256]; /* text: strings, true/false/null */
    double num;
    bool is_num;
} spar_json_field;
typedef struct spar_json_flat {
    spar_json_field *f;
    int count, cap;
} spar_json_flat;
int spar__json_flatten(const char *line, spar_json_flat *out); /* SPAR_EFORMAT if not JSON */
const spar_json_field *spar__json_get(const spar_json_flat *j, const char *key);
void spar__json_flat_free(spar_json_flat *j);

/* report_cmd.c: `spar report`: records as rows of fixed columns. */
#define SPAR_REPORT_COLUMNS 20
typedef struct spar_report_row {
    char text[SPAR_REPORT_COLUMNS][64];
    double num[SPAR_REPORT_COLUMNS]; /* NAN: absent */
    int count;                       /* records merged into this row */
} spar_report_row;
typedef struct spar_report {
    spar_report_row *rows;
    int count, cap, skipped, first_skipped;
} spar_report;
int spar__report_read(const char *path, spar_report *rep);
/* A column by name or key alias (e.g. method or parallel.method); -1 if none. */
int spar__report_column(const char *name);
const char *spar__report_column_name(int c);
bool spar__report_column_is_text(int c);
/* Rows agreeing on the key columns become one: count, medians, '*' for differing text. */
int spar__report_group(spar_report *rep, const int *keys, int nkeys);
void spar__report_print(const spar_report *rep, bool csv, bool grouped);
void spar__report_free(spar_report *rep);
int spar__cmd_report(int argc, char **argv);
/* plot.c: the report's figures drawn by gnuplot into OUT (.svg or .png). */
int spar__report_plot(const spar_report *rep, const char *out);

/* progress.c: rank 0's progress display (run.progress); spar__show_progress is the
 * engine's progress callback, its ctx a double holding the start time (wtime). */
void spar__progress_configure(const spar_config *cfg);
void spar__show_progress(void *ctx, const char *phase, int64_t done, int64_t total);
/* Before point `index` (0-based) of a sweep: points done, elapsed seconds and ETA. */
void spar__progress_point(int index, int points, double elapsed);

/* model_io.c: a decoder's weights and the prompts (formats at the top of model_io.c). */
typedef struct spar_loaded_model {
    spar_model model; /* kernels left for the caller */
    float **tensors;
    int count;
    spar_layer_weights *layers;
} spar_loaded_model;
typedef struct spar_prompts {
    int batch;
    int32_t *len;   /* [batch] */
    int32_t **rows; /* [batch][len] */
    bool owns_rows; /* each row its own allocation (else one block at rows[0]) */
} spar_prompts;
void spar__model_dims_of(const spar_config *cfg, spar_model_dims *md);
int spar__model_load(const spar_config *cfg, spar_loaded_model *lm);
void spar__model_free(spar_loaded_model *lm);
int spar__prompts_load(const spar_config *cfg, spar_prompts *p);
void spar__prompts_free(spar_prompts *p);
/* generate.c: `spar run` with run.mode=generate; returns an exit code. */
int spar__generate_plan(spar_comm *comm, const spar_config *cfg);

/* submit.c: `spar submit` (arguments after the command); returns an exit code. */
int spar__cmd_submit(int argc, char **argv);

/* bench.c: one point of a benchmark grid on every rank (plan in cfg); returns a status. */
int spar__bench_point(spar_comm *comm, const spar_config *cfg, int index, int count);
void spar__config_print(const spar_config *cfg, bool with_origin);
void spar__print_key_help(void);
void spar__print_schema_markdown(void);

#endif
