/* validate_generate.c: the rules of run.mode=generate (greedy decoding with a decoder
 * model), checked on rank 0 before anything is loaded; "auto" and 0 defaults resolved
 * here so that every rank and every record sees the same model. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <sys/stat.h>
#include <unistd.h>

#include "launcher.h"

#define MAX_LENGTHS 256

double spar__host_memory_bytes(void); /* validate.c: physical memory of this host */

/* workload.prompt_lengths into values: their count, or -1 if the list is not up to
 * MAX_LENGTHS comma-separated integers from 1 to 2^30. */
static int parse_lengths(const spar_config *cfg, int64_t values[MAX_LENGTHS]) {
    const char *p = cfg->v[SPAR_KEY_WORK_PROMPT_LENGTHS].s;
    int count = 0;
    while (*p) {
        char *end;
        long long v = strtoll(p, &end, 10);
        if (end == p || v < 1 || v > (1LL << 30) || (*end && *end != ',') || count == MAX_LENGTHS)
            return -1;
        values[count++] = v;
        p = *end ? end + 1 : end;
    }
    return count;
}

int64_t spar__prompt_length(const spar_config *cfg, int b) {
    int64_t values[MAX_LENGTHS];
    int n = parse_lengths(cfg, values);
    return n > 0 ? values[b % n] : 0;
}

static int check_lengths(const spar_config *cfg, spar_err *err) {
    int64_t values[MAX_LENGTHS];
    int n = parse_lengths(cfg, values);
    if (n < 0)
        return spar__err_set(err, SPAR_EINVAL,
                             "key workload.prompt_lengths: '%s' (allowed: up to %d "
                             "comma-separated integers from 1 to 2^30)",
                             cfg->v[SPAR_KEY_WORK_PROMPT_LENGTHS].s, MAX_LENGTHS);
    if (n == 0)
        return spar__err_set(err, SPAR_EINVAL,
                             "key workload.prompt_lengths: empty (allowed: integers >= 1)");
    return SPAR_OK;
}

static int check_model(spar_config *cfg, spar_err *err) {
    int64_t d = cfg->v[SPAR_KEY_ATTN_HEAD_DIM].i, h = cfg->v[SPAR_KEY_ATTN_HEADS].i;
    if (d % 2 != 0)
        return spar__err_set(err, SPAR_EINVAL,
                             "key attention.head_dim: %lld with run.mode=generate (allowed: an "
                             "even number; RoPE rotates pairs)",
                             (long long)d);
    if (strcmp(cfg->v[SPAR_KEY_ATTN_TYPE].s, "softmax") != 0 || !cfg->v[SPAR_KEY_ATTN_CAUSAL].b)
        return spar__err_set(err, SPAR_EINVAL,
                             "keys attention.type/causal: %s/%s with run.mode=generate "
                             "(allowed: softmax/true; the decoder is causal softmax attention)",
                             cfg->v[SPAR_KEY_ATTN_TYPE].s,
                             cfg->v[SPAR_KEY_ATTN_CAUSAL].b ? "true" : "false");
    if (h / cfg->v[SPAR_KEY_ATTN_KV_HEADS].i > 64)
        return spar__err_set(err, SPAR_EUNSUP,
                             "keys attention.heads/kv_heads: %lld query heads per kv head with "
                             "run.mode=generate (allowed: at most 64)",
                             (long long)(h / cfg->v[SPAR_KEY_ATTN_KV_HEADS].i));
    if (cfg->v[SPAR_KEY_MODEL_HIDDEN].i == 0) cfg->v[SPAR_KEY_MODEL_HIDDEN].i = h * d;
    if (cfg->v[SPAR_KEY_MODEL_FFN].i == 0)
        cfg->v[SPAR_KEY_MODEL_FFN].i = (8 * cfg->v[SPAR_KEY_MODEL_HIDDEN].i / 3 + 7) / 8 * 8;
    const char *dir = cfg->v[SPAR_KEY_MODEL_WEIGHTS].s;
    struct stat st;
    if (*dir && (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)))
        return spar__err_set(err, SPAR_EIO,
                             "key model.weights: '%s' is not a directory (allowed: a directory "
                             "of .npy files, see configs/README.md)",
                             dir);
    return SPAR_OK;
}

