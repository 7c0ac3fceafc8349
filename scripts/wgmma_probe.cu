// Probe of a fused GPTQ 4-bit dequantize + GEMM for prefill on sm_90a (wgmma),
// against what qattn's large-row path does (dequantize to fp16, then
// cublasGemmEx). The question: can one kernel that dequantizes the weights into
// wgmma's register operand run faster than cuBLAS on the fp16 copy? It must, to
// gain at P2k: the library's own dequantization costs little, and the version
// that ran in the library at cuBLAS's pace lost 8 µs of the block (85b3502,
// docs/GPU_NOTES.md, seventeenth session). Not part of the library.
//
// Y[t, n] = sum_k X[t, k] W[n, k], computed as its transpose per block: the
// warpgroup's A operand is 64 output columns (the weights, dequantized in
// registers from the decode GEMM's packing: a warp's 16 columns are two n-tiles,
// one uint4 a lane a chunk of 128 k), B is TOKENS rows of x (K-major in shared
// memory with the 128-byte swizzle). A block: two warpgroups of GROUPS x 64
// columns, x TOKENS rows. Each chunk travels into one of the stages by TMA (x
// from a tensor map) and bulk copies (weights, chunk scales), counted by a full
// mbarrier a stage and released by an empty one; one thread issues the copies.
// Every chunk has one group (scale and zero per chunk and column); W = (q - z)
// * s rounded to fp16 as the library's dequantize kernel does, so both paths
// multiply the same weights.
//
// Variants: 256 x 128 (two warpgroups, the kernel that ran in the library:
// 651-666 TFLOP/s here, L2-cold, 1.01-1.07x cuBLAS's time; in the library's
// P2k forward1 151 µs against cuBLAS's 134 for Q|K|V), and one warpgroup a
// block at 128 x 128 (two stages) and 128 x 64 (four), and two warpgroups of
// 64 columns at 128 x 128 (two stages), each two blocks an SM, so that one
// block's prologue (its first copies) and epilogue (the tile through
// shared memory to y) run beside the other's MMAs. The fourth shape doubles K
// at N 4096 (the same grid): its time minus the first's is the main loop's for
// 4096 of K, the rest a block's fixed cost. (128 x 256 with m64n256k16 ran at
// 465-488 TFLOP/s in the seventeenth session and is gone.) Last, persistent and
// warp-specialized (a copying warpgroup, two multiplying ones, a block an SM
// walking the tiles; the epilogue from the accumulators to y): as fast as
// cuBLAS at N 4096, faster at N 2048 and 6144 (eighteenth session). An earlier
// persistent version without a copying warpgroup had each tile's accumulator
// reads placed by ptxas above its wait for every MMA (F2FP before
// WARPGROUP.DEPBAR.LE gsb0, 0x0); this one's SASS has them after it.
//
// The reference dequantizes with the same nibble order into W [N, K] and runs
// cublasGemmEx. Printed: relative errors (fused against cuBLAS over every
// output, each against a float64 sum at 1024 sampled outputs) and times (CUDA
// events, median of 20 after warm-up) with the weights L2-resident ("hot") and
// cycled through copies larger than the L2 ("cold", what the block sees), at
// Llama-3-8B's prefill shapes.
//
//   nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -I src scripts/wgmma_probe.cu -lcublas \
//       -o /tmp/wgmma_probe && /tmp/wgmma_probe
//
// (sm_90a: wgmma is an architecture-specific feature, which qattn's sm_90 build lacks.)
#include "cuda/gptq4_nibbles.cuh"
#include "probe_common.cuh"

#include <cublas_v2.h>
#include <cuda.h>
#include <cudaTypedefs.h>

#include <cmath>
#include <cstdio>
#include <vector>

using namespace qattn::cuda;

