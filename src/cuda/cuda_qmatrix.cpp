// Uploads a QMatrix and repacks GPTQ 4-bit for the tensor-core GEMV (layout in
// cuda_qmatrix.h). The repacking runs once on the host, at creation.
#include "cuda/cuda_qmatrix.h"

#include "cpu/half.h"

#include <algorithm>
#include <vector>

namespace qattn::cuda {
namespace {

inline uint32_t unpack(const int32_t* words, int64_t index, int bits) {
    const int per_word = 32 / bits;
    return (static_cast<uint32_t>(words[index / per_word]) >> ((index % per_word) * bits)) & ((1u << bits) - 1);
}

inline uint16_t half_bits_of(float v) { return cpu::float_to_half(v); }

}  // namespace

qattn_status CudaQMatrix::create(const QMatrixInfo& info, const QMatrixHostWeights& weights,
                                 std::unique_ptr<QMatrixImpl>* out) {
    DeviceGuard guard;
    QATTN_TRY(guard.enter(info.device));
    std::unique_ptr<CudaQMatrix> m(new CudaQMatrix(info));
    if (weights.bias) QATTN_TRY(m->bias_.upload(weights.bias, sizeof(uint16_t) * info.out_features));
    if (info.format == QATTN_QMATRIX_DENSE_F16) {
        QATTN_TRY(m->load_dense(weights));
    } else if (info.bits == 4) {
        QATTN_TRY(m->pack_gptq4(weights));
    } else {
        QATTN_TRY(m->load_gptq_as_dense(weights));
    }
    // Pageable uploads may still be in flight when cudaMemcpy returns; a caller's
    // non-blocking stream would not wait for them.
    QATTN_CUDA_TRY(cudaStreamSynchronize(nullptr));
    *out = std::move(m);
    return QATTN_SUCCESS;
}

qattn_status CudaQMatrix::load_dense(const QMatrixHostWeights& w) {
    return dense_.upload(w.weight, sizeof(uint16_t) * info_.in_features * info_.out_features);
}

// GPTQ 8-bit: W[k, n] = scales[g, n] * (q - z), rounded to fp16 once, stored [N, K].
qattn_status CudaQMatrix::load_gptq_as_dense(const QMatrixHostWeights& w) {
    const int64_t K = info_.in_features, N = info_.out_features;
    const int bits = info_.bits, per_word = 32 / bits;
    const uint32_t offset = info_.zero_offset_one ? 1 : 0;
    std::vector<uint16_t> dense(static_cast<size_t>(K * N));
    for (int64_t k = 0; k < K; ++k) {
        const int64_t g = w.g_idx[k];
        const int32_t* qrow = w.qweight + (k / per_word) * N;
        const int shift = static_cast<int>(k % per_word) * bits;
        for (int64_t n = 0; n < N; ++n) {
            const int q = static_cast<int>((static_cast<uint32_t>(qrow[n]) >> shift) & ((1u << bits) - 1));
            const int z = static_cast<int>(unpack(w.qzeros + g * (N / per_word), n, bits) + offset);
            const float s = cpu::half_to_float(w.scales[g * N + n]);
            dense[n * K + k] = half_bits_of(s * static_cast<float>(q - z));
        }
    }
    return dense_.upload(dense.data(), sizeof(uint16_t) * dense.size());
}

qattn_status CudaQMatrix::pack_gptq4(const QMatrixHostWeights& w) {
    const int64_t K = info_.in_features, N = info_.out_features, G = info_.num_groups;
    const int64_t n_tiles = N / 8;
    const uint32_t offset = info_.zero_offset_one ? 1 : 0;

    // Packed row order: the rows of group 0, then group 1, ... (act-order undone),
    // each group padded to 16 rows, the whole padded to 128.
    std::vector<std::vector<int32_t>> members(G);
    for (int64_t k = 0; k < K; ++k) members[w.g_idx[k]].push_back(static_cast<int32_t>(k));
    std::vector<int32_t> perm, step_group;
    for (int64_t g = 0; g < G; ++g) {
        if (members[g].empty()) continue;
        for (int32_t k : members[g]) perm.push_back(k);
        while (perm.size() % 16) perm.push_back(-1);
        step_group.resize(perm.size() / 16, static_cast<int32_t>(g));
    }
    const int32_t last_group = step_group.back();
    while (perm.size() % kPackRows) perm.push_back(-1);
    step_group.resize(perm.size() / 16, last_group);
    const int64_t chunks = static_cast<int64_t>(perm.size()) / kPackRows;
    if (chunks > 65535)
        return fail(QATTN_ERROR_NOT_SUPPORTED, "GPTQ matrix too tall for the CUDA backend (%lld packed rows)",
                    (long long)perm.size());

    // Lane (g, t) of the warp owning n-tile `nt` holds, for MMA step j of a chunk,
    // rows 2t, 2t+1 (fragment b0) and 2t+8, 2t+9 (b1) of column 8*nt + g. Word j/2
    // of its 16 bytes holds steps j (bits 0..7 | 16..23) and j+1 (8..15 | 24..31);
    // within a byte pair the b0 nibbles come first, and the second row of each
    // pair sits 16 bits above the first so one lop3 yields an fp16x2.
    std::vector<uint32_t> qpack(static_cast<size_t>(chunks * n_tiles * 32 * 4), 0u);
    for (int64_t row = 0; row < static_cast<int64_t>(perm.size()); ++row) {
        const int32_t k = perm[row];
        if (k < 0) continue;
        const int64_t chunk = row / kPackRows, within = row % kPackRows;
        const int step = static_cast<int>(within / 16), kt = static_cast<int>(within % 16);
        const int hi = kt / 8, t = (kt % 8) / 2, second = kt % 2;
        const int word = step / 2, bit = (step % 2) * 8 + hi * 4 + second * 16;
        const int32_t* qrow = w.qweight + (k / 8) * N;
        const int shift = static_cast<int>(k % 8) * 4;
        for (int64_t n = 0; n < N; ++n) {
            const uint32_t q = (static_cast<uint32_t>(qrow[n]) >> shift) & 0xFu;
            const int64_t lane = (n % 8) * 4 + t;
            qpack[((chunk * n_tiles + n / 8) * 32 + lane) * 4 + word] |= q << bit;
        }
    }

    // (scale, 1024 + z): 1024 + q - (1024 + z) is exact in fp16 for 4-bit values.
    std::vector<uint16_t> scale_zero(static_cast<size_t>(G * N * 2));
    for (int64_t g = 0; g < G; ++g)
        for (int64_t n = 0; n < N; ++n) {
            scale_zero[(g * N + n) * 2] = w.scales[g * N + n];
            scale_zero[(g * N + n) * 2 + 1] =
                half_bits_of(1024.0f + static_cast<float>(unpack(w.qzeros + g * (N / 8), n, 4) + offset));
        }

    std::vector<uint16_t> chunk_scale_zero(static_cast<size_t>(chunks * N * 2));
    std::vector<uint32_t> mixed_chunks(static_cast<size_t>((chunks + 31) / 32), 0u);
    single_group_chunks_ = true;
    for (int64_t c = 0; c < chunks; ++c) {
        const int32_t first = step_group[c * 8];
        std::copy_n(scale_zero.begin() + first * N * 2, N * 2, chunk_scale_zero.begin() + c * N * 2);
        if (step_group[c * 8 + 7] != first) {
            mixed_chunks[c / 32] |= 1u << (c % 32);
            single_group_chunks_ = false;
        }
    }

    QATTN_TRY(qpack_buf_.upload(qpack.data(), sizeof(uint32_t) * qpack.size()));
    QATTN_TRY(chunk_scale_zero_buf_.upload(chunk_scale_zero.data(), sizeof(uint16_t) * chunk_scale_zero.size()));
    QATTN_TRY(mixed_chunks_buf_.upload(mixed_chunks.data(), sizeof(uint32_t) * mixed_chunks.size()));
    QATTN_TRY(scale_zero_buf_.upload(scale_zero.data(), sizeof(uint16_t) * scale_zero.size()));
    QATTN_TRY(perm_buf_.upload(perm.data(), sizeof(int32_t) * perm.size()));
    QATTN_TRY(step_group_buf_.upload(step_group.data(), sizeof(int32_t) * step_group.size()));
    packed_.qpack = qpack_buf_.get<uint4>();
    packed_.scale_zero = scale_zero_buf_.get<__half2>();
    packed_.perm = perm_buf_.get<int32_t>();
    packed_.step_group = step_group_buf_.get<int32_t>();
    packed_.chunk_scale_zero = chunk_scale_zero_buf_.get<__half2>();
    packed_.mixed_chunks = mixed_chunks_buf_.get<uint32_t>();
    packed_.chunks = static_cast<int>(chunks);
    identity_order_ = static_cast<int64_t>(perm.size()) == info_.in_features;
    for (size_t j = 0; identity_order_ && j < perm.size(); ++j) identity_order_ = perm[j] == static_cast<int32_t>(j);
    perm_host_ = std::move(perm);
    return QATTN_SUCCESS;
}

qattn_status create_qmatrix(const QMatrixInfo& info, const QMatrixHostWeights& weights,
                            std::unique_ptr<QMatrixImpl>* out) {
    return CudaQMatrix::create(info, weights, out);
}

}  // namespace qattn::cuda
