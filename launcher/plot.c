/* plot.c: `spar report --plot OUT.svg|OUT.png`: four panels drawn by gnuplot.
 *
 *   forward time vs N      one line per (method, P), log-log
 *   forward GFLOP/s vs N   one line per (method, P)
 *   forward time vs P      one line per (method, N) that ran at several P (scaling)
 *   bytes sent per rank vs N, one line per (method, P)
 *
 * Rows are first merged per (method, P, N) (median), so repeats and benchmarks give one
 * point each. The data goes inline (gnuplot datablocks) in a script that gnuplot reads
 * from a pipe; the file type follows OUT's extension.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "launcher.h"

enum { X_N, X_P };

typedef struct panel {
    const char *title, *ylabel;
    int x, y; /* x: X_N or X_P; y: a report column */
    bool logy;
} panel;

static int col(const char *name) {
    return spar__report_column(name);
}

/* The series of one panel: rows that share method and P (x = N) or method and N (x = P),
 * as datablocks $d<first>_<i>; returns how many were written. */
static int write_series(FILE *g, const spar_report *rep, const panel *pn, int id) {
    int method = col("method"), kx = pn->x == X_N ? col("N") : col("P");
    int kfix = pn->x == X_N ? col("P") : col("N"), count = 0;
    bool *done = calloc((size_t)rep->count + 1, sizeof(bool));
    if (!done) return -1;
    fprintf(g, "unset label\n");
    for (int i = 0; i < rep->count; i++) {
        const spar_report_row *a = &rep->rows[i];
        if (done[i] || !isfinite(a->num[pn->y]) || !isfinite(a->num[kx])) continue;
        int points = 0;
        for (int j = i; j < rep->count; j++) /* same series, x ascending: rows are sorted */
            if (!done[j] && strcmp(rep->rows[j].text[method], a->text[method]) == 0 &&
                rep->rows[j].num[kfix] == a->num[kfix] && isfinite(rep->rows[j].num[pn->y]))
                points++;
        if (pn->x == X_P && points < 2) continue; /* a scaling line needs two P */
        fprintf(g, "$d%d_%d << EOD\n", id, count);
        for (int j = i; j < rep->count; j++)
            if (!done[j] && strcmp(rep->rows[j].text[method], a->text[method]) == 0 &&
                rep->rows[j].num[kfix] == a->num[kfix] && isfinite(rep->rows[j].num[pn->y])) {
                fprintf(g, "%.9g %.9g\n", rep->rows[j].num[kx], rep->rows[j].num[pn->y]);
                done[j] = true;
            }
        fprintf(g, "EOD\n$t%d_%d << EOD\n%s %s=%.0f\nEOD\n", id, count, a->text[method],
                pn->x == X_N ? "P" : "N", a->num[kfix]);
        count++;
    }
    free(done);
    return count;
}

static void draw(FILE *g, const panel *pn, int id, int count) {
    fprintf(g, "set title '%s'\nset xlabel '%s'\nset ylabel '%s'\n", pn->title,
            pn->x == X_N ? "sequence length N" : "ranks P", pn->ylabel);
    fprintf(g, "set logscale x 2\n%s\n", pn->logy ? "set logscale y" : "unset logscale y");
    if (count == 0) {
        fprintf(g, "set label 1 '%s' at graph 0.5, 0.5 center\nplot 1/0 notitle\n",
                pn->x == X_P ? "no configuration ran at several P" : "no data");
        return;
    }
    fprintf(g, "plot ");
    for (int i = 0; i < count; i++) /* the title is the datablock's only line */
        fprintf(g, "%s$d%d_%d using 1:2 with linespoints lw 2 title $t%d_%d[1]", i ? ", " : "", id,
                i, id, i);
    fprintf(g, "\n");
}

static int cmp_rows(const void *pa, const void *pb) {
    const spar_report_row *a = pa, *b = pb;
    int m = col("method"), p = col("P"), n = col("N");
    int c = strcmp(a->text[m], b->text[m]);
    if (c) return c;
    if (a->num[p] != b->num[p]) return a->num[p] < b->num[p] ? -1 : 1;
    return (a->num[n] > b->num[n]) - (a->num[n] < b->num[n]);
}

static bool gnuplot_found(void) {
    return system("command -v gnuplot >/dev/null 2>&1") == 0;
}

int spar__report_plot(const spar_report *all, const char *out) {
    const char *ext = strrchr(out, '.');
    bool svg = ext && strcmp(ext, ".svg") == 0, png = ext && strcmp(ext, ".png") == 0;
    if (!svg && !png)
        return spar_errorf(SPAR_EINVAL,
                           "spar report: --plot '%s' (allowed: a file ending in "
                           ".svg or .png)",
                           out);
    if (col("fwd_ms") < 0)
        return spar_errorf(SPAR_EUNSUP, "spar report: --plot draws attention records (run, "
                                        "bench); this file holds generation records only");
    if (!gnuplot_found())
        return spar_errorf(SPAR_EUNSUP, "spar report: gnuplot is not installed, so no plot was "
                                        "drawn (apt-get install gnuplot-nox); the table above is "
                                        "complete");
    spar_report rep = *all;
    rep.rows = malloc(sizeof *rep.rows * (size_t)(all->count + 1));
    if (!rep.rows) return SPAR_ENOMEM;
    memcpy(rep.rows, all->rows, sizeof *rep.rows * (size_t)all->count);
    int keys[] = {col("method"), col("P"), col("N")};
    int rc = spar__report_group(&rep, keys, 3);
    if (rc == 0) qsort(rep.rows, (size_t)rep.count, sizeof *rep.rows, cmp_rows);
    remove(out);
    FILE *g = rc == 0 ? popen("gnuplot", "w") : NULL;
    if (rc == 0 && !g) rc = spar_errorf(SPAR_EIO, "spar report: cannot start gnuplot");
    if (rc == 0) {
        const panel panels[] = {
            {"forward time", "ms", X_N, col("fwd_ms"), true},
            {"forward throughput", "GFLOP/s", X_N, col("fwd_GFLOP/s"), false},
            {"scaling with ranks", "forward ms", X_P, col("fwd_ms"), true},
            {"bytes sent per rank, forward", "MiB", X_N, col("sent_MiB"), true}};
        fprintf(g, "set terminal %s size 1200,900 font 'sans,10'\nset output '%s'\n",
                svg ? "svg dynamic" : "pngcairo", out);
        fprintf(g, "set key top left\nset grid\nset multiplot layout 2,2\n");
        for (int p = 0; p < 4; p++)
            draw(g, &panels[p], p, write_series(g, &rep, &panels[p], p));
        fprintf(g, "unset multiplot\nset output\n");
        int status = pclose(g);
        struct stat st;
        if (status != 0 || stat(out, &st) != 0 || st.st_size == 0)
            rc = spar_errorf(SPAR_EIO, "spar report: gnuplot failed (status %d) to write '%s'",
                             status, out);
    }
    spar__report_free(&rep);
    return rc;
}
