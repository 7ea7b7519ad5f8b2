/* tensor_io.c: moving [N, row] tensors between files (or a generator) and the ranks.
 *
 * Rank 0 does all file I/O, one rank's rows at a time, so that no shared file system is
 * needed and rank 0 never holds more than one chunk beyond its own. Random inputs are a
 * pure function of (seed, stream, row, column): every rank generates its own rows and
 * gets the same numbers whatever the partition.
 *
 * A failure on rank 0 midway (a read error) does not stop the exchange, since the other
 * ranks are waiting on it: the rows go out as zeros and the status comes back to the
 * caller, which makes every rank agree on it.
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "launcher.h"

enum { TAG_ROWS = 7200 };

static uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/* Standard normal from one hash by Box-Muller on its two 32-bit halves. */
static float random_normal(uint64_t key, uint64_t index) {
    uint64_t h = splitmix64(key ^ splitmix64(index));
    double u1 = ((double)(h >> 32) + 1.0) / 4294967297.0; /* (0, 1) */
    double u2 = (double)(h & 0xffffffffu) / 4294967296.0;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

static int read_rows(const spar_row_source *src, int fd, int64_t row, int64_t count,
                     int64_t row_floats, float *out) {
    size_t bytes = (size_t)(count * row_floats) * sizeof(float);
    off_t off = (off_t)(src->data_offset + row * row_floats * (int64_t)sizeof(float));
    for (size_t done = 0; done < bytes;) {
        ssize_t got = pread(fd, (char *)out + done, bytes - done, off + (off_t)done);
        if (got <= 0)
            return spar_errorf(SPAR_EIO, "reading '%s': %s", src->path,
                               got < 0 ? strerror(errno) : "unexpected end of file");
        done += (size_t)got;
    }
    return SPAR_OK;
}

int spar__rows_fill(const spar_row_source *src, const spar_partition *part, int rank,
                    int64_t row_floats, float *out) {
    int64_t nseg = spar_partition_segments(part, rank, NULL);
    spar_segment *seg = malloc(sizeof *seg * (size_t)nseg);
    if (!seg) return SPAR_ENOMEM;
    spar_partition_segments(part, rank, seg);
    int rc = SPAR_OK, fd = -1;
    if (src->path && src->data_offset < 0)
        rc = SPAR_EFORMAT; /* the header was refused already (and reported) */
    else if (src->path && (fd = open(src->path, O_RDONLY)) < 0)
        rc = spar_errorf(SPAR_EIO, "cannot open '%s': %s", src->path, strerror(errno));
    uint64_t key = splitmix64(src->seed * 0x100000001B3ull + src->stream);
    for (int64_t s = 0; s < nseg && rc == 0; s++) {
        float *dst = out + seg[s].local_start * row_floats;
        if (src->path) {
            rc = read_rows(src, fd, seg[s].start, seg[s].len, row_floats, dst);
            continue;
        }
        for (int64_t i = 0; i < seg[s].len * row_floats; i++)
            dst[i] = random_normal(key, (uint64_t)(seg[s].start * row_floats + i));
    }
    if (fd >= 0) close(fd);
    free(seg);
    return rc;
}

int spar__rows_scatter(spar_comm *comm, const spar_partition *part, const spar_row_source *src,
                       int64_t row_floats, float *local) {
    int rank = spar_comm_rank(comm);
    if (!src->path) return spar__rows_fill(src, part, rank, row_floats, local);
    size_t row_bytes = (size_t)row_floats * sizeof(float);
    if (rank != 0)
        return spar_comm_recv(comm, local, (size_t)spar_partition_local_len(part, rank) * row_bytes,
                              0, TAG_ROWS);
    int status = SPAR_OK;
    float *tmp = malloc((size_t)spar_partition_max_local_len(part) * row_bytes);
    if (!tmp) { /* the other ranks are waiting in their receives: end the job */
        spar_log_error("cannot allocate %zu bytes to send rows", row_bytes);
        spar_comm_abort(comm, SPAR_EXIT_FAILURE);
    }
    for (int r = 1; r < part->ranks; r++) {
        size_t bytes = (size_t)spar_partition_local_len(part, r) * row_bytes;
        int rc = spar__rows_fill(src, part, r, row_floats, tmp);
        if (rc != 0) {
            status = status ? status : rc;
            memset(tmp, 0, bytes);
        }
        if ((rc = spar_comm_send(comm, tmp, bytes, r, TAG_ROWS)) != 0) {
            free(tmp);
            return rc;
        }
    }
    free(tmp);
    int rc = spar__rows_fill(src, part, 0, row_floats, local);
    return status ? status : rc;
}

/* Rank 0 receives each rank's rows in turn and hands every segment to `place`. */
typedef int (*place_fn)(void *ctx, const spar_segment *seg, const float *rows);

static int collect(spar_comm *comm, const spar_partition *part, int64_t row_floats,
                   const float *local, place_fn place, void *ctx) {
    int rank = spar_comm_rank(comm);
    size_t row_bytes = (size_t)row_floats * sizeof(float);
    if (rank != 0)
        return spar_comm_send(comm, local, (size_t)spar_partition_local_len(part, rank) * row_bytes,
                              0, TAG_ROWS);
    int64_t max_len = spar_partition_max_local_len(part);
    float *tmp = part->ranks > 1 ? malloc((size_t)max_len * row_bytes) : NULL;
    spar_segment *seg = malloc(sizeof *seg * (size_t)max_len);
    int status = SPAR_OK;
    if ((part->ranks > 1 && !tmp) || !seg) {
        free(tmp);
        free(seg);
        return SPAR_ENOMEM;
    }
    for (int r = 0; r < part->ranks; r++) {
        const float *rows = local;
        if (r > 0) {
            int rc = spar_comm_recv(
                comm, tmp, (size_t)spar_partition_local_len(part, r) * row_bytes, r, TAG_ROWS);
            if (rc != 0) {
                status = rc;
                break;
            }
            rows = tmp;
        }
        int64_t nseg = spar_partition_segments(part, r, seg);
        for (int64_t s = 0; s < nseg && status == 0 && place; s++) /* no place: drain only */
            status = place(ctx, &seg[s], rows + seg[s].local_start * row_floats);
    }
    free(tmp);
    free(seg);
    return status;
}

typedef struct file_sink {
    int fd;
    int64_t data_offset, row_floats;
    const char *path;
} file_sink;

static int place_in_file(void *ctx, const spar_segment *seg, const float *rows) {
    file_sink *f = ctx;
    size_t bytes = (size_t)(seg->len * f->row_floats) * sizeof(float);
    off_t off = (off_t)(f->data_offset + seg->start * f->row_floats * (int64_t)sizeof(float));
    for (size_t done = 0; done < bytes;) {
        ssize_t put = pwrite(f->fd, (const char *)rows + done, bytes - done, off + (off_t)done);
        if (put <= 0) return spar_errorf(SPAR_EIO, "writing '%s': %s", f->path, strerror(errno));
        done += (size_t)put;
    }
    return SPAR_OK;
}

int spar__rows_write_npy(spar_comm *comm, const spar_partition *part, const char *path, int ndim,
                         const int64_t *shape, const float *local) {
    int64_t row_floats = 1;
    for (int i = 1; i < ndim; i++)
        row_floats *= shape[i];
    if (spar_comm_rank(comm) != 0) return collect(comm, part, row_floats, local, NULL, NULL);
    /* Write beside the final name, then rename: readers never see half a file. */
    char tmp_path[4200];
    snprintf(tmp_path, sizeof tmp_path, "%s.tmp-%d", path, (int)getpid());
    file_sink f = {open(tmp_path, O_WRONLY | O_CREAT | O_TRUNC, 0644), 0, row_floats, path};
    int rc = SPAR_OK;
    if (f.fd < 0)
        rc = spar_errorf(SPAR_EIO, "cannot create '%s': %s", tmp_path, strerror(errno));
    else if ((f.data_offset = spar__npy_write_header(f.fd, ndim, shape)) < 0)
        rc = spar_errorf(SPAR_EIO, "writing '%s': %s", tmp_path, strerror(errno));
    int crc = collect(comm, part, row_floats, local, rc == 0 ? place_in_file : NULL, &f);
    rc = rc ? rc : crc;
    if (f.fd >= 0) {
        if (rc == 0 && fsync(f.fd) != 0)
            rc = spar_errorf(SPAR_EIO, "writing '%s': %s", tmp_path, strerror(errno));
        close(f.fd);
    }
    if (rc == 0 && rename(tmp_path, path) != 0)
        rc = spar_errorf(SPAR_EIO, "cannot rename '%s' to '%s': %s", tmp_path, path,
                         strerror(errno));
    if (rc != 0 && f.fd >= 0) unlink(tmp_path);
    return rc;
}

typedef struct memory_sink {
    float *full;
    int64_t row_floats;
} memory_sink;

static int place_in_memory(void *ctx, const spar_segment *seg, const float *rows) {
    memory_sink *m = ctx;
    memcpy(m->full + seg->start * m->row_floats, rows,
           (size_t)(seg->len * m->row_floats) * sizeof(float));
    return SPAR_OK;
}

int spar__rows_gather(spar_comm *comm, const spar_partition *part, int64_t row_floats,
                      const float *local, float *full) {
    memory_sink m = {full, row_floats};
    return collect(comm, part, row_floats, local, place_in_memory, &m);
}
