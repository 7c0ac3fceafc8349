// The large-row GEMM of packed GPTQ 4-bit matrices on Hopper (sm_90a): the
// weights are dequantized in registers straight into the A operand of wgmma,
// so no fp16 copy of them is written and read back (what dequantize.cu +
// cuBLAS cost: the P2k dequantizations, docs/GPU_NOTES.md).
//
// out[r, n] = sum_j x[r, j] W[j, n] over the packed rows j, computed per block
// as its transpose: a block owns 256 output columns (two warpgroups of two
// 64-column groups; a warp's 16 columns a group are two n-tiles of the decode
// GEMM's packing, one uint4 a lane a chunk) x 128 rows of x (wgmma's n). Each
// 128-row chunk travels into one of four shared-memory stages: x by TMA from a
// tensor map with the 128-byte swizzle (the K-major layout wgmma's B descriptor
// reads), the packed weights and their scales as bulk copies, the arrival
// counted by a "full" mbarrier; a stage is released by an "empty" mbarrier that
// each warpgroup arrives on. One thread issues the copies, so the warps' own
// instruction stream is the dequantization and the MMAs, with no block barrier
// in the loop (scripts/wgmma_probe.cu measured the variants: 663 TFLOP/s on
// the H200 against 551 with every thread issuing cp.async behind a barrier).
// Chunks must hold one group each (the chunk scales; group size a multiple of
// 128 in packed order).
//
// Compiled for sm_90a only (wgmma is an architecture-specific feature), in a
// target of its own so that no other cubin holds these kernels.
#include "cuda/check.h"
#include "cuda/gptq4_nibbles.cuh"
#include "cuda/kernels.h"

#include <cuda.h>
#include <cudaTypedefs.h>

#include <cstdlib>
#include <mutex>

namespace qattn::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kColumns = 256;  // a block's output columns
constexpr int kTokens = 128;   // a block's rows of x
constexpr int kStages = 4;
constexpr int kAtomBytes = kTokens * 128;  // 64 k of x: 128 rows of 128 bytes
constexpr int kXBytes = 2 * kAtomBytes;
constexpr int kWeightBytes = kColumns / 8 * 32 * 16;
constexpr int kScaleBytes = kColumns * 4;
constexpr int kStageBytes = (kXBytes + kWeightBytes + kScaleBytes + 1023) / 1024 * 1024;  // atoms 1024-aligned
// The epilogue's fp32 tile reuses the stages; rows padded by 16 bytes so that a
// warp's stores of one accumulator register fall in 32 distinct banks.
constexpr int kTileStride = kColumns + 4;
constexpr int kSharedBytes = kStages * kStageBytes + 1024;  // + room to align
static_assert(kTokens * kTileStride * 4 <= kStages * kStageBytes, "the epilogue tile fits the stages");

struct Batch {
    CUtensorMap x[kMaxLargeGemmProblems];  // [rows][packed rows] fp16, boxes of 64 x 128
    Gptq4GemmLargeProblem problem[kMaxLargeGemmProblems];
    int block_begin[kMaxLargeGemmProblems + 1];  // first blockIdx.x of each problem
    int count, rows, ldc;
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

__global__ void __launch_bounds__(kThreads, 1) gptq4_gemm_large_kernel(const __grid_constant__ Batch batch) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ unsigned char shared_raw[];
    __shared__ __align__(8) uint64_t full[kStages], empty[kStages];
    int which = 0;
    for (int i = 1; i < batch.count; ++i) which += static_cast<int>(blockIdx.x) >= batch.block_begin[i];
    const Gptq4GemmLargeProblem& pr = batch.problem[which];
    const CUtensorMap* const x_map = &batch.x[which];
    const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(shared_raw));
    const uint32_t base = (raw + 1023) & ~1023u;
    const uint32_t full0 = static_cast<uint32_t>(__cvta_generic_to_shared(full));
    const uint32_t empty0 = static_cast<uint32_t>(__cvta_generic_to_shared(empty));
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int chunks = pr.w.chunks, n_tiles = pr.n / 8;
    const int row0 = blockIdx.y * kTokens;
    const int tile0 = (blockIdx.x - batch.block_begin[which]) * (kColumns / 8), column0 = tile0 * 8;

    const auto fill = [&](int chunk) {
        const int s = chunk % kStages;
        const uint32_t at = base + s * kStageBytes, bar = full0 + 8 * s;
        mbar_expect_tx(bar, kXBytes + kWeightBytes + kScaleBytes);
        tma_load_2d(at, x_map, chunk * 128, row0, bar);  // rows past the last read as zeros
        tma_load_2d(at + kAtomBytes, x_map, chunk * 128 + 64, row0, bar);
        bulk_load(at + kXBytes, pr.w.qpack + (static_cast<size_t>(chunk) * n_tiles + tile0) * 32, kWeightBytes, bar);
        bulk_load(at + kXBytes + kWeightBytes, pr.w.chunk_scale_zero + static_cast<size_t>(chunk) * pr.n + column0,
                  kScaleBytes, bar);
    };
    if (tid == 0) {
        for (int s = 0; s < kStages; ++s) mbar_init(full0 + 8 * s, 1), mbar_init(empty0 + 8 * s, 2);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        for (int c = 0; c < kStages && c < chunks; ++c) fill(c);
    }
    __syncthreads();

    // Column group u of this warp: n-tiles local[u], local[u] + 1 of the block
    // (rows g and g + 8 of the warp's 16 in wgmma's A).
    const int wg = warp >> 2, wq = warp & 3;
    int local[2];
