// A QMatrix on the CPU: whatever its format, dequantized once to fp32 [K, N].
#pragma once

#include "core/backend.h"

#include <vector>

namespace qattn::cpu {

class CpuQMatrix final : public QMatrixImpl {
public:
    CpuQMatrix(const QMatrixInfo& info, std::vector<float> weight, std::vector<float> bias)
        : info_(info), weight_(std::move(weight)), bias_(std::move(bias)) {}

    int64_t out_features() const { return info_.out_features; }

    // y[r, :] = x[r, :] . W (+ bias), for `rows` rows of K inputs into N outputs.
    void multiply(const float* x, int rows, float* y) const;

private:
    QMatrixInfo info_;
    std::vector<float> weight_;  // [K, N]
    std::vector<float> bias_;    // [N] or empty
};

}  // namespace qattn::cpu
