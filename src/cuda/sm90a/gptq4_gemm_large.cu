// The large-row GEMM of packed GPTQ 4-bit matrices on Hopper (sm_90a): the
// weights are dequantized in registers straight into the A operand of wgmma,
// so no fp16 copy of them is written and read back (what dequantize.cu +
// cuBLAS cost: the P2k dequantizations, docs/GPU_NOTES.md).
//
// out[r, n] = sum_j x[r, j] W[j, n] over the packed rows j, computed per tile
// as its transpose: a tile is 256 output columns (two warpgroups of two
// 64-column groups; a warp's 16 columns a group are two n-tiles of the decode
// GEMM's packing, one uint4 a lane a chunk) x 128 rows of x (wgmma's n).
// Persistent and warp-specialized: one block an SM walks the tiles (row tile
// major, so the blocks at work at once share x and the weights in the L2). Its
// first warpgroup copies: one thread puts each 128-row chunk into one of four
// shared-memory stages, x by TMA from a tensor map with the 128-byte swizzle
// (the K-major layout wgmma's B descriptor reads), the packed weights and their
// scales as bulk copies, counted by a "full" mbarrier; it runs on through the
// stages into the next tile while the other two warpgroups finish this one, so
// only a block's first tile waits for its copies. Those two multiply (their
// registers raised by setmaxnreg to 232, the copier's lowered to 40) and
// release each stage on its "empty" mbarrier. The epilogue writes out from the
// accumulators (a pair of columns a lane: lanes g and g ^ 1 swap one value),
// as the stages are refilled meanwhile. scripts/wgmma_probe.cu measured the
// variants: on the H200 this one runs as fast as cuBLAS on the fp16 weights at
// N 4096 and faster at 2048 and 6144; one block a tile without a copying
// warpgroup ran 6-12% slower in its main loop and idled over its prologue and
// epilogue. Chunks must hold one group each (the chunk scales; group size a
// multiple of 128 in packed order).
//
// Compiled for sm_90a only (wgmma is an architecture-specific feature), in a
// target of its own so that no other cubin holds these kernels.
#include "cuda/check.h"
#include "cuda/gptq4_nibbles.cuh"
#include "cuda/kernels.h"

#include <cuda.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>

