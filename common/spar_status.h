/* spar_status.h: the status codes, check macros and log lines every room shares.
 *
 * Every spar function returns an int status: 0 for success or a negative SPAR_E*
 * code, and spar_strerror() names it. Errors travel up with SPAR_TRY; only the
 * launcher decides to exit or abort. Log lines carry "[rank r/host]" once the comm
 * room has told us who we are (spar_log_set_identity), so a message from a cluster
 * job says where it came from.
 *
 * Defines: spar_status codes, spar_strerror, SPAR_TRY, SPAR_CHECK_GENERIC,
 *          spar_log_*, spar_errorf, spar_print0.
 * Leaves out: anything about MPI or CUDA (their check macros live in their rooms and
 *             call SPAR_CHECK_GENERIC).
 */
#ifndef SPAR_STATUS_H
#define SPAR_STATUS_H

#include <stdarg.h>

enum spar_status {
    SPAR_OK = 0,
    SPAR_EINVAL = -1,  /* a value outside what is allowed (bad input) */
    SPAR_ENOMEM = -2,  /* an allocation failed */
    SPAR_EIO = -3,     /* a file could not be read or written */
    SPAR_EFORMAT = -4, /* a file or message is malformed */
    SPAR_ESHAPE = -5,  /* a tensor's shape or dtype differs from what is required */
    SPAR_ECOMM = -6,   /* the network layer failed */
    SPAR_EUNSUP = -7,  /* valid request that this build or issue does not support */
    SPAR_EVERIFY = -8, /* the result differs from the reference beyond tolerance */
    SPAR_EPEER = -9,   /* another rank reported a failure */
};

/* Returns a short name for a status code ("invalid input", ...). */
const char *spar_strerror(int status);

/* True for codes caused by what the user gave us (exit code 2 at the top). */
int spar_status_is_input_error(int status);

/* Pass a failure up the stack; the callee has already said what went wrong. */
#define SPAR_TRY(expr)                                                                             \
    do {                                                                                           \
        int spar_try_rc_ = (expr);                                                                 \
        if (spar_try_rc_ != 0) return spar_try_rc_;                                                \
    } while (0)

/* One generic check used by the MPI/CUDA/UCX wrappers: when `failed` is true, print the
 * expression, file:line and a detail string from the library, and return `status`. */
#define SPAR_CHECK_GENERIC(failed, expr_text, detail, status)                                      \
    do {                                                                                           \
        if (failed) {                                                                              \
            spar_log_error("%s failed at %s:%d: %s", (expr_text), __FILE__, __LINE__, (detail));   \
            return (status);                                                                       \
        }                                                                                          \
    } while (0)

enum spar_log_level {
    SPAR_LOG_ERROR = 0,
    SPAR_LOG_WARN = 1,
    SPAR_LOG_INFO = 2,
    SPAR_LOG_DEBUG = 3
};

/* Tell the log who we are; until then lines carry no rank prefix. */
void spar_log_set_identity(int rank, int size, const char *host);
void spar_log_set_level(enum spar_log_level level);
enum spar_log_level spar_log_get_level(void);

void spar_log_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void spar_log_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void spar_log_info(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void spar_log_debug(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Print "error: ..." (with the rank prefix) and return `status`: lets a check read as
 * `return spar_errorf(SPAR_EINVAL, "key %s: ...", ...)`. */
int spar_errorf(int status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Print on rank 0 only (rank unknown counts as rank 0): the job's summary voice. */
void spar_print0(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int spar_log_rank(void);

#endif
