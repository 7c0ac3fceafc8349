// The end of forward1 as its own kernel (where the small-row GEMM does not run
// it itself): one warp per (row, head) of the fused Q|K|V accumulator adds the
// bias, applies the head norm, rotates (RoPE) and writes fp16 (finish_head in
// epilogues.cuh), so each head vector makes one trip through registers and
// shared memory; accumulator, bias and output move 4 elements a lane access
// where head_dim allows. Many rows: resident blocks that walk the rows, a thread
// per 8 elements of several heads, the next rows' loads in flight meanwhile.
#include "cuda/cp_async.cuh"
#include "cuda/epilogues.cuh"
#include "cuda/kernels.h"
#include "cuda/occupancy.h"
#include "cuda/pdl.cuh"

#include <algorithm>
#include <type_traits>

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
    const int row = task / heads, h = task - row * heads;
    float* const buf = head_buffers + warp * p.head_dim;
    if (!p.caller_data_ready_at_start) {
        wait_for_producers();
        finish_head<V, MAX_D>(p, row, h, buf);
        return;
    }
    // The position (and so the sin/cos rows) and the KV slot before the wait:
    // after it only the accumulator, bias and tables are read, all at once, so
    // the tail after the GEMM is one memory latency instead of two.
    const HeadRow r = head_row_of(p, row, h);
    wait_for_producers();
    HeadValues<V, MAX_D> in;
    load_head<V, MAX_D>(p, row, h, in);
    finish_loaded_head<V, MAX_D>(p, row, h, buf, r, in);
}

// Many rows: a block finishes a row at a time, a thread per 8 consecutive
// elements of a head (head_dim / 8 threads a head, a power of two), up to
// PIECES such pieces a thread, of heads blockDim / (head_dim / 8) apart, so each
// thread handles the same elements of every head it holds and reads one set of
// sin/cos values. The blocks are resident at once and walk the rows gridDim.x
// apart, each with kRowStages rows in flight: while it finishes one, the next
// rows' sums, sin/cos rows and KV slot are on their way into its shared memory
// (cp.async). With a block per row (one row's loads, then its math and stores,
// five waves at Llama-3-8B prefill) the kernel moved 2.3-2.8 TB/s, bound by the
// latency of each row's steps rather than by its bytes. The head norm sums and
// the NeoX pairs cross threads by shuffles within the head's threads; GPT-J
// pairs lie inside a piece.
constexpr int kRowStages = 3;

__host__ __device__ constexpr size_t align16(size_t n) { return (n + 15) / 16 * 16; }

// One row's stage: its sums (fp16 or fp32), then the cos and sin rows of its
// position, then its KV slot and whether the position is in the tables.
template <typename AccT>
struct RowStage {
    size_t acc_bytes, table_bytes;
    __host__ __device__ RowStage(int pieces, int pairs)
        : acc_bytes(align16(sizeof(AccT) * 8 * static_cast<size_t>(pieces))),
          table_bytes(align16(sizeof(float) * static_cast<size_t>(pairs))) {}
    __host__ __device__ size_t bytes() const { return acc_bytes + 2 * table_bytes + 16; }
};

