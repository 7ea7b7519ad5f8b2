/* test_partition.c: the token-to-rank maps of partition/partition.h.
 *
 * Every property is checked for the three kinds, P = 1..8 and a spread of N >= P that
 * includes N < 2P and N not divisible by P or 2P, because uneven N is where sequence
 * parallel codes silently drop or double tokens. Brute-force counts are the oracle.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <cmocka.h>

#include "partition.h"   // defines: spar_partition, spar_partition_init, _global, _owner, ...
#include "spar_status.h" // defines: SPAR_EINVAL

#define MAX_P 8

static const enum spar_partition_kind kinds[] = {SPAR_PARTITION_CONTIGUOUS, SPAR_PARTITION_ZIGZAG,
                                                 SPAR_PARTITION_STRIPE};
#define KIND_COUNT (sizeof kinds / sizeof kinds[0])

/* Sequence lengths to try for P ranks: every N in [P, 4P+3] (N < 2P, N = 2P, every
 * remainder mod P and 2P) plus a few larger odd and even lengths. */
static int lengths_for(int p, int64_t *out) {
    int count = 0;
    for (int64_t n = p; n <= 4 * p + 3; n++)
        out[count++] = n;
    static const int64_t extra[] = {97, 100, 128, 257, 1000, 1001};
    for (size_t i = 0; i < sizeof extra / sizeof extra[0]; i++)
        out[count++] = extra[i];
    return count;
}

typedef void (*case_fn)(const spar_partition *part);

/* Runs fn on every (kind, P, N) case. */
static void for_each_case(case_fn fn) {
    int64_t lengths[64];
    for (size_t k = 0; k < KIND_COUNT; k++) {
        for (int p = 1; p <= MAX_P; p++) {
            int count = lengths_for(p, lengths);
            for (int c = 0; c < count; c++) {
                spar_partition part;
                assert_int_equal(spar_partition_init(&part, kinds[k], lengths[c], p), SPAR_OK);
                fn(&part);
            }
        }
    }
}

static void fail_case(const spar_partition *part, const char *what) {
    fprintf(stderr, "%s: kind=%s N=%lld P=%d\n", what, spar_partition_kind_name(part->kind),
            (long long)part->n, part->ranks);
}

static void check_owner_round_trip(const spar_partition *part) {
    int64_t n = part->n;
    int *seen = calloc((size_t)n, sizeof *seen);
    assert_non_null(seen);
    /* (rank, local) -> global -> (rank, local) */
    for (int r = 0; r < part->ranks; r++) {
        int64_t len = spar_partition_local_len(part, r);
        for (int64_t i = 0; i < len; i++) {
            int64_t t = spar_partition_global(part, r, i);
            if (t < 0 || t >= n) fail_case(part, "global position out of range");
            assert_true(t >= 0 && t < n);
            seen[t]++;
            int owner = -1;
            int64_t local = -1;
            spar_partition_owner(part, t, &owner, &local);
            if (owner != r || local != i) fail_case(part, "owner(global(r, i)) != (r, i)");
            assert_int_equal(owner, r);
            assert_int_equal(local, i);
        }
    }
    /* global -> (rank, local) -> global, and every token counted exactly once */
    for (int64_t t = 0; t < n; t++) {
        if (seen[t] != 1) fail_case(part, "token not owned exactly once");
        assert_int_equal(seen[t], 1);
        int owner = -1;
        int64_t local = -1;
        spar_partition_owner(part, t, &owner, &local);
        assert_true(owner >= 0 && owner < part->ranks);
        assert_true(local >= 0 && local < spar_partition_local_len(part, owner));
        assert_int_equal(spar_partition_global(part, owner, local), t);
    }
    free(seen);
}

static void every_global_token_is_owned_exactly_once_and_round_trips(void **state) {
    (void)state;
    for_each_case(check_owner_round_trip);
}

static void check_positions_increasing(const spar_partition *part) {
    for (int r = 0; r < part->ranks; r++) {
        int64_t len = spar_partition_local_len(part, r);
        int64_t *pos = malloc(sizeof *pos * (size_t)(len > 0 ? len : 1));
        assert_non_null(pos);
        spar_partition_local_positions(part, r, pos);
        for (int64_t i = 0; i < len; i++) {
            assert_int_equal(pos[i], spar_partition_global(part, r, i));
            if (i > 0 && pos[i] <= pos[i - 1])
                fail_case(part, "local positions not strictly increasing");
            assert_true(i == 0 || pos[i] > pos[i - 1]);
        }
        free(pos);
    }
}

static void local_positions_are_strictly_increasing(void **state) {
    (void)state;
    for_each_case(check_positions_increasing);
}

