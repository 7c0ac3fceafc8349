// Asking the L2 to fetch device memory that a later kernel reads first (sm_90:
// cp.async.bulk.prefetch, a hint with no completion to wait for). forward1's
// last kernel does this for the O projection's weights, so that their bytes
// come from HBM while the caller's attention runs (at decode it is bound by
// latency, not bandwidth) instead of when forward2 starts.
#pragma once

#include "cuda/kernels.h"

namespace qattn::cuda {

// Part `part` of `parts` (equal shares of 16-byte units) of the ranges of p;
// one thread a block calls it with its block's index.
__device__ __forceinline__ void prefetch_part_to_l2(const L2Prefetch& p, int part, int parts) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // Kept ahead of other lines: at 16 rows the attention streams 128 MB of KV
    // cache through the L2 between the prefetch and forward2.
    uint64_t policy;
    asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(policy));
    int64_t units = 0;
#pragma unroll
    for (int i = 0; i < L2Prefetch::kRanges; ++i) units += p.bytes[i] / 16;
    int64_t begin = units * part / parts * 16, end = units * (part + 1) / parts * 16;
#pragma unroll
    for (int i = 0; i < L2Prefetch::kRanges; ++i) {
        const int64_t lo = begin > 0 ? begin : 0, hi = end < p.bytes[i] ? end : p.bytes[i];
        if (hi > lo)
            asm volatile("cp.async.bulk.prefetch.L2.global.L2::cache_hint [%0], %1, %2;" ::"l"(
                             static_cast<const char*>(p.ptr[i]) + lo),
                         "r"(static_cast<uint32_t>(hi - lo)), "l"(policy)
                         : "memory");
        begin -= p.bytes[i];
        end -= p.bytes[i];
    }
#endif
}

}  // namespace qattn::cuda
