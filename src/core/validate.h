// Checks shared by the entry points.
#pragma once

#include "core/device.h"
#include "core/error.h"

#include <cstdint>
#include <cstring>

namespace qattn {

// The largest QMatrix dimension. A layer's widths (H, NH * D, NKV * D) are QMatrix
// dimensions too, so they stay below it, and products of them fit an int64.
constexpr int64_t kMaxFeatures = int64_t(1) << 20;

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

// Pointers this thread has seen to be in the memory of a CUDA device. A decode
// step hands every layer the same few buffers (hidden state, RoPE tables, the
// caching allocator's recycled q/k/v blocks), and cudaPointerGetAttributes costs
// 0.3-1 us, several times per call; so each distinct pointer is asked about once.
// Only device memory is remembered: an address stays device memory while its
// allocation lives. Host pointers, the CPU layers' case, are asked about every time.
// Not caught: an allocation given back to the driver whose address comes back as
// another device's (or pinned host) memory and is passed in: a use after free,
// which the pointer query does not catch reliably either. Buffers tend to be freed
// with the layers that used them (model unload, tests), so destroying a layer
// empties the cache, which keeps such stale entries short-lived.
class DevicePointerCache {
public:
    bool contains(const void* ptr, int device) const {
        for (const Entry& e : entries_)
            if (e.ptr == ptr && e.device == device) return true;
        return false;
    }
    void add(const void* ptr, int device) {
        entries_[next_] = Entry{ptr, device};
        next_ = (next_ + 1) % kSize;
    }
    void clear() { *this = DevicePointerCache(); }

private:
    static constexpr int kSize = 32;
    struct Entry {
        const void* ptr = nullptr;
        int device = QATTN_DEVICE_CPU;
    };
    Entry entries_[kSize];
    int next_ = 0;
};

inline DevicePointerCache& device_pointer_cache() {
    static thread_local DevicePointerCache cache;
    return cache;
}

// An activation pointer given to a forward call: non-null, element-aligned, and in
// the memory of the layer's device.
inline qattn_status check_tensor(const void* ptr, const char* name, int device, size_t alignment) {
    QATTN_REQUIRE_ARG(ptr != nullptr, "%s is NULL", name);
    QATTN_REQUIRE_ARG(reinterpret_cast<uintptr_t>(ptr) % alignment == 0, "%s (%p) is not %zu-byte aligned", name,
                      ptr, alignment);
    if (device != QATTN_DEVICE_CPU && device_pointer_cache().contains(ptr, device)) return QATTN_SUCCESS;
    const PointerInfo where = locate(ptr);
    if (device == QATTN_DEVICE_CPU) {
        QATTN_REQUIRE_ARG(!where.on_cuda_device, "%s is in CUDA device %d memory, but the layer is on the CPU",
                          name, where.device);
    } else {
        QATTN_REQUIRE_ARG(where.on_cuda_device && where.device == device,
                          "%s must be in the memory of CUDA device %d (it is in %s memory)", name, device,
                          where.on_cuda_device ? "another device's" : "host");
        device_pointer_cache().add(ptr, device);
    }
    return QATTN_SUCCESS;
}

}  // namespace qattn
