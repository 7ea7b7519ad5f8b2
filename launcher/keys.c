/* keys.c: the key table, typed values and their parsing from text (file or --set). */
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "launcher.h"

const spar_key spar__keys[SPAR_KEY_COUNT] = {
#define SPAR_KEY_ROW(id, name, type, def, allowed, min, max, doc)                                  \
    {name, SPAR_KT_##type, def, allowed, min, max, doc},
    SPAR_KEY_LIST(SPAR_KEY_ROW)
#undef SPAR_KEY_ROW
};

int spar__err_set(spar_err *err, int status, const char *fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
    }
    return status;
}

const char *spar__origin_name(enum spar_origin origin) {
    switch (origin) {
    case SPAR_FROM_DEFAULT: return "default";
    case SPAR_FROM_FILE: return "file";
    case SPAR_FROM_COMMAND_LINE: return "--set";
    case SPAR_FROM_SWEEP: return "sweep";
    case SPAR_FROM_INCLUDE: return "included file";
    }
    return "?";
}

int spar__key_find(const char *name) {
    for (int i = 0; i < SPAR_KEY_COUNT; i++)
        if (strcmp(spar__keys[i].name, name) == 0) return i;
    return -1;
}

/* Edit distance, to suggest the key a typo meant. */
static int distance(const char *a, const char *b) {
    size_t la = strlen(a), lb = strlen(b);
    if (la > 63 || lb > 63) return 99;
    int row[64];
    for (size_t j = 0; j <= lb; j++)
        row[j] = (int)j;
    for (size_t i = 1; i <= la; i++) {
        int diag = row[0];
        row[0] = (int)i;
        for (size_t j = 1; j <= lb; j++) {
            int up = row[j];
            int best = diag + (a[i - 1] != b[j - 1]);
            best = up + 1 < best ? up + 1 : best;
            best = row[j - 1] + 1 < best ? row[j - 1] + 1 : best;
            row[j] = best;
            diag = up;
        }
    }
    return row[lb];
}

static int unknown_key(const char *name, spar_err *err) {
    int best = -1, best_d = 4;
    for (int i = 0; i < SPAR_KEY_COUNT; i++) {
        int d = distance(name, spar__keys[i].name);
        if (d < best_d) {
            best_d = d;
            best = i;
        }
    }
    if (best >= 0)
        return spar__err_set(err, SPAR_EINVAL,
                             "unknown key '%s' (did you mean '%s'? "
                             "`spar --help` lists every key)",
                             name, spar__keys[best].name);
    return spar__err_set(err, SPAR_EINVAL, "unknown key '%s' (`spar --help` lists every key)",
                         name);
}

static int parse_bool(const char *t, bool *out) {
    static const char *yes[] = {"true", "yes", "on", "1"}, *no[] = {"false", "no", "off", "0"};
    for (int i = 0; i < 4; i++) {
        if (strcasecmp(t, yes[i]) == 0) return *out = true, 1;
        if (strcasecmp(t, no[i]) == 0) return *out = false, 1;
    }
    return 0;
}

/* Integer with an optional binary suffix (32K = 32768); 0 on junk or overflow. */
static int parse_int(const char *t, int64_t *out) {
    char *end;
    errno = 0;
    long long x = strtoll(t, &end, 10);
    if (end == t || errno == ERANGE) return 0;
    int shift = 0;
    switch (toupper((unsigned char)*end)) {
    case 'K': shift = 10, end++; break;
    case 'M': shift = 20, end++; break;
    case 'G': shift = 30, end++; break;
    default: break;
    }
    if (*end != '\0') return 0;
    if (shift && (x > (LLONG_MAX >> shift) || x < -(LLONG_MAX >> shift))) return 0;
    *out = (int64_t)(x * (1LL << shift));
    return 1;
}

static int parse_float(const char *t, double *out) {
    char *end;
    errno = 0;
    double x = strtod(t, &end);
    if (end == t || *end != '\0' || errno == ERANGE || !isfinite(x)) return 0;
    *out = x;
    return 1;
}

static int enum_allows(const char *allowed, const char *t) {
    size_t n = strlen(t);
    for (const char *p = allowed; *p;) {
        const char *bar = strchr(p, '|');
        size_t len = bar ? (size_t)(bar - p) : strlen(p);
        if (len == n && strncmp(p, t, n) == 0) return 1;
        p = bar ? bar + 1 : p + len;
    }
    return 0;
}

/* A float key may accept one word, written first in its allowed text: "WORD or ...". */
static bool float_keyword(const spar_key *k, const char *text) {
    const char * or = strstr(k->allowed, " or ");
    size_t len = or ? (size_t)(or -k->allowed) : 0;
    return len > 0 && strlen(text) == len && strncmp(k->allowed, text, len) == 0 &&
           strspn(text, "abcdefghijklmnopqrstuvwxyz") == len;
}

