// The cuBLAS calls of the backend: fp16 operands, fp32 accumulation, row-major
// activations. Every call runs on the stream the handle is bound to.
#pragma once

#include "cuda/check.h"

#include <cuda_fp16.h>

namespace qattn::cuda {

// c[r, n] (ldc) = beta * c + sum_k x[r, k] * w[n, k]; w is [N, K] (nn.Linear layout),
// x is [R, K] with row stride ldx, c fp32 or fp16 (the fp32 sums rounded once).
qattn_status gemm_xwT(cublasHandle_t handle, int R, int N, int K, const __half* x, int ldx, const __half* w,
                      float* c, int ldc, float beta);
qattn_status gemm_xwT(cublasHandle_t handle, int R, int N, int K, const __half* x, int ldx, const __half* w,
                      __half* c, int ldc, float beta);

// One LoRA adapter: c[r, :] (fp32, ldc) += ((x . a) . b)[r, :]; a fp16 [K, rank],
// b fp16 [rank, N], the intermediate x . a in fp16 scratch [R, rank].
qattn_status lora_add(cublasHandle_t handle, int R, int K, int rank, int N, const __half* x, int ldx,
                      const __half* a, const __half* b, __half* scratch, float* c, int ldc);

}  // namespace qattn::cuda
