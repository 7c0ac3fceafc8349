// Layers on CUDA devices 0 and 1 at once, through the C ABI. One model (GPTQ 4-bit
// act-order, q bias, head and post norms, LoRA) is built on the CPU and on both
// devices; each CUDA layer gets its own non-blocking stream and runs a series of
// decode and prefill steps, driven from one thread with the calls alternating
// between the devices, and from two threads at once, one per device. Every output
// is compared with the CPU backend's for the same inputs, and the two devices with
// each other. With and without CUDA graphs (two threads capturing at once).
#include "model.h"

#if defined(QATTN_TESTS_WITH_CUDA)

#include <atomic>
#include <thread>

namespace qtest {
namespace {

// CUDA against the CPU backend: forward_test.cpp's CUDA tolerance (fp16 outputs,
// fp16 intermediates on the GPU).
constexpr double kTolerance = 3e-3;
// cuda:0 against cuda:1: the same kernels on the same data, where only the order of
// the fp32 split-K atomic additions may differ. Each output is rounded to fp16 once,
// from fp32, so an element moves by at most one ulp (2^-10 relative): below 1e-3
// even if every element moved, while reading another device's buffers or racing on
// scratch is off by O(1).
constexpr double kDeviceTolerance = 1e-3;

struct Step {
    int batch, q_len, past_len;
};
// Decode rows (the small-row GEMV path) and prefill rows past its 32 rows (dequantize
// + cuBLAS), at positions that move; all stay below BlockData's max_seq_len of 40.
const std::vector<Step> kSteps = {{3, 1, 5}, {2, 20, 0}, {3, 1, 33}, {2, 20, 13},
                                  {3, 1, 21}, {2, 20, 7}, {3, 1, 38}, {2, 20, 19}};
constexpr int kMaxRows = 40;

// The reason this machine cannot run the tests, or "" when it can.
std::string two_devices_missing() {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
        (void)cudaGetLastError();
        count = 0;
    }
    if (count < 2) return "needs 2 CUDA devices; cudaGetDeviceCount reports " + std::to_string(count);
    if (qattn_cuda_device_count() < 2)
        return "needs 2 CUDA devices usable by qattn; qattn_cuda_device_count reports " +
               std::to_string(qattn_cuda_device_count());
    return "";
}

// The model's layer on one device with its stream, RoPE tables and, per step, its
// buffers: inputs uploaded at placement, outputs filled with fp16 NaNs so that an
// element left unwritten fails; forward2 updates x in place.
struct Placement {
    struct Buffers {
        DeviceBuffer x, attn, q, k, v;
    };
    explicit Placement(int d) : device(d), stream(d) {}
    int device;
    LibraryLayer lib;
    Stream stream;
    DeviceBuffer sin, cos;
    std::vector<Buffers> steps;
};

class MultiDevice : public ::testing::TestWithParam<bool> {
protected:
    void SetUp() override {
        const std::string missing = two_devices_missing();
        if (!missing.empty()) GTEST_SKIP() << missing;
        Scenario s;
        s.name = "gptq4_actorder_lora_headnorm_postnorm";
        s.gptq = true;
        s.act_order = true;
        s.q_bias = true;
        s.head_norm = QATTN_NORM_RMS;
        s.post_norm = QATTN_NORM_RMS;
        s.loras = true;
        s.use_graphs = GetParam();
        Random rng(2024);
        data_ = std::make_unique<BlockData>(s, rng);
        for (const Step& step : kSteps) {
            const size_t rows = static_cast<size_t>(step.batch) * step.q_len;
            x_.push_back(rng.halves(rows * s.hidden, -1.5, 1.5));
            attn_.push_back(rng.halves(rows * data_->q_width(), -1.0, 1.0));
        }
        cpu_ = std::make_unique<Placement>(QATTN_DEVICE_CPU);
        QTEST_ASSERT_OK(place(cpu_.get()));
        for (size_t i = 0; i < kSteps.size(); ++i) {
            QTEST_ASSERT_OK(enqueue(*cpu_, 1, i));
            QTEST_ASSERT_OK(enqueue(*cpu_, 2, i));
        }
        for (int d = 0; d < 2; ++d) {
            gpu_[d] = std::make_unique<Placement>(d);
            QTEST_ASSERT_OK(place(gpu_[d].get()));
        }
    }

