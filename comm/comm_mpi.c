/* comm_mpi.c: the communicator over MPI (see comm.h). */
#include "comm.h"

#include <limits.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "spar_status.h"

/* MPI counts are int: larger buffers go in pieces of this many bytes. */
#define PIECE_BYTES ((size_t)1 << 30)
#define MAX_OP_REQS 64

struct spar_comm {
    MPI_Comm world;
    int rank, size;
    char host[MPI_MAX_PROCESSOR_NAME];
    char library[MPI_MAX_LIBRARY_VERSION_STRING];
    uint64_t bytes_sent;
    int fault_ring_rank; /* test hook: this rank's ring send targets an invalid peer */
    spar_comm *parent;   /* a split of this one (spar_comm_split), or NULL */
};

static char transport_text[160] = "ob1 (Open MPI default)";

/* Print the failing call with MPI's own words, and return SPAR_ECOMM. */
#define SPAR_MPI_CHECK(expr)                                                                       \
    do {                                                                                           \
        int spar_mpi_rc_ = (expr);                                                                 \
        char spar_mpi_msg_[MPI_MAX_ERROR_STRING] = "";                                             \
        int spar_mpi_len_ = 0;                                                                     \
        if (spar_mpi_rc_ != MPI_SUCCESS)                                                           \
            MPI_Error_string(spar_mpi_rc_, spar_mpi_msg_, &spar_mpi_len_);                         \
        SPAR_CHECK_GENERIC(spar_mpi_rc_ != MPI_SUCCESS, #expr, spar_mpi_msg_, SPAR_ECOMM);         \
    } while (0)

/* Status of an MPI call that cannot go through SPAR_MPI_CHECK (its caller cleans up). */
static int mpi_status(int rc, const char *call) {
    if (rc == MPI_SUCCESS) return SPAR_OK;
    char msg[MPI_MAX_ERROR_STRING] = "";
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    return spar_errorf(SPAR_ECOMM, "%s failed: %s", call, msg);
}

#ifdef SPAR_HAVE_UCX
#include <ucp/api/ucp.h>

/* Can UCX start here? A context with the tag feature is what Open MPI's PML needs. */
static int ucx_works(char *why, size_t len) {
    ucp_config_t *config = NULL;
    ucp_context_h context = NULL;
    ucp_params_t params = {.field_mask = UCP_PARAM_FIELD_FEATURES, .features = UCP_FEATURE_TAG};
    if (ucp_config_read(NULL, NULL, &config) != UCS_OK) {
        snprintf(why, len, "UCX configuration unreadable");
        return 0;
    }
    ucs_status_t st = ucp_init(&params, config, &context);
    ucp_config_release(config);
    if (st != UCS_OK) {
        snprintf(why, len, "UCX did not start: %s", ucs_status_string(st));
        return 0;
    }
    ucp_cleanup(context);
    unsigned major, minor, release;
    ucp_get_version(&major, &minor, &release);
    snprintf(why, len, "UCX %u.%u works here", major, minor);
    return 1;
}
#else
static int ucx_works(char *why, size_t len) {
    snprintf(why, len, "built without UCX");
    return 0;
}
#endif

static void use_ucx_pml(void) {
    /* Open MPI 4.1 only takes the UCX PML on InfiniBand-class devices unless told that
     * any transport and device will do (DESIGN.md 5). */
    setenv("OMPI_MCA_pml", "ucx", 1);
    setenv("OMPI_MCA_pml_ucx_tls", "any", 0);
    setenv("OMPI_MCA_pml_ucx_devices", "any", 0);
}

int spar_comm_prepare_transport(const char *choice) {
    char why[96];
    const char *user = getenv("OMPI_MCA_pml");
    if (user && *user) {
        snprintf(transport_text, sizeof transport_text, "%s (set by OMPI_MCA_pml)", user);
        return SPAR_OK;
    }
    if (strcmp(choice, "ob1") == 0) {
        setenv("OMPI_MCA_pml", "ob1", 1);
        snprintf(transport_text, sizeof transport_text, "ob1 (comm.transport=ob1)");
    } else if (strcmp(choice, "ucx") == 0) {
        use_ucx_pml();
        snprintf(transport_text, sizeof transport_text, "ucx (comm.transport=ucx)");
    } else if (strcmp(choice, "auto") == 0) {
        if (ucx_works(why, sizeof why)) {
            use_ucx_pml();
            snprintf(transport_text, sizeof transport_text, "ucx (auto: %s)", why);
        } else {
            setenv("OMPI_MCA_pml", "ob1", 1);
            snprintf(transport_text, sizeof transport_text, "ob1 (auto: %s)", why);
        }
    } else {
        return SPAR_EINVAL;
    }
    return SPAR_OK;
}

static void read_fault_hook(spar_comm *comm) {
    const char *spec = getenv("SPAR_TEST_FAULT");
    comm->fault_ring_rank = -1;
    if (spec && strncmp(spec, "ring:", 5) == 0) comm->fault_ring_rank = atoi(spec + 5);
}

int spar_comm_init(spar_comm **out, int *argc, char ***argv) {
    int provided = 0, len = 0;
    *out = NULL;
    if (MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
        return spar_errorf(SPAR_ECOMM, "MPI_Init_thread failed (is this run under mpirun or "
                                       "srun --mpi=pmix?)");
    }
    spar_comm *comm = calloc(1, sizeof *comm);
    if (!comm) {
        MPI_Finalize();
        return SPAR_ENOMEM;
    }
    comm->world = MPI_COMM_WORLD;
    char version[MPI_MAX_LIBRARY_VERSION_STRING];
    if (MPI_Comm_set_errhandler(comm->world, MPI_ERRORS_RETURN) != MPI_SUCCESS ||
        MPI_Comm_rank(comm->world, &comm->rank) != MPI_SUCCESS ||
        MPI_Comm_size(comm->world, &comm->size) != MPI_SUCCESS ||
        MPI_Get_processor_name(comm->host, &len) != MPI_SUCCESS ||
        MPI_Get_library_version(version, &len) != MPI_SUCCESS) {
        spar_comm_free(comm);
        return spar_errorf(SPAR_ECOMM, "MPI started but could not describe this process");
    }
    version[strcspn(version, "\n,")] = '\0';
    snprintf(comm->library, sizeof comm->library, "%s", version);
    read_fault_hook(comm);
    spar_log_set_identity(comm->rank, comm->size, comm->host);
    *out = comm;
    return SPAR_OK;
}

void spar_comm_free(spar_comm *comm) {
    if (!comm) return;
    if (comm->parent) { /* a split: only the communicator goes */
        MPI_Comm_free(&comm->world);
        free(comm);
        return;
    }
    MPI_Finalize();
    free(comm);
}

int spar_comm_split(spar_comm *comm, int color, spar_comm **out) {
    spar_comm *sub = calloc(1, sizeof *sub);
    if (!sub) return SPAR_ENOMEM;
    *sub = *comm;
    sub->parent = comm, sub->bytes_sent = 0;
    int rc = MPI_Comm_split(comm->world, color, comm->rank, &sub->world);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_set_errhandler(sub->world, MPI_ERRORS_RETURN);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_rank(sub->world, &sub->rank);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_size(sub->world, &sub->size);
    if (rc != MPI_SUCCESS) {
        free(sub);
        return spar_errorf(SPAR_ECOMM, "MPI_Comm_split (color %d) failed", color);
    }
    *out = sub;
    return SPAR_OK;
}

int spar_comm_recv_message(spar_comm *comm, int src, int tag, void **buf, size_t *bytes) {
    MPI_Status st;
    int count = 0;
    *buf = NULL, *bytes = 0;
    SPAR_MPI_CHECK(MPI_Probe(src, tag, comm->world, &st));
    SPAR_MPI_CHECK(MPI_Get_count(&st, MPI_BYTE, &count));
    if (!(*buf = malloc((size_t)count + 1))) return SPAR_ENOMEM;
    SPAR_MPI_CHECK(MPI_Recv(*buf, count, MPI_BYTE, src, tag, comm->world, MPI_STATUS_IGNORE));
    *bytes = (size_t)count;
    return SPAR_OK;
}

void spar_comm_abort(spar_comm *comm, int code) {
    MPI_Abort(comm ? comm->world : MPI_COMM_WORLD, code);
}

int spar_comm_rank(const spar_comm *comm) {
    return comm->rank;
}

int spar_comm_size(const spar_comm *comm) {
    return comm->size;
}

const char *spar_comm_host(const spar_comm *comm) {
    return comm->host;
}

const char *spar_comm_transport(const spar_comm *comm) {
    (void)comm;
    return transport_text;
}

const char *spar_comm_library(const spar_comm *comm) {
    return comm->library;
}

double spar_comm_wtime(void) {
    return MPI_Wtime();
}

uint64_t spar_comm_bytes_sent(const spar_comm *comm) {
    return comm->bytes_sent;
}

int spar_comm_agree(spar_comm *comm, int status, int *worst) {
    SPAR_MPI_CHECK(MPI_Allreduce(&status, worst, 1, MPI_INT, MPI_MIN, comm->world));
    return SPAR_OK;
}

int spar_comm_barrier(spar_comm *comm) {
    SPAR_MPI_CHECK(MPI_Barrier(comm->world));
    return SPAR_OK;
}

int spar_comm_bcast(spar_comm *comm, void *buf, size_t bytes, int root) {
    for (size_t off = 0; off < bytes; off += PIECE_BYTES) {
        size_t n = bytes - off < PIECE_BYTES ? bytes - off : PIECE_BYTES;
        SPAR_MPI_CHECK(MPI_Bcast((char *)buf + off, (int)n, MPI_BYTE, root, comm->world));
    }
    return SPAR_OK;
}

int spar_comm_gather(spar_comm *comm, const void *send, size_t bytes, void *out, int root) {
    if (bytes > INT_MAX)
        return spar_errorf(SPAR_EUNSUP, "gather of %zu bytes per rank is too large", bytes);
    SPAR_MPI_CHECK(
        MPI_Gather(send, (int)bytes, MPI_BYTE, out, (int)bytes, MPI_BYTE, root, comm->world));
    return SPAR_OK;
}

int spar_comm_allreduce_max_double(spar_comm *comm, double *value) {
    SPAR_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, value, 1, MPI_DOUBLE, MPI_MAX, comm->world));
    return SPAR_OK;
}

