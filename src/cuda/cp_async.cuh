// Asynchronous global -> shared copies (sm_80 and newer): a copy is issued
// without waiting, groups of them are committed in order, and a thread waits
// until at most PENDING of its groups are still in flight; copies become
// visible to other threads of the block after that wait and a barrier.
#pragma once

#include <cstdint>

namespace qattn::cuda {

__device__ __forceinline__ void cp_async16(void* shared, const void* global) {
    const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(shared));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(address), "l"(global) : "memory");
}
__device__ __forceinline__ void cp_async4(void* shared, const void* global) {
    const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(shared));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(address), "l"(global) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(PENDING) : "memory");
}

}  // namespace qattn::cuda
