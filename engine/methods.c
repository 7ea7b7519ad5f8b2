/* methods.c: the table of sequence-parallel methods (see spar.h). */
#include <string.h>

#include "engine_internal.h"

const spar_method *spar_method_find(const char *name) {
    static const spar_method methods[] = {
        {"ring", spar__ring_forward, spar__ring_backward, false, true, false},
        {"allgather", spar__allgather_forward, spar__allgather_backward, false, true, false},
        {"lasp2", spar__lasp2_forward, spar__lasp2_backward, false, false, true},
        {"lasp1", spar__lasp1_forward, spar__lasp1_backward, false, false, true},
        {"local", spar__local_forward, spar__local_backward, true, true, true},
    };
    for (size_t i = 0; i < sizeof methods / sizeof methods[0]; i++)
        if (strcmp(methods[i].name, name) == 0) return &methods[i];
    return NULL;
}
