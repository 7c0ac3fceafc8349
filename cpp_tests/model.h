// Random attention-block weights, the library objects built from them, and a
// double-precision reference of DESIGN.md's math to check the library against.
#pragma once

#include "support.h"

#include <algorithm>
#include <array>

namespace qtest {

// ---- quantized matrices ------------------------------------------------------------

// The weights of one projection W [K, N] in the representation handed to the
// library, plus the exact W the reference uses.
struct MatrixData {
    qattn_qmatrix_format format = QATTN_QMATRIX_DENSE_F16;
    int64_t K = 0, N = 0;
    std::vector<uint16_t> bias;  // empty: none
    std::vector<uint16_t> weight;  // dense [N, K]
    int bits = 4, group_size = 0;
    int64_t groups = 0;
    bool zero_offset_one = true;
    std::vector<int32_t> qweight, qzeros, g_idx;  // g_idx empty: k / group_size
    std::vector<uint16_t> scales;
    std::vector<double> w;  // [K, N]

    qattn_qmatrix_desc desc(int device) const {
        qattn_qmatrix_desc d = qattn_qmatrix_desc_default();
        d.format = format;
        d.device = device;
        d.in_features = K;
        d.out_features = N;
        d.bias = bias.empty() ? nullptr : bias.data();
        if (format == QATTN_QMATRIX_DENSE_F16) {
            d.weight = weight.data();
        } else {
            d.bits = bits;
            d.group_size = group_size;
            d.num_groups = g_idx.empty() ? 0 : groups;
            d.zero_offset_one = zero_offset_one;
            d.qweight = qweight.data();
            d.qzeros = qzeros.data();
            d.scales = scales.data();
            d.g_idx = g_idx.empty() ? nullptr : g_idx.data();
        }
        return d;
    }
};

// Dense fp16 weight with entries of size ~1/sqrt(K), so outputs stay O(1).
inline MatrixData make_dense(Random& rng, int64_t K, int64_t N, bool bias) {
    MatrixData m;
    m.K = K;
    m.N = N;
    const double scale = 1.0 / std::sqrt(static_cast<double>(K));
    m.weight = rng.halves(static_cast<size_t>(N * K), -scale, scale);
    if (bias) m.bias = rng.halves(N, -0.5, 0.5);
    m.w.assign(static_cast<size_t>(K * N), 0.0);
    for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < K; ++k) m.w[k * N + n] = from_half(m.weight[n * K + k]);
    return m;
}

