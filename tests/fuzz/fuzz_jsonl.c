/* fuzz_jsonl.c: libFuzzer harness of the results-file reader of spar report
 * (launcher/jsonl.c).
 *
 * Input: one line of a JSON-lines results file (a NUL is added; the reader sees text up
 * to the first NUL, as it does for lines read with getline), flattened by
 * spar__json_flatten. Seeds: tests/fuzz/corpus/jsonl (records of each kind, torn lines).
 *
 * Properties: a line that is not a JSON object gives SPAR_EFORMAT; an accepted one has
 * fields whose keys and texts are terminated within their arrays and which can all be
 * looked up by key; nothing is read past the line's end (AddressSanitizer).
 */
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"     // defines: FUZZ_CHECK
#include "launcher.h" // defines: spar__json_flatten, spar__json_get, spar__json_flat_free

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *line = malloc(size + 1); /* exactly the line: an over-read is caught */
    FUZZ_CHECK(line != NULL);
    memcpy(line, data, size);
    line[size] = '\0';
    spar_json_flat flat = {0};
    int rc = spar__json_flatten(line, &flat);
    if (rc != 0) {
        FUZZ_CHECK(rc == SPAR_EFORMAT);
    } else {
        for (int i = 0; i < flat.count; i++) {
            const spar_json_field *f = &flat.f[i];
            FUZZ_CHECK(memchr(f->key, '\0', sizeof f->key) && memchr(f->text, '\0', sizeof f->text));
            FUZZ_CHECK(spar__json_get(&flat, f->key) != NULL);
        }
    }
    spar__json_flat_free(&flat);
    free(line);
    return 0;
}
