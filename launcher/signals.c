/* signals.c: ending cleanly on scancel, a Slurm time limit or Ctrl-C.
 *
 * Slurm (and mpirun, which forwards it) sends SIGTERM to every task, then SIGKILL after
 * the cluster's KillWait. Waiting for a safe point between passes could outlast that,
 * and ranks stopping at different points would leave their peers blocked; so every rank
 * leaves within a moment (0.3 s, see on_signal) with 128+signal. Nothing is left
 * half-written: records are single
 * write()s of whole lines, and output files are renamed into place only once complete.
 *
 * So that the interrupted point shows in the results, rank 0 prepares its
 * "interrupted" record when the point starts; the handler appends it with open() and
 * write(), which are safe inside a signal handler (formatting there is not).
 */
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "launcher.h"

enum { SIG_TERM, SIG_INT, SIG_COUNT };

static volatile sig_atomic_t armed;
static int my_rank = -1;
static char results[1024];
static char *record[SIG_COUNT];
static size_t record_len[SIG_COUNT];

static void say(const char *text) {
    ssize_t rc = write(STDERR_FILENO, text, strlen(text));
    (void)rc; /* nothing to do about a failed message while exiting */
}

static void on_signal(int sig) {
    int which = sig == SIGINT ? SIG_INT : SIG_TERM;
    if (armed && my_rank == 0 && results[0] && record[which]) {
        int fd = open(results, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd >= 0) {
            ssize_t rc = write(fd, record[which], record_len[which]);
            (void)rc;
            close(fd);
        }
    }
    if (my_rank <= 0)
        say(sig == SIGINT ? "spar: interrupted (SIGINT); every rank stops now\n"
                          : "spar: terminated (SIGTERM: scancel, a time limit, or mpirun "
                            "ending the job after Ctrl-C or a lost rank); every rank stops "
                            "now\n");
    /* The launcher signals every rank within moments. Leaving at once would let a rank
     * that is still computing see this one vanish mid-transfer and die on a transport
     * error instead (rank 0 then without its record): a short pause lets every rank get
     * here first. It stays well below mpirun's SIGKILL, a second after its SIGTERM. */
    struct timespec pause = {0, 300000000};
    nanosleep(&pause, NULL);
    _exit(128 + sig);
}

void spar__signals_install(int rank) {
    my_rank = rank;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaddset(&sa.sa_mask, SIGTERM); /* one handler at a time: one record */
    sigaddset(&sa.sa_mask, SIGINT);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
}

static char *format_record(const spar_config *cfg, const char *command, const char *signame,
                           size_t *len) {
    char *buf = NULL;
    FILE *f = open_memstream(&buf, len);
    if (!f) return NULL;
    fprintf(f, "{\"record\":\"interrupted\",\"signal\":\"%s\",\"command\":\"%s\",", signame,
            command);
    spar__json_common(f, cfg, 0, NULL, "", "");
    fputs("}\n", f);
    fclose(f);
    return buf;
}

void spar__signals_arm(const spar_config *cfg, const char *command) {
    spar__signals_disarm();
    if (my_rank != 0) return;
    snprintf(results, sizeof results, "%s", cfg->v[SPAR_KEY_OUT_RESULTS].s);
    record[SIG_TERM] = format_record(cfg, command, "SIGTERM", &record_len[SIG_TERM]);
    record[SIG_INT] = format_record(cfg, command, "SIGINT", &record_len[SIG_INT]);
    armed = 1;
}

void spar__signals_disarm(void) {
    armed = 0;
    for (int i = 0; i < SIG_COUNT; i++) {
        free(record[i]);
        record[i] = NULL;
    }
}
