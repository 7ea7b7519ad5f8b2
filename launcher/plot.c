/* plot.c: `spar report --plot OUT.svg|OUT.png`: four panels drawn by gnuplot.
 *
 * Attention records (run, bench):
 *   forward time vs N      one line per (method, P), log-log
 *   forward GFLOP/s vs N   one line per (method, P)
 *   forward time vs P      one line per (method, N) that ran at several P (scaling)
 *   bytes sent per rank vs N, one line per (method, P)
 * Generation records, one line per (method, batch B) against the context length:
 *   tokens/s, time between tokens (p50), cache read rate / triad, bytes per token per layer
 *
 * Rows are first merged per (method, series, x) (median), so repeats and benchmarks give
 * one point each. The data goes inline (gnuplot datablocks) in a script that gnuplot
 * reads from a pipe; the file type follows OUT's extension.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "launcher.h"

/* A panel: y against x, one line per method and value of `fix`. */
typedef struct panel {
    const char *title, *ylabel, *x, *xlabel, *fix, *y;
    bool logy, need_two; /* need_two: a line needs two points (scaling) */
} panel;

static int col(const char *name) {
    return spar__report_column(name);
}

/* The series of one panel: rows that share method and the `fix` column, x ascending (the
 * rows are sorted), as datablocks $d<id>_<i>; returns how many were written. */
static int write_series(FILE *g, const spar_report *rep, const panel *pn, int id) {
    int method = col("method"), kx = col(pn->x), kfix = col(pn->fix), ky = col(pn->y), count = 0;
    bool *done = calloc((size_t)rep->count + 1, sizeof(bool));
    if (!done) return -1;
    fprintf(g, "unset label\n");
    for (int i = 0; i < rep->count; i++) {
        const spar_report_row *a = &rep->rows[i];
        if (done[i] || !isfinite(a->num[ky]) || !isfinite(a->num[kx])) continue;
        int points = 0;
        for (int j = i; j < rep->count; j++)
            if (!done[j] && strcmp(rep->rows[j].text[method], a->text[method]) == 0 &&
                rep->rows[j].num[kfix] == a->num[kfix] && isfinite(rep->rows[j].num[ky]))
                points++;
        if (pn->need_two && points < 2) continue;
        fprintf(g, "$d%d_%d << EOD\n", id, count);
        for (int j = i; j < rep->count; j++)
            if (!done[j] && strcmp(rep->rows[j].text[method], a->text[method]) == 0 &&
                rep->rows[j].num[kfix] == a->num[kfix] && isfinite(rep->rows[j].num[ky])) {
                fprintf(g, "%.9g %.9g\n", rep->rows[j].num[kx], rep->rows[j].num[ky]);
                done[j] = true;
            }
        fprintf(g, "EOD\n$t%d_%d << EOD\n%s %s=%.0f\nEOD\n", id, count, a->text[method], pn->fix,
                a->num[kfix]);
        count++;
    }
    free(done);
    return count;
}

static void draw(FILE *g, const panel *pn, int id, int count) {
    fprintf(g, "set title '%s'\nset xlabel '%s'\nset ylabel '%s'\n", pn->title, pn->xlabel,
            pn->ylabel);
    fprintf(g, "set autoscale\nset logscale x 2\n%s\n",
            pn->logy ? "set logscale y" : "unset logscale y");
    if (count == 0) { /* an empty frame with a note (gnuplot refuses a plot of no points) */
        fprintf(g,
                "unset logscale\nset xrange [0:1]\nset yrange [0:1]\n"
                "set label 1 '%s' at graph 0.5, 0.5 center\nplot 2 notitle\n",
                pn->need_two ? "no configuration ran at several P" : "no data");
        return;
    }
    fprintf(g, "plot ");
    for (int i = 0; i < count; i++) /* the title is the datablock's only line */
        fprintf(g, "%s$d%d_%d using 1:2 with linespoints lw 2 title $t%d_%d[1]", i ? ", " : "", id,
                i, id, i);
    fprintf(g, "\n");
}

static int sort_keys[3]; /* method, series, x: the order rows are plotted in */

static int cmp_rows(const void *pa, const void *pb) {
    const spar_report_row *a = pa, *b = pb;
    int c = strcmp(a->text[sort_keys[0]], b->text[sort_keys[0]]);
    for (int k = 1; k < 3 && c == 0; k++)
        c = (a->num[sort_keys[k]] > b->num[sort_keys[k]]) -
            (a->num[sort_keys[k]] < b->num[sort_keys[k]]);
    return c;
}

static const panel attention_panels[4] = {
    {"forward time", "ms", "N", "sequence length N", "P", "fwd_ms", true, false},
    {"forward throughput", "GFLOP/s", "N", "sequence length N", "P", "fwd_GFLOP/s", false, false},
    {"scaling with ranks", "forward ms", "P", "ranks P", "N", "fwd_ms", true, true},
    {"bytes sent per rank, forward", "MiB", "N", "sequence length N", "P", "sent_MiB", true, false},
};

static const panel generate_panels[4] = {
    {"decode throughput", "tokens/s", "ctx", "prompt length", "B", "tok/s", true, false},
    {"time between tokens (p50)", "ms", "ctx", "prompt length", "B", "p50_ms", true, false},
    {"cache read rate / triad (attention ranks)", "fraction", "ctx", "prompt length", "B",
     "x_triad", false, false},
    {"bytes per token per layer", "bytes", "ctx", "prompt length", "B", "B/tok/layer", false,
     false},
};

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
    const panel *panels = col("fwd_ms") >= 0 ? attention_panels : generate_panels;
    if (!gnuplot_found())
        return spar_errorf(SPAR_EUNSUP, "spar report: gnuplot is not installed, so no plot was "
                                        "drawn (apt-get install gnuplot-nox); the table above is "
                                        "complete");
    spar_report rep = *all;
    rep.rows = malloc(sizeof *rep.rows * (size_t)(all->count + 1));
    if (!rep.rows) return SPAR_ENOMEM;
    memcpy(rep.rows, all->rows, sizeof *rep.rows * (size_t)all->count);
    sort_keys[0] = col("method"), sort_keys[1] = col(panels[0].fix),
    sort_keys[2] = col(panels[0].x);
    int rc = spar__report_group(&rep, sort_keys, 3);
    if (rc == 0) qsort(rep.rows, (size_t)rep.count, sizeof *rep.rows, cmp_rows);
    remove(out);
    FILE *g = rc == 0 ? popen("gnuplot", "w") : NULL;
    if (rc == 0 && !g) rc = spar_errorf(SPAR_EIO, "spar report: cannot start gnuplot");
    if (rc == 0) {
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
