/* submit.c: `spar submit`: an sbatch script for an experiment, printed or submitted.
 *
 *   spar submit FILE.yaml [--set KEY=VALUE]... [--nodes N] [--ntasks-per-node M]
 *               [--partition P] [--time T] [--launcher srun|mpirun] [--bench] [--dry-run]
 *               [--attention-partition Q]
 *
 * The script comes from a template compiled in from launcher/slurm/ (srun --mpi=pmix, or
 * mpirun inside the allocation for sites without PMIx). Resources come from the
 * experiment: parallel.ranks tasks (or --nodes x --ntasks-per-node when it is 0), one
 * node unless --nodes says otherwise, run.threads CPUs per task. The experiment is
 * checked for that many ranks before anything is submitted, so a bad file fails here
 * rather than in the queue. With --attention-partition (offloaded generation) the job is
 * heterogeneous: compute ranks in component 0, attention ranks in component 1 on their
 * own partition (memory-heavy nodes), one srun across both.
 */
#define _GNU_SOURCE /* vasprintf, realpath */
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "launcher.h"

extern const char spar__template_srun[], spar__template_mpirun[], spar__template_srun_hetjob[];

typedef struct submit_opts {
    const char *file, *partition, *time, *launcher, *attention_partition;
    const char **sets;
    int nsets, nodes, tasks_per_node;
    bool dry_run, bench, help;
} submit_opts;

static int bad(const char *fmt, const char *arg) {
    fprintf(stderr, "error: spar submit: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, " (see spar submit --help)\n");
    return SPAR_EXIT_BAD_INPUT;
}

static void submit_usage(void) {
    printf("usage: spar submit FILE.yaml [--set KEY=VALUE]... [--nodes N] [--ntasks-per-node M]\n"
           "                  [--partition P] [--time T] [--launcher srun|mpirun] [--bench]\n"
           "                  [--attention-partition Q] [--dry-run]\n\n"
           "Writes an sbatch script for the experiment and submits it (prints the job id);\n"
           "--dry-run prints the script instead. Tasks: parallel.ranks (or N x M when it is 0);\n"
           "nodes: 1 unless --nodes; CPUs per task: run.threads. --launcher mpirun starts the\n"
           "ranks with mpirun inside the allocation (for sites whose srun has no PMIx);\n"
           "--bench runs `spar bench` instead of `spar run`. --time takes Slurm's formats\n"
           "(MM, HH:MM:SS, D-HH:MM). --attention-partition Q (offloaded generation) makes a\n"
           "heterogeneous job: the compute ranks on --partition (nodes x tasks per node),\n"
           "the parallel.attention_ranks attention ranks on Q, one srun over both.\n");
}

/* A positive count for option `name`. */
static int count_arg(const char *name, const char *text, int *out) {
    char *end;
    errno = 0;
    long v = strtol(text, &end, 10);
    if (errno || *end || v < 1 || v > 100000) {
        fprintf(stderr, "error: spar submit: %s '%s' (allowed: an integer from 1 to 100000)\n",
                name, text);
        return SPAR_EXIT_BAD_INPUT;
    }
    *out = (int)v;
    return 0;
}

static bool made_of(const char *text, const char *extra) {
    if (!*text) return false;
    for (; *text; text++)
        if (!isalnum((unsigned char)*text) && !strchr(extra, *text)) return false;
    return true;
}

static int parse_submit(int argc, char **argv, submit_opts *o) {
    *o = (submit_opts){.launcher = "srun", .sets = calloc((size_t)argc + 1, sizeof(char *))};
    if (!o->sets) return SPAR_EXIT_FAILURE;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *val = i + 1 < argc ? argv[i + 1] : NULL;
        bool takes = strcmp(a, "--set") == 0 || strcmp(a, "--nodes") == 0 ||
                     strcmp(a, "--ntasks-per-node") == 0 || strcmp(a, "--partition") == 0 ||
                     strcmp(a, "--time") == 0 || strcmp(a, "--launcher") == 0 ||
                     strcmp(a, "--attention-partition") == 0;
        if (takes && !val) return bad("%s needs a value", a);
        if (takes) i++;
        int rc = 0;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0)
            o->help = true;
        else if (strcmp(a, "--dry-run") == 0)
            o->dry_run = true;
        else if (strcmp(a, "--bench") == 0)
            o->bench = true;
        else if (strcmp(a, "--set") == 0)
            o->sets[o->nsets++] = val;
        else if (strcmp(a, "--nodes") == 0)
            rc = count_arg(a, val, &o->nodes);
        else if (strcmp(a, "--ntasks-per-node") == 0)
            rc = count_arg(a, val, &o->tasks_per_node);
        else if (strcmp(a, "--partition") == 0 && !made_of(val, "_-."))
            return bad("--partition '%s' (allowed: letters, digits, _ - .)", val);
        else if (strcmp(a, "--partition") == 0)
            o->partition = val;
        else if (strcmp(a, "--attention-partition") == 0 && !made_of(val, "_-."))
            return bad("--attention-partition '%s' (allowed: letters, digits, _ - .)", val);
        else if (strcmp(a, "--attention-partition") == 0)
            o->attention_partition = val;
        else if (strcmp(a, "--time") == 0 && !made_of(val, ":-"))
            return bad("--time '%s' (allowed: Slurm's MM, HH:MM:SS or D-HH:MM)", val);
        else if (strcmp(a, "--time") == 0)
            o->time = val;
        else if (strcmp(a, "--launcher") == 0 && strcmp(val, "srun") && strcmp(val, "mpirun"))
            return bad("--launcher '%s' (allowed: srun|mpirun)", val);
        else if (strcmp(a, "--launcher") == 0)
            o->launcher = val;
        else if (a[0] == '-')
            return bad("unknown option '%s'", a);
        else if (o->file)
            return bad("more than one experiment file ('%s')", a);
        else
            o->file = a;
        if (rc) return rc;
    }
    if (!o->file && !o->help) return bad("%s", "an experiment FILE is required");
    if (o->attention_partition && strcmp(o->launcher, "srun") != 0)
        return bad("%s", "--attention-partition needs --launcher srun (one srun spans the two "
                         "components of a heterogeneous job)");
    return 0;
}

