// CUDA graphs for use_graphs layers. Each call is captured again (host work
// only: nothing runs during capture) on a private stream, and the executable
// graph cached for its key (batch, q_len, active adapters) is updated in place
// with cudaGraphExecUpdate, which keeps the instantiated graph and swaps in the
// new kernel arguments (pointers, past_len). So a replay always sees this call's
// tensors, and the GPU gets one graph launch instead of one launch per kernel.
// A key seen for the first time, or an update the driver refuses (a different
// node topology), instantiates a fresh executable graph.
#pragma once

#include "cuda/check.h"

#include <functional>
#include <map>
#include <vector>

namespace qattn::cuda {

// True when `stream` is being captured by the caller (e.g. torch.cuda.graph):
// then kernels are simply launched into the caller's capture.
qattn_status stream_is_capturing(cudaStream_t stream, bool* capturing);

class GraphCache {
public:
    GraphCache() = default;
    GraphCache(const GraphCache&) = delete;
    GraphCache& operator=(const GraphCache&) = delete;
    ~GraphCache();

    // Creates the private capture stream on the current device.
    qattn_status init();
    // Records `body` into a graph and launches the cached executable for `key` on `stream`.
    qattn_status run(const std::vector<int>& key, const std::function<qattn_status(cudaStream_t)>& body,
                     cudaStream_t stream);
    // Drops every executable graph (their buffers are about to change).
    void clear();

private:
    cudaStream_t capture_stream_ = nullptr;
    std::map<std::vector<int>, cudaGraphExec_t> execs_;
};

}  // namespace qattn::cuda
