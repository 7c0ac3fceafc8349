// GPTQ 4-bit GEMM for decode-sized row counts (1..32 rows), bound by the bytes of
// the packed weights. Two kernels read the same packing (cuda_qmatrix.h):
//  - gptq4_gemm_small (17..32 rows): each warp owns 8 output columns (one MMA
//    n-tile) and walks a slice of K (at most 8 chunks of 128 rows): one 16-byte
//    coalesced load per lane and chunk brings 128 rows of its column (8
//    m16n8k16 steps), all issued before the block stages x (and before it waits
//    for the kernel that wrote x: programmatic launch), dequantized straight
//    into the B fragment:
//      nibble pair -> (lop3 with 0x6400) -> fp16 1024 + q -> minus (1024 + z) -> times scale
//    (all exact but the final rounding: the fp16 value of the weight;
//    gptq4_nibbles.cuh); x comes from shared memory by ldmatrix.
//  - gptq4_gemm_swapped (1..16 rows): the weights are the m16 operand and x the
//    n8 one; the weights wait in registers (grids of up to two waves) or stream
//    through a cp.async pipeline in shared memory (longer K slices).
// The tensor cores accumulate in fp32. K is split across blocks (planned from
// the kernels' occupancy, plan_chunks), and the split-K partial sums meet in one
// of three ways: atomics into the fp32 accumulator, whose epilogue kernel zeroes
// it again; the same, then the last block to finish a column range (an arrival
// counter per range) runs the epilogue on it (up to 8 rows: finish_columns); or,
// on sm_90 where they fit, the split-K blocks of a column range as one thread
// block cluster that adds them in distributed shared memory and runs the
// epilogue together (up to 16 rows: finish_in_cluster). Or K is split across
// the warps of one block that owns 16 columns (gptq4_gemm_whole_k: up to 4
// rows, K up to 4096, finishing the phase), and the sums meet in its shared
// memory. The epilogue applies
// bias / head norm / RoPE (forward1) or adds to the residual (forward2), so
// the phase is one kernel.
#include "cuda/cp_async.cuh"
#include "cuda/epilogues.cuh"
#include "cuda/gptq4_nibbles.cuh"
#include "cuda/kernels.h"
#include "cuda/occupancy.h"
#include "cuda/pdl.cuh"

#include <cooperative_groups.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <set>
#include <tuple>

namespace qattn::cuda {
namespace {

constexpr int kWarps = 8;             // n-tiles per block
constexpr int kMaxChunksPerBlock = 8; // 8 x 128 rows of K per block
constexpr int kMaxProblems = 3;

struct Batch {
    SmallGemmProblem p[kMaxProblems];
    int block_begin[kMaxProblems];
    int count;
};

__device__ __forceinline__ uint4 load_streaming(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

// The problem of this block (blockIdx.x) and the block's index within it.
__device__ __forceinline__ SmallGemmProblem block_problem(const Batch& batch, int* block_in_problem) {
    int pi = 0;
#pragma unroll
    for (int i = 1; i < kMaxProblems; ++i)
        if (i < batch.count && static_cast<int>(blockIdx.x) >= batch.block_begin[i]) pi = i;
    *block_in_problem = blockIdx.x - (pi == 0 ? batch.block_begin[0] : pi == 1 ? batch.block_begin[1]
                                                                               : batch.block_begin[2]);
    return pi == 0 ? batch.p[0] : pi == 1 ? batch.p[1] : batch.p[2];
}

// The input feature of each packed row this thread gathers (perm, constant:
// loaded before the wait for the kernel that writes x), when x is not pre-gathered.
template <int PU>  // packed rows per thread: span <= PU * blockDim.x
__device__ __forceinline__ void load_perm(int (&src)[PU], const SmallGemmProblem& P, int chunk0, int span) {
#pragma unroll
    for (int u = 0; u < PU; ++u) {
        const int kk = threadIdx.x + u * blockDim.x;
        src[u] = !P.xg && kk < span ? P.w.perm[chunk0 * kPackRows + kk] : -1;
    }
}

// xs[r * stride + kk] = x of row r at packed row chunk0 * 128 + kk, kk < span,
// from x pre-gathered into packed row order (by the input staging): a
// contiguous copy with 16-byte accesses.
__device__ __forceinline__ void copy_x(__half* xs, int stride, const SmallGemmProblem& P, int rows, int chunk0,
                                       int span) {
    const int pieces = span / 8, total = rows * pieces;
    for (int i = threadIdx.x; i < total; i += blockDim.x) {
        const int r = i / pieces, c = i - r * pieces;
        *reinterpret_cast<uint4*>(xs + r * stride + c * 8) = *reinterpret_cast<const uint4*>(
            P.xg + static_cast<size_t>(r) * P.w.chunks * kPackRows + chunk0 * kPackRows + c * 8);
    }
}

// The same for the small kernel, gathering through perm where x is not
// pre-gathered: every (row, column) a scattered 2-byte load, so this path is for
// few rows; 8 (perm, x) load pairs per thread in flight.
__device__ __forceinline__ void stage_x(__half* xs, int stride, const SmallGemmProblem& P, const __half* x,
                                        int x_stride, int rows, int chunk0, int span) {
    if (P.xg) return copy_x(xs, stride, P, rows, chunk0, span);
    const int total = rows * span;
    for (int base = threadIdx.x; base < total; base += 8 * blockDim.x) {
        __half v[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const int i = base + u * blockDim.x;
            v[u] = __float2half(0.0f);
            if (i < total) {
                const int r = i / span, kk = i - r * span;
                const int src = P.w.perm[chunk0 * kPackRows + kk];
                if (src >= 0) v[u] = x[static_cast<size_t>(r) * x_stride + src];
            }
        }
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const int i = base + u * blockDim.x;
            if (i < total) {
                const int r = i / span;
                xs[r * stride + i - r * span] = v[u];
            }
        }
    }
}

// The swapped kernel's staging; its gather reads perm from registers (src,
// loaded before the wait for x).
template <int PU>
__device__ __forceinline__ void stage_x_swapped(__half* xs, int stride, const SmallGemmProblem& P,
                                                const int (&src)[PU], const __half* x, int x_stride, int rows,
                                                int chunk0, int span) {
    if (P.xg) return copy_x(xs, stride, P, rows, chunk0, span);
#pragma unroll 2
    for (int r = 0; r < rows; ++r) {
        __half v[PU];
#pragma unroll
        for (int u = 0; u < PU; ++u)
            v[u] = src[u] >= 0 ? x[static_cast<size_t>(r) * x_stride + src[u]] : __float2half(0.0f);
#pragma unroll
        for (int u = 0; u < PU; ++u) {
            const int kk = threadIdx.x + u * blockDim.x;
            if (kk < span) xs[r * stride + kk] = v[u];
        }
    }
}

// The four 8x8 fp16 tiles of an m16k16 A fragment from shared memory: lane l
// names row l % 8 of tile l / 8 (tiles: rows 0-7 / 8-15 x columns 0-7 / 8-15).
__device__ __forceinline__ void ldmatrix_x4(uint32_t& a0, uint32_t& a1, uint32_t& a2, uint32_t& a3,
                                            const __half* row) {
    const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(a0), "=r"(a1), "=r"(a2), "=r"(a3)
                 : "r"(address));
}

__device__ __forceinline__ void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// One 128-row chunk of a warp's 8 columns: 8 MMA k-steps on the weights of
// one 16-byte load. ONE_GROUP: the whole chunk has one scale/zero (the usual
// case; groups are sorted in packed order), else each step checks its group.
// Even and odd steps accumulate into c[0] and c[1]: two independent MMA chains.
template <int MT, bool ONE_GROUP>
__device__ __forceinline__ void chunk_mma(float (&c)[2][MT][4], const uint4& q, __half2 sz,
                                          const __half* const (&a_row)[MT], int kbase, const PackedGptq4& w,
                                          int chunk, int N, int column) {
    int current = ONE_GROUP ? 0 : w.step_group[chunk * 8];
    __half2 scale = __half2half2(__low2half(sz));
    __half2 low = minus_low_offset(__half2half2(__high2half(sz)));
    __half2 high = minus_high_offset(__half2half2(__high2half(sz)));
    const uint32_t words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        if (!ONE_GROUP && j > 0) {
            const int gj = w.step_group[chunk * 8 + j];  // warp-uniform
            if (gj != current) {
                current = gj;
                const __half2 s = w.scale_zero[static_cast<size_t>(gj) * N + column];
                scale = __half2half2(__low2half(s));
                low = minus_low_offset(__half2half2(__high2half(s)));
                high = minus_high_offset(__half2half2(__high2half(s)));
            }
        }
        const uint32_t bits = words[j >> 1] >> ((j & 1) * 8);
        const __half2 w0 = __hmul2(low_nibbles_minus_zero(bits, low), scale);
        const __half2 w1 = __hmul2(high_nibbles_minus_zero(bits, high), scale);
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(&w0), b1 = *reinterpret_cast<const uint32_t*>(&w1);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            uint32_t a0, a1, a2, a3;
            ldmatrix_x4(a0, a1, a2, a3, a_row[m] + kbase + j * 16);
            mma_16816(c[j & 1][m], a0, a1, a2, a3, b0, b1);
        }
    }
}

