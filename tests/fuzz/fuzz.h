/* fuzz.h: what the libFuzzer harnesses of tests/fuzz share.
 *
 * A harness feeds one input to a parser and then checks properties that must hold
 * whatever the bytes were. A refused input is a normal outcome (a status and a message);
 * a broken property aborts, which libFuzzer reports as a crash with the input saved.
 *
 * Defines: FUZZ_CHECK, fuzz_input_error.
 */
#ifndef SPAR_FUZZ_H
#define SPAR_FUZZ_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "spar_status.h" // defines: SPAR_E*, spar_status_is_input_error

#define FUZZ_CHECK(cond)                                                                           \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz: property broken at %s:%d: %s\n", __FILE__, __LINE__, #cond);    \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

/* A refusal must be an input error (never out-of-memory or a network status) and, where
 * the parser writes one, come with a message. */
static inline void fuzz_input_error(int rc, const char *msg) {
    FUZZ_CHECK(spar_status_is_input_error(rc));
    FUZZ_CHECK(msg == NULL || msg[0] != '\0');
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#endif
