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

/* numpy's dtype.str: a byte order, a kind letter, a size ('<f4', '|u1', '<M8[ns]'). The
 * header's keys are found by their text, so a descr that is not a type string (such as
 * 'shape') would let one key be read from another's value. */
static bool is_type_string(const char *t) {
    return t[0] && strchr("<>|=", t[0]) && isalpha((unsigned char)t[1]) &&
           strspn(t + 1, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789[]") ==
               strlen(t + 1);
}

static int parse_dict(const char *dict, spar_npy_info *info) {
    const char *d = dict_value(dict, "descr"), *f = dict_value(dict, "fortran_order");
    const char *s = dict_value(dict, "shape");
    if (!d || !f || !s || *d != '\'') return 0;
    const char *end = strchr(d + 1, '\'');
    if (!end || end - d - 1 >= (long)sizeof info->descr) return 0;
    memcpy(info->descr, d + 1, (size_t)(end - d - 1));
    info->descr[end - d - 1] = '\0';
    if (!is_type_string(info->descr)) return 0;
    if (strncmp(f, "True", 4) == 0)
        info->fortran_order = true;
    else if (strncmp(f, "False", 5) == 0)
        info->fortran_order = false;
    else
        return 0;
    return parse_shape(s, info);
}

int spar__npy_parse_info(const unsigned char *buf, size_t len, const char *name,
                         spar_npy_info *info, spar_err *err) {
    memset(info, 0, sizeof *info);
    if (len < 10 || memcmp(buf, "\x93NUMPY", 6) != 0)
        return spar__err_set(err, SPAR_EFORMAT, "'%s' is not a .npy file (bad magic)", name);
    int major = buf[6];
    if (major < 1 || major > 3)
        return spar__err_set(err, SPAR_EFORMAT, "'%s': unsupported .npy version %d", name, major);
    size_t prefix = major == 1 ? 10 : 12; /* 1.0: 2-byte header length, later: 4 bytes */
    if (len < prefix) return spar__err_set(err, SPAR_EFORMAT, "'%s': truncated .npy header", name);
    size_t hlen = 0;
    for (size_t i = 8; i < prefix; i++)
        hlen |= (size_t)buf[i] << (8 * (i - 8));
    if (hlen > MAX_HEADER)
        return spar__err_set(err, SPAR_EFORMAT, "'%s': .npy header of %zu bytes (at most %d)", name,
                             hlen, MAX_HEADER);
    if (len - prefix < hlen)
        return spar__err_set(err, SPAR_EFORMAT, "'%s': truncated .npy header", name);
    char *dict = malloc(hlen + 1); /* the dict as a string: NUL-terminated */
    if (!dict) return spar__err_set(err, SPAR_ENOMEM, "'%s': no memory for the header", name);
    memcpy(dict, buf + prefix, hlen);
    dict[hlen] = '\0';
    int rc = SPAR_OK;
    if (!parse_dict(dict, info)) {
        size_t shown = strlen(dict); /* without the padding the format adds */
        while (shown > 0 && (dict[shown - 1] == ' ' || dict[shown - 1] == '\n'))
            shown--;
        rc = spar__err_set(err, SPAR_EFORMAT, "'%s': malformed .npy header: %.*s", name,
                           (int)(shown < 200 ? shown : 200), dict);
    } else {
        info->data_offset = (int64_t)(prefix + hlen);
    }
    free(dict);
    return rc;
}

int spar__npy_read_info(const char *path, spar_npy_info *info, spar_err *err) {
    memset(info, 0, sizeof *info);
    struct stat st;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode))
        return spar__err_set(err, SPAR_EIO, "'%s' is a directory, not a .npy file", path);
    FILE *fp = fopen(path, "rb");
    if (!fp) return spar__err_set(err, SPAR_EIO, "cannot open '%s': %s", path, strerror(errno));
    /* the longest header there can be; a shorter file is parsed as far as it goes */
    unsigned char *head = malloc(12 + MAX_HEADER);
    int rc = head ? spar__npy_parse_info(head, fread(head, 1, 12 + MAX_HEADER, fp), path, info, err)
                  : spar__err_set(err, SPAR_ENOMEM, "'%s': no memory for the header", path);
    free(head);
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
    char dict[512], shp[256]; /* 8 dimensions of 20 characters fit */
    if (ndim < 0 || ndim > 8) return -1;
    shape_text(ndim, shape, shp, sizeof shp);
    if (ndim == 1) /* a one-element tuple needs its comma */
        snprintf(shp, sizeof shp, "(%lld,)", (long long)shape[0]);
    int n = snprintf(dict, sizeof dict, "{'descr': '%s', 'fortran_order': False, 'shape': %s, }",
                     descr, shp);
    if (n < 0 || (size_t)n >= sizeof dict) return -1; /* never a header cut short */
    size_t total = 10 + (size_t)n + 1;                /* magic+version+len, dict, newline */
    size_t pad = (64 - total % 64) % 64;
    size_t hlen = (size_t)n + pad + 1;
    unsigned char head[10 + sizeof dict + 64];
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
