// The opaque handle types of the public header.
#pragma once

#include "core/backend.h"

#include <map>
#include <utility>

struct qattn_qmatrix {
    qattn::QMatrixInfo info;
    std::unique_ptr<qattn::QMatrixImpl> impl;
};

// Null impl on the CPU, where a scratch holds nothing. Layers keep their own
// reference to impl, so the handle may go before them.
struct qattn_scratch {
    int device = QATTN_DEVICE_CPU;
    std::shared_ptr<qattn::ScratchImpl> impl;
};

struct qattn_layer {
    qattn::LayerInfo info;
    std::unique_ptr<qattn::LayerImpl> impl;
    // (adapter id, projection) -> index in the backend's adapter list.
    std::map<std::pair<int, int>, int> lora_index;
    // Scratch for resolving active adapter ids, kept to avoid per-call allocation.
    qattn::ActiveLoras active;
};

namespace qattn {
// The checked entry points, shared by qattn_forward1/2 and the whole block.
qattn_status forward1(qattn_layer* layer, const qattn_forward1_args* args, void* stream);
qattn_status forward2(qattn_layer* layer, const qattn_forward2_args* args, void* stream);
// batch and q_len > 0, and batch * q_len within the layer's max_rows.
qattn_status check_rows(const qattn_layer& layer, int batch, int q_len);
}  // namespace qattn
