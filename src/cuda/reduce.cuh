// Sums across a warp and across a block, for the norms.
#pragma once

namespace qattn::cuda {

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Sums over aligned groups of `width` lanes (a power of two up to 32), every lane
// getting its group's sum (the same bits: each step adds the same two values).
// Every lane of the warp must call it.
__device__ __forceinline__ float group_sum(float v, int width) {
    for (int offset = width >> 1; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Every thread of the block gets the sum. `scratch` holds 32 floats; the block
// is a multiple of 32 threads. Safe to call repeatedly with the same scratch.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    const int warps = blockDim.x >> 5;
    v = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

}  // namespace qattn::cuda
