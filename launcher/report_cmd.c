/* report_cmd.c: `spar report FILE.jsonl [--group-by KEYS] [--csv] [--plot OUT.svg|OUT.png]`.
 *
 * Reads the records that `spar run`, `spar bench` and interrupted jobs append, and shows
 * one row per record: a fixed-width table, or CSV. --group-by merges the rows that agree
 * on the named columns into one, with the count and the median of every figure (repeated
 * runs of one point are how noise is taken out); a setting that differs within a group
 * shows as '*'. --plot draws the figures with gnuplot
 * (plot.c). Lines that are not records (torn, foreign) are counted and reported, never
 * guessed at.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "launcher.h"

/* The columns: text ones first, then numbers. Aliases let --group-by use key names. */
typedef struct column {
    const char *name, *alias, *source, *fallback; /* record fields, in order of preference */
    int width;
    bool text;
    double scale; /* numbers: multiplied by this */
} column;

static const column attention_columns[] = {
    {"record", NULL, "record", NULL, 11, true, 0},
    {"name", "run.name", "settings.run.name", NULL, 12, true, 0},
    {"method", "parallel.method", "settings.parallel.method", NULL, 9, true, 0},
    {"type", "attention.type", "settings.attention.type", NULL, 7, true, 0},
    {"causal", "attention.causal", "settings.attention.causal", NULL, 6, true, 0},
    {"job", "slurm.job_id", "slurm.job_id", NULL, 6, true, 0},
    {"P", "ranks", "ranks", NULL, 3, false, 1},
    {"N", "sequence.length", "settings.sequence.length", NULL, 8, false, 1},
    {"H", "attention.heads", "settings.attention.heads", NULL, 3, false, 1},
    {"G", "attention.kv_heads", "settings.attention.kv_heads", NULL, 3, false, 1},
    {"d", "attention.head_dim", "settings.attention.head_dim", NULL, 4, false, 1},
    {"thr", "run.threads", "settings.run.threads", NULL, 3, false, 1},
    {"fwd_ms", NULL, "forward.seconds", "forward.seconds_median", 9, false, 1e3},
    {"fwd_GFLOP/s", NULL, "forward.gflops_per_s", NULL, 11, false, 1},
    {"bwd_ms", NULL, "backward.seconds", "backward.seconds_median", 9, false, 1e3},
    {"bwd_GFLOP/s", NULL, "backward.gflops_per_s", NULL, 11, false, 1},
    {"sent_MiB", NULL, "forward.bytes_sent_per_rank", "forward.bytes_sent_per_rank_max", 9, false,
     1.0 / 1048576.0},
    {"peak_MiB", NULL, "peak_mib_per_rank", "peak_mib_max", 9, false, 1},
    {"x_sgemm", NULL, "forward.ratio_to_sgemm", NULL, 7, false, 1},
    {"max_err", NULL, "rel_err.o", NULL, 9, false, 1},
};

/* The records of generation (run.mode=generate). */
static const column generate_columns[] = {
    {"record", NULL, "record", NULL, 11, true, 0},
    {"name", "run.name", "settings.run.name", NULL, 12, true, 0},
    {"method", "parallel.method", "settings.parallel.method", NULL, 8, true, 0},
    {"split", NULL, "split", NULL, 9, true, 0},
    {"job", "slurm.job_id", "slurm.job_id", NULL, 6, true, 0},
    {"prompts", "workload.prompt_lengths", "settings.workload.prompt_lengths", NULL, 12, true, 0},
    {"ctx", NULL, "settings.workload.prompt_lengths", NULL, 6, false, 1}, /* a single length */
    {"P", "ranks", "ranks", NULL, 3, false, 1},
    {"K", "parallel.attention_ranks", "attention_ranks", NULL, 3, false, 1},
    {"B", "workload.batch", "settings.workload.batch", NULL, 4, false, 1},
    {"gen", "workload.generate", "settings.workload.generate", NULL, 4, false, 1},
    {"layers", "model.layers", "settings.model.layers", NULL, 6, false, 1},
    {"tok/s", NULL, "tokens_per_s", NULL, 8, false, 1},
    {"p50_ms", NULL, "step_ms_p50", NULL, 8, false, 1},
    {"p99_ms", NULL, "step_ms_p99", NULL, 8, false, 1},
    {"B/tok/layer", NULL, "bytes_per_token_layer", NULL, 11, false, 1},
    {"formula", NULL, "bytes_per_token_layer_formula", NULL, 8, false, 1},
    {"idle", NULL, "idle_fraction", NULL, 5, false, 1},
    {"kv_GB/s", NULL, "kv_read_gbs_busy", NULL, 8, false, 1},
    {"x_triad", NULL, "kv_read_fraction_of_triad", NULL, 7, false, 1},
};

