#include "cuda/cuda_scratch.h"

namespace qattn::cuda {
namespace {

bool zero_between_calls(CudaScratch::Buffer b) {
    return b == CudaScratch::kAccQkv || b == CudaScratch::kAccO || b == CudaScratch::kCounters;
}

}  // namespace

qattn_status CudaScratch::reserve(Buffer b, size_t bytes) {
    DeviceBuffer& buffer = buffers_[b];
    if (bytes <= buffer.bytes()) return QATTN_SUCCESS;
    DeviceBuffer grown;
    QATTN_TRY(grown.allocate(bytes));
    if (zero_between_calls(b)) QATTN_CUDA_TRY(cudaMemset(grown.get(), 0, bytes));
    if (buffer.get()) QATTN_CUDA_TRY(cudaDeviceSynchronize());
    buffer = std::move(grown);
    return QATTN_SUCCESS;
}

qattn_status CudaScratch::clear_if_dirty(cudaStream_t s) {
    if (!dirty) return QATTN_SUCCESS;
    for (Buffer b : {kAccQkv, kAccO, kCounters})
        if (buffers_[b].get()) QATTN_CUDA_TRY(cudaMemsetAsync(buffers_[b].get(), 0, buffers_[b].bytes(), s));
    dirty = false;
    return QATTN_SUCCESS;
}

qattn_status create_scratch(int device, std::shared_ptr<ScratchImpl>* out) {
    *out = std::make_shared<CudaScratch>(device);
    return QATTN_SUCCESS;
}

}  // namespace qattn::cuda
