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

// What the heads of one row share: its position (RoPE; in_range: inside the
// tables), its KV-cache slot (-1 without kv_slots) and its rows of the sin/cos
// tables (in global or shared memory; null when not rotated). past_lens and
// kv_slots are read through the L2, so that a kernel may read them before its
// wait for the kernel before it: no SM's L1 then holds a copy older than the
// caller's last write.
struct HeadRow {
    bool in_range = true;
    int64_t slot = -1;
    const float* sin = nullptr;
    const float* cos = nullptr;
};

__device__ __forceinline__ HeadRow head_row(const HeadEpilogueParams& p, int row, bool rotate, bool slot) {
    HeadRow r;
    if (rotate) {
        const int sequence = row / p.q_len;
        const int position = (p.past_lens ? __ldcg(p.past_lens + sequence) : p.past_len) + (row - sequence * p.q_len);
        r.in_range = position >= 0 && position < p.max_positions;
        if (r.in_range) {
            r.sin = p.sin + static_cast<size_t>(position) * (p.rotary_dim / 2);
            r.cos = p.cos + static_cast<size_t>(position) * (p.rotary_dim / 2);
        }
    }
    if (slot && p.kv_slots) r.slot = __ldcg(p.kv_slots + row);
    return r;
}

// Which projection head h of the fused Q|K|V row belongs to, and its index there.
__device__ __forceinline__ int head_projection(const HeadEpilogueParams& p, int h, int* head) {
    if (h < p.num_heads) return *head = h, 0;
    if (h < p.num_heads + p.num_kv_heads) return *head = h - p.num_heads, 1;
    return *head = h - p.num_heads - p.num_kv_heads, 2;
}

// One head vector of the fused Q|K|V row in a warp's registers, bias added: what
// finish_head reads from global memory before its first use, apart, so that a
// warp can load its next head while it finishes this one.
// MAX_D: head_dim bound that sizes the register arrays.
template <int V, int MAX_D>
struct HeadValues {
    static constexpr int kChunks = MAX_D / (32 * V);  // lane accesses per head vector, at most
    float v[kChunks][V];
};

template <int V, int MAX_D>
__device__ __forceinline__ void load_head(const HeadEpilogueParams& p, int row, int h, HeadValues<V, MAX_D>& out) {
    const int lane = threadIdx.x & 31;
    const int D = p.head_dim;
    int head = 0;
    const int proj = head_projection(p, h, &head);
    const size_t at = static_cast<size_t>(row) * p.acc_stride + h * D;
    const __half* bias = p.bias[proj] ? p.bias[proj] + head * D : nullptr;
#pragma unroll
    for (int c = 0; c < HeadValues<V, MAX_D>::kChunks; ++c) {
        const int i = (lane + 32 * c) * V;
        if (i >= D) break;
        if (p.acc16)
            load_vec<V>(p.acc16 + at + i, out.v[c]);
        else
            load_vec_l2<V>(p.acc + at + i, out.v[c]);
        add_bias<V>(bias, i, out.v[c]);
    }
}

// One (row, head) of the fused Q|K|V accumulator, by one warp, from its loaded
// values: head norm, RoPE, fp16 out (k and v also or only into their KV-cache
// slot), and the accumulator zeroed where split-K atomics will add into it next
// call (zero_acc: the values came from it). buf: D floats of shared memory owned
// by this warp; r: the row's head_row (rotate and slot asked for at least where
// this head needs them).
template <int V, int MAX_D>
__device__ __forceinline__ void finish_loaded_head(const HeadEpilogueParams& p, int row, int h, float* buf,
                                                   const HeadRow& r, const HeadValues<V, MAX_D>& in,
                                                   bool zero_acc = true) {
    constexpr int kChunks = HeadValues<V, MAX_D>::kChunks;
    constexpr int kPairChunks = (MAX_D / 2 + 31) / 32;
    const int lane = threadIdx.x & 31;
    const int D = p.head_dim;
    int head = 0;
    const int proj = head_projection(p, h, &head);
    const bool rotate = proj < 2 && p.rope != QATTN_ROPE_NONE;
    float* acc = p.acc16 ? nullptr : p.acc + static_cast<size_t>(row) * p.acc_stride + h * D;
    const auto& v = in.v;
    const bool in_range = r.in_range;
    const int pairs = p.rotary_dim / 2;
    float cs[kPairChunks], sn[kPairChunks];
    if (rotate && in_range) {
#pragma unroll
        for (int c = 0; c < kPairChunks; ++c) {
            const int i = lane + 32 * c;
            if (i >= pairs) break;
            cs[c] = r.cos[i];
            sn[c] = r.sin[i];
        }
    }

    // Only the small-row kernel accumulates with atomics, and only into rows
    // below kSmallRows; larger calls overwrite their rows, so zeroing stops there.
    const bool zero = zero_acc && acc && row < kSmallRows;
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
        if (r.slot >= 0 && r.slot < p.num_kv_slots)
            cached = p.cache[proj - 1] + r.slot * width + head * D;
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

// The row data that head h of `row` needs (head_row).
__device__ __forceinline__ HeadRow head_row_of(const HeadEpilogueParams& p, int row, int h) {
    int head = 0;
    const int proj = head_projection(p, h, &head);
    return head_row(p, row, proj < 2 && p.rope != QATTN_ROPE_NONE, proj > 0);
}

// Both steps for one (row, head), the head reading its row's position and slot
// itself. All its global loads (accumulator, bias, position, then sin/cos) are
// issued before the first use, so the warp waits out about two memory latencies.
template <int V, int MAX_D>
__device__ __forceinline__ void finish_head(const HeadEpilogueParams& p, int row, int h, float* buf) {
    const HeadRow r = head_row_of(p, row, h);
    HeadValues<V, MAX_D> in;
    load_head<V, MAX_D>(p, row, h, in);
    finish_loaded_head<V, MAX_D>(p, row, h, buf, r, in);
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

// The same at element `at` of the residual stream of p (fp16 or fp32).
template <int V>
__device__ __forceinline__ void add_to_residual(const ResidualEpilogueParams& p, size_t at, float (&y)[V]) {
    if (p.x_fp32)
        add_to_residual<float, V>(static_cast<float*>(p.x) + at, y, p.has_residual);
    else
        add_to_residual<__half, V>(static_cast<__half*>(p.x) + at, y, p.has_residual);
}

}  // namespace qattn::cuda
