// Thread-local last-error message and the helpers every entry point uses to
// turn a failed check into a status code plus a readable message.
#pragma once

#include "qattn.h"

#include <string>

namespace qattn {

// Records the message for qattn_last_error() and returns `status`, so checks read
// `return fail(QATTN_ERROR_INVALID_ARGUMENT, "...", ...);`.
qattn_status fail(qattn_status status, const char* format, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

const std::string& last_error();

}  // namespace qattn

// Early-return helpers for validation code: the message names the problem.
#define QATTN_REQUIRE(cond, status, ...)                                       \
    do {                                                                       \
        if (!(cond)) return ::qattn::fail((status), __VA_ARGS__);              \
    } while (0)

#define QATTN_REQUIRE_ARG(cond, ...) QATTN_REQUIRE(cond, QATTN_ERROR_INVALID_ARGUMENT, __VA_ARGS__)

#define QATTN_TRY(expr)                                                        \
    do {                                                                       \
        qattn_status qattn_try_status_ = (expr);                               \
        if (qattn_try_status_ != QATTN_SUCCESS) return qattn_try_status_;      \
    } while (0)
