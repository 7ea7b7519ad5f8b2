/* fuzz_offload_header.c: libFuzzer harness of the offloaded decode's control message
 * (engine/offload_wire.c: the protobuf-c StepHeader of engine/offload.proto).
 *
 * Input: the bytes an attention rank receives from a compute rank, decoded and checked
 * by spar__header_decode as spar__header_recv does after the receive (here from "rank
 * 1", at most MAX_COUNT requests). Seeds: tests/fuzz/corpus/offload_header (encoded
 * headers of admission, decode and stop steps).
 *
 * Properties: a refused message gives an input-error status; an accepted one holds
 * between 0 and MAX_COUNT requests with an id and a position each. The decoder names
 * every refusal on stderr: run with -close_fd_mask=2 (run.sh does) to keep those
 * expected lines quiet; libFuzzer's own reports still appear.
 */
#include "fuzz.h"    // defines: FUZZ_CHECK, fuzz_input_error
#include "offload.h" // defines: spar__header_decode, spar__header_free

#define MAX_COUNT 64

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    spar__header h;
    int rc = spar__header_decode(data, size, 1, MAX_COUNT, &h);
    if (rc != 0) {
        fuzz_input_error(rc, NULL);
        FUZZ_CHECK(h.ids == NULL && h.positions == NULL);
        return 0;
    }
    FUZZ_CHECK(h.count >= 0 && h.count <= MAX_COUNT);
    FUZZ_CHECK(h.ids != NULL && h.positions != NULL);
    volatile uint64_t sum = 0; /* every element is there to read */
    for (int i = 0; i < h.count; i++)
        sum += (uint64_t)h.ids[i] + (uint64_t)h.positions[i];
    (void)sum;
    spar__header_free(&h);
    return 0;
}