/* Parse text into a typed value for key k; errors name the key, value and the rule. */
static int parse_value(const spar_key *k, const char *text, spar_value *v, spar_err *err) {
    const char *bad = "";
    switch (k->type) {
    case SPAR_KT_BOOL:
        if (parse_bool(text, &v->b)) break;
        bad = "is not a boolean";
        goto fail;
    case SPAR_KT_INT:
        if (!parse_int(text, &v->i)) {
            bad = "is not an integer (or is too large)";
            goto fail;
        }
        if (v->i < (int64_t)k->min || v->i > (int64_t)k->max) {
            bad = "is out of range";
            goto fail;
        }
        break;
    case SPAR_KT_FLOAT:
        if (float_keyword(k, text)) { /* "auto", "alibi": kept as text, NAN as number */
            v->f = NAN;
            break;
        }
        if (!parse_float(text, &v->f)) {
            bad = "is not a number";
            goto fail;
        }
        if (v->f < k->min || v->f > k->max) {
            bad = "is out of range";
            goto fail;
        }
        break;
    case SPAR_KT_ENUM:
        if (!enum_allows(k->allowed, text)) {
            bad = "is not one of the allowed values";
            goto fail;
        }
        break;
    case SPAR_KT_STRING: break;
    }
    if (strlen(text) >= sizeof v->s)
        return spar__err_set(err, SPAR_EINVAL, "key %s: value is longer than %zu characters",
                             k->name, sizeof v->s - 1);
    snprintf(v->s, sizeof v->s, "%s", text);
    return SPAR_OK;
fail:
    return spar__err_set(err, SPAR_EINVAL, "key %s: '%s' %s (allowed: %s)", k->name, text, bad,
                         k->allowed);
}

void spar__config_defaults(spar_config *cfg) {
    memset(cfg, 0, sizeof *cfg);
    for (int i = 0; i < SPAR_KEY_COUNT; i++) {
        int rc = parse_value(&spar__keys[i], spar__keys[i].def, &cfg->v[i], NULL);
        (void)rc; /* the defaults are valid by construction; tests check it */
    }
}

int spar__config_set(spar_config *cfg, const char *name, const char *text, enum spar_origin origin,
                     int line, spar_err *err) {
    int id = spar__key_find(name);
    if (id < 0) return unknown_key(name, err);
    if (origin == SPAR_FROM_FILE && cfg->origin[id] == SPAR_FROM_FILE)
        return spar__err_set(err, SPAR_EINVAL, "key %s is given twice in %s (lines %d and %d)",
                             name, cfg->file, cfg->line[id], line);
    spar_value v = cfg->v[id];
    SPAR_TRY(parse_value(&spar__keys[id], text, &v, err));
    cfg->v[id] = v;
    cfg->origin[id] = origin;
    cfg->line[id] = line;
    return SPAR_OK;
}

int spar__value_check(const char *name, const char *text, spar_err *err) {
    int id = spar__key_find(name);
    if (id < 0) return unknown_key(name, err);
    spar_value v;
    return parse_value(&spar__keys[id], text, &v, err);
}

int spar__config_set_arg(spar_config *cfg, const char *assignment, spar_err *err) {
    const char *eq = strchr(assignment, '=');
    if (!eq || eq == assignment)
        return spar__err_set(err, SPAR_EINVAL, "--set '%s': expected KEY=VALUE", assignment);
    char name[128];
    size_t len = (size_t)(eq - assignment);
    if (len >= sizeof name)
        return spar__err_set(err, SPAR_EINVAL, "--set '%s': key is too long", assignment);
    memcpy(name, assignment, len);
    name[len] = '\0';
    return spar__config_set(cfg, name, eq + 1, SPAR_FROM_COMMAND_LINE, 0, err);
}

int spar__config_recheck(const spar_config *cfg, spar_err *err) {
    char text[sizeof cfg->v[0].s + 32];
    for (int i = 0; i < SPAR_KEY_COUNT; i++) {
        spar_value v;
        spar__value_format(cfg, i, text, sizeof text);
        SPAR_TRY(parse_value(&spar__keys[i], text, &v, err));
    }
    return SPAR_OK;
}

void spar__value_format(const spar_config *cfg, int id, char *out, size_t len) {
    const spar_value *v = &cfg->v[id];
    switch (spar__keys[id].type) {
    case SPAR_KT_BOOL: snprintf(out, len, "%s", v->b ? "true" : "false"); break;
    case SPAR_KT_INT: snprintf(out, len, "%lld", (long long)v->i); break;
    case SPAR_KT_FLOAT:
        if (isnan(v->f)) /* the key's word ("auto", "alibi") */
            snprintf(out, len, "%.*s", (int)strcspn(spar__keys[id].allowed, " "),
                     spar__keys[id].allowed);
        else
            snprintf(out, len, "%.17g", v->f);
        break;
    default: snprintf(out, len, "%s", v->s); break;
    }
}
