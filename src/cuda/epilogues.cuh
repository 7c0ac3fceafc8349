// The per-element ends of forward1 and forward2 as device functions, so that the
// standalone epilogue kernels and the small-row GEMM (which runs them in the last
// block to finish a column range, see gptq_gemm_small.cu) share one definition.
// Both read the fp32 accumulator through L2 (ld.global.cg): in the GEMM its
// partial sums arrive by atomics from other SMs, whose results no L1 holds.
#pragma once

#include "cuda/kernels.h"
#include "cuda/reduce.cuh"
#include "cuda/vec.cuh"

namespace qattn::cuda {

template <int V>
__device__ __forceinline__ void load_vec_l2(const float* p, float (&v)[V]) {
    if constexpr (V == 4) {
        const float4 a = __ldcg(reinterpret_cast<const float4*>(p));
        v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
    } else {
#pragma unroll
        for (int i = 0; i < V; ++i) v[i] = __ldcg(p + i);
    }
}

// One (row, head) of the fused Q|K|V accumulator, by one warp: bias, head norm,
// RoPE, fp16 out (k and v also or only into their KV-cache slot), and the
// accumulator zeroed where split-K atomics will add into it next call. buf: D
// floats of shared memory owned by this warp. All global loads (accumulator,
// bias, position, sin/cos) are issued before the first use, so the warp waits
// out about one memory latency, not three.
// MAX_D: head_dim bound that sizes the register arrays.
template <int V, int MAX_D>
__device__ __forceinline__ void finish_head(const HeadEpilogueParams& p, int row, int h, float* buf) {
    constexpr int kChunks = MAX_D / (32 * V);  // lane accesses per head vector, at most
    constexpr int kPairChunks = (MAX_D / 2 + 31) / 32;
    const int lane = threadIdx.x & 31;
    const int D = p.head_dim;
    int proj, head;
    if (h < p.num_heads) {
        proj = 0, head = h;
    } else if (h < p.num_heads + p.num_kv_heads) {
        proj = 1, head = h - p.num_heads;
    } else {
        proj = 2, head = h - p.num_heads - p.num_kv_heads;
    }
    const bool rotate = proj < 2 && p.rope != QATTN_ROPE_NONE;

    int position = 0;
    if (rotate) {
        const int sequence = row / p.q_len;
        position = (p.past_lens ? p.past_lens[sequence] : p.past_len) + (row - sequence * p.q_len);
    }
    const int64_t slot = proj > 0 && p.kv_slots ? p.kv_slots[row] : -1;
    const size_t at = static_cast<size_t>(row) * p.acc_stride + h * D;
    float* acc = p.acc16 ? nullptr : p.acc + at;
    const __half* bias = p.bias[proj] ? p.bias[proj] + head * D : nullptr;
    float v[kChunks][V];
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
        const int i = (lane + 32 * c) * V;
        if (i >= D) break;
        if (acc)
            load_vec_l2<V>(acc + i, v[c]);
        else
            load_vec<V>(p.acc16 + at + i, v[c]);
        if (bias) {
            float b[V];
            load_vec<V>(bias + i, b);
#pragma unroll
            for (int u = 0; u < V; ++u) v[c][u] += b[u];
        }
    }
    const bool in_range = position >= 0 && position < p.max_positions;
    const int pairs = p.rotary_dim / 2;
    float cs[kPairChunks], sn[kPairChunks];
    if (rotate && in_range) {
        const float* sin_row = p.sin + static_cast<size_t>(position) * pairs;
        const float* cos_row = p.cos + static_cast<size_t>(position) * pairs;
#pragma unroll
        for (int c = 0; c < kPairChunks; ++c) {
            const int i = lane + 32 * c;
            if (i >= pairs) break;
            cs[c] = cos_row[i];
            sn[c] = sin_row[i];
        }
    }

    // Only the small-row kernel accumulates with atomics, and only into rows
    // below kSmallRows; larger calls overwrite their rows, so zeroing stops there.
    const bool zero = acc && row < kSmallRows;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
        const int i = (lane + 32 * c) * V;
        if (i >= D) break;
        if (zero) {
            const float zeros[V] = {};
            store_vec<V>(acc + i, zeros);
        }
        store_vec<V>(buf + i, v[c]);
    }
    __syncwarp();

    if (proj < 2 && p.norm[proj].type != QATTN_NORM_NONE) {
        const NormParams& n = p.norm[proj];
        float mean = 0.0f;
        if (n.type == QATTN_NORM_LAYER) {
            float sum = 0.0f;
            for (int i = lane; i < D; i += 32) sum += buf[i];
            mean = warp_sum(sum) / D;
        }
        float squares = 0.0f;
        for (int i = lane; i < D; i += 32) squares += (buf[i] - mean) * (buf[i] - mean);
        const float inv = rsqrtf(warp_sum(squares) / D + n.eps);
        const int offset = n.per_head ? head * D : 0;
        // Each lane rewrites only the elements it summed: no barrier needed here.
        for (int i = lane; i < D; i += 32) {
            float x = (buf[i] - mean) * inv * __half2float(n.weight[offset + i]);
            if (n.bias) x += __half2float(n.bias[offset + i]);
            buf[i] = x;
        }
    }

    if (rotate) {
        if (!in_range) {
            // Not rotated; the host learns of it through check_device_errors.
            if (lane == 0) atomicExch(p.error_flag, 1);
        } else {
            __syncwarp();
#pragma unroll
            for (int c = 0; c < kPairChunks; ++c) {
                const int i = lane + 32 * c;
                if (i >= pairs) break;
                const int first = p.rope == QATTN_ROPE_NEOX ? i : 2 * i;
                const int second = p.rope == QATTN_ROPE_NEOX ? i + pairs : 2 * i + 1;
                const float a = buf[first], b = buf[second];
                buf[first] = a * cs[c] - b * sn[c];
                buf[second] = b * cs[c] + a * sn[c];
            }
        }
    }
    __syncwarp();
    const int width = (proj == 0 ? p.num_heads : p.num_kv_heads) * D;
    __half* out = p.out[proj] ? p.out[proj] + static_cast<size_t>(row) * width + head * D : nullptr;
    __half* cached = nullptr;
    if (proj > 0 && p.kv_slots) {
        if (slot >= 0 && slot < p.num_kv_slots)
            cached = p.cache[proj - 1] + slot * width + head * D;
        else if (lane == 0)
            atomicExch(p.error_flag, 1);  // not written to the cache; see check_device_errors
    }
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
        const int i = (lane + 32 * c) * V;
        if (i >= D) break;
        float o[V];
        load_vec<V>(buf + i, o);
        if (out) store_vec<V>(out + i, o);
        if (cached) store_vec<V>(cached + i, o);
    }
    // buf is reused by this warp's next task.
    __syncwarp();
}

// x[V elements] = x + y (or y without a residual), y the O projection (+ bias)
// already in registers: the residual stream's one read-modify-write.
template <typename T, int V>
__device__ __forceinline__ void add_to_residual(T* x, float (&y)[V], bool has_residual) {
    if (has_residual) {
        float r[V];
        load_vec<V>(x, r);
#pragma unroll
        for (int u = 0; u < V; ++u) y[u] += r[u];
    }
    store_vec<V>(x, y);
}

}  // namespace qattn::cuda
