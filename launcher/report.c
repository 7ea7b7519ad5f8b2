/* report.c: what rank 0 shows and records: the settings, the result table, JSON lines,
 * and the documentation of every key (help text and schema), all from the key table. */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "launcher.h"
#include "spar_git.h" /* defines: SPAR_GIT_COMMIT (written at build time) */

#ifndef SPAR_VERSION
#define SPAR_VERSION "0.1.0"
#endif

static const char *type_name(enum spar_key_type t) {
    switch (t) {
    case SPAR_KT_BOOL: return "bool";
    case SPAR_KT_INT: return "int";
    case SPAR_KT_FLOAT: return "float";
    case SPAR_KT_ENUM: return "enum";
    case SPAR_KT_STRING: return "string";
    }
    return "?";
}

void spar__config_print(const spar_config *cfg, bool with_origin) {
    char val[1100];
    for (int i = 0; i < SPAR_KEY_COUNT; i++) {
        spar__value_format(cfg, i, val, sizeof val);
        bool quote = spar__keys[i].type == SPAR_KT_STRING;
        if (with_origin)
            printf("%-20s %s%s%s%*s# %s\n", spar__keys[i].name, quote ? "\"" : "", val,
                   quote ? "\"" : "",
                   (int)(24 - strlen(val) - (quote ? 2 : 0)) > 0
                       ? (int)(24 - strlen(val) - (quote ? 2 : 0))
                       : 1,
                   "", spar__origin_name(cfg->origin[i]));
        else
            printf("%s: %s%s%s\n", spar__keys[i].name, quote ? "\"" : "", val, quote ? "\"" : "");
    }
}

void spar__print_settings(const spar_config *cfg, int ranks, const char *transport) {
    if (spar_log_rank() > 0) return;
    printf("# spar %s (%s)  ranks=%d  transport=%s\n", SPAR_VERSION, SPAR_GIT_COMMIT, ranks,
           transport);
    printf("# settings%s%s\n", *cfg->file ? " from " : "", cfg->file);
    char val[1100];
    for (int i = 0; i < SPAR_KEY_COUNT; i++) {
        spar__value_format(cfg, i, val, sizeof val);
        printf("#   %-20s = %-28s (%s)\n", spar__keys[i].name, *val ? val : "-",
               spar__origin_name(cfg->origin[i]));
    }
    fflush(stdout);
}

static double max_of(const double *x, int n) {
    double m = 0.0;
    for (int i = 0; i < n; i++)
        m = x[i] > m ? x[i] : m;
    return m;
}

double spar__max_error(const spar_run_result *res) {
    double worst = 0.0;
    for (int i = 0; i < SPAR_ERR_COUNT; i++)
        if (!isnan(res->err[i])) worst = fmax(worst, res->err[i]);
    return worst;
}

static void print_pass_row(const spar_run_result *res, const char *name,
                           const spar_pass_result *pass, const char *err) {
    const spar_config *c = res->cfg;
    printf("%-9s %4s %5d %9lld %5lld %8lld %8lld %10s %6s %9.3f %9.2f %13.2f %13.1f %11s\n",
           c->v[SPAR_KEY_PAR_METHOD].s, name, res->ranks, (long long)c->v[SPAR_KEY_SEQ_LENGTH].i,
           (long long)c->v[SPAR_KEY_ATTN_HEADS].i, (long long)c->v[SPAR_KEY_ATTN_KV_HEADS].i,
           (long long)c->v[SPAR_KEY_ATTN_HEAD_DIM].i, c->v[SPAR_KEY_SEQ_PARTITION].s,
           c->v[SPAR_KEY_ATTN_CAUSAL].b ? "true" : "false", pass->seconds, pass->gflops_per_s,
           max_of(pass->bytes_sent, res->ranks) / 1048576.0, max_of(res->peak_mib, res->ranks),
           err);
}

/* One row per pass; the error column holds the largest error of that pass's outputs. */
void spar__print_result_table(const spar_run_result *res) {
    char err_fwd[32] = "-", err_bwd[32] = "-";
    if (res->verified) {
        snprintf(err_fwd, sizeof err_fwd, "%.2e",
                 fmax(res->err[SPAR_ERR_O], res->err[SPAR_ERR_LSE]));
        snprintf(err_bwd, sizeof err_bwd, "%.2e",
                 fmax(res->err[SPAR_ERR_DQ], fmax(res->err[SPAR_ERR_DK], res->err[SPAR_ERR_DV])));
    }
    printf("# %-7s %4s %5s %9s %5s %8s %8s %10s %6s %9s %9s %13s %13s %11s\n", "method", "pass",
           "ranks", "N", "heads", "kv_heads", "head_dim", "partition", "causal", "time_s",
           "GFLOP/s", "sent_MiB/rank", "peak_MiB/rank", "max_rel_err");
    print_pass_row(res, "fwd", &res->fwd, err_fwd);
    if (res->bwd.ran) print_pass_row(res, "bwd", &res->bwd, err_bwd);
    fflush(stdout);
}

/* JSON string with the characters JSON requires escaped. */
void spar__json_string(FILE *f, const char *s) {
    fputc('"', f);
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            fprintf(f, "\\%c", ch);
        else if (ch < 0x20)
            fprintf(f, "\\u%04x", ch);
        else
            fputc(ch, f);
    }
    fputc('"', f);
}

void spar__json_number(FILE *f, double x) {
    if (isfinite(x))
        fprintf(f, "%.9g", x);
    else
        fputs("null", f);
}

static void json_array(FILE *f, const char *name, const double *x, int n) {
    fprintf(f, ",\"%s\":[", name);
    for (int i = 0; i < n; i++) {
        if (i) fputc(',', f);
        spar__json_number(f, x[i]);
    }
    fputc(']', f);
}

