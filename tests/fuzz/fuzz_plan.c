/* fuzz_plan.c: libFuzzer harness of the RunPlan decoder (launcher/plan.c, protobuf-c).
 *
 * Input: the bytes every rank receives from rank 0's MPI_Bcast, decoded by
 * spar__plan_unpack as a rank does (world size not checked). Seeds: tests/fuzz/corpus/plan
 * (plans packed from configs/).
 *
 * Properties: a refused message gives an input-error status and a message; an accepted
 * plan holds only values the key table allows, and packing it again and unpacking the
 * result gives the same values.
 */
#include <string.h>

#include "fuzz.h"     // defines: FUZZ_CHECK, fuzz_input_error
#include "launcher.h" // defines: spar__plan_pack, spar__plan_unpack, spar__config_recheck

static spar_config cfg, back; /* ~80 KB each: not on the stack */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    spar_err err = {.msg = ""};
    int rc = spar__plan_unpack(&cfg, data, size, 0, &err);
    if (rc != 0) {
        fuzz_input_error(rc, err.msg);
        return 0;
    }
    FUZZ_CHECK(spar__config_recheck(&cfg, &err) == 0);
    uint8_t *plan = NULL;
    size_t len = 0;
    FUZZ_CHECK(spar__plan_pack(&cfg, 2, &plan, &len) == 0);
    rc = spar__plan_unpack(&back, plan, len, 2, &err);
    free(plan);
    FUZZ_CHECK(rc == 0);
    char ta[sizeof cfg.v[0].s + 32], tb[sizeof ta];
    for (int i = 0; i < SPAR_KEY_COUNT; i++) {
        spar__value_format(&cfg, i, ta, sizeof ta);
        spar__value_format(&back, i, tb, sizeof tb);
        FUZZ_CHECK(strcmp(ta, tb) == 0);
    }
    FUZZ_CHECK(strcmp(cfg.file, back.file) == 0);
    return 0;
}
