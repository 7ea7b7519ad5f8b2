/* model_io.c: a decoder's weights and a workload's prompts, from files or from the seed.
 *
 * Weights (model.weights, a directory; all float32, C order, x W convention):
 *   embed.npy [V, D]   final_norm.npy [D]   lm_head.npy [D, V]
 *   layers.L.attn_norm.npy [D]   layers.L.wq.npy [D, H d]   layers.L.wk.npy [D, G d]
 *   layers.L.wv.npy [D, G d]     layers.L.wo.npy [H d, D]   layers.L.ffn_norm.npy [D]
 *   layers.L.w_gate.npy [D, F]   layers.L.w_up.npy [D, F]   layers.L.w_down.npy [F, D]
 * Without a directory every tensor is random from data.seed: matrices normal with
 * standard deviation 1/sqrt(rows), norms 1 + 0.1 normal, the embedding standard normal.
 *
 * Prompts (workload.prompts): int32 [B, L], one row per request, a shorter prompt ending
 * at its first -1. Without a file, request b gets a random prompt of the b-th length of
 * workload.prompt_lengths (cycled).
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "launcher.h"

enum { PER_LAYER = 9 };
static const char *layer_names[PER_LAYER] = {"attn_norm", "wq",     "wk",   "wv",    "wo",
                                             "ffn_norm",  "w_gate", "w_up", "w_down"};

/* Shape of layer tensor i: rows, cols (cols 0: a vector of rows). */
static void layer_shape(const spar_model_dims *md, int i, int64_t *rows, int64_t *cols) {
    int64_t D = md->hidden, hd = (int64_t)md->heads * md->head_dim,
            gd = (int64_t)md->kv_heads * md->head_dim, F = md->ffn;
    const int64_t shapes[PER_LAYER][2] = {{D, 0}, {D, hd}, {D, gd}, {D, gd}, {hd, D},
                                          {D, 0}, {D, F},  {D, F},  {F, D}};
    *rows = shapes[i][0], *cols = shapes[i][1];
}

/* One tensor: read from dir/name.npy, or random (stream picks it). */
static int tensor(const spar_config *cfg, const char *name, int64_t rows, int64_t cols,
                  uint64_t stream, float **out) {
    const char *dir = cfg->v[SPAR_KEY_MODEL_WEIGHTS].s;
    int64_t width = cols ? cols : 1, shape[2] = {rows, cols};
    float *t = malloc(sizeof(float) * (size_t)(rows * width));
    if (!(*out = t))
        return spar_errorf(SPAR_ENOMEM, "model: cannot allocate %s (%.3g MiB)", name,
                           (double)(rows * width) * 4.0 / 1048576.0);
    spar_partition whole;
    spar_partition_init(&whole, SPAR_PARTITION_CONTIGUOUS, rows, 1);
    spar_row_source src = {.seed = (uint64_t)cfg->v[SPAR_KEY_DATA_SEED].i, .stream = stream};
    char path[2048];
    if (*dir) {
        spar_npy_info info;
        spar_err err;
        snprintf(path, sizeof path, "%s/%s.npy", dir, name);
        if (spar__npy_check("model.weights", path, cols ? 2 : 1, shape, &info, &err) != 0)
            return spar_errorf(SPAR_ESHAPE, "%s", err.msg);
        src.path = path, src.data_offset = info.data_offset;
        return spar__rows_fill(&src, &whole, 0, width, t);
    }
    SPAR_TRY(spar__rows_fill(&src, &whole, 0, width, t));
    bool norm = cols == 0, embed = strcmp(name, "embed") == 0;
    float scale = norm ? 0.1f : embed ? 1.0f : (float)(1.0 / sqrt((double)rows));
    for (int64_t i = 0; i < rows * width; i++)
        t[i] = (norm ? 1.0f : 0.0f) + scale * t[i];
    return SPAR_OK;
}

