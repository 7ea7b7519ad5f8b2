/* npy.c: NumPy .npy headers (format versions 1.0, 2.0 and 3.0).
 *
 * Only what spar exchanges with users: float32 ('<f4') arrays in C order. The header is
 * parsed strictly, and the file must be long enough for the declared shape, so that a
 * truncated or lying file is refused before anything is read.
 */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "launcher.h"

#define MAX_HEADER (1 << 16)

/* The value text after 'key': in the header dict, or NULL. */
static const char *dict_value(const char *dict, const char *key) {
    char quoted[32];
    snprintf(quoted, sizeof quoted, "'%s'", key);
    const char *p = strstr(dict, quoted);
    if (!p) return NULL;
    p += strlen(quoted);
    while (isspace((unsigned char)*p))
        p++;
    if (*p != ':') return NULL;
    p++;
    while (isspace((unsigned char)*p))
        p++;
    return p;
}

static int parse_shape(const char *p, spar_npy_info *info) {
    if (*p != '(') return 0;
    p++;
    info->ndim = 0;
    for (;;) {
        while (isspace((unsigned char)*p) || *p == ',')
            p++;
        if (*p == ')') return 1;
        if (!isdigit((unsigned char)*p) || info->ndim == 8) return 0;
        char *end;
        errno = 0;
        long long x = strtoll(p, &end, 10);
        if (errno == ERANGE || x < 0) return 0;
        info->shape[info->ndim++] = x;
        p = end;
    }
}

static int parse_dict(const char *dict, spar_npy_info *info) {
    const char *d = dict_value(dict, "descr"), *f = dict_value(dict, "fortran_order");
    const char *s = dict_value(dict, "shape");
    if (!d || !f || !s || *d != '\'') return 0;
    const char *end = strchr(d + 1, '\'');
    if (!end || end - d - 1 >= (long)sizeof info->descr) return 0;
    memcpy(info->descr, d + 1, (size_t)(end - d - 1));
    info->descr[end - d - 1] = '\0';
    if (strncmp(f, "True", 4) == 0)
        info->fortran_order = true;
    else if (strncmp(f, "False", 5) == 0)
        info->fortran_order = false;
    else
        return 0;
    return parse_shape(s, info);
}

int spar__npy_read_info(const char *path, spar_npy_info *info, spar_err *err) {
    memset(info, 0, sizeof *info);
    struct stat st;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode))
        return spar__err_set(err, SPAR_EIO, "'%s' is a directory, not a .npy file", path);
    FILE *fp = fopen(path, "rb");
    if (!fp) return spar__err_set(err, SPAR_EIO, "cannot open '%s': %s", path, strerror(errno));
    unsigned char pre[12];
    int rc = SPAR_EFORMAT;
    char *dict = NULL;
    size_t got = fread(pre, 1, sizeof pre, fp);
    if (got < 10 || memcmp(pre, "\x93NUMPY", 6) != 0) {
        spar__err_set(err, rc, "'%s' is not a .npy file (bad magic)", path);
        goto done;
    }
    int major = pre[6];
    if (major > 1 && got < 12) {
        spar__err_set(err, rc, "'%s': truncated .npy header", path);
        goto done;
    }
    size_t hlen = major == 1 ? (size_t)pre[8] | (size_t)pre[9] << 8
                             : (size_t)pre[8] | (size_t)pre[9] << 8 | (size_t)pre[10] << 16 |
                                   (size_t)pre[11] << 24;
    size_t prefix = major == 1 ? 10 : 12;
    if (major < 1 || major > 3 || hlen > MAX_HEADER) {
        spar__err_set(err, rc, "'%s': unsupported .npy version %d or header size %zu", path, major,
                      hlen);
        goto done;
    }
    dict = calloc(1, hlen + 1);
    if (!dict || fseek(fp, (long)prefix, SEEK_SET) != 0 || fread(dict, 1, hlen, fp) != hlen) {
        spar__err_set(err, rc, "'%s': truncated .npy header", path);
        goto done;
    }
    if (!parse_dict(dict, info)) {
        spar__err_set(err, rc, "'%s': malformed .npy header: %.200s", path, dict);
        goto done;
    }
    info->data_offset = (int64_t)(prefix + hlen);
    rc = SPAR_OK;
