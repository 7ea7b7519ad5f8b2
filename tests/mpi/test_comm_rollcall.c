/* test_comm_rollcall.c: a collective that times out names the rank that never came.
 *
 * A collective has no single peer, so the ranks that give up on one call a roll and
 * name whoever does not answer. First the last rank is alive but waits for something
 * else past the others' timeout: it answers, so the others' error blames no rank. Then
 * it stays away (asleep) for longer than comm.timeout plus the roll call: every other
 * rank must fail the barrier with an error naming that rank and its host, and none may
 * name another. The late rank then joins (completing the abandoned barrier) so that the
 * job still ends cleanly and the ranks can agree on the verdict. Needs at least 2 ranks
 * (1 rank: nothing to test).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "comm.h"        // defines: spar_comm_*
#include "spar_status.h" // defines: SPAR_OK, SPAR_ECOMM

#define TIMEOUT_S 1.0

/* Runs the barrier with this rank's error lines going to a file; returns its status and
 * the lines in text (size bytes). */
static int barrier_captured(spar_comm *comm, char *text, size_t size) {
    FILE *log = tmpfile();
    int saved = dup(STDERR_FILENO);
    if (!log || saved < 0) return -1;
    fflush(stderr);
    dup2(fileno(log), STDERR_FILENO);
    int rc = spar_comm_barrier(comm);
    fflush(stderr);
    dup2(saved, STDERR_FILENO);
    close(saved);
    rewind(log);
    size_t n = fread(text, 1, size - 1, log);
    text[n] = '\0';
    fclose(log);
    fputs(text, stderr); /* shown in the test's output too */
    return rc;
}

/* The last rank is alive but waits elsewhere (for a message that never comes, longer
 * than the others' timeout): it answers their roll call, so they must not blame it.
 * Returns 1 when this rank behaved as it must. */
static int check_waiting_elsewhere(spar_comm *comm) {
    int r = spar_comm_rank(comm), p = spar_comm_size(comm);
    char text[4096];
    if (r == p - 1) {
        int rc = spar_comm_probe_for(comm, 0, 7399, 3 * TIMEOUT_S, "a message never sent");
        return rc == SPAR_ECOMM && spar_comm_barrier(comm) == SPAR_OK; /* that error expected */
    }
    int rc = barrier_captured(comm, text, sizeof text);
    int ok = rc == SPAR_ECOMM && strstr(text, "every rank answered a roll call");
    if (!ok)
        fprintf(stderr, "rank %d: status %d, expected no rank to be blamed; got [%s]\n", r, rc,
                text);
    return ok;
}

/* The last rank stays away (asleep). Returns 1 when this rank behaved as it must. */
static int check_rank(spar_comm *comm) {
    int r = spar_comm_rank(comm), p = spar_comm_size(comm);
    if (r == p - 1) { /* the absent one: late by twice the timeout, then joins */
        sleep(3);
        return spar_comm_barrier(comm) == SPAR_OK;
    }
    char text[4096], want[128];
    int rc = barrier_captured(comm, text, sizeof text);
    snprintf(want, sizeof want, "no answer from rank %d for %.1f s (comm.timeout)", p - 1,
             TIMEOUT_S);
    int ok = rc == SPAR_ECOMM && strstr(text, want) && strstr(text, "roll call") &&
             !strstr(text, "nor did");
    if (!ok)
        fprintf(stderr, "rank %d: status %d, expected an error naming rank %d\n", r, rc, p - 1);
    return ok;
}

int main(int argc, char **argv) {
    spar_comm *comm = NULL;
    if (spar_comm_init(&comm, &argc, &argv) != SPAR_OK) return 1;
    int p = spar_comm_size(comm);
    if (p < 2) {
        printf("ok - roll call: nothing to test at 1 rank\n");
        spar_comm_free(comm);
        return 0;
    }
    spar_comm_set_timeout(comm, 30);
    int ok = spar_comm_barrier(comm) == SPAR_OK; /* everyone starts together */
    spar_comm_set_timeout(comm, TIMEOUT_S);
    ok = check_waiting_elsewhere(comm) && ok;
    spar_comm_set_timeout(comm, 30);
    ok = spar_comm_barrier(comm) == SPAR_OK && ok;
    spar_comm_set_timeout(comm, TIMEOUT_S);
    ok = check_rank(comm) && ok;
    spar_comm_set_timeout(comm, 30);
    int worst = 0;
    if (spar_comm_agree(comm, ok, &worst) != SPAR_OK) worst = 0;
    if (spar_comm_rank(comm) == 0)
        printf("%s - a barrier missed by rank %d at %d ranks: every other rank names it\n",
               worst ? "ok" : "not ok", p - 1, p);
    spar_comm_free(comm);
    return worst ? 0 : 1;
}
