// The end of forward2 as its own kernel (where the small-row GEMM does not run it
// itself), one pass over each row (a block's, or without a post-norm split over
// blocks): O-projection accumulator + bias, optional post-norm (Gemma-2), then a
// single read-modify-write of the residual.
// The O output reaches the residual exactly once, so no fp16 atomics are needed.
// Each thread moves 8 consecutive elements per access (16-byte loads) where the
// row allows it, so the prefill case runs at the bandwidth of its bytes.
#include "cuda/epilogues.cuh"
#include "cuda/kernels.h"
#include "cuda/pdl.cuh"

namespace qattn::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) residual_epilogue_kernel(float* __restrict__ acc, int width,
                                                                     const __half* __restrict__ bias,
                                                                     NormParams norm, T* __restrict__ x,
                                                                     bool has_residual) {
    __shared__ float scratch[32];
    wait_for_producers();
    float* y = acc + static_cast<size_t>(blockIdx.x) * width;
    T* row = x + static_cast<size_t>(blockIdx.x) * width;
    // Without a post-norm the blocks of a row (grid.y) share it, each thread one
    // vector where they suffice: every load of a thread is then in flight at once
    // (a loop over a row stores to x and the accumulator between its loads).
    const int first = (blockIdx.y * kThreads + threadIdx.x) * V, step = gridDim.y * kThreads * V;
    auto value = [&](int i, float (&v)[V]) {
        load_vec<V>(y + i, v);
        add_bias<V>(bias, i, v);
    };

    float mean = 0.0f, inv = 1.0f;
    if (norm.type != QATTN_NORM_NONE) {
        if (norm.type == QATTN_NORM_LAYER) {
            float sum = 0.0f;
            for (int i = first; i < width; i += step) {
                float v[V];
                value(i, v);
#pragma unroll
                for (int u = 0; u < V; ++u) sum += v[u];
            }
            mean = block_sum(sum, scratch) / width;
        }
        float squares = 0.0f;
        for (int i = first; i < width; i += step) {
            float v[V];
            value(i, v);
#pragma unroll
            for (int u = 0; u < V; ++u) squares += (v[u] - mean) * (v[u] - mean);
        }
        inv = rsqrtf(block_sum(squares, scratch) / width + norm.eps);
    }
    const bool zero = blockIdx.x < kSmallRows;  // see head_norm_rope.cu
    for (int i = first; i < width; i += step) {
        float v[V];
        value(i, v);
        if (zero) {
            const float zeros[V] = {};
            store_vec<V>(y + i, zeros);
        }
        if (norm.type != QATTN_NORM_NONE) {
            float w[V], b[V];
            load_vec<V>(norm.weight + i, w);
            if (norm.bias) load_vec<V>(norm.bias + i, b);
#pragma unroll
            for (int u = 0; u < V; ++u) v[u] = (v[u] - mean) * inv * w[u] + (norm.bias ? b[u] : 0.0f);
        }
        add_to_residual<T, V>(row + i, v, has_residual);
    }
}

template <typename T>
qattn_status launch_typed(const ResidualEpilogueParams& p, cudaStream_t stream) {
    const int vector = rows_vectorizable(p.x, p.width, sizeof(T)) ? 8 : 1;
    const auto kernel = vector == 8 ? residual_epilogue_kernel<T, 8> : residual_epilogue_kernel<T, 1>;
    const int slices = p.post_norm.type == QATTN_NORM_NONE ? (p.width + kThreads * vector - 1) / (kThreads * vector) : 1;
    return launch_pdl("residual_epilogue", kernel, dim3(p.rows, slices), kThreads, 0, stream, p.acc, p.width, p.bias,
                      p.post_norm, static_cast<T*>(p.x), p.has_residual);
}

}  // namespace

qattn_status launch_residual_epilogue(const ResidualEpilogueParams& p, cudaStream_t stream) {
    return p.x_fp32 ? launch_typed<float>(p, stream) : launch_typed<__half>(p, stream);
}

}  // namespace qattn::cuda
