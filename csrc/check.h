/* check.h -- the status-returning check macros of the C core (never exits, never prints). */
#ifndef MOS_CHECK_H
#define MOS_CHECK_H

#include "mos.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Returns `status` with "<message>" recorded when `cond` is false ("<message> [file:line]" in
 * MOS_DEBUG builds). */
#define MOS_CHECK(cond, status, ...)                                                     \
    do {                                                                                 \
        if (!(cond)) return mos_check_fail((status), __FILE__, __LINE__, __VA_ARGS__);  \
    } while (0)

/* Propagates a failing status unchanged. */
#define MOS_TRY(expr)                         \
    do {                                      \
        mos_status mos_try_status_ = (expr);  \
        if (mos_try_status_ != MOS_OK) return mos_try_status_; \
    } while (0)

mos_status mos_check_fail(mos_status status, const char *file, int line, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;

#ifdef __cplusplus
}
#endif

#endif
