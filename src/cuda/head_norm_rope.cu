// The end of forward1 as its own kernel (where the small-row GEMM does not run
// it itself): one warp per (row, head) of the fused Q|K|V accumulator adds the
// bias, applies the head norm, rotates (RoPE) and writes fp16 (finish_head in
// epilogues.cuh), so each head vector makes one trip through registers and
// shared memory. Accumulator, bias and output move 4 elements per lane access
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

}  // namespace

bool head_outputs_aligned8(const HeadEpilogueParams& p) {
    return is_aligned(p.out[0], 8) && is_aligned(p.out[1], 8) && is_aligned(p.out[2], 8) &&
           is_aligned(p.cache[0], 8) && is_aligned(p.cache[1], 8);
}

qattn_status launch_head_epilogue(const HeadEpilogueParams& p, cudaStream_t stream) {
    const int tasks = p.rows * (p.num_heads + 2 * p.num_kv_heads);
    const int blocks = (tasks + kWarps - 1) / kWarps;
    const size_t shared = sizeof(float) * kWarps * p.head_dim;
    const bool vec = p.head_dim % 4 == 0 && head_outputs_aligned8(p);
    const bool small = p.head_dim <= 128;
    const auto kernel = vec ? (small ? head_epilogue_kernel<4, 128> : head_epilogue_kernel<4, 512>)
                            : (small ? head_epilogue_kernel<1, 128> : head_epilogue_kernel<1, 512>);
    return launch_pdl("head_epilogue", kernel, blocks, kWarps * 32, shared, stream, p);
}

}  // namespace qattn::cuda