namespace {

constexpr int kChunk = 128;  // k rows a packed chunk

// One stage, a chunk: x [TOKENS][128 k] fp16 as two 64-k atom columns, each
// TOKENS rows of 128 bytes (the TMA box, swizzled by it); the block's packed
// weights of the chunk (one contiguous range of qpack) and their (scale, zero)
// words; rounded to 1024 bytes, the alignment of the swizzle's atoms. A block
// has WGS warpgroups of GROUPS x 64 columns each; with BLOCKS = 2 two blocks
// share an SM (so that one's prologue and epilogue run beside the other's
// MMAs), each in at most half its shared memory. As many stages (up to four)
// as fit. At chunk c the copying thread refills the stage of chunk c - LAG
// (released by every warpgroup: with two and more than two stages, LAG 2 lets
// the other one lag a chunk) with chunk c - LAG + STAGES.
template <int GROUPS, int TOKENS, int WGS, int BLOCKS>
struct Tile {
    static constexpr int kThreads = WGS * 128;
    static constexpr int kBlocksPerSm = BLOCKS;
    static constexpr int kColumns = WGS * GROUPS * 64;
    static constexpr int kAtomBytes = TOKENS * 128;
    static constexpr int kXBytes = 2 * kAtomBytes;
    static constexpr int kWeightBytes = kColumns / 8 * 32 * 16;
    static constexpr int kScaleBytes = kColumns * 4;
    static constexpr int kStageBytes = (kXBytes + kWeightBytes + kScaleBytes + 1023) / 1024 * 1024;
    static constexpr int kSharedLimit = (kBlocksPerSm == 1 ? 227 : 113) * 1024;
    static constexpr int kStages = 4 * kStageBytes + 1024 <= kSharedLimit ? 4 : 3 * kStageBytes + 1024 <= kSharedLimit ? 3 : 2;
    static constexpr int kLag = WGS == 1 || kStages == 2 ? 1 : 2;
    static constexpr int kSharedBytes = kStages * kStageBytes + 1024;  // + room to align
    static constexpr int kTileStride = kColumns + 8;  // the epilogue's fp16 tile, rows padded by 16 bytes
    static_assert(kSharedBytes <= kSharedLimit, "two stages fit");
    static_assert(TOKENS * kTileStride * 2 <= kStages * kStageBytes, "the epilogue tile fits the stages");
};

struct Problem {
    const uint4* qpack;         // [chunks][n_tiles][32 lanes]
    const __half2* scale_zero;  // [chunks][N]: (scale, 1024 + zero)
    const __half* x;            // [T][K]
    __half* y;                  // [T][N]
    int tokens, k, n;
};

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, int bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, int parity) {
    asm volatile(
        "{\n"
        ".reg .pred done;\n"
        "retry:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra retry;\n"
        "}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}
__device__ __forceinline__ void tma_load_2d(uint32_t to, const CUtensorMap* map, int x, int y, uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(to),
        "l"(map), "r"(x), "r"(y), "r"(bar)
        : "memory");
}
__device__ __forceinline__ void bulk_load(uint32_t to, const void* from, int bytes, uint32_t bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(to),
                 "l"(from), "r"(bytes), "r"(bar)
                 : "memory");
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// Operands of an empty asm: the compiler keeps the values live and unmoved up
// to here (the asynchronous MMAs read the A registers and write the
// accumulators until their wait).
template <int N>
__device__ __forceinline__ void pin(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
__device__ __forceinline__ void pin(uint32_t (&a)[4]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) asm volatile("" : "+r"(a[i])::"memory");
}

// Shared-memory matrix descriptor: K-major, 128-byte swizzle, 8-row groups
// 1024 bytes apart (the leading offset is unused in this layout).
__device__ __forceinline__ uint64_t smem_desc(uint32_t address) {
    uint64_t d = (address & 0x3FFFF) >> 4;
    d |= uint64_t(1) << 16;
    d |= uint64_t(1024 >> 4) << 32;
    d |= uint64_t(1) << 62;
    return d;
}

// D (64 x TOKENS fp32: this thread's TOKENS / 2) = A (64 x 16 fp16, registers)
// x B (16 x TOKENS fp16, shared memory by descriptor) + D if accumulate.
template <int TOKENS>
__device__ __forceinline__ void wgmma_rs(float (&d)[TOKENS / 2], const uint32_t (&a)[4], uint64_t desc_b,
                                         bool accumulate);
template <>
__device__ __forceinline__ void wgmma_rs<64>(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b, bool accumulate) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, "
        "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(static_cast<int>(accumulate)));
}
template <>
__device__ __forceinline__ void wgmma_rs<128>(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b,
                                              bool accumulate) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, "
        "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, "
        "%43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(static_cast<int>(accumulate)));
}
// A lane's codes of one column: -(1024 + z), -(64 + z) (gptq4_nibbles.cuh), s.
struct ColumnCodes {
    __half2 low, high, scale;
};
__device__ __forceinline__ ColumnCodes column_codes(__half2 scale_zero) {
    const __half2 z = __half2half2(__high2half(scale_zero));
    return {minus_low_offset(z), minus_high_offset(z), __half2half2(__low2half(scale_zero))};
}
// k16 step j of a chunk from a lane's words of its columns a, b: the
// mma.m16n8k16 A fragment (a0 column a, k 2t, 2t + 1; a1 column b; a2, a3 the
// same at k + 8), which is this warp's rows of wgmma's register A.
__device__ __forceinline__ void dequantize_step(uint32_t (&a)[4], const uint4& wa, const uint4& wb, int j,
                                                const ColumnCodes& ca, const ColumnCodes& cb) {
    const uint32_t words_a[4] = {wa.x, wa.y, wa.z, wa.w}, words_b[4] = {wb.x, wb.y, wb.z, wb.w};
    const uint32_t x = words_a[j >> 1] >> ((j & 1) * 8), y = words_b[j >> 1] >> ((j & 1) * 8);
    const __half2 a0 = __hmul2(low_nibbles_minus_zero(x, ca.low), ca.scale);
    const __half2 a1 = __hmul2(low_nibbles_minus_zero(y, cb.low), cb.scale);
    const __half2 a2 = __hmul2(high_nibbles_minus_zero(x, ca.high), ca.scale);
    const __half2 a3 = __hmul2(high_nibbles_minus_zero(y, cb.high), cb.scale);
    a[0] = *reinterpret_cast<const uint32_t*>(&a0);
    a[1] = *reinterpret_cast<const uint32_t*>(&a1);
    a[2] = *reinterpret_cast<const uint32_t*>(&a2);
    a[3] = *reinterpret_cast<const uint32_t*>(&a3);
}

