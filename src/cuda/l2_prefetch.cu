// Asking the L2 to fetch what forward2 reads first (the O weights) while the
// caller's attention runs: at decode the attention is bound by latency, and
// forward2's GEMM, which that attention does not let start early, otherwise
// waits out its weights' HBM round trips (GPU_NOTES.md, fifteenth session).
// A small kernel that forward1 launches last does it: it waits for forward1's
// GEMM to end, so that its fetches do not meet the GEMM's own weight loads
// (which slowed forward1 when the GEMM's blocks issued them), issues the bulk
// prefetches (sm_90: a hint with no completion to wait for) and exits.
#include "cuda/kernels.h"
#include "cuda/pdl.cuh"

namespace qattn::cuda {
namespace {

constexpr int kPrefetchBlocks = 32;

// Block b's thread 0 asks for share b of the ranges (equal shares of 16-byte units).
__global__ void __launch_bounds__(32) prefetch_to_l2_kernel(L2Prefetch p) {
    wait_for_producers();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (threadIdx.x != 0) return;
    int64_t units = 0;
#pragma unroll
    for (int i = 0; i < L2Prefetch::kRanges; ++i) units += p.bytes[i] / 16;
    int64_t begin = units * blockIdx.x / gridDim.x * 16, end = units * (blockIdx.x + 1) / gridDim.x * 16;
#pragma unroll
    for (int i = 0; i < L2Prefetch::kRanges; ++i) {
        const int64_t lo = begin > 0 ? begin : 0, hi = end < p.bytes[i] ? end : p.bytes[i];
        if (hi > lo)
            asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(static_cast<const char*>(p.ptr[i]) + lo),
                         "r"(static_cast<uint32_t>(hi - lo))
                         : "memory");
        begin -= p.bytes[i];
        end -= p.bytes[i];
    }
#endif
}

}  // namespace

qattn_status launch_l2_prefetch(const L2Prefetch& p, cudaStream_t stream) {
    return launch_pdl("prefetch_to_l2", prefetch_to_l2_kernel, dim3(kPrefetchBlocks), dim3(32), 0, stream, p);
}

}  // namespace qattn::cuda
