// Probe of a fused GPTQ 4-bit dequantize + GEMM for prefill on sm_90a (wgmma),
// against what qattn's large-row path does today (dequantize to fp16, then
// cublasGemmEx). The question it answers: can one kernel that dequantizes the
// weights into wgmma's register operand reach cuBLAS's rate on the fp16 copy,
// so that the ~30 µs of dequantization in the P2k block go (the P2k target,
// docs/BENCHMARKS.md)? Not part of the library; a first design to measure.
//
// Y[t, n] = sum_k X[t, k] W[n, k], computed as its transpose per block: the
// warpgroup's A operand is 64 output columns (the weights, dequantized in
// registers from the decode GEMM's packing: a warp's 16 columns are two n-tiles,
// one uint4 a lane a chunk of 128 k, as in gptq_gemm_small.cu), B is 128 tokens
// of x (K-major in shared memory with the 128-byte swizzle); x and the packed
// weights travel by cp.async through four stages. The fp32 accumulator is
// 64 x 128 a warpgroup and column group. A block: two warpgroups of GROUPS x 64
// columns each, x 128 tokens; GROUPS 2 halves the x bytes a block reads from
// the L2 per FLOP (at 1, the L2 may bound it). Every chunk has one group (scale
// and zero per chunk and column), the common case; W = (q - z) * s rounded to
// fp16 as the dequantize kernel does, so both paths multiply the same weights.
//
// The reference dequantizes with the same nibble order into W [N, K] and runs
// cublasGemmEx; the probe prints the relative error of the fused result and the
// times (CUDA events, median of 20 after warm-up) of: fused, dequantize alone,
// cuBLAS alone, dequantize + cuBLAS, for Llama-3-8B's prefill shapes.
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
constexpr int kThreads = 256;

// A block: two warpgroups of GROUPS x 64 output columns each, x TOKENS tokens
// (wgmma's n). One stage, a chunk: x [TOKENS][128 k] fp16 as two 64-k atom
// columns, each TOKENS rows of 128 bytes, 16-byte pieces swizzled by row
// (piece ^ row % 8); then the block's packed weights of the chunk (its n-tiles'
// uint4 a lane, one contiguous range of qpack) and their (scale, zero) words;
// the whole rounded to 1024 bytes, the alignment of the swizzle's atoms.
// Stages are filled AHEAD chunks ahead, and there are AHEAD + 2 of them: the
// stage a chunk's loads overwrite was last read by the MMAs of two chunks
// before, which every warpgroup has waited for by the time it reaches the
// chunk's barrier, so no chunk ends by draining its MMAs (the first version,
// three stages a chunk ahead with a wait for all MMAs at each chunk's end, ran
// at 515 TFLOP/s against cuBLAS's 672). Four stages where they fit, else three.
template <int GROUPS, int TOKENS>
struct Tile {
    static constexpr int kColumns = 2 * GROUPS * 64;
    static constexpr int kAtomBytes = TOKENS * 128;
    static constexpr int kXBytes = 2 * kAtomBytes;
    static constexpr int kWeightBytes = kColumns / 8 * 32 * 16;
    static constexpr int kStageBytes = (kXBytes + kWeightBytes + kColumns * 4 + 1023) / 1024 * 1024;
    static constexpr int kStages = 4 * kStageBytes + 1024 <= 227 * 1024 ? 4 : 3;
    static constexpr int kAhead = kStages - 2;
    static constexpr int kSharedBytes = kStages * kStageBytes + 1024;  // + room to align
};

struct Problem {
    const uint4* qpack;         // [chunks][n_tiles][32 lanes]
    const __half2* scale_zero;  // [chunks][N]: (scale, 1024 + zero)
    const __half* x;            // [T][K]
    __half* y;                  // [T][N]
    int tokens, k, n;
};