// GPTQ weight: the integer codes, zeros and scales are drawn first, the reference
// W is computed from them, and only then are they packed the way checkpoints
// store them, so a packing or unpacking mistake cannot cancel out.
inline MatrixData make_gptq(Random& rng, int64_t K, int64_t N, int bits, int group_size, bool act_order,
                            bool zero_offset_one, bool bias) {
    MatrixData m;
    m.format = QATTN_QMATRIX_GPTQ;
    m.K = K;
    m.N = N;
    m.bits = bits;
    m.group_size = group_size;
    m.groups = (K + group_size - 1) / group_size;
    m.zero_offset_one = zero_offset_one;
    const int levels = 1 << bits, per_word = 32 / bits;

    std::vector<int> group_of(K);
    for (int64_t k = 0; k < K; ++k) group_of[k] = static_cast<int>(k / group_size);
    if (act_order) {
        std::shuffle(group_of.begin(), group_of.end(), rng.engine());
        m.g_idx.assign(group_of.begin(), group_of.end());
    }

    // Scales sized so that W has entries of about 1/sqrt(K), like the dense case.
    const double scale = 2.0 / (levels * std::sqrt(static_cast<double>(K)));
    m.scales = rng.halves(static_cast<size_t>(m.groups * N), 0.5 * scale, 1.5 * scale);
    std::vector<int> stored_zero(static_cast<size_t>(m.groups * N));
    for (auto& z : stored_zero) z = rng.integer(0, levels - 2);
    std::vector<int> code(static_cast<size_t>(K * N));
    for (auto& q : code) q = rng.integer(0, levels - 1);

    m.w.assign(static_cast<size_t>(K * N), 0.0);
    for (int64_t k = 0; k < K; ++k)
        for (int64_t n = 0; n < N; ++n) {
            const int64_t g = group_of[k];
            const int zero = stored_zero[g * N + n] + (zero_offset_one ? 1 : 0);
            m.w[k * N + n] = from_half(m.scales[g * N + n]) * (code[k * N + n] - zero);
        }

    std::vector<uint32_t> qweight(static_cast<size_t>(K / per_word * N), 0u);
    for (int64_t k = 0; k < K; ++k)
        for (int64_t n = 0; n < N; ++n)
            qweight[(k / per_word) * N + n] |= static_cast<uint32_t>(code[k * N + n]) << ((k % per_word) * bits);
    std::vector<uint32_t> qzeros(static_cast<size_t>(m.groups * (N / per_word)), 0u);
    for (int64_t g = 0; g < m.groups; ++g)
        for (int64_t n = 0; n < N; ++n)
            qzeros[g * (N / per_word) + n / per_word] |= static_cast<uint32_t>(stored_zero[g * N + n])
                                                         << ((n % per_word) * bits);
    m.qweight.assign(qweight.begin(), qweight.end());
    m.qzeros.assign(qzeros.begin(), qzeros.end());
    if (bias) m.bias = rng.halves(N, -0.5, 0.5);
    return m;
}

// ---- norms ----------------------------------------------------------------------

struct NormData {
    qattn_norm_type type = QATTN_NORM_NONE;
    bool per_head = false;
    float eps = 1e-5f;
    std::vector<uint16_t> weight, bias;

    qattn_norm_desc desc() const {
        qattn_norm_desc d{};
        d.type = type;
        d.eps = eps;
        d.weight = weight.empty() ? nullptr : weight.data();
        d.bias = bias.empty() ? nullptr : bias.data();
        d.per_head = per_head;
        return d;
    }

    // Normalises v[0 .. width) in place; `head` picks the row of a per-head weight.
    void apply(double* v, int width, int head = 0) const {
        if (type == QATTN_NORM_NONE) return;
        const size_t offset = per_head ? static_cast<size_t>(head) * width : 0;
        double mean = 0;
        if (type == QATTN_NORM_LAYER) {
            for (int i = 0; i < width; ++i) mean += v[i];
            mean /= width;
        }
        double square = 0;
        for (int i = 0; i < width; ++i) square += (v[i] - mean) * (v[i] - mean);
        const double inv = 1.0 / std::sqrt(square / width + static_cast<double>(eps));
        for (int i = 0; i < width; ++i)
            v[i] = (v[i] - mean) * inv * from_half(weight[offset + i]) + (bias.empty() ? 0.0 : from_half(bias[offset + i]));
    }
};

inline NormData make_norm(Random& rng, qattn_norm_type type, int width, int heads, bool per_head, bool bias) {
    NormData n;
    n.type = type;
    n.per_head = per_head;
    if (type == QATTN_NORM_NONE) return n;
    const size_t len = static_cast<size_t>(width) * (per_head ? heads : 1);
    n.weight = rng.halves(len, 0.5, 1.5);
    if (bias) n.bias = rng.halves(len, -0.3, 0.3);
    return n;
}

// ---- LoRA -----------------------------------------------------------------------

struct LoraData {
    int id = 0;
    qattn_proj proj = QATTN_PROJ_Q;
    int rank = 0, in = 0, out = 0;
    std::vector<uint16_t> a, b;  // [in, rank], [rank, out]

    qattn_lora_desc desc() const {
        qattn_lora_desc d = qattn_lora_desc_default();
        d.id = id;
        d.proj = proj;
        d.rank = rank;
        d.a = a.data();
        d.b = b.data();
        return d;
    }

