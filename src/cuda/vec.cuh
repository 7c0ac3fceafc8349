// V consecutive elements (V = 8: one 16-byte fp16 access or two fp32 ones; V = 4:
// 8 or 16 bytes) widened to float. The elementwise kernels use these where the
// row length and the pointers allow it, and single elements (V = 1) otherwise.
#pragma once

#include <cuda_fp16.h>
#include <cstdint>

namespace qattn::cuda {

template <int V>
__device__ __forceinline__ void load_vec(const __half* p, float (&v)[V]) {
    if constexpr (V == 8) {
        const uint4 u = *reinterpret_cast<const uint4*>(p);
        const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float2 f = __half22float2(h[i]);
            v[2 * i] = f.x;
            v[2 * i + 1] = f.y;
        }
    } else if constexpr (V == 4) {
        const uint2 u = *reinterpret_cast<const uint2*>(p);
        const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&u.x));
        const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&u.y));
        v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y;
    } else {
#pragma unroll
        for (int i = 0; i < V; ++i) v[i] = __half2float(p[i]);
    }
}

template <int V>
__device__ __forceinline__ void load_vec(const float* p, float (&v)[V]) {
    if constexpr (V == 8) {
        const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
        v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    } else if constexpr (V == 4) {
        const float4 a = *reinterpret_cast<const float4*>(p);
        v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
    } else {
#pragma unroll
        for (int i = 0; i < V; ++i) v[i] = p[i];
    }
}

template <int V>
__device__ __forceinline__ void store_vec(__half* p, const float (&v)[V]) {
    if constexpr (V == 8) {
        uint4 u;
        __half2* h = reinterpret_cast<__half2*>(&u);
#pragma unroll
        for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
        *reinterpret_cast<uint4*>(p) = u;
    } else if constexpr (V == 4) {
        uint2 u;
        *reinterpret_cast<__half2*>(&u.x) = __floats2half2_rn(v[0], v[1]);
        *reinterpret_cast<__half2*>(&u.y) = __floats2half2_rn(v[2], v[3]);
        *reinterpret_cast<uint2*>(p) = u;
    } else {
#pragma unroll
        for (int i = 0; i < V; ++i) p[i] = __float2half(v[i]);
    }
}

template <int V>
__device__ __forceinline__ void store_vec(float* p, const float (&v)[V]) {
    if constexpr (V == 8) {
        reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
        reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else if constexpr (V == 4) {
        *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
#pragma unroll
        for (int i = 0; i < V; ++i) p[i] = v[i];
    }
}

// Whether every row of a [rows, width] matrix at p starts 16-byte aligned and
// holds whole groups of 8: the condition for V = 8.
inline bool rows_vectorizable(const void* p, int width, int element_bytes) {
    return width % 8 == 0 && reinterpret_cast<uintptr_t>(p) % 16 == 0 && (width * element_bytes) % 16 == 0;
}

// v += bias[i .. i + V) where there is a bias (null: none).
template <int V>
__device__ __forceinline__ void add_bias(const __half* bias, int i, float (&v)[V]) {
    if (!bias) return;
    float b[V];
    load_vec<V>(bias + i, b);
#pragma unroll
    for (int u = 0; u < V; ++u) v[u] += b[u];
}

}  // namespace qattn::cuda
