/* config_yaml.c: reads an experiment file into the configuration.
 *
 * A file is one mapping; nested mappings spell dotted keys, so
 *     attention:
 *       heads: 8
 * and `attention.heads: 8` are the same key. Every value must be a scalar: lists and
 * anchors are refused with the line they are on. Values are parsed by the key table,
 * exactly as --set parses them.
 *
 * `include: BASE.yaml` (the file's first key; the path is relative to the file) loads
 * BASE first, so that every key of the including file overrides it; a sweep list in the
 * including file replaces the base's list for that key. Includes nest up to MAX_INCLUDES.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <yaml.h>

#include "launcher.h"

#define MAX_DEPTH 8
#define MAX_INCLUDES 8

typedef struct walker {
    yaml_parser_t parser;
    spar_config *cfg;
    const char *path;
    spar_err *err;
    int includes;       /* files above this one */
    bool read_includes; /* false: text from memory, whose include: is refused */
    int keys_seen;      /* top-level keys of this file so far */
    unsigned swept;     /* sweep slots this file has started (bit per slot) */
} walker;

static int load_file(spar_config *cfg, const char *path, int includes, spar_err *err);

static int next_event(walker *w, yaml_event_t *ev) {
    if (!yaml_parser_parse(&w->parser, ev))
        return spar__err_set(w->err, SPAR_EFORMAT, "%s:%zu:%zu: YAML syntax error: %s", w->path,
                             w->parser.problem_mark.line + 1, w->parser.problem_mark.column + 1,
                             w->parser.problem ? w->parser.problem : "unknown problem");
    return SPAR_OK;
}

static int line_of(const yaml_event_t *ev) {
    return (int)ev->start_mark.line + 1;
}

static int walk_mapping(walker *w, const char *prefix, int depth);

/* Anchors invite aliases, which would make one line set several keys: refuse both. */
static const unsigned char *anchor_of(const yaml_event_t *ev) {
    if (ev->type == YAML_SCALAR_EVENT) return ev->data.scalar.anchor;
    if (ev->type == YAML_MAPPING_START_EVENT) return ev->data.mapping_start.anchor;
    if (ev->type == YAML_SEQUENCE_START_EVENT) return ev->data.sequence_start.anchor;
    return NULL;
}

/* One value of the sweep list for `key` (the part after "sweep."). */
static int add_sweep_value(walker *w, const char *key, const char *text, int line) {
    spar_sweep *sw = &w->cfg->sweep;
    int id = spar__key_find(key), slot = 0;
    spar_err inner;
    if (spar__value_check(key, text, &inner) != 0)
        return spar__err_set(w->err, SPAR_EINVAL, "%s:%d: sweep: %s", w->path, line, inner.msg);
    while (slot < sw->nkeys && sw->key[slot] != id)
        slot++;
    if (slot == sw->nkeys) {
        if (sw->nkeys == SPAR_SWEEP_KEYS)
            return spar__err_set(w->err, SPAR_EINVAL, "%s:%d: sweep: more than %d keys", w->path,
                                 line, SPAR_SWEEP_KEYS);
        sw->key[sw->nkeys++] = id;
    }
    if (!(w->swept & (1u << slot))) { /* this file's list replaces an included one */
        w->swept |= 1u << slot;
        sw->nvalues[slot] = 0;
    }
    if (sw->nvalues[slot] == SPAR_SWEEP_VALUES || strlen(text) >= sizeof sw->value[0][0])
        return spar__err_set(w->err, SPAR_EINVAL,
                             "%s:%d: sweep: key %s: at most %d values of %zu characters", w->path,
                             line, key, SPAR_SWEEP_VALUES, sizeof sw->value[0][0] - 1);
    snprintf(sw->value[slot][sw->nvalues[slot]++], sizeof sw->value[0][0], "%s", text);
    return SPAR_OK;
}

/* `sweep.KEY: [v1, v2, ...]` (or a single value). */
static int walk_sweep(walker *w, const char *key, yaml_event_t *first) {
    int line = line_of(first);
    if (first->type == YAML_SCALAR_EVENT)
        return add_sweep_value(w, key, (const char *)first->data.scalar.value, line);
    if (first->type != YAML_SEQUENCE_START_EVENT)
        return spar__err_set(w->err, SPAR_EINVAL, "%s:%d: sweep: key %s: expected a list of values",
                             w->path, line, key);
    for (int values = 0;; values++) {
        yaml_event_t ev;
        SPAR_TRY(next_event(w, &ev));
        int rc = SPAR_OK;
        if (ev.type == YAML_SEQUENCE_END_EVENT) {
            yaml_event_delete(&ev);
            return values > 0 ? SPAR_OK
                              : spar__err_set(w->err, SPAR_EINVAL,
                                              "%s:%d: sweep: key %s: an empty list (allowed: one "
                                              "or more values)",
                                              w->path, line, key);
        }
        if (ev.type == YAML_SCALAR_EVENT)
            rc = add_sweep_value(w, key, (const char *)ev.data.scalar.value, line_of(&ev));
        else
            rc = spar__err_set(w->err, SPAR_EINVAL, "%s:%d: sweep: key %s: values must be plain",
                               w->path, line_of(&ev), key);
        yaml_event_delete(&ev);
        SPAR_TRY(rc);
    }
}

