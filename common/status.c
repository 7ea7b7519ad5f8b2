/* status.c: status names and the log lines every room prints through. */
#include "spar_status.h"

#include <stdio.h>
#include <string.h>

static int log_rank = -1;
static int log_size = 0;
static char log_host[64] = "";
static enum spar_log_level log_level = SPAR_LOG_INFO;

const char *spar_strerror(int status) {
    switch (status) {
    case SPAR_OK: return "success";
    case SPAR_EINVAL: return "invalid input";
    case SPAR_ENOMEM: return "out of memory";
    case SPAR_EIO: return "file input/output error";
    case SPAR_EFORMAT: return "malformed file or message";
    case SPAR_ESHAPE: return "wrong tensor shape or dtype";
    case SPAR_ECOMM: return "communication failure";
    case SPAR_EUNSUP: return "not supported";
    case SPAR_EVERIFY: return "verification failed";
    case SPAR_EPEER: return "another rank failed";
    default: return "unknown status";
    }
}

int spar_status_is_input_error(int status) {
    return status == SPAR_EINVAL || status == SPAR_EIO || status == SPAR_EFORMAT ||
           status == SPAR_ESHAPE || status == SPAR_EUNSUP;
}

void spar_log_set_identity(int rank, int size, const char *host) {
    log_rank = rank;
    log_size = size;
    snprintf(log_host, sizeof log_host, "%s", host ? host : "");
}

void spar_log_set_level(enum spar_log_level level) {
    log_level = level;
}

enum spar_log_level spar_log_get_level(void) {
    return log_level;
}

int spar_log_rank(void) {
    return log_rank;
}

/* Lines go to stderr whole (one fprintf) so that ranks sharing a terminal do not
 * interleave inside a line. */
static void log_line(const char *tag, const char *fmt, va_list ap) {
    char msg[2048];
    vsnprintf(msg, sizeof msg, fmt, ap);
    if (log_rank >= 0 && log_size > 1)
        fprintf(stderr, "[rank %d/%s] %s%s\n", log_rank, log_host, tag, msg);
    else
        fprintf(stderr, "%s%s\n", tag, msg);
    fflush(stderr);
}

#define SPAR_LOG_FN(name, level, tag)                                                              \
    void name(const char *fmt, ...) {                                                              \
        if (log_level < (level)) return;                                                           \
        va_list ap;                                                                                \
        va_start(ap, fmt);                                                                         \
        log_line(tag, fmt, ap);                                                                    \
        va_end(ap);                                                                                \
    }

SPAR_LOG_FN(spar_log_error, SPAR_LOG_ERROR, "error: ")
SPAR_LOG_FN(spar_log_warn, SPAR_LOG_WARN, "warning: ")
SPAR_LOG_FN(spar_log_info, SPAR_LOG_INFO, "")
SPAR_LOG_FN(spar_log_debug, SPAR_LOG_DEBUG, "debug: ")

int spar_errorf(int status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    log_line("error: ", fmt, ap);
    va_end(ap);
    return status;
}

void spar_print0(const char *fmt, ...) {
    if (log_rank > 0) return;
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    fflush(stdout);
}
