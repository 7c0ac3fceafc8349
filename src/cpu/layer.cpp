// The attention block on the CPU, step by step as the contract states it.
#include "core/error.h"
#include "cpu/half.h"
#include "cpu/ops.h"
#include "cpu/qmatrix.h"

namespace qattn::cpu {
namespace {

struct Lora {
    qattn_proj proj;
    int rank;
    CpuQMatrix down;  // A: in -> rank
    CpuQMatrix up;    // B: rank -> out
};

CpuQMatrix dense_from(const std::vector<uint16_t>& bits, int64_t in, int64_t out) {
    QMatrixInfo info;
    info.in_features = in;
    info.out_features = out;
    std::vector<float> w(bits.size());  // bits are [in, out], already the [K, N] layout
    for (size_t i = 0; i < bits.size(); ++i) w[i] = half_to_float(bits[i]);
    return CpuQMatrix(info, std::move(w), {});
}

class CpuLayer final : public LayerImpl {
public:
    CpuLayer(const LayerInfo& info, const LayerHostWeights& weights, const LayerProjections& projections)
        : info_(info),
          input_norm_(widen(info.input_norm, weights.input_norm)),
          q_norm_(widen(info.q_norm, weights.q_norm)),
          k_norm_(widen(info.k_norm, weights.k_norm)),
          post_norm_(widen(info.post_norm, weights.post_norm)) {
        proj_[QATTN_PROJ_Q] = static_cast<const CpuQMatrix*>(projections.q);
        proj_[QATTN_PROJ_K] = static_cast<const CpuQMatrix*>(projections.k);
        proj_[QATTN_PROJ_V] = static_cast<const CpuQMatrix*>(projections.v);
        proj_[QATTN_PROJ_O] = static_cast<const CpuQMatrix*>(projections.o);
    }

    qattn_status forward1(const Forward1Call& call, void*) override {
        const int H = info_.hidden_size, D = info_.head_dim;
        std::vector<float> normed(static_cast<size_t>(call.rows) * H);
        for (int r = 0; r < call.rows; ++r) {
            float* row = normed.data() + static_cast<size_t>(r) * H;
            read_residual(call.x, r, row);
            if (input_norm_.enabled()) normalize(input_norm_, row);
        }

        const qattn_proj projs[3] = {QATTN_PROJ_Q, QATTN_PROJ_K, QATTN_PROJ_V};
        void* outputs[3] = {call.q, call.k, call.v};
        for (int p = 0; p < 3; ++p) {
            const qattn_proj proj = projs[p];
            const int heads = proj == QATTN_PROJ_Q ? info_.num_heads : info_.num_kv_heads;
            std::vector<float> y = project(proj, normed.data(), call.rows, *call.loras);
            for (int r = 0; r < call.rows; ++r) {
                const int position = position_of(call, r);
                for (int h = 0; h < heads; ++h) {
                    float* head = y.data() + (static_cast<size_t>(r) * heads + h) * D;
                    const Norm* head_norm = proj == QATTN_PROJ_Q ? &q_norm_ : proj == QATTN_PROJ_K ? &k_norm_ : nullptr;
                    if (head_norm && head_norm->enabled()) normalize(*head_norm, head, h);
                    if (proj != QATTN_PROJ_V && info_.rope != QATTN_ROPE_NONE) {
                        const size_t table_row = static_cast<size_t>(position) * (info_.rotary_dim / 2);
                        rotate(info_.rope, info_.rotary_dim, call.sin + table_row, call.cos + table_row, head);
                    }
                }
            }
            if (outputs[p]) store_half(y.data(), y.size(), static_cast<uint16_t*>(outputs[p]));
            if (proj != QATTN_PROJ_Q && call.kv_slots) {
                // Row r of k or v into its cache slot (slots checked by the core).
                const size_t width = static_cast<size_t>(heads) * D;
                auto* cache = static_cast<uint16_t*>(proj == QATTN_PROJ_K ? call.k_cache : call.v_cache);
                for (int r = 0; r < call.rows; ++r)
                    store_half(y.data() + r * width, width, cache + call.kv_slots[r] * width);
            }
        }
        return QATTN_SUCCESS;
    }

