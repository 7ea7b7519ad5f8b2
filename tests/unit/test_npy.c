/* test_npy.c: the .npy header reader, checker and writer of the launcher (launcher/npy.c).
 *
 * Files written by spar must read back exactly; files written by hand, byte for byte as
 * numpy writes them (versions 1.0 and 2.0), must be accepted or refused with a message
 * that names the key, the file and what is wrong. Everything lives in a mkdtemp
 * directory under /tmp that each test removes.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>

#include <cmocka.h>

#include "launcher.h"    // defines: spar__npy_read_info, spar__npy_check, spar__npy_write_header
#include "spar_status.h" // defines: SPAR_EFORMAT, SPAR_ESHAPE

typedef struct tmp_dir {
    char path[64];
    char files[8][128];
    int count;
} tmp_dir;

static int setup_dir(void **state) {
    tmp_dir *d = calloc(1, sizeof *d);
    if (!d) return -1;
    snprintf(d->path, sizeof d->path, "/tmp/spar-test-npy-XXXXXX");
    if (!mkdtemp(d->path)) {
        free(d);
        return -1;
    }
    *state = d;
    return 0;
}

static int teardown_dir(void **state) {
    tmp_dir *d = *state;
    for (int i = 0; i < d->count; i++)
        unlink(d->files[i]);
    int rc = rmdir(d->path);
    free(d);
    return rc;
}

/* A new file name in the test directory (remembered for removal). */
static const char *file_in(tmp_dir *d, const char *name) {
    assert_true(d->count < 8);
    char path[sizeof d->files[0]];
    snprintf(path, sizeof path, "%s/%s", d->path, name);
    char *p = d->files[d->count++];
    memcpy(p, path, sizeof path);
    return p;
}

/* Writes a .npy as numpy does: magic, version, little-endian header length (2 bytes for
 * 1.0, 4 for 2.0), the dict padded with spaces and ended by '\n' so that the data
 * starts at a multiple of 64, then `data_bytes` bytes of data. */
static void write_by_hand(const char *path, int major, const char *magic, const char *dict,
                          size_t data_bytes) {
    size_t prefix = major == 1 ? 10 : 12, n = strlen(dict);
    size_t hlen = n + 1 + (64 - (prefix + n + 1) % 64) % 64;
    unsigned char *buf = calloc(1, prefix + hlen + data_bytes + 1);
    assert_non_null(buf);
    memcpy(buf, magic, 6);
    buf[6] = (unsigned char)major, buf[7] = 0;
    for (size_t i = 0; i < prefix - 8; i++)
        buf[8 + i] = (unsigned char)(hlen >> (8 * i));
    memcpy(buf + prefix, dict, n);
    memset(buf + prefix + n, ' ', hlen - n - 1);
    buf[prefix + hlen - 1] = '\n';
    for (size_t i = 0; i < data_bytes; i++)
        buf[prefix + hlen + i] = (unsigned char)(i * 37);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(buf, 1, prefix + hlen + data_bytes, f), prefix + hlen + data_bytes);
    assert_int_equal(fclose(f), 0);
    free(buf);
}

static const char *const MAGIC = "\x93NUMPY";
static const int64_t shape_537[3] = {5, 3, 7};
#define BYTES_537 (5 * 3 * 7 * 4)

static void assert_contains(const char *msg, const char *part) {
    if (!strstr(msg, part)) fprintf(stderr, "message \"%s\" lacks \"%s\"\n", msg, part);
    assert_non_null(strstr(msg, part));
}