int spar_comm_allreduce_sum_double(spar_comm *comm, double *value) {
    SPAR_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, value, 1, MPI_DOUBLE, MPI_SUM, comm->world));
    return SPAR_OK;
}

int spar_comm_send(spar_comm *comm, const void *buf, size_t bytes, int dest, int tag) {
    for (size_t off = 0; off < bytes; off += PIECE_BYTES) {
        size_t n = bytes - off < PIECE_BYTES ? bytes - off : PIECE_BYTES;
        SPAR_MPI_CHECK(MPI_Send((const char *)buf + off, (int)n, MPI_BYTE, dest, tag, comm->world));
    }
    comm->bytes_sent += bytes;
    return SPAR_OK;
}

int spar_comm_recv(spar_comm *comm, void *buf, size_t bytes, int src, int tag) {
    for (size_t off = 0; off < bytes; off += PIECE_BYTES) {
        size_t n = bytes - off < PIECE_BYTES ? bytes - off : PIECE_BYTES;
        SPAR_MPI_CHECK(MPI_Recv((char *)buf + off, (int)n, MPI_BYTE, src, tag, comm->world,
                                MPI_STATUS_IGNORE));
    }
    return SPAR_OK;
}

enum { RING_TAG = 7100, RING_CHANNELS = 4 };