template <int MT>  // m16 tiles: rows <= 16 * MT
__global__ void __launch_bounds__(kWarps * 32, 3) gptq4_gemm_small_kernel(Batch batch, const __half* __restrict__ x,
                                                                     int x_stride, int rows, float* acc,
                                                                     int acc_stride, int chunks_per_block) {
    extern __shared__ __half xs[];  // [rows][stride]: this block's slice of x, in packed row order
    int block_in_problem = 0;
    const SmallGemmProblem P = block_problem(batch, &block_in_problem);
    const int chunk0 = blockIdx.y * chunks_per_block;
    if (chunk0 >= P.w.chunks) return;
    const int chunk_end = min(chunk0 + chunks_per_block, P.w.chunks);
    const int span = (chunk_end - chunk0) * kPackRows;
    // +8 halves: the 8 rows of an ldmatrix tile hit distinct banks.
    const int stride = chunks_per_block * kPackRows + 8;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int nt = block_in_problem * kWarps + warp;
    const bool active = nt < P.n_tiles;
    const int g = lane >> 2, t = lane & 3;
    const int N = P.n_tiles * 8;
    const int column = (active ? nt : 0) * 8 + g;  // this lane's column of B
    const size_t chunk_stride = static_cast<size_t>(P.n_tiles) * 32;
    const uint4* qp = P.w.qpack + (static_cast<size_t>(chunk0) * P.n_tiles + (active ? nt : 0)) * 32 + lane;

    // Every weight load of this warp (at most kMaxChunksPerBlock chunks) is issued
    // before x is staged, so HBM latency overlaps the gather below.
    uint4 q[kMaxChunksPerBlock];
    __half2 sz[kMaxChunksPerBlock];
    uint32_t mixed = 0;  // bit u: chunk u spans several groups (groups are sorted: first != last)
#pragma unroll
    for (int u = 0; u < kMaxChunksPerBlock; ++u) {
        if (active && chunk0 + u < chunk_end) {
            q[u] = load_streaming(qp + static_cast<size_t>(u) * chunk_stride);
            const int first = P.w.step_group[(chunk0 + u) * 8];
            if (first != P.w.step_group[(chunk0 + u) * 8 + 7]) mixed |= 1u << u;
            sz[u] = P.w.scale_zero[static_cast<size_t>(first) * N + column];
        }
    }

    // Everything above reads only the weights; x and acc come from the kernels
    // before this one, which may still be running (programmatic launch).
    wait_for_producers();
    allow_dependents();
    stage_x(xs, stride, P, x, x_stride, rows, chunk0, span);
    __syncthreads();
    if (!active) return;

    float c[2][MT][4];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int e = 0; e < 4; ++e) c[0][m][e] = c[1][m][e] = 0.0f;
    // This lane's ldmatrix row of each m16 tile; rows past `rows` read row 0
    // instead: finite values whose products land only in output rows never stored.
    const __half* a_row[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
        const int r = m * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        a_row[m] = xs + (r < rows ? r : 0) * stride + (lane >> 4) * 8;
    }

#pragma unroll
    for (int u = 0; u < kMaxChunksPerBlock; ++u) {
        if (chunk0 + u >= chunk_end) break;
        if (mixed & (1u << u))
            chunk_mma<MT, false>(c, q[u], sz[u], a_row, u * kPackRows, P.w, chunk0 + u, N, column);
        else
            chunk_mma<MT, true>(c, q[u], sz[u], a_row, u * kPackRows, P.w, chunk0 + u, N, column);
    }

    const int out_column = P.col_offset + nt * 8 + 2 * t;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
        const int r0 = m * 16 + g, r1 = r0 + 8;
        if (r0 < rows) {
            atomicAdd(acc + static_cast<size_t>(r0) * acc_stride + out_column, c[0][m][0] + c[1][m][0]);
            atomicAdd(acc + static_cast<size_t>(r0) * acc_stride + out_column + 1, c[0][m][1] + c[1][m][1]);
        }
        if (r1 < rows) {
            atomicAdd(acc + static_cast<size_t>(r1) * acc_stride + out_column, c[0][m][2] + c[1][m][2]);
            atomicAdd(acc + static_cast<size_t>(r1) * acc_stride + out_column + 1, c[0][m][3] + c[1][m][3]);
        }
    }
}

// rows <= 16: the operands swapped. The weights are the m16 operand (16 output
// columns: the packed n-tiles 2i and 2i+1, whose B fragments of lane (g, t) are
// exactly its A fragment registers a0/a2 and a1/a3) and x one or two n8
// operands, so at most 7 MMA rows are wasted and each weight fragment serves
// both x tiles. The low nibbles of a word (rows 0..7 of a step) and the high
// ones (rows 8..15) become q - z without a shift (gptq4_nibbles.cuh). ONE_GROUP
// chunks subtract the zero only (exact small integers) and apply the scale once
// per chunk in fp32; chunks spanning several groups scale in fp16 per step.
// Two ways to keep the weights in flight. In registers: each lane issues the
// loads of all the block's chunks (CHUNKS: up to 4, 8 loads of 16 bytes, at
// one x tile; two x tiles take 2, or 3 with a few spills) before anything else,
// the lowest latency when the grid of such blocks is about one wave. Streamed
// (K slices too long for that, e.g. 70B shapes): each warp keeps kSwapStages
// chunks of its two n-tiles in flight in shared memory with cp.async (each lane
// copies the 16 bytes of each tile that it alone reads back, so no barrier
// orders them) and computes one while the others land, so a block walks up to
// kSwapMaxChunks chunks and the grid stays one resident wave.
constexpr int kSwapStages = 4;
constexpr int kSwapMaxChunks = 16;
constexpr int kSwapColumns = kWarps * 16;  // output columns of a block

// Shared memory of the swapped kernel: the warps' stages, then x [rows][stride].
struct SwapStage {
    uint4 q[2][32];      // one chunk of the warp's tiles a and b, by lane
    __half2 sz[2][32];   // the chunk's scale and zero of each lane's columns a and b
};
constexpr size_t kSwapStagesBytes = sizeof(SwapStage) * kWarps * kSwapStages;

size_t swap_shared_bytes(bool streamed, int rows, int chunks) {
    return (streamed ? kSwapStagesBytes : 0) + sizeof(__half) * rows * (chunks * kPackRows + 8);
}

// The cluster variant's partial sums: a block's [8 NT rows][128 columns] in its
// shared memory, rows kPartialStride floats apart (+4: the lanes of one store,
// rows 2t and columns g, hit distinct banks; rows stay 16-byte aligned).
constexpr int kPartialStride = kSwapColumns + 4;
constexpr int kMaxClusterBlocks = 16;  // the split-K blocks of a column range (non-portable above 8)

__host__ __device__ constexpr size_t align16(size_t bytes) { return (bytes + 15) / 16 * 16; }

// The cluster variant's shared memory: the stages and x as above, then the
// partial sums, then the head epilogue's buffers (kWarps x head_dim floats).
__host__ __device__ constexpr size_t partials_offset(bool streamed, int rows, int stride) {
    return align16((streamed ? kSwapStagesBytes : 0) + sizeof(__half) * rows * stride);
}
__device__ __forceinline__ float* cluster_partials(unsigned char* base, bool streamed, int rows, int stride) {
    return reinterpret_cast<float*>(base + partials_offset(streamed, rows, stride));
}
size_t cluster_shared_bytes(bool streamed, int nt, int rows, int chunks, int head_dim) {
    return partials_offset(streamed, rows, chunks * kPackRows + 8) +
           sizeof(float) * (nt * 8 * kPartialStride + kWarps * head_dim);
}

