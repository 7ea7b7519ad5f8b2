/* fuzz_keys.c: libFuzzer harness of the key table's value parsing (launcher/keys.c) and
 * of the RunPlan that carries the values to every rank (launcher/plan.c).
 *
 * Input: lines of KEY=VALUE, each given to spar__config_set_arg as `--set KEY=VALUE`
 * would be. Seeds: tests/fuzz/corpus/keys; dictionary: keys.dict.
 *
 * Properties: a refused assignment gives an input-error status and a message; whatever
 * was accepted passes spar__config_recheck (its printed form parses again to a valid
 * value), and the configuration survives RunPlan packing and unpacking with every value
 * printing the same.
 */
#include <string.h>

#include "fuzz.h"     // defines: FUZZ_CHECK, fuzz_input_error
#include "launcher.h" // defines: spar__config_set_arg, spar__plan_pack, spar__plan_unpack

static spar_config cfg, back; /* ~80 KB each: not on the stack */

/* Every key prints the same in a and b. */
static void check_same(const spar_config *a, const spar_config *b) {
    char ta[sizeof a->v[0].s + 32], tb[sizeof ta];
    for (int i = 0; i < SPAR_KEY_COUNT; i++) {
        spar__value_format(a, i, ta, sizeof ta);
        spar__value_format(b, i, tb, sizeof tb);
        FUZZ_CHECK(strcmp(ta, tb) == 0);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char line[2048];
    spar_err err;
    spar__config_defaults(&cfg);
    for (size_t at = 0; at < size;) { /* one assignment per line */
        const uint8_t *nl = memchr(data + at, '\n', size - at);
        size_t len = (nl ? (size_t)(nl - data) : size) - at;
        size_t keep = len < sizeof line - 1 ? len : sizeof line - 1;
        memcpy(line, data + at, keep);
        line[keep] = '\0';
        at += len + 1;
        err.msg[0] = '\0';
        int rc = spar__config_set_arg(&cfg, line, &err);
        if (rc != 0) fuzz_input_error(rc, err.msg);
    }
    FUZZ_CHECK(spar__config_recheck(&cfg, &err) == 0);
    uint8_t *plan = NULL;
    size_t plan_len = 0;
    FUZZ_CHECK(spar__plan_pack(&cfg, 4, &plan, &plan_len) == 0);
    int rc = spar__plan_unpack(&back, plan, plan_len, 4, &err);
    free(plan);
    FUZZ_CHECK(rc == 0);
    check_same(&cfg, &back);
    return 0;
}