struct spar_comm_op {
    MPI_Request reqs[MAX_OP_REQS];
    int nreqs;
    int *counts, *displs; /* kept alive for the collectives until completion */
};

static int op_new(spar_comm_op **op) {
    *op = calloc(1, sizeof **op);
    return *op ? SPAR_OK : SPAR_ENOMEM;
}

/* An operation that failed halfway: the requests already posted are cancelled, so that
 * MPI never writes into a buffer the caller is about to free. */
static void op_cancel(spar_comm_op *op) {
    for (int i = 0; i < op->nreqs; i++) {
        MPI_Cancel(&op->reqs[i]);
        MPI_Request_free(&op->reqs[i]);
    }
    op->nreqs = 0;
}

static void op_free(spar_comm_op *op) {
    if (!op) return;
    free(op->counts);
    free(op->displs);
    free(op);
}

static int post_pair(spar_comm *comm, spar_comm_op *op, int tag, const void *send,
                     size_t send_bytes, int dest, void *recv, size_t recv_bytes, int src) {
    if (dest >= 0 && comm->rank == comm->fault_ring_rank)
        dest = comm->size; /* an invalid peer: MPI itself reports the failure */
    for (size_t off = 0; src >= 0 && off < recv_bytes; off += PIECE_BYTES) {
        size_t n = recv_bytes - off < PIECE_BYTES ? recv_bytes - off : PIECE_BYTES;
        SPAR_MPI_CHECK(MPI_Irecv((char *)recv + off, (int)n, MPI_BYTE, src, tag, comm->world,
                                 &op->reqs[op->nreqs++]));
    }
    for (size_t off = 0; dest >= 0 && off < send_bytes; off += PIECE_BYTES) {
        size_t n = send_bytes - off < PIECE_BYTES ? send_bytes - off : PIECE_BYTES;
        SPAR_MPI_CHECK(MPI_Isend((const char *)send + off, (int)n, MPI_BYTE, dest, tag, comm->world,
                                 &op->reqs[op->nreqs++]));
    }
    return SPAR_OK;
}

