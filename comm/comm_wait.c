/* comm_wait.c: waits that give up, and the blocking calls built on them (see comm.h).
 *
 * MPI's blocking calls wait for ever for a peer that stopped (SIGSTOP, a hung node) or
 * whose link was cut; Open MPI only notices peers that die. So every wait of the room --
 * an operation in flight, a point-to-point message, a collective -- is a nonblocking
 * call tested in one patience loop until it completes or the communicator's timeout
 * (comm.timeout) passes, and the error then names whom it waited for. The requests of a
 * wait that gave up stay posted: the caller ends the job (the launcher aborts).
 */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "comm_internal.h"

int spar__comm_mpi_status(int rc, const char *call) {
    if (rc == MPI_SUCCESS) return SPAR_OK;
    char msg[MPI_MAX_ERROR_STRING] = "";
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    return spar_errorf(SPAR_ECOMM, "%s failed: %s", call, msg);
}

int spar__comm_op_new(spar_comm *comm, const char *name, spar_comm_op **op) {
    *op = calloc(1, sizeof **op);
    if (!*op) return SPAR_ENOMEM;
    (*op)->comm = comm;
    (*op)->name = name;
    return SPAR_OK;
}

void spar__comm_op_free(spar_comm_op *op) {
    if (!op) return;
    free(op->counts);
    free(op->displs);
    free(op);
}

/* The error of a wait that gave up on peer `who`, a rank of comm. */
static int no_answer(spar_comm *comm, int who, double seconds, const char *what) {
    comm->failed = 1;
    if (who >= comm->size) /* not a member: cannot happen, but never index past the tables */
        return spar_errorf(SPAR_ECOMM, "%s did not complete within %.1f s (comm.timeout)", what,
                           seconds);
    return spar_errorf(SPAR_ECOMM,
                       "no answer from rank %d for %.1f s (comm.timeout) while waiting for %s; "
                       "rank %d (host %s) is stopped, hung, unreachable or slower than "
                       "comm.timeout allows",
                       comm->job_rank[who], seconds, what, comm->job_rank[who], comm->hosts[who]);
}

/* Tag of the roll call; no other message of the room or the engine uses it. */
enum { ROLL_CALL_TAG = 7300 };
/* How often a waiting rank looks for roll calls to answer (a probe: cheap, but not free
 * in the tight part of a wait). */
#define ANSWER_EVERY_S 0.01

/* A rank that is waiting answers the roll calls that reached it (roll_call): it takes
 * the caller's byte and sends one back. Tested now and then in every wait loop. */
static void answer_roll_calls(spar_comm *comm) {
    static const char mark = 1;
    for (;;) {
        int found = 0;
        MPI_Status st;
        char in;
        MPI_Request send;
        if (MPI_Iprobe(MPI_ANY_SOURCE, ROLL_CALL_TAG, comm->world, &found, &st) != MPI_SUCCESS ||
            !found)
            return;
        MPI_Recv(&in, 1, MPI_CHAR, st.MPI_SOURCE, ROLL_CALL_TAG, comm->world, MPI_STATUS_IGNORE);
        if (MPI_Isend(&mark, 1, MPI_CHAR, st.MPI_SOURCE, ROLL_CALL_TAG, comm->world, &send) ==
            MPI_SUCCESS)
            MPI_Request_free(&send);
    }
}

/* A collective has no single peer to blame, so the ranks that gave up on it call the
 * roll: each sends a byte to every other member and waits up to `grace` seconds for
 * theirs. Every rank that is waiting answers (the others that gave up on the collective
 * call the roll themselves, and the byte each sends is the answer); a stopped or cut-off
 * rank does not. answered[p] = 1 for those heard. The sends are freed unfinished and the
 * receives cancelled: the job is ending. */