/* A pass's figures as an object, or null when the pass did not run. */
static void json_pass(FILE *f, const char *name, const spar_pass_result *p, int ranks) {
    fprintf(f, ",\"%s\":", name);
    if (!p->ran) {
        fputs("null", f);
        return;
    }
    fputs("{\"seconds\":", f);
    spar__json_number(f, p->seconds);
    fputs(",\"compute_seconds\":", f);
    spar__json_number(f, p->compute_seconds);
    fputs(",\"wait_seconds\":", f);
    spar__json_number(f, p->wait_seconds);
    fputs(",\"flops\":", f);
    spar__json_number(f, p->flops);
    fputs(",\"gflops_per_s\":", f);
    spar__json_number(f, p->gflops_per_s);
    json_array(f, "bytes_sent_per_rank", p->bytes_sent, ranks);
    fputc('}', f);
}

static void json_settings(FILE *f, const spar_config *cfg) {
    char val[1100];
    fputs("\"settings\":{", f);
    for (int i = 0; i < SPAR_KEY_COUNT; i++) {
        fprintf(f, "%s\"%s\":", i ? "," : "", spar__keys[i].name);
        spar__value_format(cfg, i, val, sizeof val);
        if (spar__keys[i].type == SPAR_KT_BOOL || spar__keys[i].type == SPAR_KT_INT)
            fputs(val, f);
        else if (spar__keys[i].type == SPAR_KT_FLOAT && !isnan(cfg->v[i].f))
            spar__json_number(f, cfg->v[i].f);
        else
            spar__json_string(f, val);
    }
    fputc('}', f);
}

/* One record, written with a single write() on an O_APPEND file so that a record is
 * never interleaved with another writer's or left half-written by us. */
void spar__json_common(FILE *f, const spar_config *cfg, int ranks, const char *hosts,
                       const char *library, const char *transport) {
    char when[32];
    time_t now = time(NULL);
    strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
    fprintf(f, "\"spar_version\":\"%s\",\"git_commit\":\"%s\",\"time\":\"%s\",", SPAR_VERSION,
            SPAR_GIT_COMMIT, when);
    json_settings(f, cfg);
    fprintf(f, ",\"config_file\":");
    spar__json_string(f, cfg->file);
    fputs(",\"hosts\":[", f);
    for (int r = 0; r < ranks; r++) {
        if (r) fputc(',', f);
        spar__json_string(f, hosts + 64 * r);
    }
    fputs("],\"transport\":", f);
    spar__json_string(f, transport);
    fputs(",\"mpi_library\":", f);
    spar__json_string(f, library);
    if (cfg->point_id[0])
        fprintf(f, ",\"point_id\":\"%s\",\"point\":%d,\"points\":%d", cfg->point_id, cfg->point + 1,
                cfg->points);
    spar__json_slurm(f);
}

int spar__append_line(const char *path, const char *line, size_t len) {
    int rc = SPAR_OK, fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd < 0 || write(fd, line, len) != (ssize_t)len)
        rc = spar_errorf(SPAR_EIO, "key output.results: cannot append to '%s': %s", path,
                         strerror(errno));
    if (fd >= 0) close(fd);
    return rc;
}

int spar__append_record(const char *path, const spar_run_result *res) {
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (!f) return SPAR_ENOMEM;
    fputs("{\"record\":\"run\",", f);
    spar__json_common(f, res->cfg, res->ranks, res->hosts, res->library, res->transport);
    fprintf(f, ",\"ranks\":%d", res->ranks);
    json_pass(f, "forward", &res->fwd, res->ranks);
    json_pass(f, "backward", &res->bwd, res->ranks);
    json_array(f, "peak_mib_per_rank", res->peak_mib, res->ranks);
    fprintf(f, ",\"verified\":%s,\"rel_err\":{", res->verified ? "true" : "false");
    static const char *names[SPAR_ERR_COUNT] = {"o", "lse", "dq", "dk", "dv"};
    for (int i = 0; i < SPAR_ERR_COUNT; i++) {
        fprintf(f, "%s\"%s\":", i ? "," : "", names[i]);
        spar__json_number(f, res->verified ? res->err[i] : NAN);
    }
    fputs("}}\n", f);
    fclose(f);
    int rc = spar__append_line(path, buf, len);
    free(buf);
    return rc;
}

void spar__print_key_help(void) {
    printf("Keys (set them in the YAML file, nested or dotted, or with --set KEY=VALUE):\n");
    for (int i = 0; i < SPAR_KEY_COUNT; i++) {
        const spar_key *k = &spar__keys[i];
        printf("  %-20s %-6s default %-10s %s\n  %20s        allowed: %s\n", k->name,
               type_name(k->type), *k->def ? k->def : "\"\"", k->doc, "", k->allowed);
    }
}

/* Markdown table cells cannot hold a bare '|'. */
static void markdown_cell(const char *text) {
    for (; *text; text++)
        fputs(*text == '|' ? "\\|" : (char[]){*text, 0}, stdout);
}

void spar__print_schema_markdown(void) {
    printf("| key | type | default | allowed | meaning |\n|---|---|---|---|---|\n");
    for (int i = 0; i < SPAR_KEY_COUNT; i++) {
        const spar_key *k = &spar__keys[i];
        printf("| `%s` | %s | %s%s%s | ", k->name, type_name(k->type), *k->def ? "`" : "",
               *k->def ? k->def : "(empty)", *k->def ? "`" : "");
        markdown_cell(k->allowed);
        printf(" | ");
        markdown_cell(k->doc);
        printf(" |\n");
    }
}
