// A QMatrix in CUDA device memory, in one of two storage forms:
//  - dense fp16 [N, K] (nn.Linear layout; cuBLAS reads it as a "TN" GEMM). Dense
//    checkpoints are kept like this, and so is GPTQ 8-bit, dequantized once at
//    creation (twice the bytes of 8-bit, but every row count runs on cuBLAS).
//  - GPTQ 4-bit repacked for tensor-core GEMV (gptq_gemm_small.cu): rows sorted
//    by group (act-order undone once here, not per call), each group padded to a
//    multiple of 16 rows so that one m16n8k16 MMA step never spans two groups,
//    and the nibbles of each 16x8 weight tile placed where the MMA B fragment of
//    each lane wants them. `perm` maps a packed row back to its input feature.
#pragma once

#include "core/backend.h"
#include "cuda/check.h"

#include <cuda_fp16.h>

#include <vector>

namespace qattn::cuda {

// Rows of the packed GPTQ layout per 16-byte load of a lane: 8 MMA k-steps.
constexpr int kPackRows = 128;

struct PackedGptq4 {
    const uint4* qpack = nullptr;     // [chunks][N/8][32 lanes] x 16 bytes
    const __half2* scale_zero = nullptr;  // [G][N]: (scale, 1024 + zero), see gptq_gemm_small.cu
    const int32_t* perm = nullptr;    // [chunks * 128]: input feature of each packed row, -1 for padding
    const int32_t* step_group = nullptr;  // [chunks * 8]: group of each 16-row MMA step
    // [chunks][N]: scale_zero of each chunk's first group, so a kernel reads a
    // chunk's scales without first reading its group; and bit c of
    // mixed_chunks[c / 32]: chunk c spans several groups.
    const __half2* chunk_scale_zero = nullptr;
    const uint32_t* mixed_chunks = nullptr;
    int chunks = 0;                   // packed rows / 128
};

class CudaQMatrix final : public QMatrixImpl {
public:
    static qattn_status create(const QMatrixInfo& info, const QMatrixHostWeights& weights,
                               std::unique_ptr<QMatrixImpl>* out);

    int device() const { return info_.device; }
    int64_t in_features() const { return info_.in_features; }
    int64_t out_features() const { return info_.out_features; }
    bool packed() const { return packed_.qpack != nullptr; }
    const __half* dense() const { return dense_.get<__half>(); }  // [N, K], when not packed
    const PackedGptq4& packed_gptq() const { return packed_; }
    int64_t packed_rows() const { return int64_t(packed_.chunks) * kPackRows; }
    // Same packed row order (e.g. q, k, v quantized with one act-order permutation):
    // then x gathered for one serves the other.
    bool same_row_order(const CudaQMatrix& other) const {
        return packed() && other.packed() && perm_host_ == other.perm_host_;
    }
    const __half* bias() const { return bias_.get<__half>(); }    // [N] or null
    // Packed row j is input feature j for every j < K (no act-order, K and the
    // groups multiples of 128 and 16): x in input order is already in packed
    // order, and nothing needs gathering.
    bool identity_order() const { return identity_order_; }
    // No chunk of 128 packed rows spans two groups (group size a multiple of
    // 128): the chunk scales are all a kernel needs (gptq4_gemm_large).
    bool single_group_chunks() const { return single_group_chunks_; }

private:
    explicit CudaQMatrix(const QMatrixInfo& info) : info_(info) {}
    qattn_status load_dense(const QMatrixHostWeights& w);
    qattn_status load_gptq_as_dense(const QMatrixHostWeights& w);
    qattn_status pack_gptq4(const QMatrixHostWeights& w);

    QMatrixInfo info_;
    bool identity_order_ = false;
    bool single_group_chunks_ = false;
    DeviceBuffer dense_, bias_;
    DeviceBuffer qpack_buf_, scale_zero_buf_, perm_buf_, step_group_buf_, chunk_scale_zero_buf_, mixed_chunks_buf_;
    PackedGptq4 packed_;
    std::vector<int32_t> perm_host_;
};

}  // namespace qattn::cuda