static int check_method(spar_config *cfg, int world, spar_err *err) {
    char *method = cfg->v[SPAR_KEY_PAR_METHOD].s;
    int64_t k = cfg->v[SPAR_KEY_PAR_ATTN_RANKS].i;
    if (strcmp(method, "auto") == 0)
        snprintf(method, sizeof cfg->v[0].s, "%s", world == 1 ? "local" : "offload");
    if (strcmp(method, "local") != 0 && strcmp(method, "offload") != 0)
        return spar__err_set(err, SPAR_EINVAL,
                             "key parallel.method: '%s' with run.mode=generate (allowed: "
                             "offload|local)",
                             method);
    int64_t want = cfg->v[SPAR_KEY_PAR_RANKS].i, p = world > 0 ? world : want;
    SPAR_TRY(spar__check_plan_ranks(cfg, world, err));
    if (strcmp(method, "offload") == 0 && p > 0 && k >= p)
        return spar__err_set(err, SPAR_EINVAL,
                             "key parallel.attention_ranks: %lld in a job of %lld ranks "
                             "(allowed: 1 to %lld, leaving at least one compute rank)",
                             (long long)k, (long long)p, (long long)(p - 1));
    const char *prefill = cfg->v[SPAR_KEY_PAR_PREFILL].s;
    if (strcmp(prefill, "local") != 0 && strcmp(method, "offload") != 0)
        return spar__err_set(err, SPAR_EINVAL,
                             "key parallel.prefill: '%s' with parallel.method=%s (allowed: local; "
                             "prompts are shared between compute ranks only with offload)",
                             prefill, method);
    return SPAR_OK;
}

/* The weights on a compute rank and the KV cache on an attention rank (or both on the
 * one rank of a local run) must fit this host's memory: refused here with the sizes,
 * rather than failing an allocation later. */
static int check_memory(const spar_config *cfg, spar_err *err) {
    double D = (double)cfg->v[SPAR_KEY_MODEL_HIDDEN].i, F = (double)cfg->v[SPAR_KEY_MODEL_FFN].i;
    double V = (double)cfg->v[SPAR_KEY_MODEL_VOCAB].i, L = (double)cfg->v[SPAR_KEY_MODEL_LAYERS].i;
    double d = (double)cfg->v[SPAR_KEY_ATTN_HEAD_DIM].i, H = (double)cfg->v[SPAR_KEY_ATTN_HEADS].i;
    double G = (double)cfg->v[SPAR_KEY_ATTN_KV_HEADS].i, B = (double)cfg->v[SPAR_KEY_WORK_BATCH].i;
    int64_t values[MAX_LENGTHS];
    double longest = 0;
    for (int i = 0, n = parse_lengths(cfg, values); i < n; i++)
        longest = (double)values[i] > longest ? (double)values[i] : longest;
    double weights =
        4.0 * (2 * V * D + D + L * (2 * D + 2 * D * H * d + 2 * D * G * d + 3 * D * F));
    double cache = 4.0 * 2 * B * (longest + (double)cfg->v[SPAR_KEY_WORK_GENERATE].i) * L * G * d;
    bool offload = strcmp(cfg->v[SPAR_KEY_PAR_METHOD].s, "offload") == 0;
    double k = (double)cfg->v[SPAR_KEY_PAR_ATTN_RANKS].i, host = spar__host_memory_bytes();
    double need = offload ? fmax(weights, cache / k) : weights + cache;
    if (host <= 0 || need <= host) return SPAR_OK;
    return spar__err_set(
        err, SPAR_EINVAL,
        "model and workload: a rank would hold %.3g GiB (weights %.3g GiB%s, KV "
        "cache %.3g GiB%s) but this host has %.3g GiB of memory (allowed: smaller "
        "model.* or workload.* values%s)",
        need / 1073741824.0, weights / 1073741824.0, offload ? " per compute rank" : "",
        (offload ? cache / k : cache) / 1073741824.0, offload ? " per attention rank" : "",
        host / 1073741824.0, offload ? ", or more attention ranks" : "");
}

int spar__validate_generate(spar_config *cfg, int world_size, spar_err *err) {
    if (!spar_kernels_select(cfg->v[SPAR_KEY_RUN_KERNEL].s) ||
        strcmp(cfg->v[SPAR_KEY_RUN_KERNEL].s, "none") == 0)
        return spar__err_set(err, SPAR_EUNSUP,
                             "key run.kernel: '%s' with run.mode=generate (allowed: %s, not none)",
                             cfg->v[SPAR_KEY_RUN_KERNEL].s, spar_kernels_names());
    if (strcmp(cfg->v[SPAR_KEY_RUN_DEVICE].s, "cpu") != 0)
        return spar__err_set(err, SPAR_EUNSUP,
                             "key run.device: '%s' with run.mode=generate (allowed: cpu)",
                             cfg->v[SPAR_KEY_RUN_DEVICE].s);
    SPAR_TRY(spar__check_heads(cfg, err));
    SPAR_TRY(check_model(cfg, err));
    SPAR_TRY(check_lengths(cfg, err));
    SPAR_TRY(check_method(cfg, world_size, err));
    SPAR_TRY(check_memory(cfg, err));
    static const int outputs[] = {SPAR_KEY_OUT_TOKENS, SPAR_KEY_OUT_LOGITS, SPAR_KEY_OUT_RESULTS};
    for (size_t i = 0; i < sizeof outputs / sizeof outputs[0]; i++)
        if (*cfg->v[outputs[i]].s)
            SPAR_TRY(spar__check_writable(spar__keys[outputs[i]].name, cfg->v[outputs[i]].s, err));
    return SPAR_OK;
}
