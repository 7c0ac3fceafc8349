// The end of forward1: one warp per (row, head) of the fused Q|K|V accumulator
// adds the bias, applies the head norm, rotates (RoPE) and writes fp16, so each
// head vector makes one trip through registers and shared memory. Accumulator,
// bias and output move 4 elements per lane access where head_dim allows, and the
// position (past_lens) is read before the accumulator, so its latency overlaps.
#include "cuda/kernels.h"
#include "cuda/reduce.cuh"
#include "cuda/vec.cuh"

namespace qattn::cuda {
namespace {

constexpr int kWarps = 8;

template <int V>
__global__ void __launch_bounds__(kWarps * 32) head_epilogue_kernel(HeadEpilogueParams p) {
    extern __shared__ float head_buffers[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int heads = p.num_heads + 2 * p.num_kv_heads;
    const int task = blockIdx.x * kWarps + warp;
    if (task >= p.rows * heads) return;
    const int row = task / heads, h = task - row * heads;
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

    float* acc = p.acc + static_cast<size_t>(row) * p.acc_stride + h * D;
    float* buf = head_buffers + warp * D;
    const __half* bias = p.bias[proj] ? p.bias[proj] + head * D : nullptr;
    // Only the small-row kernel accumulates with atomics, and only into rows
    // below kSmallRows; larger calls overwrite their rows, so zeroing stops there.
    const bool zero = row < kSmallRows;
    for (int i = lane * V; i < D; i += 32 * V) {
        float v[V];
        load_vec<V>(acc + i, v);
        if (bias) {
            float b[V];
            load_vec<V>(bias + i, b);
#pragma unroll
            for (int u = 0; u < V; ++u) v[u] += b[u];
        }
        if (zero) {
            const float zeros[V] = {};
            store_vec<V>(acc + i, zeros);
        }
        store_vec<V>(buf + i, v);
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
        // Each lane rewrites only the elements it read above: no barrier needed.
        for (int i = lane; i < D; i += 32) {
            float v = (buf[i] - mean) * inv * __half2float(n.weight[offset + i]);
            if (n.bias) v += __half2float(n.bias[offset + i]);
            buf[i] = v;
        }
    }

    if (rotate) {
        if (position < 0 || position >= p.max_positions) {
            // Not rotated; the host learns of it through check_device_errors.
            if (lane == 0) atomicExch(p.error_flag, 1);
        } else {
            __syncwarp();
            const int pairs = p.rotary_dim / 2;
            const float* sin_row = p.sin + static_cast<size_t>(position) * pairs;
            const float* cos_row = p.cos + static_cast<size_t>(position) * pairs;
            for (int i = lane; i < pairs; i += 32) {
                const int first = p.rope == QATTN_ROPE_NEOX ? i : 2 * i;
                const int second = p.rope == QATTN_ROPE_NEOX ? i + pairs : 2 * i + 1;
                const float a = buf[first], b = buf[second], c = cos_row[i], s = sin_row[i];
                buf[first] = a * c - b * s;
                buf[second] = b * c + a * s;
            }
        }
    }
    __syncwarp();
    const int width = (proj == 0 ? p.num_heads : p.num_kv_heads) * D;
    __half* out = p.out[proj] + static_cast<size_t>(row) * width + head * D;
    for (int i = lane * V; i < D; i += 32 * V) {
        float v[V];
        load_vec<V>(buf + i, v);
        store_vec<V>(out + i, v);
    }
}

bool aligned8(const void* p) { return reinterpret_cast<uintptr_t>(p) % 8 == 0; }

}  // namespace

qattn_status launch_head_epilogue(const HeadEpilogueParams& p, cudaStream_t stream) {
    const int tasks = p.rows * (p.num_heads + 2 * p.num_kv_heads);
    const int blocks = (tasks + kWarps - 1) / kWarps;
    const size_t shared = sizeof(float) * kWarps * p.head_dim;
    const bool vec = p.head_dim % 4 == 0 && aligned8(p.out[0]) && aligned8(p.out[1]) && aligned8(p.out[2]);
    if (vec)
        head_epilogue_kernel<4><<<blocks, kWarps * 32, shared, stream>>>(p);
    else
        head_epilogue_kernel<1><<<blocks, kWarps * 32, shared, stream>>>(p);
    QATTN_LAUNCH_CHECK("head_epilogue");
    return QATTN_SUCCESS;
}

}  // namespace qattn::cuda
