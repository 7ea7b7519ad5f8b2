/* local_attn.c: the whole sequence on one rank, the reference path.
 *
 * The same kernels and scheduler as the distributed methods, over a one-rank partition,
 * in blocks of queries so that long references report progress.
 */
#include <stdlib.h>
#include <string.h>

#include "engine_internal.h"

static int local_pass(const spar_attn_problem *prob, const spar_attn_io *io, spar_metrics *metrics,
                      bool backward) {
    double t_start = spar__now();
    if (prob->part->ranks != 1)
        return spar_errorf(SPAR_EINVAL, "the local method needs a one-rank partition");
    if (prob->type == SPAR_ATTN_LINEAR) {
        int rc = spar__linear_local(prob, io, backward);
        if (metrics) {
            spar__pass pass = {.prob = prob, .backward = backward};
            *metrics = (spar_metrics){0};
            spar__metrics_finish(metrics, &pass, NULL, 0, t_start, 0, 1);
            metrics->compute_seconds = metrics->seconds;
        }
        return rc;
    }
    int h = prob->dims.heads, g = prob->dims.kv_heads, d = prob->dims.head_dim;
    spar__chunk c = {0};
    SPAR_TRY(spar__chunk_init(&c, prob->part, 0, prob->part->n));
    float *delta = NULL;
    int64_t n = c.len;
    if (backward) {
        if (!(delta = malloc(sizeof(float) * (size_t)(n * h) + 1))) {
            spar__chunk_free(&c);
            return SPAR_ENOMEM;
        }
        spar_softmax_bwd_delta(n, h, d, io->o, io->dout, delta);
        memset(io->dq, 0, sizeof(float) * (size_t)(n * h * d));
        memset(io->dk, 0, sizeof(float) * (size_t)(n * g * d));
        memset(io->dv, 0, sizeof(float) * (size_t)(n * g * d));
    } else {
        spar_softmax_init_partial(n, h, d, io->o, io->lse);
    }
    spar__pass pass;
    spar__chunk rows = c; /* the same tokens, one block of queries at a time */
    spar__pass_init(&pass, prob, io, &rows, backward, delta);
    spar_kvblock kv = {n, NULL, (int64_t)g * d, io->k, io->v, io->dk, io->dv, false};
    int64_t block = 8 * (prob->query_block > 0 ? prob->query_block : SPAR__DEFAULT_QUERY_BLOCK);
    int rc = SPAR_OK;
    for (int64_t i = 0; i < n && rc == 0; i += block) {
        int64_t len = n - i < block ? n - i : block;
        rows.ngroups = 1;
        rows.groups[0] = (spar__group){i, len, c.pos[i], c.pos[i + len - 1]};
        rc = spar__pass_chunk(&pass, &c, &kv);
        if (prob->progress)
            prob->progress(prob->progress_ctx,
                           backward ? "local backward, queries" : "local forward, queries", i + len,
                           n);
    }
    if (metrics) {
        *metrics = (spar_metrics){0};
        spar__metrics_finish(metrics, &pass, NULL, 0, t_start, 0, 1);
    }
    free(delta);
    spar__chunk_free(&c);
    return rc;
}

int spar__local_forward(spar_comm *comm, const spar_attn_problem *prob, const spar_attn_io *io,
                        spar_metrics *m) {
    (void)comm; /* one rank alone */
    return local_pass(prob, io, m, false);
}

int spar__local_backward(spar_comm *comm, const spar_attn_problem *prob, const spar_attn_io *io,
                         spar_metrics *m) {
    (void)comm;
    return local_pass(prob, io, m, true);
}
