// Every C entry point runs its body through guarded(): C++ exceptions must not
// cross the C ABI, so they become status codes here.
#pragma once

#include "core/error.h"

#include <exception>
#include <new>

namespace qattn {

template <typename Body>
qattn_status guarded(const char* function, Body&& body) noexcept {
    try {
        return body();
    } catch (const std::bad_alloc&) {
        return fail(QATTN_ERROR_OUT_OF_MEMORY, "%s: out of host memory", function);
    } catch (const std::exception& e) {
        return fail(QATTN_ERROR_INTERNAL, "%s: %s", function, e.what());
    } catch (...) {
        return fail(QATTN_ERROR_INTERNAL, "%s: unknown exception", function);
    }
}

}  // namespace qattn