template <int NT, bool ONE_GROUP>  // NT: n8 tiles of x rows (rows <= 8 NT)
__device__ __forceinline__ void chunk_mma_swapped(float (&acc)[NT][4], const uint4& qa, const uint4& qb, __half2 sza,
                                                  __half2 szb, const __half* const (&x_row)[NT], int kbase,
                                                  const PackedGptq4& w,
                                                  int chunk, int N, int column_a, int column_b) {
    // -(1024 + z) and -(64 + z) per column (gptq4_nibbles.cuh); scales as fp16
    // (mixed) or fp32 (one group).
    __half2 za = __half2half2(__high2half(sza)), zb = __half2half2(__high2half(szb));
    __half2 low_a = minus_low_offset(za), high_a = minus_high_offset(za);
    __half2 low_b = minus_low_offset(zb), high_b = minus_high_offset(zb);
    __half2 sa = __half2half2(__low2half(sza)), sb = __half2half2(__low2half(szb));
    int current = ONE_GROUP ? 0 : w.step_group[chunk * 8];
    const uint32_t words_a[4] = {qa.x, qa.y, qa.z, qa.w}, words_b[4] = {qb.x, qb.y, qb.z, qb.w};
    // Independent MMA chains: at two x tiles the tiles are two already.
    constexpr int kChains = NT == 2 ? 1 : 2;
    float d[kChains][NT][4] = {};
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        if (!ONE_GROUP && j > 0) {
            const int gj = w.step_group[chunk * 8 + j];  // warp-uniform
            if (gj != current) {
                current = gj;
                const __half2 a = w.scale_zero[static_cast<size_t>(gj) * N + column_a];
                const __half2 b = w.scale_zero[static_cast<size_t>(gj) * N + column_b];
                za = __half2half2(__high2half(a));
                zb = __half2half2(__high2half(b));
                low_a = minus_low_offset(za), high_a = minus_high_offset(za);
                low_b = minus_low_offset(zb), high_b = minus_high_offset(zb);
                sa = __half2half2(__low2half(a));
                sb = __half2half2(__low2half(b));
            }
        }
        uint32_t b[NT][4];
        if ((j & 1) == 0) {
#pragma unroll
            for (int n = 0; n < NT; ++n) ldmatrix_x4(b[n][0], b[n][1], b[n][2], b[n][3], x_row[n] + kbase + j * 16);
        }
        const uint32_t wa = words_a[j >> 1] >> ((j & 1) * 8), wb = words_b[j >> 1] >> ((j & 1) * 8);
        __half2 a0 = low_nibbles_minus_zero(wa, low_a), a2 = high_nibbles_minus_zero(wa, high_a);
        __half2 a1 = low_nibbles_minus_zero(wb, low_b), a3 = high_nibbles_minus_zero(wb, high_b);
        if (!ONE_GROUP) {
            a0 = __hmul2(a0, sa), a2 = __hmul2(a2, sa);
            a1 = __hmul2(a1, sb), a3 = __hmul2(a3, sb);
        }
        static_assert(sizeof(__half2) == sizeof(uint32_t));
#pragma unroll
        for (int n = 0; n < NT; ++n)
            mma_16816(d[j % kChains][n], *reinterpret_cast<uint32_t*>(&a0), *reinterpret_cast<uint32_t*>(&a1),
                      *reinterpret_cast<uint32_t*>(&a2), *reinterpret_cast<uint32_t*>(&a3), b[n][(j & 1) * 2],
                      b[n][(j & 1) * 2 + 1]);
    }
    // d[.][0..1]: column a, x rows 2t, 2t+1; d[.][2..3]: column b.
    const float fa = ONE_GROUP ? __low2float(sza) : 1.0f, fb = ONE_GROUP ? __low2float(szb) : 1.0f;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float sum = kChains == 2 ? d[0][n][e] + d[kChains - 1][n][e] : d[0][n][e];
            acc[n][e] = fmaf(e < 2 ? fa : fb, sum, acc[n][e]);
        }
    }
}

// Whether this block is the last of `arrivals` to call this on `counter` (and
// if so, resets it for the next call). Thread 0 arrives with one acquire-release
// atomic after the barrier: its release makes the block's earlier writes (the
// split-K atomics of all its threads, ordered before it by the barrier:
// cumulativity) visible device-wide before the arrival, and the last block's
// acquire makes everyone's visible to it, so its reads (after the second
// barrier) see all the sums; lighter than a full fence before and after. The
// reset needs no ordering: the next call's arrivals come after this grid ends.
__device__ __forceinline__ bool last_to_arrive(int* counter, int arrivals) {
    __shared__ bool last;
    __syncthreads();
    if (threadIdx.x == 0) {
        int before;
        asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;" : "=r"(before) : "l"(counter) : "memory");
        last = before == arrivals - 1;
        if (last) *counter = 0;
    }
    __syncthreads();
    return last;
}

// The phase's epilogue on the columns of this block (whole heads, or any
// columns of the residual), run by the last of the split-K blocks to finish
// them. buffers: the block's shared memory, free once the MMAs are done.
__device__ __forceinline__ void finish_columns(const SmallGemmEpilogue& ep, const SmallGemmProblem& P,
                                               int block_in_problem, int arrivals, int rows, float* buffers) {
    if (!last_to_arrive(ep.counters + blockIdx.x, arrivals)) return;
    const int first = P.col_offset + block_in_problem * kSwapColumns;
    const int count = min(kSwapColumns, P.n_tiles * 8 - block_in_problem * kSwapColumns);
    if (ep.kind == SmallGemmEpilogue::kHeads) {
        const HeadEpilogueParams& p = ep.heads;
        const int warp = threadIdx.x >> 5, D = p.head_dim, heads = count / D, head0 = first / D;
        for (int task = warp; task < rows * heads; task += kWarps) {
            const int row = task / heads;
            finish_head<4, kSwapColumns>(p, row, head0 + task - row * heads, buffers + warp * D);
        }
        return;
    }
    const ResidualEpilogueParams& p = ep.residual;
    const int vectors = count / 4;
    for (int i = threadIdx.x; i < rows * vectors; i += blockDim.x) {
        const int row = i / vectors;
        const int column = first + (i - row * vectors) * 4;
        const size_t at = static_cast<size_t>(row) * p.width + column;
        float y[4];
        load_vec_l2<4>(p.acc + at, y);
        add_bias<4>(p.bias, column, y);
        const float zeros[4] = {};
        store_vec<4>(p.acc + at, zeros);
        add_to_residual<4>(p, at, y);
    }
}

// The phase's epilogue on the columns of this block's cluster (its split-K
// blocks, ranks 0..gridDim.y-1): once every block's partial sums are in its
// shared memory (the first barrier), the cluster's blocks share the epilogue's
// work, each summing the ranks' partials of its part through distributed shared
// memory; the second barrier keeps every block's shared memory alive until all
// have read it.
__device__ __forceinline__ void finish_in_cluster(const SmallGemmEpilogue& ep, const SmallGemmProblem& P,
                                                  int block_in_problem, int rows, float* partials,
                                                  float* head_buffers) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    namespace cg = cooperative_groups;
    const cg::cluster_group cluster = cg::this_cluster();
    const int ranks = static_cast<int>(cluster.num_blocks()), rank = static_cast<int>(cluster.block_rank());
    const int first = P.col_offset + block_in_problem * kSwapColumns;
    const int count = min(kSwapColumns, P.n_tiles * 8 - block_in_problem * kSwapColumns);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    // sum[u] = the cluster's total of 4 partial sums at (row, local column c).
    const auto sum4 = [&](int row, int c, float (&sum)[4]) {
        sum[0] = sum[1] = sum[2] = sum[3] = 0.0f;
#pragma unroll 4
        for (int q = 0; q < ranks; ++q) {
            const float4 a =
                *reinterpret_cast<const float4*>(cluster.map_shared_rank(partials, q) + row * kPartialStride + c);
            sum[0] += a.x, sum[1] += a.y, sum[2] += a.z, sum[3] += a.w;
        }
    };
    if (ep.kind == SmallGemmEpilogue::kHeads) {
        const HeadEpilogueParams& p = ep.heads;
        const int D = p.head_dim, heads = count / D, head0 = first / D, tasks = rows * heads;
        // Task (row, head) of the range per warp, spread over the blocks first.
        // The first task's position and KV slot are read before the barrier.
        int task = warp * ranks + rank;
        const auto row_of = [&](int t, int* h) {
            const int row = t / heads;
            *h = head0 + t - row * heads;
            int head = 0;
            const int proj = head_projection(p, *h, &head);
            return head_row(p, row, proj < 2 && p.rope != QATTN_ROPE_NONE, proj > 0);
        };
        int h = 0;
        HeadRow r;
        if (task < tasks) r = row_of(task, &h);
        cluster.sync();
        for (bool first_task = true; task < tasks; task += ranks * kWarps, first_task = false) {
            if (!first_task) r = row_of(task, &h);
            const int row = task / heads;
            int head = 0;
            const int proj = head_projection(p, h, &head);
            const __half* bias = p.bias[proj] ? p.bias[proj] + head * D : nullptr;
            HeadValues<4, kSwapColumns> in;
            const int i = lane * 4;
            if (i < D) {
                sum4(row, (h - head0) * D + i, in.v[0]);
                add_bias<4>(bias, i, in.v[0]);
            }
            finish_loaded_head<4, kSwapColumns>(p, row, h, head_buffers + warp * D, r, in, false);
        }
    } else {
        const ResidualEpilogueParams& p = ep.residual;
        cluster.sync();
        const int vectors = count / 4;
        for (int i = rank * blockDim.x + threadIdx.x; i < rows * vectors; i += ranks * blockDim.x) {
            const int row = i / vectors, c = (i - row * vectors) * 4;
            float y[4];
            sum4(row, c, y);
            const int column = first + c;
            add_bias<4>(p.bias, column, y);
            add_to_residual<4>(p, static_cast<size_t>(row) * p.width + column, y);
        }
    }
    cluster.sync();
#else
    (void)ep, (void)P, (void)block_in_problem, (void)rows, (void)partials, (void)head_buffers;
