// qattn_create, qattn_forward1/2, qattn_set_loras: every argument is checked here
// so that backends only ever see consistent shapes and resolved ids.
#include "core/device.h"
#include "core/guard.h"
#include "core/handles.h"
#include "core/validate.h"

#include <algorithm>
#include <set>

namespace qattn {
namespace {

const char* const kProjName[4] = {"q_proj", "k_proj", "v_proj", "o_proj"};

qattn_status read_norm(const char* name, const qattn_norm_desc& d, int width, int heads, bool head_norm,
                       NormInfo* info, NormWeights* weights) {
    info->type = d.type;
    if (d.type == QATTN_NORM_NONE) return QATTN_SUCCESS;
    QATTN_REQUIRE_ARG(d.type == QATTN_NORM_RMS || d.type == QATTN_NORM_LAYER, "%s.type %d is not a qattn_norm_type",
                      name, (int)d.type);
    QATTN_REQUIRE_ARG(d.weight != nullptr, "%s.weight is NULL", name);
    QATTN_REQUIRE_ARG(d.eps > 0.0f, "%s.eps must be > 0, got %g", name, (double)d.eps);
    QATTN_REQUIRE_ARG(d.bias == nullptr || d.type == QATTN_NORM_LAYER, "%s.bias is only allowed for LayerNorm", name);
    QATTN_REQUIRE_ARG(!d.per_head || head_norm, "%s.per_head is only meaningful for q_norm and k_norm", name);
    info->eps = d.eps;
    info->has_bias = d.bias != nullptr;
    info->per_head = d.per_head != 0;
    info->width = width;
    info->weight_len = info->per_head ? width * heads : width;
    HostView w, b;
    QATTN_TRY(w.load(d.weight, sizeof(uint16_t) * info->weight_len));
    weights->weight.assign(w.as<uint16_t>(), w.as<uint16_t>() + info->weight_len);
    if (d.bias) {
        QATTN_TRY(b.load(d.bias, sizeof(uint16_t) * info->weight_len));
        weights->bias.assign(b.as<uint16_t>(), b.as<uint16_t>() + info->weight_len);
    }
    return QATTN_SUCCESS;
}

qattn_status check_projection(const char* name, const qattn_qmatrix* m, int device, int64_t in, int64_t out) {
    QATTN_REQUIRE_ARG(m != nullptr, "config.%s is NULL", name);
    QATTN_REQUIRE_ARG(m->info.device == device, "config.%s lives on device %d, the layer on device %d", name,
                      m->info.device, device);
    QATTN_REQUIRE_ARG(m->info.in_features == in && m->info.out_features == out,
                      "config.%s maps %lld -> %lld features; the layer needs %lld -> %lld", name,
                      (long long)m->info.in_features, (long long)m->info.out_features, (long long)in,
                      (long long)out);
    return QATTN_SUCCESS;
}

qattn_status create(const qattn_layer_config* config, qattn_layer** out) {
    QATTN_REQUIRE_ARG(out != nullptr, "qattn_create: out is NULL");
    *out = nullptr;
    qattn_layer_config c;
    QATTN_TRY(read_versioned("qattn_layer_config", config, qattn_layer_config_default(), &c));
    QATTN_TRY(check_device(c.device));
    QATTN_REQUIRE_ARG(c.hidden_size > 0 && c.num_heads > 0 && c.num_kv_heads > 0 && c.head_dim > 0,
                      "hidden_size, num_heads, num_kv_heads and head_dim must be > 0 (got %d, %d, %d, %d)",
                      c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim);
    QATTN_REQUIRE_ARG(c.num_heads % c.num_kv_heads == 0, "num_heads (%d) must be a multiple of num_kv_heads (%d)",
                      c.num_heads, c.num_kv_heads);
    QATTN_REQUIRE_ARG(c.head_dim % 2 == 0 && c.head_dim <= 512, "head_dim must be even and <= 512, got %d",
                      c.head_dim);
    // Checked before any norm weight is sized from them.
    QATTN_REQUIRE_ARG(c.hidden_size <= kMaxFeatures, "hidden_size %d exceeds 2^20, the largest QMatrix dimension",
                      c.hidden_size);
    QATTN_REQUIRE_ARG(static_cast<int64_t>(c.num_heads) * c.head_dim <= kMaxFeatures,
                      "num_heads * head_dim = %lld exceeds 2^20, the largest QMatrix dimension",
                      static_cast<long long>(c.num_heads) * c.head_dim);
    QATTN_REQUIRE_ARG(c.max_rows > 0, "max_rows must be > 0, got %d", c.max_rows);
    QATTN_REQUIRE_ARG(c.max_seq_len > 0, "max_seq_len must be > 0, got %d", c.max_seq_len);

    LayerInfo info;
    info.device = c.device;
    info.hidden_size = c.hidden_size;
    info.num_heads = c.num_heads;
    info.num_kv_heads = c.num_kv_heads;
    info.head_dim = c.head_dim;
    info.max_rows = c.max_rows;
    info.max_seq_len = c.max_seq_len;
    info.has_residual = c.has_residual != 0;
    info.residual_fp32 = c.residual_fp32 != 0;
    info.use_graphs = c.use_graphs != 0;

    QATTN_REQUIRE_ARG(c.rope == QATTN_ROPE_NONE || c.rope == QATTN_ROPE_NEOX || c.rope == QATTN_ROPE_GPTJ,
                      "rope %d is not a qattn_rope_type", (int)c.rope);
    info.rope = c.rope;
    if (c.rope != QATTN_ROPE_NONE) {
        info.rotary_dim = c.rotary_dim == 0 ? c.head_dim : c.rotary_dim;
        QATTN_REQUIRE_ARG(info.rotary_dim > 0 && info.rotary_dim % 2 == 0 && info.rotary_dim <= c.head_dim,
                          "rotary_dim must be even and in (0, head_dim=%d], got %d", c.head_dim, c.rotary_dim);
    }

    LayerHostWeights weights;
    QATTN_TRY(read_norm("input_norm", c.input_norm, c.hidden_size, 1, false, &info.input_norm, &weights.input_norm));
    QATTN_TRY(read_norm("q_norm", c.q_norm, c.head_dim, c.num_heads, true, &info.q_norm, &weights.q_norm));
    QATTN_TRY(read_norm("k_norm", c.k_norm, c.head_dim, c.num_kv_heads, true, &info.k_norm, &weights.k_norm));
    QATTN_TRY(read_norm("post_norm", c.post_norm, c.hidden_size, 1, false, &info.post_norm, &weights.post_norm));

    QATTN_TRY(check_projection("q_proj", c.q_proj, c.device, c.hidden_size, info.q_width()));
    QATTN_TRY(check_projection("k_proj", c.k_proj, c.device, c.hidden_size, info.kv_width()));
    QATTN_TRY(check_projection("v_proj", c.v_proj, c.device, c.hidden_size, info.kv_width()));
    QATTN_TRY(check_projection("o_proj", c.o_proj, c.device, info.q_width(), c.hidden_size));
    LayerProjections projections{c.q_proj->impl.get(), c.k_proj->impl.get(), c.v_proj->impl.get(),
                                 c.o_proj->impl.get()};
    QATTN_REQUIRE_ARG(c.scratch == nullptr || c.scratch->device == c.device,
                      "config.scratch belongs to device %d, the layer to device %d", c.scratch ? c.scratch->device : 0,
                      c.device);

    auto layer = std::make_unique<qattn_layer>();
    layer->info = info;
    if (c.device == QATTN_DEVICE_CPU) {
        QATTN_TRY(cpu::create_layer(info, weights, projections, &layer->impl));
    } else {
#if defined(QATTN_WITH_CUDA)
        QATTN_TRY(cuda::create_layer(info, weights, projections, c.scratch ? c.scratch->impl : nullptr,
                                     &layer->impl));
#endif
    }
    *out = layer.release();
    return QATTN_SUCCESS;
}

// Resolves adapter ids into per-projection backend indices (into layer->active).
qattn_status resolve_loras(qattn_layer* layer, const int32_t* ids, int count) {
    for (auto& list : layer->active) list.clear();
    QATTN_REQUIRE_ARG(count >= 0, "num_lora_ids must be >= 0, got %d", count);
    QATTN_REQUIRE_ARG(count == 0 || ids != nullptr, "lora_ids is NULL but num_lora_ids is %d", count);
    for (int i = 0; i < count; ++i) {
        bool found = false;
        for (int proj = 0; proj < 4; ++proj) {
            auto it = layer->lora_index.find({ids[i], proj});
            if (it == layer->lora_index.end()) continue;
            auto& list = layer->active[proj];
            QATTN_REQUIRE_ARG(std::find(list.begin(), list.end(), it->second) == list.end(),
                              "LoRA adapter id %d is listed twice", ids[i]);
            list.push_back(it->second);
            found = true;
        }
        QATTN_REQUIRE(found, QATTN_ERROR_OUT_OF_RANGE,
                      "unknown LoRA adapter id %d (not registered with qattn_set_loras)", ids[i]);
    }
    return QATTN_SUCCESS;
}

size_t residual_bytes(const LayerInfo& info) { return info.residual_fp32 ? sizeof(float) : sizeof(uint16_t); }

// k and v go to their buffers, to KV-cache slots, or both; slots in host memory
// (CPU layers) are checked here, device ones by the kernels.
qattn_status check_kv_destination(const LayerInfo& info, const qattn_forward1_args& a) {
    if (a.kv_slots == nullptr) {
        QATTN_REQUIRE_ARG(a.k_cache == nullptr && a.v_cache == nullptr,
                          "k_cache and v_cache are set but kv_slots is NULL: the slots say where each row goes");
        QATTN_TRY(check_tensor(a.k, "k", info.device, sizeof(uint16_t)));
        return check_tensor(a.v, "v", info.device, sizeof(uint16_t));
    }
    QATTN_REQUIRE_ARG((a.k == nullptr) == (a.v == nullptr), "k and v must both be set or both be NULL");
    if (a.k != nullptr) {
        QATTN_TRY(check_tensor(a.k, "k", info.device, sizeof(uint16_t)));
        QATTN_TRY(check_tensor(a.v, "v", info.device, sizeof(uint16_t)));
    }
    QATTN_TRY(check_tensor(a.kv_slots, "kv_slots", info.device, sizeof(int32_t)));
    QATTN_TRY(check_tensor(a.k_cache, "k_cache", info.device, sizeof(uint16_t)));
    QATTN_TRY(check_tensor(a.v_cache, "v_cache", info.device, sizeof(uint16_t)));
    QATTN_REQUIRE_ARG(a.num_kv_slots > 0, "num_kv_slots must be > 0 when kv_slots is set, got %lld",
                      (long long)a.num_kv_slots);
    if (info.device == QATTN_DEVICE_CPU) {
        const int64_t rows = static_cast<int64_t>(a.batch) * a.q_len;
        for (int64_t r = 0; r < rows; ++r)
            QATTN_REQUIRE(a.kv_slots[r] >= 0 && a.kv_slots[r] < a.num_kv_slots, QATTN_ERROR_OUT_OF_RANGE,
                          "kv_slots[%lld] = %d is outside the cache's %lld slots", (long long)r, a.kv_slots[r],
                          (long long)a.num_kv_slots);
    }
    return QATTN_SUCCESS;
}

}  // namespace

qattn_status check_rows(const qattn_layer& layer, int batch, int q_len) {
    QATTN_REQUIRE_ARG(batch > 0 && q_len > 0, "batch and q_len must be > 0, got %d and %d", batch, q_len);
    QATTN_REQUIRE(static_cast<int64_t>(batch) * q_len <= layer.info.max_rows, QATTN_ERROR_OUT_OF_RANGE,
                  "batch * q_len = %lld rows exceeds the layer's max_rows = %d", (long long)batch * q_len,
                  layer.info.max_rows);
    return QATTN_SUCCESS;
}

qattn_status forward1(qattn_layer* layer, const qattn_forward1_args* in, void* stream) {
    QATTN_REQUIRE_ARG(layer != nullptr, "qattn_forward1: layer is NULL");
    qattn_forward1_args a;
    QATTN_TRY(read_versioned("qattn_forward1_args", in, qattn_forward1_args_default(), &a));
    const LayerInfo& info = layer->info;
    QATTN_TRY(check_rows(*layer, a.batch, a.q_len));
    QATTN_TRY(check_tensor(a.x, "x", info.device, residual_bytes(info)));
    QATTN_TRY(check_tensor(a.q, "q", info.device, sizeof(uint16_t)));
    QATTN_TRY(check_kv_destination(info, a));

    if (info.rope != QATTN_ROPE_NONE) {
        QATTN_TRY(check_tensor(a.sin, "sin", info.device, sizeof(float)));
        QATTN_TRY(check_tensor(a.cos, "cos", info.device, sizeof(float)));
        QATTN_REQUIRE_ARG(a.max_positions > 0, "max_positions must be > 0 when RoPE is on, got %d",
                          a.max_positions);
    }
    // Positions must index the tables and stay below max_seq_len.
    const int64_t position_limit =
        info.rope == QATTN_ROPE_NONE ? info.max_seq_len : std::min(info.max_seq_len, a.max_positions);
    if (a.past_lens == nullptr) {
        QATTN_REQUIRE(a.past_len >= 0 && a.past_len + (int64_t)a.q_len <= position_limit, QATTN_ERROR_OUT_OF_RANGE,
                      "positions %d .. %lld are outside [0, %lld) (max_seq_len %d, max_positions %d)", a.past_len,
                      (long long)a.past_len + a.q_len - 1, (long long)position_limit, info.max_seq_len,
                      a.max_positions);
    } else {
        QATTN_TRY(check_tensor(a.past_lens, "past_lens", info.device, sizeof(int32_t)));
        if (info.device == QATTN_DEVICE_CPU) {
            for (int b = 0; b < a.batch; ++b) {
                const int64_t p = a.past_lens[b];
                QATTN_REQUIRE(p >= 0 && p + a.q_len <= position_limit, QATTN_ERROR_OUT_OF_RANGE,
                              "past_lens[%d] = %lld puts positions outside [0, %lld) (max_seq_len %d, "
                              "max_positions %d)",
                              b, (long long)p, (long long)position_limit, info.max_seq_len, a.max_positions);
            }
        }
    }
    QATTN_TRY(resolve_loras(layer, a.lora_ids, a.num_lora_ids));

    Forward1Call call;
    call.batch = a.batch;
    call.q_len = a.q_len;
    call.rows = a.batch * a.q_len;
    call.x = a.x;
    call.past_len = a.past_len;
    call.past_lens = a.past_lens;
    call.sin = a.sin;
    call.cos = a.cos;
    call.max_positions = static_cast<int>(position_limit);
    call.q = a.q;
    call.k = a.k;
    call.v = a.v;
    call.loras = &layer->active;
    call.k_cache = a.k_cache;
    call.v_cache = a.v_cache;
    call.kv_slots = a.kv_slots;
    call.num_kv_slots = a.num_kv_slots;
    return layer->impl->forward1(call, stream);
}

qattn_status forward2(qattn_layer* layer, const qattn_forward2_args* in, void* stream) {
    QATTN_REQUIRE_ARG(layer != nullptr, "qattn_forward2: layer is NULL");
    qattn_forward2_args a;
    QATTN_TRY(read_versioned("qattn_forward2_args", in, qattn_forward2_args_default(), &a));
    const LayerInfo& info = layer->info;
    QATTN_TRY(check_rows(*layer, a.batch, a.q_len));
    QATTN_TRY(check_tensor(a.x, "x", info.device, residual_bytes(info)));
    QATTN_TRY(check_tensor(a.attn_out, "attn_out", info.device, sizeof(uint16_t)));
    QATTN_TRY(resolve_loras(layer, a.lora_ids, a.num_lora_ids));

    Forward2Call call;
    call.batch = a.batch;
    call.q_len = a.q_len;
    call.rows = a.batch * a.q_len;
    call.x = a.x;
    call.attn_out = a.attn_out;
    call.loras = &layer->active;
    return layer->impl->forward2(call, stream);
}

namespace {

qattn_status set_loras(qattn_layer* layer, const qattn_lora_desc* loras, int count, int* max_rank) {
    QATTN_REQUIRE_ARG(layer != nullptr, "qattn_set_loras: layer is NULL");
    QATTN_REQUIRE_ARG(count >= 0, "qattn_set_loras: count must be >= 0, got %d", count);
    QATTN_REQUIRE_ARG(count == 0 || loras != nullptr, "qattn_set_loras: loras is NULL but count is %d", count);
    const LayerInfo& info = layer->info;
    const int in_width[4] = {info.hidden_size, info.hidden_size, info.hidden_size, info.q_width()};
    const int out_width[4] = {info.q_width(), info.kv_width(), info.kv_width(), info.hidden_size};

    const size_t stride = count > 0 ? loras[0].struct_size : 0;
    std::vector<LoraSpec> specs(count);
    std::map<std::pair<int, int>, int> index;
    int largest = 0;
    for (int i = 0; i < count; ++i) {
        const auto* raw = reinterpret_cast<const qattn_lora_desc*>(reinterpret_cast<const char*>(loras) + i * stride);
        qattn_lora_desc d;
        QATTN_TRY(read_versioned("qattn_lora_desc", raw, qattn_lora_desc_default(), &d));
        QATTN_REQUIRE_ARG(d.proj >= QATTN_PROJ_Q && d.proj <= QATTN_PROJ_O, "loras[%d].proj %d is not a qattn_proj",
                          i, (int)d.proj);
        QATTN_REQUIRE_ARG(d.rank > 0 && d.rank <= 4096, "loras[%d].rank must be in [1, 4096], got %d", i, d.rank);
        QATTN_REQUIRE_ARG(d.a != nullptr && d.b != nullptr, "loras[%d] (id %d, %s): a or b is NULL", i, d.id,
                          kProjName[d.proj]);
        QATTN_REQUIRE_ARG(index.emplace(std::make_pair(d.id, (int)d.proj), i).second,
                          "loras[%d]: adapter id %d has two entries for %s", i, d.id, kProjName[d.proj]);
        LoraSpec& s = specs[i];
        s.id = d.id;
        s.proj = d.proj;
        s.rank = d.rank;
        s.in_features = in_width[d.proj];
        s.out_features = out_width[d.proj];
        HostView a, b;
        QATTN_TRY(a.load(d.a, sizeof(uint16_t) * s.in_features * s.rank));
        QATTN_TRY(b.load(d.b, sizeof(uint16_t) * s.rank * s.out_features));
        s.a.assign(a.as<uint16_t>(), a.as<uint16_t>() + (size_t)s.in_features * s.rank);
        s.b.assign(b.as<uint16_t>(), b.as<uint16_t>() + (size_t)s.rank * s.out_features);
        largest = std::max(largest, d.rank);
    }
    QATTN_TRY(layer->impl->set_loras(specs));
    layer->lora_index = std::move(index);
    if (max_rank) *max_rank = largest;
    return QATTN_SUCCESS;
}

}  // namespace
}  // namespace qattn

