// The cuBLAS calls of the backend: fp16 operands, fp32 accumulation, row-major
// activations. The projections' products run through cuBLASLt with the
// algorithm its heuristic ranks first for the shape: on the H200 that choice
// was 2-5% faster at prefill than cublasGemmEx's own (scripts/cublaslt_probe.cu).
#pragma once

#include "cuda/check.h"

#include <cublasLt.h>
#include <cuda_fp16.h>

#include <map>
#include <tuple>

namespace qattn::cuda {

// What one call's products run with: its stream and the layer's workspace.
struct GemmContext {
    cublasLtHandle_t lt = nullptr;
    cudaStream_t stream = nullptr;
    void* workspace = nullptr;
    size_t workspace_bytes = 0;
};

// c[r, n] (ldc) = beta * c + sum_k x[r, k] * w[n, k]; w is [N, K] (nn.Linear layout),
// x is [R, K] with row stride ldx, c fp32 or fp16 (the fp32 sums rounded once).
// The heuristic's algorithm is remembered per shape: asking costs tens of
// microseconds of host time, and decode asks for the same shapes every step.
class ProjectionGemm {
public:
    qattn_status xwT(const GemmContext& ctx, int R, int N, int K, const __half* x, int ldx, const __half* w,
                     float* c, int ldc, float beta) {
        return run(ctx, R, N, K, x, ldx, w, c, CUDA_R_32F, ldc, beta);
    }
    qattn_status xwT(const GemmContext& ctx, int R, int N, int K, const __half* x, int ldx, const __half* w,
                     __half* c, int ldc, float beta) {
        return run(ctx, R, N, K, x, ldx, w, c, CUDA_R_16F, ldc, beta);
    }

private:
    qattn_status run(const GemmContext& ctx, int R, int N, int K, const __half* x, int ldx, const __half* w, void* c,
                     cudaDataType c_type, int ldc, float beta);

    // R, N, K, ldx, ldc, c's type, beta != 0, and the alignments (bytes) of w, x, c.
    using Shape = std::tuple<int, int, int, int, int, int, bool, int, int, int>;
    std::map<Shape, cublasLtMatmulAlgo_t> algorithms_;
};

// One LoRA adapter: c[r, :] (fp32, ldc) += ((x . a) . b)[r, :]; a fp16 [K, rank],
// b fp16 [rank, N], the intermediate x . a in fp16 scratch [R, rank].
qattn_status lora_add(cublasHandle_t handle, int R, int K, int rank, int N, const __half* x, int ldx,
                      const __half* a, const __half* b, __half* scratch, float* c, int ldc);

}  // namespace qattn::cuda