static void roll_call(spar_comm *comm, double grace, int *answered) {
    static const char mark = 1;
    char *in = calloc((size_t)comm->size, 1);
    MPI_Request *reqs = malloc((size_t)comm->size * sizeof *reqs);
    if (!in || !reqs) goto out;
    for (int p = 0; p < comm->size; p++) {
        reqs[p] = MPI_REQUEST_NULL;
        answered[p] = p == comm->rank;
        if (p == comm->rank) continue;
        MPI_Request send;
        MPI_Irecv(&in[p], 1, MPI_CHAR, p, ROLL_CALL_TAG, comm->world, &reqs[p]);
        if (MPI_Isend(&mark, 1, MPI_CHAR, p, ROLL_CALL_TAG, comm->world, &send) == MPI_SUCCESS)
            MPI_Request_free(&send);
    }
    double start = MPI_Wtime();
    int left = comm->size - 1;
    while (left > 0 && MPI_Wtime() - start < grace) {
        for (int p = 0; p < comm->size; p++) {
            int done = 0;
            if (reqs[p] == MPI_REQUEST_NULL) continue;
            if (MPI_Test(&reqs[p], &done, MPI_STATUS_IGNORE) == MPI_SUCCESS && done)
                answered[p] = 1, left--;
        }
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    for (int p = 0; p < comm->size; p++)
        if (reqs[p] != MPI_REQUEST_NULL) MPI_Cancel(&reqs[p]), MPI_Request_free(&reqs[p]);
out:
    free(in);
    free(reqs);
}

/* The error of a collective `what` that did not complete: names the members that did not
 * answer the roll call (the first in the usual words, then the others). */
static int collective_no_answer(spar_comm *comm, double seconds, const char *what) {
    comm->failed = 1;
    double grace = seconds / 2 < 5 ? seconds / 2 : 5;
    int *answered = calloc((size_t)comm->size, sizeof *answered);
    if (!answered)
        return spar_errorf(SPAR_ECOMM, "%s did not complete within %.1f s (comm.timeout)", what,
                           seconds);
    roll_call(comm, grace, answered);
    int first = -1;
    for (int p = 0; p < comm->size && first < 0; p++)
        if (!answered[p]) first = p;
    if (first < 0) {
        free(answered);
        return spar_errorf(SPAR_ECOMM,
                           "%s did not complete within %.1f s (comm.timeout) though every rank "
                           "answered a roll call; some rank is slower than comm.timeout allows",
                           what, seconds);
    }
    char also[256] = "";
    for (int p = first + 1, len = 0; p < comm->size && len < (int)sizeof also - 40; p++)
        if (!answered[p])
            len += snprintf(also + len, sizeof also - (size_t)len, "%s rank %d (host %s)",
                            len ? "," : "; nor did", comm->job_rank[p], comm->hosts[p]);
    free(answered);
    return spar_errorf(SPAR_ECOMM,
                       "no answer from rank %d for %.1f s (comm.timeout) while waiting for %s "
                       "(it did not answer a roll call within %.1f s%s); rank %d (host %s) is "
                       "stopped, hung, unreachable or slower than comm.timeout allows",
                       comm->job_rank[first], seconds, what, grace, also, comm->job_rank[first],
                       comm->hosts[first]);
}

/* Polls spin briefly (a transfer about to finish), then leave the core to the others. */
static void rest_after(long polls) {
    if (polls > 1000) {
        struct timespec ts = {0, 50000};
        nanosleep(&ts, NULL);
    }
}

/* The peer of the first unfinished request (receives are posted before sends, so a
 * block that did not come names its sender); -1 for a collective. */
static int first_unfinished(const MPI_Request *reqs, const int *peer, int n) {
    for (int i = 0; i < n && peer; i++)
        if (reqs[i] != MPI_REQUEST_NULL && peer[i] >= 0) return peer[i];
    return -1;
}

int spar__comm_wait_reqs(spar_comm *comm, MPI_Request *reqs, const int *peer, int n, double seconds,
                         const char *what) {
    if (seconds <= 0)
        return spar__comm_mpi_status(MPI_Waitall(n, reqs, MPI_STATUSES_IGNORE), "MPI_Waitall");
    int done[SPAR__MAX_OP_REQS];
    double start = MPI_Wtime(), answered = start;
    for (long polls = 0;; polls++) {
        int count = 0;
        int rc = MPI_Testsome(n, reqs, &count, done, MPI_STATUSES_IGNORE);
        if (rc != MPI_SUCCESS) return spar__comm_mpi_status(rc, "MPI_Testsome");
        if (count == MPI_UNDEFINED) return SPAR_OK; /* no request left active */
        double now = MPI_Wtime();
        if (now - start > seconds) {
            int who = first_unfinished(reqs, peer, n);
            return who >= 0 ? no_answer(comm, who, seconds, what)
                            : collective_no_answer(comm, seconds, what);
        }
        if (now - answered > ANSWER_EVERY_S) answer_roll_calls(comm), answered = now;
        rest_after(polls);
    }
}

int spar_comm_op_test(spar_comm *comm, spar_comm_op *op, int *done) {
    (void)comm;
    *done = 1;
    if (!op || op->nreqs == 0) return SPAR_OK;
    SPAR_MPI_CHECK(MPI_Testall(op->nreqs, op->reqs, done, MPI_STATUSES_IGNORE));
    return SPAR_OK;
}

int spar_comm_op_wait_for(spar_comm *comm, spar_comm_op **op, double seconds, int peer,
                          const char *what) {
    (void)comm; /* the operation knows the communicator it was started on */
    spar_comm_op *o = *op;
    *op = NULL;
    if (!o) return SPAR_OK;
    for (int i = 0; i < o->nreqs && peer >= 0; i++)
        if (o->peer[i] < 0) o->peer[i] = peer;
    int rc =
        spar__comm_wait_reqs(o->comm, o->reqs, o->peer, o->nreqs, seconds, what ? what : o->name);
    if (rc == 0) spar__comm_op_free(o); /* on a timeout the requests stay posted */
    return rc;
}

int spar_comm_op_wait(spar_comm *comm, spar_comm_op **op) {
    return spar_comm_op_wait_for(comm, op, comm->timeout, -1, NULL);
}

int spar_comm_recv_for(spar_comm *comm, void *buf, size_t bytes, int src, int tag, double seconds,
                       const char *what) {
    for (size_t off = 0; off < bytes; off += SPAR__PIECE_BYTES) { /* as the sends cut it */
        size_t n = bytes - off < SPAR__PIECE_BYTES ? bytes - off : SPAR__PIECE_BYTES;
        MPI_Request req;
        SPAR_MPI_CHECK(MPI_Irecv((char *)buf + off, (int)n, MPI_BYTE, src, tag, comm->world, &req));
        SPAR_TRY(spar__comm_wait_reqs(comm, &req, &src, 1, seconds, what));
    }
    return SPAR_OK;
}

int spar_comm_send_for(spar_comm *comm, const void *buf, size_t bytes, int dest, int tag,
                       double seconds, const char *what) {
    for (size_t off = 0; off < bytes; off += SPAR__PIECE_BYTES) { /* as the receives expect */
        size_t n = bytes - off < SPAR__PIECE_BYTES ? bytes - off : SPAR__PIECE_BYTES;
        MPI_Request req;
        SPAR_MPI_CHECK(
            MPI_Isend((const char *)buf + off, (int)n, MPI_BYTE, dest, tag, comm->world, &req));
        SPAR_TRY(spar__comm_wait_reqs(comm, &req, &dest, 1, seconds, what));
    }
    comm->bytes_sent += bytes;
    return SPAR_OK;
}

int spar_comm_probe_for(spar_comm *comm, int src, int tag, double seconds, const char *what) {
    double start = MPI_Wtime(), answered = start;
    for (long polls = 0;; polls++) {
        int found = 0;
        SPAR_MPI_CHECK(MPI_Iprobe(src, tag, comm->world, &found, MPI_STATUS_IGNORE));
        if (found) return SPAR_OK;
        double now = MPI_Wtime();
        if (seconds > 0 && now - start > seconds) return no_answer(comm, src, seconds, what);
        if (now - answered > ANSWER_EVERY_S) answer_roll_calls(comm), answered = now;
        rest_after(polls);
    }
}

/* ---- blocking calls: the same loop with the communicator's timeout -------------------- */

int spar_comm_send(spar_comm *comm, const void *buf, size_t bytes, int dest, int tag) {
    return spar_comm_send_for(comm, buf, bytes, dest, tag, comm->timeout, "a message to send");
}

int spar_comm_recv(spar_comm *comm, void *buf, size_t bytes, int src, int tag) {
    return spar_comm_recv_for(comm, buf, bytes, src, tag, comm->timeout, "a message");
}

int spar_comm_recv_message(spar_comm *comm, int src, int tag, void **buf, size_t *bytes) {
    MPI_Status st;
    int count = 0;
    *buf = NULL, *bytes = 0;
    SPAR_TRY(spar_comm_probe_for(comm, src, tag, comm->timeout, "a control message"));
    SPAR_MPI_CHECK(MPI_Probe(src, tag, comm->world, &st)); /* there: returns at once */
    SPAR_MPI_CHECK(MPI_Get_count(&st, MPI_BYTE, &count));
    if (!(*buf = malloc((size_t)count + 1))) return SPAR_ENOMEM;
    int rc = spar_comm_recv(comm, *buf, (size_t)count, src, tag);
    if (rc == 0) *bytes = (size_t)count;
    return rc;
}

/* A collective posted as `call` (its MPI status rc), awaited with the timeout. */
static int collective(spar_comm *comm, int rc, MPI_Request *req, const char *call) {
    SPAR_TRY(spar__comm_mpi_status(rc, call));
    return spar__comm_wait_reqs(comm, req, NULL, 1, comm->timeout, call);
}

int spar_comm_agree(spar_comm *comm, int status, int *worst) {
    MPI_Request req;
    int rc = MPI_Iallreduce(&status, worst, 1, MPI_INT, MPI_MIN, comm->world, &req);
    return collective(comm, rc, &req, "MPI_Iallreduce (every rank's status)");
}

int spar_comm_barrier(spar_comm *comm) {
    MPI_Request req;
    return collective(comm, MPI_Ibarrier(comm->world, &req), &req, "MPI_Ibarrier");
}

int spar_comm_bcast(spar_comm *comm, void *buf, size_t bytes, int root) {
    for (size_t off = 0; off < bytes; off += SPAR__PIECE_BYTES) {
        size_t n = bytes - off < SPAR__PIECE_BYTES ? bytes - off : SPAR__PIECE_BYTES;
        MPI_Request req;
        int rc = MPI_Ibcast((char *)buf + off, (int)n, MPI_BYTE, root, comm->world, &req);
        SPAR_TRY(collective(comm, rc, &req, "MPI_Ibcast"));
    }
    return SPAR_OK;
}

int spar_comm_gather(spar_comm *comm, const void *send, size_t bytes, void *out, int root) {
    if (bytes > INT_MAX)
        return spar_errorf(SPAR_EUNSUP, "gather of %zu bytes per rank is too large", bytes);
    MPI_Request req;
    int rc =
        MPI_Igather(send, (int)bytes, MPI_BYTE, out, (int)bytes, MPI_BYTE, root, comm->world, &req);
    return collective(comm, rc, &req, "MPI_Igather");
}

static int allreduce_double(spar_comm *comm, double *value, MPI_Op op, const char *call) {
    MPI_Request req;
    int rc = MPI_Iallreduce(MPI_IN_PLACE, value, 1, MPI_DOUBLE, op, comm->world, &req);
    return collective(comm, rc, &req, call);
}

int spar_comm_allreduce_max_double(spar_comm *comm, double *value) {
    return allreduce_double(comm, value, MPI_MAX, "MPI_Iallreduce (max)");
}

int spar_comm_allreduce_sum_double(spar_comm *comm, double *value) {
    return allreduce_double(comm, value, MPI_SUM, "MPI_Iallreduce (sum)");
}