/* Tasks and nodes from the experiment and the flags; an error names the conflict. With
 * `attention` > 0 (a heterogeneous job) the nodes and tasks per node are those of the
 * compute ranks; the attention ranks come on top. */
static int layout(const submit_opts *o, const spar_config *file, int attention, int *nodes,
                  int *per_node) {
    int ranks = (int)file->v[SPAR_KEY_PAR_RANKS].i, compute = ranks ? ranks - attention : 0;
    *nodes = o->nodes ? o->nodes : 1;
    if (ranks == 0 && !o->tasks_per_node) {
        fprintf(stderr,
                "error: spar submit: how many ranks? %s leaves parallel.ranks at 0: set "
                "it (in the file or with --set parallel.ranks=P) or give "
                "--ntasks-per-node (and --nodes)\n",
                o->file);
        return SPAR_EXIT_BAD_INPUT;
    }
    if (ranks == 0) {
        *per_node = o->tasks_per_node;
        return 0;
    }
    *per_node = o->tasks_per_node ? o->tasks_per_node : (compute > 0 ? compute / *nodes : 0);
    if (compute < 1 || *per_node * *nodes != compute) {
        fprintf(stderr,
                "error: spar submit: parallel.ranks=%d%s does not fit %d node(s) x %d "
                "task(s) per node (allowed: nodes x ntasks-per-node = parallel.ranks%s)\n",
                ranks, attention ? " less the attention ranks" : "", *nodes, *per_node,
                attention ? " - parallel.attention_ranks" : "");
        return SPAR_EXIT_BAD_INPUT;
    }
    return 0;
}

/* The attention ranks of a heterogeneous job: the experiment must offload. */
static int attention_tasks(const submit_opts *o, spar_config *cfg, int *k) {
    *k = 0;
    if (!o->attention_partition) return 0;
    spar_err err;
    if (strcmp(cfg->v[SPAR_KEY_RUN_MODE].s, "generate") != 0 ||
        (strcmp(cfg->v[SPAR_KEY_PAR_METHOD].s, "offload") != 0 &&
         strcmp(cfg->v[SPAR_KEY_PAR_METHOD].s, "auto") != 0)) {
        spar__err_set(&err, SPAR_EINVAL,
                      "spar submit: --attention-partition with run.mode=%s, parallel.method=%s "
                      "(allowed: run.mode=generate with parallel.method=offload)",
                      cfg->v[SPAR_KEY_RUN_MODE].s, cfg->v[SPAR_KEY_PAR_METHOD].s);
        fprintf(stderr, "error: %s\n", err.msg);
        return SPAR_EXIT_BAD_INPUT;
    }
    *k = (int)cfg->v[SPAR_KEY_PAR_ATTN_RANKS].i;
    return 0;
}

