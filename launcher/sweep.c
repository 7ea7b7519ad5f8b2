/* sweep.c: the grid of a `sweep:` block, and which of its points a results file already
 * holds.
 *
 * Point i of the grid takes, for each swept key k, value (i / prod of the earlier keys'
 * counts) mod count_k: the first key varies fastest. A point's configuration is the
 * file, then the point's values, then --set (which may not name a swept key).
 *
 * Each point has an id: a hash of the command, the world size and every key's effective
 * value. Records carry it; a restarted sweep skips the points whose finished record
 * ("run" or "bench") is already in output.results, so an interrupted job picks up where
 * it stopped. Changing any setting changes the id, and that point runs again.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "launcher.h"

/* 8 keys of 32 values would be 2^40 points: every point is checked before the first runs,
 * so a grid this large is refused rather than validated for hours. */
#define MAX_POINTS 65536

/* The grid's size, or MAX_POINTS + 1 for any larger grid (the product could overflow). */
int spar__grid_points(const spar_sweep *sw) {
    int64_t count = 1;
    for (int k = 0; k < sw->nkeys && count <= MAX_POINTS; k++)
        count *= sw->nvalues[k];
    return count > MAX_POINTS ? MAX_POINTS + 1 : (int)count;
}

int spar__point_config(const char *const *sets, int nsets, const spar_config *file, int index,
                       spar_config *out, spar_err *err) {
    const spar_sweep *sw = &file->sweep;
    memcpy(out, file, sizeof *out);
    for (int k = 0; k < sw->nkeys; k++) {
        int which = index % sw->nvalues[k];
        index /= sw->nvalues[k];
        SPAR_TRY(spar__config_set(out, spar__keys[sw->key[k]].name, sw->value[k][which],
                                  SPAR_FROM_SWEEP, 0, err));
    }
    for (int i = 0; i < nsets; i++) {
        SPAR_TRY(spar__config_set_arg(out, sets[i], err));
        for (int k = 0; k < sw->nkeys; k++)
            if (out->origin[sw->key[k]] == SPAR_FROM_COMMAND_LINE)
                return spar__err_set(err, SPAR_EINVAL,
                                     "key %s is swept in %s and set with --set (allowed: one "
                                     "of the two)",
                                     spar__keys[sw->key[k]].name, file->file);
    }
    return SPAR_OK;
}

int spar__check_grid(const char *const *sets, int nsets, const spar_config *file, int world,
                     spar_config *scratch) {
    spar_err err = {""};
    const spar_sweep *sw = &file->sweep;
    if (spar__grid_points(sw) > MAX_POINTS) {
        char counts[128] = "";
        for (int k = 0; k < sw->nkeys; k++)
            snprintf(counts + strlen(counts), sizeof counts - strlen(counts), "%s%d",
                     k ? " x " : "", sw->nvalues[k]);
        return spar_errorf(SPAR_EINVAL,
                           "%s: sweep: %s values make more than %d points (allowed: at most %d; "
                           "split the sweep over several files)",
                           file->file, counts, MAX_POINTS, MAX_POINTS);
    }
    for (int i = 0, n = spar__grid_points(sw); i < n; i++) {
        int rc = spar__point_config(sets, nsets, file, i, scratch, &err);
        if (rc == 0) rc = spar__config_validate(scratch, world, &err);
        if (rc != 0 && n == 1) return spar_errorf(rc, "%s", err.msg);
        if (rc != 0) return spar_errorf(rc, "%s (sweep point %d of %d)", err.msg, i + 1, n);
    }
    return SPAR_OK;
}

/* FNV-1a, 64 bits: stable across builds and hosts. */
static uint64_t fnv1a(uint64_t h, const char *s) {
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 0x100000001b3ULL;
    return h;
}

void spar__point_id(const spar_config *cfg, const char *command, int ranks, char id[17]) {
    char text[1100];
    uint64_t h = fnv1a(0xcbf29ce484222325ULL, command);
    snprintf(text, sizeof text, "|%d", ranks);
    h = fnv1a(h, text);
    for (int k = 0; k < SPAR_KEY_COUNT; k++) {
        spar__value_format(cfg, k, text, sizeof text);
        h = fnv1a(fnv1a(fnv1a(h, spar__keys[k].name), "="), text);
    }
    snprintf(id, 17, "%016llx", (unsigned long long)h);
}

/* A whole line (ending in a newline and a closing brace) of a finished point. */
static bool finished_line(const char *line, size_t len) {
    if (len < 2 || line[len - 1] != '\n' || line[len - 2] != '}') return false;
    return strncmp(line, "{\"record\":\"run\"", 15) == 0 ||
           strncmp(line, "{\"record\":\"bench\"", 17) == 0;
}

int spar__results_done(const char *path, spar_done *done) {
    *done = (spar_done){0};
    FILE *f = *path ? fopen(path, "r") : NULL;
    if (!f) return SPAR_OK; /* nothing recorded yet */
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    int rc = SPAR_OK;
    while (rc == 0 && (len = getline(&line, &cap, f)) > 0) {
        const char *at = strstr(line, "\"point_id\":\"");
        if (!finished_line(line, (size_t)len) || !at) continue;
        if (done->count == done->cap) {
            int cap2 = done->cap ? 2 * done->cap : 16;
            char(*ids)[17] = realloc(done->ids, (size_t)cap2 * sizeof *ids);
            if (!ids) {
                rc = SPAR_ENOMEM;
                break;
            }
            done->ids = ids, done->cap = cap2;
        }
        snprintf(done->ids[done->count++], 17, "%.16s", at + 12);
    }
    free(line);
    fclose(f);
    return rc;
}

bool spar__results_has(const spar_done *done, const char *id) {
    for (int i = 0; i < done->count; i++)
        if (strcmp(done->ids[i], id) == 0) return true;
    return false;
}

void spar__results_done_free(spar_done *done) {
    free(done->ids);
    *done = (spar_done){0};
}