#endif
}

// FINISH: the kernel also runs the epilogue (a variant of its own, so that the
// kernel without it keeps its register allocation and schedule): CLUSTER, in the
// thread block cluster of the column range's split-K blocks (finish_in_cluster),
// else by the last of them to arrive (finish_columns). STREAMED: weights through
// shared memory, else registers, CHUNKS at most.
// The plain 2-chunk kernel at two x tiles fits 64 registers: 4 blocks an SM.
template <int NT, bool FINISH, bool STREAMED, int CHUNKS, bool CLUSTER = false>
__global__ void __launch_bounds__(kWarps * 32, (NT == 2 && !FINISH && !STREAMED && CHUNKS == 2) ? 4 : 3)
    gptq4_gemm_swapped_kernel(Batch batch, const __half* __restrict__ x, int x_stride, int rows, float* acc,
                              int acc_stride, int chunks_per_block, SmallGemmEpilogue epilogue) {
    constexpr int kMaxChunks = STREAMED ? kSwapMaxChunks : CHUNKS;
    // Register slots of the weights: at two x tiles three chunks take two, each
    // slot loaded with its next chunk as soon as its chunk is done, so the
    // 3-chunk kernels spill less or not at all.
    constexpr bool kRolling = !STREAMED && NT == 2 && CHUNKS >= 3;
    constexpr int kSlots = STREAMED ? 1 : kRolling ? 2 : CHUNKS;
    extern __shared__ __align__(16) unsigned char shared_base[];
    SwapStage* const all_stages = reinterpret_cast<SwapStage*>(shared_base);
    // x [rows][stride], after the stages.
    __half* const xs = reinterpret_cast<__half*>(shared_base + (STREAMED ? kSwapStagesBytes : 0));
    int block_in_problem = 0;
    const SmallGemmProblem P = block_problem(batch, &block_in_problem);

    const int chunk0 = blockIdx.y * chunks_per_block;
    if (chunk0 >= P.w.chunks) return;
    const int chunks = min(chunks_per_block, P.w.chunks - chunk0);
    const int span = chunks * kPackRows;
    const int stride = chunks_per_block * kPackRows + 8;  // +8 halves: ldmatrix rows on distinct banks

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int pair = block_in_problem * kWarps + warp;  // n-tiles 2 pair, 2 pair + 1
    const bool active = 2 * pair < P.n_tiles;
    const int tile_a = active ? 2 * pair : 0;
    const bool has_b = tile_a + 1 < P.n_tiles;  // an odd tile count leaves the last pair half empty
    const int tile_b = has_b ? tile_a + 1 : tile_a;
    const int g = lane >> 2, t = lane & 3;
    const int N = P.n_tiles * 8;
    const int column_a = tile_a * 8 + g, column_b = tile_b * 8 + g;
    const size_t chunk_stride = static_cast<size_t>(P.n_tiles) * 32;
    const uint4* qa_ptr = P.w.qpack + (static_cast<size_t>(chunk0) * P.n_tiles + tile_a) * 32 + lane;
    const uint4* qb_ptr = P.w.qpack + (static_cast<size_t>(chunk0) * P.n_tiles + tile_b) * 32 + lane;
    const __half2* sza_ptr = P.w.chunk_scale_zero + static_cast<size_t>(chunk0) * N + column_a;
    const __half2* szb_ptr = P.w.chunk_scale_zero + static_cast<size_t>(chunk0) * N + column_b;

    // Everything up to the wait reads only constant data (weights, scales,
    // groups, perm), so it overlaps the kernel that writes x (programmatic launch).
    SwapStage* const stages = all_stages + warp * kSwapStages;
    const auto fetch = [&](int u) {
        SwapStage& stage = stages[u % kSwapStages];
        cp_async16(&stage.q[0][lane], qa_ptr + u * chunk_stride);
        cp_async16(&stage.q[1][lane], qb_ptr + u * chunk_stride);
        cp_async4(&stage.sz[0][lane], sza_ptr + static_cast<size_t>(u) * N);
        cp_async4(&stage.sz[1][lane], szb_ptr + static_cast<size_t>(u) * N);
    };
    uint4 qa[kSlots], qb[kSlots];
    __half2 sza[kSlots], szb[kSlots];
    const auto load = [&](int slot, int u) {
        qa[slot] = load_streaming(qa_ptr + u * chunk_stride);
        qb[slot] = load_streaming(qb_ptr + u * chunk_stride);
        sza[slot] = sza_ptr[static_cast<size_t>(u) * N];
        szb[slot] = szb_ptr[static_cast<size_t>(u) * N];
    };
    if constexpr (STREAMED) {
#pragma unroll
        for (int u = 0; u < kSwapStages; ++u) {
            if (active && u < chunks) fetch(u);
            cp_async_commit();
        }
    } else {
#pragma unroll
        for (int u = 0; u < kSlots; ++u)
            if (active && u < chunks) load(u, u);
    }
    // Bit u: chunk chunk0 + u spans several groups (at most 16 chunks: two words).
    const int shift = chunk0 % 32;
    uint32_t mixed = P.w.mixed_chunks[chunk0 / 32] >> shift;
    if (shift + chunks > 32) mixed |= P.w.mixed_chunks[chunk0 / 32 + 1] << (32 - shift);
    int src[(kMaxChunks * kPackRows + kWarps * 32 - 1) / (kWarps * 32)];
    load_perm(src, P, chunk0, span);

    wait_for_producers();
    allow_dependents();
    stage_x_swapped(xs, stride, P, src, x, x_stride, rows, chunk0, span);
    __syncthreads();

    if (active) {
        // ldmatrix.x4 of two k-steps: lanes 0-7 / 8-15 / 16-23 / 24-31 address the x
        // rows 8n..8n+7 at k offsets 0 / 8 / 16 / 24 (rows past `rows` read row 0:
        // their outputs are never stored).
        const __half* x_row[NT];
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            const int r = n * 8 + (lane & 7);
            x_row[n] = xs + (r < rows ? r : 0) * stride + (lane >> 3) * 8;
        }
        float c[NT][4] = {};
        const auto compute = [&](int u, const uint4& wa, const uint4& wb, __half2 sa, __half2 sb) {
            if (mixed & (1u << u))
                chunk_mma_swapped<NT, false>(c, wa, wb, sa, sb, x_row, u * kPackRows, P.w, chunk0 + u, N, column_a,
                                             column_b);
            else
                chunk_mma_swapped<NT, true>(c, wa, wb, sa, sb, x_row, u * kPackRows, P.w, chunk0 + u, N, column_a,
                                            column_b);
        };
        if constexpr (STREAMED) {
#pragma unroll 1
            for (int u = 0; u < chunks; ++u) {
                cp_async_wait<kSwapStages - 1>();  // chunk u has landed (one group per chunk, in order)
                const SwapStage& stage = stages[u % kSwapStages];
                compute(u, stage.q[0][lane], stage.q[1][lane], stage.sz[0][lane], stage.sz[1][lane]);
                // The stage just read is refilled only now, after its values were used.
                if (u + kSwapStages < chunks) fetch(u + kSwapStages);
                cp_async_commit();
            }
        } else if constexpr (kRolling) {
#pragma unroll 1
            for (int u = 0; u < chunks; u += 2) {
                compute(u, qa[0], qb[0], sza[0], szb[0]);
                if (u + 2 < chunks) load(0, u + 2);
                if (u + 1 < chunks) {
                    compute(u + 1, qa[1], qb[1], sza[1], szb[1]);
                    if (u + 3 < chunks) load(1, u + 3);
                }
            }
        } else {
#pragma unroll
            for (int u = 0; u < kMaxChunks; ++u)
                if (u < chunks) compute(u, qa[u], qb[u], sza[u], szb[u]);
        }

        const int out_a = P.col_offset + column_a, out_b = P.col_offset + column_b;
        if constexpr (CLUSTER) {
            // Every row of the tile (those past `rows` hold finite values no one reads).
            float* const part = cluster_partials(shared_base, STREAMED, rows, stride);
            const int local_a = warp * 16 + g, local_b = local_a + 8;
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                const int r0 = n * 8 + 2 * t;
                part[r0 * kPartialStride + local_a] = c[n][0];
                part[(r0 + 1) * kPartialStride + local_a] = c[n][1];
                part[r0 * kPartialStride + local_b] = c[n][2];
                part[(r0 + 1) * kPartialStride + local_b] = c[n][3];
            }
        }