    // y[out] += (x . A) . B
    void apply(const double* x, double* y) const {
        std::vector<double> down(rank, 0.0);
        for (int i = 0; i < in; ++i)
            for (int r = 0; r < rank; ++r) down[r] += x[i] * from_half(a[static_cast<size_t>(i) * rank + r]);
        for (int r = 0; r < rank; ++r)
            for (int o = 0; o < out; ++o) y[o] += down[r] * from_half(b[static_cast<size_t>(r) * out + o]);
    }
};

// Sized so that the adapter changes the projection output by about half its size:
// a dropped or misplaced adapter shows up far above the tolerances.
inline LoraData make_lora(Random& rng, int id, qattn_proj proj, int rank, int in, int out) {
    LoraData l;
    l.id = id;
    l.proj = proj;
    l.rank = rank;
    l.in = in;
    l.out = out;
    const double a_scale = 1.0 / std::sqrt(static_cast<double>(in));
    const double b_scale = 0.5 / std::sqrt(static_cast<double>(rank));
    l.a = rng.halves(static_cast<size_t>(in) * rank, -a_scale * 1.7, a_scale * 1.7);
    l.b = rng.halves(static_cast<size_t>(rank) * out, -b_scale * 1.7, b_scale * 1.7);
    return l;
}

// ---- RoPE tables ---------------------------------------------------------------------

struct RopeTables {
    int positions = 0, half = 0;
    std::vector<float> sin, cos;  // [positions, half]
};

inline RopeTables make_rope_tables(int positions, int rotary_dim, double base = 10000.0) {
    RopeTables t;
    t.positions = positions;
    t.half = rotary_dim / 2;
    for (int p = 0; p < positions; ++p)
        for (int i = 0; i < t.half; ++i) {
            const double angle = p * std::pow(base, -2.0 * i / rotary_dim);
            t.sin.push_back(static_cast<float>(std::sin(angle)));
            t.cos.push_back(static_cast<float>(std::cos(angle)));
        }
    return t;
}

// Rotates the first rotary_dim values of one head at `position`.
inline void rotate(qattn_rope_type type, int rotary_dim, const RopeTables& t, int position, double* head) {
    const int pairs = rotary_dim / 2;
    for (int i = 0; i < pairs; ++i) {
        const int first = type == QATTN_ROPE_NEOX ? i : 2 * i;
        const int second = type == QATTN_ROPE_NEOX ? i + pairs : 2 * i + 1;
        const double s = t.sin[static_cast<size_t>(position) * t.half + i];
        const double c = t.cos[static_cast<size_t>(position) * t.half + i];
        const double a = head[first], b = head[second];
        head[first] = a * c - b * s;
        head[second] = b * c + a * s;
    }
}

// ---- the whole block --------------------------------------------------------------------

// What varies between numeric test cases.
struct Scenario {
    std::string name;
    int hidden = 64, heads = 4, kv_heads = 2, head_dim = 16;
    int batch = 2, q_len = 3;
    bool gptq = false;
    int bits = 4, group_size = 16;
    bool act_order = false, zero_offset_one = true;
    bool q_bias = false, o_bias = false;
    qattn_norm_type input_norm = QATTN_NORM_RMS;
    bool input_norm_bias = false;
    qattn_norm_type head_norm = QATTN_NORM_NONE;
    bool head_norm_per_head = false;
    qattn_norm_type post_norm = QATTN_NORM_NONE;
    qattn_rope_type rope = QATTN_ROPE_NEOX;
    int rotary_dim = 0;  // 0: head_dim
    bool use_past_lens = false;
    bool residual_fp32 = false, has_residual = true;
    bool loras = false;
    bool use_graphs = false;
    int max_seq_len = 40, table_positions = 48;  // the layer's limit, and the RoPE tables' rows
};