int spar_comm_sendrecv_start(spar_comm *comm, int channel, const void *send, size_t send_bytes,
                             int dest, void *recv, size_t recv_bytes, int src, spar_comm_op **op) {
    *op = NULL;
    if (channel < 0 || channel >= RING_CHANNELS)
        return spar_errorf(SPAR_EINVAL, "channel %d outside 0..%d", channel, RING_CHANNELS - 1);
    size_t pieces = (send_bytes + PIECE_BYTES - 1) / PIECE_BYTES;
    size_t rpieces = (recv_bytes + PIECE_BYTES - 1) / PIECE_BYTES;
    if (pieces + rpieces > MAX_OP_REQS)
        return spar_errorf(SPAR_EUNSUP, "message of %zu bytes exceeds %d GiB", send_bytes,
                           MAX_OP_REQS / 2);
    SPAR_TRY(op_new(op));
    int rc =
        post_pair(comm, *op, RING_TAG + channel, send, send_bytes, dest, recv, recv_bytes, src);
    if (rc != 0) {
        op_cancel(*op);
        op_free(*op);
        *op = NULL;
        return rc;
    }
    if (dest >= 0) comm->bytes_sent += send_bytes;
    return SPAR_OK;
}

int spar_comm_ring_start(spar_comm *comm, int channel, const void *send, size_t send_bytes,
                         void *recv, size_t recv_bytes, spar_comm_op **op) {
    int right = (comm->rank + 1) % comm->size, left = (comm->rank + comm->size - 1) % comm->size;
    return spar_comm_sendrecv_start(comm, channel, send, send_bytes, right, recv, recv_bytes, left,
                                    op);
}

/* Per-rank counts and their prefix sums as the int arrays MPI takes. */
static int collective_counts(spar_comm *comm, const int64_t *counts, spar_comm_op *op) {
    op->counts = malloc(sizeof(int) * (size_t)comm->size);
    op->displs = malloc(sizeof(int) * (size_t)comm->size);
    if (!op->counts || !op->displs) return SPAR_ENOMEM;
    int64_t total = 0;
    for (int s = 0; s < comm->size; s++) {
        if (counts[s] < 0 || total + counts[s] > INT_MAX)
            return spar_errorf(SPAR_EUNSUP, "collective of %lld floats exceeds MPI's int counts",
                               (long long)(total + counts[s]));
        op->counts[s] = (int)counts[s];
        op->displs[s] = (int)total;
        total += counts[s];
    }
    return SPAR_OK;
}

int spar_comm_allgather_start(spar_comm *comm, const float *send, float *recv,
                              const int64_t *counts, spar_comm_op **op) {
    SPAR_TRY(op_new(op));
    int rc = collective_counts(comm, counts, *op);
    if (rc == 0) {
        int mpi_rc =
            MPI_Iallgatherv(send, (*op)->counts[comm->rank], MPI_FLOAT, recv, (*op)->counts,
                            (*op)->displs, MPI_FLOAT, comm->world, &(*op)->reqs[0]);
        (*op)->nreqs = 1;
        rc = mpi_status(mpi_rc, "MPI_Iallgatherv");
    }
    if (rc != 0) {
        op_free(*op);
        *op = NULL;
        return rc;
    }
    comm->bytes_sent += (uint64_t)(comm->size - 1) * (uint64_t)counts[comm->rank] * sizeof(float);
    return SPAR_OK;
}

int spar_comm_reduce_scatter_start(spar_comm *comm, const float *send, float *recv,
                                   const int64_t *counts, spar_comm_op **op) {
    SPAR_TRY(op_new(op));
    int rc = collective_counts(comm, counts, *op);
    if (rc == 0) {
        int mpi_rc = MPI_Ireduce_scatter(send, recv, (*op)->counts, MPI_FLOAT, MPI_SUM, comm->world,
                                         &(*op)->reqs[0]);
        (*op)->nreqs = 1;
        rc = mpi_status(mpi_rc, "MPI_Ireduce_scatter");
    }
    if (rc != 0) {
        op_free(*op);
        *op = NULL;
        return rc;
    }
    uint64_t others = 0;
    for (int s = 0; s < comm->size; s++)
        others += s == comm->rank ? 0 : (uint64_t)counts[s];
    comm->bytes_sent += others * sizeof(float);
    return SPAR_OK;
}