__device__ __forceinline__ void cp_async16(uint32_t shared, const void* global) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(shared), "l"(global) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// The accumulators as operands of an empty asm: the compiler may not move
// them across it (they are being written by the asynchronous MMAs).
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

// D (64 x TOKENS fp32: this thread's TOKENS / 2) = A (64 x 16 fp16, from
// registers) x B (16 x TOKENS fp16, K-major in shared memory, by descriptor)
// + D if accumulate. Asynchronous: see wgmma_commit / wgmma_wait.
template <int TOKENS>
__device__ __forceinline__ void wgmma_rs(float (&d)[TOKENS / 2], const uint32_t (&a)[4], uint64_t desc_b,
                                         bool accumulate);
template <>
__device__ __forceinline__ void wgmma_rs<128>(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b,
                                             bool accumulate) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
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
template <>
__device__ __forceinline__ void wgmma_rs<256>(float (&d)[128], const uint32_t (&a)[4], uint64_t desc_b,
                                             bool accumulate) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %133, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
        "{%128, %129, %130, %131}, %132, p, 1, 1, 0;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
          "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
          "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
          "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
          "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
          "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
          "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
          "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
          "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(static_cast<int>(accumulate)));
}

// k16 step j of a chunk from a lane's word pair: a0 (column a, k 2t, 2t+1),
// a1 (column b), a2 (column a, k 2t+8, 2t+9), a3 (column b): the mma.m16n8k16 A
// fragment, which is a warp's part of wgmma's register A (rows 16 w .. 16 w + 15).
struct ColumnCodes {
    __half2 low, high, scale;  // -(1024 + z), -(64 + z), s
};
__device__ __forceinline__ ColumnCodes column_codes(__half2 scale_zero) {
    const __half2 z = __half2half2(__high2half(scale_zero));
    return {minus_low_offset(z), minus_high_offset(z), __half2half2(__low2half(scale_zero))};
}
__device__ __forceinline__ void dequantize_step(uint32_t (&a)[4], const uint32_t (&wa)[4], const uint32_t (&wb)[4],
                                                int j, const ColumnCodes& ca, const ColumnCodes& cb) {
    const uint32_t x = wa[j >> 1] >> ((j & 1) * 8), y = wb[j >> 1] >> ((j & 1) * 8);
    const __half2 a0 = __hmul2(low_nibbles_minus_zero(x, ca.low), ca.scale);
    const __half2 a1 = __hmul2(low_nibbles_minus_zero(y, cb.low), cb.scale);
    const __half2 a2 = __hmul2(high_nibbles_minus_zero(x, ca.high), ca.scale);
    const __half2 a3 = __hmul2(high_nibbles_minus_zero(y, cb.high), cb.scale);
    a[0] = *reinterpret_cast<const uint32_t*>(&a0);
    a[1] = *reinterpret_cast<const uint32_t*>(&a1);
    a[2] = *reinterpret_cast<const uint32_t*>(&a2);
    a[3] = *reinterpret_cast<const uint32_t*>(&a3);
}

