/* main.c: the spar program: command line, plan distribution, exit codes.
 *
 *   spar run [FILE.yaml] [--set KEY=VALUE]...     (under mpirun or srun)
 *   spar bench FILE.yaml [--set KEY=VALUE]...     (the grid of the file's sweep: block)
 *   spar submit FILE.yaml [--set KEY=VALUE]... [SLURM OPTIONS]   (sbatch script; submit.c)
 *   spar report FILE.jsonl [--group-by KEYS] [--csv] [--plot OUT]   (report_cmd.c)
 *   spar config show|check FILE [--set KEY=VALUE]...
 *   spar config schema                              (the key table as Markdown)
 *
 * Exit codes: 0 success, 1 runtime failure, 2 bad input (usage, configuration, data),
 * 3 verification failed.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "launcher.h"

int spar__run_plan(spar_comm *comm, const spar_config *cfg);

typedef struct cli {
    const char *file;
    const char **sets;
    int nsets;
    bool help;
} cli;

static void usage(FILE *out) {
    fprintf(out,
            "spar: sequence-parallel attention over MPI ranks\n\n"
            "usage:\n"
            "  mpirun -np P spar run [FILE.yaml] [--set KEY=VALUE]...   run an experiment\n"
            "  mpirun -np P spar bench FILE.yaml [--set KEY=VALUE]...  benchmark its sweep: grid\n"
            "  spar submit FILE.yaml [--set KEY=VALUE]... [--nodes N] [--ntasks-per-node M]\n"
            "       [--partition P] [--time T] [--launcher srun|mpirun] [--bench] [--dry-run]\n"
            "                                               sbatch it under Slurm (job id)\n"
            "  spar report FILE.jsonl [--group-by KEYS] [--csv] [--plot OUT.svg|OUT.png]\n"
            "                                               table (and plots) of recorded runs\n"
            "  spar config show FILE [--set KEY=VALUE]...   print the effective configuration\n"
            "  spar config check FILE [--set KEY=VALUE]...  validate without running\n"
            "  spar config schema                           the keys as a Markdown table\n"
            "  spar --help | spar run --help | spar --version\n\n"
            "Values on the command line win over the file; the file wins over defaults.\n"
            "Exit codes: 0 ok, 1 runtime failure, 2 bad input, 3 verification failed.\n"
            "Fault-injection hooks for tests: SPAR_TEST_FAULT=ring:R makes rank R's ring send\n"
            "fail inside MPI; SPAR_TEST_FAULT=plan:R corrupts the run plan rank R receives.\n\n");
}

/* Before MPI_Init we do not know our rank; the launchers tell us in the environment.
 * Used so that a usage error is printed once, not once per rank. */
static int rank_from_environment(void) {
    static const char *vars[] = {"OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"};
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++) {
        const char *v = getenv(vars[i]);
        if (v && *v) return atoi(v);
    }
    return 0;
}

static int usage_error(const char *fmt, const char *arg) {
    if (rank_from_environment() == 0) {
        fprintf(stderr, "error: ");
        fprintf(stderr, fmt, arg);
        fprintf(stderr, " (see spar --help)\n");
    }
    return SPAR_EXIT_BAD_INPUT;
}

static int parse_cli(int argc, char **argv, cli *out, bool file_required) {
    *out = (cli){0};
    out->sets = calloc((size_t)argc + 1, sizeof(char *));
    if (!out->sets) return SPAR_EXIT_FAILURE;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            out->help = true;
        } else if (strcmp(a, "--set") == 0 || strcmp(a, "-s") == 0) {
            if (i + 1 >= argc) return usage_error("%s needs KEY=VALUE", a);
            out->sets[out->nsets++] = argv[++i];
        } else if (strncmp(a, "--set=", 6) == 0) {
            out->sets[out->nsets++] = a + 6;
        } else if (a[0] == '-') {
            return usage_error("unknown option '%s'", a);
        } else if (out->file) {
            return usage_error("more than one experiment file ('%s')", a);
        } else {
            out->file = a;
        }
    }
    if (file_required && !out->file && !out->help)
        return usage_error("%s", "an experiment FILE is required");
    return 0;
}

