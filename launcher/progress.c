/* progress.c: what rank 0 shows while a long run or sweep goes on.
 *
 * Two styles (run.progress): `bar`, one line redrawn in place with a bar, the fraction
 * done and an ETA, for a person watching a terminal; `lines`, plain timestamped lines,
 * for batch logs (the first and last step of each phase, and one every 10 s between),
 * so that a log shows both that a job lives and how fast it goes. `auto` picks the bar
 * when rank 0's output, or that of its launcher (mpirun, which passes the ranks' output
 * through a pipe), is a terminal.
 */
#include <limits.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "launcher.h"

enum style { STYLE_LINES, STYLE_BAR, STYLE_OFF };

static enum style style = STYLE_LINES;
static const char *last_phase;
static double last_shown;

/* Process pid's command name (comm) and parent (returned; 0 if unknown). */
static int read_stat(int pid, char *comm, size_t len) {
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *open = strchr(buf, '('), *close = strrchr(buf, ')');
    if (!open || !close || close < open) return 0;
    snprintf(comm, len, "%.*s", (int)(close - open - 1), open + 1);
    int ppid = 0;
    return sscanf(close + 1, " %*c %d", &ppid) == 1 ? ppid : 0;
}

/* Is our stdout a terminal, or under mpirun, is mpirun's? (Open MPI gives the ranks a
 * pseudo-terminal of their own whatever mpirun writes to, so the rank's own answer says
 * nothing there; ranks may also sit under wrapper shells.) */
static bool watched_by_a_person(void) {
    if (!getenv("OMPI_COMM_WORLD_SIZE")) return isatty(STDOUT_FILENO);
    char comm[64] = "";
    int pid = read_stat((int)getpid(), comm, sizeof comm); /* our parent, then up */
    for (int up = 0; up < 8 && pid > 1; up++) {
        int ppid = read_stat(pid, comm, sizeof comm);
        if (strcmp(comm, "orted") == 0) return false; /* a remote node: its log is a pipe */
        if (strcmp(comm, "mpirun") && strcmp(comm, "mpiexec") && strcmp(comm, "orterun")) {
            pid = ppid;
            continue;
        }
        char link[64], target[PATH_MAX];
        snprintf(link, sizeof link, "/proc/%d/fd/1", pid);
        ssize_t n = readlink(link, target, sizeof target - 1);
        if (n <= 0) return false;
        target[n] = 0;
        return strncmp(target, "/dev/pts/", 9) == 0 || strncmp(target, "/dev/tty", 8) == 0;
    }
    return false;
}

void spar__progress_configure(const spar_config *cfg) {
    const char *want = cfg->v[SPAR_KEY_RUN_PROGRESS].s;
    style = strcmp(want, "off") == 0     ? STYLE_OFF
            : strcmp(want, "bar") == 0   ? STYLE_BAR
            : strcmp(want, "lines") == 0 ? STYLE_LINES
            : watched_by_a_person()      ? STYLE_BAR
                                         : STYLE_LINES;
    last_phase = NULL;
}

static void format_eta(char *out, size_t len, double elapsed, double fraction) {
    if (fraction <= 0.0 || fraction >= 1.0) {
        snprintf(out, len, "done");
        return;
    }
    double left = elapsed * (1.0 - fraction) / fraction;
    if (left < 120)
        snprintf(out, len, "ETA %.0f s", left);
    else if (left < 7200)
        snprintf(out, len, "ETA %.0f min", left / 60);
    else
        snprintf(out, len, "ETA %.1f h", left / 3600);
}

void spar__show_progress(void *ctx, const char *phase, int64_t done, int64_t total) {
    if (style == STYLE_OFF || total <= 0) return;
    double now = spar_comm_wtime(), elapsed = now - *(const double *)ctx;
    double fraction = (double)done / (double)total;
    bool first = phase != last_phase, last = done >= total;
    char eta[32];
    format_eta(eta, sizeof eta, elapsed, fraction);
    if (style == STYLE_BAR) {
        if (!first && !last && now - last_shown < 0.1) return;
        char bar[31];
        int filled = (int)(fraction * 30.0 + 0.5);
        for (int i = 0; i < 30; i++)
            bar[i] = i < filled ? '#' : '.';
        bar[30] = 0;
        printf("\r# progress: [%s] %3.0f%% %s %lld/%lld, %.1f s, %s   %s", bar, 100.0 * fraction,
               phase, (long long)done, (long long)total, elapsed, eta, last ? "\n" : "");
    } else {
        if (!first && !last && now - last_shown < 10.0) return;
        char when[16];
        time_t t = time(NULL);
        strftime(when, sizeof when, "%H:%M:%S", localtime(&t));
        printf("# progress: %s %s %lld/%lld (%.0f%%), %.2f s, %s\n", when, phase, (long long)done,
               (long long)total, 100.0 * fraction, elapsed, eta);
    }
    fflush(stdout);
    last_phase = phase, last_shown = now;
}

void spar__progress_point(int index, int points, double elapsed) {
    if (points <= 1 || index == 0) return;
    char eta[32];
    format_eta(eta, sizeof eta, elapsed, (double)index / (double)points);
    printf("# sweep: %d of %d points done, %.1f s, %s\n", index, points, elapsed, eta);
    fflush(stdout);
}