/* Writes header + data with spar's writer and reads both back. */
static void round_trip(tmp_dir *d, const char *name, int ndim, const int64_t *shape) {
    const char *path = file_in(d, name);
    int64_t count = 1;
    for (int i = 0; i < ndim; i++)
        count *= shape[i];
    float *data = malloc(sizeof *data * (size_t)count),
          *back = malloc(sizeof *back * (size_t)count);
    assert_true(data && back);
    uint32_t bits = 0x12345678u; /* arbitrary patterns, denormals and NaNs included */
    for (int64_t i = 0; i < count; i++) {
        bits = bits * 1664525u + 1013904223u;
        memcpy(&data[i], &bits, sizeof bits);
    }
    data[0] = -0.0f;

    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    assert_true(fd >= 0);
    int64_t offset = spar__npy_write_header(fd, ndim, shape);
    assert_true(offset > 0);
    assert_int_equal(offset % 64, 0);
    size_t bytes = sizeof *data * (size_t)count;
    assert_int_equal(write(fd, data, bytes), (ssize_t)bytes);
    assert_int_equal(close(fd), 0);

    spar_npy_info info;
    spar_err err = {""};
    assert_int_equal(spar__npy_read_info(path, &info, &err), SPAR_OK);
    assert_int_equal(info.ndim, ndim);
    for (int i = 0; i < ndim; i++)
        assert_int_equal(info.shape[i], shape[i]);
    assert_string_equal(info.descr, "<f4");
    assert_false(info.fortran_order);
    assert_int_equal(info.data_offset, offset);
    assert_int_equal(spar__npy_check("data.q", path, ndim, shape, &info, &err), SPAR_OK);

    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    assert_int_equal(fseek(f, (long)info.data_offset, SEEK_SET), 0);
    assert_int_equal(fread(back, sizeof *back, (size_t)count, f), (size_t)count);
    assert_int_equal(fgetc(f), EOF); /* nothing after the data */
    fclose(f);
    assert_memory_equal(back, data, bytes);
    free(data), free(back);
}

static void written_header_and_data_read_back_exactly(void **state) {
    tmp_dir *d = *state;
    round_trip(d, "a.npy", 3, shape_537);
    round_trip(d, "b.npy", 2, (const int64_t[]){9, 2});
    round_trip(d, "c.npy", 1, (const int64_t[]){4}); /* (4,) needs its comma */
}

static void numpy_version_1_and_2_headers_are_accepted(void **state) {
    tmp_dir *d = *state;
    const char *dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (5, 3, 7), }";
    const char *v1 = file_in(d, "v1.npy"), *v2 = file_in(d, "v2.npy");
    write_by_hand(v1, 1, MAGIC, dict, BYTES_537);
    write_by_hand(v2, 2, MAGIC, dict, BYTES_537);
    spar_npy_info info;
    spar_err err = {""};
    assert_int_equal(spar__npy_check("data.q", v1, 3, shape_537, &info, &err), SPAR_OK);
    assert_int_equal(info.data_offset, 128);
    assert_int_equal(spar__npy_check("data.q", v2, 3, shape_537, &info, &err), SPAR_OK);
    assert_int_equal(info.data_offset % 64, 0);
    assert_int_equal(info.ndim, 3);
    assert_int_equal(info.shape[2], 7);
}

static void wrong_magic_is_a_format_error(void **state) {
    tmp_dir *d = *state;
    const char *path = file_in(d, "magic.npy");
    write_by_hand(path, 1, "\x93NUMPZ",
                  "{'descr': '<f4', 'fortran_order': False, 'shape': (5, 3, 7), }", BYTES_537);
    spar_npy_info info;
    spar_err err = {""};
    assert_int_equal(spar__npy_check("data.k", path, 3, shape_537, &info, &err), SPAR_EFORMAT);
    assert_contains(err.msg, "data.k");
    assert_contains(err.msg, path);
}

static void float64_data_is_refused_naming_float32(void **state) {
    tmp_dir *d = *state;
    const char *path = file_in(d, "f8.npy");
    write_by_hand(path, 1, MAGIC, "{'descr': '<f8', 'fortran_order': False, 'shape': (5, 3, 7), }",
                  2 * BYTES_537);
    spar_npy_info info;
    spar_err err = {""};
    assert_int_equal(spar__npy_check("data.v", path, 3, shape_537, &info, &err), SPAR_ESHAPE);
    assert_contains(err.msg, "data.v");
    assert_contains(err.msg, path);
    assert_contains(err.msg, "float32");
    assert_contains(err.msg, "<f8");
}

