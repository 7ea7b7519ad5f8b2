/* offload_wire.c: the layout both sides of offloaded decode derive from the model and
 * the rank counts, and the StepHeader control message on the wire (offload.h). */
#include <stdlib.h>
#include <string.h>

#include "offload.h"
#include "offload.pb-c.h"

spar__split spar__split_of(const spar_model_dims *md, int world, int attention_ranks) {
    spar__split sp = {.compute = world - attention_ranks, .K = attention_ranks, .md = md};
    sp.by_heads = md->kv_heads % attention_ranks == 0;
    sp.kv_per = sp.by_heads ? md->kv_heads / attention_ranks : md->kv_heads;
    sp.heads_per = sp.by_heads ? md->heads / attention_ranks : md->heads;
    return sp;
}

int spar__owned(int requests, int compute, int c) {
    return requests / compute + (c < requests % compute ? 1 : 0);
}

void spar__micro_batch(int owned, int micro_batches, int m, int *first, int *count) {
    *first = (int)((int64_t)owned * m / micro_batches);
    *count = (int)((int64_t)owned * (m + 1) / micro_batches) - *first;
}

bool spar__holds(const spar__split *sp, int a, int64_t p) {
    return sp->by_heads || p % sp->K == a;
}

int64_t spar__prompt_rows(const spar__split *sp, int a, int64_t len) {
    if (sp->by_heads) return len;
    return len > a ? (len - a + sp->K - 1) / sp->K : 0; /* positions a, a + K, ... < len */
}

int64_t spar__q_floats(const spar__split *sp) {
    return (int64_t)sp->heads_per * sp->md->head_dim;
}

int64_t spar__kv_floats(const spar__split *sp) {
    return (int64_t)sp->kv_per * sp->md->head_dim;
}

int64_t spar__reply_floats(const spar__split *sp) {
    return spar__q_floats(sp) + (sp->by_heads ? 0 : sp->heads_per);
}

int spar__header_send(spar_comm *comm, int dest, const spar__header *h, uint64_t *header_bytes) {
    StepHeader msg = STEP_HEADER__INIT;
    uint32_t *ids = malloc(sizeof(uint32_t) * (size_t)(h->count + 1));
    uint64_t *pos = malloc(sizeof(uint64_t) * (size_t)(h->count + 1));
    if (!ids || !pos) {
        free(ids), free(pos);
        return SPAR_ENOMEM;
    }
    for (int i = 0; i < h->count; i++)
        ids[i] = (uint32_t)h->ids[i], pos[i] = (uint64_t)h->positions[i];
    msg.version = SPAR__OFFLOAD_VERSION;
    msg.step = (uint32_t)h->step, msg.micro_batch = (uint32_t)h->micro_batch;
    msg.compute_rank = (uint32_t)h->compute_rank, msg.stop = h->stop;
    msg.n_request_ids = msg.n_positions = (size_t)h->count;
    msg.request_ids = ids, msg.positions = pos;
    size_t len = step_header__get_packed_size(&msg);
    uint8_t *buf = malloc(len + 1);
    int rc = buf ? SPAR_OK : SPAR_ENOMEM;
    if (rc == 0) {
        step_header__pack(&msg, buf);
        rc = spar_comm_send(comm, buf, len, dest, SPAR__TAG_HEADER);
        *header_bytes += len;
    }
    free(buf), free(ids), free(pos);
    return rc;
}

int spar__header_decode(const void *buf, size_t len, int src, int max_count, spar__header *h) {
    *h = (spar__header){0};
    StepHeader *msg = step_header__unpack(NULL, len, buf);
    int rc = SPAR_OK;
    if (!msg)
        rc = spar_errorf(SPAR_EFORMAT,
                         "offload: the control message from rank %d does not "
                         "parse (%zu bytes)",
                         src, len);
    else if (msg->version != SPAR__OFFLOAD_VERSION || msg->n_request_ids != msg->n_positions ||
             (int64_t)msg->n_request_ids > max_count)
        rc = spar_errorf(SPAR_EFORMAT,
                         "offload: control message from rank %d: version %u, %zu request "
                         "ids, %zu positions (expected version %d, equal counts <= %d)",
                         src, msg->version, msg->n_request_ids, msg->n_positions,
                         SPAR__OFFLOAD_VERSION, max_count);
    if (rc == 0) {
        h->step = (int)msg->step, h->micro_batch = (int)msg->micro_batch;
        h->compute_rank = (int)msg->compute_rank, h->stop = msg->stop;
        h->count = (int)msg->n_request_ids;
        h->ids = malloc(sizeof(int32_t) * (size_t)(h->count + 1));
        h->positions = malloc(sizeof(int64_t) * (size_t)(h->count + 1));
        if (!h->ids || !h->positions) rc = SPAR_ENOMEM;
        for (int i = 0; rc == 0 && i < h->count; i++)
            h->ids[i] = (int32_t)msg->request_ids[i], h->positions[i] = (int64_t)msg->positions[i];
    }
    if (msg) step_header__free_unpacked(msg, NULL);
    if (rc != 0) spar__header_free(h);
    return rc;
}

int spar__header_recv(spar_comm *comm, int src, int max_count, spar__header *h) {
    void *buf = NULL;
    size_t len = 0;
    *h = (spar__header){0};
    SPAR_TRY(spar_comm_probe_for(comm, src, SPAR__TAG_HEADER, spar_comm_timeout(comm),
                                 "a control message"));
    SPAR_TRY(spar_comm_recv_message(comm, src, SPAR__TAG_HEADER, &buf, &len));
    int rc = spar__header_decode(buf, len, src, max_count, h);
    free(buf);
    return rc;
}

void spar__header_free(spar__header *h) {
    free(h->ids), free(h->positions);
    h->ids = NULL, h->positions = NULL;
}

double spar_offload_bytes_per_token_layer(const spar_model_dims *md, int attention_ranks) {
    double H = md->heads, G = md->kv_heads, d = md->head_dim, K = attention_ranks;
    if (md->kv_heads % attention_ranks == 0) return (2 * H + 2 * G) * d * 4;
    return (K * H + 2 * G + K * H) * d * 4 + K * H * 4;
}
