/* comm_internal.h: what the comm room's files share and nobody else sees.
 *
 * The communicator and operation structs, the MPI check macro, and the timed wait every
 * wait of the room goes through (comm_wait.c): requests are tested until they complete
 * or the communicator's timeout passes, and the error then names the peer a request was
 * waiting on (rank and host), or for a collective the operation that some rank did not
 * join.
 *
 * Defines: struct spar_comm, struct spar_comm_op, SPAR_MPI_CHECK, spar__comm_mpi_status,
 *          spar__comm_op_new, spar__comm_op_free, spar__comm_wait_reqs.
 */
#ifndef SPAR_COMM_INTERNAL_H
#define SPAR_COMM_INTERNAL_H

#include <mpi.h>
#include <stdint.h>

#include "comm.h"
#include "spar_status.h"

/* MPI counts are int: larger buffers go in pieces of this many bytes. */
#define SPAR__PIECE_BYTES ((size_t)1 << 30)
#define SPAR__MAX_OP_REQS 64
#define SPAR__HOST_LEN 64

struct spar_comm {
    MPI_Comm world;
    int rank, size;
    char host[MPI_MAX_PROCESSOR_NAME];
    char library[MPI_MAX_LIBRARY_VERSION_STRING];
    uint64_t bytes_sent;
    int fault_ring_rank; /* test hook: this rank's ring send targets an invalid peer */
    spar_comm *parent;   /* a split of this one (spar_comm_split), or NULL */
    double timeout;      /* seconds a wait lasts before it gives up; 0 = no limit */
    int *job_rank;       /* [size] each member's rank in the job, for messages */
    char (*hosts)[SPAR__HOST_LEN]; /* [size] each member's host, for messages */
    int failed; /* a wait gave up: MPI_Finalize could wait for the lost peer */
};

/* A nonblocking operation: its requests and, for each, the peer it exchanges with (a
 * rank of comm; -1 for a collective, which has no single peer). */
struct spar_comm_op {
    spar_comm *comm;
    MPI_Request reqs[SPAR__MAX_OP_REQS];
    int peer[SPAR__MAX_OP_REQS];
    int nreqs;
    const char *name; /* "the ring exchange on channel 1", "MPI_Iallgatherv" */
    int *counts, *displs; /* kept alive for the collectives until completion */
};

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
int spar__comm_mpi_status(int rc, const char *call);

int spar__comm_op_new(spar_comm *comm, const char *name, spar_comm_op **op);
void spar__comm_op_free(spar_comm_op *op);

/* Tests reqs[0..n) until all complete or `seconds` pass (0: no limit). peer[i] is the
 * rank of comm that request i waits on, or -1 (peer may be NULL: a collective); `what`
 * says what was awaited. Completed requests become MPI_REQUEST_NULL. On a timeout the
 * requests stay posted, the error names the first unfinished request's peer (its rank in
 * the job and its host) or, for a collective, says that some rank did not arrive, and
 * comm->failed is set. */
int spar__comm_wait_reqs(spar_comm *comm, MPI_Request *reqs, const int *peer, int n,
                         double seconds, const char *what);

#endif
