// Every refusal: the status code, and a last-error message that names the problem.
#include "model.h"

#include <algorithm>
#include <iterator>
#include <limits>

namespace qtest {
namespace {

constexpr qattn_status kInvalid = QATTN_ERROR_INVALID_ARGUMENT;
constexpr qattn_status kRange = QATTN_ERROR_OUT_OF_RANGE;

// A valid layer (GQA, RMS input norm, NeoX RoPE, LoRA adapters 7 and 9) with
// valid forward arguments; each test breaks one thing.
class Errors : public ::testing::TestWithParam<int> {
protected:
    static constexpr int kMaxRows = 6;

    Errors() : rng_(11), data_(scenario(), rng_) {}

    static Scenario scenario() {
        Scenario s;
        s.loras = true;
        return s;
    }

    void SetUp() override {
        QTEST_SKIP_IF_ABSENT(device());
        LibraryLayer lib;
        QTEST_ASSERT_OK(build_layer(data_, device(), kMaxRows, &lib));
        std::move(std::begin(lib.matrices), std::end(lib.matrices), matrices_);
        config_ = lib.config;
        layer_ = std::move(lib.layer);
        for (const LoraData& l : data_.loras) loras_.push_back(l.desc());
        QTEST_ASSERT_OK(qattn_set_loras(layer_.get(), loras_.data(), static_cast<int>(loras_.size()), nullptr));

        const int H = data_.s.hidden;
        x_ = DeviceBuffer(device(), rng_.halves(static_cast<size_t>(kMaxRows) * H, -1, 1));
        attn_ = DeviceBuffer(device(), rng_.halves(static_cast<size_t>(kMaxRows) * data_.q_width(), -1, 1));
        q_ = DeviceBuffer(device(), sizeof(uint16_t) * kMaxRows * data_.q_width());
        k_ = DeviceBuffer(device(), sizeof(uint16_t) * kMaxRows * data_.kv_width());
        v_ = DeviceBuffer(device(), sizeof(uint16_t) * kMaxRows * data_.kv_width());
        sin_ = DeviceBuffer(device(), data_.tables.sin);
        cos_ = DeviceBuffer(device(), data_.tables.cos);

        a1_ = qattn_forward1_args_default();
        a1_.batch = data_.s.batch;
        a1_.q_len = data_.s.q_len;
        a1_.x = x_.get();
        a1_.past_len = 2;
        a1_.sin = sin_.as<float>();
        a1_.cos = cos_.as<float>();
        a1_.max_positions = data_.tables.positions;
        a1_.q = q_.get();
        a1_.k = k_.get();
        a1_.v = v_.get();
        a1_.lora_ids = data_.active.data();
        a1_.num_lora_ids = 1;
        a2_ = qattn_forward2_args_default();
        a2_.batch = data_.s.batch;
        a2_.q_len = data_.s.q_len;
        a2_.x = x_.get();
        a2_.attn_out = attn_.get();
        a2_.lora_ids = data_.active.data();
        a2_.num_lora_ids = 1;
        // The fixture itself must be valid, or every refusal below proves nothing.
        QTEST_ASSERT_OK(forward1());
        QTEST_ASSERT_OK(forward2());
    }

    int device() const { return GetParam(); }
    qattn_status forward1() { return qattn_forward1(layer_.get(), &a1_, stream_.get()); }
    qattn_status forward2() { return qattn_forward2(layer_.get(), &a2_, stream_.get()); }
    qattn_status create_layer(const qattn_layer_config& c) {
        qattn_layer* out = nullptr;
        const qattn_status s = qattn_create(&c, &out);
        qattn_destroy(out);
        if (s != QATTN_SUCCESS) {
            EXPECT_EQ(out, nullptr) << "a failed qattn_create must leave *out NULL";
        }
        return s;
    }
    qattn_status create_matrix(const qattn_qmatrix_desc& d) {
        qattn_qmatrix* out = nullptr;
        const qattn_status s = qattn_qmatrix_create(&d, &out);
        qattn_qmatrix_destroy(out);
        if (s != QATTN_SUCCESS) {
            EXPECT_EQ(out, nullptr) << "a failed qattn_qmatrix_create must leave *out NULL";
        }
        return s;
    }
    // The device whose memory is wrong for this layer, if this machine has one.
    bool other_device(int* other) const {
        if (device() != QATTN_DEVICE_CPU) {
            *other = QATTN_DEVICE_CPU;
            return true;
        }
        *other = 0;
        return cuda_runtime_usable();
    }