    // Builds the layer on p->device, registers the adapters, uploads the tables and
    // every step's inputs (each upload waits for its device).
    qattn_status place(Placement* p) const {
        qattn_status status = build_layer(*data_, p->device, kMaxRows, &p->lib);
        if (status != QATTN_SUCCESS) return status;
        std::vector<qattn_lora_desc> descs;
        for (const LoraData& l : data_->loras) descs.push_back(l.desc());
        status = qattn_set_loras(p->lib.layer.get(), descs.data(), static_cast<int>(descs.size()), nullptr);
        if (status != QATTN_SUCCESS) return status;
        p->sin = DeviceBuffer(p->device, data_->tables.sin);
        p->cos = DeviceBuffer(p->device, data_->tables.cos);
        const uint16_t nan = 0x7e00;
        for (size_t i = 0; i < kSteps.size(); ++i) {
            const size_t rows = static_cast<size_t>(kSteps[i].batch) * kSteps[i].q_len;
            Placement::Buffers b;
            b.x = DeviceBuffer(p->device, x_[i]);
            b.attn = DeviceBuffer(p->device, attn_[i]);
            b.q = DeviceBuffer(p->device, std::vector<uint16_t>(rows * data_->q_width(), nan));
            b.k = DeviceBuffer(p->device, std::vector<uint16_t>(rows * data_->kv_width(), nan));
            b.v = DeviceBuffer(p->device, std::vector<uint16_t>(rows * data_->kv_width(), nan));
            p->steps.push_back(std::move(b));
        }
        return QATTN_SUCCESS;
    }

    // Queues forward1 (phase 1) or forward2 (phase 2) of step i on p's stream; a
    // forward call never waits for the device (on the CPU it has finished).
    qattn_status enqueue(Placement& p, int phase, size_t i) const {
        const Step& step = kSteps[i];
        const Placement::Buffers& b = p.steps[i];
        const int32_t* lora_ids = data_->active.data();
        const int num_lora_ids = static_cast<int>(data_->active.size());
        if (phase == 1) {
            qattn_forward1_args a = qattn_forward1_args_default();
            a.batch = step.batch;
            a.q_len = step.q_len;
            a.x = b.x.get();
            a.past_len = step.past_len;
            a.sin = p.sin.as<float>();
            a.cos = p.cos.as<float>();
            a.max_positions = data_->tables.positions;
            a.q = b.q.get();
            a.k = b.k.get();
            a.v = b.v.get();
            a.lora_ids = lora_ids;
            a.num_lora_ids = num_lora_ids;
            return qattn_forward1(p.lib.layer.get(), &a, p.stream.get());
        }
        qattn_forward2_args a = qattn_forward2_args_default();
        a.batch = step.batch;
        a.q_len = step.q_len;
        a.x = b.x.get();
        a.attn_out = b.attn.get();
        a.lora_ids = lora_ids;
        a.num_lora_ids = num_lora_ids;
        return qattn_forward2(p.lib.layer.get(), &a, p.stream.get());
    }

    // q, k, v and the new x of step i on p (its stream must be done). With
    // `contribution`, x is what forward2 added: the residual itself would hide an
    // error in the O projection.
    std::array<std::vector<double>, 4> outputs(const Placement& p, size_t i, bool contribution) const {
        const Placement::Buffers& b = p.steps[i];
        std::array<std::vector<double>, 4> out = {widen(b.q.download<uint16_t>()), widen(b.k.download<uint16_t>()),
                                                  widen(b.v.download<uint16_t>()), widen(b.x.download<uint16_t>())};
        if (contribution)
            for (size_t j = 0; j < out[3].size(); ++j) out[3][j] -= from_half(x_[i][j]);
        return out;
    }