// One block a tile, token tile major (the blocks at work at once share x and
// the weights in the L2).
template <int GROUPS, int TOKENS, int WGS, int BLOCKS, int DEPTH>
__global__ void __launch_bounds__(Tile<GROUPS, TOKENS, WGS, BLOCKS>::kThreads, Tile<GROUPS, TOKENS, WGS, BLOCKS>::kBlocksPerSm)
    fused_gptq4_gemm(Problem p, const __grid_constant__ CUtensorMap x_map) {
    using T = Tile<GROUPS, TOKENS, WGS, BLOCKS>;
    constexpr int kThreads = T::kThreads, kLag = T::kLag;
    constexpr int kColumns = T::kColumns, kStageBytes = T::kStageBytes, kStages = T::kStages;
    constexpr int kAtomBytes = T::kAtomBytes, kXBytes = T::kXBytes, kWeightBytes = T::kWeightBytes;
    extern __shared__ unsigned char shared_raw[];
    __shared__ __align__(8) uint64_t full[kStages], empty[kStages];
    const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(shared_raw));
    const uint32_t base = (raw + 1023) & ~1023u;
    const uint32_t full0 = static_cast<uint32_t>(__cvta_generic_to_shared(full));
    const uint32_t empty0 = static_cast<uint32_t>(__cvta_generic_to_shared(empty));
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int chunks = p.k / kChunk, n_tiles = p.n / 8;
    const int column_blocks = p.n / kColumns;
    const int token0 = (blockIdx.x / column_blocks) * TOKENS, tile0 = (blockIdx.x % column_blocks) * (kColumns / 8);
    const int column0 = tile0 * 8;
    const auto fill = [&](int chunk) {
        const int s = chunk % kStages;
        const uint32_t at = base + s * kStageBytes, bar = full0 + 8 * s;
        mbar_expect_tx(bar, kXBytes + kWeightBytes + T::kScaleBytes);
        tma_load_2d(at, &x_map, chunk * kChunk, token0, bar);
        tma_load_2d(at + kAtomBytes, &x_map, chunk * kChunk + 64, token0, bar);
        bulk_load(at + kXBytes, p.qpack + (static_cast<size_t>(chunk) * n_tiles + tile0) * 32, kWeightBytes, bar);
        bulk_load(at + kXBytes + kWeightBytes, p.scale_zero + static_cast<size_t>(chunk) * p.n + column0,
                  T::kScaleBytes, bar);
    };
    if (tid == 0) {
        for (int s = 0; s < kStages; ++s) mbar_init(full0 + 8 * s, 1), mbar_init(empty0 + 8 * s, WGS);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        for (int c = 0; c < kStages && c < chunks; ++c) fill(c);
    }
    __syncthreads();

    const int wg = warp >> 2, wq = warp & 3;
    int local[GROUPS];
#pragma unroll
    for (int u = 0; u < GROUPS; ++u) local[u] = (wg * GROUPS + u) * 8 + wq * 2;
    // Not zeroed: a tile's first MMA has scale-d 0. An instruction that set them
    // would reach the chunk loop, where an MMA is in flight across the back
    // edge, and ptxas would then serialize every MMA.
    float d[GROUPS][TOKENS / 2];
    // [step % DEPTH][group]: a step's registers stay untouched until its MMAs are
    // done, so DEPTH - 1 steps may be in flight while the next is dequantized.
    static_assert(8 % DEPTH == 0, "a chunk's 8 steps use the buffers in the same order");
    uint32_t a[DEPTH][GROUPS][4];
    const auto chunk_mmas = [&](int c) {
        const int s = c % kStages;
        mbar_wait(full0 + 8 * s, (c / kStages) & 1);
        const uint32_t stage = base + s * kStageBytes;
        const unsigned char* const stage_ptr = shared_raw + (stage - raw);
        const uint4* const ws = reinterpret_cast<const uint4*>(stage_ptr + kXBytes);
        const __half2* const szs = reinterpret_cast<const __half2*>(stage_ptr + kXBytes + kWeightBytes);
        ColumnCodes ca[GROUPS], cb[GROUPS];
        uint4 wa[GROUPS], wb[GROUPS];
#pragma unroll
        for (int u = 0; u < GROUPS; ++u) {
            wa[u] = ws[local[u] * 32 + lane], wb[u] = ws[(local[u] + 1) * 32 + lane];
            ca[u] = column_codes(szs[local[u] * 8 + g]), cb[u] = column_codes(szs[local[u] * 8 + 8 + g]);
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) {
#pragma unroll
            for (int u = 0; u < GROUPS; ++u) dequantize_step(a[j % DEPTH][u], wa[u], wb[u], j, ca[u], cb[u]);
            wgmma_fence();
            const uint64_t desc = smem_desc(stage + (j >> 2) * kAtomBytes + (j & 3) * 32);
#pragma unroll
            for (int u = 0; u < GROUPS; ++u) wgmma_rs<TOKENS>(d[u], a[j % DEPTH][u], desc, c > 0 || j > 0);
            wgmma_commit();
            wgmma_wait<DEPTH - 1>();  // step j + 1 - DEPTH, which read a[(j + 1) % DEPTH], is done
#pragma unroll
            for (int u = 0; u < GROUPS; ++u) pin(a[(j + 1) % DEPTH][u]);
        }
        // This warpgroup's MMAs of chunk c - 1 are done. (Here, not after the
        // first step: an arrive there, its address computed inside an MMA's
        // window, made ptxas serialize the MMAs.)
        if (c > 0 && (tid & 127) == 0) mbar_arrive(empty0 + 8 * ((c + kStages - 1) % kStages));
        if (tid == 0 && c >= kLag && c + kStages - kLag < chunks) {
            mbar_wait(empty0 + 8 * ((c - kLag) % kStages), ((c - kLag) / kStages) & 1);
            fill(c + kStages - kLag);
        }
    };
    // The last chunk outside the loop: with the wait for every MMA after a loop
    // that ends with one in flight, ptxas moved the reads of the accumulators
    // above that wait (this probe's second version, 4e-2 wrong).
    for (int c = 0; c < chunks - 1; ++c) chunk_mmas(c);
    chunk_mmas(chunks - 1);
    wgmma_wait<0>();
