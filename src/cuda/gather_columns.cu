// The large-row path of a packed GPTQ matrix multiplies in packed row order
// (groups sorted, padded): x is gathered into that order once per call, so the
// dequantized weights can be written contiguously.
#include "cuda/kernels.h"

namespace qattn::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) gather_columns_kernel(const __half* __restrict__ x, int ldx,
                                                                 const int32_t* __restrict__ perm, int columns,
                                                                 __half* __restrict__ out) {
    const __half* row = x + static_cast<size_t>(blockIdx.y) * ldx;
    __half* dst = out + static_cast<size_t>(blockIdx.y) * columns;
    for (int i = blockIdx.x * kThreads + threadIdx.x; i < columns; i += gridDim.x * kThreads) {
        const int src = perm[i];
        dst[i] = src >= 0 ? row[src] : __float2half(0.0f);
    }
}

}  // namespace

qattn_status launch_gather_columns(const __half* x, int ldx, int rows, const int32_t* perm, int columns,
                                   __half* out, cudaStream_t stream) {
    const dim3 grid((columns + kThreads * 4 - 1) / (kThreads * 4), rows);
    gather_columns_kernel<<<grid, kThreads, 0, stream>>>(x, ldx, perm, columns, out);
    QATTN_LAUNCH_CHECK("gather_columns");
    return QATTN_SUCCESS;
}

}  // namespace qattn::cuda