static void check_lengths(const spar_partition *part) {
    int64_t sum = 0, lo = INT64_MAX, hi = 0;
    for (int r = 0; r < part->ranks; r++) {
        int64_t len = spar_partition_local_len(part, r);
        assert_true(len >= 1); /* N >= P: every rank holds at least one token */
        sum += len;
        lo = len < lo ? len : lo;
        hi = len > hi ? len : hi;
    }
    if (sum != part->n) fail_case(part, "local lengths do not sum to N");
    assert_int_equal(sum, part->n);
    assert_int_equal(spar_partition_max_local_len(part), hi);
    if (part->kind != SPAR_PARTITION_ZIGZAG) {
        if (hi - lo > 1) fail_case(part, "local lengths differ by more than one");
        assert_true(hi - lo <= 1);
    }
}

static void local_lengths_sum_to_n_and_differ_by_at_most_one(void **state) {
    (void)state;
    for_each_case(check_lengths);
}

/* The 2P zigzag chunks, derived from the segments: chunk r is rank r's first run and
 * chunk 2P-1-r its second (empty when N < 2P). In global order they must tile [0, N). */
static void check_zigzag_chunks(const spar_partition *part) {
    if (part->kind != SPAR_PARTITION_ZIGZAG) return;
    int p = part->ranks;
    int64_t start[2 * MAX_P], len[2 * MAX_P];
    for (int r = 0; r < p; r++) {
        spar_segment seg[2];
        int64_t count = spar_partition_segments(part, r, seg);
        assert_true(count == 1 || count == 2);
        start[r] = seg[0].start;
        len[r] = seg[0].len;
        start[2 * p - 1 - r] = count == 2 ? seg[1].start : seg[0].start + seg[0].len;
        len[2 * p - 1 - r] = count == 2 ? seg[1].len : 0;
    }
    int64_t next = 0, lo = INT64_MAX, hi = 0;
    for (int c = 0; c < 2 * p; c++) {
        if (len[c] > 0) {
            if (start[c] != next)
                fail_case(part, "zigzag chunks do not tile the sequence in order");
            assert_int_equal(start[c], next);
        }
        next += len[c];
        lo = len[c] < lo ? len[c] : lo;
        hi = len[c] > hi ? len[c] : hi;
    }
    assert_int_equal(next, part->n);
    if (hi - lo > 1) fail_case(part, "zigzag chunks differ by more than one token");
    assert_true(hi - lo <= 1);
}

static void zigzag_chunks_tile_the_sequence_and_differ_by_at_most_one(void **state) {
    (void)state;
    for_each_case(check_zigzag_chunks);
}

static void check_segments(const spar_partition *part) {
    for (int r = 0; r < part->ranks; r++) {
        int64_t count = spar_partition_segments(part, r, NULL);
        int64_t len = spar_partition_local_len(part, r);
        assert_true(count >= 1);
        if (part->kind == SPAR_PARTITION_CONTIGUOUS) assert_int_equal(count, 1);
        if (part->kind == SPAR_PARTITION_ZIGZAG) assert_true(count <= 2);
        if (part->kind == SPAR_PARTITION_STRIPE) assert_int_equal(count, len);
        spar_segment *seg = calloc((size_t)count, sizeof *seg);
        assert_non_null(seg);
        assert_int_equal(spar_partition_segments(part, r, seg), count);
        int64_t covered = 0;
        for (int64_t s = 0; s < count; s++) {
            assert_true(seg[s].len >= 1);
            assert_int_equal(seg[s].local_start, covered); /* runs in local order */
            for (int64_t j = 0; j < seg[s].len; j++) {
                int64_t t = spar_partition_global(part, r, seg[s].local_start + j);
                if (t != seg[s].start + j)
                    fail_case(part, "segment does not match the local tokens");
                assert_int_equal(t, seg[s].start + j);
            }
            covered += seg[s].len;
        }
        assert_int_equal(covered, len);
        free(seg);
    }
}

static void segments_cover_exactly_the_local_tokens(void **state) {
    (void)state;
    for_each_case(check_segments);
}

static void init_rejects_fewer_tokens_than_ranks_and_no_ranks(void **state) {
    (void)state;
    spar_partition part;
    for (size_t k = 0; k < KIND_COUNT; k++) {
        for (int p = 1; p <= MAX_P; p++) {
            assert_int_equal(spar_partition_init(&part, kinds[k], p - 1, p), SPAR_EINVAL);
            assert_int_equal(spar_partition_init(&part, kinds[k], p, p), SPAR_OK);
        }
        assert_int_equal(spar_partition_init(&part, kinds[k], 16, 0), SPAR_EINVAL);
        assert_int_equal(spar_partition_init(&part, kinds[k], 16, -3), SPAR_EINVAL);
        assert_int_equal(spar_partition_init(&part, kinds[k], 0, 0), SPAR_EINVAL);
        assert_int_equal(spar_partition_init(&part, kinds[k], -1, 1), SPAR_EINVAL);
    }
    assert_int_equal(spar_partition_init(&part, (enum spar_partition_kind)7, 16, 2), SPAR_EINVAL);
}

