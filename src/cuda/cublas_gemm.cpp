// Row-major products through column-major cuBLAS: a row-major [R, C] matrix is
// the column-major C x R matrix, so y = x . W^T is computed as y^T = W . x^T.
#include "cuda/cublas_gemm.h"

#include <cstdint>

namespace qattn::cuda {

namespace {

// The largest power of two (up to 256) that divides both the address and the
// leading dimension's bytes: what an algorithm may assume about the operand.
int alignment(const void* p, size_t ld_bytes) {
    const uintptr_t bits = reinterpret_cast<uintptr_t>(p) | ld_bytes | 256;
    return static_cast<int>(bits & (~bits + 1));
}

}  // namespace

qattn_status ProjectionGemm::run(const GemmContext& ctx, int R, int N, int K, const __half* x, int ldx,
                                 const __half* w, void* c, cudaDataType c_type, int ldc, float beta) {
    const size_t c_size = c_type == CUDA_R_32F ? sizeof(float) : sizeof(__half);
    cublasLtMatmulDescOpaque_t desc;
    cublasLtMatrixLayoutOpaque_t w_layout, x_layout, c_layout;
    QATTN_CUBLAS_TRY(cublasLtMatmulDescInit(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t transpose = CUBLAS_OP_T;
    QATTN_CUBLAS_TRY(
        cublasLtMatmulDescSetAttribute(&desc, CUBLASLT_MATMUL_DESC_TRANSA, &transpose, sizeof(transpose)));
    QATTN_CUBLAS_TRY(cublasLtMatrixLayoutInit(&w_layout, CUDA_R_16F, K, N, K));
    QATTN_CUBLAS_TRY(cublasLtMatrixLayoutInit(&x_layout, CUDA_R_16F, K, R, ldx));
    QATTN_CUBLAS_TRY(cublasLtMatrixLayoutInit(&c_layout, c_type, N, R, ldc));

    const int w_align = alignment(w, sizeof(__half) * K), x_align = alignment(x, sizeof(__half) * ldx),
              c_align = alignment(c, c_size * ldc);
    const Shape shape{R, N, K, ldx, ldc, static_cast<int>(c_type), beta != 0.0f, w_align, x_align, c_align};
    auto found = algorithms_.find(shape);
    if (found == algorithms_.end()) {
        cublasLtMatmulPreferenceOpaque_t preference;
        QATTN_CUBLAS_TRY(cublasLtMatmulPreferenceInit(&preference));
        const uint32_t aligns[4] = {static_cast<uint32_t>(w_align), static_cast<uint32_t>(x_align),
                                    static_cast<uint32_t>(c_align), static_cast<uint32_t>(c_align)};
        const cublasLtMatmulPreferenceAttributes_t align_attributes[4] = {
            CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
            CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
        for (int i = 0; i < 4; ++i)
            QATTN_CUBLAS_TRY(
                cublasLtMatmulPreferenceSetAttribute(&preference, align_attributes[i], &aligns[i], sizeof(aligns[i])));
        QATTN_CUBLAS_TRY(cublasLtMatmulPreferenceSetAttribute(&preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                              &ctx.workspace_bytes, sizeof(ctx.workspace_bytes)));
        cublasLtMatmulHeuristicResult_t result = {};
        int count = 0;
        QATTN_CUBLAS_TRY(cublasLtMatmulAlgoGetHeuristic(ctx.lt, &desc, &w_layout, &x_layout, &c_layout, &c_layout,
                                                        &preference, 1, &result, &count));
        if (count < 1 || result.state != CUBLAS_STATUS_SUCCESS)
            return fail(QATTN_ERROR_CUDA, "cuBLASLt has no algorithm for a %d x %d x %d product", R, N, K);
        found = algorithms_.emplace(shape, result.algo).first;
    }
    const float one = 1.0f;
    QATTN_CUBLAS_TRY(cublasLtMatmul(ctx.lt, &desc, &one, w, &w_layout, x, &x_layout, &beta, c, &c_layout, c,
                                    &c_layout, &found->second, ctx.workspace, ctx.workspace_bytes, ctx.stream));
    return QATTN_SUCCESS;
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