void spar__model_dims_of(const spar_config *cfg, spar_model_dims *md) {
    *md = (spar_model_dims){.layers = (int)cfg->v[SPAR_KEY_MODEL_LAYERS].i,
                            .hidden = (int)cfg->v[SPAR_KEY_MODEL_HIDDEN].i,
                            .heads = (int)cfg->v[SPAR_KEY_ATTN_HEADS].i,
                            .kv_heads = (int)cfg->v[SPAR_KEY_ATTN_KV_HEADS].i,
                            .head_dim = (int)cfg->v[SPAR_KEY_ATTN_HEAD_DIM].i,
                            .ffn = (int)cfg->v[SPAR_KEY_MODEL_FFN].i,
                            .vocab = (int)cfg->v[SPAR_KEY_MODEL_VOCAB].i,
                            .rope_base = cfg->v[SPAR_KEY_MODEL_ROPE_BASE].f,
                            .norm_eps = cfg->v[SPAR_KEY_MODEL_NORM_EPS].f};
}

int spar__model_load(const spar_config *cfg, spar_loaded_model *lm) {
    spar_model_dims *md = &lm->model.dims;
    spar__model_dims_of(cfg, md);
    int L = md->layers;
    lm->count = 3 + PER_LAYER * L;
    lm->tensors = calloc((size_t)lm->count, sizeof(float *));
    lm->layers = calloc((size_t)L, sizeof(spar_layer_weights));
    if (!lm->tensors || !lm->layers) return SPAR_ENOMEM;
    SPAR_TRY(tensor(cfg, "embed", md->vocab, md->hidden, 100, &lm->tensors[0]));
    SPAR_TRY(tensor(cfg, "final_norm", md->hidden, 0, 101, &lm->tensors[1]));
    SPAR_TRY(tensor(cfg, "lm_head", md->hidden, md->vocab, 102, &lm->tensors[2]));
    for (int l = 0; l < L; l++)
        for (int i = 0; i < PER_LAYER; i++) {
            char name[64];
            int64_t rows, cols;
            layer_shape(md, i, &rows, &cols);
            snprintf(name, sizeof name, "layers.%d.%s", l, layer_names[i]);
            SPAR_TRY(tensor(cfg, name, rows, cols, 1000 + (uint64_t)(l * PER_LAYER + i),
                            &lm->tensors[3 + l * PER_LAYER + i]));
        }
    for (int l = 0; l < L; l++) {
        float **t = lm->tensors + 3 + l * PER_LAYER;
        lm->layers[l] = (spar_layer_weights){t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8]};
    }
    lm->model.embed = lm->tensors[0], lm->model.final_norm = lm->tensors[1];
    lm->model.lm_head = lm->tensors[2], lm->model.layer = lm->layers;
    return SPAR_OK;
}

void spar__model_free(spar_loaded_model *lm) {
    for (int i = 0; lm->tensors && i < lm->count; i++)
        free(lm->tensors[i]);
    free(lm->tensors), free(lm->layers);
    *lm = (spar_loaded_model){0};
}

