// The L2 prefetch of L2Prefetch (kernels.h), split among the blocks of the
// kernel that ends forward1: part `part` of `parts`, its pieces spread over the
// lanes of the calling warp. cp.async.bulk.prefetch (sm_90) is one instruction a
// piece and nothing waits for it; on older devices nothing is fetched.
#pragma once

#include "cuda/kernels.h"

namespace qattn::cuda {

__device__ __forceinline__ void prefetch_to_l2(const L2Prefetch& p, int part, int parts) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const size_t units = p.bytes[r] / 16;  // the instruction moves whole 16-byte units
        const size_t per_part = (units + parts - 1) / parts, per_lane = (per_part + 31) / 32;
        const size_t begin = min(units, part * per_part + lane * per_lane);
        const size_t end = min(min(units, (part + 1) * per_part), begin + per_lane);
        if (begin < end) {
            const char* at = static_cast<const char*>(p.region[r]) + begin * 16;
            // evict_last: the caller's attention may stream more than the L2 holds
            // (a long KV cache) before forward2 reads these; forward2's plain loads
            // set the lines back to the normal priority.
            asm volatile(
                "{\n\t.reg .b64 policy;\n\t"
                "createpolicy.fractional.L2::evict_last.b64 policy, 1.0;\n\t"
                "cp.async.bulk.prefetch.L2.global.L2::cache_hint [%0], %1, policy;\n\t}" ::"l"(at),
                "r"(static_cast<uint32_t>((end - begin) * 16))
                : "memory");
        }
    }
#else
    (void)p, (void)part, (void)parts;
#endif
}

}  // namespace qattn::cuda