/* A file's columns: columns before first_figure describe the run (grouping shows '*'
 * where they differ), the others are figures (grouping shows their median); max_err
 * (or -1) is filled with the largest of the record's errors. */
typedef struct table {
    const column *cols;
    int n, first_figure, max_err;
} table;

static const table attention_table = {attention_columns,
                                      (int)(sizeof attention_columns / sizeof(column)), 12, 19};
static const table generate_table = {generate_columns,
                                     (int)(sizeof generate_columns / sizeof(column)), 12, -1};
static const table *tab = &attention_table; /* chosen by spar__report_read */

/* The column's field in the record: its source, else its fallback (NULL: neither). */
static const spar_json_field *field_of(const spar_json_flat *j, const column *c) {
    const spar_json_field *f = spar__json_get(j, c->source);
    return f || !c->fallback ? f : spar__json_get(j, c->fallback);
}

static const char *text_of(const spar_json_flat *j, const column *c) {
    const spar_json_field *f = field_of(j, c);
    if (!f) return "-";
    if (f->is_num) return "?";
    return *f->text ? f->text : "-";
}

static double number_of(const spar_json_flat *j, const column *c) {
    const spar_json_field *f = field_of(j, c);
    if (!f) return NAN;
    if (f->is_num) return f->num * c->scale;
    char *end; /* a number written as text, such as one prompt length */
    double x = strtod(f->text, &end);
    return *f->text && !*end ? x * c->scale : NAN;
}

/* The largest relative error of the record (o, lse and the gradients). */
static double max_error(const spar_json_flat *j) {
    static const char *keys[] = {"rel_err.o", "rel_err.lse", "rel_err.dq", "rel_err.dk",
                                 "rel_err.dv"};
    double worst = NAN;
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        const spar_json_field *f = spar__json_get(j, keys[i]);
        if (f && f->is_num && !(f->num <= worst)) worst = f->num;
    }
    return worst;
}

static void row_from(const spar_json_flat *j, spar_report_row *r) {
    memset(r, 0, sizeof *r);
    for (int c = 0; c < tab->n; c++) {
        if (tab->cols[c].text)
            snprintf(r->text[c], sizeof r->text[c], "%.63s", text_of(j, &tab->cols[c]));
        else
            r->num[c] = number_of(j, &tab->cols[c]);
    }
    if (tab->max_err >= 0) r->num[tab->max_err] = max_error(j);
    r->count = 1;
}

/* Generation records get their own columns when the file holds nothing else. */
static void choose_table(FILE *f) {
    char *line = NULL;
    size_t cap = 0;
    bool generate = false, other = false;
    while (getline(&line, &cap, f) > 0) {
        if (strstr(line, "{\"record\":\"generate\"") == line)
            generate = true;
        else if (strstr(line, "{\"record\":\"") == line)
            other = true;
    }
    free(line);
    rewind(f);
    tab = generate && !other ? &generate_table : &attention_table;
}

int spar__report_read(const char *path, spar_report *rep) {
    *rep = (spar_report){0};
    struct stat st;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode))
        return spar_errorf(SPAR_EIO,
                           "spar report: '%s' is a directory (allowed: a JSON-lines "
                           "results file)",
                           path);
    FILE *f = fopen(path, "r");
    if (!f)
        return spar_errorf(SPAR_EIO, "spar report: cannot open '%s': %s", path, strerror(errno));
    choose_table(f);
    char *line = NULL;
    size_t cap = 0;
    int rc = SPAR_OK, lineno = 0;
    while (rc == 0 && getline(&line, &cap, f) > 0) {
        spar_json_flat j;
        lineno++;
        if (strspn(line, " \t\r\n") == strlen(line)) continue;
        if (spar__json_flatten(line, &j) != 0 || !spar__json_get(&j, "record")) {
            if (rep->skipped++ == 0) rep->first_skipped = lineno;
            continue;
        }
        if (rep->count == rep->cap) {
            int cap2 = rep->cap ? 2 * rep->cap : 64;
            spar_report_row *rows = realloc(rep->rows, (size_t)cap2 * sizeof *rows);
            if (!rows)
                rc = SPAR_ENOMEM;
            else
                rep->rows = rows, rep->cap = cap2;
        }
        if (rc == 0) row_from(&j, &rep->rows[rep->count++]);
        spar__json_flat_free(&j);
    }
    free(line);
    fclose(f);
    if (rc == 0 && rep->count == 0 && rep->skipped > 0) /* not a results file at all */
        rc = spar_errorf(SPAR_EFORMAT,
                         "spar report: '%s' holds no records: none of its %d line(s) is a JSON "
                         "record (the first: line %d; allowed: the output.results of spar run "
                         "or spar bench)",
                         path, rep->skipped, rep->first_skipped);
    return rc;
}