// Host-side description of a layer plus the reference forward passes.
struct BlockData {
    Scenario s;
    MatrixData q, k, v, o;
    NormData input_norm, q_norm, k_norm, post_norm;
    std::vector<LoraData> loras;
    std::vector<int32_t> active;  // adapter ids passed to the forward calls
    RopeTables tables;
    int max_seq_len;

    int rotary_dim() const { return s.rotary_dim == 0 ? s.head_dim : s.rotary_dim; }
    int q_width() const { return s.heads * s.head_dim; }
    int kv_width() const { return s.kv_heads * s.head_dim; }
    int rows() const { return s.batch * s.q_len; }

    BlockData(const Scenario& scenario, Random& rng) : s(scenario), max_seq_len(scenario.max_seq_len) {
        auto matrix = [&](int64_t K, int64_t N, bool bias) {
            return s.gptq ? make_gptq(rng, K, N, s.bits, s.group_size, s.act_order, s.zero_offset_one, bias)
                          : make_dense(rng, K, N, bias);
        };
        q = matrix(s.hidden, q_width(), s.q_bias);
        k = matrix(s.hidden, kv_width(), false);
        v = matrix(s.hidden, kv_width(), false);
        o = matrix(q_width(), s.hidden, s.o_bias);
        input_norm = make_norm(rng, s.input_norm, s.hidden, 1, false, s.input_norm_bias);
        const bool head_bias = s.head_norm == QATTN_NORM_LAYER;
        q_norm = make_norm(rng, s.head_norm, s.head_dim, s.heads, s.head_norm_per_head, head_bias);
        k_norm = make_norm(rng, s.head_norm, s.head_dim, s.kv_heads, s.head_norm_per_head, head_bias);
        post_norm = make_norm(rng, s.post_norm, s.hidden, 1, false, false);
        if (s.loras) {
            // Adapter 7 covers q, v and o; adapter 9 covers k and o but stays
            // inactive, so applying an unlisted adapter is caught too.
            loras.push_back(make_lora(rng, 7, QATTN_PROJ_Q, 4, s.hidden, q_width()));
            loras.push_back(make_lora(rng, 7, QATTN_PROJ_V, 2, s.hidden, kv_width()));
            loras.push_back(make_lora(rng, 7, QATTN_PROJ_O, 3, q_width(), s.hidden));
            loras.push_back(make_lora(rng, 9, QATTN_PROJ_K, 5, s.hidden, kv_width()));
            loras.push_back(make_lora(rng, 9, QATTN_PROJ_O, 2, q_width(), s.hidden));
            active = {7};
        }
        if (s.rope != QATTN_ROPE_NONE) tables = make_rope_tables(s.table_positions, rotary_dim());
    }

    qattn_layer_config config(int device, qattn_qmatrix* qm, qattn_qmatrix* km, qattn_qmatrix* vm,
                              qattn_qmatrix* om, int max_rows) const {
        qattn_layer_config c = qattn_layer_config_default();
        c.device = device;
        c.hidden_size = s.hidden;
        c.num_heads = s.heads;
        c.num_kv_heads = s.kv_heads;
        c.head_dim = s.head_dim;
        c.max_rows = max_rows;
        c.max_seq_len = max_seq_len;
        c.input_norm = input_norm.desc();
        c.q_norm = q_norm.desc();
        c.k_norm = k_norm.desc();
        c.post_norm = post_norm.desc();
        c.rope = s.rope;
        c.rotary_dim = s.rotary_dim;
        c.has_residual = s.has_residual;
        c.residual_fp32 = s.residual_fp32;
        c.use_graphs = s.use_graphs;
        c.q_proj = qm;
        c.k_proj = km;
        c.v_proj = vm;
        c.o_proj = om;
        return c;
    }