// MMA_FIRST: a chunk's first step is issued before the loads of the chunk
// AHEAD chunks on, so that the tensor cores are not idle while they are issued.
template <int GROUPS, int TOKENS, bool MMA_FIRST>
__global__ void __launch_bounds__(kThreads, 1) fused_gptq4_gemm(Problem p) {
    using T = Tile<GROUPS, TOKENS>;
    constexpr int kBlockCols = T::kColumns, kStageBytes = T::kStageBytes, kStages = T::kStages, kAhead = T::kAhead;
    constexpr int kAtomBytes = T::kAtomBytes, kXBytes = T::kXBytes, kWeightBytes = T::kWeightBytes;
    constexpr int kBlockTokens = TOKENS;
    extern __shared__ unsigned char shared_raw[];
    const uint32_t base = (static_cast<uint32_t>(__cvta_generic_to_shared(shared_raw)) + 1023) & ~1023u;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int wg = warp >> 2, wq = warp & 3;
    const int chunks = p.k / kChunk, n_tiles = p.n / 8;
    const int token0 = blockIdx.y * kBlockTokens;
    const int tile0 = blockIdx.x * (kBlockCols / 8), column0 = tile0 * 8;
    // Column group u of this warp: the block's n-tiles local_a[u], local_a[u] + 1
    // (rows g and g + 8 of its 16), columns local_a[u] * 8 + g and + 8.
    int local_a[GROUPS];
#pragma unroll
    for (int u = 0; u < GROUPS; ++u) local_a[u] = (wg * GROUPS + u) * 8 + wq * 2;

    // x, the weights and their scales of a chunk, all by cp.async (the weights
    // two chunks ahead, like x, so their HBM latency is hidden too).
    const auto load_stage = [&](int chunk, int stage) {
        const uint32_t at = base + stage * kStageBytes;
#pragma unroll
        for (int i = tid; i < kBlockTokens * 16; i += kThreads) {
            const int r = i >> 4, c = i & 15;
            const uint32_t to = at + (c >> 3) * kAtomBytes + r * 128 + (((c & 7) ^ (r & 7)) << 4);
            cp_async16(to, p.x + static_cast<size_t>(token0 + r) * p.k + chunk * kChunk + c * 8);
        }
        const uint4* const w = p.qpack + (static_cast<size_t>(chunk) * n_tiles + tile0) * 32;
#pragma unroll
        for (int i = tid; i < kWeightBytes / 16; i += kThreads) cp_async16(at + kXBytes + i * 16, w + i);
        const __half2* const sz = p.scale_zero + static_cast<size_t>(chunk) * p.n + column0;
        for (int i = tid; i < kBlockCols / 4; i += kThreads)
            cp_async16(at + kXBytes + kWeightBytes + i * 16, sz + 4 * i);
    };

#pragma unroll
    for (int s = 0; s < kAhead; ++s) {
        if (s < chunks) load_stage(s, s);
        cp_async_commit();
    }
    // Not zeroed: the first MMA ignores them (its scale-d is 0). An instruction
    // that set them would reach the loop, where an MMA is in flight across the
    // back edge, and ptxas would then serialize every MMA.
    float d[GROUPS][TOKENS / 2];

    uint32_t a[2][GROUPS][4];
    const auto chunk_mmas = [&](int c) {
        cp_async_wait<kAhead - 1>();  // this thread's pieces of chunk c are in
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // visible to the MMAs' reads
        __syncthreads();  // everyone's; and every warpgroup's MMAs of chunk c - 2 are done with its stage
        const auto load_ahead = [&] {
            if (c + kAhead < chunks) load_stage(c + kAhead, (c + kAhead) % kStages);
            cp_async_commit();
        };
        if (!MMA_FIRST) load_ahead();
        const uint32_t stage = base + (c % kStages) * kStageBytes;
        const unsigned char* const stage_ptr = shared_raw + (stage - static_cast<uint32_t>(
                                                                          __cvta_generic_to_shared(shared_raw)));
        const uint4* const ws = reinterpret_cast<const uint4*>(stage_ptr + kXBytes);
        const __half2* const szs = reinterpret_cast<const __half2*>(stage_ptr + kXBytes + kWeightBytes);
        ColumnCodes ca[GROUPS], cb[GROUPS];
        uint32_t wa[GROUPS][4], wb[GROUPS][4];
#pragma unroll
        for (int u = 0; u < GROUPS; ++u) {
            const uint4 qa = ws[local_a[u] * 32 + lane], qb = ws[(local_a[u] + 1) * 32 + lane];
            ca[u] = column_codes(szs[local_a[u] * 8 + g]), cb[u] = column_codes(szs[local_a[u] * 8 + 8 + g]);
            wa[u][0] = qa.x, wa[u][1] = qa.y, wa[u][2] = qa.z, wa[u][3] = qa.w;
            wb[u][0] = qb.x, wb[u][1] = qb.y, wb[u][2] = qb.z, wb[u][3] = qb.w;
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) {
#pragma unroll
            for (int u = 0; u < GROUPS; ++u) dequantize_step(a[j & 1][u], wa[u], wb[u], j, ca[u], cb[u]);
            wgmma_fence();
            const uint64_t desc = smem_desc(stage + (j >> 2) * kAtomBytes + (j & 3) * 32);
#pragma unroll
            for (int u = 0; u < GROUPS; ++u) wgmma_rs<TOKENS>(d[u], a[j & 1][u], desc, c > 0 || j > 0);
            wgmma_commit();
            if (MMA_FIRST && j == 0) load_ahead();
            wgmma_wait<1>();  // the step before, which read a[(j + 1) & 1], is done
            // Its A registers stay live until here, so the compiler cannot give
            // them to another value while that MMA might still read them.
#pragma unroll
            for (int u = 0; u < GROUPS; ++u) pin(a[(j + 1) & 1][u]);
        }
    };
    // The last chunk outside the loop: with the wait for all MMAs after a loop
    // that ends with one in flight, ptxas moved the accumulators' conversions
    // above that wait (the first run of this version: 4e-2 error).
    for (int c = 0; c < chunks - 1; ++c) chunk_mmas(c);
    chunk_mmas(chunks - 1);
    wgmma_wait<0>();
#pragma unroll
    for (int u = 0; u < GROUPS; ++u) pin(d[u]);
    cp_async_wait<0>();
    __syncthreads();  // every MMA's and copy's use of the stages is over: the tile goes there

    // d[u][4 i + e]: rows g (e < 2: column a) or g + 8 (column b) of group u,
    // tokens 8 i + 2 t + (e & 1). Through shared memory, so that y is written
    // in whole 16-byte pieces of a token's row (rows padded by 16 bytes: the
    // four t of a store fall in different banks).
    constexpr int kRowHalves = kBlockCols + 8;
    __half* const tile = reinterpret_cast<__half*>(shared_raw + (base - static_cast<uint32_t>(
                                                                         __cvta_generic_to_shared(shared_raw))));
#pragma unroll
    for (int u = 0; u < GROUPS; ++u)
#pragma unroll
        for (int i = 0; i < TOKENS / 8; ++i) {
            const int token = 8 * i + 2 * t, column_a = local_a[u] * 8 + g, column_b = column_a + 8;
            tile[token * kRowHalves + column_a] = __float2half(d[u][4 * i]);
            tile[(token + 1) * kRowHalves + column_a] = __float2half(d[u][4 * i + 1]);
            tile[token * kRowHalves + column_b] = __float2half(d[u][4 * i + 2]);
            tile[(token + 1) * kRowHalves + column_b] = __float2half(d[u][4 * i + 3]);
        }
    __syncthreads();
    constexpr int kPiecesARow = kBlockCols / 8;
    for (int i = tid; i < kBlockTokens * kPiecesARow; i += kThreads) {
        const int r = i / kPiecesARow, c = i % kPiecesARow;
        *reinterpret_cast<uint4*>(p.y + static_cast<size_t>(token0 + r) * p.n + column0 + c * 8) =
            *reinterpret_cast<const uint4*>(tile + r * kRowHalves + c * 8);
    }
}