    qattn_status forward2(const Forward2Call& call, void*) override {
        const int H = info_.hidden_size, width = info_.q_width();
        std::vector<float> attn(static_cast<size_t>(call.rows) * width);
        const auto* attn_bits = static_cast<const uint16_t*>(call.attn_out);
        for (size_t i = 0; i < attn.size(); ++i) attn[i] = half_to_float(attn_bits[i]);

        std::vector<float> y = project(QATTN_PROJ_O, attn.data(), call.rows, *call.loras);
        std::vector<float> x(H);
        for (int r = 0; r < call.rows; ++r) {
            float* out = y.data() + static_cast<size_t>(r) * H;
            if (post_norm_.enabled()) normalize(post_norm_, out);
            if (info_.has_residual) {
                read_residual(call.x, r, x.data());
                for (int i = 0; i < H; ++i) out[i] += x[i];
            }
            write_residual(call.x, r, out);
        }
        return QATTN_SUCCESS;
    }

    qattn_status set_loras(const std::vector<LoraSpec>& specs) override {
        std::vector<Lora> loras;
        for (const LoraSpec& s : specs)
            loras.push_back(Lora{s.proj, s.rank, dense_from(s.a, s.in_features, s.rank),
                                 dense_from(s.b, s.rank, s.out_features)});
        loras_ = std::move(loras);
        return QATTN_SUCCESS;
    }

    // The CPU checks every position on the host before computing.
    qattn_status check_device_errors(void*) override { return QATTN_SUCCESS; }

private:
    // y = x . W (+ bias) + sum over active adapters of (x . A) . B
    std::vector<float> project(qattn_proj proj, const float* x, int rows, const ActiveLoras& active) const {
        const CpuQMatrix& m = *proj_[proj];
        std::vector<float> y(static_cast<size_t>(rows) * m.out_features());
        m.multiply(x, rows, y.data());
        for (int index : active[proj]) {
            const Lora& lora = loras_[index];
            std::vector<float> down(static_cast<size_t>(rows) * lora.rank);
            std::vector<float> up(y.size());
            lora.down.multiply(x, rows, down.data());
            lora.up.multiply(down.data(), rows, up.data());
            for (size_t i = 0; i < y.size(); ++i) y[i] += up[i];
        }
        return y;
    }

    int position_of(const Forward1Call& call, int row) const {
        const int b = row / call.q_len, t = row % call.q_len;
        return (call.past_lens ? call.past_lens[b] : call.past_len) + t;
    }

    void read_residual(const void* x, int row, float* out) const {
        const int H = info_.hidden_size;
        if (info_.residual_fp32) {
            const float* src = static_cast<const float*>(x) + static_cast<size_t>(row) * H;
            for (int i = 0; i < H; ++i) out[i] = src[i];
        } else {
            const uint16_t* src = static_cast<const uint16_t*>(x) + static_cast<size_t>(row) * H;
            for (int i = 0; i < H; ++i) out[i] = half_to_float(src[i]);
        }
    }

    void write_residual(void* x, int row, const float* in) const {
        const int H = info_.hidden_size;
        if (info_.residual_fp32) {
            float* dst = static_cast<float*>(x) + static_cast<size_t>(row) * H;
            for (int i = 0; i < H; ++i) dst[i] = in[i];
        } else {
            uint16_t* dst = static_cast<uint16_t*>(x) + static_cast<size_t>(row) * H;
            for (int i = 0; i < H; ++i) dst[i] = float_to_half(in[i]);
        }
    }

    static void store_half(const float* src, size_t count, uint16_t* dst) {
        for (size_t i = 0; i < count; ++i) dst[i] = float_to_half(src[i]);
    }

    LayerInfo info_;
    Norm input_norm_, q_norm_, k_norm_, post_norm_;
    const CpuQMatrix* proj_[4] = {};
    std::vector<Lora> loras_;
};

}  // namespace

qattn_status create_layer(const LayerInfo& info, const LayerHostWeights& weights,
                          const LayerProjections& projections, std::unique_ptr<LayerImpl>* out) {
    *out = std::make_unique<CpuLayer>(info, weights, projections);
    return QATTN_SUCCESS;
}

}  // namespace qattn::cpu