template <int PIECES, typename AccT>
__global__ void __launch_bounds__(row_threads(PIECES), row_blocks_per_sm(PIECES))
    head_epilogue_rows_kernel(HeadEpilogueParams p) {
    extern __shared__ __align__(16) unsigned char stages[];
    const int D = p.head_dim, lanes = D / 8;  // threads a head
    const int lanes_log2 = __ffs(lanes) - 1;   // pieces to heads by a shift: no integer division
    const float inv_d = 1.0f / D;
    const int heads = p.num_heads + 2 * p.num_kv_heads, pieces = heads * lanes;
    const int e = (threadIdx.x & (lanes - 1)) * 8;  // this thread's first element of each of its heads
    const bool rope = p.rope != QATTN_ROPE_NONE;
    const bool head_norms = p.norm[0].type != QATTN_NORM_NONE || p.norm[1].type != QATTN_NORM_NONE;
    const int pairs = p.rotary_dim / 2;
    const bool neox = p.rope == QATTN_ROPE_NEOX;
    const RowStage<AccT> layout(pieces, pairs);
    const AccT* const sums = std::is_same_v<AccT, __half> ? reinterpret_cast<const AccT*>(p.acc16)
                                                          : reinterpret_cast<const AccT*>(p.acc);
    const auto stage_acc = [&](int s) { return reinterpret_cast<AccT*>(stages + s * layout.bytes()); };
    const auto stage_cos = [&](int s) {
        return reinterpret_cast<float*>(stages + s * layout.bytes() + layout.acc_bytes);
    };
    const auto stage_sin = [&](int s) { return stage_cos(s) + layout.table_bytes / sizeof(float); };
    const auto stage_tail = [&](int s) {
        return reinterpret_cast<int*>(stages + s * layout.bytes() + layout.acc_bytes + 2 * layout.table_bytes);
    };

    // Issues the copies of `row` into stage s (the caller commits them as one group).
    const auto fetch = [&](int row, int s) {
        AccT* const acc = stage_acc(s);
#pragma unroll
        for (int k = 0; k < PIECES; ++k) {
            const int piece = threadIdx.x + k * blockDim.x;
            if (piece >= pieces) continue;
            const AccT* src = sums + static_cast<size_t>(row) * p.acc_stride + piece * 8;
#pragma unroll
            for (int c = 0; c < static_cast<int>(sizeof(AccT) * 8 / 16); ++c)
                cp_async16(acc + piece * 8 + c * (16 / sizeof(AccT)), src + c * (16 / sizeof(AccT)));
        }
        const int sequence = row / p.q_len;
        const int position = (p.past_lens ? p.past_lens[sequence] : p.past_len) + (row - sequence * p.q_len);
        const bool in_range = position >= 0 && position < p.max_positions;
        const int quads = pairs / 4;  // 16-byte pieces of a table row
        for (int i = threadIdx.x; rope && in_range && i < 2 * quads; i += blockDim.x) {
            const bool cosine = i < quads;
            const int q = cosine ? i : i - quads;
            const float* table = (cosine ? p.cos : p.sin) + static_cast<size_t>(position) * pairs + q * 4;
            cp_async16((cosine ? stage_cos(s) : stage_sin(s)) + q * 4, table);
        }
        if (threadIdx.x == 0) {
            int* const tail = stage_tail(s);
            tail[1] = in_range;
            if (p.kv_slots) cp_async4(&tail[0], p.kv_slots + row);
        }
    };

    // Finishes `row` from stage s.
    const auto finish = [&](int row, int s) {
        const AccT* const acc = stage_acc(s);
        float v[PIECES][8];
#pragma unroll
        for (int k = 0; k < PIECES; ++k) {
            const int piece = threadIdx.x + k * blockDim.x;
#pragma unroll
            for (int u = 0; u < 8; ++u) v[k][u] = 0.0f;
            if (piece >= pieces) continue;
            load_vec<8>(acc + piece * 8, v[k]);
            int head = 0;
            const int proj = head_projection(p, piece >> lanes_log2, &head);
            add_bias<8>(p.bias[proj] ? p.bias[proj] + head * D : nullptr, e, v[k]);
        }
        const int* const tail = stage_tail(s);
        const bool in_range = tail[1] != 0;
        const int64_t slot = p.kv_slots ? tail[0] : 0;

        // This thread's rotary angles: NeoX rotates element i with i + pairs (the
        // thread `pairs / 8` lanes away), GPT-J 2i with 2i + 1 (in this piece).
        const bool rotated = rope && in_range && e < p.rotary_dim;
        const bool first_half = e < pairs;
        float cs[8], sn[8];
        if (rotated && neox) {
            const int at = first_half ? e : e - pairs;
            load_vec<8>(stage_cos(s) + at, cs);
            load_vec<8>(stage_sin(s) + at, sn);
        } else if (rotated) {  // a GPT-J piece holds 4 pairs: 4 angles, and no load past the table's row
            float c4[4], s4[4];
            load_vec<4>(stage_cos(s) + e / 2, c4);
            load_vec<4>(stage_sin(s) + e / 2, s4);
#pragma unroll
            for (int u = 0; u < 4; ++u) cs[u] = c4[u], sn[u] = s4[u];
        }
        if (rope && !in_range && threadIdx.x == 0) atomicExch(p.error_flag, 1);  // not rotated
        const bool slot_ok = slot >= 0 && slot < p.num_kv_slots;
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
            if (proj > 0 && p.kv_slots && slot_ok)
                store_vec<8>(p.cache[proj - 1] + slot * width + head * D + e, v[k]);
            // Only the small-row kernel accumulates with atomics, and only into rows below kSmallRows.
            if (!std::is_same_v<AccT, __half> && row < kSmallRows) {
                const float zeros[8] = {};
                store_vec<8>(p.acc + static_cast<size_t>(row) * p.acc_stride + piece * 8, zeros);
            }
        }
    };

    wait_for_producers();
    const int step = gridDim.x;