// The same tile with its stages filled by TMA: x from a tensor map with the
// 128-byte swizzle, the weights and their scales as bulk copies, each stage's
// arrival counted by an mbarrier (full), each stage's release by another
// (empty: one arrive a consumer warpgroup). One thread issues the copies, a
// handful of instructions a chunk, so the warps' own stream is the
// dequantization and the MMAs, with no block barrier in the loop. (A ninth,
// producer-only warp would cap every thread at 168 registers: the three warps
// on one scheduler share its 16 K.) At chunk c, every warpgroup's MMAs of
// chunk c - 1 are done (it is at c's last step), so it frees that stage; the
// copying thread refills the stage of chunk c - 2, which both warpgroups freed
// a chunk earlier, with chunk c + STAGES - 2.
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
        "wait:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra wait;\n"
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

template <int GROUPS>
__global__ void __launch_bounds__(kThreads, 1) fused_gptq4_gemm_tma(Problem p, const __grid_constant__ CUtensorMap x_map) {
    using T = Tile<GROUPS, 128>;
    constexpr int kBlockCols = T::kColumns, kStageBytes = T::kStageBytes, kStages = T::kStages;
    constexpr int kAtomBytes = T::kAtomBytes, kXBytes = T::kXBytes, kWeightBytes = T::kWeightBytes;
    constexpr int kBlockTokens = 128;
    extern __shared__ unsigned char shared_raw[];
    __shared__ __align__(8) uint64_t full[kStages], empty[kStages];
    const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(shared_raw));
    const uint32_t base = (raw + 1023) & ~1023u;
    const uint32_t full0 = static_cast<uint32_t>(__cvta_generic_to_shared(full));
    const uint32_t empty0 = static_cast<uint32_t>(__cvta_generic_to_shared(empty));
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int chunks = p.k / kChunk, n_tiles = p.n / 8;
    const int token0 = blockIdx.y * kBlockTokens;
    const int tile0 = blockIdx.x * (kBlockCols / 8), column0 = tile0 * 8;
    const auto fill = [&](int chunk) {
        const int s = chunk % kStages;
        const uint32_t at = base + s * kStageBytes, bar = full0 + 8 * s;
        mbar_expect_tx(bar, kXBytes + kWeightBytes + kBlockCols * 4);
        tma_load_2d(at, &x_map, chunk * kChunk, token0, bar);
        tma_load_2d(at + kAtomBytes, &x_map, chunk * kChunk + 64, token0, bar);
        bulk_load(at + kXBytes, p.qpack + (static_cast<size_t>(chunk) * n_tiles + tile0) * 32, kWeightBytes, bar);
        bulk_load(at + kXBytes + kWeightBytes, p.scale_zero + static_cast<size_t>(chunk) * p.n + column0,
                  kBlockCols * 4, bar);
    };
    if (tid == 0) {
        for (int s = 0; s < kStages; ++s) mbar_init(full0 + 8 * s, 1), mbar_init(empty0 + 8 * s, 2);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        for (int c = 0; c < kStages && c < chunks; ++c) fill(c);
    }
    __syncthreads();

    const int wg = warp >> 2, wq = warp & 3;
    int local_a[GROUPS];
