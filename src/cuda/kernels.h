// Launchers of the backend's kernels: host-callable, stream-ordered, allocation
// free. Each returns QATTN_SUCCESS or the launch error.
#pragma once

#include "cuda/cuda_qmatrix.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace qattn::cuda {

// Whether p is aligned for accesses of `bytes` bytes (the kernels' vector widths).
inline bool is_aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// A norm's parameters as kernels read them (weights in device memory).
struct NormParams {
    qattn_norm_type type = QATTN_NORM_NONE;
    float eps = 1e-6f;
    const __half* weight = nullptr;  // [width] or [heads, width]
    const __half* bias = nullptr;    // same shape, LayerNorm only, optional
    int per_head = 0;
};

// rms_layer_norm.cu: the fp16 activations of rows of x (fp16 or fp32, row stride
// ldx): y = norm(x[r, :]) (a plain conversion when norm.type is NONE), written to
// out [rows, width] in input order when out is set, and to gathered [rows, columns]
// as gathered[r, j] = y[perm[j]] (0 where perm[j] < 0) when gathered is set
// (columns % 8 == 0, gathered 16-byte aligned: a packed GPTQ row order).
struct StageRowsParams {
    const void* x = nullptr;
    bool x_fp32 = false;
    int rows = 0, width = 0, ldx = 0;
    NormParams norm;
    __half* out = nullptr;
    const int32_t* perm = nullptr;
    int columns = 0;
    __half* gathered = nullptr;
};
qattn_status launch_stage_rows(const StageRowsParams& p, cudaStream_t stream);

// gptq_gemm_small.cu: acc[r, col_offset + n] += sum_k x[r, k] W[k, n] for up to
// three packed GPTQ 4-bit matrices sharing one input, rows <= kSmallRows.
constexpr int kSmallRows = 32;
struct SmallGemmProblem {
    PackedGptq4 w;
    int n_tiles = 0;     // N / 8
    int col_offset = 0;  // first column of this matrix in acc
    // x already in this matrix's packed row order, [rows, chunks * 128], or null:
    // the kernel gathers x through perm itself.
    const __half* xg = nullptr;
};

// dequantize.cu: out[n - n_begin, j] = W[perm[j], n] in fp16 for n in [n_begin, n_begin + n_count)
// and every packed row j (w.chunks * 128 of them; padding rows hold finite values
// that meet x = 0). n_begin, n_count % 8 == 0. Several slices (of matrices with
// the same packed rows, e.g. K and V) go in one launch.
struct DequantizeSlice {
    PackedGptq4 w;
    int n = 0;  // the matrix's columns
    int n_begin = 0, n_count = 0;
    __half* out = nullptr;
};
constexpr int kMaxDequantizeSlices = 2;
qattn_status launch_dequantize_gptq4(const DequantizeSlice* slices, int count, int sm_count, cudaStream_t stream);

// sm90a/gptq4_gemm_large.cu (Hopper, sm_90a only): out[r, n] (= or +=) sum_j
// x[r, j] W[j, n] over the packed rows, for rows beyond the small-row path,
// with the weights dequantized in registers into the tensor cores' operand (no
// fp16 copy of them). Up to three matrices in one launch, sharing the rows, the
// output's type and row stride. A matrix fits when its chunks hold one group
// each (the caller knows: CudaQMatrix::single_group_chunks), its columns are a
// multiple of 256, and x and out are 16-byte aligned with row strides a
// multiple of 8 elements (gptq4_gemm_large_fits).
struct Gptq4GemmLargeProblem {
    PackedGptq4 w;
    int n = 0;                  // the matrix's columns
    const __half* x = nullptr;  // [rows][w.chunks * 128] in packed row order, row stride ldx
    int ldx = 0;
    void* out = nullptr;        // fp16 or fp32 [rows][n], row stride ldc
};
constexpr int kMaxLargeGemmProblems = 3;
// A device of compute capability 9.0 whose driver has the tensor-map encoder.
bool gptq4_gemm_large_available(int device);
bool gptq4_gemm_large_fits(const Gptq4GemmLargeProblem& p);
qattn_status launch_gptq4_gemm_large(const Gptq4GemmLargeProblem* problems, int count, int rows, bool out_fp32,
                                     int ldc, bool accumulate, cudaStream_t stream);

