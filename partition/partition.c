/* partition.c: the token-to-rank maps (see partition.h). */
#include "partition.h"

#include "spar_status.h"

/* Chunk c of n tokens cut into k chunks: the first n mod k chunks hold one extra. */
static int64_t chunk_len(int64_t n, int64_t k, int64_t c) {
    return n / k + (c < n % k ? 1 : 0);
}

static int64_t chunk_start(int64_t n, int64_t k, int64_t c) {
    int64_t extra = n % k;
    return c * (n / k) + (c < extra ? c : extra);
}

/* Chunk holding token t, inverse of chunk_start. */
static int64_t chunk_of(int64_t n, int64_t k, int64_t t) {
    int64_t base = n / k, extra = n % k;
    int64_t big = extra * (base + 1); /* tokens held by the longer chunks */
    if (t < big) return t / (base + 1);
    return extra + (t - big) / base;
}

int spar_partition_init(spar_partition *part, enum spar_partition_kind kind, int64_t n, int ranks) {
    if (ranks < 1 || n < ranks) return SPAR_EINVAL;
    if (kind != SPAR_PARTITION_CONTIGUOUS && kind != SPAR_PARTITION_ZIGZAG &&
        kind != SPAR_PARTITION_STRIPE)
        return SPAR_EINVAL;
    part->kind = kind;
    part->n = n;
    part->ranks = ranks;
    return SPAR_OK;
}

const char *spar_partition_kind_name(enum spar_partition_kind kind) {
    switch (kind) {
    case SPAR_PARTITION_CONTIGUOUS: return "contiguous";
    case SPAR_PARTITION_ZIGZAG: return "zigzag";
    case SPAR_PARTITION_STRIPE: return "stripe";
    }
    return "?";
}

int64_t spar_partition_local_len(const spar_partition *part, int rank) {
    int64_t n = part->n, p = part->ranks;
    switch (part->kind) {
    case SPAR_PARTITION_CONTIGUOUS: return chunk_len(n, p, rank);
    case SPAR_PARTITION_ZIGZAG:
        return chunk_len(n, 2 * p, rank) + chunk_len(n, 2 * p, 2 * p - 1 - rank);
    case SPAR_PARTITION_STRIPE: return chunk_len(n, p, rank); /* same counts as contiguous */
    }
    return 0;
}

int64_t spar_partition_max_local_len(const spar_partition *part) {
    int64_t best = 0;
    for (int r = 0; r < part->ranks; r++) {
        int64_t len = spar_partition_local_len(part, r);
        best = len > best ? len : best;
    }
    return best;
}

int64_t spar_partition_global(const spar_partition *part, int rank, int64_t local) {
    int64_t n = part->n, p = part->ranks;
    switch (part->kind) {
    case SPAR_PARTITION_CONTIGUOUS: return chunk_start(n, p, rank) + local;
    case SPAR_PARTITION_ZIGZAG: {
        int64_t first = chunk_len(n, 2 * p, rank);
        if (local < first) return chunk_start(n, 2 * p, rank) + local;
        return chunk_start(n, 2 * p, 2 * p - 1 - rank) + (local - first);
    }
    case SPAR_PARTITION_STRIPE: return local * p + rank;
    }
    return -1;
}

void spar_partition_owner(const spar_partition *part, int64_t t, int *rank, int64_t *local) {
    int64_t n = part->n, p = part->ranks;
    switch (part->kind) {
    case SPAR_PARTITION_CONTIGUOUS: {
        int64_t c = chunk_of(n, p, t);
        *rank = (int)c;
        *local = t - chunk_start(n, p, c);
        return;
    }
    case SPAR_PARTITION_ZIGZAG: {
        int64_t c = chunk_of(n, 2 * p, t);
        int64_t offset = t - chunk_start(n, 2 * p, c);
        if (c < p) {
            *rank = (int)c;
            *local = offset;
        } else {
            *rank = (int)(2 * p - 1 - c);
            *local = chunk_len(n, 2 * p, *rank) + offset;
        }
        return;
    }
    case SPAR_PARTITION_STRIPE:
        *rank = (int)(t % p);
        *local = t / p;
        return;
    }
}

void spar_partition_local_positions(const spar_partition *part, int rank, int64_t *pos) {
    int64_t len = spar_partition_local_len(part, rank);
    for (int64_t i = 0; i < len; i++)
        pos[i] = spar_partition_global(part, rank, i);
}

int64_t spar_partition_segments(const spar_partition *part, int rank, spar_segment *seg) {
    int64_t n = part->n, p = part->ranks;
    switch (part->kind) {
    case SPAR_PARTITION_CONTIGUOUS:
        if (seg) seg[0] = (spar_segment){chunk_start(n, p, rank), chunk_len(n, p, rank), 0};
        return 1;
    case SPAR_PARTITION_ZIGZAG: {
        int64_t a = rank, b = 2 * p - 1 - rank;
        int64_t len_a = chunk_len(n, 2 * p, a), len_b = chunk_len(n, 2 * p, b);
        if (len_b == 0) { /* N < 2P leaves the late chunks empty */
            if (seg) seg[0] = (spar_segment){chunk_start(n, 2 * p, a), len_a, 0};
            return 1;
        }
        if (seg) {
            seg[0] = (spar_segment){chunk_start(n, 2 * p, a), len_a, 0};
            seg[1] = (spar_segment){chunk_start(n, 2 * p, b), len_b, len_a};
        }
        return 2;
    }
    case SPAR_PARTITION_STRIPE: {
        int64_t len = chunk_len(n, p, rank);
        for (int64_t i = 0; seg && i < len; i++)
            seg[i] = (spar_segment){i * p + rank, 1, i};
        return len;
    }
    }
    return 0;
}

int64_t spar_partition_causal_pairs(const spar_partition *part, int rank) {
    int64_t len = spar_partition_local_len(part, rank), pairs = 0;
    for (int64_t i = 0; i < len; i++)
        pairs += spar_partition_global(part, rank, i) + 1;
    return pairs;
}
