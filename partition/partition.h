/* partition.h: who owns which tokens of a sequence split across P ranks.
 *
 * Pure functions, no I/O, no MPI. Every partition gives each global token exactly one
 * (rank, local index); a rank's local tokens are always in increasing global order, so
 * a local chunk is a short list of contiguous runs ("segments").
 *
 *   contiguous  P chunks in order; chunk sizes differ by at most one token.
 *   zigzag      2P chunks; rank r owns chunks r and 2P-1-r, which balances causal work.
 *   stripe      token t belongs to rank t mod P (local index t div P).
 *
 * Uneven N: the first N mod K of the K chunks get one extra token; nothing is padded
 * or dropped.
 *
 * Defines: spar_partition, spar_partition_init, _local_len, _max_local_len, _global,
 *          _owner, _local_positions, _segments, _causal_pairs.
 */
#ifndef SPAR_PARTITION_H
#define SPAR_PARTITION_H

#include <stdint.h>

enum spar_partition_kind {
    SPAR_PARTITION_CONTIGUOUS = 0,
    SPAR_PARTITION_ZIGZAG = 1,
    SPAR_PARTITION_STRIPE = 2,
};

typedef struct spar_partition {
    enum spar_partition_kind kind;
    int64_t n; /* global tokens */
    int ranks; /* P */
} spar_partition;

/* A contiguous run of local tokens: global positions [start, start+len) held at local
 * indices [local_start, local_start+len). */
typedef struct spar_segment {
    int64_t start, len, local_start;
} spar_segment;

/* Fills *part; returns SPAR_EINVAL unless ranks >= 1 and n >= ranks. */
int spar_partition_init(spar_partition *part, enum spar_partition_kind kind, int64_t n, int ranks);

/* Returns "contiguous", "zigzag" or "stripe". */
const char *spar_partition_kind_name(enum spar_partition_kind kind);

/* Number of tokens rank r holds. */
int64_t spar_partition_local_len(const spar_partition *part, int rank);

/* Largest local_len over all ranks (the size of a ring buffer). */
int64_t spar_partition_max_local_len(const spar_partition *part);

/* Global position of rank r's local token i (0 <= i < local_len). */
int64_t spar_partition_global(const spar_partition *part, int rank, int64_t local);

/* Owner rank and local index of global token t (0 <= t < n). */
void spar_partition_owner(const spar_partition *part, int64_t t, int *rank, int64_t *local);

/* pos: [local_len(rank)] int64, filled with the global positions in local order. */
void spar_partition_local_positions(const spar_partition *part, int rank, int64_t *pos);

/* Number of contiguous runs of rank r (1 for contiguous, up to 2 for zigzag, local_len
 * for stripe); with seg != NULL also fills seg[0..count). */
int64_t spar_partition_segments(const spar_partition *part, int rank, spar_segment *seg);

/* Causal (query, key) pairs with key <= query whose query rank r owns: the rank's
 * share of causal attention work. */
int64_t spar_partition_causal_pairs(const spar_partition *part, int rank);

#endif