/* Defaults, then the file, then --set: the command line wins. */
static int load_config(const cli *c, spar_config *cfg, spar_err *err) {
    spar__config_defaults(cfg);
    if (c->file) SPAR_TRY(spar__config_load_yaml(cfg, c->file, err));
    for (int i = 0; i < c->nsets; i++)
        SPAR_TRY(spar__config_set_arg(cfg, c->sets[i], err));
    return SPAR_OK;
}

static int cmd_config(int argc, char **argv) {
    if (argc < 1) return usage_error("%s", "config needs show, check or schema");
    if (strcmp(argv[0], "schema") == 0) {
        spar__print_schema_markdown();
        return SPAR_EXIT_OK;
    }
    bool show = strcmp(argv[0], "show") == 0;
    if (!show && strcmp(argv[0], "check") != 0)
        return usage_error("unknown config command '%s' (allowed: show|check|schema)", argv[0]);
    cli c;
    int code = parse_cli(argc - 1, argv + 1, &c, true);
    spar_config *cfg = malloc(sizeof *cfg);
    spar_err err;
    if (code == 0 && c.help) {
        usage(stdout);
        spar__print_key_help();
    } else if (code == 0 && cfg) {
        int world = 0; /* unknown outside a job: parallel.ranks stands in for it */
        spar_config *point = malloc(sizeof *point);
        cli file_only = c;
        file_only.nsets = 0; /* check_grid applies the flags after each point's values */
        if (!point || load_config(&file_only, cfg, &err) != 0) {
            fprintf(stderr, "error: %s\n", point ? err.msg : "out of memory");
            code = SPAR_EXIT_BAD_INPUT;
        } else if (spar__check_grid(c.sets, c.nsets, cfg, world, point) != 0) { /* as run would */
            code = SPAR_EXIT_BAD_INPUT;
        } else if (show) {
            memcpy(cfg, point, sizeof *cfg); /* the last point (the only one without sweep) */
            spar__config_print(cfg, true);
        } else {
            printf("%s: ok\n", c.file);
        }
        free(point);
    }
    free(cfg);
    free(c.sets);
    return code;
}

/* Test hook SPAR_TEST_FAULT=plan:R: rank R's copy of the run plan arrives with every
 * byte inverted, as a corrupted message would. */
static void corrupt_plan_for_test(int rank, uint8_t *buf, size_t len) {
    const char *fault = getenv("SPAR_TEST_FAULT");
    if (!fault || strncmp(fault, "plan:", 5) != 0 || atoi(fault + 5) != rank) return;
    for (size_t i = 0; i < len; i++)
        buf[i] ^= 0xff;
}

/* Rank 0 broadcasts cfg packed as a plan, or `status` (negative, already reported) in
 * place of its length; every rank returns the same status and holds the same plan. */
static int broadcast_plan(spar_comm *comm, spar_config *cfg, int status) {
    int64_t len = status;
    uint8_t *buf = NULL;
    spar_err err = {""};
    if (spar_comm_rank(comm) == 0 && status == 0) {
        size_t packed = 0;
        int rc = spar__plan_pack(cfg, spar_comm_size(comm), &buf, &packed);
        len = rc != 0 ? rc : (int64_t)packed;
    }
    SPAR_TRY(spar_comm_bcast(comm, &len, sizeof len, 0));
    if (len < 0) {
        free(buf);
        return (int)len;
    }
    if (spar_comm_rank(comm) != 0 && !(buf = malloc((size_t)len + 1))) return SPAR_ENOMEM;
    int rc = spar_comm_bcast(comm, buf, (size_t)len, 0), worst = 0;
    if (rc == 0 && spar_comm_rank(comm) != 0) {
        corrupt_plan_for_test(spar_comm_rank(comm), buf, (size_t)len);
        if ((rc = spar__plan_unpack(cfg, buf, (size_t)len, spar_comm_size(comm), &err)))
            spar_log_error("%s", err.msg);
    }
    free(buf);
    /* A rank that cannot read the plan stops every rank; alone it would leave the others
     * waiting in the run's first collective. */
    if (spar_comm_agree(comm, rc, &worst) != 0 && rc == 0) rc = SPAR_ECOMM;
    rc = rc ? rc : worst;
    if (rc == 0) spar_comm_set_timeout(comm, cfg->v[SPAR_KEY_COMM_TIMEOUT].f);
    return rc;
}