#pragma unroll
    for (int u = 0; u < 2; ++u) local[u] = (wg * 2 + u) * 8 + wq * 2;
    // Not zeroed: the first MMA's scale-d is 0. An instruction that set them
    // would reach the loop, where an MMA is in flight across the back edge, and
    // ptxas would then serialize every MMA.
    float d[2][64];
    uint32_t a[2][2][4];  // [step parity][group]: a step's registers stay untouched until its MMA is done
    const auto chunk_mmas = [&](int c) {
        const int s = c % kStages;
        mbar_wait(full0 + 8 * s, (c / kStages) & 1);
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
        // This warpgroup's MMAs of chunk c - 1 are done: its stage may be refilled.
        // (Here, not after the chunk's first step: an arrive there, its address
        // computed inside an MMA's window, made ptxas serialize the MMAs.) The
        // copying thread refills the stage of chunk c - 2, which both warpgroups
        // released a chunk ago, so it seldom waits.
        if (c > 0 && (tid & 127) == 0) mbar_arrive(empty0 + 8 * ((c + kStages - 1) % kStages));
        if (tid == 0 && c >= 2 && c + kStages - 2 < chunks) {
            mbar_wait(empty0 + 8 * ((c - 2) % kStages), ((c - 2) / kStages) & 1);
            fill(c + kStages - 2);
        }
    };
    for (int c = 0; c < chunks - 1; ++c) chunk_mmas(c);
    // The last chunk outside the loop: with the wait for every MMA after a loop
    // that ends with one in flight, ptxas moved the reads of the accumulators
    // above that wait (scripts/wgmma_probe.cu's second version).
    chunk_mmas(chunks - 1);
    wgmma_wait<0>();
#pragma unroll
    for (int u = 0; u < 2; ++u) pin(d[u]);
    __syncthreads();  // every chunk has arrived and been multiplied: the stages hold the tile now

    // d[u][4 i + e]: column local[u] * 8 + g (e < 2) or + 8, row 8 i + 2 t + (e & 1).
    float* const tile = reinterpret_cast<float*>(shared_raw + (base - raw));
#pragma unroll
    for (int u = 0; u < 2; ++u)
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const int row = 8 * i + 2 * t, column = local[u] * 8 + g;
            tile[row * kTileStride + column] = d[u][4 * i];
            tile[(row + 1) * kTileStride + column] = d[u][4 * i + 1];
            tile[row * kTileStride + column + 8] = d[u][4 * i + 2];
            tile[(row + 1) * kTileStride + column + 8] = d[u][4 * i + 3];
        }
    __syncthreads();
    // 8 columns of a row a thread at a time: out = tile (+ out), the fp32 sum
    // rounded once, as cuBLAS with beta = 1 does.
    constexpr int kPieces = kColumns / 8;
    for (int i = tid; i < kTokens * kPieces; i += kThreads) {
        const int r = i / kPieces, c8 = (i % kPieces) * 8;
        if (row0 + r >= batch.rows) break;  // i grows with r
        const float4 lo = *reinterpret_cast<const float4*>(tile + r * kTileStride + c8);
        const float4 hi = *reinterpret_cast<const float4*>(tile + r * kTileStride + c8 + 4);
        float v[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
        const size_t at = static_cast<size_t>(row0 + r) * batch.ldc + column0 + c8;
        if (batch.out_fp32) {
            float4* const out = reinterpret_cast<float4*>(static_cast<float*>(pr.out) + at);
            if (batch.accumulate) {
                const float4 o0 = out[0], o1 = out[1];
                v[0] += o0.x, v[1] += o0.y, v[2] += o0.z, v[3] += o0.w;
                v[4] += o1.x, v[5] += o1.y, v[6] += o1.z, v[7] += o1.w;
            }
            out[0] = make_float4(v[0], v[1], v[2], v[3]);
            out[1] = make_float4(v[4], v[5], v[6], v[7]);
        } else {
            uint4* const out = reinterpret_cast<uint4*>(static_cast<__half*>(pr.out) + at);
            if (batch.accumulate) {
                const uint4 o = *out;
                const __half2* h = reinterpret_cast<const __half2*>(&o);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float2 f = __half22float2(h[e]);
                    v[2 * e] += f.x, v[2 * e + 1] += f.y;
                }
            }
            uint4 o;
            __half2* h = reinterpret_cast<__half2*>(&o);
#pragma unroll
            for (int e = 0; e < 4; ++e) h[e] = __floats2half2_rn(v[2 * e], v[2 * e + 1]);
            *out = o;
        }
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
    gptq4_gemm_large_kernel<<<dim3(blocks, (rows + kTokens - 1) / kTokens), kThreads, kSharedBytes, stream>>>(batch);
    QATTN_LAUNCH_CHECK("gptq4_gemm_large");
    return QATTN_SUCCESS;
}

}  // namespace qattn::cuda
