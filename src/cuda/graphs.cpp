#include "cuda/graphs.h"

namespace qattn::cuda {

qattn_status stream_is_capturing(cudaStream_t stream, bool* capturing) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    QATTN_CUDA_TRY(cudaStreamIsCapturing(stream, &status));
    *capturing = status != cudaStreamCaptureStatusNone;
    return QATTN_SUCCESS;
}

GraphCache::~GraphCache() {
    clear();
    if (capture_stream_) cudaStreamDestroy(capture_stream_);
}

qattn_status GraphCache::init() {
    QATTN_CUDA_TRY(cudaStreamCreateWithFlags(&capture_stream_, cudaStreamNonBlocking));
    return QATTN_SUCCESS;
}

void GraphCache::clear() {
    for (auto& entry : execs_) cudaGraphExecDestroy(entry.second);
    execs_.clear();
}

qattn_status GraphCache::run(const std::vector<int>& key, const std::function<qattn_status(cudaStream_t)>& body,
                             cudaStream_t stream) {
    // Thread-local mode: another thread's capture is not disturbed by this one.
    QATTN_CUDA_TRY(cudaStreamBeginCapture(capture_stream_, cudaStreamCaptureModeThreadLocal));
    const qattn_status recorded = body(capture_stream_);
    cudaGraph_t graph = nullptr;
    const cudaError_t ended = cudaStreamEndCapture(capture_stream_, &graph);
    if (recorded != QATTN_SUCCESS) {
        if (graph) cudaGraphDestroy(graph);
        (void)cudaGetLastError();
        return recorded;
    }
    QATTN_CUDA_TRY(ended);

    auto it = execs_.find(key);
    if (it != execs_.end()) {
        cudaGraphExecUpdateResultInfo info{};
        if (cudaGraphExecUpdate(it->second, graph, &info) != cudaSuccess) {
            (void)cudaGetLastError();
            cudaGraphExecDestroy(it->second);
            execs_.erase(it);
            it = execs_.end();
        }
    }
    if (it == execs_.end()) {
        cudaGraphExec_t exec = nullptr;
        const cudaError_t made = cudaGraphInstantiate(&exec, graph, 0);
        if (made != cudaSuccess) {
            cudaGraphDestroy(graph);
            QATTN_CUDA_TRY(made);
        }
        it = execs_.emplace(key, exec).first;
    }
    const cudaError_t launched = cudaGraphLaunch(it->second, stream);
    cudaGraphDestroy(graph);
    QATTN_CUDA_TRY(launched);
    return QATTN_SUCCESS;
}

}  // namespace qattn::cuda