#pragma unroll
    for (int u = 0; u < GROUPS; ++u) pin(d[u]);
    __syncthreads();  // every chunk is in and multiplied: the stages hold the tile now

    // d[u][4 r + e]: column local[u] * 8 + g (e < 2) or + 8, row 8 r + 2 t + (e & 1).
    // Through shared memory, so that y is written in whole 16-byte pieces of a row.
    __half* const tile_out = reinterpret_cast<__half*>(shared_raw + (base - raw));
#pragma unroll
    for (int u = 0; u < GROUPS; ++u)
#pragma unroll
        for (int r = 0; r < TOKENS / 8; ++r) {
            const int row = 8 * r + 2 * t, column = local[u] * 8 + g;
            tile_out[row * T::kTileStride + column] = __float2half(d[u][4 * r]);
            tile_out[(row + 1) * T::kTileStride + column] = __float2half(d[u][4 * r + 1]);
            tile_out[row * T::kTileStride + column + 8] = __float2half(d[u][4 * r + 2]);
            tile_out[(row + 1) * T::kTileStride + column + 8] = __float2half(d[u][4 * r + 3]);
        }
    __syncthreads();
    constexpr int kPieces = kColumns / 8;
    for (int e = tid; e < TOKENS * kPieces; e += kThreads) {
        const int r = e / kPieces, c8 = (e % kPieces) * 8;
        *reinterpret_cast<uint4*>(p.y + static_cast<size_t>(token0 + r) * p.n + column0 + c8) =
            *reinterpret_cast<const uint4*>(tile_out + r * T::kTileStride + c8);
    }
}

// Persistent and warp-specialized: 132 blocks (one an SM) walk the 256 x 128
// tiles (tile = blockIdx.x + i * gridDim.x, token tile major as above). The
// first warpgroup copies (one thread; its registers lowered to 40 by
// setmaxnreg), the other two multiply (raised to 232) as in the kernel above.
// The copier runs through the stage ring across tiles, so the next tile's
// first chunks arrive while the consumers finish this one: no prologue after
// the first tile. The epilogue writes y from the accumulators (pairs of
// columns swapped between lanes g and g ^ 1, one 4-byte store each), since the
// stages are already being refilled.
constexpr int kPersistentThreads = 384;
__global__ void __launch_bounds__(kPersistentThreads, 1)
    fused_gptq4_gemm_persistent(Problem p, const __grid_constant__ CUtensorMap x_map) {
    using T = Tile<2, 128, 2, 1>;
    constexpr int kColumns = T::kColumns, kStageBytes = T::kStageBytes, kStages = T::kStages;
    constexpr int kAtomBytes = T::kAtomBytes, kXBytes = T::kXBytes, kWeightBytes = T::kWeightBytes;
    extern __shared__ unsigned char shared_raw[];
    __shared__ __align__(8) uint64_t full[kStages], empty[kStages];
    const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(shared_raw));
    const uint32_t base = (raw + 1023) & ~1023u;
    const uint32_t full0 = static_cast<uint32_t>(__cvta_generic_to_shared(full));
    const uint32_t empty0 = static_cast<uint32_t>(__cvta_generic_to_shared(empty));
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int chunks = p.k / kChunk, n_tiles = p.n / 8;
    const int column_blocks = p.n / kColumns, tiles = column_blocks * (p.tokens / 128);
    if (tid == 0) {
        for (int s = 0; s < kStages; ++s) mbar_init(full0 + 8 * s, 1), mbar_init(empty0 + 8 * s, 2);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();

    if (warp < 4) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
        if (tid != 0) return;
        int q = 0;  // the chunk's number in this block's sequence
        for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
            const int token0 = (tile / column_blocks) * 128, tile0 = (tile % column_blocks) * (kColumns / 8);
            for (int c = 0; c < chunks; ++c, ++q) {
                const int s = q % kStages;
                // The consumers released chunk q - kStages: that completion of
                // the empty barrier is its (q / kStages - 1)-th.
                if (q >= kStages) mbar_wait(empty0 + 8 * s, (q / kStages - 1) & 1);
                const uint32_t at = base + s * kStageBytes, bar = full0 + 8 * s;
                mbar_expect_tx(bar, kXBytes + kWeightBytes + T::kScaleBytes);
                tma_load_2d(at, &x_map, c * kChunk, token0, bar);
                tma_load_2d(at + kAtomBytes, &x_map, c * kChunk + 64, token0, bar);
                bulk_load(at + kXBytes, p.qpack + (static_cast<size_t>(c) * n_tiles + tile0) * 32, kWeightBytes, bar);
                bulk_load(at + kXBytes + kWeightBytes, p.scale_zero + static_cast<size_t>(c) * p.n + tile0 * 8,
                          T::kScaleBytes, bar);
            }
        }
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
    const int wg = (warp >> 2) - 1, wq = warp & 3, wg_thread = tid & 127;
    int local[2];