namespace qattn::cuda {
namespace {

constexpr int kThreads = 384;  // the copying warpgroup, then the two multiplying ones
constexpr int kColumns = 256;  // a tile's output columns
constexpr int kTokens = 128;   // a tile's rows of x
constexpr int kStages = 4;
constexpr int kAtomBytes = kTokens * 128;  // 64 k of x: 128 rows of 128 bytes
constexpr int kXBytes = 2 * kAtomBytes;
constexpr int kWeightBytes = kColumns / 8 * 32 * 16;
constexpr int kScaleBytes = kColumns * 4;
constexpr int kStageBytes = (kXBytes + kWeightBytes + kScaleBytes + 1023) / 1024 * 1024;  // atoms 1024-aligned
constexpr int kSharedBytes = kStages * kStageBytes + 1024;  // + room to align

struct Batch {
    CUtensorMap x[kMaxLargeGemmProblems];  // [rows][packed rows] fp16, boxes of 64 x 128
    Gptq4GemmLargeProblem problem[kMaxLargeGemmProblems];
    int block_begin[kMaxLargeGemmProblems + 1];  // first column block of each problem
    int count, rows, ldc, column_blocks, tiles;
    bool out_fp32, accumulate;
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
__device__ __forceinline__ void l2_prefetch(const void* from, int bytes) {
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(from), "r"(bytes) : "memory");
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

// D (64 x 128 fp32: this thread's 64) = A (64 x 16 fp16, registers) x B (16 x
// 128 fp16, shared memory by descriptor) + D if accumulate. Asynchronous.
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b,
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
// k16 step j of a chunk, from a lane's packed words of its two columns a, b:
// the mma.m16n8k16 A fragment (a0 column a, k 2t, 2t + 1; a1 column b; a2, a3
// the same at k + 8), which is this warp's rows of wgmma's register A. The
// arithmetic is the dequantize kernel's: both paths multiply the same weights.
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

// Tile `tile`'s problem, its first column and its first row.
struct TilePlace {
    int which, column0, row0;
};
__device__ __forceinline__ TilePlace place_of(const Batch& batch, int tile) {
    const int column_block = tile % batch.column_blocks;
    int which = 0;
    for (int i = 1; i < batch.count; ++i) which += column_block >= batch.block_begin[i];
    return {which, (column_block - batch.block_begin[which]) * kColumns, (tile / batch.column_blocks) * kTokens};
}

// Two adjacent outputs, fp32 or fp16 in memory, fp32 in registers.
__device__ __forceinline__ float2 load_pair(const float* at) { return *reinterpret_cast<const float2*>(at); }
__device__ __forceinline__ float2 load_pair(const __half* at) {
    return __half22float2(*reinterpret_cast<const __half2*>(at));
}
__device__ __forceinline__ void store_pair(float* at, float2 v) { *reinterpret_cast<float2*>(at) = v; }
__device__ __forceinline__ void store_pair(__half* at, float2 v) {
    *reinterpret_cast<__half2*>(at) = __floats2half2_rn(v.x, v.y);  // an fp32 sum rounded once, as cuBLAS's beta = 1
}

// d[u][4 i + e]: column local[u] * 8 + g (e < 2) or + 8, row 8 i + 2 t + (e & 1).
// Lanes g and g ^ 1 (lane ^ 4) swap one value, so that lane g writes row 2t (g
// even) or 2t + 1 (g odd) of columns g & ~1 and g | 1 as one pair. Accumulating,
// a batch's loads are all issued before its stores: with a store (which may
// alias) between one load and the next, each load waited a whole trip to the L2,
// and O's epilogue took longer than cuBLAS's whole margin.
template <typename T>
__device__ __forceinline__ void epilogue_pairs(const float (&d)[2][64], const int (&local)[2], T* out, int ldc,
                                               int rows_left, bool accumulate) {
    constexpr int kBatch = 8;  // pairs: four rows of x, both halves of a column group
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const bool even = (g & 1) == 0;
#pragma unroll
    for (int u = 0; u < 2; ++u)
#pragma unroll
        for (int i0 = 0; i0 < 16; i0 += kBatch / 2) {
            float2 v[kBatch];
            T* at[kBatch];
            bool live[kBatch];
#pragma unroll
            for (int b = 0; b < kBatch; ++b) {
                const int i = i0 + b / 2, h = b % 2;
                const float mine0 = d[u][4 * i + 2 * h], mine1 = d[u][4 * i + 2 * h + 1];
                const float theirs = __shfl_xor_sync(0xFFFFFFFFu, even ? mine1 : mine0, 4);
                const int row = 8 * i + 2 * t + (even ? 0 : 1);
                v[b] = even ? make_float2(mine0, theirs) : make_float2(theirs, mine1);
                at[b] = out + static_cast<size_t>(row) * ldc + local[u] * 8 + (g & ~1) + 8 * h;
                live[b] = row < rows_left;
            }
            if (accumulate) {
                float2 old[kBatch];
#pragma unroll
                for (int b = 0; b < kBatch; ++b) old[b] = live[b] ? load_pair(at[b]) : make_float2(0.0f, 0.0f);
#pragma unroll
                for (int b = 0; b < kBatch; ++b) v[b].x += old[b].x, v[b].y += old[b].y;
            }
#pragma unroll
            for (int b = 0; b < kBatch; ++b)
                if (live[b]) store_pair(at[b], v[b]);
        }
}

__global__ void __launch_bounds__(kThreads, 1) gptq4_gemm_large_kernel(const __grid_constant__ Batch batch) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ unsigned char shared_raw[];
    __shared__ __align__(8) uint64_t full[kStages], empty[kStages];
    const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(shared_raw));
    const uint32_t base = (raw + 1023) & ~1023u;
    const uint32_t full0 = static_cast<uint32_t>(__cvta_generic_to_shared(full));
    const uint32_t empty0 = static_cast<uint32_t>(__cvta_generic_to_shared(empty));
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2;
    if (tid == 0) {
        for (int s = 0; s < kStages; ++s) mbar_init(full0 + 8 * s, 1), mbar_init(empty0 + 8 * s, 2);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();  // the last block-wide barrier: the copier's other threads leave below

    if (warp < 4) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
        if (tid != 0) return;
        int q = 0;  // the chunk's number in this block's sequence
        for (int tile = blockIdx.x; tile < batch.tiles; tile += gridDim.x) {
            const TilePlace at = place_of(batch, tile);
            const Gptq4GemmLargeProblem& pr = batch.problem[at.which];
            const int n_tiles = pr.n / 8, tile0 = at.column0 / 8;
            for (int c = 0; c < pr.w.chunks; ++c, ++q) {
                const int s = q % kStages;
                // The consumers' release of chunk q - kStages is the empty
                // barrier's (q / kStages - 1)-th completion.
                if (q >= kStages) mbar_wait(empty0 + 8 * s, (q / kStages - 1) & 1);
                const uint32_t stage = base + s * kStageBytes, bar = full0 + 8 * s;
                mbar_expect_tx(bar, kXBytes + kWeightBytes + kScaleBytes);
                tma_load_2d(stage, &batch.x[at.which], c * 128, at.row0, bar);  // rows past the last read as zeros
                tma_load_2d(stage + kAtomBytes, &batch.x[at.which], c * 128 + 64, at.row0, bar);
                bulk_load(stage + kXBytes, pr.w.qpack + (static_cast<size_t>(c) * n_tiles + tile0) * 32, kWeightBytes,
                          bar);
                bulk_load(stage + kXBytes + kWeightBytes, pr.w.chunk_scale_zero + static_cast<size_t>(c) * pr.n + at.column0,
                          kScaleBytes, bar);
            }
            // The rows this tile adds into reach the L2 while its last chunks
            // are multiplied, not during its epilogue.
            if (batch.accumulate) {
                const size_t element = batch.out_fp32 ? sizeof(float) : sizeof(__half);
                const unsigned char* const out = static_cast<const unsigned char*>(pr.out);
                for (int r = at.row0; r < min(at.row0 + kTokens, batch.rows); ++r)
                    l2_prefetch(out + (static_cast<size_t>(r) * batch.ldc + at.column0) * element,
                                static_cast<int>(kColumns * element));
            }
        }
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");

    // Column group u of this warp: n-tiles local[u], local[u] + 1 of the tile
    // (rows g and g + 8 of the warp's 16 in wgmma's A).
    const int wg = (warp >> 2) - 1, wq = warp & 3, wg_thread = tid & 127;
    int local[2];
#pragma unroll
    for (int u = 0; u < 2; ++u) local[u] = (wg * 2 + u) * 8 + wq * 2;
    // Not zeroed: a tile's first MMA has scale-d 0. An instruction that set them
    // would reach the chunk loop, where an MMA is in flight across the back
    // edge, and ptxas would then serialize every MMA.
    float d[2][64];
    uint32_t a[2][2][4];  // [step parity][group]: a step's registers stay untouched until its MMA is done
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
            for (int u = 0; u < 2; ++u) wgmma_m64n128k16(d[u], a[j & 1][u], desc, c > 0 || j > 0);
            wgmma_commit();
            wgmma_wait<1>();  // the step before, which read a[(j + 1) & 1], is done
#pragma unroll
            for (int u = 0; u < 2; ++u) pin(a[(j + 1) & 1][u]);
        }
        // This warpgroup's MMAs of chunk q - 1 are done: its stage may be
        // refilled. (Here, not after the chunk's first step: an arrive there,
        // its address computed inside an MMA's window, made ptxas serialize the
        // MMAs.)
        if (c > 0 && wg_thread == 0) mbar_arrive(empty0 + 8 * ((q + kStages - 1) % kStages));
    };
    int q = 0;
    for (int tile = blockIdx.x; tile < batch.tiles; tile += gridDim.x) {
        const TilePlace at = place_of(batch, tile);
        const Gptq4GemmLargeProblem& pr = batch.problem[at.which];
        const int chunks = pr.w.chunks;
        // The last chunk outside the loop: with the wait for every MMA after a
        // loop that ends with one in flight, ptxas moved the reads of the
        // accumulators above that wait (scripts/wgmma_probe.cu's second version).
        for (int c = 0; c < chunks - 1; ++c) chunk_mmas(c, q + c);
        chunk_mmas(chunks - 1, q + chunks - 1);
        wgmma_wait<0>();
#pragma unroll
        for (int u = 0; u < 2; ++u) pin(d[u]);
        q += chunks;
        if (wg_thread == 0) mbar_arrive(empty0 + 8 * ((q + kStages - 1) % kStages));
        const int rows_left = batch.rows - at.row0;
        const size_t corner = static_cast<size_t>(at.row0) * batch.ldc + at.column0;
        if (batch.out_fp32)
            epilogue_pairs(d, local, static_cast<float*>(pr.out) + corner, batch.ldc, rows_left, batch.accumulate);
        else
            epilogue_pairs(d, local, static_cast<__half*>(pr.out) + corner, batch.ldc, rows_left, batch.accumulate);
    }
#endif
}

PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
    static PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;
    static std::once_flag once;
    std::call_once(once, [] {
        void* fn = nullptr;
        cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) ==
                cudaSuccess &&
            found == cudaDriverEntryPointSuccess)
            encode = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
    });
    return encode;
}

}  // namespace

bool gptq4_gemm_large_available(int device) {
    // QATTN_CUDA_WGMMA=0 in the environment (read once) keeps dequantize +
    // cuBLAS, to compare the two paths.
    static const bool disabled = [] {
        const char* v = std::getenv("QATTN_CUDA_WGMMA");
        return v && v[0] == '0' && v[1] == 0;
    }();
    if (disabled) return false;
    int major = 0, minor = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess)
        return false;
    cudaFuncAttributes attributes;
    return major == 9 && minor == 0 && tensor_map_encoder() != nullptr &&
           cudaFuncGetAttributes(&attributes, gptq4_gemm_large_kernel) == cudaSuccess;
}

bool gptq4_gemm_large_fits(const Gptq4GemmLargeProblem& p) {
    return p.n % kColumns == 0 && p.ldx % 8 == 0 && is_aligned(p.x, 16) && is_aligned(p.out, 16);
}

qattn_status launch_gptq4_gemm_large(const Gptq4GemmLargeProblem* problems, int count, int rows, bool out_fp32,
                                     int ldc, bool accumulate, cudaStream_t stream) {
    if (count < 1 || count > kMaxLargeGemmProblems || rows < 1 || ldc % 8 != 0)
        return fail(QATTN_ERROR_INTERNAL, "gptq4_gemm_large: %d problems, %d rows, ldc %d", count, rows, ldc);
    const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
    if (!encode) return fail(QATTN_ERROR_CUDA, "gptq4_gemm_large: cuTensorMapEncodeTiled not found in the driver");
    static std::once_flag attribute_once;
    static cudaError_t attribute_status = cudaSuccess;
    std::call_once(attribute_once, [] {
        attribute_status = cudaFuncSetAttribute(gptq4_gemm_large_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                kSharedBytes);
    });
    QATTN_CUDA_TRY(attribute_status);
    Batch batch{};
    batch.count = count, batch.rows = rows, batch.ldc = ldc;
    batch.out_fp32 = out_fp32, batch.accumulate = accumulate;
    int blocks = 0;
    for (int i = 0; i < count; ++i) {
        const Gptq4GemmLargeProblem& p = problems[i];
        batch.problem[i] = p;
        batch.block_begin[i] = blocks;
        blocks += p.n / kColumns;
        const cuuint64_t dims[2] = {cuuint64_t(p.w.chunks) * 128, cuuint64_t(rows)};
        const cuuint64_t strides[1] = {cuuint64_t(p.ldx) * sizeof(__half)};
        const cuuint32_t box[2] = {64, kTokens}, element_strides[2] = {1, 1};
        const CUresult encoded =
            encode(&batch.x[i], CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2, const_cast<__half*>(p.x), dims, strides, box,
                   element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                   CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
        if (encoded != CUDA_SUCCESS)
            return fail(QATTN_ERROR_CUDA, "gptq4_gemm_large: cuTensorMapEncodeTiled failed (%d)", int(encoded));
    }
    batch.block_begin[count] = blocks;
    batch.column_blocks = blocks;
    batch.tiles = blocks * ((rows + kTokens - 1) / kTokens);
    int device = 0, sms = 0;
    QATTN_CUDA_TRY(cudaGetDevice(&device));
    QATTN_CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    gptq4_gemm_large_kernel<<<std::min(batch.tiles, sms), kThreads, kSharedBytes, stream>>>(batch);
    QATTN_LAUNCH_CHECK("gptq4_gemm_large");
    return QATTN_SUCCESS;
}

}  // namespace qattn::cuda
