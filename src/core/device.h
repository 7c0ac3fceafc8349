// What the core needs to know about memory and devices. Implemented by the CUDA
// backend when it is compiled in (src/cuda/device_runtime.cpp) and by a host-only
// stand-in otherwise (src/core/device_host_only.cpp), so the core never includes
// CUDA headers.
#pragma once

#include "qattn.h"

#include <cstddef>
#include <vector>

namespace qattn {

struct PointerInfo {
    bool on_cuda_device = false;  // device (or managed) memory of a CUDA device
    int device = QATTN_DEVICE_CPU;
};

// Where `ptr` lives. Never fails: unknown pointers are reported as host memory.
PointerInfo locate(const void* ptr);

// Copies `bytes` from `src` (host or any CUDA device) into host memory.
qattn_status copy_to_host(void* dst, const void* src, size_t bytes);

int cuda_device_count();

// The bytes of a weight tensor, readable on the host: `as<T>()` is the caller's
// pointer when it is host memory, else a host copy. Weights are read on the host
// once at creation (to validate, dequantize or repack them).
class HostView {
public:
    qattn_status load(const void* src, size_t bytes);
    template <typename T>
    const T* as() const { return static_cast<const T*>(data_); }

private:
    const void* data_ = nullptr;
    std::vector<unsigned char> copy_;
};

}  // namespace qattn
