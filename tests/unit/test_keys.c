/* test_keys.c: the key table and everything it drives (launcher/keys.c, config_yaml.c,
 * validate.c, plan.c): defaults, --set, experiment files, cross-key validation and the
 * RunPlan every rank receives.
 *
 * Error paths are tested through their messages: a user who typed a bad value must be
 * told the key, the value and what is allowed. Files live in a mkdtemp directory under
 * /tmp that the group teardown removes.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <unistd.h>

#include <cmocka.h>

#include "launcher.h"    // defines: spar__keys, spar_config, spar__config_*, spar__plan_*
#include "spar_status.h" // defines: SPAR_EINVAL, SPAR_EUNSUP, SPAR_EFORMAT

static char dir[64];
static char files[16][128];
static int file_count;

static int setup_dir(void **state) {
    (void)state;
    snprintf(dir, sizeof dir, "/tmp/spar-test-keys-XXXXXX");
    return mkdtemp(dir) ? 0 : -1;
}

static int teardown_dir(void **state) {
    (void)state;
    for (int i = 0; i < file_count; i++)
        unlink(files[i]);
    return rmdir(dir);
}

/* Writes text to a new file in the test directory and returns its path. */
static const char *yaml_file(const char *name, const char *text) {
    assert_true(file_count < 16);
    char *path = files[file_count++];
    snprintf(path, sizeof files[0], "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(fputs(text, f) >= 0, 1);
    assert_int_equal(fclose(f), 0);
    return path;
}

static void assert_contains(const char *msg, const char *part) {
    if (!strstr(msg, part)) fprintf(stderr, "message \"%s\" lacks \"%s\"\n", msg, part);
    assert_non_null(strstr(msg, part));
}

static const char *formatted(const spar_config *cfg, int id) {
    static char text[1100];
    spar__value_format(cfg, id, text, sizeof text);
    return text;
}

/* --- the key table and --set --------------------------------------------------------- */

static void every_default_parses_and_its_formatted_text_round_trips(void **state) {
    (void)state;
    static spar_config cfg;
    spar_err err = {""};
    for (int id = 0; id < SPAR_KEY_COUNT; id++) {
        const spar_key *k = &spar__keys[id];
        assert_int_equal(spar__key_find(k->name), id);
        spar__config_defaults(&cfg);
        assert_int_equal(cfg.origin[id], SPAR_FROM_DEFAULT);
        if (spar__config_set(&cfg, k->name, k->def, SPAR_FROM_DEFAULT, 0, &err) != 0)
            fprintf(stderr, "default of %s: %s\n", k->name, err.msg);
        assert_int_equal(spar__config_set(&cfg, k->name, k->def, SPAR_FROM_DEFAULT, 0, &err), 0);

        spar__config_defaults(&cfg);
        char text[1100];
        snprintf(text, sizeof text, "%s", formatted(&cfg, id));
        if (spar__config_set(&cfg, k->name, text, SPAR_FROM_COMMAND_LINE, 0, &err) != 0)
            fprintf(stderr, "formatted default of %s ('%s'): %s\n", k->name, text, err.msg);
        assert_int_equal(spar__config_set(&cfg, k->name, text, SPAR_FROM_COMMAND_LINE, 0, &err), 0);
        assert_string_equal(formatted(&cfg, id), text);
    }
}

static void set_arg_sets_the_value_and_records_the_command_line(void **state) {
    (void)state;
    static spar_config cfg;
    spar_err err = {""};
    spar__config_defaults(&cfg);
    assert_int_equal(spar__config_set_arg(&cfg, "attention.heads=16", &err), SPAR_OK);
    assert_int_equal(cfg.v[SPAR_KEY_ATTN_HEADS].i, 16);
    assert_int_equal(cfg.origin[SPAR_KEY_ATTN_HEADS], SPAR_FROM_COMMAND_LINE);
    assert_string_equal(spar__origin_name(SPAR_FROM_COMMAND_LINE), "--set");
    assert_int_equal(spar__config_set_arg(&cfg, "attention.causal=false", &err), SPAR_OK);
    assert_false(cfg.v[SPAR_KEY_ATTN_CAUSAL].b);
    assert_int_equal(spar__config_set_arg(&cfg, "run.name=a=b", &err), SPAR_OK);
    assert_string_equal(cfg.v[SPAR_KEY_RUN_NAME].s, "a=b"); /* split at the first '=' */
}

static void binary_suffix_k_multiplies_by_1024(void **state) {
    (void)state;
    static spar_config cfg;
    spar_err err = {""};
    spar__config_defaults(&cfg);
    assert_int_equal(spar__config_set_arg(&cfg, "sequence.length=32K", &err), SPAR_OK);
    assert_int_equal(cfg.v[SPAR_KEY_SEQ_LENGTH].i, 32768);
    assert_int_equal(spar__config_set_arg(&cfg, "sequence.length=2M", &err), SPAR_OK);
    assert_int_equal(cfg.v[SPAR_KEY_SEQ_LENGTH].i, 2 * 1024 * 1024);
}

static void unknown_key_suggests_the_nearest_key(void **state) {
    (void)state;
    static spar_config cfg;
    spar_err err = {""};
    spar__config_defaults(&cfg);
    assert_int_equal(spar__config_set_arg(&cfg, "attention.head=16", &err), SPAR_EINVAL);
    assert_contains(err.msg, "attention.head'");
    assert_contains(err.msg, "attention.heads");
}

static void wrong_type_names_key_value_and_what_is_allowed(void **state) {
    (void)state;
    static spar_config cfg;
    spar_err err = {""};
    spar__config_defaults(&cfg);
    assert_int_equal(spar__config_set_arg(&cfg, "attention.heads=abc", &err), SPAR_EINVAL);
    assert_contains(err.msg, "attention.heads");
    assert_contains(err.msg, "abc");
    assert_contains(err.msg, "allowed");
    assert_int_equal(cfg.v[SPAR_KEY_ATTN_HEADS].i, 8); /* a refused value changes nothing */
    assert_int_equal(cfg.origin[SPAR_KEY_ATTN_HEADS], SPAR_FROM_DEFAULT);

    assert_int_equal(spar__config_set_arg(&cfg, "attention.causal=maybe", &err), SPAR_EINVAL);
    assert_contains(err.msg, "attention.causal");
    assert_contains(err.msg, "maybe");
    assert_contains(err.msg, "allowed");

    assert_int_equal(spar__config_set_arg(&cfg, "attention.heads=0", &err), SPAR_EINVAL);
    assert_contains(err.msg, "out of range");
    assert_int_equal(spar__config_set_arg(&cfg, "attention.scale=fast", &err), SPAR_EINVAL);
    assert_contains(err.msg, "attention.scale");
}

static void enum_value_outside_the_allowed_list_is_refused(void **state) {
    (void)state;
    static spar_config cfg;
    spar_err err = {""};
    spar__config_defaults(&cfg);
    assert_int_equal(spar__config_set_arg(&cfg, "sequence.partition=diagonal", &err), SPAR_EINVAL);
    assert_contains(err.msg, "sequence.partition");
    assert_contains(err.msg, "diagonal");
    assert_contains(err.msg, "contiguous|zigzag|stripe");
    assert_string_equal(cfg.v[SPAR_KEY_SEQ_PARTITION].s, "auto");
    /* a prefix of an allowed value is not allowed */
    assert_int_equal(spar__config_set_arg(&cfg, "sequence.partition=zig", &err), SPAR_EINVAL);
}

static void set_without_equals_sign_is_refused(void **state) {
    (void)state;
    static spar_config cfg;
    spar_err err = {""};
    spar__config_defaults(&cfg);
    assert_int_equal(spar__config_set_arg(&cfg, "attention.heads", &err), SPAR_EINVAL);
    assert_contains(err.msg, "KEY=VALUE");
    assert_int_equal(spar__config_set_arg(&cfg, "=16", &err), SPAR_EINVAL);
}

/* --- experiment files ------------------------------------------------------------------ */

static void yaml_nested_and_dotted_keys_load_and_set_wins_over_file(void **state) {
    (void)state;
    static spar_config cfg;
    spar_err err = {""};
    const char *path = yaml_file("good.yaml", "# an experiment\n"
                                              "attention:\n"
                                              "  heads: 16\n"
                                              "  kv_heads: 4\n"
                                              "sequence.length: 8K\n"
                                              "run:\n"
                                              "  name: \"my run\"\n"
                                              "parallel.method: local\n");
    spar__config_defaults(&cfg);
    int rc = spar__config_load_yaml(&cfg, path, &err);
    if (rc != 0) fprintf(stderr, "%s\n", err.msg);
    assert_int_equal(rc, SPAR_OK);
    assert_int_equal(cfg.v[SPAR_KEY_ATTN_HEADS].i, 16);
    assert_int_equal(cfg.origin[SPAR_KEY_ATTN_HEADS], SPAR_FROM_FILE);
    assert_int_equal(cfg.line[SPAR_KEY_ATTN_HEADS], 3);
    assert_int_equal(cfg.v[SPAR_KEY_ATTN_KV_HEADS].i, 4);
    assert_int_equal(cfg.v[SPAR_KEY_SEQ_LENGTH].i, 8192);
    assert_int_equal(cfg.line[SPAR_KEY_SEQ_LENGTH], 5);
    assert_string_equal(cfg.v[SPAR_KEY_RUN_NAME].s, "my run");
    assert_string_equal(cfg.v[SPAR_KEY_PAR_METHOD].s, "local");
    assert_int_equal(cfg.origin[SPAR_KEY_ATTN_CAUSAL], SPAR_FROM_DEFAULT);
    assert_string_equal(cfg.file, path);

    assert_int_equal(spar__config_set_arg(&cfg, "attention.heads=32", &err), SPAR_OK);
    assert_int_equal(cfg.v[SPAR_KEY_ATTN_HEADS].i, 32);
    assert_int_equal(cfg.origin[SPAR_KEY_ATTN_HEADS], SPAR_FROM_COMMAND_LINE);
}

/* Loads text and expects failure with `status` and each of the parts in the message. */
static void expect_yaml_error(const char *name, const char *text, int status, const char *part1,
                              const char *part2) {
    static spar_config cfg;
    spar_err err = {""};
    const char *path = yaml_file(name, text);
    spar__config_defaults(&cfg);
    int rc = spar__config_load_yaml(&cfg, path, &err);
    if (rc != status) fprintf(stderr, "%s: status %d, message \"%s\"\n", name, rc, err.msg);
    assert_int_equal(rc, status);
    assert_contains(err.msg, path);
    assert_contains(err.msg, part1);
    if (part2) assert_contains(err.msg, part2);
}

static void yaml_errors_name_the_file_and_line(void **state) {
    (void)state;
    expect_yaml_error("syntax.yaml", "attention:\n  heads: 8\n  causal: true: false\n",
                      SPAR_EFORMAT, ":3:", NULL);
    expect_yaml_error("list.yaml", "attention:\n  heads: [8, 16]\n", SPAR_EINVAL, ":2:", "list");
    expect_yaml_error("twice.yaml", "attention:\n  heads: 8\nattention.heads: 16\n", SPAR_EINVAL,
                      "attention.heads", "lines 2 and 3");
    expect_yaml_error("unknown.yaml", "attention:\n  causal: true\n  head: 8\n", SPAR_EINVAL,
                      ":3:", "attention.heads");
    expect_yaml_error("badvalue.yaml", "sequence:\n  length: lots\n", SPAR_EINVAL,
                      ":2:", "sequence.length");
}

static void yaml_missing_file_is_an_io_error(void **state) {
    (void)state;
    static spar_config cfg;
    spar_err err = {""};
    char path[128];
    snprintf(path, sizeof path, "%s/absent.yaml", dir);
    spar__config_defaults(&cfg);
    assert_int_equal(spar__config_load_yaml(&cfg, path, &err), SPAR_EIO);
    assert_contains(err.msg, path);
}

/* --- validation ------------------------------------------------------------------------ */

/* Defaults plus the given --set assignments (NULL-terminated). */
static void config_with(spar_config *cfg, const char *const *sets) {
    spar_err err = {""};
    spar__config_defaults(cfg);
    for (int i = 0; sets[i]; i++) {
        if (spar__config_set_arg(cfg, sets[i], &err) != 0)
            fprintf(stderr, "%s: %s\n", sets[i], err.msg);
        assert_int_equal(spar__config_set_arg(cfg, sets[i], &err), 0);
    }
}

static void expect_invalid(const char *const *sets, int world, int status, const char *part1,
                           const char *part2) {
    static spar_config cfg;
    spar_err err = {""};
    config_with(&cfg, sets);
    assert_int_equal(spar__config_validate(&cfg, world, &err), status);
    assert_contains(err.msg, part1);
    if (part2) assert_contains(err.msg, part2);
}

static void validate_accepts_defaults_and_resolves_kv_heads_zero_to_heads(void **state) {
    (void)state;
    static spar_config cfg;
    spar_err err = {""};
    config_with(&cfg, (const char *[]){"attention.heads=12", NULL});
    assert_int_equal(cfg.v[SPAR_KEY_ATTN_KV_HEADS].i, 0);
    assert_int_equal(spar__config_validate(&cfg, 4, &err), SPAR_OK);
    assert_int_equal(cfg.v[SPAR_KEY_ATTN_KV_HEADS].i, 12);
    config_with(&cfg, (const char *[]){NULL});
    assert_int_equal(spar__config_validate(&cfg, 0, &err), SPAR_OK);
}

/* "auto" method and partition resolve by attention type and mask, before the plan goes out. */
static void validate_resolves_auto_method_and_partition_by_type(void **state) {
    (void)state;
    static const struct {
        const char *sets[3], *method, *partition;
    } cases[] = {
        {{NULL}, "ring", "zigzag"},
        {{"attention.causal=false", NULL}, "ring", "contiguous"},
        {{"attention.type=linear", NULL}, "lasp2", "contiguous"},
        {{"attention.type=linear", "parallel.method=lasp1", NULL}, "lasp1", "contiguous"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        static spar_config cfg;
        spar_err err = {""};
        config_with(&cfg, cases[i].sets);
        assert_int_equal(spar__config_validate(&cfg, 2, &err), SPAR_OK);
        assert_string_equal(cfg.v[SPAR_KEY_PAR_METHOD].s, cases[i].method);
        assert_string_equal(cfg.v[SPAR_KEY_SEQ_PARTITION].s, cases[i].partition);
    }
}

static void validate_refuses_inconsistent_settings_with_the_key_named(void **state) {
    (void)state;
    expect_invalid((const char *[]){"attention.heads=8", "attention.kv_heads=3", NULL}, 1,
                   SPAR_EINVAL, "attention.kv_heads", NULL);
    expect_invalid((const char *[]){"attention.heads=8", "attention.kv_heads=16", NULL}, 1,
                   SPAR_EINVAL, "attention.kv_heads", NULL);
    expect_invalid((const char *[]){"sequence.length=3", NULL}, 4, SPAR_EINVAL, "sequence.length",
                   NULL);
    expect_invalid((const char *[]){"sequence.length=3", "parallel.ranks=4", NULL}, 0, SPAR_EINVAL,
                   "sequence.length", NULL);
    expect_invalid((const char *[]){"parallel.ranks=4", NULL}, 2, SPAR_EINVAL, "parallel.ranks",
                   "-np 4");
    expect_invalid((const char *[]){"attention.type=linear", "parallel.method=ring", NULL}, 1,
                   SPAR_EINVAL, "parallel.method", "lasp2|lasp1|local");
    expect_invalid((const char *[]){"parallel.method=lasp1", NULL}, 1, SPAR_EINVAL,
                   "parallel.method", "ring|allgather|local");
    expect_invalid((const char *[]){"attention.type=linear", "sequence.partition=stripe", NULL}, 1,
                   SPAR_EINVAL, "sequence.partition", "contiguous");
    expect_invalid((const char *[]){"attention.decay=0.5", NULL}, 1, SPAR_EINVAL, "attention.decay",
                   "linear");
}

static void validate_refuses_output_in_a_missing_directory(void **state) {
    (void)state;
    char set[256];
    snprintf(set, sizeof set, "output.o=%s/no-such-dir/o.npy", dir);
    expect_invalid((const char *[]){set, NULL}, 1, SPAR_EIO, "output.o", "no-such-dir");
    snprintf(set, sizeof set, "output.o=%s/o.npy", dir); /* an existing directory is fine */
    static spar_config cfg;
    spar_err err = {""};
    config_with(&cfg, (const char *[]){set, NULL});
    assert_int_equal(spar__config_validate(&cfg, 1, &err), SPAR_OK);
}

/* --- the run plan ------------------------------------------------------------------------ */

static void plan_pack_then_unpack_gives_every_key_back(void **state) {
    (void)state;
    static spar_config sent, got;
    spar_err err = {""};
    const char *const variants[][8] = {
        {NULL},
        {"attention.heads=16", "attention.kv_heads=4", "attention.scale=0.125",
         "attention.causal=false", "run.name=hello world", "data.seed=9007199254740991",
         "run.verify_tol=3e-5", NULL},
    };
    for (size_t vi = 0; vi < sizeof variants / sizeof variants[0]; vi++) {
        config_with(&sent, variants[vi]);
        snprintf(sent.file, sizeof sent.file, "experiments/x.yaml");
        uint8_t *buf = NULL;
        size_t len = 0;
        assert_int_equal(spar__plan_pack(&sent, 4, &buf, &len), SPAR_OK);
        memset(&got, 0x5a, sizeof got); /* garbage that unpack must overwrite */
        assert_int_equal(spar__plan_unpack(&got, buf, len, 0, &err), SPAR_OK);
        for (int id = 0; id < SPAR_KEY_COUNT; id++) {
            char want[1100];
            snprintf(want, sizeof want, "%s", formatted(&sent, id));
            assert_string_equal(formatted(&got, id), want);
        }
        assert_string_equal(got.file, sent.file);
        free(buf);
    }
}

static void plan_unpack_refuses_garbage_and_truncated_messages(void **state) {
    (void)state;
    static spar_config cfg;
    spar_err err = {""};
    uint8_t junk[64];
    memset(junk, 0xff, sizeof junk);
    assert_int_equal(spar__plan_unpack(&cfg, junk, sizeof junk, 0, &err), SPAR_EFORMAT);
    assert_true(err.msg[0] != '\0');
    uint64_t x = 88172645463325252ull;
    for (int trial = 0; trial < 200; trial++) {
        for (size_t i = 0; i < sizeof junk; i++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            junk[i] = (uint8_t)x;
        }
        assert_int_equal(spar__plan_unpack(&cfg, junk, 1 + (size_t)trial % sizeof junk, 0, &err),
                         SPAR_EFORMAT);
    }
    spar__config_defaults(&cfg);
    uint8_t *buf = NULL;
    size_t len = 0;
    assert_int_equal(spar__plan_pack(&cfg, 2, &buf, &len), SPAR_OK);
    for (size_t cut = 0; cut < len; cut++)
        assert_int_equal(spar__plan_unpack(&cfg, buf, cut, 0, &err), SPAR_EFORMAT);
    free(buf);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(every_default_parses_and_its_formatted_text_round_trips),
        cmocka_unit_test(set_arg_sets_the_value_and_records_the_command_line),
        cmocka_unit_test(binary_suffix_k_multiplies_by_1024),
        cmocka_unit_test(unknown_key_suggests_the_nearest_key),
        cmocka_unit_test(wrong_type_names_key_value_and_what_is_allowed),
        cmocka_unit_test(enum_value_outside_the_allowed_list_is_refused),
        cmocka_unit_test(set_without_equals_sign_is_refused),
        cmocka_unit_test(yaml_nested_and_dotted_keys_load_and_set_wins_over_file),
        cmocka_unit_test(yaml_errors_name_the_file_and_line),
        cmocka_unit_test(yaml_missing_file_is_an_io_error),
        cmocka_unit_test(validate_accepts_defaults_and_resolves_kv_heads_zero_to_heads),
        cmocka_unit_test(validate_resolves_auto_method_and_partition_by_type),
        cmocka_unit_test(validate_refuses_inconsistent_settings_with_the_key_named),
        cmocka_unit_test(validate_refuses_output_in_a_missing_directory),
        cmocka_unit_test(plan_pack_then_unpack_gives_every_key_back),
        cmocka_unit_test(plan_unpack_refuses_garbage_and_truncated_messages),
    };
    return cmocka_run_group_tests(tests, setup_dir, teardown_dir);
}