#pragma unroll
    for (int i = 0; i < kRowStages - 1; ++i) {
        const int row = blockIdx.x + i * step;
        if (row < p.rows) fetch(row, i);
        cp_async_commit();
    }
    for (int i = 0, row = blockIdx.x; row < p.rows; ++i, row += step) {
        const int ahead = row + (kRowStages - 1) * step;  // into the stage the last row was finished from
        if (ahead < p.rows) fetch(ahead, (i + kRowStages - 1) % kRowStages);
        cp_async_commit();
        cp_async_wait<kRowStages - 1>();  // this row's group (one a row, in order) has landed
        __syncthreads();                  // ... every thread's: the tables and slot are shared
        finish(row, i % kRowStages);
        __syncthreads();  // the next iteration refills this stage
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

// The blocks of the row kernel resident on the device at once with `shared`
// bytes of stages: its grid (the kernel is allowed the device's largest opt-in
// shared memory, as fp32 sums need more than the 48 KB default).
template <typename Kernel>
qattn_status resident_blocks(Kernel kernel, int threads, size_t shared, int* out) {
    int device = 0, optin = 0, sms = 0, per_sm = 0;
    QATTN_CUDA_TRY(cudaGetDevice(&device));
    QATTN_CUDA_TRY(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    QATTN_CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    if (shared > static_cast<size_t>(optin))
        return fail(QATTN_ERROR_INTERNAL, "head epilogue: %zu bytes of row stages exceed the device's %d", shared, optin);
    QATTN_TRY(blocks_per_sm(kernel, threads, shared, optin, &per_sm));
    *out = std::max(per_sm, 1) * sms;
    return QATTN_SUCCESS;
}

template <typename AccT>
qattn_status launch_rows(const HeadEpilogueParams& p, int pieces_a_thread, cudaStream_t stream) {
    const int per_row = (p.num_heads + 2 * p.num_kv_heads) * (p.head_dim / 8);
    const int threads = ((per_row + pieces_a_thread - 1) / pieces_a_thread + 31) / 32 * 32;
    const auto kernel = pieces_a_thread == 2   ? head_epilogue_rows_kernel<2, AccT>
                        : pieces_a_thread == 4 ? head_epilogue_rows_kernel<4, AccT>
                                               : head_epilogue_rows_kernel<8, AccT>;
    const size_t shared = kRowStages * RowStage<AccT>(per_row, p.rotary_dim / 2).bytes();
    int resident = 0;
    QATTN_TRY(resident_blocks(kernel, threads, shared, &resident));
    return launch_pdl("head_epilogue_rows", kernel, std::min(p.rows, resident), threads, shared, stream, p);
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
    if (pieces) return p.acc16 ? launch_rows<__half>(p, pieces, stream) : launch_rows<float>(p, pieces, stream);
    const int tasks = p.rows * (p.num_heads + 2 * p.num_kv_heads);
    const int blocks = (tasks + kWarps - 1) / kWarps;
    const auto kernel = vec ? (small ? head_epilogue_kernel<4, 128> : head_epilogue_kernel<4, 512>)
                            : (small ? head_epilogue_kernel<1, 128> : head_epilogue_kernel<1, 512>);
    return launch_pdl("head_epilogue", kernel, blocks, kWarps * 32, buffers, stream, p);
}

}  // namespace qattn::cuda
