/* main.c: the spar program: command line, plan distribution, exit codes.
 *
 *   spar run [FILE.yaml] [--set KEY=VALUE]...     (under mpirun or srun)
 *   spar bench FILE.yaml [--set KEY=VALUE]...     (the grid of the file's sweep: block)
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
            "  spar config show FILE [--set KEY=VALUE]...   print the effective configuration\n"
            "  spar config check FILE [--set KEY=VALUE]...  validate without running\n"
            "  spar config schema                           the keys as a Markdown table\n"
            "  spar --help | spar run --help | spar --version\n\n"
            "Values on the command line win over the file; the file wins over defaults.\n"
            "Exit codes: 0 ok, 1 runtime failure, 2 bad input, 3 verification failed.\n"
            "Fault-injection hook for tests: SPAR_TEST_FAULT=ring:R makes rank R's ring send\n"
            "fail inside MPI.\n\n");
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

static int check_grid(const cli *c, const spar_config *file, int world, spar_config *scratch);

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
        } else if (check_grid(&c, cfg, world, point) != 0) { /* as spar bench would run it */
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
    int rc = spar_comm_bcast(comm, buf, (size_t)len, 0);
    if (rc == 0 && spar_comm_rank(comm) != 0 &&
        (rc = spar__plan_unpack(cfg, buf, (size_t)len, spar_comm_size(comm), &err)))
        spar_log_error("%s", err.msg);
    free(buf);
    return rc;
}

/* Rank 0: the configuration of grid point `index` of the file's sweep: the file, then
 * the point's values, then --set (which may not name a swept key). */
static int point_config(const cli *c, const spar_config *file, int index, spar_config *out,
                        spar_err *err) {
    const spar_sweep *sw = &file->sweep;
    memcpy(out, file, sizeof *out);
    for (int k = 0; k < sw->nkeys; k++) {
        int which = index % sw->nvalues[k];
        index /= sw->nvalues[k];
        SPAR_TRY(spar__config_set(out, spar__keys[sw->key[k]].name, sw->value[k][which],
                                  SPAR_FROM_SWEEP, 0, err));
    }
    for (int i = 0; i < c->nsets; i++) {
        SPAR_TRY(spar__config_set_arg(out, c->sets[i], err));
        for (int k = 0; k < sw->nkeys; k++)
            if (out->origin[sw->key[k]] == SPAR_FROM_COMMAND_LINE)
                return spar__err_set(err, SPAR_EINVAL,
                                     "key %s is swept in %s and set with --set (allowed: one "
                                     "of the two)",
                                     spar__keys[sw->key[k]].name, file->file);
    }
    return SPAR_OK;
}

static int grid_points(const spar_sweep *sw) {
    int count = 1;
    for (int k = 0; k < sw->nkeys; k++)
        count *= sw->nvalues[k];
    return count;
}

/* Rank 0: every point valid for this world, checked before anything runs. */
static int check_grid(const cli *c, const spar_config *file, int world, spar_config *scratch) {
    spar_err err = {""};
    for (int i = 0, n = grid_points(&file->sweep); i < n; i++) {
        int rc = point_config(c, file, i, scratch, &err);
        if (rc == 0) rc = spar__config_validate(scratch, world, &err);
        if (rc != 0 && n == 1) return spar_errorf(rc, "%s", err.msg);
        if (rc != 0) return spar_errorf(rc, "%s (sweep point %d of %d)", err.msg, i + 1, n);
    }
    return SPAR_OK;
}

/* Starts MPI with the transport the file or flags ask for (read by every rank before
 * MPI exists; errors are left for rank 0 to report once it runs). */
static spar_comm *start_mpi(const cli *c, spar_config *scratch, int *argc, char ***argv) {
    spar_err err;
    const char *transport = "auto";
    if (load_config(c, scratch, &err) == 0) transport = scratch->v[SPAR_KEY_COMM_TRANSPORT].s;
    spar_comm_prepare_transport(transport);
    spar_comm *comm = NULL;
    return spar_comm_init(&comm, argc, argv) == 0 ? comm : NULL;
}

static int exit_code(int status) {
    return spar_status_is_input_error(status) ? SPAR_EXIT_BAD_INPUT : SPAR_EXIT_FAILURE;
}

/* `spar run` and `spar bench`: same start, same plan broadcast; bench loops over a grid. */
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
    spar_config *file = calloc(1, sizeof *file), *cfg = calloc(1, sizeof *cfg);
    spar_comm *comm = file && cfg ? start_mpi(&c, cfg, &argc, &argv) : NULL;
    if (!comm) {
        free(file), free(cfg), free(c.sets);
        return SPAR_EXIT_FAILURE;
    }
    int status = SPAR_OK, points = 1;
    if (spar_comm_rank(comm) == 0) { /* the file alone (bench) or file + flags (run) */
        spar_err err = {""};
        cli file_only = c;
        file_only.nsets = bench ? 0 : c.nsets;
        status = load_config(&file_only, file, &err);
        if (status == 0 && !bench && file->sweep.nkeys > 0)
            status = spar__err_set(&err, SPAR_EINVAL,
                                   "%s: a sweep: block runs with `spar bench`, not `spar run`",
                                   file->file);
        if (status == 0 && !bench) status = spar__config_validate(file, spar_comm_size(comm), &err);
        if (status != 0) spar_log_error("%s", err.msg);
        if (status == 0 && bench) status = check_grid(&c, file, spar_comm_size(comm), cfg);
        points = grid_points(&file->sweep);
    }
    if (spar_comm_bcast(comm, &points, sizeof points, 0) != 0) status = SPAR_ECOMM;
    for (int i = 0; i < points && code == 0; i++) {
        spar_err err;
        if (spar_comm_rank(comm) == 0 && status == 0) {
            if (!bench)
                memcpy(cfg, file, sizeof *cfg);
            else if (point_config(&c, file, i, cfg, &err) == 0) /* checked in check_grid */
                spar__config_validate(cfg, spar_comm_size(comm), &err);
        }
        int rc = broadcast_plan(comm, cfg, status);
        if (rc != 0)
            code = exit_code(rc);
        else if (!bench)
            code = spar__run_plan(comm, cfg);
        else if ((rc = spar__bench_point(comm, cfg, i, points)) != 0)
            code = exit_code(rc);
    }
    spar_comm_free(comm);
    free(file), free(cfg), free(c.sets);
    return code;
}

int main(int argc, char **argv) {
    const char *level = getenv("SPAR_LOG");
    if (level && strcmp(level, "debug") == 0) spar_log_set_level(SPAR_LOG_DEBUG);
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
    return usage_error("unknown command '%s' (allowed: run, bench, config)", argv[1]);
}
