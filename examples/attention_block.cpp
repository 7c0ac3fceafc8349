// A whole attention block on the CPU through the installed qattn library: a
// small random GPTQ (or dense) layer, forward1, a plain causal attention over a
// contiguous KV cache written here, forward2; a prefill, then decode steps.
//
//   attention_block [gptq|dense]
#include <qattn.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

// fp16 <-> fp32 for normal-range values (all this example produces), round to nearest.
uint16_t to_half(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    const uint32_t sign = (bits >> 16) & 0x8000u;
    const int exponent = static_cast<int>((bits >> 23) & 0xff) - 127 + 15;
    if (exponent <= 0) return static_cast<uint16_t>(sign);  // too small for this example: flush to zero
    if (exponent >= 31) return static_cast<uint16_t>(sign | 0x7c00u);
    uint32_t half = sign | (static_cast<uint32_t>(exponent) << 10) | ((bits >> 13) & 0x3ffu);
    const uint32_t rest = bits & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) ++half;
    return static_cast<uint16_t>(half);
}

float from_half(uint16_t h) {
    const int exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    const float sign = (h & 0x8000) ? -1.0f : 1.0f;
    if (exponent == 0) return sign * std::ldexp(static_cast<float>(mantissa), -24);
    if (exponent == 31) return mantissa ? NAN : sign * INFINITY;
    return sign * std::ldexp(static_cast<float>(1024 + mantissa), exponent - 25);
}

bool ok(qattn_status status, const char* what) {
    if (status == QATTN_SUCCESS) return true;
    std::fprintf(stderr, "%s failed: %s: %s\n", what, qattn_status_string(status), qattn_last_error());
    return false;
}

struct Sizes {
    int hidden = 128, heads = 4, kv_heads = 2, head_dim = 32;
    int batch = 2, prompt = 6, decode_steps = 4, max_seq = 32;
    int q_width() const { return heads * head_dim; }
    int kv_width() const { return kv_heads * head_dim; }
};

class Weights {
public:
    explicit Weights(uint32_t seed) : rng_(seed) {}

    std::vector<uint16_t> halves(size_t n, float lo, float hi) {
        std::uniform_real_distribution<float> u(lo, hi);
        std::vector<uint16_t> out(n);
        for (auto& h : out) h = to_half(u(rng_));
        return out;
    }
    std::vector<int32_t> words(size_t n) {
        std::vector<int32_t> out(n);
        for (auto& w : out) w = static_cast<int32_t>(rng_());
        return out;
    }

    // One projection K -> N. The library copies the weights at creation, so the
    // host vectors may go once qattn_qmatrix_create returns.
    qattn_qmatrix* make(bool gptq, int K, int N) {
        qattn_qmatrix_desc d = qattn_qmatrix_desc_default();
        d.in_features = K;
        d.out_features = N;
        std::vector<int32_t> qweight, qzeros;
        std::vector<uint16_t> scales, weight;
        if (gptq) {
            const int group_size = 32, groups = K / group_size;
            qweight = words(static_cast<size_t>(K / 8) * N);
            qzeros = words(static_cast<size_t>(groups) * (N / 8));
            // 4-bit codes minus zeros (stored zero + 1) lie in [-16, 14]; scale them to weights of ~1/sqrt(K).
            const float s = 1.0f / (8.0f * std::sqrt(static_cast<float>(K)));
            scales = halves(static_cast<size_t>(groups) * N, 0.5f * s, 1.5f * s);
            d.format = QATTN_QMATRIX_GPTQ;
            d.bits = 4;
            d.group_size = group_size;
            d.qweight = qweight.data();
            d.qzeros = qzeros.data();
            d.scales = scales.data();
        } else {
            const float s = 1.0f / std::sqrt(static_cast<float>(K));
            weight = halves(static_cast<size_t>(N) * K, -s, s);
            d.weight = weight.data();
        }
        qattn_qmatrix* m = nullptr;
        return ok(qattn_qmatrix_create(&d, &m), "qattn_qmatrix_create") ? m : nullptr;
    }

private:
    std::mt19937 rng_;
};