#pragma unroll
        for (int n = 0; n < (CLUSTER ? 0 : NT); ++n) {
            const int r0 = n * 8 + 2 * t;
            if (r0 < rows) {
                atomicAdd(acc + static_cast<size_t>(r0) * acc_stride + out_a, c[n][0]);
                if (has_b) atomicAdd(acc + static_cast<size_t>(r0) * acc_stride + out_b, c[n][2]);
            }
            if (r0 + 1 < rows) {
                atomicAdd(acc + static_cast<size_t>(r0 + 1) * acc_stride + out_a, c[n][1]);
                if (has_b) atomicAdd(acc + static_cast<size_t>(r0 + 1) * acc_stride + out_b, c[n][3]);
            }
        }
    }
    if constexpr (CLUSTER) {
        float* const part = cluster_partials(shared_base, STREAMED, rows, stride);
        finish_in_cluster(epilogue, P, block_in_problem, rows, part, part + NT * 8 * kPartialStride);
    } else if (FINISH) {
        // The epilogue's head buffers (8 warps x head_dim floats) reuse the x slice,
        // or the stages: at one row of a register-variant block the slice holds less.
        finish_columns(epilogue, P, block_in_problem, (P.w.chunks + chunks_per_block - 1) / chunks_per_block, rows,
                       reinterpret_cast<float*>(shared_base));
    }
}

// rows <= kWholeKRows, K <= kWholeKMaxChunks chunks, when the GEMM finishes the
// phase: a block owns 16 output columns over the whole of K, its 8 warps
// splitting K (up to 4 chunks each: as many weight bytes in flight a lane as
// the register variant above), so the split-K sums meet in shared memory and
// the block finishes its columns itself: no atomics, no arrival ticket, no
// accumulator to reload and zero, and the same sums every call. Each warp
// stages only the x of its own chunks. A block's two n-tiles are paired so that
// the RoPE partners of its columns lie in it: NeoX-rotated heads pair tile j of
// the rotary half with tile j + rotary_dim / 16 (the pass-through tiles after
// the rotary part in twos); everything else, adjacent tiles.
constexpr int kWholeKRows = 4;
constexpr int kWholeKMaxChunks = 32;
constexpr int kWholeKWarpChunks = kWholeKMaxChunks / kWarps;
constexpr int kWholeKColumns = 16;
constexpr int kWholeKSliceStride = kWholeKWarpChunks * kPackRows + 8;  // +8: ldmatrix rows on distinct banks

// After the warps' x slices: the warps' partial sums of the 8 rows of an x
// tile.
struct WholeKSums {
    float part[kWarps][8][kWholeKColumns];
};
// Then the global inputs of the epilogue of each output (row, lc), held by
// thread row * kWholeKColumns + lc, which finishes that output. The thread
// copies them itself by cp.async while the MMAs run (the bias before the wait
// for the kernel before: it is layer data) and alone reads them back, so no
// barrier orders them, and the tail after the sums reads shared memory instead
// of waiting out two or three dependent global loads. An fp16 value travels as
// the aligned 4-byte word that holds it.
struct WholeKAhead {
    uint32_t bias[kWholeKRows * kWholeKColumns];
    uint32_t residual[kWholeKRows * kWholeKColumns];  // fp32, or the fp16 word
    float cos[kWholeKRows * kWholeKColumns], sin[kWholeKRows * kWholeKColumns];
    int32_t slot[kWholeKRows * kWholeKColumns];
    bool in_range[kWholeKRows * kWholeKColumns];  // the row's position lies in the tables (or needs none)
};
__host__ __device__ constexpr size_t whole_k_sums_offset(int rows) {
    return align16(sizeof(__half) * kWarps * rows * kWholeKSliceStride);
}
__host__ __device__ constexpr size_t whole_k_ahead_offset(int rows) {
    return whole_k_sums_offset(rows) + align16(sizeof(WholeKSums));
}
size_t whole_k_shared_bytes(int rows) { return whole_k_ahead_offset(rows) + sizeof(WholeKAhead); }

// threadIdx.x, read anew: the compiler does not merge it with an earlier read,
// so values derived from it need not stay in registers in between.
__device__ __forceinline__ int thread_index() {
    int tid;
    asm volatile("mov.u32 %0, %%tid.x;" : "=r"(tid));
    return tid;
}

// Every fp16 array the epilogue reads (the layer's biases, a residual stream of
// a width divisible by 4, aligned) starts 4-byte aligned and holds an even
// count of halves, so the aligned word that holds one of them lies inside it.
__device__ __forceinline__ void cp_async_half_word(uint32_t* shared, const __half* h) {
    cp_async4(shared, reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(h) & ~uintptr_t(3)));
}
__device__ __forceinline__ float half_in_word(uint32_t word, const __half* h) {
    const __half2 pair = *reinterpret_cast<const __half2*>(&word);
    return __half2float((reinterpret_cast<uintptr_t>(h) & 2) ? __high2half(pair) : __low2half(pair));
}

// The head dim of the whole-K helpers: HEAD_DIM where the kernel is built for
// one (its divisions then are shifts), else the call's.
template <int HEAD_DIM>
__device__ __forceinline__ int whole_k_head_dim(const HeadEpilogueParams& p) {
    return HEAD_DIM ? HEAD_DIM : p.head_dim;
}

// Where output column n (problem-local) of a whole-K block lies in the q / k / v
// heads, and whether RoPE turns it (with its partner column).
struct WholeKHeadColumn {
    int proj, head, c;
    bool rotated;
};
template <int HEAD_DIM>
__device__ __forceinline__ WholeKHeadColumn whole_k_head_column(const HeadEpilogueParams& p,
                                                                const SmallGemmProblem& P, int n) {
    const int D = whole_k_head_dim<HEAD_DIM>(p);
    WholeKHeadColumn col;
    col.c = n % D;
    col.proj = head_projection(p, (P.col_offset + n) / D, &col.head);
    col.rotated = col.proj < 2 && p.rope != QATTN_ROPE_NONE && col.c < p.rotary_dim;
    return col;
}

// The bias element of output column n, or null. HEADS: the epilogue is the
// head epilogue (else the residual one), which each kernel is built for.
template <bool HEADS, int HEAD_DIM>
__device__ __forceinline__ const __half* whole_k_bias(const SmallGemmEpilogue& ep, const SmallGemmProblem& P,
                                                      int n) {
    if (HEADS) {
        const HeadEpilogueParams& p = ep.heads;
        const WholeKHeadColumn col = whole_k_head_column<HEAD_DIM>(p, P, n);
        return p.bias[col.proj] ? p.bias[col.proj] + col.head * whole_k_head_dim<HEAD_DIM>(p) + col.c : nullptr;
    }
    return ep.residual.bias ? ep.residual.bias + P.col_offset + n : nullptr;
}

// The position of `row`, whose RoPE angles the epilogue copies.
__device__ __forceinline__ int whole_k_position(const HeadEpilogueParams& p, int row) {
    const int sequence = p.q_len == 1 ? row : row / p.q_len;  // decode: no division
    return (p.past_lens ? p.past_lens[sequence] : p.past_len) + (row - sequence * p.q_len);
}

// The copies after the wait (WholeKAhead) of output (row, n); false where the
// output is turned by RoPE and its position lies outside the tables.
template <bool HEADS, int HEAD_DIM>
__device__ __forceinline__ bool whole_k_fetch_after_wait(const SmallGemmEpilogue& ep, const SmallGemmProblem& P,
                                                         int row, int n, int position, WholeKAhead& ahead) {
    const int i = threadIdx.x;
    if (!HEADS) {
        const ResidualEpilogueParams& p = ep.residual;
        if (!p.has_residual) return true;
        const size_t at = static_cast<size_t>(row) * p.width + P.col_offset + n;
        if (p.x_fp32)
            cp_async4(&ahead.residual[i], static_cast<const float*>(p.x) + at);
        else
            cp_async_half_word(&ahead.residual[i], static_cast<const __half*>(p.x) + at);
        return true;
    }
    const HeadEpilogueParams& p = ep.heads;
    const WholeKHeadColumn col = whole_k_head_column<HEAD_DIM>(p, P, n);
    if (col.proj > 0 && p.kv_slots) cp_async4(&ahead.slot[i], p.kv_slots + row);
    if (!col.rotated) return true;
    if (position < 0 || position >= p.max_positions) return false;
    const int half = p.rotary_dim / 2;
    const int angle = p.rope == QATTN_ROPE_NEOX ? (col.c < half ? col.c : col.c - half) : col.c / 2;
    const size_t at = static_cast<size_t>(position) * half + angle;
    cp_async4(&ahead.cos[i], p.cos + at);
    cp_async4(&ahead.sin[i], p.sin + at);
    return true;
}

// The problem-local n-tiles (a, b) of block `pair` of P (pairing above).
template <bool HEADS, int HEAD_DIM>
__device__ __forceinline__ void whole_k_tiles(const SmallGemmEpilogue& ep, const SmallGemmProblem& P, int pair,
                                              int* ta, int* tb) {
    *ta = 2 * pair, *tb = 2 * pair + 1;
    if (!HEADS || ep.heads.rope != QATTN_ROPE_NEOX) return;
    const HeadEpilogueParams& p = ep.heads;
    const int D = whole_k_head_dim<HEAD_DIM>(p), pairs_per_head = D / kWholeKColumns;
    const int head_tile = pair / pairs_per_head * (D / 8), k = pair % pairs_per_head;
    int head = 0;
    if (head_projection(p, (P.col_offset + head_tile * 8) / D, &head) == 2) return;  // v: not rotated
    const int half_tiles = p.rotary_dim / 16;
    *ta = head_tile + (k < half_tiles ? k : 2 * half_tiles + 2 * (k - half_tiles));
    *tb = *ta + (k < half_tiles ? half_tiles : 1);
}

