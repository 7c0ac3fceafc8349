// Times every algorithm cuBLASLt's heuristic offers for the prefill GEMMs of the
// bench's Llama-3-8B layer (fp16 in, fp32 accumulation, fp16 out, the weights as
// the dequantized [N, K] scratch), against cublasGemmEx's default choice, to
// find whether choosing the algorithm by measurement would speed up P2k.
// Operands are cycled over enough copies to keep the L2 cold; CUDA events,
// median of the runs after warm-up.
//
//   nvcc -O2 -std=c++17 scripts/cublaslt_probe.cu -lcublasLt -lcublas -o /tmp/cublaslt_probe && /tmp/cublaslt_probe
#include "probe_common.cuh"

#include <cublasLt.h>
#include <cublas_v2.h>

#include <cstdio>
#include <vector>

using probe::fill_random;
using probe::median_us;

namespace {

struct Shape {
    const char* name;
    int rows, n, k;
    float beta;
};

}  // namespace

int main() {
    const Shape shapes[] = {{"Q (2048 x 4096 x 4096)", 2048, 4096, 4096, 0.0f},
                            {"K|V (2048 x 2048 x 4096)", 2048, 2048, 4096, 0.0f},
                            {"O into x (2048 x 4096 x 4096, beta 1)", 2048, 4096, 4096, 1.0f},
                            {"a 2048-column slice (2048 x 2048 x 4096, beta 1)", 2048, 2048, 4096, 1.0f}};
    cublasHandle_t blas;
    cublasLtHandle_t lt;
    CHECK(cublasCreate(&blas));
    CHECK(cublasLtCreate(&lt));
    const size_t workspace_bytes = size_t(32) << 20;
    void* workspace = nullptr;
    CHECK(cudaMalloc(&workspace, workspace_bytes));
    CHECK(cublasSetWorkspace(blas, workspace, workspace_bytes));
    constexpr int kCopies = 4;
    for (const Shape& s : shapes) {
        std::vector<__half*> w(kCopies), x(kCopies), c(kCopies);
        for (int i = 0; i < kCopies; ++i) {
            CHECK(cudaMalloc(&w[i], sizeof(__half) * s.n * s.k));
            CHECK(cudaMalloc(&x[i], sizeof(__half) * s.rows * s.k));
            CHECK(cudaMalloc(&c[i], sizeof(__half) * s.rows * s.n));
            fill_random<<<1024, 256>>>(w[i], size_t(s.n) * s.k, 1 + i);
            fill_random<<<1024, 256>>>(x[i], size_t(s.rows) * s.k, 101 + i);
            CHECK(cudaMemset(c[i], 0, sizeof(__half) * s.rows * s.n));
        }
        const float one = 1.0f, beta = s.beta;
        const float base = median_us(
            [&](int i) {
                CHECK(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, s.n, s.rows, s.k, &one, w[i], CUDA_R_16F, s.k,
                                   x[i], CUDA_R_16F, s.k, &beta, c[i], CUDA_R_16F, s.n, CUBLAS_COMPUTE_32F,
                                   CUBLAS_GEMM_DEFAULT));
            },
            kCopies, 25);
        const double tflop = 2.0 * s.rows * s.n * s.k / 1e12;
        std::printf("%s: cublasGemmEx default %.1f us (%.0f TFLOP/s)\n", s.name, base, tflop / (base * 1e-6));

        cublasLtMatmulDesc_t desc;
        CHECK(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
        const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
        CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
        CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
        cublasLtMatrixLayout_t a_layout, b_layout, c_layout;
        CHECK(cublasLtMatrixLayoutCreate(&a_layout, CUDA_R_16F, s.k, s.n, s.k));
        CHECK(cublasLtMatrixLayoutCreate(&b_layout, CUDA_R_16F, s.k, s.rows, s.k));
        CHECK(cublasLtMatrixLayoutCreate(&c_layout, CUDA_R_16F, s.n, s.rows, s.n));
        cublasLtMatmulPreference_t pref;
        CHECK(cublasLtMatmulPreferenceCreate(&pref));
        CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_bytes,
                                                   sizeof(workspace_bytes)));
        constexpr int kWanted = 32;
        cublasLtMatmulHeuristicResult_t results[kWanted];
        int found = 0;
        CHECK(cublasLtMatmulAlgoGetHeuristic(lt, desc, a_layout, b_layout, c_layout, c_layout, pref, kWanted, results,
                                             &found));
        float best = 1e30f;
        int best_index = -1;
        for (int a = 0; a < found; ++a) {
            if (results[a].state != CUBLAS_STATUS_SUCCESS) continue;
            const float us = median_us(
                [&](int i) {
                    CHECK(cublasLtMatmul(lt, desc, &one, w[i], a_layout, x[i], b_layout, &beta, c[i], c_layout,
                                         c[i], c_layout, &results[a].algo, workspace, workspace_bytes, 0));
                },
                kCopies, 25);
            int tile = 0, stages = 0, id = 0, swizzle = 0, cluster = 0;
            size_t written = 0;
            cublasLtMatmulAlgoConfigGetAttribute(&results[a].algo, CUBLASLT_ALGO_CONFIG_ID, &id, sizeof(id), &written);
            cublasLtMatmulAlgoConfigGetAttribute(&results[a].algo, CUBLASLT_ALGO_CONFIG_TILE_ID, &tile, sizeof(tile),
                                                 &written);
            cublasLtMatmulAlgoConfigGetAttribute(&results[a].algo, CUBLASLT_ALGO_CONFIG_STAGES_ID, &stages,
                                                 sizeof(stages), &written);
            cublasLtMatmulAlgoConfigGetAttribute(&results[a].algo, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING, &swizzle,
                                                 sizeof(swizzle), &written);
            cublasLtMatmulAlgoConfigGetAttribute(&results[a].algo, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, &cluster,
                                                 sizeof(cluster), &written);
            std::printf("  heuristic #%2d: algo %d tile %d stages %d swizzle %d cluster %d  %.1f us (%.0f TFLOP/s)\n",
                        a, id, tile, stages, swizzle, cluster, us, tflop / (us * 1e-6));
            if (us < best) best = us, best_index = a;
        }
        std::printf("  best: heuristic #%d, %.1f us, %.1f%% of the default's time\n\n", best_index, best,
                    100.0f * best / base);
        CHECK(cublasLtMatmulPreferenceDestroy(pref));
        CHECK(cublasLtMatrixLayoutDestroy(a_layout));
        CHECK(cublasLtMatrixLayoutDestroy(b_layout));
        CHECK(cublasLtMatrixLayoutDestroy(c_layout));
        CHECK(cublasLtMatmulDescDestroy(desc));
        for (int i = 0; i < kCopies; ++i) {
            CHECK(cudaFree(w[i]));
            CHECK(cudaFree(x[i]));
            CHECK(cudaFree(c[i]));
        }
    }
    CHECK(cudaFree(workspace));
    CHECK(cublasLtDestroy(lt));
    CHECK(cublasDestroy(blas));
    return 0;
}