#pragma unroll
    for (int u = 0; u < GROUPS; ++u) local_a[u] = (wg * GROUPS + u) * 8 + wq * 2;
    float d[GROUPS][64];  // not zeroed: the first MMA's scale-d is 0 (see fused_gptq4_gemm)
    uint32_t a[2][GROUPS][4];
    const auto chunk_mmas = [&](int c) {
        const int s = c % kStages;
        mbar_wait(full0 + 8 * s, (c / kStages) & 1);
        const uint32_t stage = base + s * kStageBytes;
        const unsigned char* const stage_ptr = shared_raw + (stage - raw);
        const uint4* const ws = reinterpret_cast<const uint4*>(stage_ptr + kXBytes);
        const __half2* const szs = reinterpret_cast<const __half2*>(stage_ptr + kXBytes + kWeightBytes);
        ColumnCodes ca[GROUPS], cb[GROUPS];
        uint32_t wa[GROUPS][4], wb[GROUPS][4];
#pragma unroll
        for (int u = 0; u < GROUPS; ++u) {
            const uint4 qa = ws[local_a[u] * 32 + lane], qb = ws[(local_a[u] + 1) * 32 + lane];
            ca[u] = column_codes(szs[local_a[u] * 8 + g]), cb[u] = column_codes(szs[local_a[u] * 8 + 8 + g]);
            wa[u][0] = qa.x, wa[u][1] = qa.y, wa[u][2] = qa.z, wa[u][3] = qa.w;
            wb[u][0] = qb.x, wb[u][1] = qb.y, wb[u][2] = qb.z, wb[u][3] = qb.w;
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) {
#pragma unroll
            for (int u = 0; u < GROUPS; ++u) dequantize_step(a[j & 1][u], wa[u], wb[u], j, ca[u], cb[u]);
            wgmma_fence();
            const uint64_t desc = smem_desc(stage + (j >> 2) * kAtomBytes + (j & 3) * 32);
#pragma unroll
            for (int u = 0; u < GROUPS; ++u) wgmma_rs<128>(d[u], a[j & 1][u], desc, c > 0 || j > 0);
            wgmma_commit();
            wgmma_wait<1>();
#pragma unroll
            for (int u = 0; u < GROUPS; ++u) pin(a[(j + 1) & 1][u]);
        }
        // (Here, not after the first step: an arrive there, its address
        // computed inside an MMA's window, made ptxas serialize the MMAs.)
        if (c > 0 && (tid & 127) == 0) mbar_arrive(empty0 + 8 * ((c + kStages - 1) % kStages));
        if (tid == 0 && c >= 2 && c + kStages - 2 < chunks) {
            mbar_wait(empty0 + 8 * ((c - 2) % kStages), ((c - 2) / kStages) & 1);
            fill(c + kStages - 2);
        }
    };
    for (int c = 0; c < chunks - 1; ++c) chunk_mmas(c);
    chunk_mmas(chunks - 1);
    wgmma_wait<0>();