/* `include: PATH`: the base file, loaded before anything of this file. */
static int walk_include(walker *w, const yaml_event_t *ev) {
    int line = line_of(ev);
    if (ev->type != YAML_SCALAR_EVENT)
        return spar__err_set(w->err, SPAR_EINVAL, "%s:%d: include: expected one file path", w->path,
                             line);
    if (w->keys_seen > 1)
        return spar__err_set(w->err, SPAR_EINVAL,
                             "%s:%d: include: must be the first key of the file (its keys "
                             "override the included ones)",
                             w->path, line);
    if (w->includes >= MAX_INCLUDES)
        return spar__err_set(w->err, SPAR_EINVAL,
                             "%s:%d: include: files nested deeper than %d (a cycle?)", w->path,
                             line, MAX_INCLUDES);
    const char *name = (const char *)ev->data.scalar.value, *slash = strrchr(w->path, '/');
    char path[1024];
    int n = name[0] == '/' || !slash
                ? snprintf(path, sizeof path, "%s", name)
                : snprintf(path, sizeof path, "%.*s/%s", (int)(slash - w->path), w->path, name);
    if (n < 0 || (size_t)n >= sizeof path)
        return spar__err_set(w->err, SPAR_EINVAL, "%s:%d: include: path too long", w->path, line);
    if (!w->read_includes)
        return spar__err_set(w->err, SPAR_EINVAL, "%s:%d: include: '%s' is not read here", w->path,
                             line, path);
    int rc = load_file(w->cfg, path, w->includes + 1, w->err);
    for (int k = 0; k < SPAR_KEY_COUNT; k++) /* this file's keys may now override them */
        if (w->cfg->origin[k] == SPAR_FROM_FILE) w->cfg->origin[k] = SPAR_FROM_INCLUDE;
    if (rc != 0 && strstr(w->err->msg, "included from") == NULL) {
        char msg[sizeof w->err->msg];
        memcpy(msg, w->err->msg, sizeof msg);
        snprintf(w->err->msg, sizeof w->err->msg, "%.1800s (included from %s:%d)", msg, w->path,
                 line);
    }
    return rc;
}

/* The value event after key `key` (already joined with the prefix). */
static int walk_value(walker *w, const char *key, int depth) {
    yaml_event_t ev;
    SPAR_TRY(next_event(w, &ev));
    int rc = SPAR_OK, line = line_of(&ev);
    if (anchor_of(&ev)) {
        yaml_event_delete(&ev);
        return spar__err_set(w->err, SPAR_EINVAL,
                             "%s:%d: key %s: anchors and aliases are not "
                             "supported",
                             w->path, line, key);
    }
    if (strcmp(key, "include") == 0) {
        rc = walk_include(w, &ev);
        yaml_event_delete(&ev);
        return rc;
    }
    if (strncmp(key, "sweep.", 6) == 0 && ev.type != YAML_MAPPING_START_EVENT) {
        rc = walk_sweep(w, key + 6, &ev);
        yaml_event_delete(&ev);
        return rc;
    }
    switch (ev.type) {
    case YAML_SCALAR_EVENT:
        rc = spar__config_set(w->cfg, key, (const char *)ev.data.scalar.value, SPAR_FROM_FILE, line,
                              w->err);
        if (rc != 0 && strstr(w->err->msg, w->path) == NULL) { /* say where */
            char msg[sizeof w->err->msg];
            memcpy(msg, w->err->msg, sizeof msg);
            snprintf(w->err->msg, sizeof w->err->msg, "%s:%d: %.1900s", w->path, line, msg);
        }
        break;
    case YAML_MAPPING_START_EVENT: rc = walk_mapping(w, key, depth + 1); break;
    case YAML_SEQUENCE_START_EVENT:
        rc =
            spar__err_set(w->err, SPAR_EINVAL, "%s:%d: key %s: expected a single value, got a list",
                          w->path, line, key);
        break;
    default:
        rc = spar__err_set(w->err, SPAR_EINVAL,
                           "%s:%d: key %s: anchors and aliases are not "
                           "supported",
                           w->path, line, key);
        break;
    }
    yaml_event_delete(&ev);
    return rc;
}

