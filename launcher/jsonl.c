/* jsonl.c: one JSON-lines record, flattened for `spar report`.
 *
 * Nested object keys are joined with '.' ({"forward":{"seconds":1}} gives
 * "forward.seconds"); an array of numbers is kept as its largest element (the per-rank
 * arrays of a record: the busiest rank is what a table shows), an array of strings as
 * its elements joined by ','. Anything that is not well-formed JSON is refused, so that
 * a torn or foreign line is reported rather than half-read.
 */
#include <ctype.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "launcher.h"

typedef struct cursor {
    const char *p;
    spar_json_flat *out;
} cursor;

static void skip_space(cursor *c) {
    while (isspace((unsigned char)*c->p))
        c->p++;
}

/* Steps over ch if it is next; never past the line's end (a truncated line stops here). */
static bool expect(cursor *c, char ch) {
    if (*c->p != ch) return false;
    c->p++;
    return true;
}

static int add(cursor *c, const char *key, const char *text, double num, bool is_num) {
    spar_json_flat *j = c->out;
    if (j->count == j->cap) {
        int cap = j->cap ? 2 * j->cap : 64;
        spar_json_field *f = realloc(j->f, (size_t)cap * sizeof *f);
        if (!f) return SPAR_ENOMEM;
        j->f = f, j->cap = cap;
    }
    spar_json_field *f = &j->f[j->count++];
    snprintf(f->key, sizeof f->key, "%s", key);
    snprintf(f->text, sizeof f->text, "%s", text);
    f->num = num, f->is_num = is_num;
    return SPAR_OK;
}

/* A string into out (escapes decoded; \u kept as '?' beyond ASCII). */
static int string(cursor *c, char *out, size_t len) {
    size_t n = 0;
    if (*c->p != '"') return SPAR_EFORMAT;
    for (c->p++; *c->p && *c->p != '"'; c->p++) {
        char ch = *c->p;
        if (ch == '\\') {
            ch = *++c->p;
            if (ch == 'u') {
                for (int i = 0; i < 4; i++)
                    if (!isxdigit((unsigned char)*++c->p)) return SPAR_EFORMAT;
                ch = '?';
            } else if (ch == 'n' || ch == 't' || ch == 'r' || ch == 'b' || ch == 'f') {
                ch = ' ';
            } else if (ch != '"' && ch != '\\' && ch != '/') {
                return SPAR_EFORMAT;
            }
        }
        if (n + 1 < len) out[n++] = ch;
    }
    if (*c->p != '"') return SPAR_EFORMAT;
    c->p++;
    out[n] = 0;
    return SPAR_OK;
}

static int value(cursor *c, const char *key, int depth);

static int object(cursor *c, const char *key, int depth) {
    c->p++;
    skip_space(c);
    if (*c->p == '}') return c->p++, SPAR_OK;
    for (;;) {
        char name[96], full[96];
        skip_space(c);
        SPAR_TRY(string(c, name, sizeof name));
        int n = snprintf(full, sizeof full, "%s%s%s", key, *key ? "." : "", name);
        if (n < 0 || (size_t)n >= sizeof full) return SPAR_EFORMAT;
        skip_space(c);
        if (!expect(c, ':')) return SPAR_EFORMAT;
        SPAR_TRY(value(c, full, depth + 1));
        skip_space(c);
        if (*c->p == '}') return c->p++, SPAR_OK;
        if (!expect(c, ',')) return SPAR_EFORMAT;
    }
}

/* Numbers: the largest; strings: joined. Nested containers are parsed and dropped. */
static int array(cursor *c, const char *key, int depth) {
    double best = -INFINITY;
    char joined[256] = "", item[256];
    bool numbers = false, strings = false;
    c->p++;
    skip_space(c);
    if (*c->p == ']') return c->p++, SPAR_OK;
    for (;;) {
        skip_space(c);
        if (*c->p == '"') {
            SPAR_TRY(string(c, item, sizeof item));
            size_t used = strlen(joined);
            if (snprintf(joined + used, sizeof joined - used, "%s%s", used ? "," : "", item) < 0)
                return SPAR_EFORMAT; /* a long list is cut short: it is only shown */
            strings = true;
        } else if (*c->p == '-' || isdigit((unsigned char)*c->p)) {
            char *end;
            double x = strtod(c->p, &end);
            if (end == c->p) return SPAR_EFORMAT;
            c->p = end, numbers = true;
            best = x > best ? x : best;
        } else {
            SPAR_TRY(value(c, "", depth + 1)); /* stored under "" and ignored */
        }
        skip_space(c);
        if (*c->p == ']') break;
        if (!expect(c, ',')) return SPAR_EFORMAT;
    }
    c->p++;
    if (numbers) return add(c, key, "", best, true);
    return strings ? add(c, key, joined, NAN, false) : SPAR_OK;
}

static int value(cursor *c, const char *key, int depth) {
    if (depth > 16) return SPAR_EFORMAT;
    skip_space(c);
    char text[256];
    if (*c->p == '{') return object(c, key, depth);
    if (*c->p == '[') return array(c, key, depth);
    if (*c->p == '"') {
        SPAR_TRY(string(c, text, sizeof text));
        return add(c, key, text, NAN, false);
    }
    static const char *words[] = {"true", "false", "null"};
    for (int i = 0; i < 3; i++)
        if (strncmp(c->p, words[i], strlen(words[i])) == 0) {
            c->p += strlen(words[i]);
            return add(c, key, words[i], i == 0 ? 1.0 : i == 1 ? 0.0 : NAN, false);
        }
    char *end;
    double x = strtod(c->p, &end);
    if (end == c->p) return SPAR_EFORMAT;
    c->p = end;
    return add(c, key, "", x, true);
}

int spar__json_flatten(const char *line, spar_json_flat *out) {
    *out = (spar_json_flat){0};
    cursor c = {.p = line, .out = out};
    skip_space(&c);
    if (*c.p != '{') return SPAR_EFORMAT;
    int rc = value(&c, "", 0);
    skip_space(&c);
    if (rc == 0 && *c.p) rc = SPAR_EFORMAT;
    if (rc != 0) spar__json_flat_free(out);
    return rc;
}

const spar_json_field *spar__json_get(const spar_json_flat *j, const char *key) {
    for (int i = 0; i < j->count; i++)
        if (strcmp(j->f[i].key, key) == 0) return &j->f[i];
    return NULL;
}

void spar__json_flat_free(spar_json_flat *j) {
    free(j->f);
    *j = (spar_json_flat){0};
}
