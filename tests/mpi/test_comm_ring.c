/* test_comm_ring.c: the ring exchange moves blocks bit-exactly and counts its bytes.
 *
 * Every rank fills a block of its own length (ranks differ, as uneven chunks do) with
 * bytes derived from its rank, then passes blocks around the ring P-1 times with the
 * double-buffered exchange the engine uses. After step t a rank must hold exactly
 * (memcmp) the block of rank r-t, and after the loop the counter must equal the bytes it
 * forwarded. Wrong results are counted across ranks; rank 0 reports and the exit code
 * is non-zero on every rank when any rank saw one.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm.h"        // defines: spar_comm_*, the ring exchange
#include "spar_status.h" // defines: SPAR_OK

static size_t block_bytes(int rank) {
    return 1000 + 37 * (size_t)rank; /* uneven on purpose, not a multiple of 4 */
}

static void fill_block(unsigned char *buf, int owner) {
    for (size_t i = 0; i < block_bytes(owner); i++)
        buf[i] = (unsigned char)((i * 131u + (size_t)owner * 17u + 5u) & 0xffu);
}

/* Rotates blocks P-1 times; returns the number of wrong blocks seen here. */
static int rotate_and_check(spar_comm *comm) {
    int r = spar_comm_rank(comm), p = spar_comm_size(comm), wrong = 0;
    size_t max = block_bytes(p - 1);
    unsigned char *buf[2] = {malloc(max), malloc(max)}, *want = malloc(max);
    if (!buf[0] || !buf[1] || !want) return 1;
    fill_block(buf[0], r);
    uint64_t expected_bytes = 0;
    for (int step = 0, cur = 0; step + 1 < p; step++, cur ^= 1) {
        int src = (r - step + p) % p, next = (r - step - 1 + 2 * p) % p;
        expected_bytes += block_bytes(src);
        spar_comm_op *op = NULL;
        if (spar_comm_ring_start(comm, step % 4, buf[cur], block_bytes(src), buf[cur ^ 1],
                                 block_bytes(next), &op) != SPAR_OK)
            return 1;
        int done = 0;
        while (!done) /* the engine computes here; we only make progress */
            if (spar_comm_op_test(comm, op, &done) != SPAR_OK) return 1;
        if (spar_comm_op_wait(comm, &op) != SPAR_OK || op != NULL) return 1;
        fill_block(want, next);
        if (memcmp(buf[cur ^ 1], want, block_bytes(next)) != 0) {
            fprintf(stderr, "rank %d step %d: block of rank %d arrived changed\n", r, step, next);
            wrong++;
        }
    }
    if (spar_comm_bytes_sent(comm) != expected_bytes) {
        fprintf(stderr, "rank %d: counted %llu ring bytes, sent %llu\n", r,
                (unsigned long long)spar_comm_bytes_sent(comm), (unsigned long long)expected_bytes);
        wrong++;
    }
    free(buf[0]);
    free(buf[1]);
    free(want);
    return wrong;
}

int main(int argc, char **argv) {
    spar_comm *comm = NULL;
    if (spar_comm_init(&comm, &argc, &argv) != SPAR_OK) return 1;
    int wrong = rotate_and_check(comm), total = 0;
    /* agree takes the minimum: pass the count negated to get the largest. */
    if (spar_comm_agree(comm, -wrong, &total) != SPAR_OK) total = -1;
    if (spar_comm_rank(comm) == 0)
        printf("%s - ring exchange at %d ranks: blocks bit-exact, byte counters exact\n",
               total == 0 ? "ok" : "not ok", spar_comm_size(comm));
    spar_comm_free(comm);
    return total == 0 ? 0 : 1;
}
