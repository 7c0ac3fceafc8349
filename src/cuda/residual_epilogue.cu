// The end of forward2 in one pass per row: O-projection accumulator + bias,
// optional post-norm (Gemma-2), then a single read-modify-write of the residual.
// The O output reaches the residual exactly once, so no fp16 atomics are needed.
#include "cuda/kernels.h"
#include "cuda/reduce.cuh"

namespace qattn::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half(v); }

template <typename T>
__global__ void __launch_bounds__(kThreads) residual_epilogue_kernel(float* __restrict__ acc, int width,
                                                                     const __half* __restrict__ bias,
                                                                     NormParams norm, T* __restrict__ x,
                                                                     bool has_residual) {
    __shared__ float scratch[32];
    float* y = acc + static_cast<size_t>(blockIdx.x) * width;
    T* row = x + static_cast<size_t>(blockIdx.x) * width;
    auto value = [&](int i) { return y[i] + (bias ? __half2float(bias[i]) : 0.0f); };

    float mean = 0.0f, inv = 1.0f;
    if (norm.type != QATTN_NORM_NONE) {
        if (norm.type == QATTN_NORM_LAYER) {
            float sum = 0.0f;
            for (int i = threadIdx.x; i < width; i += kThreads) sum += value(i);
            mean = block_sum(sum, scratch) / width;
        }
        float squares = 0.0f;
        for (int i = threadIdx.x; i < width; i += kThreads) {
            const float d = value(i) - mean;
            squares += d * d;
        }
        inv = rsqrtf(block_sum(squares, scratch) / width + norm.eps);
    }
    const bool zero = blockIdx.x < kSmallRows;  // see head_norm_rope.cu
    for (int i = threadIdx.x; i < width; i += kThreads) {
        float v = value(i);
        if (zero) y[i] = 0.0f;
        if (norm.type != QATTN_NORM_NONE) {
            v = (v - mean) * inv * __half2float(norm.weight[i]);
            if (norm.bias) v += __half2float(norm.bias[i]);
        }
        if (has_residual) v += to_float(row[i]);
        store(row + i, v);
    }
}

}  // namespace

qattn_status launch_residual_epilogue(const ResidualEpilogueParams& p, cudaStream_t stream) {
    if (p.x_fp32)
        residual_epilogue_kernel<float><<<p.rows, kThreads, 0, stream>>>(p.acc, p.width, p.bias, p.post_norm,
                                                                         static_cast<float*>(p.x), p.has_residual);
    else
        residual_epilogue_kernel<__half><<<p.rows, kThreads, 0, stream>>>(
            p.acc, p.width, p.bias, p.post_norm, static_cast<__half*>(p.x), p.has_residual);
    QATTN_LAUNCH_CHECK("residual_epilogue");
    return QATTN_SUCCESS;
}

}  // namespace qattn::cuda