/* text in single quotes for the shell ('it'\''s'). */
static void shell_quote(FILE *f, const char *text) {
    fputc('\'', f);
    for (; *text; text++)
        *text == '\'' ? fputs("'\\''", f) : fputc(*text, f);
    fputc('\'', f);
}

/* A job name Slurm and file names accept: run.name, else the file's base name. */
static void job_name(const spar_config *cfg, const char *file, char *out, size_t len) {
    const char *name = cfg->v[SPAR_KEY_RUN_NAME].s, *slash = strrchr(file, '/');
    if (!*name) name = slash ? slash + 1 : file;
    size_t n = 0;
    for (; *name && n + 1 < len && strcmp(name, ".yaml") && strcmp(name, ".yml"); name++)
        out[n++] = isalnum((unsigned char)*name) || strchr("_-.", *name) ? *name : '_';
    out[n] = 0;
    if (!n) snprintf(out, len, "spar");
}

typedef struct fill {
    const char *name;
    char *value;
} fill;

/* The template with every {{NAME}} replaced. */
static char *render(const char *tpl, const fill *fills, int count) {
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (!f) return NULL;
    while (*tpl) {
        const char *open = strstr(tpl, "{{"), *close = open ? strstr(open, "}}") : NULL;
        if (!close) {
            fputs(tpl, f);
            break;
        }
        fwrite(tpl, 1, (size_t)(open - tpl), f);
        for (int i = 0; i < count; i++)
            if (strlen(fills[i].name) == (size_t)(close - open - 2) &&
                strncmp(open + 2, fills[i].name, (size_t)(close - open - 2)) == 0)
                fputs(fills[i].value, f);
        tpl = close + 2;
    }
    fclose(f);
    return buf;
}

