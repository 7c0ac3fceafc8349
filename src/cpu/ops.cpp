#include "cpu/ops.h"

#include "cpu/half.h"

#include <cmath>

namespace qattn::cpu {

Norm widen(const NormInfo& info, const NormWeights& weights) {
    Norm norm;
    norm.info = info;
    for (uint16_t w : weights.weight) norm.weight.push_back(half_to_float(w));
    for (uint16_t b : weights.bias) norm.bias.push_back(half_to_float(b));
    return norm;
}

void normalize(const Norm& norm, float* v, int head) {
    const NormInfo& info = norm.info;
    const int n = info.width;
    const size_t offset = info.per_head ? static_cast<size_t>(head) * n : 0;
    const float* w = norm.weight.data() + offset;
    const float* b = norm.bias.empty() ? nullptr : norm.bias.data() + offset;

    float mean = 0.0f;
    if (info.type == QATTN_NORM_LAYER) {
        for (int i = 0; i < n; ++i) mean += v[i];
        mean /= n;
    }
    float square_sum = 0.0f;
    for (int i = 0; i < n; ++i) square_sum += (v[i] - mean) * (v[i] - mean);
    const float inv = 1.0f / std::sqrt(square_sum / n + info.eps);
    for (int i = 0; i < n; ++i) v[i] = (v[i] - mean) * inv * w[i] + (b ? b[i] : 0.0f);
}

void rotate(qattn_rope_type type, int rotary_dim, const float* sin_row, const float* cos_row, float* head) {
    const int pairs = rotary_dim / 2;
    for (int i = 0; i < pairs; ++i) {
        const int first = type == QATTN_ROPE_NEOX ? i : 2 * i;
        const int second = type == QATTN_ROPE_NEOX ? i + pairs : 2 * i + 1;
        const float a = head[first], b = head[second];
        head[first] = a * cos_row[i] - b * sin_row[i];
        head[second] = b * cos_row[i] + a * sin_row[i];
    }
}

}  // namespace qattn::cpu