int spar__report_column(const char *name) {
    for (int c = 0; c < tab->n; c++)
        if (strcmp(name, tab->cols[c].name) == 0 ||
            (tab->cols[c].alias && strcmp(name, tab->cols[c].alias) == 0))
            return c;
    return -1;
}

const char *spar__report_column_name(int c) {
    return tab->cols[c].name;
}

bool spar__report_column_is_text(int c) {
    return tab->cols[c].text;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Median of the finite values among rows[idx[0..n)] in column c (NAN if none). */
static double median(const spar_report *rep, const int *idx, int n, int c, double *scratch) {
    int m = 0;
    for (int i = 0; i < n; i++)
        if (isfinite(rep->rows[idx[i]].num[c])) scratch[m++] = rep->rows[idx[i]].num[c];
    if (m == 0) return NAN;
    qsort(scratch, (size_t)m, sizeof *scratch, cmp_double);
    return m % 2 ? scratch[m / 2] : 0.5 * (scratch[m / 2 - 1] + scratch[m / 2]);
}

static bool same_number(double a, double b) {
    return a == b || (isnan(a) && isnan(b));
}

static bool same_group(const spar_report_row *a, const spar_report_row *b, const int *keys,
                       int nkeys) {
    for (int k = 0; k < nkeys; k++) {
        int c = keys[k];
        if (tab->cols[c].text ? strcmp(a->text[c], b->text[c]) != 0
                              : !same_number(a->num[c], b->num[c]))
            return false;
    }
    return true;
}

int spar__report_group(spar_report *rep, const int *keys, int nkeys) {
    int n = rep->count, groups = 0;
    int *idx = malloc(sizeof(int) * (size_t)(n + 1));
    bool *used = calloc((size_t)n + 1, sizeof(bool));
    double *scratch = malloc(sizeof(double) * (size_t)(n + 1));
    spar_report_row *out = malloc(sizeof *out * (size_t)(n + 1));
    if (!idx || !used || !scratch || !out) {
        free(idx), free(used), free(scratch), free(out);
        return SPAR_ENOMEM;
    }
    for (int i = 0; i < n; i++) { /* groups in order of first appearance */
        if (used[i]) continue;
        int m = 0;
        for (int j = i; j < n; j++)
            if (!used[j] && same_group(&rep->rows[i], &rep->rows[j], keys, nkeys))
                used[j] = true, idx[m++] = j;
        spar_report_row *g = &out[groups++];
        *g = rep->rows[i];
        g->count = m;
        for (int c = 0; c < tab->n; c++) {
            if (!tab->cols[c].text && c >= tab->first_figure)
                g->num[c] = median(rep, idx, m, c, scratch);
            for (int j = 1; !tab->cols[c].text && c < tab->first_figure && j < m; j++)
                if (!same_number(rep->rows[idx[j]].num[c], g->num[c])) g->num[c] = INFINITY;
            for (int j = 1; tab->cols[c].text && j < m; j++) /* differing text: '*' */
                if (strcmp(rep->rows[idx[j]].text[c], g->text[c]) != 0) strcpy(g->text[c], "*");
        }
    }
    free(rep->rows);
    rep->rows = out, rep->count = groups, rep->cap = n + 1;
    free(idx), free(used), free(scratch);
    return SPAR_OK;
}

static void print_number(double x, int width, bool csv) {
    if (isinf(x))
        printf("%*s", csv ? 0 : width, "*"); /* differs within a group */
    else if (!isfinite(x))
        printf("%*s", csv ? 0 : width, csv ? "" : "-");
    else if (x != 0 && (fabs(x) < 1e-2 || fabs(x) >= 1e7))
        printf("%*.2e", csv ? 0 : width, x);
    else if (x == floor(x) && fabs(x) < 1e7)
        printf("%*.0f", csv ? 0 : width, x);
    else
        printf("%*.*f", csv ? 0 : width, fabs(x) < 10 ? 3 : fabs(x) < 1000 ? 2 : 1, x);
}

void spar__report_print(const spar_report *rep, bool csv, bool grouped) {
    if (grouped) printf(csv ? "n" : "%4s", "n");
    for (int c = 0; c < tab->n; c++) {
        if (grouped || c) putchar(csv ? ',' : ' ');
        if (csv)
            printf("%s", tab->cols[c].name);
        else
            printf(tab->cols[c].text ? "%-*s" : "%*s", tab->cols[c].width, tab->cols[c].name);
    }
    printf("\n");
    for (int i = 0; i < rep->count; i++) {
        const spar_report_row *r = &rep->rows[i];
        if (grouped) printf(csv ? "%d" : "%4d", r->count);
        for (int c = 0; c < tab->n; c++) {
            if (grouped || c) putchar(csv ? ',' : ' ');
            if (tab->cols[c].text && csv)
                printf("%s", r->text[c]);
            else if (tab->cols[c].text)
                printf("%-*s", tab->cols[c].width, r->text[c]);
            else
                print_number(r->num[c], tab->cols[c].width, csv);
        }
        printf("\n");
    }
}

void spar__report_free(spar_report *rep) {
    free(rep->rows);
    *rep = (spar_report){0};
}

static int report_usage(const char *fmt, const char *arg) {
    fprintf(stderr, "error: spar report: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\nusage: spar report FILE.jsonl [--group-by COL,COL...] [--csv] "
                    "[--plot OUT.svg|OUT.png]\n");
    return SPAR_EXIT_BAD_INPUT;
}

/* "method,N" into column indices. */
static int parse_keys(const char *list, int *keys, int *nkeys) {
    char buf[512];
    snprintf(buf, sizeof buf, "%s", list);
    *nkeys = 0;
    for (char *save = NULL, *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        int c = spar__report_column(t);
        if (c < 0 || *nkeys == SPAR_REPORT_COLUMNS) {
            fprintf(stderr, "error: spar report: --group-by column '%s' (allowed:", t);
            for (int k = 0; k < tab->n; k++)
                fprintf(stderr, " %s", tab->cols[k].name);
            fprintf(stderr, "; or the keys run.name parallel.method attention.type "
                            "sequence.length ...)\n");
            return SPAR_EXIT_BAD_INPUT;
        }
        keys[(*nkeys)++] = c;
    }
    return *nkeys ? 0 : report_usage("%s", "--group-by needs column names");
}

int spar__cmd_report(int argc, char **argv) {
    const char *file = NULL, *plot = NULL, *group = NULL;
    bool csv = false;
    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--csv") == 0)
            csv = true;
        else if (strcmp(argv[i], "--group-by") == 0 && i + 1 < argc)
            group = argv[++i];
        else if (strcmp(argv[i], "--plot") == 0 && i + 1 < argc)
            plot = argv[++i];
        else if (argv[i][0] == '-')
            return report_usage("unknown option or missing value '%s'", argv[i]);
        else if (file)
            return report_usage("more than one results file ('%s')", argv[i]);
        else
            file = argv[i];
    }
    if (!file) return report_usage("%s", "a results FILE.jsonl is required");
    if (plot && strchr(plot, '\'')) return report_usage("--plot '%s': no quotes in the path", plot);
    int keys[SPAR_REPORT_COLUMNS], nkeys = 0;
    if (group && parse_keys(group, keys, &nkeys) != 0) return SPAR_EXIT_BAD_INPUT;
    spar_report rep;
    int rc = spar__report_read(file, &rep);
    if (rc != 0) return spar_status_is_input_error(rc) ? SPAR_EXIT_BAD_INPUT : SPAR_EXIT_FAILURE;
    if (!csv) printf("# %d record(s) from %s%s", rep.count, file, rep.skipped ? "" : "\n");
    if (!csv && rep.skipped)
        printf("; %d line(s) are not records and were skipped (the first: line %d)\n", rep.skipped,
               rep.first_skipped);
    int code = SPAR_EXIT_OK;
    spar_report shown = rep;
    if (nkeys) { /* group a copy: the plot uses every row */
        shown.rows = malloc(sizeof *shown.rows * (size_t)(rep.count + 1));
        if (shown.rows) memcpy(shown.rows, rep.rows, sizeof *shown.rows * (size_t)rep.count);
        if (!shown.rows || spar__report_group(&shown, keys, nkeys) != 0) code = SPAR_EXIT_FAILURE;
    }
    if (code == 0) spar__report_print(&shown, csv, nkeys > 0);
    if (code == 0 && plot) {
        rc = spar__report_plot(&rep, plot);
        if (rc == 0 && !csv) printf("# plot: %s\n", plot);
        if (rc != 0)
            code = spar_status_is_input_error(rc) && rc != SPAR_EUNSUP ? SPAR_EXIT_BAD_INPUT
                                                                       : SPAR_EXIT_FAILURE;
    }
    if (nkeys) free(shown.rows);
    spar__report_free(&rep);
    return code;
}
