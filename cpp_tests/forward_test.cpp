// forward1 / forward2 against the double-precision reference in model.h, on
// random data, for every device this machine has.
#include "model.h"

#include <functional>
#include <tuple>

namespace qtest {
namespace {

// Tolerances on ||out - ref|| / ||ref||. The outputs are fp16, whose rounding alone
// gives about 3e-4 relative error. The CPU backend computes in fp32; CUDA kernels
// may also round intermediates (the normalised input, projections before RoPE) to
// fp16. Measured maxima over these cases: 2.4e-4 on the CPU, 4.6e-4 on an H100.
// A wrong formula (a missing bias, adapter, norm or rotation) gives 0.1 or more.
double tolerance(int device) { return device == QATTN_DEVICE_CPU ? 2e-3 : 3e-3; }

std::vector<Scenario> scenarios() {
    std::vector<Scenario> all;
    Scenario s;
    s.name = "dense_rms_neox_gqa_bias";
    s.q_bias = s.o_bias = true;
    all.push_back(s);

    s = Scenario{};
    s.name = "dense_lora_headnorm_partial_rotary_postnorm_pastlens";
    s.loras = true;
    s.head_norm = QATTN_NORM_RMS;
    s.rotary_dim = 8;
    s.post_norm = QATTN_NORM_RMS;
    s.use_past_lens = true;
    all.push_back(s);

    s = Scenario{};
    s.name = "gptq4_actorder_headnorm_lora_postnorm";
    s.gptq = true;
    s.act_order = true;
    s.q_bias = true;
    s.head_norm = QATTN_NORM_RMS;
    s.loras = true;
    s.post_norm = QATTN_NORM_RMS;
    all.push_back(s);

    s = Scenario{};
    s.name = "gptq8_layernorm_perhead_gptj_partial_fp32_residual";
    s.gptq = true;
    s.bits = 8;
    s.group_size = 32;
    s.zero_offset_one = false;
    s.input_norm = QATTN_NORM_LAYER;
    s.input_norm_bias = true;
    s.head_norm = QATTN_NORM_LAYER;
    s.head_norm_per_head = true;
    s.rope = QATTN_ROPE_GPTJ;
    s.rotary_dim = 12;
    s.residual_fp32 = true;
    s.o_bias = true;
    all.push_back(s);

    s = Scenario{};
    s.name = "gptq4_mha_no_norm_no_rope_no_residual";
    s.gptq = true;
    s.zero_offset_one = false;
    s.kv_heads = 4;
    s.input_norm = QATTN_NORM_NONE;
    s.rope = QATTN_ROPE_NONE;
    s.has_residual = false;
    s.batch = 1;
    s.q_len = 5;
    all.push_back(s);

    // Prefill of 130 rows (CUDA: the head epilogue's kernel per row), GPT-J over
    // the whole head; the second round's last position is the tables' last row,
    // so a read past a row's angles leaves the allocation (compute-sanitizer).
    s = Scenario{};
    s.name = "gptq4_prefill_gptj_to_the_last_table_row";
    s.gptq = true;
    s.rope = QATTN_ROPE_GPTJ;
    s.head_norm = QATTN_NORM_RMS;
    s.batch = 1;
    s.q_len = 130;
    s.max_seq_len = s.table_positions = 18 + 130;  // the second round's past_len is 18
    all.push_back(s);

    // Prefill of 130 rows with group 128 and 256-column matrices: on Hopper the
    // fused dequantize + wgmma GEMM (its 128-row tiles with a short last one).
    // Act-order per matrix (Q in the staging's gathered order, K and V gathered
    // each), LoRA (fp32 sums), an O bias (O into fp32 sums, then the residual
    // epilogue) and an fp32 residual; then input order with graphs, O added to
    // the fp16 residual by the GEMM itself.
    s = Scenario{};
    s.name = "gptq4_g128_prefill_fused_gemm_actorder_lora_fp32_residual";
    s.gptq = true;
    s.group_size = 128;
    s.act_order = true;
    s.hidden = 256, s.heads = 4, s.kv_heads = 4, s.head_dim = 64;
    s.loras = true;
    s.o_bias = true;
    s.residual_fp32 = true;
    s.batch = 1;
    s.q_len = 130;
    s.max_seq_len = s.table_positions = 18 + 130;
    all.push_back(s);

    s = Scenario{};
    s.name = "gptq4_g128_prefill_fused_gemm_graphs";
    s.gptq = true;
    s.group_size = 128;
    s.hidden = 256, s.heads = 4, s.kv_heads = 4, s.head_dim = 64;
    s.use_graphs = true;
    s.batch = 2;
    s.q_len = 65;
    s.max_seq_len = s.table_positions = 18 + 65;
    all.push_back(s);

    // Decode of 3 rows (CUDA: blocks owning columns over the whole K, where that
    // kernel runs), NeoX over half the head with pass-through tiles after it,
    // biases, positions from device lengths; the second round's last sequence
    // sits at the tables' last row.
    s = Scenario{};
    s.name = "gptq4_decode_partial_neox_bias_to_the_last_table_row";
    s.gptq = true;
    s.head_dim = 32;
    s.rotary_dim = 16;
    s.q_bias = s.o_bias = true;
    s.use_past_lens = true;
    s.batch = 3;
    s.q_len = 1;
    s.max_seq_len = s.table_positions = 3 + 11 * 2 + 7 + 1;  // the second round's last past_lens is 32
    all.push_back(s);

    s = Scenario{};
    s.name = "dense_decode_graphs_pastlens_lora";
    s.batch = 3;
    s.q_len = 1;
    s.use_graphs = true;
    s.use_past_lens = true;
    s.loras = true;
    s.head_norm = QATTN_NORM_RMS;
    s.head_norm_per_head = true;
    all.push_back(s);
    return all;
}

class Forward : public ::testing::TestWithParam<std::tuple<int, Scenario>> {};

TEST_P(Forward, MatchesReference) {
    const int device = std::get<0>(GetParam());
    const Scenario& scenario = std::get<1>(GetParam());
    QTEST_SKIP_IF_ABSENT(device);

    Random rng(static_cast<uint32_t>(std::hash<std::string>{}(scenario.name)));
    const BlockData data(scenario, rng);
    const int rows = data.rows(), H = scenario.hidden;

    LibraryLayer lib;
    QTEST_ASSERT_OK(build_layer(data, device, rows, &lib));
    const LayerPtr& layer = lib.layer;

    if (!data.loras.empty()) {
        std::vector<qattn_lora_desc> descs;
        for (const LoraData& l : data.loras) descs.push_back(l.desc());
        int max_rank = -1;
        QTEST_ASSERT_OK(qattn_set_loras(layer.get(), descs.data(), static_cast<int>(descs.size()), &max_rank));
        EXPECT_EQ(max_rank, 5);
    }

    DeviceBuffer sin, cos;
    if (scenario.rope != QATTN_ROPE_NONE) {
        sin = DeviceBuffer(device, data.tables.sin);
        cos = DeviceBuffer(device, data.tables.cos);
    }
    const Stream stream(device);
    // Outputs start each round as fp16 NaNs: any element left unwritten fails.
    const uint16_t nan = 0x7e00;
    const std::vector<uint16_t> q_poison(static_cast<size_t>(rows) * data.q_width(), nan);
    const std::vector<uint16_t> kv_poison(static_cast<size_t>(rows) * data.kv_width(), nan);
    const size_t q_bytes = sizeof(uint16_t) * q_poison.size(), kv_bytes = sizeof(uint16_t) * kv_poison.size();
    DeviceBuffer q(device, q_bytes), k(device, kv_bytes), v(device, kv_bytes);

    // Two rounds with fresh inputs and positions: a backend that caches a captured
    // graph must still read the new values.
    for (int round = 0; round < 2; ++round) {
        SCOPED_TRACE("round " + std::to_string(round));
        q.upload(q_poison.data());
        k.upload(kv_poison.data());
        v.upload(kv_poison.data());
        std::vector<double> x_ref(static_cast<size_t>(rows) * H);
        DeviceBuffer x;
        if (scenario.residual_fp32) {
            std::vector<float> x_host(x_ref.size());
            for (size_t i = 0; i < x_host.size(); ++i) x_ref[i] = x_host[i] = static_cast<float>(rng.uniform(-1.5, 1.5));
            x = DeviceBuffer(device, x_host);
        } else {
            const std::vector<uint16_t> x_host = rng.halves(x_ref.size(), -1.5, 1.5);
            x_ref = widen(x_host);
            x = DeviceBuffer(device, x_host);
        }
        const int past_len = 5 + 13 * round;
        std::vector<int32_t> past_lens;
        DeviceBuffer past_lens_buffer;
        if (scenario.use_past_lens) {
            for (int b = 0; b < scenario.batch; ++b) past_lens.push_back(3 + 11 * b + 7 * round);
            past_lens_buffer = DeviceBuffer(device, past_lens);
        }

        qattn_forward1_args a1 = qattn_forward1_args_default();
        a1.batch = scenario.batch;
        a1.q_len = scenario.q_len;
        a1.x = x.get();
        a1.past_len = past_len;
        a1.past_lens = past_lens_buffer.as<int32_t>();
        a1.sin = sin.as<float>();
        a1.cos = cos.as<float>();
        a1.max_positions = data.tables.positions;
        a1.q = q.get();
        a1.k = k.get();
        a1.v = v.get();
        a1.lora_ids = data.active.empty() ? nullptr : data.active.data();
        a1.num_lora_ids = static_cast<int>(data.active.size());
        QTEST_ASSERT_OK(qattn_forward1(layer.get(), &a1, stream.get()));
        stream.synchronize();
        QTEST_ASSERT_OK(qattn_check_device_errors(layer.get(), stream.get()));

        const auto ref = data.forward1(x_ref, past_len, past_lens);
        const DeviceBuffer* outs[3] = {&q, &k, &v};
        const char* names[3] = {"q", "k", "v"};
        for (int i = 0; i < 3; ++i) {
            const double err = relative_error(widen(outs[i]->download<uint16_t>()), ref[i]);
            EXPECT_LT(err, tolerance(device)) << names[i] << " relative error";
        }

        const std::vector<uint16_t> attn_host = rng.halves(static_cast<size_t>(rows) * data.q_width(), -1.0, 1.0);
        const DeviceBuffer attn(device, attn_host);
        qattn_forward2_args a2 = qattn_forward2_args_default();
        a2.batch = scenario.batch;
        a2.q_len = scenario.q_len;
        a2.x = x.get();
        a2.attn_out = attn.get();
        a2.lora_ids = a1.lora_ids;
        a2.num_lora_ids = a1.num_lora_ids;
        QTEST_ASSERT_OK(qattn_forward2(layer.get(), &a2, stream.get()));
        stream.synchronize();

        const std::vector<double> x_new_ref = data.forward2(x_ref, widen(attn_host));
        std::vector<double> x_new;
        if (scenario.residual_fp32) {
            for (float f : x.download<float>()) x_new.push_back(f);
        } else {
            x_new = widen(x.download<uint16_t>());
        }
        EXPECT_LT(relative_error(x_new, x_new_ref), tolerance(device)) << "residual relative error";
    }
}

// The reference itself: a mistake in it would make every comparison above
// meaningless, so check it on a case small enough to verify by hand. RMSNorm of
// (3, 4) with weight 1 and eps -> 0 is (3, 4) / sqrt(12.5); NeoX rotation by 90
// degrees maps (a, b) to (-b, a).
TEST(Reference, NormAndRotationByHand) {
    NormData n;
    n.type = QATTN_NORM_RMS;
    n.eps = 1e-12f;
    n.weight = {to_half(1.0), to_half(1.0)};
    double v[2] = {3.0, 4.0};
    n.apply(v, 2);
    EXPECT_NEAR(v[0], 3.0 / std::sqrt(12.5), 1e-9);
    EXPECT_NEAR(v[1], 4.0 / std::sqrt(12.5), 1e-9);

    RopeTables t;
    t.positions = 1;
    t.half = 1;
    t.sin = {1.0f};
    t.cos = {0.0f};
    double head[2] = {2.0, 5.0};
    rotate(QATTN_ROPE_NEOX, 2, t, 0, head);
    EXPECT_DOUBLE_EQ(head[0], -5.0);
    EXPECT_DOUBLE_EQ(head[1], 2.0);

    EXPECT_EQ(to_half(1.0), 0x3c00);
    EXPECT_EQ(to_half(-2.5), 0xc100);
    EXPECT_EQ(to_half(1.0 + 1.0 / 4096), 0x3c00);  // ties round to even
    EXPECT_EQ(to_half(std::ldexp(1.0, -24)), 0x0001);
    EXPECT_DOUBLE_EQ(from_half(0x7bff), 65504.0);
}

// The test's GPTQ packer against an unpacking written out literally: W[k, n] =
// scale * (q - z), 4-bit codes eight to a word, zeros stored minus one.
TEST(Reference, GptqPackingByHand) {
    Random rng(3);
    const MatrixData m = make_gptq(rng, 16, 8, 4, 8, false, true, false);
    for (int64_t k = 0; k < m.K; ++k)
        for (int64_t n = 0; n < m.N; ++n) {
            const uint32_t word = static_cast<uint32_t>(m.qweight[(k / 8) * m.N + n]);
            const int q = (word >> ((k % 8) * 4)) & 15;
            const int64_t g = k / 8;
            const uint32_t zword = static_cast<uint32_t>(m.qzeros[g * (m.N / 8) + n / 8]);
            const int z = ((zword >> ((n % 8) * 4)) & 15) + 1;
            ASSERT_DOUBLE_EQ(m.w[k * m.N + n], from_half(m.scales[g * m.N + n]) * (q - z));
        }
}

std::string name_of(const ::testing::TestParamInfo<Forward::ParamType>& info) {
    return device_name(std::get<0>(info.param)) + "_" + std::get<1>(info.param).name;
}

INSTANTIATE_TEST_SUITE_P(Devices, Forward,
                         ::testing::Combine(::testing::Values(QATTN_DEVICE_CPU, 0), ::testing::ValuesIn(scenarios())),
                         name_of);

}  // namespace
}  // namespace qtest