static void fortran_order_is_refused(void **state) {
    tmp_dir *d = *state;
    const char *path = file_in(d, "fortran.npy");
    write_by_hand(path, 1, MAGIC, "{'descr': '<f4', 'fortran_order': True, 'shape': (5, 3, 7), }",
                  BYTES_537);
    spar_npy_info info;
    spar_err err = {""};
    assert_int_equal(spar__npy_check("data.q", path, 3, shape_537, &info, &err), SPAR_ESHAPE);
    assert_contains(err.msg, "data.q");
    assert_contains(err.msg, "Fortran");
}

static void wrong_shape_is_refused_naming_both_shapes(void **state) {
    tmp_dir *d = *state;
    const char *path = file_in(d, "shape.npy");
    write_by_hand(path, 2, MAGIC, "{'descr': '<f4', 'fortran_order': False, 'shape': (5, 3, 7), }",
                  BYTES_537);
    spar_npy_info info;
    spar_err err = {""};
    const int64_t want[3] = {5, 3, 8};
    assert_int_equal(spar__npy_check("data.k", path, 3, want, &info, &err), SPAR_ESHAPE);
    assert_contains(err.msg, "data.k");
    assert_contains(err.msg, "(5, 3, 7)");
    assert_contains(err.msg, "(5, 3, 8)");
    /* a different rank is a wrong shape too */
    assert_int_equal(spar__npy_check("data.k", path, 2, want, &info, &err), SPAR_ESHAPE);
    assert_contains(err.msg, "(5, 3)");
}

static void truncated_data_is_a_format_error(void **state) {
    tmp_dir *d = *state;
    const char *path = file_in(d, "short.npy");
    write_by_hand(path, 1, MAGIC, "{'descr': '<f4', 'fortran_order': False, 'shape': (5, 3, 7), }",
                  BYTES_537 - 4);
    spar_npy_info info;
    spar_err err = {""};
    assert_int_equal(spar__npy_check("data.q", path, 3, shape_537, &info, &err), SPAR_EFORMAT);
    assert_contains(err.msg, "data.q");
    assert_contains(err.msg, "truncated");
}

static void truncated_header_is_a_format_error(void **state) {
    tmp_dir *d = *state;
    const char *path = file_in(d, "head.npy");
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    static const char head[] = "\x93NUMPY\x01\x00\x76\x00{'descr': '<f4', "; /* 118 promised */
    assert_int_equal(fwrite(head, 1, sizeof head - 1, f), sizeof head - 1);
    fclose(f);
    spar_npy_info info;
    spar_err err = {""};
    assert_int_equal(spar__npy_check("data.v", path, 3, shape_537, &info, &err), SPAR_EFORMAT);
    assert_contains(err.msg, "data.v");
    assert_contains(err.msg, path);
}

static void missing_file_is_an_error_naming_the_path(void **state) {
    tmp_dir *d = *state;
    char path[128];
    snprintf(path, sizeof path, "%s/no-such-file.npy", d->path);
    spar_npy_info info;
    spar_err err = {""};
    assert_int_not_equal(spar__npy_check("data.q", path, 3, shape_537, &info, &err), SPAR_OK);
    assert_contains(err.msg, "data.q");
    assert_contains(err.msg, path);
    assert_int_not_equal(spar__npy_read_info(path, &info, &err), SPAR_OK);
    assert_contains(err.msg, path);
}

/* Found by tests/fuzz/fuzz_npy: the writer cut a long shape short and wrote a header that
 * nothing could read. Eight dimensions of 19 digits must read back. */