#pragma unroll
    for (int u = 0; u < 2; ++u) local[u] = (wg * 2 + u) * 8 + wq * 2;
    float d[2][64];
    uint32_t a[2][2][4];
    const auto chunk_mmas = [&](int c, int q) {
        const int s = q % kStages;
        mbar_wait(full0 + 8 * s, (q / kStages) & 1);
        const uint32_t stage = base + s * kStageBytes;
        const unsigned char* const stage_ptr = shared_raw + (stage - raw);
        const uint4* const ws = reinterpret_cast<const uint4*>(stage_ptr + kXBytes);
        const __half2* const szs = reinterpret_cast<const __half2*>(stage_ptr + kXBytes + kWeightBytes);
        ColumnCodes ca[2], cb[2];
        uint4 wa[2], wb[2];
#pragma unroll
        for (int u = 0; u < 2; ++u) {
            wa[u] = ws[local[u] * 32 + lane], wb[u] = ws[(local[u] + 1) * 32 + lane];
            ca[u] = column_codes(szs[local[u] * 8 + g]), cb[u] = column_codes(szs[local[u] * 8 + 8 + g]);
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) {
#pragma unroll
            for (int u = 0; u < 2; ++u) dequantize_step(a[j & 1][u], wa[u], wb[u], j, ca[u], cb[u]);
            wgmma_fence();
            const uint64_t desc = smem_desc(stage + (j >> 2) * kAtomBytes + (j & 3) * 32);
#pragma unroll
            for (int u = 0; u < 2; ++u) wgmma_rs<128>(d[u], a[j & 1][u], desc, c > 0 || j > 0);
            wgmma_commit();
            wgmma_wait<1>();
#pragma unroll
            for (int u = 0; u < 2; ++u) pin(a[(j + 1) & 1][u]);
        }
        if (c > 0 && wg_thread == 0) mbar_arrive(empty0 + 8 * ((q + kStages - 1) % kStages));
    };
    int q = 0;
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const int token0 = (tile / column_blocks) * 128, column0 = (tile % column_blocks) * kColumns;
        for (int c = 0; c < chunks - 1; ++c) chunk_mmas(c, q + c);
        chunk_mmas(chunks - 1, q + chunks - 1);
        wgmma_wait<0>();
#pragma unroll
        for (int u = 0; u < 2; ++u) pin(d[u]);
        q += chunks;
        if (wg_thread == 0) mbar_arrive(empty0 + 8 * ((q + kStages - 1) % kStages));
        // d[u][4 r + e]: column local[u] * 8 + g (e < 2) or + 8, token 8 r + 2 t + (e & 1).
        // Lane g keeps token 2t (g even) or 2t + 1 (g odd) of columns g & ~1, g | 1.
        const bool even = (g & 1) == 0;
#pragma unroll
        for (int u = 0; u < 2; ++u)
#pragma unroll
            for (int r = 0; r < 16; ++r)
#pragma unroll
                for (int h = 0; h < 2; ++h) {  // columns + 0 or + 8
                    const float mine0 = d[u][4 * r + 2 * h], mine1 = d[u][4 * r + 2 * h + 1];
                    const float theirs = __shfl_xor_sync(0xFFFFFFFFu, even ? mine1 : mine0, 4);
                    const __half2 pair = even ? __floats2half2_rn(mine0, theirs) : __floats2half2_rn(theirs, mine1);
                    const int token = token0 + 8 * r + 2 * t + (even ? 0 : 1);
                    const int column = column0 + local[u] * 8 + (g & ~1) + 8 * h;
                    *reinterpret_cast<__half2*>(p.y + static_cast<size_t>(token) * p.n + column) = pair;
                }
    }
}