// Output (row, local column lc) of a whole-K block: RoPE with its partner
// column's sum (in the same block), fp16 q / k / v and the KV-cache slot; y
// and partner have their biases. in_range: whether the row's position lies in
// the tables.
template <int HEAD_DIM>
__device__ __forceinline__ void whole_k_finish_head(const HeadEpilogueParams& p, const SmallGemmProblem& P, int row,
                                                    int lc, int n, float y, float partner, bool in_range,
                                                    const WholeKAhead& ahead) {
    const int D = whole_k_head_dim<HEAD_DIM>(p);
    const WholeKHeadColumn col = whole_k_head_column<HEAD_DIM>(p, P, n);
    if (col.rotated) {
        if (!in_range) {
            atomicExch(p.error_flag, 1);  // not rotated; see check_device_errors
        } else {
            const bool neox = p.rope == QATTN_ROPE_NEOX;
            const bool first = neox ? col.c < p.rotary_dim / 2 : (col.c & 1) == 0;
            const float cs = ahead.cos[threadIdx.x], sn = ahead.sin[threadIdx.x];
            y = first ? y * cs - partner * sn : y * cs + partner * sn;
        }
    }
    const int width = (col.proj == 0 ? p.num_heads : p.num_kv_heads) * D;
    const __half out = __float2half(y);
    if (p.out[col.proj]) p.out[col.proj][static_cast<size_t>(row) * width + col.head * D + col.c] = out;
    if (col.proj > 0 && p.kv_slots) {
        const int64_t slot = ahead.slot[threadIdx.x];
        if (slot >= 0 && slot < p.num_kv_slots)
            p.cache[col.proj - 1][slot * width + col.head * D + col.c] = out;
        else
            atomicExch(p.error_flag, 1);  // not written to the cache; see check_device_errors
    }
}

// Each epilogue and row count has a build of its own, and the head epilogue
// one for the usual head dim (HEAD_DIM; 0: the call's): the other epilogue's
// code, the row loops, row tests and row-dependent offsets and the divisions
// by the head dim fold away (at one row a warp's fixed work is what the phase
// waits for).
template <bool HEADS, int HEAD_DIM, int ROWS>
__global__ void __launch_bounds__(kWarps * 32, 3)
    gptq4_gemm_whole_k_kernel(Batch batch, SmallGemmEpilogue epilogue) {
    static_assert(ROWS >= 1 && ROWS <= kWholeKRows, "whole-K rows");
    static_assert(HEADS || HEAD_DIM == 0, "a head dim for the head epilogue only");
    extern __shared__ __align__(16) unsigned char shared_base[];
    constexpr int rows = ROWS;
    int block_in_problem = 0;
    const SmallGemmProblem P = block_problem(batch, &block_in_problem);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    int tile_a = 0, tile_b = 0;
    whole_k_tiles<HEADS, HEAD_DIM>(epilogue, P, block_in_problem, &tile_a, &tile_b);
    const int N = P.n_tiles * 8;
    const int column_a = tile_a * 8 + g, column_b = tile_b * 8 + g;
    const int per_warp = (P.w.chunks + kWarps - 1) / kWarps;
    const int chunk0 = warp * per_warp, chunks = max(0, min(per_warp, P.w.chunks - chunk0));
    const size_t chunk_stride = static_cast<size_t>(P.n_tiles) * 32;
    const uint4* qa_ptr = P.w.qpack + (static_cast<size_t>(chunk0) * P.n_tiles + tile_a) * 32 + lane;
    const uint4* qb_ptr = P.w.qpack + (static_cast<size_t>(chunk0) * P.n_tiles + tile_b) * 32 + lane;
    const __half2* sza_ptr = P.w.chunk_scale_zero + static_cast<size_t>(chunk0) * N + column_a;
    const __half2* szb_ptr = P.w.chunk_scale_zero + static_cast<size_t>(chunk0) * N + column_b;

    // Weights and scales first: they do not depend on the kernel before.
    uint4 qa[kWholeKWarpChunks], qb[kWholeKWarpChunks];
    __half2 sza[kWholeKWarpChunks], szb[kWholeKWarpChunks];
#pragma unroll
    for (int u = 0; u < kWholeKWarpChunks; ++u) {
        if (u < chunks) {
            qa[u] = load_streaming(qa_ptr + u * chunk_stride);
            qb[u] = load_streaming(qb_ptr + u * chunk_stride);
            sza[u] = sza_ptr[static_cast<size_t>(u) * N];
            szb[u] = szb_ptr[static_cast<size_t>(u) * N];
        }
    }
    uint32_t mixed = 0;  // bit u: chunk chunk0 + u spans several groups
    if (chunks > 0) {
        const int shift = chunk0 % 32;
        mixed = P.w.mixed_chunks[chunk0 / 32] >> shift;
        if (shift + chunks > 32) mixed |= P.w.mixed_chunks[chunk0 / 32 + 1] << (32 - shift);
    }

    // Thread (row, lc) finishes output column n of the block, lc < 8 in tile a,
    // else tile b (problem-local), where row < rows. Computed anew after the
    // MMAs (thread_index: not merged with this), which keeps them out of the
    // registers across them.
    const auto output_of = [&](int tid, int* row, int* lc) {
        *row = tid / kWholeKColumns, *lc = tid % kWholeKColumns;
        return (*lc < 8 ? tile_a : tile_b) * 8 + (*lc & 7);
    };
    WholeKAhead& ahead = *reinterpret_cast<WholeKAhead*>(shared_base + whole_k_ahead_offset(rows));
    int row = 0, lc = 0;
    int n = output_of(threadIdx.x, &row, &lc);
    if (row < rows) {
        const __half* const bias = whole_k_bias<HEADS, HEAD_DIM>(epilogue, P, n);
        if (bias) cp_async_half_word(&ahead.bias[threadIdx.x], bias);
    }

    wait_for_producers();
    allow_dependents();
    // Issued before the x slice's loads so that the two round trips overlap.
    const int position =
        row < rows && HEADS ? whole_k_position(epilogue.heads, row) : 0;
    // This warp's slice of x [rows][kWholeKSliceStride].
    __half* const xs = reinterpret_cast<__half*>(shared_base) + warp * rows * kWholeKSliceStride;
    {
        // At most two pieces a lane a row (kWholeKWarpChunks chunks), both
        // loaded before either is stored (a load-store loop waits out an L2
        // round trip a piece), in loops that unroll: no loop control to issue.
        constexpr int kLanePieces = kWholeKWarpChunks * kPackRows / 8 / 32;
        static_assert(kLanePieces * 32 * 8 == kWholeKWarpChunks * kPackRows, "whole pieces a lane");
        const int pieces = chunks * kPackRows / 8;
#pragma unroll
        for (int r = 0; r < kWholeKRows; ++r) {
            if (r >= rows) break;
            const __half* const from = P.xg + static_cast<size_t>(r) * P.w.chunks * kPackRows + chunk0 * kPackRows;
            __half* const to = xs + r * kWholeKSliceStride;
            uint4 piece[kLanePieces];
#pragma unroll
            for (int j = 0; j < kLanePieces; ++j)
                if (lane + 32 * j < pieces) piece[j] = *reinterpret_cast<const uint4*>(from + (lane + 32 * j) * 8);
#pragma unroll
            for (int j = 0; j < kLanePieces; ++j)
                if (lane + 32 * j < pieces) *reinterpret_cast<uint4*>(to + (lane + 32 * j) * 8) = piece[j];
        }
    }
    __syncwarp();
    if (row < rows) ahead.in_range[threadIdx.x] = whole_k_fetch_after_wait<HEADS, HEAD_DIM>(epilogue, P, row, n, position, ahead);
    cp_async_commit();

    float c[1][4] = {};
    const __half* const x_row[1] = {xs + ((lane & 7) < rows ? (lane & 7) : 0) * kWholeKSliceStride + (lane >> 3) * 8};
#pragma unroll
    for (int u = 0; u < kWholeKWarpChunks; ++u) {
        if (u >= chunks) break;
        if (mixed & (1u << u))
            chunk_mma_swapped<1, false>(c, qa[u], qb[u], sza[u], szb[u], x_row, u * kPackRows, P.w, chunk0 + u, N,
                                        column_a, column_b);
        else
            chunk_mma_swapped<1, true>(c, qa[u], qb[u], sza[u], szb[u], x_row, u * kPackRows, P.w, chunk0 + u, N,
                                       column_a, column_b);
    }

    WholeKSums& sums = *reinterpret_cast<WholeKSums*>(shared_base + whole_k_sums_offset(rows));
    sums.part[warp][2 * t][g] = c[0][0];
    sums.part[warp][2 * t + 1][g] = c[0][1];
    sums.part[warp][2 * t][8 + g] = c[0][2];
    sums.part[warp][2 * t + 1][8 + g] = c[0][3];
    cp_async_wait<0>();
    n = output_of(thread_index(), &row, &lc);
    const bool owns = row < rows;
    __syncthreads();
    if (warp * 32 >= rows * kWholeKColumns) return;  // no outputs in this warp
    float y = 0.0f;
    if (owns) {
#pragma unroll
        for (int w = 0; w < kWarps; ++w) y += sums.part[w][row][lc];
        const __half* const bias = whole_k_bias<HEADS, HEAD_DIM>(epilogue, P, n);  // again: fewer registers across the MMAs
        if (bias) y += half_in_word(ahead.bias[threadIdx.x], bias);
    }
    // A rotated column's RoPE partner, lc ^ 8 (NeoX) or lc ^ 1 (GPT-J), is
    // finished by thread threadIdx.x ^ 8 or ^ 1, a lane of this warp.
    float partner = 0.0f;
    if (HEADS && epilogue.heads.rope != QATTN_ROPE_NONE)
        partner = __shfl_xor_sync(0xffffffffu, y, epilogue.heads.rope == QATTN_ROPE_NEOX ? 8 : 1);
    if (!owns) return;
    if (HEADS) {
        whole_k_finish_head<HEAD_DIM>(epilogue.heads, P, row, lc, n, y, partner, ahead.in_range[threadIdx.x], ahead);
        return;
    }
    const ResidualEpilogueParams& p = epilogue.residual;
    const size_t at = static_cast<size_t>(row) * p.width + P.col_offset + n;
    if (p.x_fp32) {
        float* const x = static_cast<float*>(p.x) + at;
        *x = p.has_residual ? y + __uint_as_float(ahead.residual[threadIdx.x]) : y;
    } else {
        __half* const x = static_cast<__half*>(p.x) + at;
        *x = __float2half(p.has_residual ? y + half_in_word(ahead.residual[threadIdx.x], x) : y);
    }
}

}  // namespace