static void header_of_eight_long_dimensions_reads_back(void **state) {
    tmp_dir *d = *state;
    const char *path = file_in(d, "long.npy");
    int64_t shape[8];
    for (int i = 0; i < 8; i++)
        shape[i] = INT64_MAX - i;
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    assert_true(fd >= 0);
    int64_t offset = spar__npy_write_header_as(fd, "<i4", 8, shape);
    assert_int_equal(close(fd), 0);
    assert_true(offset > 0);
    spar_npy_info info;
    spar_err err = {""};
    assert_int_equal(spar__npy_read_info(path, &info, &err), SPAR_OK);
    assert_int_equal(info.ndim, 8);
    for (int i = 0; i < 8; i++)
        assert_true(info.shape[i] == shape[i]);
    assert_string_equal(info.descr, "<i4");
    assert_int_equal(info.data_offset, offset);
}

/* Every prefix of a valid file is refused, reading nothing past its end (each prefix is
 * its own allocation, so that AddressSanitizer sees an overread); a version-0 prefix of
 * 11 bytes once made the reader look at bytes 10 and 11 (tests/fuzz, regression-*). */
static void every_prefix_of_a_header_is_refused(void **state) {
    (void)state;
    static const char dict[] = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }";
    unsigned char whole[128];
    memset(whole, ' ', sizeof whole);
    memcpy(whole, "\x93NUMPY\x02\x00\x74\x00\x00\x00", 12); /* 2.0: 116-byte header */
    memcpy(whole + 12, dict, sizeof dict - 1);
    whole[127] = '\n';
    spar_npy_info info;
    spar_err err = {""};
    assert_int_equal(spar__npy_parse_info(whole, sizeof whole, "whole", &info, &err), SPAR_OK);
    assert_int_equal(info.data_offset, 128);
    for (size_t len = 0; len < sizeof whole; len++) {
        unsigned char *part = malloc(len + 1);
        assert_non_null(part);
        memcpy(part, whole, len);
        assert_int_equal(spar__npy_parse_info(part, len, "part", &info, &err), SPAR_EFORMAT);
        free(part);
    }
    static const unsigned char v0[11] = "\x93NUMPY\x00PY\x00N";
    assert_int_equal(spar__npy_parse_info(v0, sizeof v0, "v0", &info, &err), SPAR_EFORMAT);
    assert_contains(err.msg, "version 0");
}

/* The header's keys are found by their text: a descr naming a key (found by tests/fuzz)
 * is no dtype, and is refused rather than read as one. */
static void descr_must_be_a_type_string(void **state) {
    (void)state;
    static const char *const descrs[] = {"fortran_order", "shape", "", "<", "f4", "<f 4"};
    for (size_t i = 0; i < sizeof descrs / sizeof *descrs; i++) {
        char head[128];
        memcpy(head, "\x93NUMPY\x01\x00\x76\x00", 10); /* 1.0, 118-byte header */
        int n = snprintf(head + 10, sizeof head - 10,
                         "{'descr': '%s', 'fortran_order': False, 'shape': (1,), }", descrs[i]);
        memset(head + 10 + n, ' ', sizeof head - 10 - (size_t)n - 1);
        head[127] = '\n';
        spar_npy_info info;
        spar_err err = {""};
        assert_int_equal(
            spar__npy_parse_info((const unsigned char *)head, sizeof head, "d", &info, &err),
            SPAR_EFORMAT);
    }
}

#define DIR_TEST(f) cmocka_unit_test_setup_teardown(f, setup_dir, teardown_dir)

int main(void) {
    const struct CMUnitTest tests[] = {
        DIR_TEST(written_header_and_data_read_back_exactly),
        DIR_TEST(numpy_version_1_and_2_headers_are_accepted),
        DIR_TEST(wrong_magic_is_a_format_error),
        DIR_TEST(float64_data_is_refused_naming_float32),
        DIR_TEST(fortran_order_is_refused),
        DIR_TEST(wrong_shape_is_refused_naming_both_shapes),
        DIR_TEST(truncated_data_is_a_format_error),
        DIR_TEST(truncated_header_is_a_format_error),
        DIR_TEST(missing_file_is_an_error_naming_the_path),
        DIR_TEST(header_of_eight_long_dimensions_reads_back),
        cmocka_unit_test(every_prefix_of_a_header_is_refused),
        cmocka_unit_test(descr_must_be_a_type_string),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