// Causal attention of `q_len` new tokens per sequence at positions past_len ..,
// whose keys and values were just appended to the cache [batch, max_seq, NKV, D].
void attention(const Sizes& s, int q_len, int past_len, const std::vector<uint16_t>& q,
               const std::vector<float>& k_cache, const std::vector<float>& v_cache, std::vector<uint16_t>* out) {
    const int group = s.heads / s.kv_heads, D = s.head_dim;
    const float scale = 1.0f / std::sqrt(static_cast<float>(D));
    std::vector<float> scores(s.max_seq), acc(D);
    for (int b = 0; b < s.batch; ++b)
        for (int t = 0; t < q_len; ++t) {
            const int row = b * q_len + t, visible = past_len + t + 1;
            for (int h = 0; h < s.heads; ++h) {
                const int kvh = h / group;
                const uint16_t* qh = q.data() + (static_cast<size_t>(row) * s.heads + h) * D;
                float top = -INFINITY;
                for (int p = 0; p < visible; ++p) {
                    const float* kp = k_cache.data() + ((static_cast<size_t>(b) * s.max_seq + p) * s.kv_heads + kvh) * D;
                    float dot = 0;
                    for (int i = 0; i < D; ++i) dot += from_half(qh[i]) * kp[i];
                    scores[p] = dot * scale;
                    top = std::max(top, scores[p]);
                }
                float total = 0;
                for (int p = 0; p < visible; ++p) total += scores[p] = std::exp(scores[p] - top);
                std::fill(acc.begin(), acc.end(), 0.0f);
                for (int p = 0; p < visible; ++p) {
                    const float* vp = v_cache.data() + ((static_cast<size_t>(b) * s.max_seq + p) * s.kv_heads + kvh) * D;
                    for (int i = 0; i < D; ++i) acc[i] += scores[p] / total * vp[i];
                }
                uint16_t* o = out->data() + (static_cast<size_t>(row) * s.heads + h) * D;
                for (int i = 0; i < D; ++i) o[i] = to_half(acc[i]);
            }
        }
}

}  // namespace

