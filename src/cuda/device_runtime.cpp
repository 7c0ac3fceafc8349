// Memory and device queries for the core. Every entry copes with machines that
// have no driver or no GPU: the library must still load and run on the CPU.
#include "core/backend.h"
#include "core/device.h"
#include "cuda/check.h"

#include <cstring>

namespace qattn {

int cuda_device_count() {
    // Visible devices do not change during a process; the first answer is kept so
    // that pointer checks in every forward call stay cheap.
    static const int count = [] {
        int n = 0;
        if (cudaGetDeviceCount(&n) != cudaSuccess) {
            (void)cudaGetLastError();
            return 0;
        }
        return n;
    }();
    return count;
}

PointerInfo locate(const void* ptr) {
    PointerInfo info;
    if (ptr == nullptr || cuda_device_count() == 0) return info;
    cudaPointerAttributes attributes{};
    if (cudaPointerGetAttributes(&attributes, ptr) != cudaSuccess) {
        (void)cudaGetLastError();
        return info;
    }
    if (attributes.type == cudaMemoryTypeDevice || attributes.type == cudaMemoryTypeManaged) {
        info.on_cuda_device = true;
        info.device = attributes.device;
    }
    return info;
}

qattn_status copy_to_host(void* dst, const void* src, size_t bytes) {
    if (bytes == 0) return QATTN_SUCCESS;
    const PointerInfo where = locate(src);
    if (!where.on_cuda_device) {
        std::memcpy(dst, src, bytes);
        return QATTN_SUCCESS;
    }
    cuda::DeviceGuard guard;
    QATTN_TRY(guard.enter(where.device));
    QATTN_CUDA_TRY(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
    return QATTN_SUCCESS;
}

namespace cuda {
const char* architectures() { return QATTN_CUDA_ARCHS; }
}  // namespace cuda

}  // namespace qattn
