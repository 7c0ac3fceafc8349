// The element-wise operations of the attention block, in fp32, one vector at a
// time. These functions are the reference semantics that the CUDA kernels match.
#pragma once

#include "core/backend.h"

#include <vector>

namespace qattn::cpu {

// A norm's parameters widened to fp32; `weight`/`bias` are [width] or [heads, width].
struct Norm {
    NormInfo info;
    std::vector<float> weight, bias;
    bool enabled() const { return info.enabled(); }
};

Norm widen(const NormInfo& info, const NormWeights& weights);

// RMSNorm:   v * rsqrt(mean(v^2) + eps) * w
// LayerNorm: (v - mean) * rsqrt(var + eps) * w (+ b), var the biased variance.
// `head` selects the weight row of a per-head norm (ignored otherwise).
void normalize(const Norm& norm, float* v, int head = 0);

// Rotates the first `rotary_dim` dims of one head vector by the table rows of its
// position. NeoX pairs (i, i + rotary_dim/2); GPT-J pairs (2i, 2i + 1); pair i uses
// sin_row[i] and cos_row[i].
void rotate(qattn_rope_type type, int rotary_dim, const float* sin_row, const float* cos_row, float* head);

}  // namespace qattn::cpu