int small_gemm_counters(int columns) { return columns / kSwapColumns + kMaxProblems; }

bool small_gemm_can_finish_heads(const HeadEpilogueParams& p) {
    return p.head_dim % 4 == 0 && kSwapColumns % p.head_dim == 0 && head_outputs_aligned8(p);
}

bool small_gemm_can_finish_residual(const ResidualEpilogueParams& p) {
    return p.post_norm.type == QATTN_NORM_NONE && p.width % 4 == 0 && is_aligned(p.x, p.x_fp32 ? 16 : 8);
}

namespace {

// Chunks per block, each count c run by kernel_for(c). one_wave: the fewest
// (the most blocks: the most SMs streaming) such that the whole grid is
// resident at once (else the most). Otherwise the least work: waves times
// (c + 1), a block's time growing with its chunks plus fixed work (x staged,
// the split-K sums) of about one chunk, and a partly filled wave costing as
// much as a full one; fewer waves on a tie. At Llama-3-8B decode that picks 4
// chunks (one wave) at one row, 2 for 16 rows of Q|K|V (two waves) and of O
// (one wave of the 2-chunk kernel at 4 blocks an SM).
template <typename KernelFor, typename SharedBytes>
qattn_status plan_chunks(KernelFor kernel_for, SharedBytes shared_bytes, size_t max_shared, int max_per_block,
                         bool one_wave, int blocks_x, int max_chunks, int sm_count, int* chunks_per_block) {
    *chunks_per_block = max_per_block;
    int64_t best_work = -1, best_waves = 0;
    for (int c = 1; c <= max_per_block; ++c) {
        int per_sm = 0;
        QATTN_TRY(blocks_per_sm(kernel_for(c), kWarps * 32, shared_bytes(c), max_shared, &per_sm));
        const int64_t resident = int64_t(std::max(per_sm, 1)) * sm_count;
        const int64_t blocks = static_cast<int64_t>(blocks_x) * ((max_chunks + c - 1) / c);
        if (one_wave) {
            if (blocks <= resident) {
                *chunks_per_block = c;
                break;
            }
            continue;
        }
        const int64_t waves = (blocks + resident - 1) / resident, work = waves * (c + 1);
        if (best_work < 0 || work < best_work || (work == best_work && waves < best_waves)) {
            best_work = work;
            best_waves = waves;
            *chunks_per_block = c;
        }
    }
    return QATTN_SUCCESS;
}

// Whether `kernel` runs `grid` in clusters of 1 x grid.y blocks (one a column
// range) in no more waves than the plain grid takes (plain_waves): the most
// clusters resident at once, from cudaOccupancyMaxActiveClusters, remembered per
// device, kernel and shared bytes. None where the device launches no clusters.
template <typename Kernel>
qattn_status clusters_fit(Kernel kernel, dim3 grid, size_t shared, size_t max_shared, int64_t plain_waves,
                          bool* fits) {
    static std::mutex mutex;
    static std::set<std::pair<int, const void*>> non_portable;
    static std::map<std::tuple<int, const void*, size_t, unsigned>, int> known;
    *fits = false;
    int device = 0, cluster_launch = 0;
    QATTN_CUDA_TRY(cudaGetDevice(&device));
    QATTN_CUDA_TRY(cudaDeviceGetAttribute(&cluster_launch, cudaDevAttrClusterLaunch, device));
    if (!cluster_launch) return QATTN_SUCCESS;
    int per_sm = 0;  // also allows the kernel its shared memory
    QATTN_TRY(blocks_per_sm(kernel, kWarps * 32, shared, max_shared, &per_sm));
    const void* id = reinterpret_cast<const void*>(kernel);
    std::lock_guard<std::mutex> lock(mutex);
    const auto key = std::make_tuple(device, id, shared, grid.y);
    auto found = known.find(key);
    if (found == known.end()) {
        if (grid.y > 8 && non_portable.count({device, id}) == 0) {
            QATTN_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
            non_portable.insert({device, id});
        }
        cudaLaunchAttribute attribute;
        attribute.id = cudaLaunchAttributeClusterDimension;
        attribute.val.clusterDim.x = 1;
        attribute.val.clusterDim.y = grid.y;
        attribute.val.clusterDim.z = 1;
        cudaLaunchConfig_t config = {};
        config.gridDim = grid;
        config.blockDim = kWarps * 32;
        config.dynamicSmemBytes = shared;
        config.attrs = &attribute;
        config.numAttrs = 1;
        int clusters = 0;
        // A size the device cannot schedule is an answer here (no clusters), not
        // an error; it must not linger as the thread's last CUDA error either.
        if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess) {
            (void)cudaGetLastError();
            clusters = 0;
        }
        found = known.emplace(key, clusters).first;
    }
    const int clusters = found->second;
    *fits = clusters > 0 && (static_cast<int64_t>(grid.x) + clusters - 1) / clusters <= plain_waves;
    return QATTN_SUCCESS;
}

// Whether the whole-K kernel takes this call: few rows, K within its warps'
// registers, x staged or read in place (its warps copy their slices), an even
// n-tile count, and an epilogue it can run on its 16 columns: no head norms (they
// need whole heads), NeoX RoPE whose rotary and pass-through parts come in
// whole tile pairs.
bool whole_k_fits(const SmallGemmProblem* problems, int count, int rows, const SmallGemmEpilogue& ep) {
    if (rows > kWholeKRows) return false;
    for (int i = 0; i < count; ++i)
        if (!problems[i].xg || problems[i].w.chunks > kWholeKMaxChunks || problems[i].n_tiles % 2) return false;
    if (ep.kind != SmallGemmEpilogue::kHeads) return true;
    const HeadEpilogueParams& p = ep.heads;
    if (p.norm[0].type != QATTN_NORM_NONE || p.norm[1].type != QATTN_NORM_NONE || p.head_dim % kWholeKColumns)
        return false;
    return p.rope != QATTN_ROPE_NEOX ||
           (p.rotary_dim % kWholeKColumns == 0 && (p.head_dim - p.rotary_dim) % kWholeKColumns == 0);
}

// The whole-K kernel built for `rows` rows.
template <bool HEADS, int HEAD_DIM>
auto whole_k_kernel(int rows) {
    switch (rows) {
    case 1: return gptq4_gemm_whole_k_kernel<HEADS, HEAD_DIM, 1>;
    case 2: return gptq4_gemm_whole_k_kernel<HEADS, HEAD_DIM, 2>;
    case 3: return gptq4_gemm_whole_k_kernel<HEADS, HEAD_DIM, 3>;
    default: return gptq4_gemm_whole_k_kernel<HEADS, HEAD_DIM, 4>;
    }
}
static_assert(kWholeKRows == 4, "whole_k_kernel: one case a row count");

}  // namespace

