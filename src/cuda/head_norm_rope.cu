// The end of forward1: one warp per (row, head) of the fused Q|K|V accumulator
// adds the bias, applies the head norm, rotates (RoPE) and writes fp16, so each
// head vector makes one trip through registers and shared memory. Accumulator,
// bias and output move 4 elements per lane access where head_dim allows. All
// global loads (accumulator, bias, position, then sin/cos) are issued before
// the first use, so a warp waits out about one memory latency, not three.
#include "cuda/kernels.h"
#include "cuda/pdl.cuh"
#include "cuda/reduce.cuh"
#include "cuda/vec.cuh"

namespace qattn::cuda {
namespace {

constexpr int kWarps = 8;

// MAX_D: head_dim bound that sizes the register arrays (128 for the usual
// heads: fewer registers, more warps per SM; 512, the core's limit, otherwise).
template <int V, int MAX_D>
__global__ void __launch_bounds__(kWarps * 32) head_epilogue_kernel(HeadEpilogueParams p) {
    extern __shared__ float head_buffers[];
    constexpr int kChunks = MAX_D / (32 * V);  // lane accesses per head vector, at most
    constexpr int kPairChunks = (MAX_D / 2 + 31) / 32;
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
    wait_for_producers();

    int position = 0;
    if (rotate) {
        const int sequence = row / p.q_len;
        position = (p.past_lens ? p.past_lens[sequence] : p.past_len) + (row - sequence * p.q_len);
    }
    float* acc = p.acc + static_cast<size_t>(row) * p.acc_stride + h * D;
    const __half* bias = p.bias[proj] ? p.bias[proj] + head * D : nullptr;
    float v[kChunks][V];
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
        const int i = (lane + 32 * c) * V;
        if (i >= D) break;
        load_vec<V>(acc + i, v[c]);
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

    float* buf = head_buffers + warp * D;
    // Only the small-row kernel accumulates with atomics, and only into rows
    // below kSmallRows; larger calls overwrite their rows, so zeroing stops there.
    const bool zero = row < kSmallRows;
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
    __half* out = p.out[proj] + static_cast<size_t>(row) * width + head * D;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
        const int i = (lane + 32 * c) * V;
        if (i >= D) break;
        float o[V];
        load_vec<V>(buf + i, o);
        store_vec<V>(out + i, o);
    }
}

bool aligned8(const void* p) { return reinterpret_cast<uintptr_t>(p) % 8 == 0; }

}  // namespace

qattn_status launch_head_epilogue(const HeadEpilogueParams& p, cudaStream_t stream) {
    const int tasks = p.rows * (p.num_heads + 2 * p.num_kv_heads);
    const int blocks = (tasks + kWarps - 1) / kWarps;
    const size_t shared = sizeof(float) * kWarps * p.head_dim;
    const bool vec = p.head_dim % 4 == 0 && aligned8(p.out[0]) && aligned8(p.out[1]) && aligned8(p.out[2]);
    const bool small = p.head_dim <= 128;
    const auto kernel = vec ? (small ? head_epilogue_kernel<4, 128> : head_epilogue_kernel<4, 512>)
                            : (small ? head_epilogue_kernel<1, 128> : head_epilogue_kernel<1, 512>);
    return launch_pdl("head_epilogue", kernel, blocks, kWarps * 32, shared, stream, p);
}

}  // namespace qattn::cuda
