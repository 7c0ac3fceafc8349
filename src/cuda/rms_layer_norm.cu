// Input norm over the hidden size, one block per row, fp32 statistics: the fp16
// output feeds the projections (fp16 activations are what every path multiplies).
#include "cuda/kernels.h"
#include "cuda/reduce.cuh"

namespace qattn::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ float load_value(const T* p) { return static_cast<float>(p[0]); }
template <>
__device__ __forceinline__ float load_value<__half>(const __half* p) { return __half2float(p[0]); }

template <typename T>
__global__ void __launch_bounds__(kThreads) input_norm_kernel(const T* __restrict__ x, int width, NormParams norm,
                                                              __half* __restrict__ out) {
    __shared__ float scratch[32];
    const T* row = x + static_cast<size_t>(blockIdx.x) * width;
    __half* dst = out + static_cast<size_t>(blockIdx.x) * width;
    if (norm.type == QATTN_NORM_NONE) {
        for (int i = threadIdx.x; i < width; i += kThreads) dst[i] = __float2half(load_value(row + i));
        return;
    }
    float mean = 0.0f;
    if (norm.type == QATTN_NORM_LAYER) {
        float sum = 0.0f;
        for (int i = threadIdx.x; i < width; i += kThreads) sum += load_value(row + i);
        mean = block_sum(sum, scratch) / width;
    }
    float squares = 0.0f;
    for (int i = threadIdx.x; i < width; i += kThreads) {
        const float d = load_value(row + i) - mean;
        squares += d * d;
    }
    const float inv = rsqrtf(block_sum(squares, scratch) / width + norm.eps);
    for (int i = threadIdx.x; i < width; i += kThreads) {
        float v = (load_value(row + i) - mean) * inv * __half2float(norm.weight[i]);
        if (norm.bias) v += __half2float(norm.bias[i]);
        dst[i] = __float2half(v);
    }
}

}  // namespace

qattn_status launch_input_norm(const void* x, bool x_fp32, int rows, int width, const NormParams& norm,
                               __half* out, cudaStream_t stream) {
    if (x_fp32)
        input_norm_kernel<float><<<rows, kThreads, 0, stream>>>(static_cast<const float*>(x), width, norm, out);
    else
        input_norm_kernel<__half><<<rows, kThreads, 0, stream>>>(static_cast<const __half*>(x), width, norm, out);
    QATTN_LAUNCH_CHECK("input_norm");
    return QATTN_SUCCESS;
}

}  // namespace qattn::cuda
