// Stages rows of the layer input as the fp16 activations the projections read:
// input norm (RMS or Layer, fp32 statistics) or a plain conversion, written in
// input-feature order and/or gathered into a packed GPTQ row order. One block per
// row; the row is read once with 16-byte loads into registers (up to 8192
// elements), and for the gather kept in shared memory, so the large-row path
// needs no separate gather pass.
#include "cuda/kernels.h"
#include "cuda/pdl.cuh"
#include "cuda/reduce.cuh"
#include "cuda/vec.cuh"

#include <type_traits>

namespace qattn::cuda {
namespace {

constexpr int kThreads = 256;

// C > 0: the row's C accesses per thread stay in registers, so the row is read
// from memory once (width <= kThreads * V * C); C = 0 re-reads it per pass.
// GATHER: p.gathered is set (the perm steps ahead are held in registers too).
// An fp16 row stays in registers as fp16, and only a gathering variant holds
// perm registers: a prefill's staging is bound by the rows in flight, so the
// blocks an SM holds matter (sm_90: 48 registers, 5 blocks, for 4096 fp16
// elements without a gather; 63 and 4 before).
template <typename T, int V, int C, bool GATHER>
__global__ void __launch_bounds__(kThreads) stage_rows_kernel(StageRowsParams p) {
    extern __shared__ __half staged[];  // [width], only when gathering
    __shared__ float scratch[32];
    allow_dependents();  // the small-row GEMM may start its weight loads now
    const int width = p.width;
    const NormParams& norm = p.norm;
    // Constants (norm weights, the first C gather steps' perm) do not depend on
    // the previous kernel: loaded before the wait, so at one row their latency
    // is not added to that of x.
    constexpr int CW = C > 0 && V == 8 ? C : 0;
    constexpr int CP = GATHER ? CW : 0;
    uint4 wraw[CW > 0 ? CW : 1], braw[CW > 0 ? CW : 1];
    int4 pre[CP > 0 ? CP : 1][2];
    if constexpr (CW > 0) {
#pragma unroll
        for (int c = 0; c < CW; ++c) {
            const int i = (threadIdx.x + c * kThreads) * V;
            if (norm.type != QATTN_NORM_NONE && i < width) {
                wraw[c] = *reinterpret_cast<const uint4*>(norm.weight + i);
                if (norm.bias) braw[c] = *reinterpret_cast<const uint4*>(norm.bias + i);
            }
            const int j = (threadIdx.x + c * kThreads) * 8;
            if constexpr (CP > 0) {
                if (j < p.columns) {
                    pre[c][0] = *reinterpret_cast<const int4*>(p.perm + j);
                    pre[c][1] = *reinterpret_cast<const int4*>(p.perm + j + 4);
                }
            }
        }
    }
    wait_for_producers();
    const T* row = static_cast<const T*>(p.x) + static_cast<size_t>(blockIdx.x) * p.ldx;

    constexpr bool kRaw = std::is_same_v<T, __half> && V == 8;
    using Cached = std::conditional_t<kRaw, uint4, float[V]>;
    Cached cache[C > 0 ? C : 1];
    if constexpr (C > 0) {
#pragma unroll
        for (int c = 0; c < C; ++c) {
            const int i = (threadIdx.x + c * kThreads) * V;
            if (i >= width) continue;
            if constexpr (kRaw)
                cache[c] = *reinterpret_cast<const uint4*>(row + i);
            else
                load_vec<V>(row + i, cache[c]);
        }
    }
    // f(i, values, c) for each of this thread's accesses (c: its index when cached).
    const auto visit = [&](auto&& f) {
        if constexpr (C > 0) {
#pragma unroll
            for (int c = 0; c < C; ++c) {
                const int i = (threadIdx.x + c * kThreads) * V;
                if (i >= width) continue;
                if constexpr (kRaw) {
                    float v[V];
                    load_vec<V>(reinterpret_cast<const __half*>(&cache[c]), v);
                    f(i, v, c);
                } else {
                    f(i, cache[c], c);
                }
            }
        } else {
            for (int i = threadIdx.x * V; i < width; i += kThreads * V) {
                float v[V];
                load_vec<V>(row + i, v);
                f(i, v, 0);
            }
        }
    };

    float mean = 0.0f, inv = 1.0f;
    if (norm.type != QATTN_NORM_NONE) {
        if (norm.type == QATTN_NORM_LAYER) {
            float sum = 0.0f;
            visit([&](int, const float(&v)[V], int) {
#pragma unroll
                for (int u = 0; u < V; ++u) sum += v[u];
            });
            mean = block_sum(sum, scratch) / width;
        }
        float squares = 0.0f;
        visit([&](int, const float(&v)[V], int) {
#pragma unroll
            for (int u = 0; u < V; ++u) squares += (v[u] - mean) * (v[u] - mean);
        });
        inv = rsqrtf(block_sum(squares, scratch) / width + norm.eps);
    }

    __half* out = p.out ? p.out + static_cast<size_t>(blockIdx.x) * width : nullptr;
    visit([&](int i, const float(&x)[V], int c) {
        float v[V];
#pragma unroll
        for (int u = 0; u < V; ++u) v[u] = x[u];
        if (norm.type != QATTN_NORM_NONE) {
            float w[V], b[V];
            if constexpr (CW > 0) {
                load_vec<V>(reinterpret_cast<const __half*>(&wraw[c]), w);
                if (norm.bias) load_vec<V>(reinterpret_cast<const __half*>(&braw[c]), b);
            } else {
                load_vec<V>(norm.weight + i, w);
                if (norm.bias) load_vec<V>(norm.bias + i, b);
            }
#pragma unroll
            for (int u = 0; u < V; ++u) v[u] = (v[u] - mean) * inv * w[u] + (norm.bias ? b[u] : 0.0f);
        }
        if (out) store_vec<V>(out + i, v);
        if (p.gathered) store_vec<V>(staged + i, v);
    });
    if (!p.gathered) return;
    __syncthreads();
    // columns % 8 == 0 (packed rows come in chunks of 128) and gathered is 16-byte aligned.
    __half* dst = p.gathered + static_cast<size_t>(blockIdx.x) * p.columns;
    const auto gather8 = [&](int j, const int4& a, const int4& b) {
        const int src[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
        uint4 packed;
        __half* h = reinterpret_cast<__half*>(&packed);
#pragma unroll
        for (int u = 0; u < 8; ++u) h[u] = src[u] >= 0 ? staged[src[u]] : __float2half(0.0f);
        *reinterpret_cast<uint4*>(dst + j) = packed;
    };
    int j0 = threadIdx.x * 8;
    if constexpr (CP > 0) {
#pragma unroll
        for (int c = 0; c < CP; ++c, j0 += kThreads * 8)
            if (j0 < p.columns) gather8(j0, pre[c][0], pre[c][1]);
    }
    for (int j = j0; j < p.columns; j += kThreads * 8)
        gather8(j, *reinterpret_cast<const int4*>(p.perm + j), *reinterpret_cast<const int4*>(p.perm + j + 4));
}

template <typename T, bool GATHER>
qattn_status launch_variant(const StageRowsParams& p, bool vec, size_t shared, cudaStream_t stream) {
    auto kernel = !vec                          ? stage_rows_kernel<T, 1, 0, GATHER>
                  : p.width <= kThreads * 8 * 2 ? stage_rows_kernel<T, 8, 2, GATHER>
                  : p.width <= kThreads * 8 * 4 ? stage_rows_kernel<T, 8, 4, GATHER>
                                                : stage_rows_kernel<T, 8, 0, GATHER>;
    if (shared > 48 * 1024)
        QATTN_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(shared)));
    return launch_pdl("stage_rows", kernel, p.rows, kThreads, shared, stream, p);
}

template <typename T>
qattn_status launch_typed(const StageRowsParams& p, size_t shared, cudaStream_t stream) {
    const bool vec = rows_vectorizable(p.x, p.ldx, sizeof(T)) && p.width % 8 == 0 &&
                     (!p.out || rows_vectorizable(p.out, p.width, 2));
    return p.gathered ? launch_variant<T, true>(p, vec, shared, stream)
                      : launch_variant<T, false>(p, vec, shared, stream);
}

}  // namespace

qattn_status launch_stage_rows(const StageRowsParams& p, cudaStream_t stream) {
    const size_t shared = p.gathered ? sizeof(__half) * p.width : 0;
    return p.x_fp32 ? launch_typed<float>(p, shared, stream) : launch_typed<__half>(p, shared, stream);
}

}  // namespace qattn::cuda
