// The per-call device memory of CUDA layers: a layer's own, or one shared by
// layers that never run at the same time (qattn_scratch), sized for the largest
// of them. Everything a call leaves behind is either overwritten by the next
// call that reads it or zero again (the small-row accumulators and the GEMM's
// arrival counters), so any layer may follow any other.
#pragma once

#include "core/backend.h"
#include "cuda/check.h"

namespace qattn::cuda {

class CudaScratch final : public ScratchImpl {
public:
    enum Buffer {
        kNormed,     // fp16 x after the input norm, [rows, H]
        kGathered,   // fp16 x gathered into a packed row order
        kDequant,    // fp16 slices of dequantized weights
        kAccQkv,     // fp32 Q|K|V sums of up to kSmallRows rows; zero between calls
        kAccO,       // fp32 O sums of up to kSmallRows rows; zero between calls
        kSums,       // beyond kSmallRows rows: one phase's sums, fp16 or fp32, overwritten by each call
        kCounters,   // the small-row GEMM's arrival counters; zero between calls
        kWorkspace,  // cuBLAS
        kLora,       // fp16 x . A of the active adapters
        kBuffers
    };

    explicit CudaScratch(int device) : device_(device) {}
    int device() const { return device_; }

    // Grows buffer b to at least `bytes` (it never shrinks), on the current
    // device, which is device(). A buffer that moves is freed only after the
    // device finished all work, as a queued call of any layer may still read it.
    qattn_status reserve(Buffer b, size_t bytes);

    template <typename T>
    T* get(Buffer b) const { return buffers_[b].get<T>(); }

    // A call that failed half-way may leave partial sums or counts: the next call
    // of any layer clears the zeroed buffers first.
    bool dirty = false;
    qattn_status clear_if_dirty(cudaStream_t s);

private:
    int device_;
    DeviceBuffer buffers_[kBuffers];
};

}  // namespace qattn::cuda