    Random rng_;
    const BlockData data_;
    QMatrixPtr matrices_[4];
    qattn_layer_config config_{};
    LayerPtr layer_;
    std::vector<qattn_lora_desc> loras_;
    DeviceBuffer x_, attn_, q_, k_, v_, sin_, cos_;
    Stream stream_{GetParam()};
    qattn_forward1_args a1_{};
    qattn_forward2_args a2_{};
};

// ---- NULL handles and pointers ---------------------------------------------------------

TEST_P(Errors, ScratchOfAnotherDeviceOrNone) {
    qattn_scratch* s = nullptr;
    QTEST_EXPECT_ERROR(qattn_scratch_create(device(), nullptr), kInvalid, "out is NULL");
    QTEST_EXPECT_ERROR(qattn_scratch_create(-5, &s), kInvalid, "device must be");
    EXPECT_EQ(s, nullptr);
    QTEST_EXPECT_ERROR(qattn_scratch_create(qattn_cuda_device_count() + 3, &s), QATTN_ERROR_NOT_SUPPORTED,
                       "CUDA device");
    int other = 0;
    if (!other_device(&other)) return;
    QTEST_ASSERT_OK(qattn_scratch_create(other, &s));
    ScratchPtr foreign(s);
    qattn_layer_config c = config_;
    c.scratch = foreign.get();
    QTEST_EXPECT_ERROR(create_layer(c), kInvalid, "config.scratch belongs to device");
}

TEST_P(Errors, NullArguments) {
    qattn_qmatrix* m = nullptr;
    const qattn_qmatrix_desc md = data_.q.desc(device());
    QTEST_EXPECT_ERROR(qattn_qmatrix_create(nullptr, &m), kInvalid, "qattn_qmatrix_desc is NULL");
    QTEST_EXPECT_ERROR(qattn_qmatrix_create(&md, nullptr), kInvalid, "out is NULL");
    qattn_layer* l = nullptr;
    QTEST_EXPECT_ERROR(qattn_create(nullptr, &l), kInvalid, "qattn_layer_config is NULL");
    QTEST_EXPECT_ERROR(qattn_create(&config_, nullptr), kInvalid, "out is NULL");

    QTEST_EXPECT_ERROR(qattn_forward1(nullptr, &a1_, nullptr), kInvalid, "layer is NULL");
    QTEST_EXPECT_ERROR(qattn_forward1(layer_.get(), nullptr, nullptr), kInvalid, "qattn_forward1_args is NULL");
    QTEST_EXPECT_ERROR(qattn_forward2(nullptr, &a2_, nullptr), kInvalid, "layer is NULL");
    QTEST_EXPECT_ERROR(qattn_forward2(layer_.get(), nullptr, nullptr), kInvalid, "qattn_forward2_args is NULL");
    QTEST_EXPECT_ERROR(qattn_set_loras(nullptr, loras_.data(), 1, nullptr), kInvalid, "layer is NULL");
    QTEST_EXPECT_ERROR(qattn_set_loras(layer_.get(), nullptr, 1, nullptr), kInvalid, "loras is NULL");
    QTEST_EXPECT_ERROR(qattn_check_device_errors(nullptr, nullptr), kInvalid, "layer is NULL");

    for (auto member : {&qattn_forward1_args::q, &qattn_forward1_args::k, &qattn_forward1_args::v}) {
        qattn_forward1_args saved = a1_;
        a1_.*member = nullptr;
        QTEST_EXPECT_ERROR(forward1(), kInvalid, "is NULL");
        a1_ = saved;
    }
    a1_.x = nullptr;
    QTEST_EXPECT_ERROR(forward1(), kInvalid, "x is NULL");
    a1_.x = x_.get();
    a1_.sin = nullptr;
    QTEST_EXPECT_ERROR(forward1(), kInvalid, "sin is NULL");
    a1_.sin = sin_.as<float>();
    a1_.cos = nullptr;
    QTEST_EXPECT_ERROR(forward1(), kInvalid, "cos is NULL");
    a1_.cos = cos_.as<float>();
    a1_.lora_ids = nullptr;
    QTEST_EXPECT_ERROR(forward1(), kInvalid, "lora_ids is NULL");

    a2_.x = nullptr;
    QTEST_EXPECT_ERROR(forward2(), kInvalid, "x is NULL");
    a2_.x = x_.get();
    a2_.attn_out = nullptr;
    QTEST_EXPECT_ERROR(forward2(), kInvalid, "attn_out is NULL");
}

// ---- struct sizes ---------------------------------------------------------------------

TEST_P(Errors, StructSizeZeroOrTooBig) {
    for (size_t size : {size_t{0}, sizeof(qattn_qmatrix_desc) + 8}) {
        qattn_qmatrix_desc d = data_.q.desc(device());
        d.struct_size = size;
        QTEST_EXPECT_ERROR(create_matrix(d), kInvalid, "qattn_qmatrix_desc.struct_size");
    }
    for (size_t size : {size_t{0}, sizeof(qattn_layer_config) + 8}) {
        qattn_layer_config c = config_;
        c.struct_size = size;
        QTEST_EXPECT_ERROR(create_layer(c), kInvalid, "qattn_layer_config.struct_size");
    }
    a1_.struct_size = 0;
    QTEST_EXPECT_ERROR(forward1(), kInvalid, "qattn_forward1_args.struct_size");
    a1_.struct_size = sizeof(qattn_forward1_args) + 8;
    QTEST_EXPECT_ERROR(forward1(), kInvalid, "qattn_forward1_args.struct_size");
    a2_.struct_size = sizeof(qattn_forward2_args) * 2;
    QTEST_EXPECT_ERROR(forward2(), kInvalid, "qattn_forward2_args.struct_size");
    qattn_lora_desc lora = loras_[0];
    lora.struct_size = 0;
    QTEST_EXPECT_ERROR(qattn_set_loras(layer_.get(), &lora, 1, nullptr), kInvalid, "qattn_lora_desc.struct_size");
}

// ---- QMatrix descriptors --------------------------------------------------------------

TEST_P(Errors, MatrixSizes) {
    for (int64_t bad : {int64_t{0}, int64_t{-8}}) {
        qattn_qmatrix_desc d = data_.q.desc(device());
        d.in_features = bad;
        QTEST_EXPECT_ERROR(create_matrix(d), kInvalid, "in_features and out_features must be > 0");
        d = data_.q.desc(device());
        d.out_features = bad;
        QTEST_EXPECT_ERROR(create_matrix(d), kInvalid, "in_features and out_features must be > 0");
    }
    qattn_qmatrix_desc d = data_.q.desc(device());
    d.in_features = int64_t{1} << 40;
    QTEST_EXPECT_ERROR(create_matrix(d), kInvalid, "not supported");
    d = data_.q.desc(device());
    d.weight = nullptr;
    QTEST_EXPECT_ERROR(create_matrix(d), kInvalid, "weight is NULL");
    d = data_.q.desc(device());
    d.format = static_cast<qattn_qmatrix_format>(9);
    QTEST_EXPECT_ERROR(create_matrix(d), kInvalid, "unknown QMatrix format 9");
}

TEST_P(Errors, MatrixDevice) {
    qattn_qmatrix_desc d = data_.q.desc(-2);
    QTEST_EXPECT_ERROR(create_matrix(d), kInvalid, "device must be QATTN_DEVICE_CPU (-1) or a CUDA ordinal");
    d.device = 4096;
    QTEST_EXPECT_ERROR(create_matrix(d), QATTN_ERROR_NOT_SUPPORTED, "CUDA device 4096");
}

TEST_P(Errors, GptqShapesThatDisagree) {
    Random rng(12);
    const MatrixData m = make_gptq(rng, 64, 32, 4, 16, true, true, false);
    qattn_qmatrix_desc d = m.desc(device());
    d.bits = 3;
    QTEST_EXPECT_ERROR(create_matrix(d), kInvalid, "bits must be 4 or 8, got 3");
    d = m.desc(device());
    d.in_features = 60;  // not whole int32 words along K
    d.g_idx = nullptr;
    QTEST_EXPECT_ERROR(create_matrix(d), kInvalid, "in_features (60) must be a multiple of 8");
    d = m.desc(device());
    d.out_features = 36;  // qzeros cannot pack it
    QTEST_EXPECT_ERROR(create_matrix(d), kInvalid, "out_features (36) must be a multiple of 8");
    d = m.desc(device());
    d.qzeros = nullptr;
    QTEST_EXPECT_ERROR(create_matrix(d), kInvalid, "needs qweight, qzeros and scales");
    d = m.desc(device());
    d.num_groups = 65;
    QTEST_EXPECT_ERROR(create_matrix(d), kInvalid, "num_groups must be in [1, in_features=64], got 65");
    d = m.desc(device());
    d.num_groups = -1;
    QTEST_EXPECT_ERROR(create_matrix(d), kInvalid, "num_groups");
    d = m.desc(device());
    d.g_idx = nullptr;
    d.num_groups = 0;
    d.group_size = 0;
    QTEST_EXPECT_ERROR(create_matrix(d), kInvalid, "group_size must be > 0");
    d.group_size = 8;
    d.num_groups = 4;  // 64 rows in groups of 8 need 8 groups
    QTEST_EXPECT_ERROR(create_matrix(d), kInvalid, "does not cover in_features");
}

TEST_P(Errors, GptqGroupIndexOutOfRange) {
    Random rng(13);
    MatrixData m = make_gptq(rng, 64, 32, 4, 16, true, true, false);
    m.g_idx[17] = 4;  // there are 4 groups
    QTEST_EXPECT_ERROR(create_matrix(m.desc(device())), kRange, "g_idx[17] = 4 is outside [0, num_groups=4)");
    m.g_idx[17] = -1;
    QTEST_EXPECT_ERROR(create_matrix(m.desc(device())), kRange, "g_idx[17] = -1");
}

// ---- layer configurations --------------------------------------------------------------

TEST_P(Errors, LayerSizes) {
    int qattn_layer_config::*fields[] = {&qattn_layer_config::hidden_size, &qattn_layer_config::num_heads,
                                         &qattn_layer_config::num_kv_heads, &qattn_layer_config::head_dim};
    for (auto field : fields)
        for (int bad : {0, -4}) {
            qattn_layer_config c = config_;
            c.*field = bad;
            QTEST_EXPECT_ERROR(create_layer(c), kInvalid, "must be > 0");
        }
    qattn_layer_config c = config_;
    c.num_kv_heads = 3;
    QTEST_EXPECT_ERROR(create_layer(c), kInvalid, "num_heads (4) must be a multiple of num_kv_heads (3)");
    c = config_;
    c.head_dim = 15;
    QTEST_EXPECT_ERROR(create_layer(c), kInvalid, "head_dim must be even");
    c = config_;
    c.max_rows = 0;
    QTEST_EXPECT_ERROR(create_layer(c), kInvalid, "max_rows must be > 0");
    c = config_;
    c.max_seq_len = -1;
    QTEST_EXPECT_ERROR(create_layer(c), kInvalid, "max_seq_len must be > 0");
}

TEST_P(Errors, RotaryDim) {
    for (int bad : {7, 18, -2}) {
        qattn_layer_config c = config_;
        c.rotary_dim = bad;
        QTEST_EXPECT_ERROR(create_layer(c), kInvalid, "rotary_dim must be even and in (0, head_dim=16], got " +
                                                          std::to_string(bad));
    }
    qattn_layer_config c = config_;
    c.rope = static_cast<qattn_rope_type>(3);
    QTEST_EXPECT_ERROR(create_layer(c), kInvalid, "rope 3 is not a qattn_rope_type");
}

TEST_P(Errors, Norms) {
    qattn_layer_config c = config_;
    c.input_norm.weight = nullptr;
    QTEST_EXPECT_ERROR(create_layer(c), kInvalid, "input_norm.weight is NULL");
    c = config_;
    c.input_norm.eps = 0;
    QTEST_EXPECT_ERROR(create_layer(c), kInvalid, "input_norm.eps must be > 0");
    c = config_;
    c.input_norm.bias = data_.input_norm.weight.data();
    QTEST_EXPECT_ERROR(create_layer(c), kInvalid, "input_norm.bias is only allowed for LayerNorm");
    c = config_;
    c.post_norm = c.input_norm;
    c.post_norm.per_head = 1;
    QTEST_EXPECT_ERROR(create_layer(c), kInvalid, "post_norm.per_head is only meaningful");
    c = config_;
    c.q_norm.type = static_cast<qattn_norm_type>(7);
    QTEST_EXPECT_ERROR(create_layer(c), kInvalid, "q_norm.type 7 is not a qattn_norm_type");
    c = config_;
    c.k_norm.type = QATTN_NORM_RMS;
    QTEST_EXPECT_ERROR(create_layer(c), kInvalid, "k_norm.weight is NULL");
}

TEST_P(Errors, ProjectionsMissingOrMisshapen) {
    qattn_layer_config c = config_;
    c.v_proj = nullptr;
    QTEST_EXPECT_ERROR(create_layer(c), kInvalid, "config.v_proj is NULL");
    c = config_;
    c.k_proj = matrices_[0].get();  // 64 -> 64, but K needs 64 -> 32
    QTEST_EXPECT_ERROR(create_layer(c), kInvalid, "config.k_proj maps 64 -> 64 features; the layer needs 64 -> 32");
    c = config_;
    c.o_proj = matrices_[1].get();
    QTEST_EXPECT_ERROR(create_layer(c), kInvalid, "config.o_proj maps");
    c = config_;
    c.num_heads = 8;  // now q_proj is too narrow
    QTEST_EXPECT_ERROR(create_layer(c), kInvalid, "config.q_proj maps 64 -> 64 features; the layer needs 64 -> 128");
}

TEST_P(Errors, ProjectionOnAnotherDevice) {
    int other;
    if (!other_device(&other)) GTEST_SKIP() << "needs a second kind of device (CPU and CUDA)";
    qattn_qmatrix* m = nullptr;
    const qattn_qmatrix_desc d = data_.q.desc(other);
    QTEST_ASSERT_OK(qattn_qmatrix_create(&d, &m));
    QMatrixPtr foreign(m);
    qattn_layer_config c = config_;
    c.q_proj = foreign.get();
    QTEST_EXPECT_ERROR(create_layer(c), kInvalid,
                       "config.q_proj lives on device " + std::to_string(other) + ", the layer on device " +
                           std::to_string(device()));
}

TEST_P(Errors, LayerOnAbsentDevice) {
    qattn_layer_config c = config_;
    c.device = 4096;
    QTEST_EXPECT_ERROR(create_layer(c), QATTN_ERROR_NOT_SUPPORTED, "CUDA device 4096");
}

// ---- forward arguments ---------------------------------------------------------------------

TEST_P(Errors, RowCounts) {
    a1_.batch = 0;
    QTEST_EXPECT_ERROR(forward1(), kInvalid, "batch and q_len must be > 0");
    a1_.batch = 2;
    a1_.q_len = -1;
    QTEST_EXPECT_ERROR(forward1(), kInvalid, "batch and q_len must be > 0");
    a1_.q_len = 4;
    QTEST_EXPECT_ERROR(forward1(), kRange, "batch * q_len = 8 rows exceeds the layer's max_rows = 6");
    a1_.batch = std::numeric_limits<int>::max();
    a1_.q_len = 2;  // the product overflows int: must still be refused, not wrap
    QTEST_EXPECT_ERROR(forward1(), kRange, "exceeds the layer's max_rows");
    a2_.q_len = 7;
    QTEST_EXPECT_ERROR(forward2(), kRange, "exceeds the layer's max_rows = 6");
    a2_.q_len = 0;
    QTEST_EXPECT_ERROR(forward2(), kInvalid, "batch and q_len must be > 0");
}

TEST_P(Errors, PositionsPastTablesOrMaxSeqLen) {
    // Tables have 48 rows and max_seq_len is 40: the smaller limit applies.
    a1_.past_len = 38;  // q_len 3: positions 38 .. 40
    QTEST_EXPECT_ERROR(forward1(), kRange, "positions 38 .. 40 are outside [0, 40)");
    a1_.past_len = -1;
    QTEST_EXPECT_ERROR(forward1(), kRange, "positions -1 .. 1 are outside");
    a1_.past_len = 2;
    a1_.max_positions = 4;
    QTEST_EXPECT_ERROR(forward1(), kRange, "positions 2 .. 4 are outside [0, 4)");
    a1_.max_positions = 0;
    QTEST_EXPECT_ERROR(forward1(), kInvalid, "max_positions must be > 0");
    a1_.max_positions = data_.tables.positions;
    a1_.past_len = 37;  // the last valid start
    QTEST_ASSERT_OK(forward1());
}

// Host-checked on the CPU; on CUDA the kernels flag it and check_device_errors reports it.
TEST_P(Errors, PastLensOutOfRange) {
    const std::vector<int32_t> past_lens = {1, 39};
    const DeviceBuffer buffer(device(), past_lens);
    a1_.past_lens = buffer.as<int32_t>();
    if (device() == QATTN_DEVICE_CPU) {
        QTEST_EXPECT_ERROR(forward1(), kRange, "past_lens[1] = 39 puts positions outside [0, 40)");
    } else {
        QTEST_ASSERT_OK(forward1());
        QTEST_EXPECT_ERROR(qattn_check_device_errors(layer_.get(), stream_.get()), kRange, "position");
        EXPECT_EQ(qattn_check_device_errors(layer_.get(), stream_.get()), QATTN_SUCCESS)
            << "the flag must clear once reported";
    }
    const std::vector<int32_t> fine = {1, 37};
    const DeviceBuffer fine_buffer(device(), fine);
    a1_.past_lens = fine_buffer.as<int32_t>();
    QTEST_ASSERT_OK(forward1());
    QTEST_ASSERT_OK(qattn_check_device_errors(layer_.get(), stream_.get()));
}

TEST_P(Errors, KvCacheDestination) {
    // Rows (batch 2, q_len as the scenario has it) go to slots of a cache of 8.
    const int rows = data_.s.batch * data_.s.q_len;
    const size_t width = static_cast<size_t>(data_.kv_width());
    const int64_t num_slots = 8;
    const uint16_t guard = 0x5bb0;  // 246.0 in fp16, which no output holds
    DeviceBuffer k_cache(device(), std::vector<uint16_t>(num_slots * width, guard));
    DeviceBuffer v_cache(device(), std::vector<uint16_t>(num_slots * width, guard));
    std::vector<int32_t> slots(rows);
    for (int r = 0; r < rows; ++r) slots[r] = static_cast<int32_t>(num_slots - 1 - r);
    const DeviceBuffer slot_buffer(device(), slots);

    a1_.k_cache = k_cache.get();
    QTEST_EXPECT_ERROR(forward1(), kInvalid, "k_cache and v_cache are set but kv_slots is NULL");
    a1_.v_cache = v_cache.get();
    a1_.kv_slots = slot_buffer.as<int32_t>();
    QTEST_EXPECT_ERROR(forward1(), kInvalid, "num_kv_slots must be > 0");
    a1_.num_kv_slots = num_slots;
    a1_.v_cache = nullptr;
    QTEST_EXPECT_ERROR(forward1(), kInvalid, "v_cache is NULL");
    a1_.v_cache = v_cache.get();
    a1_.k = nullptr;
    QTEST_EXPECT_ERROR(forward1(), kInvalid, "k and v must both be set or both be NULL");

    // k and v to the cache only: what forward1 wrote to k_/v_ before, now in the slots.
    a1_.v = nullptr;
    QTEST_ASSERT_OK(forward1());
    QTEST_ASSERT_OK(qattn_check_device_errors(layer_.get(), stream_.get()));
    a1_.kv_slots = nullptr;
    a1_.k_cache = a1_.v_cache = nullptr;
    a1_.k = k_.get();
    a1_.v = v_.get();
    QTEST_ASSERT_OK(forward1());
    const std::vector<uint16_t> k_rows = k_.download<uint16_t>(), v_rows = v_.download<uint16_t>();
    const std::vector<uint16_t> k_cached = k_cache.download<uint16_t>(), v_cached = v_cache.download<uint16_t>();
    for (int64_t slot = 0; slot < num_slots; ++slot) {
        const int r = static_cast<int>(num_slots - 1 - slot);  // the row written there, if any
        for (size_t i = 0; i < width; ++i) {
            const size_t at = slot * width + i;
            if (r < rows) {
                ASSERT_EQ(k_cached[at], k_rows[r * width + i]) << "k, slot " << slot;
                ASSERT_EQ(v_cached[at], v_rows[r * width + i]) << "v, slot " << slot;
            } else {
                ASSERT_EQ(k_cached[at], guard) << "slot " << slot << " was written";
                ASSERT_EQ(v_cached[at], guard) << "slot " << slot << " was written";
            }
        }
    }

    // A slot past the cache: refused on the CPU, skipped and flagged on CUDA.
    slots[rows - 1] = static_cast<int32_t>(num_slots);
    const DeviceBuffer bad(device(), slots);
    a1_.kv_slots = bad.as<int32_t>();
    a1_.k_cache = k_cache.get();
    a1_.v_cache = v_cache.get();
    if (device() == QATTN_DEVICE_CPU) {
        QTEST_EXPECT_ERROR(forward1(), kRange, "is outside the cache's 8 slots");
    } else {
        QTEST_ASSERT_OK(forward1());
        QTEST_EXPECT_ERROR(qattn_check_device_errors(layer_.get(), stream_.get()), kRange, "kv_slots");
    }
}

TEST_P(Errors, MisalignedPointers) {
    a1_.x = static_cast<const char*>(x_.get()) + 1;
    QTEST_EXPECT_ERROR(forward1(), kInvalid, "x (");
    QTEST_EXPECT_ERROR(forward1(), kInvalid, "is not 2-byte aligned");
    a1_.x = x_.get();
    a1_.sin = reinterpret_cast<const float*>(static_cast<const char*>(sin_.get()) + 2);
    QTEST_EXPECT_ERROR(forward1(), kInvalid, "is not 4-byte aligned");
    a2_.attn_out = static_cast<const char*>(attn_.get()) + 1;
    QTEST_EXPECT_ERROR(forward2(), kInvalid, "attn_out");
}

TEST_P(Errors, ActivationsOnTheWrongDevice) {
    int other;
    if (!other_device(&other)) GTEST_SKIP() << "needs a second kind of device (CPU and CUDA)";
    const DeviceBuffer wrong(other, rng_.halves(static_cast<size_t>(kMaxRows) * data_.s.hidden, -1, 1));
    a1_.x = wrong.get();
    const std::string expected =
        device() == QATTN_DEVICE_CPU ? "x is in CUDA device 0 memory, but the layer is on the CPU"
                                     : "x must be in the memory of CUDA device " + std::to_string(device());
    QTEST_EXPECT_ERROR(forward1(), kInvalid, expected);
    a2_.x = wrong.get();
    QTEST_EXPECT_ERROR(forward2(), kInvalid, expected);
}

TEST_P(Errors, LoraIds) {
    const int32_t unknown[] = {42};
    a1_.lora_ids = unknown;
    QTEST_EXPECT_ERROR(forward1(), kRange, "unknown LoRA adapter id 42");
    a2_.lora_ids = unknown;
    QTEST_EXPECT_ERROR(forward2(), kRange, "unknown LoRA adapter id 42");
    const int32_t twice[] = {7, 9, 7};
    a1_.lora_ids = twice;
    a1_.num_lora_ids = 3;
    QTEST_EXPECT_ERROR(forward1(), kInvalid, "LoRA adapter id 7 is listed twice");
    a1_.num_lora_ids = -1;
    QTEST_EXPECT_ERROR(forward1(), kInvalid, "num_lora_ids must be >= 0");
}

TEST_P(Errors, SetLoras) {
    QTEST_EXPECT_ERROR(qattn_set_loras(layer_.get(), loras_.data(), -1, nullptr), kInvalid, "count must be >= 0");
    std::vector<qattn_lora_desc> bad = loras_;
    bad[3].id = 7;  // adapter 7 already has q, v, o; 9's k becomes 7's k: fine
    bad[4].id = 7;  // and 9's o becomes a second o for 7: refused
    QTEST_EXPECT_ERROR(qattn_set_loras(layer_.get(), bad.data(), static_cast<int>(bad.size()), nullptr), kInvalid,
                       "loras[4]: adapter id 7 has two entries for o_proj");
    bad = loras_;
    bad[1].rank = 0;
    QTEST_EXPECT_ERROR(qattn_set_loras(layer_.get(), bad.data(), 2, nullptr), kInvalid,
                       "loras[1].rank must be in [1, 4096], got 0");
    bad = loras_;
    bad[0].b = nullptr;
    QTEST_EXPECT_ERROR(qattn_set_loras(layer_.get(), bad.data(), 1, nullptr), kInvalid,
                       "loras[0] (id 7, q_proj): a or b is NULL");
    bad = loras_;
    bad[2].proj = static_cast<qattn_proj>(4);
    QTEST_EXPECT_ERROR(qattn_set_loras(layer_.get(), bad.data(), 3, nullptr), kInvalid,
                       "loras[2].proj 4 is not a qattn_proj");

    // A refused set leaves the previous one in place: adapter 9 still resolves.
    const int32_t nine[] = {9};
    a1_.lora_ids = nine;
    QTEST_ASSERT_OK(forward1());
    a2_.lora_ids = nine;
    QTEST_ASSERT_OK(forward2());
}

// After an error the layer keeps working and a later error replaces the message.
TEST_P(Errors, LayerUsableAfterErrors) {
    a1_.q_len = 100;
    QTEST_EXPECT_ERROR(forward1(), kRange, "max_rows");
    a1_.q_len = data_.s.q_len;
    QTEST_ASSERT_OK(forward1());
    a2_.attn_out = nullptr;
    QTEST_EXPECT_ERROR(forward2(), kInvalid, "attn_out is NULL");
    EXPECT_EQ(std::string(qattn_last_error()).find("max_rows"), std::string::npos);
}

INSTANTIATE_TEST_SUITE_P(Devices, Errors, ::testing::Values(QATTN_DEVICE_CPU, 0),
                         [](const ::testing::TestParamInfo<int>& info) { return device_name(info.param); });

}  // namespace
}  // namespace qtest
