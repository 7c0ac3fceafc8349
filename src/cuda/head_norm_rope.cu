// The end of forward1: one warp per (row, head) of the fused Q|K|V accumulator
// adds the bias, applies the head norm, rotates (RoPE) and writes fp16, so each
// head vector makes one trip through registers and shared memory.
#include "cuda/kernels.h"
#include "cuda/reduce.cuh"

namespace qattn::cuda {
namespace {

constexpr int kWarps = 8;

__global__ void __launch_bounds__(kWarps * 32) head_epilogue_kernel(HeadEpilogueParams p) {
    extern __shared__ float head_buffers[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int heads = p.num_heads + 2 * p.num_kv_heads;
    const int task = blockIdx.x * kWarps + warp;
    if (task >= p.rows * heads) return;
    const int row = task / heads, h = task - row * heads;
    const int D = p.head_dim;
    int proj, head, column;
    if (h < p.num_heads) {
        proj = 0, head = h, column = h * D;
    } else if (h < p.num_heads + p.num_kv_heads) {
        proj = 1, head = h - p.num_heads, column = h * D;
    } else {
        proj = 2, head = h - p.num_heads - p.num_kv_heads, column = h * D;
    }
    float* acc = p.acc + static_cast<size_t>(row) * p.acc_stride + column;
    float* buf = head_buffers + warp * D;
    const __half* bias = p.bias[proj];
    // Only the small-row kernel accumulates with atomics, and only into rows
    // below kSmallRows; larger calls overwrite their rows, so zeroing stops there.
    const bool zero = row < kSmallRows;
    for (int i = lane; i < D; i += 32) {
        buf[i] = acc[i] + (bias ? __half2float(bias[head * D + i]) : 0.0f);
        if (zero) acc[i] = 0.0f;
    }

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
        for (int i = lane; i < D; i += 32) {
            float v = (buf[i] - mean) * inv * __half2float(n.weight[offset + i]);
            if (n.bias) v += __half2float(n.bias[offset + i]);
            buf[i] = v;
        }
    }

    if (proj < 2 && p.rope != QATTN_ROPE_NONE) {
        const int sequence = row / p.q_len, t = row - sequence * p.q_len;
        const int position = (p.past_lens ? p.past_lens[sequence] : p.past_len) + t;
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
    for (int i = lane; i < D; i += 32) out[i] = __float2half(buf[i]);
}

}  // namespace

qattn_status launch_head_epilogue(const HeadEpilogueParams& p, cudaStream_t stream) {
    const int tasks = p.rows * (p.num_heads + 2 * p.num_kv_heads);
    const int blocks = (tasks + kWarps - 1) / kWarps;
    const size_t shared = sizeof(float) * kWarps * p.head_dim;
    head_epilogue_kernel<<<blocks, kWarps * 32, shared, stream>>>(p);
    QATTN_LAUNCH_CHECK("head_epilogue");
    return QATTN_SUCCESS;
}

}  // namespace qattn::cuda
