// qattn_forward: the whole attention block with the attention itself supplied by
// the caller as a callback, so C++ engines (and tensor parallelism) can plug in
// flash-attn, their own kernels, or a reference implementation.
#include "core/guard.h"
#include "core/handles.h"
#include "core/validate.h"

#include <cmath>

namespace qattn {
namespace {

// Sub-buffers start at multiples of 256 bytes from the workspace, which itself
// needs only the 16 bytes of the kernels' vector loads.
constexpr size_t kSubBufferAlignment = 256;
constexpr size_t kWorkspaceAlignment = 16;

size_t round_up(size_t bytes) { return (bytes + kSubBufferAlignment - 1) / kSubBufferAlignment * kSubBufferAlignment; }

struct WorkspaceLayout {
    size_t q = 0, k = 0, v = 0, out = 0, total = 0;
};

WorkspaceLayout layout_for(const LayerInfo& info, int rows) {
    const size_t q_bytes = round_up(sizeof(uint16_t) * rows * info.q_width());
    const size_t kv_bytes = round_up(sizeof(uint16_t) * rows * info.kv_width());
    WorkspaceLayout w;
    w.q = 0;
    w.k = w.q + q_bytes;
    w.v = w.k + kv_bytes;
    w.out = w.v + kv_bytes;
    w.total = w.out + q_bytes;
    return w;
}

qattn_status check_cache(const LayerInfo& info, const qattn_kv_cache& c, const qattn_block_args& a) {
    QATTN_TRY(check_tensor(c.k, "cache.k", info.device, sizeof(uint16_t)));
    QATTN_TRY(check_tensor(c.v, "cache.v", info.device, sizeof(uint16_t)));
    int64_t capacity = 0;
    if (c.layout == QATTN_KV_CONTIGUOUS) {
        QATTN_REQUIRE_ARG(c.max_seq_len > 0, "cache.max_seq_len must be > 0, got %d", c.max_seq_len);
        capacity = c.max_seq_len;
    } else if (c.layout == QATTN_KV_PAGED) {
        QATTN_REQUIRE_ARG(c.num_blocks > 0 && c.max_blocks_per_seq > 0,
                          "paged cache: num_blocks and max_blocks_per_seq must be > 0, got %d and %d", c.num_blocks,
                          c.max_blocks_per_seq);
        QATTN_REQUIRE_ARG(c.block_size > 0 && c.block_size % 16 == 0,
                          "paged cache: block_size must be a positive multiple of 16, got %d", c.block_size);
        QATTN_TRY(check_tensor(c.block_table, "cache.block_table", info.device, sizeof(int32_t)));
        capacity = static_cast<int64_t>(c.max_blocks_per_seq) * c.block_size;
    } else {
        return fail(QATTN_ERROR_INVALID_ARGUMENT, "cache.layout %d is not a qattn_kv_layout", (int)c.layout);
    }

    // Past lengths on the device are checked by the kernels (qattn_check_device_errors);
    // everything the host can see is checked here, once the pointer is known to be
    // readable (forward1 would check it too, but only after the loop below).
    if (a.past_lens != nullptr) QATTN_TRY(check_tensor(a.past_lens, "past_lens", info.device, sizeof(int32_t)));
    const bool host_visible = info.device == QATTN_DEVICE_CPU;
    for (int b = 0; b < a.batch; ++b) {
        if (a.past_lens != nullptr && !host_visible) break;
        const int64_t past = a.past_lens ? a.past_lens[b] : a.past_len;
        QATTN_REQUIRE(past >= 0 && past + a.q_len <= capacity, QATTN_ERROR_OUT_OF_RANGE,
                      "sequence %d: positions %lld .. %lld do not fit the cache (%lld positions per sequence)", b,
                      (long long)past, (long long)past + a.q_len - 1, (long long)capacity);
        if (c.layout != QATTN_KV_PAGED || !host_visible) continue;
        const int32_t* row = c.block_table + static_cast<size_t>(b) * c.max_blocks_per_seq;
        const int64_t last_block = (past + a.q_len - 1) / c.block_size;
        for (int64_t i = 0; i <= last_block; ++i)
            QATTN_REQUIRE(row[i] >= 0 && row[i] < c.num_blocks, QATTN_ERROR_OUT_OF_RANGE,
                          "block_table[%d][%lld] = %d is outside the cache's %d blocks", b, (long long)i, row[i],
                          c.num_blocks);
    }
    return QATTN_SUCCESS;
}

qattn_status forward_block(qattn_layer* layer, const qattn_block_args* in, void* stream) {
    QATTN_REQUIRE_ARG(layer != nullptr, "qattn_forward: layer is NULL");
    qattn_block_args a;
    QATTN_TRY(read_versioned("qattn_block_args", in, qattn_block_args_default(), &a));
    const LayerInfo& info = layer->info;
    QATTN_REQUIRE_ARG(a.attention != nullptr, "qattn_forward: attention callback is NULL");
    QATTN_TRY(check_rows(*layer, a.batch, a.q_len));
    qattn_kv_cache cache;
    QATTN_TRY(read_versioned("qattn_kv_cache", a.cache, qattn_kv_cache_default(), &cache));
    QATTN_TRY(check_cache(info, cache, a));

    const int rows = a.batch * a.q_len;
    const WorkspaceLayout w = layout_for(info, rows);
    QATTN_TRY(check_tensor(a.workspace, "workspace", info.device, kWorkspaceAlignment));
    QATTN_REQUIRE_ARG(a.workspace_size >= w.total, "workspace is %zu bytes; %d rows need %zu (qattn_block_workspace_size)",
                      a.workspace_size, rows, w.total);
    char* base = static_cast<char*>(a.workspace);

    qattn_forward1_args f1 = qattn_forward1_args_default();
    f1.batch = a.batch;
    f1.q_len = a.q_len;
    f1.x = a.x;
    f1.past_len = a.past_len;
    f1.past_lens = a.past_lens;
    f1.sin = a.sin;
    f1.cos = a.cos;
    f1.max_positions = a.max_positions;
    f1.q = base + w.q;
    f1.k = base + w.k;
    f1.v = base + w.v;
    f1.lora_ids = a.lora_ids;
    f1.num_lora_ids = a.num_lora_ids;
    QATTN_TRY(forward1(layer, &f1, stream));

    qattn_attention_params p{};
    p.struct_size = sizeof p;
    p.device = info.device;
    p.stream = stream;
    p.batch = a.batch;
    p.q_len = a.q_len;
    p.num_heads = info.num_heads;
    p.num_kv_heads = info.num_kv_heads;
    p.head_dim = info.head_dim;
    p.q = f1.q;
    p.k = f1.k;
    p.v = f1.v;
    p.cache = &cache;
    p.past_len = a.past_len;
    p.past_lens = a.past_lens;
    p.out = base + w.out;
    p.softmax_scale = a.softmax_scale != 0.0f ? a.softmax_scale : 1.0f / std::sqrt(static_cast<float>(info.head_dim));
    p.causal = a.causal;
    p.user_data = a.user_data;
    const qattn_status attention_status = a.attention(&p);
    QATTN_REQUIRE(attention_status == QATTN_SUCCESS, attention_status, "qattn_forward: attention callback returned %s",
                  qattn_status_string(attention_status));

    qattn_forward2_args f2 = qattn_forward2_args_default();
    f2.batch = a.batch;
    f2.q_len = a.q_len;
    f2.x = a.x;
    f2.attn_out = p.out;
    f2.lora_ids = a.lora_ids;
    f2.num_lora_ids = a.num_lora_ids;
    return forward2(layer, &f2, stream);
}

}  // namespace
}  // namespace qattn

extern "C" {

qattn_kv_cache qattn_kv_cache_default(void) {
    qattn_kv_cache c{};
    c.struct_size = sizeof c;
    c.layout = QATTN_KV_CONTIGUOUS;
    return c;
}

qattn_block_args qattn_block_args_default(void) {
    qattn_block_args a{};
    a.struct_size = sizeof a;
    a.batch = 1;
    a.q_len = 1;
    a.causal = 1;
    return a;
}

size_t qattn_block_workspace_size(const qattn_layer* layer, int rows) {
    if (layer == nullptr || rows <= 0) return 0;
    return qattn::layout_for(layer->info, rows).total;
}

qattn_status qattn_forward(qattn_layer* layer, const qattn_block_args* args, void* stream) {
    return qattn::guarded("qattn_forward", [&] { return qattn::forward_block(layer, args, stream); });
}

}  // extern "C"
