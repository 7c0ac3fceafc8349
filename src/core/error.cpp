#include "core/error.h"

#include <cstdarg>
#include <cstdio>

namespace qattn {

namespace {
thread_local std::string t_last_error;
}

qattn_status fail(qattn_status status, const char* format, ...) {
    char buffer[1024];
    va_list args;
    va_start(args, format);
    std::vsnprintf(buffer, sizeof buffer, format, args);
    va_end(args);
    t_last_error = buffer;
    return status;
}

const std::string& last_error() { return t_last_error; }

}  // namespace qattn

extern "C" {

const char* qattn_last_error(void) { return qattn::last_error().c_str(); }

const char* qattn_status_string(qattn_status status) {
    switch (status) {
        case QATTN_SUCCESS: return "QATTN_SUCCESS";
        case QATTN_ERROR_INVALID_ARGUMENT: return "QATTN_ERROR_INVALID_ARGUMENT";
        case QATTN_ERROR_OUT_OF_RANGE: return "QATTN_ERROR_OUT_OF_RANGE";
        case QATTN_ERROR_NOT_SUPPORTED: return "QATTN_ERROR_NOT_SUPPORTED";
        case QATTN_ERROR_OUT_OF_MEMORY: return "QATTN_ERROR_OUT_OF_MEMORY";
        case QATTN_ERROR_CUDA: return "QATTN_ERROR_CUDA";
        case QATTN_ERROR_INTERNAL: return "QATTN_ERROR_INTERNAL";
    }
    return "QATTN_STATUS_UNKNOWN";
}

}  // extern "C"
