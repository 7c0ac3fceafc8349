// The opaque handle types of the public header.
#pragma once

#include "core/backend.h"

#include <map>
#include <utility>

struct qattn_qmatrix {
    qattn::QMatrixInfo info;
    std::unique_ptr<qattn::QMatrixImpl> impl;
};

struct qattn_layer {
    qattn::LayerInfo info;
    std::unique_ptr<qattn::LayerImpl> impl;
    // (adapter id, projection) -> index in the backend's adapter list.
    std::map<std::pair<int, int>, int> lora_index;
    // Scratch for resolving active adapter ids, kept to avoid per-call allocation.
    qattn::ActiveLoras active;
};
