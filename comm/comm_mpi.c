/* comm_mpi.c: the communicator over MPI (see comm.h): transport choice, start and end,
 * who is where, and the nonblocking operations; their waits and the blocking calls are
 * in comm_wait.c. */
#include "comm.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm_internal.h"

#define PIECE_BYTES SPAR__PIECE_BYTES

static char transport_text[160] = "ob1 (Open MPI default)";

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

/* Every member's rank in the job and host, so that a wait that gives up can say where
 * the peer it waited for runs. Collective over comm->world. */
static int learn_members(spar_comm *comm, int job_rank) {
    char mine[SPAR__HOST_LEN];
    size_t len = strnlen(comm->host, sizeof mine - 1); /* a longer name is cut: messages only */
    memcpy(mine, comm->host, len);
    memset(mine + len, 0, sizeof mine - len);
    comm->job_rank = malloc(sizeof(int) * (size_t)comm->size);
    comm->hosts = malloc(sizeof *comm->hosts * (size_t)comm->size);
    if (!comm->job_rank || !comm->hosts) return SPAR_ENOMEM;
    SPAR_MPI_CHECK(MPI_Allgather(&job_rank, 1, MPI_INT, comm->job_rank, 1, MPI_INT, comm->world));
    SPAR_MPI_CHECK(MPI_Allgather(mine, SPAR__HOST_LEN, MPI_CHAR, comm->hosts, SPAR__HOST_LEN,
                                 MPI_CHAR, comm->world));
    return SPAR_OK;
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
    if (learn_members(comm, comm->rank) != 0) {
        spar_comm_free(comm);
        return spar_errorf(SPAR_ECOMM, "MPI started but the ranks could not exchange their hosts");
    }
    *out = comm;
    return SPAR_OK;
}

void spar_comm_free(spar_comm *comm) {
    if (!comm) return;
    free(comm->job_rank);
    free(comm->hosts);
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
    sub->parent = comm, sub->bytes_sent = 0, sub->failed = 0;
    sub->job_rank = NULL, sub->hosts = NULL;
    int rc = MPI_Comm_split(comm->world, color, comm->rank, &sub->world);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_set_errhandler(sub->world, MPI_ERRORS_RETURN);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_rank(sub->world, &sub->rank);
    if (rc == MPI_SUCCESS) rc = MPI_Comm_size(sub->world, &sub->size);
    if (rc != MPI_SUCCESS || learn_members(sub, comm->job_rank[comm->rank]) != 0) {
        free(sub->job_rank);
        free(sub->hosts);
        free(sub);
        return spar_errorf(SPAR_ECOMM, "MPI_Comm_split (color %d) failed", color);
    }
    *out = sub;
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

void spar_comm_set_timeout(spar_comm *comm, double seconds) {
    comm->timeout = seconds > 0 ? seconds : 0;
}

double spar_comm_timeout(const spar_comm *comm) {
    return comm->timeout;
}

int spar_comm_failed(const spar_comm *comm) {
    return comm->failed;
}

enum { RING_TAG = 7100, RING_CHANNELS = 4 };

/* An operation that failed halfway: the requests already posted are cancelled, so that
 * MPI never writes into a buffer the caller is about to free. */
static void op_cancel(spar_comm_op *op) {
    for (int i = 0; i < op->nreqs; i++) {
        MPI_Cancel(&op->reqs[i]);
        MPI_Request_free(&op->reqs[i]);
    }
    op->nreqs = 0;
}

static int post_pair(spar_comm *comm, spar_comm_op *op, int tag, const void *send,
                     size_t send_bytes, int dest, void *recv, size_t recv_bytes, int src) {
    if (dest >= 0 && comm->rank == comm->fault_ring_rank)
        dest = comm->size; /* an invalid peer: MPI itself reports the failure */
    for (size_t off = 0; src >= 0 && off < recv_bytes; off += PIECE_BYTES) {
        size_t n = recv_bytes - off < PIECE_BYTES ? recv_bytes - off : PIECE_BYTES;
        op->peer[op->nreqs] = src;
        SPAR_MPI_CHECK(MPI_Irecv((char *)recv + off, (int)n, MPI_BYTE, src, tag, comm->world,
                                 &op->reqs[op->nreqs++]));
    }
    for (size_t off = 0; dest >= 0 && off < send_bytes; off += PIECE_BYTES) {
        size_t n = send_bytes - off < PIECE_BYTES ? send_bytes - off : PIECE_BYTES;
        op->peer[op->nreqs] = dest < comm->size ? dest : -1;
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
    if (pieces + rpieces > SPAR__MAX_OP_REQS)
        return spar_errorf(SPAR_EUNSUP, "message of %zu bytes exceeds %d GiB", send_bytes,
                           SPAR__MAX_OP_REQS / 2);
    static const char *names[RING_CHANNELS] = {
        "the exchange on channel 0", "the exchange on channel 1", "the exchange on channel 2",
        "the exchange on channel 3"};
    SPAR_TRY(spar__comm_op_new(comm, names[channel], op));
    int rc =
        post_pair(comm, *op, RING_TAG + channel, send, send_bytes, dest, recv, recv_bytes, src);
    if (rc != 0) {
        op_cancel(*op);
        spar__comm_op_free(*op);
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
    SPAR_TRY(spar__comm_op_new(comm, "MPI_Iallgatherv", op));
    int rc = collective_counts(comm, counts, *op);
    if (rc == 0) {
        int mpi_rc =
            MPI_Iallgatherv(send, (*op)->counts[comm->rank], MPI_FLOAT, recv, (*op)->counts,
                            (*op)->displs, MPI_FLOAT, comm->world, &(*op)->reqs[0]);
        (*op)->nreqs = 1, (*op)->peer[0] = -1;
        rc = spar__comm_mpi_status(mpi_rc, "MPI_Iallgatherv");
    }
    if (rc != 0) {
        spar__comm_op_free(*op);
        *op = NULL;
        return rc;
    }
    comm->bytes_sent += (uint64_t)(comm->size - 1) * (uint64_t)counts[comm->rank] * sizeof(float);
    return SPAR_OK;
}

int spar_comm_reduce_scatter_start(spar_comm *comm, const float *send, float *recv,
                                   const int64_t *counts, spar_comm_op **op) {
    SPAR_TRY(spar__comm_op_new(comm, "MPI_Ireduce_scatter", op));
    int rc = collective_counts(comm, counts, *op);
    if (rc == 0) {
        int mpi_rc = MPI_Ireduce_scatter(send, recv, (*op)->counts, MPI_FLOAT, MPI_SUM, comm->world,
                                         &(*op)->reqs[0]);
        (*op)->nreqs = 1, (*op)->peer[0] = -1;
        rc = spar__comm_mpi_status(mpi_rc, "MPI_Ireduce_scatter");
    }
    if (rc != 0) {
        spar__comm_op_free(*op);
        *op = NULL;
        return rc;
    }
    uint64_t others = 0;
    for (int s = 0; s < comm->size; s++)
        others += s == comm->rank ? 0 : (uint64_t)counts[s];
    comm->bytes_sent += others * sizeof(float);
    return SPAR_OK;
}