/* Starts MPI with the transport the file or flags ask for (read by every rank before
 * MPI exists; errors are left for rank 0 to report once it runs). */
static spar_comm *start_mpi(const cli *c, spar_config *scratch, int *argc, char ***argv) {
    spar_err err;
    const char *transport = "auto";
    if (load_config(c, scratch, &err) == 0) transport = scratch->v[SPAR_KEY_COMM_TRANSPORT].s;
    spar_comm_prepare_transport(transport);
    spar_comm *comm = NULL;
    if (spar_comm_init(&comm, argc, argv) != 0) return NULL;
    spar_comm_set_timeout(comm, scratch->v[SPAR_KEY_COMM_TIMEOUT].f); /* until the plan's */
    return comm;
}

static int exit_code(int status) {
    return spar_status_is_input_error(status) ? SPAR_EXIT_BAD_INPUT : SPAR_EXIT_FAILURE;
}

/* Rank 0: the file alone (its sweep: grid gets the flags per point), checked for every
 * point; the finished points of output.results. */
static int load_grid(const cli *c, spar_comm *comm, spar_config *file, spar_config *scratch,
                     spar_done *done) {
    spar_err err = {""};
    cli file_only = *c;
    file_only.nsets = 0;
    int rc = load_config(&file_only, file, &err);
    if (rc != 0) return spar_errorf(rc, "%s", err.msg);
    SPAR_TRY(spar__check_grid(c->sets, c->nsets, file, spar_comm_size(comm), scratch));
    /* a single run always runs; a sweep resumes (output.results and run.resume may be
     * swept or set on the command line: the last point's values) */
    if (spar__grid_points(&file->sweep) == 1 || !scratch->v[SPAR_KEY_RUN_RESUME].b) return SPAR_OK;
    return spar__results_done(scratch->v[SPAR_KEY_OUT_RESULTS].s, done);
}

static void print_point(const spar_config *file, int i, int points) {
    printf("# point %d/%d:", i + 1, points);
    for (int k = 0, index = i; k < file->sweep.nkeys; k++) {
        printf(" %s=%s", spar__keys[file->sweep.key[k]].name,
               file->sweep.value[k][index % file->sweep.nvalues[k]]);
        index /= file->sweep.nvalues[k];
    }
    printf("\n");
    fflush(stdout);
}

/* Rank 0: point i's configuration and whether its record is already in the results. */
static bool prepare_point(const cli *c, spar_comm *comm, const spar_config *file, int i, int points,
                          const spar_done *done, bool bench, spar_config *cfg) {
    spar_err err;
    if (spar__point_config(c->sets, c->nsets, file, i, cfg, &err) == 0) /* checked before */
        spar__config_validate(cfg, spar_comm_size(comm), &err);
    cfg->point = i, cfg->points = points;
    spar__point_id(cfg, bench ? "bench" : "run", spar_comm_size(comm), cfg->point_id);
    if (!spar__results_has(done, cfg->point_id)) {
        if (!bench && points > 1) print_point(file, i, points);
        return false;
    }
    printf("# point %d/%d: already in %s (point_id %s); skipped\n", i + 1, points,
           cfg->v[SPAR_KEY_OUT_RESULTS].s, cfg->point_id);
    return true;
}

/* `spar run` and `spar bench`: same start, same plan broadcast, over the file's sweep:
 * grid (one point without one); points already recorded in output.results are skipped. */
