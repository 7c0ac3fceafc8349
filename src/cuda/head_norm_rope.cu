// The end of forward1 as its own kernel (where the small-row GEMM does not run
// it itself): one warp per (row, head) of the fused Q|K|V accumulator adds the
// bias, applies the head norm, rotates (RoPE) and writes fp16 (finish_head in
// epilogues.cuh), so each head vector makes one trip through registers and
// shared memory. Many rows: a block per row, sharing the row's position and
// tables among its heads. Accumulator, bias and output move 4 elements per lane access
// where head_dim allows.
#include "cuda/epilogues.cuh"
#include "cuda/kernels.h"
#include "cuda/pdl.cuh"

namespace qattn::cuda {
namespace {

constexpr int kWarps = 8;

// MAX_D: head_dim bound that sizes the register arrays (128 for the usual
// heads: fewer registers, more warps per SM; 512, the core's limit, otherwise).
template <int V, int MAX_D>
__global__ void __launch_bounds__(kWarps * 32) head_epilogue_kernel(HeadEpilogueParams p) {
    extern __shared__ float head_buffers[];
    const int warp = threadIdx.x >> 5;
    const int heads = p.num_heads + 2 * p.num_kv_heads;
    const int task = blockIdx.x * kWarps + warp;
    if (task >= p.rows * heads) return;
    wait_for_producers();
    const int row = task / heads;
    finish_head<V, MAX_D>(p, row, task - row * heads, head_buffers + warp * p.head_dim);
}

// Beyond kRowKernelRows rows: one block per row. The row's position, KV slot
// and sin/cos rows are read once, into shared memory, for all its heads; each
// warp then walks its heads (warp, warp + 8, ...) with the next head's loads in
// flight while it finishes one. (The per-task kernel above reads position and
// tables again for every head: a chain of dependent loads per warp, measured at
// 43 us for the 48 MB of a 2048-row Llama-3-8B call on the H200, 3.8x their bytes.)
template <int V, int MAX_D>
__global__ void __launch_bounds__(kWarps * 32) head_epilogue_rows_kernel(HeadEpilogueParams p) {
    extern __shared__ float shared[];  // kWarps head buffers [head_dim] (16-byte accesses), then cos, sin [pairs]
    const int pairs = p.rotary_dim / 2, row = blockIdx.x, warp = threadIdx.x >> 5;
    float* buf = shared + warp * p.head_dim;
    float* cos_row = shared + kWarps * p.head_dim;
    float* sin_row = cos_row + pairs;
    const int heads = p.num_heads + 2 * p.num_kv_heads;
    wait_for_producers();
    HeadValues<V, MAX_D> even, odd;  // heads warp + 16 i and warp + 16 i + 8: registers, no runtime index
    if (warp < heads) load_head<V, MAX_D>(p, row, warp, even);
    HeadRow r = head_row(p, row, p.rope != QATTN_ROPE_NONE, true);
    if (r.cos) {
        for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
            cos_row[i] = r.cos[i];
            sin_row[i] = r.sin[i];
        }
        r.cos = cos_row;
        r.sin = sin_row;
    }
    __syncthreads();
    for (int h = warp; h < heads; h += 2 * kWarps) {
        if (h + kWarps < heads) load_head<V, MAX_D>(p, row, h + kWarps, odd);
        finish_loaded_head<V, MAX_D>(p, row, h, buf, r, even);
        if (h + kWarps >= heads) break;
        if (h + 2 * kWarps < heads) load_head<V, MAX_D>(p, row, h + 2 * kWarps, even);
        finish_loaded_head<V, MAX_D>(p, row, h + kWarps, buf, r, odd);
    }
}

constexpr int kRowKernelRows = 256;  // below, its blocks (one a row) would leave SMs idle

}  // namespace

bool head_outputs_aligned8(const HeadEpilogueParams& p) {
    return is_aligned(p.out[0], 8) && is_aligned(p.out[1], 8) && is_aligned(p.out[2], 8) &&
           is_aligned(p.cache[0], 8) && is_aligned(p.cache[1], 8);
}

qattn_status launch_head_epilogue(const HeadEpilogueParams& p, cudaStream_t stream) {
    const bool vec = p.head_dim % 4 == 0 && head_outputs_aligned8(p);
    const bool small = p.head_dim <= 128;
    const size_t buffers = sizeof(float) * kWarps * p.head_dim;
    if (p.rows >= kRowKernelRows) {
        const auto kernel = vec ? (small ? head_epilogue_rows_kernel<4, 128> : head_epilogue_rows_kernel<4, 512>)
                                : (small ? head_epilogue_rows_kernel<1, 128> : head_epilogue_rows_kernel<1, 512>);
        return launch_pdl("head_epilogue_rows", kernel, p.rows, kWarps * 32, buffers + sizeof(float) * p.rotary_dim,
                          stream, p);
    }
    const int tasks = p.rows * (p.num_heads + 2 * p.num_kv_heads);
    const int blocks = (tasks + kWarps - 1) / kWarps;
    const auto kernel = vec ? (small ? head_epilogue_kernel<4, 128> : head_epilogue_kernel<4, 512>)
                            : (small ? head_epilogue_kernel<1, 128> : head_epilogue_kernel<1, 512>);
    return launch_pdl("head_epilogue", kernel, blocks, kWarps * 32, buffers, stream, p);
}

}  // namespace qattn::cuda
