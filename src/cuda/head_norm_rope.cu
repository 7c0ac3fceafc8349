// The end of forward1 as its own kernel (where the small-row GEMM does not run
// it itself): one warp per (row, head) of the fused Q|K|V accumulator adds the
// bias, applies the head norm, rotates (RoPE) and writes fp16 (finish_head in
// epilogues.cuh), so each head vector makes one trip through registers and
// shared memory; accumulator, bias and output move 4 elements a lane access
// where head_dim allows. Many rows: a block per row, a thread per 8 elements of
// several heads, in registers only.
#include "cuda/epilogues.cuh"
#include "cuda/kernels.h"
#include "cuda/pdl.cuh"

namespace qattn::cuda {
namespace {

constexpr int kWarps = 8;
// The per-row kernel's threads a block, at most, by pieces a thread: two
// pieces (Llama-3-8B's 768 a row) in blocks of up to 384 threads, three of
// them an SM (56 registers); more pieces in blocks of up to 512.
__host__ __device__ constexpr int row_threads(int pieces) { return pieces == 2 ? 384 : 512; }
__host__ __device__ constexpr int row_blocks_per_sm(int pieces) { return pieces == 2 ? 3 : 1; }

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

// Many rows: a block per row and a thread per 8 consecutive elements of a head
// (head_dim / 8 threads a head, a power of two), up to PIECES such pieces a
// thread, of heads blockDim / (head_dim / 8) apart, so each thread handles the
// same elements of every head it holds and reads one set of sin/cos values.
// Every global load of the block (accumulator, biases, norm weights, position,
// slot, then the tables) is in flight before the first use: the per-task kernel
// above walks a chain of dependent loads per head, and one warp per head with
// 8-byte accesses kept too few bytes in flight to stream a prefill's Q|K|V
// (39 us for the 48 MB of a 2048-row Llama-3-8B call on the H200, 1.2 TB/s).
// The head norm sums and the NeoX pairs cross threads by shuffles within the
// head's threads; GPT-J pairs lie inside a piece.
template <int PIECES>
__global__ void __launch_bounds__(row_threads(PIECES), row_blocks_per_sm(PIECES))
    head_epilogue_rows_kernel(HeadEpilogueParams p) {
    const int row = blockIdx.x;
    const int D = p.head_dim, lanes = D / 8;  // threads a head
    const int lanes_log2 = __ffs(lanes) - 1;   // pieces to heads by a shift: no integer division
    const float inv_d = 1.0f / D;
    const int heads = p.num_heads + 2 * p.num_kv_heads, pieces = heads * lanes;
    const int e = (threadIdx.x & (lanes - 1)) * 8;  // this thread's first element of each of its heads
    const bool rope = p.rope != QATTN_ROPE_NONE;
    const bool head_norms = p.norm[0].type != QATTN_NORM_NONE || p.norm[1].type != QATTN_NORM_NONE;
    wait_for_producers();

    float v[PIECES][8];
#pragma unroll
    for (int k = 0; k < PIECES; ++k) {
        const int piece = threadIdx.x + k * blockDim.x;
#pragma unroll
        for (int u = 0; u < 8; ++u) v[k][u] = 0.0f;
        if (piece >= pieces) continue;
        const size_t at = static_cast<size_t>(row) * p.acc_stride + piece * 8;
        if (p.acc16)
            load_vec<8>(p.acc16 + at, v[k]);
        else
            load_vec<8>(p.acc + at, v[k]);
        int head = 0;
        const int proj = head_projection(p, piece >> lanes_log2, &head);
        add_bias<8>(p.bias[proj] ? p.bias[proj] + head * D : nullptr, e, v[k]);
    }
    const HeadRow r = head_row(p, row, rope, true);

    // This thread's rotary angles: NeoX rotates element i with i + pairs (the
    // thread `pairs / 8` lanes away), GPT-J 2i with 2i + 1 (in this piece).
    const int pairs = p.rotary_dim / 2;
    const bool neox = p.rope == QATTN_ROPE_NEOX;
    const bool rotated = rope && r.in_range && e < p.rotary_dim;
    const bool first_half = e < pairs;
    float cs[8], sn[8];
    if (rotated && neox) {
        const int at = first_half ? e : e - pairs;
        load_vec<8>(r.cos + at, cs);
        load_vec<8>(r.sin + at, sn);
    } else if (rotated) {  // a GPT-J piece holds 4 pairs: 4 angles, and no load past the table's row
        float c4[4], s4[4];
        load_vec<4>(r.cos + e / 2, c4);
        load_vec<4>(r.sin + e / 2, s4);
#pragma unroll
        for (int u = 0; u < 4; ++u) cs[u] = c4[u], sn[u] = s4[u];
    }
    if (rope && !r.in_range && threadIdx.x == 0) atomicExch(p.error_flag, 1);  // not rotated
    const bool slot_ok = r.slot >= 0 && r.slot < p.num_kv_slots;
    if (p.kv_slots && !slot_ok && threadIdx.x == 0) atomicExch(p.error_flag, 1);  // not cached

#pragma unroll
    for (int k = 0; k < PIECES; ++k) {
        // Every thread takes part in the shuffles (the head's threads are in or out together).
        const int piece = threadIdx.x + k * blockDim.x;
        int head = 0;
        const int proj = head_projection(p, min(piece, pieces - 1) >> lanes_log2, &head);
        if (head_norms) {  // the same for the whole grid: the shuffles stay convergent
            const NormParams& n = p.norm[proj < 2 ? proj : 0];
            float sum = 0.0f;
#pragma unroll
            for (int u = 0; u < 8; ++u) sum += v[k][u];
            sum = group_sum(sum, lanes);
            const float mean = n.type == QATTN_NORM_LAYER ? sum * inv_d : 0.0f;
            float squares = 0.0f;
#pragma unroll
            for (int u = 0; u < 8; ++u) squares += (v[k][u] - mean) * (v[k][u] - mean);
            const float inv = rsqrtf(group_sum(squares, lanes) * inv_d + n.eps);
            if (proj < 2 && n.type != QATTN_NORM_NONE && piece < pieces) {
                const int offset = (n.per_head ? head * D : 0) + e;
                float w[8];
                load_vec<8>(n.weight + offset, w);
#pragma unroll
                for (int u = 0; u < 8; ++u) v[k][u] = (v[k][u] - mean) * inv * w[u];
                add_bias<8>(n.bias, offset, v[k]);
            }
        }
        if (neox && rope) {
            const int partner = pairs / 8;
#pragma unroll
            for (int u = 0; u < 8; ++u) {
                const float other = __shfl_xor_sync(0xffffffffu, v[k][u], partner);
                if (rotated && proj < 2)
                    v[k][u] = first_half ? v[k][u] * cs[u] - other * sn[u] : v[k][u] * cs[u] + other * sn[u];
            }
        } else if (rotated && proj < 2) {
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const float a = v[k][2 * u], b = v[k][2 * u + 1];
                v[k][2 * u] = a * cs[u] - b * sn[u];
                v[k][2 * u + 1] = b * cs[u] + a * sn[u];
            }
        }
        if (piece >= pieces) continue;
        const int width = (proj == 0 ? p.num_heads : p.num_kv_heads) * D;
        if (p.out[proj]) store_vec<8>(p.out[proj] + static_cast<size_t>(row) * width + head * D + e, v[k]);
        if (proj > 0 && p.kv_slots && slot_ok) store_vec<8>(p.cache[proj - 1] + r.slot * width + head * D + e, v[k]);
        // Only the small-row kernel accumulates with atomics, and only into rows below kSmallRows.
        if (!p.acc16 && row < kSmallRows) {
            const float zeros[8] = {};
            store_vec<8>(p.acc + static_cast<size_t>(row) * p.acc_stride + piece * 8, zeros);
        }
    }
}

// From here a block per row has enough rows to fill the GPU.
constexpr int kRowKernelRows = 128;

bool is_pow2(int n) { return n > 0 && (n & (n - 1)) == 0; }

// The per-row kernel's pieces a thread for these shapes, or 0 where it does not
// apply (head_dim not 8 times a power of two, NeoX pairs not 8 times one,
// GPT-J rotating part of a piece, or pointers not 16-byte aligned): then the
// per-task kernel runs.
int row_kernel_pieces(const HeadEpilogueParams& p) {
    const int lanes = p.head_dim / 8, pairs = p.rotary_dim / 2;
    if (p.head_dim % 8 || !is_pow2(lanes) || lanes > 32 || p.acc_stride % 8) return 0;
    switch (p.rope) {
    case QATTN_ROPE_NONE: break;
    case QATTN_ROPE_GPTJ: if (p.rotary_dim % 8) return 0; break;
    case QATTN_ROPE_NEOX: if (pairs % 8 || !is_pow2(pairs / 8)) return 0; break;
    default: return 0;
    }
    const void* aligned[] = {p.acc, p.acc16, p.bias[0], p.bias[1], p.bias[2], p.norm[0].weight, p.norm[0].bias,
                             p.norm[1].weight, p.norm[1].bias, p.sin, p.cos, p.out[0], p.out[1], p.out[2],
                             p.cache[0], p.cache[1]};
    for (const void* ptr : aligned)
        if (!is_aligned(ptr, 16)) return 0;
    const int pieces = (p.num_heads + 2 * p.num_kv_heads) * lanes;
    for (int per_thread : {2, 4, 8})
        if (pieces <= per_thread * row_threads(per_thread)) return per_thread;
    return 0;
}

}  // namespace

