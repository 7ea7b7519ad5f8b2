/* fuzz_yaml.c: libFuzzer harness of the experiment-file parser.
 *
 * Input: the bytes of an experiment file (YAML), parsed by launcher/config_yaml.c into a
 * configuration through the key table of launcher/keys.c, exactly as `spar run FILE`
 * would, except that an `include:` is checked but not read (no other file is opened).
 * Seeds: tests/fuzz/corpus/yaml (configs/ and near misses); dictionary: yaml.dict.
 *
 * Properties: a refused file gives an input-error status and a message; an accepted one
 * holds only values the key table allows (spar__config_recheck), and its sweep lists
 * stay within their bounds.
 */
#include <string.h>

#include "fuzz.h"     // defines: FUZZ_CHECK, fuzz_input_error
#include "launcher.h" // defines: spar__config_load_yaml_text, spar__config_recheck

static spar_config cfg; /* ~80 KB: not on the stack */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    spar_err err = {.msg = ""};
    spar__config_defaults(&cfg);
    int rc = spar__config_load_yaml_text(&cfg, "fuzz.yaml", data, size, false, &err);
    if (rc != 0) {
        fuzz_input_error(rc, err.msg);
        return 0;
    }
    FUZZ_CHECK(spar__config_recheck(&cfg, &err) == 0);
    const spar_sweep *sw = &cfg.sweep;
    FUZZ_CHECK(sw->nkeys >= 0 && sw->nkeys <= SPAR_SWEEP_KEYS);
    for (int k = 0; k < sw->nkeys; k++) {
        FUZZ_CHECK(sw->key[k] >= 0 && sw->key[k] < SPAR_KEY_COUNT);
        FUZZ_CHECK(sw->nvalues[k] >= 1 && sw->nvalues[k] <= SPAR_SWEEP_VALUES);
        for (int v = 0; v < sw->nvalues[k]; v++)
            FUZZ_CHECK(spar__value_check(spar__keys[sw->key[k]].name, sw->value[k][v], NULL) == 0);
    }
    return 0;
}