#pragma unroll
    for (int u = 0; u < GROUPS; ++u) pin(d[u]);
    __syncthreads();  // every chunk has arrived and been multiplied: the stages are free for the tile
    constexpr int kRowHalves = kBlockCols + 8;
    __half* const tile = reinterpret_cast<__half*>(shared_raw + (base - raw));
#pragma unroll
    for (int u = 0; u < GROUPS; ++u)
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const int token = 8 * i + 2 * t, column_a = local_a[u] * 8 + g, column_b = column_a + 8;
            tile[token * kRowHalves + column_a] = __float2half(d[u][4 * i]);
            tile[(token + 1) * kRowHalves + column_a] = __float2half(d[u][4 * i + 1]);
            tile[token * kRowHalves + column_b] = __float2half(d[u][4 * i + 2]);
            tile[(token + 1) * kRowHalves + column_b] = __float2half(d[u][4 * i + 3]);
        }
    __syncthreads();
    constexpr int kPiecesARow = kBlockCols / 8;
    for (int i = tid; i < kBlockTokens * kPiecesARow; i += kThreads) {
        const int r = i / kPiecesARow, c = i % kPiecesARow;
        *reinterpret_cast<uint4*>(p.y + static_cast<size_t>(token0 + r) * p.n + column0 + c * 8) =
            *reinterpret_cast<const uint4*>(tile + r * kRowHalves + c * 8);
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
    const uint32_t wa[4] = {qa.x, qa.y, qa.z, qa.w}, wb[4] = {qb.x, qb.y, qb.z, qb.w};
    for (int j = 0; j < 8; ++j) {
        uint32_t a[4];
        dequantize_step(a, wa, wb, j, ca, cb);
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

// The kernels timed: (columns x tokens a block, whether a chunk's first MMA
// goes before its loads ahead).
struct Variant {
    const char* name;
    int columns, tokens;
    void (*launch)(const Problem&);
};
template <int GROUPS, int TOKENS, bool MMA_FIRST>
void launch(const Problem& p) {
    using T = Tile<GROUPS, TOKENS>;
    const dim3 grid(p.n / T::kColumns, p.tokens / TOKENS);
    fused_gptq4_gemm<GROUPS, TOKENS, MMA_FIRST><<<grid, kThreads, T::kSharedBytes>>>(p);
}
template <int GROUPS, int TOKENS, bool MMA_FIRST>
Variant variant(const char* name) {
    CHECK(cudaFuncSetAttribute(fused_gptq4_gemm<GROUPS, TOKENS, MMA_FIRST>,
                               cudaFuncAttributeMaxDynamicSharedMemorySize, Tile<GROUPS, TOKENS>::kSharedBytes));
    return {name, Tile<GROUPS, TOKENS>::kColumns, TOKENS, launch<GROUPS, TOKENS, MMA_FIRST>};
}

// x [T][K] as TMA sees it: boxes of 64 k x 128 tokens, 128-byte swizzle.
CUtensorMap x_tensor_map(const Problem& p) {
    static PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;
    if (!encode) {
        cudaDriverEntryPointQueryResult found;
        CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", reinterpret_cast<void**>(&encode), 12000,
                                               cudaEnableDefault, &found));
        CHECK(found != cudaDriverEntryPointSuccess);
    }
    CUtensorMap map;
    const cuuint64_t dims[2] = {cuuint64_t(p.k), cuuint64_t(p.tokens)};
    const cuuint64_t strides[1] = {cuuint64_t(p.k) * sizeof(__half)};
    const cuuint32_t box[2] = {64, 128}, element_strides[2] = {1, 1};
    CHECK(encode(&map, CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2, const_cast<__half*>(p.x), dims, strides, box,
                 element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                 CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE));
    return map;
}
template <int GROUPS>
void launch_tma(const Problem& p) {
    static const __half* encoded_for = nullptr;
    static CUtensorMap map;
    if (encoded_for != p.x) map = x_tensor_map(p), encoded_for = p.x;  // once a problem, outside the timed launches
    using T = Tile<GROUPS, 128>;
    const dim3 grid(p.n / T::kColumns, p.tokens / 128);
    fused_gptq4_gemm_tma<GROUPS><<<grid, kThreads, T::kSharedBytes>>>(p, map);
}
template <int GROUPS>
Variant variant_tma(const char* name) {
    CHECK(cudaFuncSetAttribute(fused_gptq4_gemm_tma<GROUPS>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               Tile<GROUPS, 128>::kSharedBytes));
    return {name, Tile<GROUPS, 128>::kColumns, 128, launch_tma<GROUPS>};
}

}  // namespace