bool head_outputs_aligned8(const HeadEpilogueParams& p) {
    return is_aligned(p.out[0], 8) && is_aligned(p.out[1], 8) && is_aligned(p.out[2], 8) &&
           is_aligned(p.cache[0], 8) && is_aligned(p.cache[1], 8);
}

qattn_status launch_head_epilogue(const HeadEpilogueParams& p, cudaStream_t stream) {
    const bool vec = p.head_dim % 4 == 0 && head_outputs_aligned8(p);
    const bool small = p.head_dim <= 128;
    const size_t buffers = sizeof(float) * kWarps * p.head_dim;
    const int pieces = p.rows >= kRowKernelRows ? row_kernel_pieces(p) : 0;
    if (pieces) {
        const int per_row = (p.num_heads + 2 * p.num_kv_heads) * (p.head_dim / 8);
        const int threads = ((per_row + pieces - 1) / pieces + 31) / 32 * 32;
        const auto kernel = pieces == 2   ? head_epilogue_rows_kernel<2>
                            : pieces == 4 ? head_epilogue_rows_kernel<4>
                                          : head_epilogue_rows_kernel<8>;
        return launch_pdl("head_epilogue_rows", kernel, p.rows, threads, 0, stream, p);
    }
    const int tasks = p.rows * (p.num_heads + 2 * p.num_kv_heads);
    const int blocks = (tasks + kWarps - 1) / kWarps;
    const auto kernel = vec ? (small ? head_epilogue_kernel<4, 128> : head_epilogue_kernel<4, 512>)
                            : (small ? head_epilogue_kernel<1, 128> : head_epilogue_kernel<1, 512>);
    return launch_pdl("head_epilogue", kernel, blocks, kWarps * 32, buffers, stream, p);
}

}  // namespace qattn::cuda
