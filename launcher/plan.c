/* plan.c: the configuration to and from a protobuf RunPlan (plan.proto).
 *
 * Unpacking checks everything a corrupted message could get wrong: the schema, unknown
 * keys, a value of the wrong type for its key, a key given twice or missing.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "launcher.h"
#include "plan.pb-c.h"

#define PLAN_SCHEMA 1

int spar__plan_pack(const spar_config *cfg, int world_size, uint8_t **out, size_t *len) {
    Spar__Setting settings[SPAR_KEY_COUNT];
    Spar__Setting *ptrs[SPAR_KEY_COUNT];
    for (int i = 0; i < SPAR_KEY_COUNT; i++) {
        Spar__Setting *s = &settings[i];
        spar__setting__init(s);
        s->key = (char *)spar__keys[i].name;
        switch (spar__keys[i].type) {
        case SPAR_KT_BOOL: s->value_case = SPAR__SETTING__VALUE_B, s->b = cfg->v[i].b; break;
        case SPAR_KT_INT: s->value_case = SPAR__SETTING__VALUE_I, s->i = cfg->v[i].i; break;
        case SPAR_KT_FLOAT: s->value_case = SPAR__SETTING__VALUE_F, s->f = cfg->v[i].f; break;
        default: s->value_case = SPAR__SETTING__VALUE_S, s->s = (char *)cfg->v[i].s; break;
        }
        ptrs[i] = s;
    }
    Spar__RunPlan plan;
    spar__run_plan__init(&plan);
    plan.schema = PLAN_SCHEMA;
    plan.world_size = world_size;
    plan.config_file = (char *)cfg->file;
    plan.n_settings = SPAR_KEY_COUNT;
    plan.settings = ptrs;
    *len = spar__run_plan__get_packed_size(&plan);
    *out = malloc(*len ? *len : 1);
    if (!*out) return SPAR_ENOMEM;
    spar__run_plan__pack(&plan, *out);
    return SPAR_OK;
}

static int unpack_setting(spar_config *cfg, const Spar__Setting *s, bool *seen, spar_err *err) {
    int id = s->key ? spar__key_find(s->key) : -1;
    if (id < 0 || seen[id])
        return spar__err_set(err, SPAR_EFORMAT, "run plan: unknown or repeated key '%s'",
                             s->key ? s->key : "(none)");
    seen[id] = true;
    spar_value *v = &cfg->v[id];
    enum spar_key_type type = spar__keys[id].type;
    Spar__Setting__ValueCase want = type == SPAR_KT_BOOL    ? SPAR__SETTING__VALUE_B
                                    : type == SPAR_KT_INT   ? SPAR__SETTING__VALUE_I
                                    : type == SPAR_KT_FLOAT ? SPAR__SETTING__VALUE_F
                                                            : SPAR__SETTING__VALUE_S;
    if (s->value_case != want)
        return spar__err_set(err, SPAR_EFORMAT, "run plan: key %s has a value of the wrong type",
                             s->key);
    switch (want) {
    case SPAR__SETTING__VALUE_B: v->b = s->b; break;
    case SPAR__SETTING__VALUE_I: v->i = s->i; break;
    case SPAR__SETTING__VALUE_F: v->f = s->f; break;
    default:
        if (!s->s || strlen(s->s) >= sizeof v->s)
            return spar__err_set(err, SPAR_EFORMAT, "run plan: key %s: bad text value", s->key);
        strcpy(v->s, s->s);
        break;
    }
    if (want != SPAR__SETTING__VALUE_S) /* keep the text form in step for formatting */
        spar__value_format(cfg, id, v->s, sizeof v->s);
    return SPAR_OK;
}

int spar__plan_unpack(spar_config *cfg, const uint8_t *buf, size_t len, int world_size,
                      spar_err *err) {
    Spar__RunPlan *plan = spar__run_plan__unpack(NULL, len, buf);
    if (!plan)
        return spar__err_set(err, SPAR_EFORMAT, "run plan: message of %zu bytes does not decode",
                             len);
    int rc = SPAR_OK;
    bool seen[SPAR_KEY_COUNT] = {false};
    spar__config_defaults(cfg);
    if (plan->schema != PLAN_SCHEMA) {
        rc = spar__err_set(err, SPAR_EFORMAT, "run plan: schema %u, this spar reads %d",
                           plan->schema, PLAN_SCHEMA);
        goto done;
    }
    if (world_size > 0 && plan->world_size != world_size) {
        rc =
            spar__err_set(err, SPAR_EFORMAT, "run plan: made for %d ranks, received by a job of %d",
                          plan->world_size, world_size);
        goto done;
    }
    snprintf(cfg->file, sizeof cfg->file, "%s", plan->config_file ? plan->config_file : "");
    for (size_t i = 0; i < plan->n_settings && rc == 0; i++)
        rc = unpack_setting(cfg, plan->settings[i], seen, err);
    for (int i = 0; i < SPAR_KEY_COUNT && rc == 0; i++)
        if (!seen[i])
            rc =
                spar__err_set(err, SPAR_EFORMAT, "run plan: key %s is missing", spar__keys[i].name);
    if (rc == 0 && spar__config_recheck(cfg, err) != 0)
        rc = SPAR_EFORMAT; /* a value no file or --set could have given */
done:
    spar__run_plan__free_unpacked(plan, NULL);
    return rc;
}
