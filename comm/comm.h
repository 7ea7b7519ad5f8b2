/* comm.h: the only room that talks to the network.
 *
 * A communicator over MPI (rank, size, host), run with MPI_ERRORS_RETURN so that every
 * failure comes back as a status naming the call, rank and host; a nonblocking ring
 * exchange (send to rank+1, receive from rank-1) and nonblocking all-gather and
 * reduce-scatter that the engine posts before it computes; small collectives for
 * agreeing on errors and gathering figures; point-to-point sends for tensor I/O and
 * control messages of unknown size; communicators split by role; per-rank byte counters.
 * Every wait gives up after the communicator's timeout (spar_comm_set_timeout: the
 * launcher's comm.timeout), naming the peer it waited for (rank and host) or, for a
 * collective, the operation that some rank did not join: a stopped, hung or cut-off
 * peer ends the job instead of hanging it. (Open MPI itself ends the job when a rank
 * dies.)
 * Sizes: point-to-point messages above 1 GiB travel in pieces (up to 32 GiB per
 * operation); a collective takes up to 2^31-1 floats per call (the engine splits its
 * collectives by head group).
 *
 * Transport: before MPI_Init, spar_comm_prepare_transport picks Open MPI's UCX PML
 * (with any UCX transport, so that TCP/shared-memory hosts qualify) when UCX works on
 * this host, or Open MPI's own ob1 PML otherwise; a PML chosen by the user through
 * OMPI_MCA_pml is left alone. spar_comm_transport() says what was chosen and why.
 *
 * Defines: spar_comm and its functions. Leaves out: any arithmetic on the data.
 */
#ifndef SPAR_COMM_H
#define SPAR_COMM_H

#include <stddef.h>
#include <stdint.h>

typedef struct spar_comm spar_comm;

/* choice: "auto", "ucx" or "ob1". Sets Open MPI's PML parameters in the environment;
 * call before spar_comm_init. Returns SPAR_EINVAL for another choice. */
int spar_comm_prepare_transport(const char *choice);

/* MPI_Init (threads: funneled), errors returned, identity given to the log. */
int spar_comm_init(spar_comm **out, int *argc, char ***argv);

/* MPI_Finalize and free. */
void spar_comm_free(spar_comm *comm);

/* Ends every rank of the job now with exit code `code` (the launcher's last resort). */
void spar_comm_abort(spar_comm *comm, int code);

int spar_comm_rank(const spar_comm *comm);
int spar_comm_size(const spar_comm *comm);
const char *spar_comm_host(const spar_comm *comm);
/* "ucx (auto: UCX 1.13 works here)" and the like. */
const char *spar_comm_transport(const spar_comm *comm);
/* First line of MPI_Get_library_version. */
const char *spar_comm_library(const spar_comm *comm);

/* Seconds since an arbitrary start, the same clock on every call. */
double spar_comm_wtime(void);

/* How long any wait of this communicator lasts before it returns SPAR_ECOMM with an error
 * naming whom it waited for (seconds; 0 = no limit, the start value). Set once the
 * configuration is known; a split inherits the value of its parent at the time. */
void spar_comm_set_timeout(spar_comm *comm, double seconds);
double spar_comm_timeout(const spar_comm *comm);

/* True once a wait has given up: the job should end with spar_comm_abort, since
 * MPI_Finalize (spar_comm_free) could wait for ever for the peer that failed. */
int spar_comm_failed(const spar_comm *comm);

/* Bytes this rank has sent since init: point-to-point and ring traffic as sent, and for
 * collectives the algorithmic volume a rank must send at least (all-gather: its block to
 * each of the P-1 others; reduce-scatter: every block but its own). The engine reads it
 * before and after a pass. */
uint64_t spar_comm_bytes_sent(const spar_comm *comm);

/* Every rank passes its own status; all receive the most negative one (0 when every
 * rank succeeded). This is how one rank's bad input stops all ranks cleanly. */
int spar_comm_agree(spar_comm *comm, int status, int *worst);

int spar_comm_barrier(spar_comm *comm);
int spar_comm_bcast(spar_comm *comm, void *buf, size_t bytes, int root);

