// Library identity and the creation of every kind of QMatrix and layer.
#include "model.h"

#include <cstddef>
#include <thread>

namespace qtest {
namespace {

TEST(Library, VersionMatchesHeader) {
    EXPECT_EQ(qattn_version(), QATTN_VERSION);
    EXPECT_EQ(QATTN_VERSION, QATTN_VERSION_MAJOR * 10000 + QATTN_VERSION_MINOR * 100 + QATTN_VERSION_PATCH);
}

TEST(Library, BuildInfoNamesVersionAndBackends) {
    const std::string info = qattn_build_info();
    const std::string version = std::to_string(QATTN_VERSION_MAJOR) + "." + std::to_string(QATTN_VERSION_MINOR) +
                                "." + std::to_string(QATTN_VERSION_PATCH);
    EXPECT_NE(info.find(version), std::string::npos) << info;
    EXPECT_NE(info.find("cpu"), std::string::npos) << info;
#if defined(QATTN_TESTS_WITH_CUDA)
    EXPECT_NE(info.find("cuda"), std::string::npos) << info;
#else
    EXPECT_EQ(info.find("cuda"), std::string::npos) << info;
    EXPECT_EQ(qattn_cuda_device_count(), 0);
#endif
    EXPECT_GE(qattn_cuda_device_count(), 0);
}

TEST(Library, StatusStringNamesEveryCode) {
    const std::pair<qattn_status, const char*> codes[] = {
        {QATTN_SUCCESS, "QATTN_SUCCESS"},
        {QATTN_ERROR_INVALID_ARGUMENT, "QATTN_ERROR_INVALID_ARGUMENT"},
        {QATTN_ERROR_OUT_OF_RANGE, "QATTN_ERROR_OUT_OF_RANGE"},
        {QATTN_ERROR_NOT_SUPPORTED, "QATTN_ERROR_NOT_SUPPORTED"},
        {QATTN_ERROR_OUT_OF_MEMORY, "QATTN_ERROR_OUT_OF_MEMORY"},
        {QATTN_ERROR_CUDA, "QATTN_ERROR_CUDA"},
        {QATTN_ERROR_INTERNAL, "QATTN_ERROR_INTERNAL"},
    };
    for (const auto& [code, name] : codes) EXPECT_STREQ(qattn_status_string(code), name);
    const char* unknown = qattn_status_string(static_cast<qattn_status>(12345));
    ASSERT_NE(unknown, nullptr);
    EXPECT_NE(std::string(unknown).find("UNKNOWN"), std::string::npos) << unknown;
}

TEST(Library, LastErrorIsPerThreadMessage) {
    QTEST_EXPECT_ERROR(qattn_qmatrix_create(nullptr, nullptr), QATTN_ERROR_INVALID_ARGUMENT, "NULL");
    std::string other_thread;
    std::thread([&] { other_thread = qattn_last_error(); }).join();
    EXPECT_EQ(other_thread, "");
    EXPECT_NE(std::string(qattn_last_error()), "");
}

TEST(Library, DefaultsAreDocumented) {
    const qattn_qmatrix_desc d = qattn_qmatrix_desc_default();
    EXPECT_EQ(d.struct_size, sizeof d);
    EXPECT_EQ(d.device, QATTN_DEVICE_CPU);
    EXPECT_EQ(d.bits, 4);
    EXPECT_EQ(d.group_size, 128);
    EXPECT_EQ(d.zero_offset_one, 1);
    const qattn_layer_config c = qattn_layer_config_default();
    EXPECT_EQ(c.struct_size, sizeof c);
    EXPECT_EQ(c.has_residual, 1);
    EXPECT_EQ(c.rope, QATTN_ROPE_NONE);
    EXPECT_EQ(c.scratch, nullptr);
    EXPECT_EQ(qattn_forward1_args_default().struct_size, sizeof(qattn_forward1_args));
    EXPECT_EQ(qattn_forward2_args_default().struct_size, sizeof(qattn_forward2_args));
    EXPECT_EQ(qattn_lora_desc_default().struct_size, sizeof(qattn_lora_desc));
}

TEST(Library, DestroyNullIsAccepted) {
    EXPECT_EQ(qattn_destroy(nullptr), QATTN_SUCCESS);
    EXPECT_EQ(qattn_qmatrix_destroy(nullptr), QATTN_SUCCESS);
    EXPECT_EQ(qattn_scratch_destroy(nullptr), QATTN_SUCCESS);
}

class Create : public ::testing::TestWithParam<int> {
protected:
    void SetUp() override { QTEST_SKIP_IF_ABSENT(GetParam()); }
    int device() const { return GetParam(); }