extern "C" {

qattn_layer_config qattn_layer_config_default(void) {
    qattn_layer_config c{};
    c.struct_size = sizeof c;
    c.device = QATTN_DEVICE_CPU;
    c.max_rows = 1;
    c.max_seq_len = 4096;
    c.input_norm.eps = c.q_norm.eps = c.k_norm.eps = c.post_norm.eps = 1e-6f;
    c.has_residual = 1;
    return c;
}

qattn_forward1_args qattn_forward1_args_default(void) {
    qattn_forward1_args a{};
    a.struct_size = sizeof a;
    a.batch = 1;
    a.q_len = 1;
    return a;
}

qattn_forward2_args qattn_forward2_args_default(void) {
    qattn_forward2_args a{};
    a.struct_size = sizeof a;
    a.batch = 1;
    a.q_len = 1;
    return a;
}

qattn_lora_desc qattn_lora_desc_default(void) {
    qattn_lora_desc d{};
    d.struct_size = sizeof d;
    return d;
}

qattn_status qattn_create(const qattn_layer_config* config, qattn_layer** out) {
    return qattn::guarded("qattn_create", [&] { return qattn::create(config, out); });
}

qattn_status qattn_destroy(qattn_layer* layer) {
    return qattn::guarded("qattn_destroy", [&] {
        qattn::device_pointer_cache().clear();
        delete layer;
        return QATTN_SUCCESS;
    });
}

qattn_status qattn_forward1(qattn_layer* layer, const qattn_forward1_args* args, void* stream) {
    return qattn::guarded("qattn_forward1", [&] { return qattn::forward1(layer, args, stream); });
}

qattn_status qattn_forward2(qattn_layer* layer, const qattn_forward2_args* args, void* stream) {
    return qattn::guarded("qattn_forward2", [&] { return qattn::forward2(layer, args, stream); });
}

qattn_status qattn_set_loras(qattn_layer* layer, const qattn_lora_desc* loras, int count, int* max_rank) {
    return qattn::guarded("qattn_set_loras", [&] { return qattn::set_loras(layer, loras, count, max_rank); });
}

qattn_status qattn_check_device_errors(qattn_layer* layer, void* stream) {
    return qattn::guarded("qattn_check_device_errors", [&] {
        QATTN_REQUIRE_ARG(layer != nullptr, "qattn_check_device_errors: layer is NULL");
        return layer->impl->check_device_errors(stream);
    });
}

}  // extern "C"
