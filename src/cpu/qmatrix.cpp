// Dequantization is the specification of each weight format.
#include "cpu/qmatrix.h"

#include "cpu/half.h"

namespace qattn::cpu {
namespace {

// Dense: the caller's weight is nn.Linear's [N, K]; W[k, n] = weight[n, k].
std::vector<float> dequantize_dense(const QMatrixInfo& info, const uint16_t* weight) {
    const int64_t K = info.in_features, N = info.out_features;
    std::vector<float> w(static_cast<size_t>(K * N));
    for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < K; ++k) w[k * N + n] = half_to_float(weight[n * K + k]);
    return w;
}

// Value `index` of a row of int32 words packing `bits`-bit unsigned values, low bits first.
inline int32_t unpack(const int32_t* words, int64_t index, int bits) {
    const int per_word = 32 / bits;
    const uint32_t word = static_cast<uint32_t>(words[index / per_word]);
    return static_cast<int32_t>((word >> ((index % per_word) * bits)) & ((1u << bits) - 1));
}

// GPTQ: W[k, n] = scales[g, n] * (q[k, n] - z[g, n]), g = g_idx[k]; q packed along K
// (qweight [K/per_word, N]), z packed along N (qzeros [G, N/per_word]).
std::vector<float> dequantize_gptq(const QMatrixInfo& info, const QMatrixHostWeights& src) {
    const int64_t K = info.in_features, N = info.out_features;
    const int bits = info.bits, per_word = 32 / bits;
    std::vector<float> w(static_cast<size_t>(K * N));
    for (int64_t k = 0; k < K; ++k) {
        const int64_t g = src.g_idx[k];
        const int32_t* qrow = src.qweight + (k / per_word) * N;
        const int shift = static_cast<int>(k % per_word) * bits;
        for (int64_t n = 0; n < N; ++n) {
            const int32_t q = static_cast<int32_t>((static_cast<uint32_t>(qrow[n]) >> shift) & ((1u << bits) - 1));
            const int32_t z = unpack(src.qzeros + g * (N / per_word), n, bits) + (info.zero_offset_one ? 1 : 0);
            w[k * N + n] = half_to_float(src.scales[g * N + n]) * static_cast<float>(q - z);
        }
    }
    return w;
}

}  // namespace

void CpuQMatrix::multiply(const float* x, int rows, float* y) const {
    const int64_t K = info_.in_features, N = info_.out_features;
    for (int r = 0; r < rows; ++r) {
        float* out = y + r * N;
        for (int64_t n = 0; n < N; ++n) out[n] = bias_.empty() ? 0.0f : bias_[n];
        const float* in = x + r * K;
        for (int64_t k = 0; k < K; ++k) {
            const float xk = in[k];
            const float* wrow = weight_.data() + k * N;
            for (int64_t n = 0; n < N; ++n) out[n] += xk * wrow[n];
        }
    }
}

qattn_status create_qmatrix(const QMatrixInfo& info, const QMatrixHostWeights& weights,
                            std::unique_ptr<QMatrixImpl>* out) {
    std::vector<float> w = info.format == QATTN_QMATRIX_DENSE_F16 ? dequantize_dense(info, weights.weight)
                                                                   : dequantize_gptq(info, weights);
    std::vector<float> bias;
    if (weights.bias)
        for (int64_t n = 0; n < info.out_features; ++n) bias.push_back(half_to_float(weights.bias[n]));
    *out = std::make_unique<CpuQMatrix>(info, std::move(w), std::move(bias));
    return QATTN_SUCCESS;
}

}  // namespace qattn::cpu
