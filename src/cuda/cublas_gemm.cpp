// Row-major products through column-major cuBLAS: a row-major [R, C] matrix is
// the column-major C x R matrix, so y = x . W^T is computed as y^T = W . x^T.
#include "cuda/cublas_gemm.h"

namespace qattn::cuda {

namespace {

qattn_status gemm(cublasHandle_t handle, int R, int N, int K, const __half* x, int ldx, const __half* w, void* c,
                  cudaDataType c_type, int ldc, float beta) {
    const float one = 1.0f;
    QATTN_CUBLAS_TRY(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, N, R, K, &one, w, CUDA_R_16F, K, x, CUDA_R_16F,
                                  ldx, &beta, c, c_type, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return QATTN_SUCCESS;
}

}  // namespace

qattn_status gemm_xwT(cublasHandle_t handle, int R, int N, int K, const __half* x, int ldx, const __half* w,
                      float* c, int ldc, float beta) {
    return gemm(handle, R, N, K, x, ldx, w, c, CUDA_R_32F, ldc, beta);
}

qattn_status gemm_xwT(cublasHandle_t handle, int R, int N, int K, const __half* x, int ldx, const __half* w,
                      __half* c, int ldc, float beta) {
    return gemm(handle, R, N, K, x, ldx, w, c, CUDA_R_16F, ldc, beta);
}

qattn_status lora_add(cublasHandle_t handle, int R, int K, int rank, int N, const __half* x, int ldx,
                      const __half* a, const __half* b, __half* scratch, float* c, int ldc) {
    const float one = 1.0f, zero = 0.0f;
    // scratch^T (rank x R) = a^T (the row-major [K, rank] buffer read column-major) . x^T
    QATTN_CUBLAS_TRY(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, rank, R, K, &one, a, CUDA_R_16F, rank, x,
                                  CUDA_R_16F, ldx, &zero, scratch, CUDA_R_16F, rank, CUBLAS_COMPUTE_32F,
                                  CUBLAS_GEMM_DEFAULT));
    // c^T (N x R) += b^T . scratch^T
    QATTN_CUBLAS_TRY(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, N, R, rank, &one, b, CUDA_R_16F, N, scratch,
                                  CUDA_R_16F, rank, &one, c, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F,
                                  CUBLAS_GEMM_DEFAULT));
    return QATTN_SUCCESS;
}

}  // namespace qattn::cuda