// The reference's weights: W [N, K] fp16 from the same packing and nibble order.
__global__ void dequantize_reference(Problem p, __half* w) {
    const int chunks = p.k / kChunk, n_tiles = p.n / 8;
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int pair = blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);  // (chunk, tile pair)
    if (pair >= chunks * n_tiles / 2) return;
    const int chunk = pair / (n_tiles / 2), tile_a = 2 * (pair % (n_tiles / 2)), tile_b = tile_a + 1;
    const uint4 qa = p.qpack[(static_cast<size_t>(chunk) * n_tiles + tile_a) * 32 + lane];
    const uint4 qb = p.qpack[(static_cast<size_t>(chunk) * n_tiles + tile_b) * 32 + lane];
    const int column_a = tile_a * 8 + g, column_b = tile_b * 8 + g;
    const ColumnCodes ca = column_codes(p.scale_zero[static_cast<size_t>(chunk) * p.n + column_a]);
    const ColumnCodes cb = column_codes(p.scale_zero[static_cast<size_t>(chunk) * p.n + column_b]);
    for (int j = 0; j < 8; ++j) {
        uint32_t a[4];
        dequantize_step(a, qa, qb, j, ca, cb);
        const int k = chunk * kChunk + 16 * j + 2 * t;
        const __half2* h = reinterpret_cast<const __half2*>(a);
        *reinterpret_cast<__half2*>(w + static_cast<size_t>(column_a) * p.k + k) = h[0];
        *reinterpret_cast<__half2*>(w + static_cast<size_t>(column_b) * p.k + k) = h[1];
        *reinterpret_cast<__half2*>(w + static_cast<size_t>(column_a) * p.k + k + 8) = h[2];
        *reinterpret_cast<__half2*>(w + static_cast<size_t>(column_b) * p.k + k + 8) = h[3];
    }
}

__global__ void fill_weights(uint32_t* q, size_t words, __half2* sz, size_t columns, uint32_t seed) {
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < words; i += size_t(gridDim.x) * blockDim.x)
        q[i] = probe::hash(static_cast<uint32_t>(i), seed);
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < columns; i += size_t(gridDim.x) * blockDim.x) {
        const uint32_t h = probe::hash(static_cast<uint32_t>(i), seed ^ 0x9e3779b9u);
        const float scale = 0.002f + (h & 0xFF) / 255.0f * 0.02f;
        sz[i] = __halves2half2(__float2half(scale), __float2half(1024.0f + ((h >> 8) & 15)));
    }
}

// Y[token, column] in float64 from the packing itself (not from the device's
// dequantization): (q - z) * s rounded to fp16, as both GPU paths round it.
double reference_output(const std::vector<uint32_t>& qpack, const std::vector<__half2>& sz,
                        const std::vector<__half>& x, int k, int n, int token, int column) {
    const int n_tiles = n / 8, tile = column / 8, g = column % 8;
    double sum = 0;
    for (int chunk = 0; chunk < k / kChunk; ++chunk) {
        const __half2 code = sz[static_cast<size_t>(chunk) * n + column];
        const float scale = __low2float(code), zero = __high2float(code) - 1024.0f;
        for (int t = 0; t < 4; ++t) {
            const uint32_t* words = &qpack[((static_cast<size_t>(chunk) * n_tiles + tile) * 32 + g * 4 + t) * 4];
            for (int j = 0; j < 8; ++j) {
                const uint32_t byte_pair = words[j >> 1] >> ((j & 1) * 8);
                // bits [0,4) [16,20): k 2t, 2t + 1; bits [4,8) [20,24): k 2t + 8, 2t + 9
                const int q[4] = {int(byte_pair & 15), int((byte_pair >> 16) & 15), int((byte_pair >> 4) & 15),
                                  int((byte_pair >> 20) & 15)};
                const int kk[4] = {2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9};
                for (int e = 0; e < 4; ++e) {
                    const double w = __half2float(__float2half((q[e] - zero) * scale));
                    sum += w * __half2float(x[static_cast<size_t>(token) * k + chunk * kChunk + 16 * j + kk[e]]);
                }
            }
        }
    }
    return sum;
}

// Relative error (root of summed squares) of out against the float64 reference
// at sampled outputs.
double sampled_error(const std::vector<__half>& out, const std::vector<uint32_t>& qpack,
                     const std::vector<__half2>& sz, const std::vector<__half>& x, int tokens, int k, int n) {
    double num = 0, den = 0;
    for (uint32_t i = 0; i < 1024; ++i) {
        const int token = probe::hash(i, 5u) % tokens, column = probe::hash(i, 6u) % n;
        const double want = reference_output(qpack, sz, x, k, n, token, column);
        const double got = __half2float(out[static_cast<size_t>(token) * n + column]);
        num += (got - want) * (got - want), den += want * want;
    }
    return std::sqrt(num / std::max(den, 1e-30));  // NaN, never below the threshold, if any output was NaN
}

// x [T][K] as TMA sees it: boxes of 64 k x `rows` tokens, 128-byte swizzle.
CUtensorMap x_tensor_map(const __half* x, int tokens, int k, int rows) {
    static PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;
    if (!encode) {
        cudaDriverEntryPointQueryResult found;
        CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", reinterpret_cast<void**>(&encode), 12000,
                                               cudaEnableDefault, &found));
        CHECK(found != cudaDriverEntryPointSuccess);
    }
    CUtensorMap map;
    const cuuint64_t dims[2] = {cuuint64_t(k), cuuint64_t(tokens)};
    const cuuint64_t strides[1] = {cuuint64_t(k) * sizeof(__half)};
    const cuuint32_t box[2] = {64, cuuint32_t(rows)}, element_strides[2] = {1, 1};
    CHECK(encode(&map, CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2, const_cast<__half*>(x), dims, strides, box,
                 element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                 CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE));
    return map;
}