int main() {
    cudaDeviceProp prop{};
    CHECK(cudaGetDeviceProperties(&prop, 0));
    std::printf("card %s, %d SMs\n", prop.name, prop.multiProcessorCount);
    const Variant variants[] = {
        variant<2, 128, false>("cp.async"),
        variant_tma<2>("TMA"),
        variant_tma<1>("TMA"),
    };
    cublasHandle_t blas;
    CHECK(cublasCreate(&blas));
    const int tokens = 2048, k = 4096;
    std::printf("%-22s %-8s %-12s %9s %9s %9s %10s %9s %10s %10s %10s\n", "T x K x N", "block", "order", "fused", "dequant",
                "cuBLAS", "deq+cuBLAS", "fused TF", "vs cuBLAS", "fused f64", "cuBLAS f64");
    for (int n : {4096, 6144, 2048}) {
        const int chunks = k / kChunk, n_tiles = n / 8;
        uint4* qpack;
        __half2* sz;
        __half *x, *w, *y, *y_ref;
        CHECK(cudaMalloc(&qpack, sizeof(uint4) * chunks * n_tiles * 32));
        CHECK(cudaMalloc(&sz, sizeof(__half2) * chunks * n));
        CHECK(cudaMalloc(&x, sizeof(__half) * tokens * k));
        CHECK(cudaMalloc(&w, sizeof(__half) * size_t(n) * k));
        CHECK(cudaMalloc(&y, sizeof(__half) * tokens * n));
        CHECK(cudaMalloc(&y_ref, sizeof(__half) * tokens * n));
        fill_weights<<<1024, 256>>>(reinterpret_cast<uint32_t*>(qpack), size_t(chunks) * n_tiles * 32 * 4, sz,
                                    size_t(chunks) * n, 7u + n);
        probe::fill_random<<<1024, 256>>>(x, size_t(tokens) * k, 11u);
        CHECK(cudaGetLastError());
        const Problem p{qpack, sz, x, y, tokens, k, n};
        const int pairs = chunks * n_tiles / 2;
        const auto dequant = [&] { dequantize_reference<<<(pairs + 7) / 8, 256>>>(p, w); };
        const float one = 1.0f, zero = 0.0f;
        const auto gemm = [&] {
            CHECK(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, n, tokens, k, &one, w, CUDA_R_16F, k, x, CUDA_R_16F,
                               k, &zero, y_ref, CUDA_R_16F, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        };
        dequant();
        gemm();
        CHECK(cudaGetLastError());
        const float t_deq = probe::median_us([&](int) { dequant(); }), t_gemm = probe::median_us([&](int) { gemm(); });
        const float t_both = probe::median_us([&](int) { dequant(), gemm(); });
        std::vector<__half> hy(size_t(tokens) * n), hr(size_t(tokens) * n), hx(size_t(tokens) * k);
        std::vector<uint32_t> hq(size_t(chunks) * n_tiles * 32 * 4);
        std::vector<__half2> hsz(size_t(chunks) * n);
        CHECK(cudaMemcpy(hr.data(), y_ref, sizeof(__half) * hr.size(), cudaMemcpyDeviceToHost));
        CHECK(cudaMemcpy(hx.data(), x, sizeof(__half) * hx.size(), cudaMemcpyDeviceToHost));
        CHECK(cudaMemcpy(hq.data(), qpack, sizeof(uint32_t) * hq.size(), cudaMemcpyDeviceToHost));
        CHECK(cudaMemcpy(hsz.data(), sz, sizeof(__half2) * hsz.size(), cudaMemcpyDeviceToHost));
        const double cublas_f64 = sampled_error(hr, hq, hsz, hx, tokens, k, n);
        for (const Variant& v : variants) {
            const auto fused = [&] { v.launch(p); };
            CHECK(cudaMemset(y, 0xFF, sizeof(__half) * hy.size()));  // NaN: an output never written shows
            fused();
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
            const float t_fused = probe::median_us([&](int) { fused(); });
            const double flops = 2.0 * tokens * k * n;
            // fp16 outputs of a 4096-long fp32 sum: a few 1e-4 from float64.
            const bool right = fused_f64 < 1e-3 && vs_cublas < 1e-3;
            char block[16];
            std::snprintf(block, sizeof block, "%dx%d", v.columns, v.tokens);
            std::printf("%4d x %4d x %-10d %-8s %-12s %9.1f %9.1f %9.1f %10.1f %9.0f %10.2e %10.2e %10.2e%s\n", tokens,
                        k, n, block, v.name, t_fused, t_deq, t_gemm, t_both, flops / t_fused / 1e6, vs_cublas, fused_f64,
                        cublas_f64, right ? "" : "  WRONG");
        }
        CHECK(cudaFree(qpack));
        CHECK(cudaFree(sz));
        CHECK(cudaFree(x));
        CHECK(cudaFree(w));
        CHECK(cudaFree(y));
        CHECK(cudaFree(y_ref));
    }
    std::printf("block: output columns x tokens a block; order: a chunk's first MMA before or after the loads\n"
                "ahead; times in us (CUDA events, median of 20\n"
                "after warm-up; the packed weights and x fit the L2, for both paths alike); TF: fused TFLOP/s;\n"
                "errors: relative, fused against cuBLAS (every output) and each against float64 (1024 sampled)\n");
    CHECK(cublasDestroy(blas));
    return 0;
}