/* Gathers `bytes` from every rank into out ([size * bytes], rank order) on rank root. */
int spar_comm_gather(spar_comm *comm, const void *send, size_t bytes, void *out, int root);
/* Max and sum of a value over ranks, on every rank. */
int spar_comm_allreduce_max_double(spar_comm *comm, double *value);
int spar_comm_allreduce_sum_double(spar_comm *comm, double *value);

/* A communicator of the ranks that pass the same color (ordered as in comm), e.g. the
 * compute ranks of an offloaded decode; freed with spar_comm_free (which ends MPI only
 * for the communicator of spar_comm_init). Collective over comm. */
int spar_comm_split(spar_comm *comm, int color, spar_comm **out);

/* Blocking receive of a message of unknown size (a control message): *buf is malloc'ed
 * and holds *bytes bytes. */
int spar_comm_recv_message(spar_comm *comm, int src, int tag, void **buf, size_t *bytes);

/* Blocking point-to-point, for moving tensors between rank 0 and the others. These and
 * the collectives above wait at most the communicator's timeout. */
int spar_comm_send(spar_comm *comm, const void *buf, size_t bytes, int dest, int tag);
int spar_comm_recv(spar_comm *comm, void *buf, size_t bytes, int src, int tag);

/* A nonblocking operation in flight (a ring exchange or a collective). Start returns
 * one; test makes progress and says whether it is done; wait completes and frees it and
 * sets *op to NULL (a NULL op is complete). Buffers must stay untouched until then. */
typedef struct spar_comm_op spar_comm_op;

/* Ring exchange on channel c (0..3; channels in flight together never mix): send
 * `send_bytes` to rank+1 and receive `recv_bytes` from rank-1 into `recv`. */
int spar_comm_ring_start(spar_comm *comm, int channel, const void *send, size_t send_bytes,
                         void *recv, size_t recv_bytes, spar_comm_op **op);

/* The same with explicit peers: send to `dest` and receive from `src` on channel c; a peer
 * of -1 means nothing to send or receive (the ends of a chain). */
int spar_comm_sendrecv_start(spar_comm *comm, int channel, const void *send, size_t send_bytes,
                             int dest, void *recv, size_t recv_bytes, int src, spar_comm_op **op);

/* All-gather of float32 blocks of different lengths: rank s contributes counts[s] floats
 * from `send`; `recv` gets every block in rank order. counts: [size]. */
int spar_comm_allgather_start(spar_comm *comm, const float *send, float *recv,
                              const int64_t *counts, spar_comm_op **op);

/* Reduce-scatter (sum) of float32: `send` holds one block per rank in rank order
 * (counts[s] floats each); rank r receives into `recv` the sum over ranks of block r. */
int spar_comm_reduce_scatter_start(spar_comm *comm, const float *send, float *recv,
                                   const int64_t *counts, spar_comm_op **op);

int spar_comm_op_test(spar_comm *comm, spar_comm_op *op, int *done);

/* Waits that give up: after `seconds` (> 0; 0 = no limit) without completion they return
 * SPAR_ECOMM with an error naming the peer (its rank in the job and host) and `what` was
 * awaited (the operation stays posted: the caller is expected to end the job). An
 * operation knows its own peers (a ring exchange: the receive from rank-1 first, then
 * the send to rank+1); `peer` (a rank of comm, or -1) stands in where it has none (a
 * collective). `what` NULL: the operation's own name. */
int spar_comm_op_wait_for(spar_comm *comm, spar_comm_op **op, double seconds, int peer,
                          const char *what);
int spar_comm_recv_for(spar_comm *comm, void *buf, size_t bytes, int src, int tag, double seconds,
                       const char *what);
int spar_comm_send_for(spar_comm *comm, const void *buf, size_t bytes, int dest, int tag,
                       double seconds, const char *what);
/* Until a message from src with tag is there to receive (then spar_comm_recv_message). */
int spar_comm_probe_for(spar_comm *comm, int src, int tag, double seconds, const char *what);
/* The same with the communicator's timeout. */
int spar_comm_op_wait(spar_comm *comm, spar_comm_op **op);

#endif