    QMatrixPtr create(const qattn_qmatrix_desc& desc) {
        qattn_qmatrix* m = nullptr;
        const qattn_status s = qattn_qmatrix_create(&desc, &m);
        EXPECT_EQ(s, QATTN_SUCCESS) << failure_text(s);
        return QMatrixPtr(m);
    }
};

TEST_P(Create, DenseWithAndWithoutBias) {
    Random rng(1);
    for (bool bias : {false, true}) {
        const MatrixData m = make_dense(rng, 48, 24, bias);
        EXPECT_NE(create(m.desc(device())), nullptr);
    }
}

TEST_P(Create, GptqEveryOption) {
    Random rng(2);
    for (int bits : {4, 8})
        for (bool act_order : {false, true})
            for (bool offset : {false, true})
                for (bool bias : {false, true}) {
                    SCOPED_TRACE(std::to_string(bits) + " bits, act_order " + std::to_string(act_order) +
                                 ", zero_offset_one " + std::to_string(offset) + ", bias " + std::to_string(bias));
                    const MatrixData m = make_gptq(rng, 64, 32, bits, 16, act_order, offset, bias);
                    EXPECT_NE(create(m.desc(device())), nullptr);
                }
    // num_groups given explicitly beside group_size, and a group size that does
    // not divide K (the last group is short).
    MatrixData m = make_gptq(rng, 64, 32, 4, 16, false, true, false);
    qattn_qmatrix_desc d = m.desc(device());
    d.num_groups = 4;
    EXPECT_NE(create(d), nullptr);
    m = make_gptq(rng, 40, 16, 4, 16, false, true, false);
    EXPECT_NE(create(m.desc(device())), nullptr);
}

// Weights may come from the target device's memory as well as from the host.
TEST_P(Create, WeightsInDeviceMemory) {
    Random rng(3);
    const MatrixData m = make_gptq(rng, 64, 32, 4, 16, true, true, true);
    const DeviceBuffer qweight(device(), m.qweight), qzeros(device(), m.qzeros), scales(device(), m.scales),
        g_idx(device(), m.g_idx), bias(device(), m.bias);
    qattn_qmatrix_desc d = m.desc(device());
    d.qweight = qweight.as<int32_t>();
    d.qzeros = qzeros.as<int32_t>();
    d.scales = scales.get();
    d.g_idx = g_idx.as<int32_t>();
    d.bias = bias.get();
    EXPECT_NE(create(d), nullptr);

    const MatrixData dense = make_dense(rng, 32, 16, false);
    const DeviceBuffer weight(device(), dense.weight);
    qattn_qmatrix_desc dd = dense.desc(device());
    dd.weight = weight.get();
    EXPECT_NE(create(dd), nullptr);
}

// A struct from an older header (shorter, without the trailing fields) still works.
TEST_P(Create, ShorterStructFromOlderCaller) {
    Random rng(4);
    const MatrixData m = make_dense(rng, 32, 16, false);
    qattn_qmatrix_desc d = m.desc(device());
    d.struct_size = offsetof(qattn_qmatrix_desc, bits);
    EXPECT_NE(create(d), nullptr);
}

TEST_P(Create, LayerConfigWithoutScratchFromOlderCaller) {
    Random rng(6);
    const BlockData data(Scenario{}, rng);
    LibraryLayer lib;
    QTEST_ASSERT_OK(build_layer(data, device(), 4, &lib));
    qattn_layer_config c = lib.config;
    c.struct_size = offsetof(qattn_layer_config, scratch);
    qattn_layer* layer = nullptr;
    const qattn_status status = qattn_create(&c, &layer);
    EXPECT_EQ(status, QATTN_SUCCESS) << failure_text(status);
    qattn_destroy(layer);
}

// Layers made with one scratch outlive its handle: each holds its share.
TEST_P(Create, LayersKeepTheirScratchAfterItsHandle) {
    Random rng(7);
    Scenario s;
    s.rope = QATTN_ROPE_NONE;  // forward1 without tables
    const BlockData data(s, rng);
    LibraryLayer lib;
    QTEST_ASSERT_OK(build_layer(data, device(), 4, &lib));
    qattn_scratch* scratch = nullptr;
    QTEST_ASSERT_OK(qattn_scratch_create(device(), &scratch));
    qattn_layer_config c = lib.config;
    c.scratch = scratch;
    qattn_layer *first = nullptr, *second = nullptr;
    QTEST_ASSERT_OK(qattn_create(&c, &first));
    QTEST_ASSERT_OK(qattn_create(&c, &second));
    LayerPtr a(first), b(second);
    QTEST_ASSERT_OK(qattn_scratch_destroy(scratch));
    DeviceBuffer x(device(), rng.halves(static_cast<size_t>(data.s.hidden), -1, 1));
    DeviceBuffer q(device(), sizeof(uint16_t) * data.q_width()), k(device(), sizeof(uint16_t) * data.kv_width()),
        v(device(), sizeof(uint16_t) * data.kv_width());
    qattn_forward1_args f = qattn_forward1_args_default();
    f.batch = f.q_len = 1;
    f.x = x.get();
    f.q = q.get();
    f.k = k.get();
    f.v = v.get();
    QTEST_ASSERT_OK(qattn_forward1(a.get(), &f, nullptr));
    QTEST_ASSERT_OK(qattn_forward1(b.get(), &f, nullptr));
}

TEST_P(Create, LayersWithEveryOption) {
    Random rng(5);
    struct Case {
        const char* what;
        void (*edit)(Scenario&);
    };
    const Case cases[] = {
        {"plain", [](Scenario&) {}},
        {"rms input norm, no rope", [](Scenario& s) { s.rope = QATTN_ROPE_NONE; }},
        {"layer input norm with bias", [](Scenario& s) { s.input_norm = QATTN_NORM_LAYER, s.input_norm_bias = true; }},
        {"layer input norm without bias", [](Scenario& s) { s.input_norm = QATTN_NORM_LAYER; }},
        {"rms head norm shared", [](Scenario& s) { s.head_norm = QATTN_NORM_RMS; }},
        {"rms head norm per head", [](Scenario& s) { s.head_norm = QATTN_NORM_RMS, s.head_norm_per_head = true; }},
        {"layer head norm per head", [](Scenario& s) { s.head_norm = QATTN_NORM_LAYER, s.head_norm_per_head = true; }},
        {"post norm rms", [](Scenario& s) { s.post_norm = QATTN_NORM_RMS; }},
        {"post norm layer", [](Scenario& s) { s.post_norm = QATTN_NORM_LAYER; }},
        {"gptj partial rotary", [](Scenario& s) { s.rope = QATTN_ROPE_GPTJ, s.rotary_dim = 4; }},
        {"neox rotary == head_dim", [](Scenario& s) { s.rotary_dim = 16; }},
        {"fp32 residual", [](Scenario& s) { s.residual_fp32 = true; }},
        {"no residual", [](Scenario& s) { s.has_residual = false; }},
        {"graphs", [](Scenario& s) { s.use_graphs = true; }},
        {"multi-query", [](Scenario& s) { s.kv_heads = 1; }},
        {"gptq", [](Scenario& s) { s.gptq = true; }},
    };
    for (const Case& c : cases) {
        SCOPED_TRACE(c.what);
        Scenario s;
        c.edit(s);
        const BlockData data(s, rng);
        LibraryLayer lib;
        const qattn_status status = build_layer(data, device(), 8, &lib);
        EXPECT_EQ(status, QATTN_SUCCESS) << failure_text(status);
        EXPECT_NE(lib.layer, nullptr);
        EXPECT_EQ(qattn_destroy(lib.layer.release()), QATTN_SUCCESS);
    }
}

// One QMatrix may serve several layers (K and V here share a matrix too).
TEST_P(Create, SharedProjections) {
    Random rng(6);
    const BlockData data(Scenario{}, rng);
    QMatrixPtr q = create(data.q.desc(device())), kv = create(data.k.desc(device())), o = create(data.o.desc(device()));
    const qattn_layer_config config = data.config(device(), q.get(), kv.get(), kv.get(), o.get(), 4);
    qattn_layer *a = nullptr, *b = nullptr;
    QTEST_ASSERT_OK(qattn_create(&config, &a));
    QTEST_ASSERT_OK(qattn_create(&config, &b));
    EXPECT_NE(a, b);
    EXPECT_EQ(qattn_destroy(a), QATTN_SUCCESS);
    EXPECT_EQ(qattn_destroy(b), QATTN_SUCCESS);
}

TEST_P(Create, LorasReplaceAndClear) {
    Random rng(7);
    Scenario s;
    s.loras = true;
    const BlockData data(s, rng);
    LibraryLayer lib;
    QTEST_ASSERT_OK(build_layer(data, device(), 4, &lib));
    const LayerPtr& layer = lib.layer;
    std::vector<qattn_lora_desc> descs;
    for (const LoraData& l : data.loras) descs.push_back(l.desc());
    int max_rank = 0;
    QTEST_ASSERT_OK(qattn_set_loras(layer.get(), descs.data(), static_cast<int>(descs.size()), &max_rank));
    EXPECT_EQ(max_rank, 5);
    QTEST_ASSERT_OK(qattn_set_loras(layer.get(), descs.data(), 2, &max_rank));
    EXPECT_EQ(max_rank, 4);
    QTEST_ASSERT_OK(qattn_set_loras(layer.get(), descs.data(), 1, nullptr));
    QTEST_ASSERT_OK(qattn_set_loras(layer.get(), nullptr, 0, &max_rank));
    EXPECT_EQ(max_rank, 0);
}

INSTANTIATE_TEST_SUITE_P(Devices, Create, ::testing::Values(QATTN_DEVICE_CPU, 0),
                         [](const ::testing::TestParamInfo<int>& info) { return device_name(info.param); });

}  // namespace
}  // namespace qtest