struct Variant {
    int columns, tokens, stages, per_sm, depth;
    bool persistent;
    void (*launch)(const Problem&, const CUtensorMap&);
};
template <int GROUPS, int TOKENS, int WGS, int BLOCKS, int DEPTH>
void launch(const Problem& p, const CUtensorMap& map) {
    using T = Tile<GROUPS, TOKENS, WGS, BLOCKS>;
    const int tiles = (p.n / T::kColumns) * (p.tokens / TOKENS);
    fused_gptq4_gemm<GROUPS, TOKENS, WGS, BLOCKS, DEPTH><<<tiles, T::kThreads, T::kSharedBytes>>>(p, map);
}
template <int GROUPS, int TOKENS, int WGS, int BLOCKS, int DEPTH>
Variant variant() {
    using T = Tile<GROUPS, TOKENS, WGS, BLOCKS>;
    CHECK(cudaFuncSetAttribute(fused_gptq4_gemm<GROUPS, TOKENS, WGS, BLOCKS, DEPTH>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               T::kSharedBytes));
    int per_sm = 0;
    CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fused_gptq4_gemm<GROUPS, TOKENS, WGS, BLOCKS, DEPTH>, T::kThreads,
                                                        T::kSharedBytes));
    return {T::kColumns, TOKENS, T::kStages, per_sm, DEPTH, false, launch<GROUPS, TOKENS, WGS, BLOCKS, DEPTH>};
}

void launch_persistent(const Problem& p, const CUtensorMap& map) {
    using T = Tile<2, 128, 2, 1>;
    static int sms = 0;
    if (!sms) CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    const int tiles = (p.n / T::kColumns) * (p.tokens / 128);
    fused_gptq4_gemm_persistent<<<std::min(tiles, sms), kPersistentThreads, T::kSharedBytes>>>(p, map);
}
Variant persistent_variant() {
    using T = Tile<2, 128, 2, 1>;
    CHECK(cudaFuncSetAttribute(fused_gptq4_gemm_persistent, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               T::kSharedBytes));
    return {T::kColumns, 128, T::kStages, 1, 2, true, launch_persistent};
}

}  // namespace