static char *printed(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *printed(const char *fmt, ...) {
    char *out = NULL;
    va_list ap;
    va_start(ap, fmt);
    if (vasprintf(&out, fmt, ap) < 0) out = NULL;
    va_end(ap);
    return out;
}

static char *command_args(const submit_opts *o, const char *config) {
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (!f) return NULL;
    shell_quote(f, config);
    for (int i = 0; i < o->nsets; i++) {
        fputs(" --set ", f);
        shell_quote(f, o->sets[i]);
    }
    fclose(f);
    return buf;
}

static char *script_text(const submit_opts *o, const spar_config *cfg, int nodes, int per_node,
                         int attention) {
    char name[64], when[32], cwd[4096], exe[4096], config[4096];
    time_t now = time(NULL);
    strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
    job_name(cfg, o->file, name, sizeof name);
    if (!getcwd(cwd, sizeof cwd) || !realpath(o->file, config)) return NULL;
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    exe[n > 0 ? n : 0] = 0;
    if (n <= 0) snprintf(exe, sizeof exe, "spar");
    char *quoted_exe = NULL;
    size_t ql = 0;
    FILE *f = open_memstream(&quoted_exe, &ql);
    if (f) shell_quote(f, exe), fclose(f);
    int threads = (int)cfg->v[SPAR_KEY_RUN_THREADS].i;
    fill fills[] = {
        {"SOURCE", printed("%s", config)},
        {"WHEN", printed("%s", when)},
        {"JOB_NAME", printed("%s", name)},
        {"NODES", printed("%d", nodes)},
        {"TASKS_PER_NODE", printed("%d", per_node)},
        {"CPUS_PER_TASK", printed("%d", threads > 0 ? threads : 1)},
        {"WORKDIR", printed("%s", cwd)},
        {"LOG", printed("spar-%%x-%%j.out")},
        {"EXTRA", printed("%s%s%s%s%s", o->partition ? "#SBATCH --partition=" : "",
                          o->partition ? o->partition : "", o->partition && o->time ? "\n" : "",
                          o->time ? "#SBATCH --time=" : "", o->time ? o->time : "")},
        {"SPAR", quoted_exe},
        {"COMMAND", printed("%s", o->bench ? "bench" : "run")},
        {"ATTENTION_PARTITION",
         printed("%s", o->attention_partition ? o->attention_partition : "")},
        {"ATTENTION_TASKS", printed("%d", attention)},
        {"ARGS", command_args(o, config)},
    };
    int count = (int)(sizeof fills / sizeof fills[0]);
    bool ok = true;
    for (int i = 0; i < count; i++)
        ok = ok && fills[i].value;
    const char *tpl = o->attention_partition             ? spar__template_srun_hetjob
                      : strcmp(o->launcher, "srun") == 0 ? spar__template_srun
                                                         : spar__template_mpirun;
    char *text = ok ? render(tpl, fills, count) : NULL;
    for (int i = 0; i < count; i++)
        free(fills[i].value);
    return text;
}

/* sbatch the script (from a temporary file); prints the job id. */
static int sbatch(const char *text, const submit_opts *o, int tasks) {
    char path[] = "/tmp/spar-submit.XXXXXX";
    int fd = mkstemp(path);
    if (fd < 0) {
        fprintf(stderr, "error: spar submit: cannot write a temporary script: %s\n",
                strerror(errno));
        return SPAR_EXIT_FAILURE;
    }
    size_t len = strlen(text);
    bool written = write(fd, text, len) == (ssize_t)len;
    close(fd);
    char cmd[256], out[256] = "";
    snprintf(cmd, sizeof cmd, "sbatch --parsable %s 2>&1", path);
    FILE *p = written ? popen(cmd, "r") : NULL;
    size_t got = p ? fread(out, 1, sizeof out - 1, p) : 0;
    out[got] = 0;
    int status = p ? pclose(p) : -1;
    unlink(path);
    if (status != 0 || !isdigit((unsigned char)out[0])) {
        fprintf(stderr, "error: spar submit: sbatch failed%s: %s\n",
                status == 127 * 256 ? " (not found: install Slurm's client commands)" : "",
                got ? out : "no output");
        return SPAR_EXIT_FAILURE;
    }
    out[strcspn(out, ";\n")] = 0;
    printf("submitted job %s: %d task(s), %s, experiment %s\n", out, tasks,
           strcmp(o->launcher, "srun") == 0 ? "srun --mpi=pmix" : "mpirun", o->file);
    return SPAR_EXIT_OK;
}

int spar__cmd_submit(int argc, char **argv) {
    submit_opts o;
    int code = parse_submit(argc, argv, &o);
    spar_config *file = calloc(1, sizeof *file), *scratch = calloc(1, sizeof *scratch);
    spar_err err = {""};
    int nodes = 0, per_node = 0, attention = 0;
    if (code == 0 && o.help) {
        submit_usage();
    } else if (code == 0 && (!file || !scratch)) {
        code = SPAR_EXIT_FAILURE;
    } else if (code == 0) {
        spar__config_defaults(file);
        if (spar__config_load_yaml(file, o.file, &err) != 0) {
            fprintf(stderr, "error: %s\n", err.msg);
            code = SPAR_EXIT_BAD_INPUT;
        } else if (spar__point_config(o.sets, o.nsets, file, 0, scratch, &err) != 0) {
            fprintf(stderr, "error: %s\n", err.msg);
            code = SPAR_EXIT_BAD_INPUT;
        } else if ((code = attention_tasks(&o, scratch, &attention)) == 0 &&
                   (code = layout(&o, scratch, attention, &nodes, &per_node)) == 0 &&
                   spar__check_grid(o.sets, o.nsets, file, nodes * per_node + attention, scratch) !=
                       0) {
            code = SPAR_EXIT_BAD_INPUT;
        }
    }
    char *text = code == 0 && !o.help ? script_text(&o, scratch, nodes, per_node, attention) : NULL;
    if (code == 0 && !o.help && !text) code = SPAR_EXIT_FAILURE;
    if (text && o.dry_run) fputs(text, stdout);
    if (text && !o.dry_run) code = sbatch(text, &o, nodes * per_node + attention);
    free(text), free(file), free(scratch), free(o.sets);
    return code;
}
