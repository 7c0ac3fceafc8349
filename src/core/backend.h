// The contract between the core (which validates every C call) and a backend
// (which computes). Backends receive only checked, normalised arguments: shapes
// agree, pointers are non-null and on the right device, ids are resolved.
#pragma once

#include "qattn.h"

#include <array>
#include <cstdint>
#include <memory>
#include <vector>

namespace qattn {

// ---- QMatrix ---------------------------------------------------------------

struct QMatrixInfo {
    int device = QATTN_DEVICE_CPU;
    qattn_qmatrix_format format = QATTN_QMATRIX_DENSE_F16;
    int64_t in_features = 0;   // K
    int64_t out_features = 0;  // N
    bool has_bias = false;
    // GPTQ only
    int bits = 0;
    int64_t num_groups = 0;
    bool zero_offset_one = true;
    bool has_g_idx = false;
};

// Weights of a QMatrix, in host memory, checked against QMatrixInfo. The backend
// copies what it keeps; these pointers die after creation.
struct QMatrixHostWeights {
    const uint16_t* bias = nullptr;     // fp16 bits [N]
    const uint16_t* weight = nullptr;   // dense: fp16 bits [N, K]
    const int32_t* qweight = nullptr;   // GPTQ: [K * bits / 32, N]
    const int32_t* qzeros = nullptr;    // GPTQ: [G, N * bits / 32]
    const uint16_t* scales = nullptr;   // GPTQ: fp16 bits [G, N]
    std::vector<int32_t> g_idx;         // GPTQ: [K], always filled (k / group_size if absent)
};

class QMatrixImpl {
public:
    virtual ~QMatrixImpl() = default;
};

// ---- Layer -----------------------------------------------------------------

struct NormInfo {
    qattn_norm_type type = QATTN_NORM_NONE;
    float eps = 1e-6f;
    bool has_bias = false;
    bool per_head = false;
    int width = 0;       // elements normalised together (H, or D for head norms)
    int weight_len = 0;  // width, or heads * D for per-head norms
    bool enabled() const { return type != QATTN_NORM_NONE; }
};

struct LayerInfo {
    int device = QATTN_DEVICE_CPU;
    int hidden_size = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0;
    int max_rows = 0, max_seq_len = 0;
    NormInfo input_norm, q_norm, k_norm, post_norm;
    qattn_rope_type rope = QATTN_ROPE_NONE;
    int rotary_dim = 0;
    bool has_residual = true, residual_fp32 = false, use_graphs = false;
    int q_width() const { return num_heads * head_dim; }
    int kv_width() const { return num_kv_heads * head_dim; }
};

// Host copies of the layer's small weights (fp16 bits); empty when absent.
struct NormWeights {
    std::vector<uint16_t> weight, bias;
};
struct LayerHostWeights {
    NormWeights input_norm, q_norm, k_norm, post_norm;
};

struct LoraSpec {
    int id = 0;
    qattn_proj proj = QATTN_PROJ_Q;
    int rank = 0;
    int in_features = 0, out_features = 0;
    std::vector<uint16_t> a;  // fp16 bits [in, rank]
    std::vector<uint16_t> b;  // fp16 bits [rank, out]
};

// Indices into the backend's adapter list (the order of set_loras), per projection.
using ActiveLoras = std::array<std::vector<int>, 4>;

struct Forward1Call {
    int batch = 0, q_len = 0, rows = 0;
    const void* x = nullptr;
    int past_len = 0;
    const int32_t* past_lens = nullptr;  // device memory of the layer, or null
    const float* sin = nullptr;
    const float* cos = nullptr;
    int max_positions = 0;
    void* q = nullptr;
    void* k = nullptr;
    void* v = nullptr;
    const ActiveLoras* loras = nullptr;
    // Optional KV-cache destination of k and v (see qattn_forward1_args).
    void* k_cache = nullptr;
    void* v_cache = nullptr;
    const int32_t* kv_slots = nullptr;  // device memory of the layer, or null
    int64_t num_kv_slots = 0;
};

struct Forward2Call {
    int batch = 0, q_len = 0, rows = 0;
    void* x = nullptr;
    const void* attn_out = nullptr;
    const ActiveLoras* loras = nullptr;
};

class LayerImpl {
public:
    virtual ~LayerImpl() = default;
    virtual qattn_status forward1(const Forward1Call& call, void* stream) = 0;
    virtual qattn_status forward2(const Forward2Call& call, void* stream) = 0;
    // Replaces every adapter; index i of `loras` is the index ActiveLoras refers to.
    virtual qattn_status set_loras(const std::vector<LoraSpec>& loras) = 0;
    virtual qattn_status check_device_errors(void* stream) = 0;
};

// Per-call device memory that layers may share (qattn_scratch). The backend
// that made it is the only one that reads it.
class ScratchImpl {
public:
    virtual ~ScratchImpl() = default;
};

struct LayerProjections {
    const QMatrixImpl* q = nullptr;
    const QMatrixImpl* k = nullptr;
    const QMatrixImpl* v = nullptr;
    const QMatrixImpl* o = nullptr;
};

// ---- Backend factories -------------------------------------------------------

namespace cpu {
qattn_status create_qmatrix(const QMatrixInfo& info, const QMatrixHostWeights& weights,
                            std::unique_ptr<QMatrixImpl>* out);
qattn_status create_layer(const LayerInfo& info, const LayerHostWeights& weights,
                          const LayerProjections& projections, std::unique_ptr<LayerImpl>* out);
}  // namespace cpu

#if defined(QATTN_WITH_CUDA)
namespace cuda {
qattn_status create_qmatrix(const QMatrixInfo& info, const QMatrixHostWeights& weights,
                            std::unique_ptr<QMatrixImpl>* out);
// scratch: shared with other layers (made by create_scratch), or null for the layer's own.
qattn_status create_layer(const LayerInfo& info, const LayerHostWeights& weights,
                          const LayerProjections& projections, std::shared_ptr<ScratchImpl> scratch,
                          std::unique_ptr<LayerImpl>* out);
qattn_status create_scratch(int device, std::shared_ptr<ScratchImpl>* out);
const char* architectures();
}  // namespace cuda
#endif

}  // namespace qattn