    // Both devices against the CPU layer, and against each other, step by step.
    void expect_results() const {
        const char* names[4] = {"q", "k", "v", "x"};
        for (size_t i = 0; i < kSteps.size(); ++i) {
            SCOPED_TRACE("step " + std::to_string(i) + ": batch " + std::to_string(kSteps[i].batch) + ", q_len " +
                         std::to_string(kSteps[i].q_len) + ", past_len " + std::to_string(kSteps[i].past_len));
            const auto ref = outputs(*cpu_, i, true);
            for (int d = 0; d < 2; ++d) {
                const auto out = outputs(*gpu_[d], i, true);
                for (int n = 0; n < 4; ++n)
                    EXPECT_LT(relative_error(out[n], ref[n]), kTolerance) << names[n] << " on cuda:" << d;
            }
            const auto out0 = outputs(*gpu_[0], i, false), out1 = outputs(*gpu_[1], i, false);
            for (int n = 0; n < 4; ++n)
                EXPECT_LT(relative_error(out1[n], out0[n]), kDeviceTolerance) << names[n] << ", cuda:1 vs cuda:0";
        }
    }

    std::unique_ptr<BlockData> data_;
    std::vector<std::vector<uint16_t>> x_, attn_;  // per step, host
    std::unique_ptr<Placement> cpu_, gpu_[2];
};

// Makes `device` the calling thread's current device for a scope.
class CurrentDevice {
public:
    explicit CurrentDevice(int device) {
        cudaGetDevice(&previous_);
        cudaSetDevice(device);
    }
    CurrentDevice(const CurrentDevice&) = delete;
    CurrentDevice& operator=(const CurrentDevice&) = delete;
    ~CurrentDevice() { cudaSetDevice(previous_); }

private:
    int previous_ = 0;
};

TEST_P(MultiDevice, InterleavedFromOneThread) {
    // The caller keeps device 1 current throughout: calls on the device-0 layer must
    // switch to device 0 and back. Nothing waits between calls, so both devices and
    // both streams have work in flight together.
    const CurrentDevice caller(1);
    for (size_t i = 0; i < kSteps.size(); ++i)
        for (int phase = 1; phase <= 2; ++phase)
            for (int d = 0; d < 2; ++d) {
                QTEST_ASSERT_OK(enqueue(*gpu_[d], phase, i));
                int current = -1;
                ASSERT_EQ(cudaGetDevice(&current), cudaSuccess);
                ASSERT_EQ(current, 1) << "forward" << phase << " on cuda:" << d << " left another device current";
            }
    for (int d = 0; d < 2; ++d) gpu_[d]->stream.synchronize();
    expect_results();
}

TEST_P(MultiDevice, TwoThreadsAtOnce) {
    // One thread per device; both start together and queue every step without
    // waiting, then wait for their own stream. qattn_last_error is per thread, so
    // each thread words its own failure.
    std::atomic<int> ready{0};
    qattn_status status[2] = {QATTN_SUCCESS, QATTN_SUCCESS};
    std::string failure[2];
    auto drive = [&](int d) {
        ready.fetch_add(1);
        while (ready.load() < 2) std::this_thread::yield();
        for (size_t i = 0; i < kSteps.size(); ++i)
            for (int phase = 1; phase <= 2; ++phase) {
                status[d] = enqueue(*gpu_[d], phase, i);
                if (status[d] != QATTN_SUCCESS) {
                    failure[d] = "step " + std::to_string(i) + ", forward" + std::to_string(phase) + ": " +
                                 failure_text(status[d]);
                    return;
                }
            }
        gpu_[d]->stream.synchronize();
    };
    std::thread threads[2] = {std::thread(drive, 0), std::thread(drive, 1)};
    for (std::thread& t : threads) t.join();
    for (int d = 0; d < 2; ++d) ASSERT_EQ(status[d], QATTN_SUCCESS) << "cuda:" << d << ", " << failure[d];
    expect_results();
}

INSTANTIATE_TEST_SUITE_P(Graphs, MultiDevice, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& info) {
                             return std::string(info.param ? "graphs" : "no_graphs");
                         });

}  // namespace
}  // namespace qtest

#else

TEST(MultiDevice, NeedsCuda) { GTEST_SKIP() << "needs 2 CUDA devices; the tests were built without CUDA"; }

#endif