/* max/min/mean of the ranks' causal pairs */
static void causal_stats(const spar_partition *part, double *lo, double *hi, double *mean) {
    *lo = 1e300, *hi = 0, *mean = 0;
    for (int r = 0; r < part->ranks; r++) {
        double w = (double)spar_partition_causal_pairs(part, r);
        *lo = w < *lo ? w : *lo;
        *hi = w > *hi ? w : *hi;
        *mean += w / part->ranks;
    }
}

static void zigzag_gives_every_rank_equal_causal_work(void **state) {
    (void)state;
    spar_partition zz, cont;
    double lo, hi, mean;
    assert_int_equal(spar_partition_init(&zz, SPAR_PARTITION_ZIGZAG, 4096, 4), SPAR_OK);
    causal_stats(&zz, &lo, &hi, &mean);
    assert_true((hi - lo) / mean < 0.01);

    assert_int_equal(spar_partition_init(&cont, SPAR_PARTITION_CONTIGUOUS, 4096, 4), SPAR_OK);
    causal_stats(&cont, &lo, &hi, &mean);
    assert_true(hi / mean >= 1.5); /* the last rank does 7/4 of the mean work */

    /* the same for every P and several N that are multiples of 2P */
    for (int p = 1; p <= MAX_P; p++) {
        for (int64_t m = 1; m <= 64; m *= 4) {
            int64_t n = 2 * p * m * 16;
            assert_int_equal(spar_partition_init(&zz, SPAR_PARTITION_ZIGZAG, n, p), SPAR_OK);
            causal_stats(&zz, &lo, &hi, &mean);
            if ((hi - lo) / mean >= 0.01) fail_case(&zz, "zigzag causal work is unbalanced");
            assert_true((hi - lo) / mean < 0.01);
        }
    }
}

/* Brute force: count (query, key) pairs with key <= query over the rank's queries. */
static void check_causal_pairs(const spar_partition *part) {
    int64_t n = part->n;
    if (n > 260) return; /* O(N^2); the small cases cover every shape of remainder */
    int *owner = malloc(sizeof *owner * (size_t)n);
    assert_non_null(owner);
    for (int r = 0; r < part->ranks; r++)
        for (int64_t i = 0; i < spar_partition_local_len(part, r); i++)
            owner[spar_partition_global(part, r, i)] = r;
    int64_t total = 0;
    for (int r = 0; r < part->ranks; r++) {
        int64_t pairs = 0;
        for (int64_t q = 0; q < n; q++)
            for (int64_t k = 0; k < n; k++)
                pairs += owner[q] == r && k <= q;
        if (pairs != spar_partition_causal_pairs(part, r))
            fail_case(part, "causal pairs differ from the brute-force count");
        assert_int_equal(spar_partition_causal_pairs(part, r), pairs);
        total += pairs;
    }
    assert_int_equal(total, n * (n + 1) / 2);
    free(owner);
}

static void causal_pairs_match_a_brute_force_count(void **state) {
    (void)state;
    for_each_case(check_causal_pairs);
}

static void kind_names_are_the_config_spellings(void **state) {
    (void)state;
    assert_string_equal(spar_partition_kind_name(SPAR_PARTITION_CONTIGUOUS), "contiguous");
    assert_string_equal(spar_partition_kind_name(SPAR_PARTITION_ZIGZAG), "zigzag");
    assert_string_equal(spar_partition_kind_name(SPAR_PARTITION_STRIPE), "stripe");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(every_global_token_is_owned_exactly_once_and_round_trips),
        cmocka_unit_test(local_positions_are_strictly_increasing),
        cmocka_unit_test(local_lengths_sum_to_n_and_differ_by_at_most_one),
        cmocka_unit_test(zigzag_chunks_tile_the_sequence_and_differ_by_at_most_one),
        cmocka_unit_test(segments_cover_exactly_the_local_tokens),
        cmocka_unit_test(init_rejects_fewer_tokens_than_ranks_and_no_ranks),
        cmocka_unit_test(zigzag_gives_every_rank_equal_causal_work),
        cmocka_unit_test(causal_pairs_match_a_brute_force_count),
        cmocka_unit_test(kind_names_are_the_config_spellings),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
