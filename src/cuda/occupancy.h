// How many blocks of a kernel an SM holds at once. Planners ask this at every
// decode step with the same arguments, so the answer is remembered per device,
// kernel, block size and shared bytes.
#pragma once

#include "cuda/check.h"

#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <set>
#include <tuple>
#include <utility>

namespace qattn::cuda {

// Blocks of `kernel` resident per SM at `threads` threads and `shared` bytes of
// dynamic shared memory, on the current device. The kernel is allowed
// `max_shared` bytes once per device first: above the 48 KB default a kernel
// must be allowed its dynamic shared memory before it may launch with it.
template <typename Kernel>
qattn_status blocks_per_sm(Kernel kernel, int threads, size_t shared, size_t max_shared, int* out) {
    static std::mutex mutex;
    static std::set<std::pair<int, const void*>> allowed;
    static std::map<std::tuple<int, const void*, int, size_t>, int> known;
    int device = 0;
    QATTN_CUDA_TRY(cudaGetDevice(&device));
    const void* id = reinterpret_cast<const void*>(kernel);
    std::lock_guard<std::mutex> lock(mutex);
    const auto key = std::make_tuple(device, id, threads, shared);
    const auto found = known.find(key);
    if (found != known.end()) {
        *out = found->second;
        return QATTN_SUCCESS;
    }
    if (max_shared > (48u << 10) && allowed.count({device, id}) == 0) {
        QATTN_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(max_shared)));
        allowed.insert({device, id});
    }
    QATTN_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(out, kernel, threads, shared));
    known.emplace(key, *out);
    return QATTN_SUCCESS;
}

}  // namespace qattn::cuda
