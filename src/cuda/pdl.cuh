// Programmatic dependent launch (sm_90 and newer): a kernel launched with
// launch_pdl may start while the kernel before it on the stream is still
// running, and must call wait_for_producers() before it reads anything an
// earlier kernel wrote or writes anything an earlier kernel reads. Work before
// that point (the small-row GEMM's weight loads) overlaps the previous kernel
// and the launch gap. allow_dependents() lets the next such kernel start early.
// On older devices the launch attribute is left off and both calls do nothing.
#pragma once

#include "cuda/check.h"

#include <cuda_runtime.h>

#include <cstdlib>
#include <string>
#include <utility>

namespace qattn::cuda {

__device__ __forceinline__ void wait_for_producers() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// QATTN_CUDA_PDL=0 in the environment (read once) launches every kernel
// plainly: slower, but a profiler then times each kernel alone, where with
// programmatic launch a kernel's time includes its wait for the one before.
inline bool pdl_supported() {
    static const bool disabled = [] {
        const char* v = std::getenv("QATTN_CUDA_PDL");
        return v && std::string(v) == "0";
    }();
    if (disabled) return false;
    int device = 0, major = 0;
    if (cudaGetDevice(&device) != cudaSuccess) return false;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
    return major >= 9;
}

// cluster_y > 1: the grid's blocks form clusters of 1 x cluster_y (grid.y a
// multiple of it; sm_90, see gptq_gemm_small.cu).
template <typename... Params, typename... Args>
qattn_status launch_pdl_clustered(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block,
                                  size_t shared, int cluster_y, cudaStream_t stream, Args&&... args) {
    cudaLaunchAttribute attributes[2];
    unsigned count = 0;
    if (pdl_supported()) {
        attributes[count].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attributes[count++].val.programmaticStreamSerializationAllowed = 1;
    }
    if (cluster_y > 1) {
        attributes[count].id = cudaLaunchAttributeClusterDimension;
        attributes[count].val.clusterDim.x = 1;
        attributes[count].val.clusterDim.y = static_cast<unsigned>(cluster_y);
        attributes[count++].val.clusterDim.z = 1;
    }
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = shared;
    config.stream = stream;
    config.attrs = attributes;
    config.numAttrs = count;
    const cudaError_t error = cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
    if (error != cudaSuccess)
        return fail(QATTN_ERROR_CUDA, "launching the %s kernel failed: %s (%s)", name, cudaGetErrorString(error),
                    cudaGetErrorName(error));
    return QATTN_SUCCESS;
}

template <typename... Params, typename... Args>
qattn_status launch_pdl(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared,
                        cudaStream_t stream, Args&&... args) {
    return launch_pdl_clustered(name, kernel, grid, block, shared, 1, stream, std::forward<Args>(args)...);
}

}  // namespace qattn::cuda