// head_norm_rope.cu: reads the fused Q|K|V fp32 accumulator, adds the biases,
// applies head norms and RoPE, writes fp16 q, k, v (k and v also or only into
// KV-cache slots), and zeroes the accumulator rows it read below kSmallRows (the
// next call's split-K atomics start from zero).
struct HeadEpilogueParams {
    float* acc = nullptr;
    // Or the projections already rounded to fp16 (the large-row path without
    // LoRA: half the bytes to write and read back), same stride; not zeroed.
    const __half* acc16 = nullptr;
    int acc_stride = 0;
    int rows = 0, q_len = 1;
    int num_heads = 0, num_kv_heads = 0, head_dim = 0;
    const __half* bias[3] = {};
    NormParams norm[2];  // q, k
    qattn_rope_type rope = QATTN_ROPE_NONE;
    int rotary_dim = 0;
    const float* sin = nullptr;
    const float* cos = nullptr;
    int past_len = 0;
    const int32_t* past_lens = nullptr;
    int max_positions = 0;  // positions must lie in [0, max_positions)
    __half* out[3] = {};       // q, k, v; k and v may be null when they go to the cache only
    __half* cache[2] = {};     // k_cache, v_cache [num_kv_slots, NKV * D], when kv_slots is set
    const int32_t* kv_slots = nullptr;  // [rows], or null
    int64_t num_kv_slots = 0;
    int* error_flag = nullptr;  // set to 1 when a row's position or KV slot is out of range
    // The kernel before the epilogue is the decode GEMM, which lets the next
    // kernel start only after its own wait: everything the caller ran before the
    // phase has then ended, so the epilogue may read past_lens and kv_slots
    // before its wait (head_norm_rope.cu).
    bool caller_data_ready_at_start = false;
};
// Whether every destination of the head epilogue is 8-byte aligned (4 halves a lane access).
bool head_outputs_aligned8(const HeadEpilogueParams& p);
qattn_status launch_head_epilogue(const HeadEpilogueParams& p, cudaStream_t stream);

// residual_epilogue.cu: y = acc[r, :] + bias, optional post-norm, then x = x + y
// (or x = y), x fp16 or fp32; zeroes the accumulator rows it read below kSmallRows.
struct ResidualEpilogueParams {
    float* acc = nullptr;
    int rows = 0, width = 0;
    const __half* bias = nullptr;
    NormParams post_norm;
    void* x = nullptr;
    bool x_fp32 = false;
    bool has_residual = true;
};
qattn_status launch_residual_epilogue(const ResidualEpilogueParams& p, cudaStream_t stream);

// The small-row GEMM can finish the phase itself (kHeads: bias, head norm, RoPE
// on ranges of whole heads, 128 % head_dim == 0; kResidual: no post-norm, which
// needs whole rows). Only the projections of the GEMM may feed the accumulator
// (no LoRA, no cuBLAS part). At up to 4 rows, K up to 4096 and no head norms, a
// block computes 16 columns over the whole K and finishes them (no accumulator
// at all); else two ways, for up to kSmallGemmFinishRows rows:
//  - its split-K blocks of a column range form a thread block cluster (sm_90)
//    and add their partial sums in distributed shared memory; the epilogue is
//    spread over the cluster's blocks. No atomics and no global round trip.
//  - otherwise, up to kSmallGemmFusedRows rows: the last block to add its
//    partial sums to a column range (a counter per range) runs the epilogue on
//    it, which saves a kernel boundary and the wait for the whole grid. Beyond,
//    the few last blocks would run the epilogue of many rows each, slower than
//    a kernel spread over the GPU (measured in docs/GPU_NOTES.md).
// launch_gptq4_gemm_small says whether it finished the phase (*finished);
// where it did not, the caller launches the epilogue kernel.
constexpr int kSmallGemmFusedRows = 8;
constexpr int kSmallGemmFinishRows = 16;
struct SmallGemmEpilogue {
    enum Kind { kNone, kHeads, kResidual } kind = kNone;
    int* counters = nullptr;  // small_gemm_counters(columns) ints, zero between calls
    HeadEpilogueParams heads;
    ResidualEpilogueParams residual;
};
int small_gemm_counters(int columns);
bool small_gemm_can_finish_heads(const HeadEpilogueParams& p);
bool small_gemm_can_finish_residual(const ResidualEpilogueParams& p);

qattn_status launch_gptq4_gemm_small(const SmallGemmProblem* problems, int count, const __half* x, int x_stride,
                                     int rows, float* acc, int acc_stride, int sm_count,
                                     const SmallGemmEpilogue& epilogue, bool* finished, cudaStream_t stream);

}  // namespace qattn::cuda