    // y[rows, N] = x[rows, K] . W + bias + active adapters of `proj`.
    std::vector<double> project(const MatrixData& m, qattn_proj proj, const std::vector<double>& x) const {
        const int R = static_cast<int>(x.size() / m.K);
        std::vector<double> y(static_cast<size_t>(R * m.N), 0.0);
        for (int r = 0; r < R; ++r) {
            double* out = y.data() + r * m.N;
            const double* in = x.data() + r * m.K;
            for (int64_t n = 0; n < m.N; ++n) out[n] = m.bias.empty() ? 0.0 : from_half(m.bias[n]);
            for (int64_t kk = 0; kk < m.K; ++kk)
                for (int64_t n = 0; n < m.N; ++n) out[n] += in[kk] * m.w[kk * m.N + n];
            for (const LoraData& l : loras)
                if (l.proj == proj && std::find(active.begin(), active.end(), l.id) != active.end()) l.apply(in, out);
        }
        return y;
    }

    // Reference forward1: returns {q, k, v}. `x` is the residual stream as doubles.
    std::array<std::vector<double>, 3> forward1(const std::vector<double>& x, int past_len,
                                                const std::vector<int32_t>& past_lens) const {
        std::vector<double> n = x;
        for (int r = 0; r < rows(); ++r) input_norm.apply(n.data() + static_cast<size_t>(r) * s.hidden, s.hidden);
        std::array<std::vector<double>, 3> out = {project(q, QATTN_PROJ_Q, n), project(k, QATTN_PROJ_K, n),
                                                  project(v, QATTN_PROJ_V, n)};
        for (int which = 0; which < 2; ++which) {
            const int heads = which == 0 ? s.heads : s.kv_heads;
            const NormData& head_norm = which == 0 ? q_norm : k_norm;
            for (int r = 0; r < rows(); ++r) {
                const int b = r / s.q_len, t = r % s.q_len;
                const int position = (past_lens.empty() ? past_len : past_lens[b]) + t;
                for (int h = 0; h < heads; ++h) {
                    double* head = out[which].data() + (static_cast<size_t>(r) * heads + h) * s.head_dim;
                    head_norm.apply(head, s.head_dim, h);
                    if (s.rope != QATTN_ROPE_NONE) rotate(s.rope, rotary_dim(), tables, position, head);
                }
            }
        }
        return out;
    }

    // Reference forward2: the new residual stream.
    std::vector<double> forward2(const std::vector<double>& x, const std::vector<double>& attn) const {
        std::vector<double> y = project(o, QATTN_PROJ_O, attn);
        for (int r = 0; r < rows(); ++r) {
            double* row = y.data() + static_cast<size_t>(r) * s.hidden;
            post_norm.apply(row, s.hidden);
            if (s.has_residual)
                for (int i = 0; i < s.hidden; ++i) row[i] += x[static_cast<size_t>(r) * s.hidden + i];
        }
        return y;
    }
};

// The library objects of a BlockData: its four projections (q, k, v, o) and the
// layer over them, with the config the layer was created from.
struct LibraryLayer {
    QMatrixPtr matrices[4];
    qattn_layer_config config{};
    LayerPtr layer;
};

// Creates the matrices and the layer on `device` for up to `max_rows` rows a call;
// returns the status of the first call that fails.
inline qattn_status build_layer(const BlockData& data, int device, int max_rows, LibraryLayer* out) {
    const MatrixData* sources[4] = {&data.q, &data.k, &data.v, &data.o};
    for (int i = 0; i < 4; ++i) {
        qattn_qmatrix* m = nullptr;
        const qattn_qmatrix_desc desc = sources[i]->desc(device);
        const qattn_status status = qattn_qmatrix_create(&desc, &m);
        if (status != QATTN_SUCCESS) return status;
        out->matrices[i].reset(m);
    }
    out->config = data.config(device, out->matrices[0].get(), out->matrices[1].get(), out->matrices[2].get(),
                              out->matrices[3].get(), max_rows);
    qattn_layer* layer = nullptr;
    const qattn_status status = qattn_create(&out->config, &layer);
    out->layer.reset(layer);
    return status;
}

}  // namespace qtest