static int cmd_experiment(int argc, char **argv, bool bench) {
    cli c;
    int code = parse_cli(argc, argv, &c, bench);
    if (code != 0 || c.help) {
        if (c.help && rank_from_environment() == 0) {
            usage(stdout);
            spar__print_key_help();
        }
        free(c.sets);
        return code;
    }
    if (spar__slurm_check_launch() != 0) {
        free(c.sets);
        return SPAR_EXIT_BAD_INPUT;
    }
    spar_config *file = calloc(1, sizeof *file), *cfg = calloc(1, sizeof *cfg);
    spar_comm *comm = file && cfg ? start_mpi(&c, cfg, &argc, &argv) : NULL;
    if (!comm) {
        free(file), free(cfg), free(c.sets);
        return SPAR_EXIT_FAILURE;
    }
    spar__signals_install(spar_comm_rank(comm));
    int status = spar__slurm_check_world(spar_comm_size(comm)), points = 1;
    spar_done done = {0};
    if (status == 0 && spar_comm_rank(comm) == 0) {
        status = load_grid(&c, comm, file, cfg, &done);
        points = spar__grid_points(&file->sweep);
    }
    if (spar_comm_agree(comm, status, &status) != 0) status = SPAR_ECOMM;
    if (spar_comm_bcast(comm, &points, sizeof points, 0) != 0) status = SPAR_ECOMM;
    if (status != 0) code = exit_code(status);
    double t0 = spar_comm_wtime();
    for (int i = 0, ran = 0; i < points && code == 0; i++) {
        if (spar_comm_rank(comm) == 0 && ran > 0) /* ETA from the points run so far */
            spar__progress_point(ran, ran + points - i, spar_comm_wtime() - t0);
        int skip = spar_comm_rank(comm) == 0 &&
                   prepare_point(&c, comm, file, i, points, &done, bench, cfg);
        if (spar_comm_bcast(comm, &skip, sizeof skip, 0) != 0) {
            code = SPAR_EXIT_FAILURE;
            break;
        }
        if (skip) continue;
        ran++;
        if (spar_comm_rank(comm) == 0) spar__signals_arm(cfg, bench ? "bench" : "run");
        int rc = broadcast_plan(comm, cfg, SPAR_OK);
        if (rc != 0)
            code = exit_code(rc);
        else if (!bench)
            code = spar__run_plan(comm, cfg);
        else if ((rc = spar__bench_point(comm, cfg, i, points)) != 0)
            code = exit_code(rc);
        spar__signals_disarm();
    }
    spar__results_done_free(&done);
    /* After a wait that gave up, MPI_Finalize could wait for ever for the lost peer. */
    if (spar_comm_failed(comm)) spar_comm_abort(comm, code ? code : SPAR_EXIT_FAILURE);
    spar_comm_free(comm);
    free(file), free(cfg), free(c.sets);
    return code;
}

/* SPAR_LOG=error|warn|info|debug (default info). */
static int set_log_level(void) {
    static const char *names[] = {"error", "warn", "info", "debug"};
    static const enum spar_log_level levels[] = {SPAR_LOG_ERROR, SPAR_LOG_WARN, SPAR_LOG_INFO,
                                                 SPAR_LOG_DEBUG};
    const char *level = getenv("SPAR_LOG");
    if (!level || !*level) return 0;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (strcmp(level, names[i]) == 0) {
            spar_log_set_level(levels[i]);
            return 0;
        }
    if (rank_from_environment() == 0)
        fprintf(stderr, "error: environment SPAR_LOG='%s' (allowed: error|warn|info|debug)\n",
                level);
    return 1;
}

int main(int argc, char **argv) {
    if (set_log_level() != 0) return SPAR_EXIT_BAD_INPUT;
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        usage(argc < 2 ? stderr : stdout);
        if (argc >= 2) spar__print_key_help();
        return argc < 2 ? SPAR_EXIT_BAD_INPUT : SPAR_EXIT_OK;
    }
    if (strcmp(argv[1], "--version") == 0) {
        printf("spar %s\n", SPAR_VERSION);
        return SPAR_EXIT_OK;
    }
    if (strcmp(argv[1], "run") == 0) return cmd_experiment(argc - 2, argv + 2, false);
    if (strcmp(argv[1], "bench") == 0) return cmd_experiment(argc - 2, argv + 2, true);
    if (strcmp(argv[1], "config") == 0) return cmd_config(argc - 2, argv + 2);
    if (strcmp(argv[1], "submit") == 0) return spar__cmd_submit(argc - 2, argv + 2);
    if (strcmp(argv[1], "report") == 0) return spar__cmd_report(argc - 2, argv + 2);
    return usage_error("unknown command '%s' (allowed: run, bench, submit, report, config)",
                       argv[1]);
}
