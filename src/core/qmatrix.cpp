// qattn_qmatrix_*: validates a weight descriptor, brings its tensors to the host
// once, and hands them to the backend of the target device.
#include "core/device.h"
#include "core/guard.h"
#include "core/handles.h"
#include "core/validate.h"

namespace qattn {
namespace {

qattn_status check_gptq_shapes(const qattn_qmatrix_desc& d, QMatrixInfo* info) {
    QATTN_REQUIRE_ARG(d.bits == 4 || d.bits == 8, "GPTQ bits must be 4 or 8, got %d", d.bits);
    const int64_t per_word = 32 / d.bits;
    QATTN_REQUIRE_ARG(d.in_features % per_word == 0,
                      "GPTQ in_features (%lld) must be a multiple of %lld (values per int32 word)",
                      (long long)d.in_features, (long long)per_word);
    QATTN_REQUIRE_ARG(d.out_features % per_word == 0,
                      "GPTQ out_features (%lld) must be a multiple of %lld (qzeros packs along N)",
                      (long long)d.out_features, (long long)per_word);
    QATTN_REQUIRE_ARG(d.qweight && d.qzeros && d.scales, "GPTQ needs qweight, qzeros and scales (got NULL)");
    int64_t groups = d.num_groups;
    if (groups == 0) {
        QATTN_REQUIRE_ARG(d.group_size > 0, "GPTQ group_size must be > 0 when num_groups is 0, got %d",
                          d.group_size);
        groups = (d.in_features + d.group_size - 1) / d.group_size;
    }
    QATTN_REQUIRE_ARG(groups > 0 && groups <= d.in_features,
                      "GPTQ num_groups must be in [1, in_features=%lld], got %lld",
                      (long long)d.in_features, (long long)groups);
    QATTN_REQUIRE_ARG(d.g_idx != nullptr || d.group_size > 0, "GPTQ without g_idx needs group_size > 0");
    info->bits = d.bits;
    info->num_groups = groups;
    info->zero_offset_one = d.zero_offset_one != 0;
    info->has_g_idx = d.g_idx != nullptr;
    return QATTN_SUCCESS;
}

struct StagedWeights {
    HostView bias, weight, qweight, qzeros, scales, g_idx;
    QMatrixHostWeights view;
};

qattn_status stage(const qattn_qmatrix_desc& d, const QMatrixInfo& info, StagedWeights* s) {
    const int64_t K = info.in_features, N = info.out_features;
    QATTN_TRY(s->bias.load(d.bias, sizeof(uint16_t) * N));
    s->view.bias = s->bias.as<uint16_t>();
    if (info.format == QATTN_QMATRIX_DENSE_F16) {
        QATTN_TRY(s->weight.load(d.weight, sizeof(uint16_t) * N * K));
        s->view.weight = s->weight.as<uint16_t>();
        return QATTN_SUCCESS;
    }
    const int64_t per_word = 32 / info.bits, G = info.num_groups;
    QATTN_TRY(s->qweight.load(d.qweight, sizeof(int32_t) * (K / per_word) * N));
    QATTN_TRY(s->qzeros.load(d.qzeros, sizeof(int32_t) * G * (N / per_word)));
    QATTN_TRY(s->scales.load(d.scales, sizeof(uint16_t) * G * N));
    s->view.qweight = s->qweight.as<int32_t>();
    s->view.qzeros = s->qzeros.as<int32_t>();
    s->view.scales = s->scales.as<uint16_t>();
    s->view.g_idx.resize(K);
    if (d.g_idx) {
        QATTN_TRY(s->g_idx.load(d.g_idx, sizeof(int32_t) * K));
        const int32_t* g = s->g_idx.as<int32_t>();
        for (int64_t k = 0; k < K; ++k) {
            QATTN_REQUIRE(g[k] >= 0 && g[k] < G, QATTN_ERROR_OUT_OF_RANGE,
                          "GPTQ g_idx[%lld] = %d is outside [0, num_groups=%lld)", (long long)k, g[k],
                          (long long)G);
            s->view.g_idx[k] = g[k];
        }
    } else {
        for (int64_t k = 0; k < K; ++k) {
            const int64_t g = k / d.group_size;
            QATTN_REQUIRE_ARG(g < G, "GPTQ group_size %d with num_groups %lld does not cover in_features %lld",
                              d.group_size, (long long)G, (long long)K);
            s->view.g_idx[k] = static_cast<int32_t>(g);
        }
    }
    return QATTN_SUCCESS;
}

qattn_status create(const qattn_qmatrix_desc* desc, qattn_qmatrix** out) {
    QATTN_REQUIRE_ARG(out != nullptr, "qattn_qmatrix_create: out is NULL");
    *out = nullptr;
    qattn_qmatrix_desc d;
    QATTN_TRY(read_versioned("qattn_qmatrix_desc", desc, qattn_qmatrix_desc_default(), &d));
    QATTN_TRY(check_device(d.device));
    QATTN_REQUIRE_ARG(d.in_features > 0 && d.out_features > 0,
                      "QMatrix in_features and out_features must be > 0, got %lld and %lld",
                      (long long)d.in_features, (long long)d.out_features);
    QATTN_REQUIRE_ARG(d.in_features <= kMaxFeatures && d.out_features <= kMaxFeatures,
                      "QMatrix dimensions above 2^20 are not supported (got %lld x %lld)",
                      (long long)d.in_features, (long long)d.out_features);

    QMatrixInfo info;
    info.device = d.device;
    info.format = d.format;
    info.in_features = d.in_features;
    info.out_features = d.out_features;
    info.has_bias = d.bias != nullptr;
    switch (d.format) {
        case QATTN_QMATRIX_DENSE_F16:
            QATTN_REQUIRE_ARG(d.weight != nullptr, "dense QMatrix: weight is NULL");
            break;
        case QATTN_QMATRIX_GPTQ:
            QATTN_TRY(check_gptq_shapes(d, &info));
            break;
        default:
            return fail(QATTN_ERROR_INVALID_ARGUMENT, "unknown QMatrix format %d", (int)d.format);
    }

    StagedWeights staged;
    QATTN_TRY(stage(d, info, &staged));

    auto matrix = std::make_unique<qattn_qmatrix>();
    matrix->info = info;
    if (d.device == QATTN_DEVICE_CPU) {
        QATTN_TRY(cpu::create_qmatrix(info, staged.view, &matrix->impl));
    } else {
#if defined(QATTN_WITH_CUDA)
        QATTN_TRY(cuda::create_qmatrix(info, staged.view, &matrix->impl));
#endif
    }
    *out = matrix.release();
    return QATTN_SUCCESS;
}

}  // namespace
}  // namespace qattn

extern "C" {

qattn_qmatrix_desc qattn_qmatrix_desc_default(void) {
    qattn_qmatrix_desc d{};
    d.struct_size = sizeof d;
    d.format = QATTN_QMATRIX_DENSE_F16;
    d.device = QATTN_DEVICE_CPU;
    d.bits = 4;
    d.group_size = 128;
    d.zero_offset_one = 1;
    return d;
}

qattn_status qattn_qmatrix_create(const qattn_qmatrix_desc* desc, qattn_qmatrix** out) {
    return qattn::guarded("qattn_qmatrix_create", [&] { return qattn::create(desc, out); });
}

qattn_status qattn_qmatrix_destroy(qattn_qmatrix* matrix) {
    return qattn::guarded("qattn_qmatrix_destroy", [&] {
        delete matrix;
        return QATTN_SUCCESS;
    });
}

}  // extern "C"