qattn_status launch_gptq4_gemm_small(const SmallGemmProblem* problems, int count, const __half* x, int x_stride,
                                     int rows, float* acc, int acc_stride, int sm_count,
                                     const SmallGemmEpilogue& requested, bool* finished, cudaStream_t stream) {
    *finished = false;
    if (count <= 0) return QATTN_SUCCESS;
    const bool wants_finish = requested.kind != SmallGemmEpilogue::kNone;
    if (count > kMaxProblems || rows < 1 || rows > kSmallRows || (wants_finish && rows > kSmallGemmFinishRows))
        return fail(QATTN_ERROR_INTERNAL, "gptq4_gemm_small: %d problems, %d rows%s", count, rows,
                    wants_finish ? " with the epilogue" : "");
    if (wants_finish && whole_k_fits(problems, count, rows, requested)) {
        Batch batch{};
        batch.count = count;
        int blocks = 0;
        for (int i = 0; i < count; ++i) {
            batch.p[i] = problems[i];
            batch.block_begin[i] = blocks;
            blocks += problems[i].n_tiles / 2;
        }
        for (int i = count; i < kMaxProblems; ++i) batch.block_begin[i] = blocks;
        const auto kernel = requested.kind != SmallGemmEpilogue::kHeads ? whole_k_kernel<false, 0>(rows)
                            : requested.heads.head_dim == 128       ? whole_k_kernel<true, 128>(rows)
                                                                    : whole_k_kernel<true, 0>(rows);
        QATTN_TRY(launch_pdl("gptq4_gemm_whole_k", kernel, dim3(blocks), kWarps * 32, whole_k_shared_bytes(rows),
                             stream, batch, requested));
        *finished = true;
        return QATTN_SUCCESS;
    }
    // rows <= 16: the swapped kernel, 16 columns a warp; else 8 columns a warp.
    const bool swapped = rows <= 16;
    const int columns_per_block = swapped ? kSwapColumns : kWarps * 8;
    Batch batch{};
    batch.count = count;
    int blocks_x = 0, max_chunks = 0;
    bool same_chunks = true;
    for (int i = 0; i < count; ++i) {
        batch.p[i] = problems[i];
        batch.block_begin[i] = blocks_x;
        blocks_x += (problems[i].n_tiles * 8 + columns_per_block - 1) / columns_per_block;
        max_chunks = std::max(max_chunks, problems[i].w.chunks);
        same_chunks = same_chunks && problems[i].w.chunks == problems[0].w.chunks;
    }
    for (int i = count; i < kMaxProblems; ++i) batch.block_begin[i] = blocks_x;
    sm_count = std::max(sm_count, 1);
    int chunks_per_block = 1;
    if (swapped) {
        // The plain kernels (split-K sums added with atomics) are planned first;
        // their plan also sets the cluster variant's split-K count.
        const bool last_block_finishes = wants_finish && rows <= kSmallGemmFusedRows;
        // The register variants: up to 4 chunks at one x tile (finishing the
        // phase or not); at two x tiles 3 or, in 64 registers (4 blocks an SM),
        // 2 (4 chunks there, one wave of 16-row Q|K|V, timed slower on the H200).
        const auto registers = [&](int chunks) {
            return rows > 8 ? (chunks > 2 ? gptq4_gemm_swapped_kernel<2, false, false, 3>
                                          : gptq4_gemm_swapped_kernel<2, false, false, 2>)
                   : last_block_finishes ? gptq4_gemm_swapped_kernel<1, true, false, 4>
                                         : gptq4_gemm_swapped_kernel<1, false, false, 4>;
        };
        const auto streamed_kernel = rows > 8 ? gptq4_gemm_swapped_kernel<2, false, true, 0>
                                     : last_block_finishes ? gptq4_gemm_swapped_kernel<1, true, true, 0>
                                                           : gptq4_gemm_swapped_kernel<1, false, true, 0>;
        // Registers while the grid takes at most two waves (measured best at
        // Llama-3-8B decode), else streamed; the epilogue's head buffers need
        // kWarps * head_dim floats of either.
        const int head_dim = requested.kind == SmallGemmEpilogue::kHeads ? requested.heads.head_dim : 0;
        const size_t epilogue_shared = last_block_finishes ? sizeof(float) * kWarps * head_dim : 0;
        const int register_chunks = rows > 8 ? 3 : 4;
        const auto register_shared = [&](int c) {
            return std::max(swap_shared_bytes(false, rows, c), epilogue_shared);
        };
        // Every launch of a kernel fits in what 16 rows and its most chunks take.
        const size_t register_max_shared = std::max(swap_shared_bytes(false, 16, 4), epilogue_shared);
        int per_sm = 0;
        QATTN_TRY(blocks_per_sm(registers(register_chunks), kWarps * 32, register_shared(register_chunks),
                                register_max_shared, &per_sm));
        const bool streamed = static_cast<int64_t>(blocks_x) * ((max_chunks + register_chunks - 1) / register_chunks) >
                              int64_t(2) * per_sm * sm_count;
        const auto shared_bytes = [&](int c) {
            return streamed ? swap_shared_bytes(true, rows, c) : register_shared(c);
        };
        const size_t max_shared = streamed ? swap_shared_bytes(true, 16, kSwapMaxChunks) : register_max_shared;
        if (streamed)
            QATTN_TRY(plan_chunks([&](int) { return streamed_kernel; }, shared_bytes, max_shared, kSwapMaxChunks,
                                  true, blocks_x, max_chunks, sm_count, &chunks_per_block));
        else
            QATTN_TRY(plan_chunks(registers, shared_bytes, max_shared, register_chunks, false, blocks_x, max_chunks,
                                  sm_count, &chunks_per_block));
        const auto kernel = streamed ? streamed_kernel : registers(chunks_per_block);
        const dim3 grid(blocks_x, (max_chunks + chunks_per_block - 1) / chunks_per_block);

        // The same plan with the split-K blocks of each column range as one
        // cluster that finishes the phase, where it runs in as few waves. Every
        // block of a cluster must reach its barriers: all problems have the
        // same chunks, so no block is left without a K slice.
        if (wants_finish && same_chunks && grid.y <= kMaxClusterBlocks) {
            const auto clustered = streamed ? (rows > 8 ? gptq4_gemm_swapped_kernel<2, true, true, 0, true>
                                                        : gptq4_gemm_swapped_kernel<1, true, true, 0, true>)
                                   : rows > 8 ? (chunks_per_block > 2 ? gptq4_gemm_swapped_kernel<2, true, false, 3, true>
                                                                      : gptq4_gemm_swapped_kernel<2, true, false, 2, true>)
                                              : gptq4_gemm_swapped_kernel<1, true, false, 4, true>;
            const int nt = rows > 8 ? 2 : 1;
            const size_t shared = cluster_shared_bytes(streamed, nt, rows, chunks_per_block, head_dim);
            const size_t cluster_max_shared =
                cluster_shared_bytes(streamed, 2, 16, streamed ? kSwapMaxChunks : register_chunks, kSwapColumns);
            int plain_per_sm = 0;
            QATTN_TRY(blocks_per_sm(kernel, kWarps * 32, shared_bytes(chunks_per_block), max_shared, &plain_per_sm));
            const int64_t resident = int64_t(std::max(plain_per_sm, 1)) * sm_count;
            const int64_t plain_waves = (int64_t(grid.x) * grid.y + resident - 1) / resident;
            bool fits = false;
            QATTN_TRY(clusters_fit(clustered, grid, shared, cluster_max_shared, plain_waves, &fits));
            if (fits) {
                QATTN_TRY(launch_pdl_clustered("gptq4_gemm_swapped (clusters)", clustered, grid, kWarps * 32, shared,
                                               static_cast<int>(grid.y), stream, batch, x, x_stride, rows, acc,
                                               acc_stride, chunks_per_block, requested));
                *finished = true;
                return QATTN_SUCCESS;
            }
        }
        SmallGemmEpilogue epilogue;
        if (last_block_finishes) epilogue = requested;
        QATTN_TRY(launch_pdl("gptq4_gemm_swapped", kernel, grid, kWarps * 32, shared_bytes(chunks_per_block), stream,
                             batch, x, x_stride, rows, acc, acc_stride, chunks_per_block, epilogue));
        *finished = last_block_finishes;
        return QATTN_SUCCESS;
    }
    // The x slice stays under the 48 KB default.
    const int max_by_shared = std::max(1, ((48 << 10) / (2 * rows) - 8) / kPackRows);
    const auto shared_bytes = [rows](int c) { return sizeof(__half) * rows * (c * kPackRows + 8); };
    const int max_per_block = std::min(kMaxChunksPerBlock, max_by_shared);
    QATTN_TRY(plan_chunks([](int) { return gptq4_gemm_small_kernel<2>; }, shared_bytes, shared_bytes(max_per_block), max_per_block, true,
                          blocks_x, max_chunks, sm_count, &chunks_per_block));
    const dim3 grid(blocks_x, (max_chunks + chunks_per_block - 1) / chunks_per_block);
    return launch_pdl("gptq4_gemm_small", gptq4_gemm_small_kernel<2>, grid, kWarps * 32,
                      shared_bytes(chunks_per_block), stream, batch, x, x_stride, rows, acc, acc_stride,
                      chunks_per_block);
}

}  // namespace qattn::cuda
