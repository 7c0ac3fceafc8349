// Built only when the CUDA backend is not: every pointer is host memory.
#include "core/device.h"
#include "core/error.h"

#include <cstring>

namespace qattn {

PointerInfo locate(const void*) { return PointerInfo{}; }

qattn_status copy_to_host(void* dst, const void* src, size_t bytes) {
    std::memcpy(dst, src, bytes);
    return QATTN_SUCCESS;
}

int cuda_device_count() { return 0; }

}  // namespace qattn