done:
    free(dict);
    fclose(fp);
    return rc;
}

static void shape_text(int ndim, const int64_t *shape, char *out, size_t len) {
    size_t used = (size_t)snprintf(out, len, "(");
    for (int i = 0; i < ndim && used < len; i++)
        used +=
            (size_t)snprintf(out + used, len - used, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (used < len) snprintf(out + used, len - used, ")");
}

int spar__npy_check(const char *key, const char *path, int ndim, const int64_t *shape,
                    spar_npy_info *info, spar_err *err) {
    spar_err inner;
    int rc = spar__npy_read_info(path, info, &inner);
    if (rc != 0) return spar__err_set(err, rc, "key %s: %s", key, inner.msg);
    if (strcmp(info->descr, "<f4") != 0)
        return spar__err_set(err, SPAR_ESHAPE,
                             "key %s: '%s' has dtype '%s' but float32 ('<f4') "
                             "is required (use arr.astype(np.float32))",
                             key, path, info->descr);
    if (info->fortran_order)
        return spar__err_set(err, SPAR_ESHAPE,
                             "key %s: '%s' is in Fortran order but C order is "
                             "required (use np.ascontiguousarray)",
                             key, path);
    char want[96], got[96];
    shape_text(ndim, shape, want, sizeof want);
    shape_text(info->ndim, info->shape, got, sizeof got);
    bool same = info->ndim == ndim;
    for (int i = 0; same && i < ndim; i++)
        same = info->shape[i] == shape[i];
    if (!same)
        return spar__err_set(err, SPAR_ESHAPE, "key %s: '%s' has shape %s but %s is required", key,
                             path, got, want);
    double bytes = 4.0;
    for (int i = 0; i < ndim; i++)
        bytes *= (double)shape[i];
    struct stat st;
    if (stat(path, &st) != 0 || (double)st.st_size < (double)info->data_offset + bytes)
        return spar__err_set(err, SPAR_EFORMAT,
                             "key %s: '%s' is truncated: shape %s needs %.0f "
                             "data bytes",
                             key, path, got, bytes);
    return SPAR_OK;
}

int64_t spar__npy_write_header(int fd, int ndim, const int64_t *shape) {
    return spar__npy_write_header_as(fd, "<f4", ndim, shape);
}

int64_t spar__npy_write_header_as(int fd, const char *descr, int ndim, const int64_t *shape) {
    char dict[256], shp[128];
    shape_text(ndim, shape, shp, sizeof shp);
    if (ndim == 1) /* a one-element tuple needs its comma */
        snprintf(shp, sizeof shp, "(%lld,)", (long long)shape[0]);
    int n = snprintf(dict, sizeof dict, "{'descr': '%s', 'fortran_order': False, 'shape': %s, }",
                     descr, shp);
    size_t total = 10 + (size_t)n + 1; /* magic+version+len, dict, newline */
    size_t pad = (64 - total % 64) % 64;
    size_t hlen = (size_t)n + pad + 1;
    unsigned char head[10 + 256 + 64];
    memcpy(head, "\x93NUMPY\x01\x00", 8);
    head[8] = (unsigned char)(hlen & 0xff);
    head[9] = (unsigned char)(hlen >> 8);
    memcpy(head + 10, dict, (size_t)n);
    memset(head + 10 + n, ' ', pad);
    head[10 + (size_t)n + pad] = '\n';
    size_t len = 10 + hlen;
    if (write(fd, head, len) != (ssize_t)len) return -1;
    return (int64_t)len;
}
