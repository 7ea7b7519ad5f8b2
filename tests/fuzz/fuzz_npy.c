/* fuzz_npy.c: libFuzzer harness of the .npy header reader (launcher/npy.c).
 *
 * Input: the first bytes of a .npy file (magic, version, header length, header dict,
 * data), parsed by spar__npy_parse_info as spar__npy_read_info parses a file.
 * Seeds: tests/fuzz/corpus/npy (numpy-written files of each dtype and shape kind, near
 * misses); dictionary: npy.dict.
 *
 * Properties: a refused header gives an input-error status and a message; an accepted
 * one has at most 8 dimensions, none negative, a dtype string that fits, and a data
 * offset inside the input; a header spar writes for that dtype and shape reads back the
 * same, or the writer refuses it.
 */
#define _GNU_SOURCE /* memfd_create */
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "fuzz.h"     // defines: FUZZ_CHECK, fuzz_input_error
#include "launcher.h" // defines: spar__npy_parse_info, spar__npy_write_header_as

static int memfd = -1; /* the writer's output, rewound for every input */

/* spar's writer for (descr, shape), read back: the same, or refused by the writer. */
static void check_written(const spar_npy_info *info) {
    if (memfd < 0) FUZZ_CHECK((memfd = memfd_create("fuzz_npy", 0)) >= 0);
    FUZZ_CHECK(ftruncate(memfd, 0) == 0 && lseek(memfd, 0, SEEK_SET) == 0);
    int64_t offset = spar__npy_write_header_as(memfd, info->descr, info->ndim, info->shape);
    if (offset < 0) return;
    unsigned char head[1024];
    FUZZ_CHECK(offset <= (int64_t)sizeof head && offset % 64 == 0);
    FUZZ_CHECK(pread(memfd, head, (size_t)offset, 0) == (ssize_t)offset);
    spar_npy_info again;
    spar_err err;
    FUZZ_CHECK(spar__npy_parse_info(head, (size_t)offset, "written", &again, &err) == 0);
    FUZZ_CHECK(strcmp(again.descr, info->descr) == 0 && again.ndim == info->ndim);
    FUZZ_CHECK(!again.fortran_order && again.data_offset == offset);
    for (int i = 0; i < info->ndim; i++)
        FUZZ_CHECK(again.shape[i] == info->shape[i]);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    spar_npy_info info;
    spar_err err = {.msg = ""};
    int rc = spar__npy_parse_info(data, size, "fuzz.npy", &info, &err);
    if (rc != 0) {
        fuzz_input_error(rc, err.msg);
        return 0;
    }
    FUZZ_CHECK(info.ndim >= 0 && info.ndim <= 8);
    for (int i = 0; i < info.ndim; i++)
        FUZZ_CHECK(info.shape[i] >= 0);
    FUZZ_CHECK(memchr(info.descr, '\0', sizeof info.descr) != NULL);
    FUZZ_CHECK(info.data_offset >= 10 && (size_t)info.data_offset <= size);
    if (!info.fortran_order) check_written(&info);
    return 0;
}