int main() {
    cudaDeviceProp prop{};
    CHECK(cudaGetDeviceProperties(&prop, 0));
    std::printf("card %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);
    const Variant variants[] = {variant<2, 128, 2, 1, 2>(), variant<2, 128, 2, 1, 4>(), variant<2, 128, 1, 2, 2>(),
                                variant<2, 128, 1, 2, 4>(), variant<2, 64, 1, 2, 2>(), variant<1, 128, 2, 2, 2>(),
                                variant<2, 64, 2, 2, 2>(), persistent_variant()};
    cublasHandle_t blas;
    CHECK(cublasCreate(&blas));
    const int tokens = 2048;
    // Cold: this many copies of the weights, cycled (more than twice the L2 for
    // the packed ones at N 2048; each fp16 copy alone is 16-48 MB).
    constexpr int kPackedCopies = 16, kDenseCopies = 4;
    std::printf("%-20s %-19s %8s %8s %8s %8s %8s %8s %10s %10s %10s\n", "T x K x N", "block",
                "hot", "cold", "cuBLAS h", "cuBLAS c", "cold TF", "dequant", "vs cuBLAS", "fused f64", "cuBLAS f64");
    // K 8192 beside 4096 at N 4096: the same grid with twice the chunks, so the
    // difference is the main loop's time and the rest a block's fixed cost.
    const int shapes[][2] = {{4096, 4096}, {4096, 6144}, {4096, 2048}, {8192, 4096}};
    for (const auto& shape : shapes) {
        const int k = shape[0], n = shape[1];
        const int chunks = k / kChunk, n_tiles = n / 8;
        const size_t words = size_t(chunks) * n_tiles * 32 * 4, codes = size_t(chunks) * n;
        uint32_t* qpack;
        __half2* sz;
        __half *x, *w, *y, *y_ref;
        CHECK(cudaMalloc(&qpack, sizeof(uint32_t) * words * kPackedCopies));
        CHECK(cudaMalloc(&sz, sizeof(__half2) * codes * kPackedCopies));
        CHECK(cudaMalloc(&x, sizeof(__half) * tokens * k));
        CHECK(cudaMalloc(&w, sizeof(__half) * size_t(n) * k * kDenseCopies));
        CHECK(cudaMalloc(&y, sizeof(__half) * tokens * n));
        CHECK(cudaMalloc(&y_ref, sizeof(__half) * tokens * n));
        for (int copy = 0; copy < kPackedCopies; ++copy)  // the same weights in each copy
            fill_weights<<<1024, 256>>>(qpack + words * copy, words, sz + codes * copy, codes, 7u + n);
        probe::fill_random<<<1024, 256>>>(x, size_t(tokens) * k, 11u);
        CHECK(cudaGetLastError());
        const auto problem = [&](int copy) {
            return Problem{reinterpret_cast<const uint4*>(qpack + words * (copy % kPackedCopies)),
                           sz + codes * (copy % kPackedCopies), x, y, tokens, k, n};
        };
        const int pairs = chunks * n_tiles / 2;
        const auto dequant = [&](int copy) {
            dequantize_reference<<<(pairs + 7) / 8, 256>>>(problem(copy), w + size_t(n) * k * (copy % kDenseCopies));
        };
        const float one = 1.0f, zero = 0.0f;
        const auto gemm = [&](int copy) {
            CHECK(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, n, tokens, k, &one, w + size_t(n) * k * copy,
                               CUDA_R_16F, k, x, CUDA_R_16F, k, &zero, y_ref, CUDA_R_16F, n, CUBLAS_COMPUTE_32F,
                               CUBLAS_GEMM_DEFAULT));
        };
        for (int copy = 0; copy < kDenseCopies; ++copy) dequant(copy);
        gemm(0);
        CHECK(cudaGetLastError());
        const float t_deq = probe::median_us([&](int) { dequant(0); });
        const float t_gemm_hot = probe::median_us(gemm), t_gemm_cold = probe::median_us(gemm, kDenseCopies);
        std::vector<__half> hy(size_t(tokens) * n), hr(size_t(tokens) * n), hx(size_t(tokens) * k);
        std::vector<uint32_t> hq(words);
        std::vector<__half2> hsz(codes);
        CHECK(cudaMemcpy(hr.data(), y_ref, sizeof(__half) * hr.size(), cudaMemcpyDeviceToHost));
        CHECK(cudaMemcpy(hx.data(), x, sizeof(__half) * hx.size(), cudaMemcpyDeviceToHost));
        CHECK(cudaMemcpy(hq.data(), qpack, sizeof(uint32_t) * hq.size(), cudaMemcpyDeviceToHost));
        CHECK(cudaMemcpy(hsz.data(), sz, sizeof(__half2) * hsz.size(), cudaMemcpyDeviceToHost));
        const double cublas_f64 = sampled_error(hr, hq, hsz, hx, tokens, k, n);
        for (const Variant& v : variants) {
            const CUtensorMap map = x_tensor_map(x, tokens, k, v.tokens);  // outside the timed launches
            const auto fused = [&](int copy) { v.launch(problem(copy), map); };
            CHECK(cudaMemset(y, 0xFF, sizeof(__half) * hy.size()));  // NaN: an output never written shows
            fused(0);
            CHECK(cudaGetLastError());
            CHECK(cudaDeviceSynchronize());
            CHECK(cudaMemcpy(hy.data(), y, sizeof(__half) * hy.size(), cudaMemcpyDeviceToHost));
            double num = 0, den = 0;
            for (size_t i = 0; i < hy.size(); ++i) {
                const double a = __half2float(hy[i]), b = __half2float(hr[i]);
                num += (a - b) * (a - b), den += b * b;
            }
            const double vs_cublas = std::sqrt(num / std::max(den, 1e-30));
            const double fused_f64 = sampled_error(hy, hq, hsz, hx, tokens, k, n);
            const float t_hot = probe::median_us(fused), t_cold = probe::median_us(fused, kPackedCopies);
            const double flops = 2.0 * tokens * k * n;
            // fp16 outputs of a 4096-long fp32 sum: a few 1e-4 from float64.
            const bool right = fused_f64 < 1e-3 && vs_cublas < 1e-3;
            char shape_name[24], block[32];
            std::snprintf(shape_name, sizeof shape_name, "%d x %d x %d", tokens, k, n);
            std::snprintf(block, sizeof block, "%dx%d %ds %d/SM d%d%s", v.columns, v.tokens, v.stages, v.per_sm, v.depth,
                          v.persistent ? " P" : "");
            std::printf("%-20s %-19s %8.1f %8.1f %8.1f %8.1f %8.0f %8.1f %10.2e %10.2e %10.2e%s\n", shape_name, block, t_hot, t_cold, t_gemm_hot, t_gemm_cold, flops / t_cold / 1e6, t_deq, vs_cublas,
                        fused_f64, cublas_f64, right ? "" : "  WRONG");
        }
        CHECK(cudaFree(qpack));
        CHECK(cudaFree(sz));
        CHECK(cudaFree(x));
        CHECK(cudaFree(w));
        CHECK(cudaFree(y));
        CHECK(cudaFree(y_ref));
    }
    std::printf("block: output columns x rows of x a block, stages, blocks an SM, steps of A registers, P: persistent; times in us (CUDA events, median of 20 after\n"
                "warm-up): hot with one copy of the weights (L2-resident), cold cycling %d packed / %d fp16\n"
                "copies; cold TF: the fused kernel's TFLOP/s, cold; dequant: the probe's plain reference\n"
                "kernel (the library's is faster); errors: relative, fused against cuBLAS (every output) and\n"
                "each against float64 (1024 sampled)\n",
                kPackedCopies, kDenseCopies);
    CHECK(cublasDestroy(blas));
    return 0;
}