int main(int argc, char** argv) {
    const std::string format = argc > 1 ? argv[1] : "gptq";
    if (format != "gptq" && format != "dense") {
        std::fprintf(stderr, "usage: %s [gptq|dense]\n", argv[0]);
        return 2;
    }
    const bool gptq = format == "gptq";
    std::printf("%s\n", qattn_build_info());
    if (qattn_version() != QATTN_VERSION) {
        std::fprintf(stderr, "header version %d but library version %d\n", QATTN_VERSION, qattn_version());
        return 1;
    }

    const Sizes s;
    Weights w(1234);
    qattn_qmatrix* q_proj = w.make(gptq, s.hidden, s.q_width());
    qattn_qmatrix* k_proj = w.make(gptq, s.hidden, s.kv_width());
    qattn_qmatrix* v_proj = w.make(gptq, s.hidden, s.kv_width());
    qattn_qmatrix* o_proj = w.make(gptq, s.q_width(), s.hidden);
    if (!q_proj || !k_proj || !v_proj || !o_proj) return 1;

    const std::vector<uint16_t> norm_weight = w.halves(s.hidden, 0.8f, 1.2f);
    qattn_layer_config c = qattn_layer_config_default();
    c.hidden_size = s.hidden;
    c.num_heads = s.heads;
    c.num_kv_heads = s.kv_heads;
    c.head_dim = s.head_dim;
    c.max_rows = s.batch * s.prompt;
    c.max_seq_len = s.max_seq;
    c.input_norm.type = QATTN_NORM_RMS;
    c.input_norm.weight = norm_weight.data();
    c.rope = QATTN_ROPE_NEOX;
    c.q_proj = q_proj;
    c.k_proj = k_proj;
    c.v_proj = v_proj;
    c.o_proj = o_proj;
    qattn_layer* layer = nullptr;
    if (!ok(qattn_create(&c, &layer), "qattn_create")) return 1;

    // RoPE tables [max_seq, D/2] for base 10000.
    const int half = s.head_dim / 2;
    std::vector<float> sin_table(static_cast<size_t>(s.max_seq) * half), cos_table(sin_table.size());
    for (int p = 0; p < s.max_seq; ++p)
        for (int i = 0; i < half; ++i) {
            const double angle = p * std::pow(10000.0, -2.0 * i / s.head_dim);
            sin_table[static_cast<size_t>(p) * half + i] = static_cast<float>(std::sin(angle));
            cos_table[static_cast<size_t>(p) * half + i] = static_cast<float>(std::cos(angle));
        }

    const size_t cache_size = static_cast<size_t>(s.batch) * s.max_seq * s.kv_width();
    std::vector<float> k_cache(cache_size), v_cache(cache_size);
    bool failed = false;
    int past_len = 0;
    for (int step = 0; step <= s.decode_steps && !failed; ++step) {
        const int q_len = step == 0 ? s.prompt : 1, rows = s.batch * q_len;
        // Each step feeds fresh random hidden states, as the embeddings of new tokens.
        std::vector<uint16_t> x = w.halves(static_cast<size_t>(rows) * s.hidden, -1.0f, 1.0f);
        std::vector<uint16_t> q(static_cast<size_t>(rows) * s.q_width()), k(static_cast<size_t>(rows) * s.kv_width()),
            v(k.size()), attn(q.size());

        qattn_forward1_args a1 = qattn_forward1_args_default();
        a1.batch = s.batch;
        a1.q_len = q_len;
        a1.x = x.data();
        a1.past_len = past_len;
        a1.sin = sin_table.data();
        a1.cos = cos_table.data();
        a1.max_positions = s.max_seq;
        a1.q = q.data();
        a1.k = k.data();
        a1.v = v.data();
        if (!ok(qattn_forward1(layer, &a1, nullptr), "qattn_forward1")) {
            failed = true;
            break;
        }
        for (int b = 0; b < s.batch; ++b)
            for (int t = 0; t < q_len; ++t)
                for (int i = 0; i < s.kv_width(); ++i) {
                    const size_t src = static_cast<size_t>(b * q_len + t) * s.kv_width() + i;
                    const size_t dst = (static_cast<size_t>(b) * s.max_seq + past_len + t) * s.kv_width() + i;
                    k_cache[dst] = from_half(k[src]);
                    v_cache[dst] = from_half(v[src]);
                }
        attention(s, q_len, past_len, q, k_cache, v_cache, &attn);

        qattn_forward2_args a2 = qattn_forward2_args_default();
        a2.batch = s.batch;
        a2.q_len = q_len;
        a2.x = x.data();
        a2.attn_out = attn.data();
        if (!ok(qattn_forward2(layer, &a2, nullptr), "qattn_forward2")) {
            failed = true;
            break;
        }
        double square = 0;
        bool finite = true;
        for (uint16_t h : x) {
            const float f = from_half(h);
            finite = finite && std::isfinite(f);
            square += static_cast<double>(f) * f;
        }
        std::printf("%-8s rows %2d  positions %2d..%2d  rms(x + attention block) = %.4f\n",
                    step == 0 ? "prefill" : "decode", rows, past_len, past_len + q_len - 1,
                    std::sqrt(square / x.size()));
        if (!finite) {
            std::fprintf(stderr, "non-finite values in the block output\n");
            failed = true;
        }
        past_len += q_len;
    }

    // A position past max_seq_len must be refused with a message, not computed.
    std::vector<uint16_t> x(static_cast<size_t>(s.hidden)), out(static_cast<size_t>(s.q_width()));
    qattn_forward1_args bad = qattn_forward1_args_default();
    bad.x = x.data();
    bad.past_len = s.max_seq;
    bad.sin = sin_table.data();
    bad.cos = cos_table.data();
    bad.max_positions = s.max_seq;
    bad.q = bad.k = bad.v = out.data();
    if (qattn_forward1(layer, &bad, nullptr) != QATTN_ERROR_OUT_OF_RANGE) {
        std::fprintf(stderr, "a position past max_seq_len was not refused\n");
        failed = true;
    } else {
        std::printf("refused as expected: %s\n", qattn_last_error());
    }

    qattn_destroy(layer);
    qattn_qmatrix_destroy(q_proj);
    qattn_qmatrix_destroy(k_proj);
    qattn_qmatrix_destroy(v_proj);
    qattn_qmatrix_destroy(o_proj);
    std::printf("%s: %s layer, %d sequences, prompt %d, %d decode steps\n", failed ? "FAILED" : "OK", format.c_str(),
                s.batch, s.prompt, s.decode_steps);
    return failed ? 1 : 0;
}
