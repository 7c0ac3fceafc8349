// Checks shared by the entry points.
#pragma once

#include "core/device.h"
#include "core/error.h"

#include <cstring>

namespace qattn {

// Size-prefixed structs: a caller built against an older header passes a smaller
// struct; the fields it does not know keep their defaults. A larger struct comes
// from a newer header whose fields this library would silently ignore: refused.
template <typename T>
qattn_status read_versioned(const char* name, const T* in, const T& defaults, T* out) {
    QATTN_REQUIRE_ARG(in != nullptr, "%s is NULL", name);
    const size_t size = in->struct_size;
    QATTN_REQUIRE_ARG(size >= sizeof(size_t) + sizeof(int) && size <= sizeof(T),
                      "%s.struct_size is %zu; expected %zu (set it with the *_default() initialiser)", name,
                      size, sizeof(T));
    *out = defaults;
    std::memcpy(static_cast<void*>(out), in, size);
    out->struct_size = sizeof(T);
    return QATTN_SUCCESS;
}

inline qattn_status check_device(int device) {
    if (device == QATTN_DEVICE_CPU) return QATTN_SUCCESS;
    QATTN_REQUIRE_ARG(device >= 0, "device must be QATTN_DEVICE_CPU (-1) or a CUDA ordinal >= 0, got %d", device);
#if defined(QATTN_WITH_CUDA)
    const int count = cuda_device_count();
    QATTN_REQUIRE(device < count, QATTN_ERROR_NOT_SUPPORTED,
                  "CUDA device %d is not available (this machine has %d usable CUDA devices)", device, count);
    return QATTN_SUCCESS;
#else
    return fail(QATTN_ERROR_NOT_SUPPORTED,
                "CUDA device %d requested, but this build of qattn has no CUDA backend (CPU only)", device);
#endif
}

// An activation pointer given to a forward call: non-null, element-aligned, and in
// the memory of the layer's device.
inline qattn_status check_tensor(const void* ptr, const char* name, int device, size_t alignment) {
    QATTN_REQUIRE_ARG(ptr != nullptr, "%s is NULL", name);
    QATTN_REQUIRE_ARG(reinterpret_cast<uintptr_t>(ptr) % alignment == 0, "%s (%p) is not %zu-byte aligned", name,
                      ptr, alignment);
    const PointerInfo where = locate(ptr);
    if (device == QATTN_DEVICE_CPU) {
        QATTN_REQUIRE_ARG(!where.on_cuda_device, "%s is in CUDA device %d memory, but the layer is on the CPU",
                          name, where.device);
    } else {
        QATTN_REQUIRE_ARG(where.on_cuda_device && where.device == device,
                          "%s must be in the memory of CUDA device %d (it is in %s memory)", name, device,
                          where.on_cuda_device ? "another device's" : "host");
    }
    return QATTN_SUCCESS;
}

}  // namespace qattn