static uint64_t mix(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/* Rows of the prompts file: lengths up to the first -1, every id checked. */
static int read_prompts(const spar_config *cfg, int batch, int vocab, int32_t *len,
                        int32_t **tokens) {
    const char *path = cfg->v[SPAR_KEY_WORK_PROMPTS].s;
    spar_npy_info info;
    spar_err err;
    if (spar__npy_read_info(path, &info, &err) != 0)
        return spar_errorf(SPAR_EFORMAT, "%s", err.msg);
    if (strcmp(info.descr, "<i4") != 0 || info.ndim != 2 || info.shape[0] != batch ||
        info.fortran_order || info.shape[1] < 1) {
        char shape[96] = "(";
        for (int i = 0; i < info.ndim; i++)
            snprintf(shape + strlen(shape), sizeof shape - strlen(shape), "%s%lld", i ? ", " : "",
                     (long long)info.shape[i]);
        return spar_errorf(SPAR_ESHAPE,
                           "key workload.prompts: '%s' is %s%s with shape %s) (allowed: int32 "
                           "<i4, C order, [workload.batch=%d, L >= 1])",
                           path, info.descr, info.fortran_order ? " in Fortran order" : "", shape,
                           batch);
    }
    /* The declared shape against the file's size, before anything is allocated for it. */
    int64_t width = info.shape[1];
    struct stat st;
    if (stat(path, &st) != 0 || width > (INT64_MAX - info.data_offset) / 4 / batch ||
        st.st_size < info.data_offset + 4 * batch * width)
        return spar_errorf(SPAR_EFORMAT,
                           "key workload.prompts: '%s' is truncated: shape (%d, %lld) needs "
                           "%.0f data bytes",
                           path, batch, (long long)width, 4.0 * batch * (double)width);
    int32_t *all = malloc(sizeof(int32_t) * (size_t)(batch * width));
    int fd = all ? open(path, O_RDONLY) : -1;
    ssize_t want = (ssize_t)(sizeof(int32_t) * (size_t)(batch * width));
    bool ok = fd >= 0 && pread(fd, all, (size_t)want, (off_t)info.data_offset) == want;
    if (fd >= 0) close(fd);
    int rc = ok ? SPAR_OK : spar_errorf(SPAR_EIO, "key workload.prompts: cannot read '%s'", path);
    for (int b = 0; rc == 0 && b < batch; b++) {
        int32_t *row = all + (int64_t)b * width, n = 0;
        while (n < width && row[n] != -1)
            n++;
        for (int i = 0; i < n && rc == 0; i++)
            if (row[i] < 0 || row[i] >= vocab)
                rc = spar_errorf(SPAR_EINVAL,
                                 "key workload.prompts: request %d, position %d: token %d "
                                 "(allowed: 0 .. model.vocab-1 = %d, -1 after the end)",
                                 b, i, row[i], vocab - 1);
        if (rc == 0 && n == 0)
            rc = spar_errorf(SPAR_EINVAL, "key workload.prompts: request %d is empty", b);
        len[b] = n, tokens[b] = row;
    }
    if (rc != 0) { /* nothing kept: the rows pointed into the block */
        free(all);
        for (int b = 0; b < batch; b++)
            tokens[b] = NULL;
    }
    return rc;
}

int spar__prompts_load(const spar_config *cfg, spar_prompts *p) {
    int B = (int)cfg->v[SPAR_KEY_WORK_BATCH].i, V = (int)cfg->v[SPAR_KEY_MODEL_VOCAB].i;
    p->batch = B;
    p->len = malloc(sizeof(int32_t) * (size_t)B);
    p->rows = calloc((size_t)B, sizeof(int32_t *));
    if (!p->len || !p->rows) return SPAR_ENOMEM;
    if (*cfg->v[SPAR_KEY_WORK_PROMPTS].s) {
        SPAR_TRY(read_prompts(cfg, B, V, p->len, p->rows));
        p->owns_rows = false; /* one block, owned by rows[0] */
        return SPAR_OK;
    }
    p->owns_rows = true;
    uint64_t seed = (uint64_t)cfg->v[SPAR_KEY_DATA_SEED].i;
    for (int b = 0; b < B; b++) {
        p->len[b] = (int32_t)spar__prompt_length(cfg, b);
        if (!(p->rows[b] = malloc(sizeof(int32_t) * (size_t)p->len[b]))) return SPAR_ENOMEM;
        for (int i = 0; i < p->len[b]; i++)
            p->rows[b][i] =
                (int32_t)(mix(mix(seed ^ 0x5eed) + (uint64_t)b * 1000003u + (uint64_t)i) %
                          (uint64_t)V);
    }
    return SPAR_OK;
}

void spar__prompts_free(spar_prompts *p) {
    for (int b = 0; p->rows && b < p->batch && (p->owns_rows || b == 0); b++)
        free(p->rows[b]);
    free(p->rows), free(p->len);
    *p = (spar_prompts){0};
}
