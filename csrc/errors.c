/* errors.c -- thread-local error messages and dtype facts shared by every back end. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "check.h"

static _Thread_local char last_error[512];

const char *mos_last_error(void) { return last_error; }

mos_status mos_set_error(mos_status status, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, args);
    va_end(args);
    return status;
}

size_t mos_dtype_size(mos_dtype dtype) {
    switch (dtype) {
    case MOS_F32: return 4;
    case MOS_F64: return 8;
    case MOS_F16: return 2;
    case MOS_BF16: return 2;
    }
    return 0;
}

const char *mos_dtype_name(mos_dtype dtype) {
    switch (dtype) {
    case MOS_F32: return "float32";
    case MOS_F64: return "float64";
    case MOS_F16: return "float16";
    case MOS_BF16: return "bfloat16";
    }
    return "unknown";
}

/* Users read these messages as Python exceptions, so the source location is added only in debug
 * builds (MOS_DEBUG=1), where it helps whoever works on the core. */
mos_status mos_check_fail(mos_status status, const char *file, int line, const char *fmt, ...) {
    char message[400];
    va_list args;
    va_start(args, fmt);
    vsnprintf(message, sizeof message, fmt, args);
    va_end(args);
#ifdef MOS_DEBUG
    const char *base = strrchr(file, '/');
    return mos_set_error(status, "%s [%s:%d]", message, base ? base + 1 : file, line);
#else
    return mos_set_error(status, "%s", message);
#endif
}