int spar_comm_op_test(spar_comm *comm, spar_comm_op *op, int *done) {
    (void)comm;
    *done = 1;
    if (!op || op->nreqs == 0) return SPAR_OK;
    SPAR_MPI_CHECK(MPI_Testall(op->nreqs, op->reqs, done, MPI_STATUSES_IGNORE));
    return SPAR_OK;
}

/* A timed wait in progress: polls spin briefly, then leave the core to others between
 * tries; past `seconds` (> 0) the wait gives up with an error naming the peer. */
typedef struct patience {
    double start, seconds;
    long polls;
} patience;

static int keep_waiting(patience *p, int peer, const char *what) {
    if (p->seconds > 0 && MPI_Wtime() - p->start > p->seconds)
        return spar_errorf(SPAR_ECOMM,
                           "no answer from rank %d for %.1f s (comm.timeout) while waiting for "
                           "%s: that rank is stopped, hung or unreachable",
                           peer, p->seconds, what);
    if (++p->polls > 1000) {
        struct timespec ts = {0, 50000};
        nanosleep(&ts, NULL);
    }
    return SPAR_OK;
}

/* Requests until they complete or `seconds` pass (0: no limit). */
static int wait_reqs(MPI_Request *reqs, int n, double seconds, int peer, const char *what) {
    if (seconds <= 0) return mpi_status(MPI_Waitall(n, reqs, MPI_STATUSES_IGNORE), "MPI_Waitall");
    patience p = {MPI_Wtime(), seconds, 0};
    for (;;) {
        int done = 0;
        SPAR_MPI_CHECK(MPI_Testall(n, reqs, &done, MPI_STATUSES_IGNORE));
        if (done) return SPAR_OK;
        SPAR_TRY(keep_waiting(&p, peer, what));
    }
}

int spar_comm_op_wait_for(spar_comm *comm, spar_comm_op **op, double seconds, int peer,
                          const char *what) {
    (void)comm; /* the requests carry their communicator */
    spar_comm_op *o = *op;
    *op = NULL;
    if (!o) return SPAR_OK;
    int rc = wait_reqs(o->reqs, o->nreqs, seconds, peer, what);
    if (rc == 0) op_free(o); /* on a timeout the requests stay posted: the job ends */
    return rc;
}

int spar_comm_recv_for(spar_comm *comm, void *buf, size_t bytes, int src, int tag, double seconds,
                       const char *what) {
    for (size_t off = 0; off < bytes; off += PIECE_BYTES) { /* as spar_comm_send cuts it */
        size_t n = bytes - off < PIECE_BYTES ? bytes - off : PIECE_BYTES;
        MPI_Request req;
        SPAR_MPI_CHECK(MPI_Irecv((char *)buf + off, (int)n, MPI_BYTE, src, tag, comm->world, &req));
        SPAR_TRY(wait_reqs(&req, 1, seconds, src, what));
    }
    return SPAR_OK;
}

int spar_comm_send_for(spar_comm *comm, const void *buf, size_t bytes, int dest, int tag,
                       double seconds, const char *what) {
    for (size_t off = 0; off < bytes; off += PIECE_BYTES) { /* as spar_comm_recv expects */
        size_t n = bytes - off < PIECE_BYTES ? bytes - off : PIECE_BYTES;
        MPI_Request req;
        SPAR_MPI_CHECK(
            MPI_Isend((const char *)buf + off, (int)n, MPI_BYTE, dest, tag, comm->world, &req));
        SPAR_TRY(wait_reqs(&req, 1, seconds, dest, what));
    }
    comm->bytes_sent += bytes;
    return SPAR_OK;
}

int spar_comm_probe_for(spar_comm *comm, int src, int tag, double seconds, const char *what) {
    patience p = {MPI_Wtime(), seconds, 0};
    for (;;) {
        int found = 0;
        SPAR_MPI_CHECK(MPI_Iprobe(src, tag, comm->world, &found, MPI_STATUS_IGNORE));
        if (found) return SPAR_OK;
        SPAR_TRY(keep_waiting(&p, src, what));
    }
}

int spar_comm_op_wait(spar_comm *comm, spar_comm_op **op) {
    (void)comm;
    spar_comm_op *o = *op;
    *op = NULL;
    if (!o) return SPAR_OK;
    int rc = mpi_status(MPI_Waitall(o->nreqs, o->reqs, MPI_STATUSES_IGNORE), "MPI_Waitall");
    op_free(o);
    return rc;
}