static int walk_mapping(walker *w, const char *prefix, int depth) {
    if (depth > MAX_DEPTH)
        return spar__err_set(w->err, SPAR_EINVAL,
                             "%s: mappings nested deeper than %d levels at "
                             "key %s",
                             w->path, MAX_DEPTH, prefix);
    for (;;) {
        yaml_event_t ev;
        SPAR_TRY(next_event(w, &ev));
        if (ev.type == YAML_MAPPING_END_EVENT) {
            yaml_event_delete(&ev);
            return SPAR_OK;
        }
        if (ev.type != YAML_SCALAR_EVENT) {
            int line = line_of(&ev);
            yaml_event_delete(&ev);
            return spar__err_set(w->err, SPAR_EINVAL, "%s:%d: a key must be plain text", w->path,
                                 line);
        }
        char key[256];
        int n = snprintf(key, sizeof key, "%s%s%s", prefix, *prefix ? "." : "",
                         (const char *)ev.data.scalar.value);
        yaml_event_delete(&ev);
        if (depth == 1) w->keys_seen++;
        if (n < 0 || (size_t)n >= sizeof key)
            return spar__err_set(w->err, SPAR_EINVAL, "%s: key '%.60s...' is too long", w->path,
                                 key);
        SPAR_TRY(walk_value(w, key, depth));
    }
}

/* After the root mapping only the end may come: a second document would be ignored. */
static int walk_end(walker *w) {
    for (;;) {
        yaml_event_t ev;
        SPAR_TRY(next_event(w, &ev));
        yaml_event_type_t type = ev.type;
        int line = line_of(&ev);
        yaml_event_delete(&ev);
        if (type == YAML_STREAM_END_EVENT) return SPAR_OK;
        if (type != YAML_DOCUMENT_END_EVENT)
            return spar__err_set(w->err, SPAR_EINVAL,
                                 "%s:%d: a second YAML document (allowed: one mapping of keys "
                                 "to values per file)",
                                 w->path, line);
    }
}

/* Stream start, document start, then the root mapping (or nothing: an empty file). */
static int walk_document(walker *w) {
    yaml_event_t ev;
    for (;;) {
        SPAR_TRY(next_event(w, &ev));
        yaml_event_type_t type = ev.type;
        int line = line_of(&ev);
        yaml_event_delete(&ev);
        if (type == YAML_STREAM_END_EVENT || type == YAML_DOCUMENT_END_EVENT) return SPAR_OK;
        if (type == YAML_STREAM_START_EVENT || type == YAML_DOCUMENT_START_EVENT) continue;
        if (type == YAML_MAPPING_START_EVENT) {
            SPAR_TRY(walk_mapping(w, "", 1));
            return walk_end(w);
        }
        if (type == YAML_SCALAR_EVENT && line == 1)
            return spar__err_set(w->err, SPAR_EINVAL,
                                 "%s: expected a mapping of keys to values, "
                                 "got a single value",
                                 w->path);
        return spar__err_set(w->err, SPAR_EINVAL, "%s:%d: expected a mapping of keys to values",
                             w->path, line);
    }
}

/* One file's events, from a file (f) or from memory (text, len). */
static int load_stream(walker *w, FILE *f, const unsigned char *text, size_t len) {
    yaml_parser_initialize(&w->parser);
    if (f)
        yaml_parser_set_input_file(&w->parser, f);
    else
        yaml_parser_set_input_string(&w->parser, text, len);
    int rc = walk_document(w);
    yaml_parser_delete(&w->parser);
    return rc;
}

static int load_file(spar_config *cfg, const char *path, int includes, spar_err *err) {
    FILE *f = fopen(path, "rb");
    if (!f)
        return spar__err_set(err, SPAR_EIO, "cannot open experiment file '%s': %s", path,
                             strerror(errno));
    struct stat st; /* the YAML parser would only say "input error", or read no keys */
    bool known = fstat(fileno(f), &st) == 0, dir = known && S_ISDIR(st.st_mode);
    if (dir || (known && S_ISREG(st.st_mode) && st.st_size == 0)) {
        fclose(f);
        return spar__err_set(err, SPAR_EIO,
                             "experiment file '%s' is %s (allowed: a YAML mapping of keys to "
                             "values)",
                             path, dir ? "a directory" : "empty");
    }
    walker w = {.cfg = cfg, .path = path, .err = err, .includes = includes, .read_includes = true};
    int rc = load_stream(&w, f, NULL, 0);
    fclose(f);
    return rc;
}

int spar__config_load_yaml(spar_config *cfg, const char *path, spar_err *err) {
    snprintf(cfg->file, sizeof cfg->file, "%s", path);
    return load_file(cfg, path, 0, err);
}

int spar__config_load_yaml_text(spar_config *cfg, const char *name, const unsigned char *text,
                                size_t len, bool read_includes, spar_err *err) {
    snprintf(cfg->file, sizeof cfg->file, "%s", name);
    walker w = {.cfg = cfg, .path = name, .err = err, .read_includes = read_includes};
    return load_stream(&w, NULL, text, len);
}
