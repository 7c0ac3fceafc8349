// qattn_forward: the whole block with attention supplied through the C callback,
// as a C++ engine would run it. The callback here is a plain reference attention
// on the host (for a CUDA layer it copies through the host, which is slow but
// exact), so these tests check the library's side of the contract: what the
// callback receives, where the cache must be written, and what comes back.
#include "model.h"

#include <algorithm>

namespace {

using qtest::DeviceBuffer;

constexpr int H = 64, NH = 4, NKV = 2, D = 16, MAX_ROWS = 32, MAX_SEQ = 64;

// Copies between a device pointer and host memory, for either kind of device.
void copy(void* dst, const void* src, size_t bytes, int device, bool to_host) {
    if (device == QATTN_DEVICE_CPU) {
        std::memcpy(dst, src, bytes);
        return;
    }
#if defined(QATTN_TESTS_WITH_CUDA)
    cudaMemcpy(dst, src, bytes, to_host ? cudaMemcpyDeviceToHost : cudaMemcpyHostToDevice);
#else
    (void)to_host;
#endif
}

// Token `pos` of sequence b: its row in a cache of either layout.
size_t cache_row(const qattn_kv_cache& c, const std::vector<int32_t>& table, int b, int pos) {
    if (c.layout == QATTN_KV_CONTIGUOUS) return static_cast<size_t>(b) * c.max_seq_len + pos;
    const int block = table[static_cast<size_t>(b) * c.max_blocks_per_seq + pos / c.block_size];
    return static_cast<size_t>(block) * c.block_size + pos % c.block_size;
}

// Appends k/v to the cache and attends, in double precision on the host.
qattn_status reference_attention(const qattn_attention_params* p) {
    auto* calls = static_cast<int*>(p->user_data);
    ++*calls;
    const int device = p->device;
#if defined(QATTN_TESTS_WITH_CUDA)
    if (device != QATTN_DEVICE_CPU) cudaStreamSynchronize(static_cast<cudaStream_t>(p->stream));
#endif
    const qattn_kv_cache& c = *p->cache;
    const int B = p->batch, T = p->q_len, rows = B * T;
    const size_t cache_rows = c.layout == QATTN_KV_CONTIGUOUS ? static_cast<size_t>(B) * c.max_seq_len
                                                               : static_cast<size_t>(c.num_blocks) * c.block_size;
    const size_t kv_row = static_cast<size_t>(p->num_kv_heads) * p->head_dim;
    const size_t q_row = static_cast<size_t>(p->num_heads) * p->head_dim;

    std::vector<uint16_t> q(rows * q_row), k(rows * kv_row), v(rows * kv_row);
    std::vector<uint16_t> kc(cache_rows * kv_row), vc(cache_rows * kv_row);
    std::vector<int32_t> past(B, p->past_len), table;
    copy(q.data(), p->q, q.size() * 2, device, true);
    copy(k.data(), p->k, k.size() * 2, device, true);
    copy(v.data(), p->v, v.size() * 2, device, true);
    copy(kc.data(), c.k, kc.size() * 2, device, true);
    copy(vc.data(), c.v, vc.size() * 2, device, true);
    if (p->past_lens) copy(past.data(), p->past_lens, B * 4, device, true);
    if (c.layout == QATTN_KV_PAGED) {
        table.resize(static_cast<size_t>(B) * c.max_blocks_per_seq);
        copy(table.data(), c.block_table, table.size() * 4, device, true);
    }

    for (int b = 0; b < B; ++b)
        for (int t = 0; t < T; ++t) {
            const size_t dst = cache_row(c, table, b, past[b] + t) * kv_row, src = (b * T + t) * kv_row;
            std::copy_n(k.begin() + src, kv_row, kc.begin() + dst);
            std::copy_n(v.begin() + src, kv_row, vc.begin() + dst);
        }

    std::vector<uint16_t> out(rows * q_row);
    const int group = p->num_heads / p->num_kv_heads;
    for (int b = 0; b < B; ++b)
        for (int t = 0; t < T; ++t)
            for (int h = 0; h < p->num_heads; ++h) {
                const int keys = p->causal ? past[b] + t + 1 : past[b] + T;
                const uint16_t* query = &q[(b * T + t) * q_row + h * p->head_dim];
                std::vector<double> score(keys);
                for (int j = 0; j < keys; ++j) {
                    const uint16_t* key = &kc[cache_row(c, table, b, j) * kv_row + (h / group) * p->head_dim];
                    double dot = 0;
                    for (int d = 0; d < p->head_dim; ++d) dot += qtest::from_half(query[d]) * qtest::from_half(key[d]);
                    score[j] = dot * p->softmax_scale;
                }
                const double top = *std::max_element(score.begin(), score.end());
                double total = 0;
                for (double& s : score) total += (s = std::exp(s - top));
                for (int d = 0; d < p->head_dim; ++d) {
                    double acc = 0;
                    for (int j = 0; j < keys; ++j)
                        acc += score[j] * qtest::from_half(vc[cache_row(c, table, b, j) * kv_row + (h / group) * p->head_dim + d]);
                    out[(b * T + t) * q_row + h * p->head_dim + d] = qtest::to_half(acc / total);
                }
            }
    copy(c.k, kc.data(), kc.size() * 2, device, false);
    copy(c.v, vc.data(), vc.size() * 2, device, false);
    copy(p->out, out.data(), out.size() * 2, device, false);
    return QATTN_SUCCESS;
}

struct Block : qtest::LibraryLayer {
    DeviceBuffer sin, cos, workspace;
};

// A small Llama-style layer (model.h's default scenario: RMSNorm, dense
// projections, NeoX RoPE) on `device`.
Block make_block(int device, qtest::Random& rng) {
    qtest::Scenario s;
    s.hidden = H;
    s.heads = NH;
    s.kv_heads = NKV;
    s.head_dim = D;
    qtest::BlockData data(s, rng);
    data.max_seq_len = MAX_SEQ;
    Block blk;
    EXPECT_EQ(qtest::build_layer(data, device, MAX_ROWS, &blk), QATTN_SUCCESS) << qattn_last_error();
    const qtest::RopeTables tables = qtest::make_rope_tables(MAX_SEQ, D);
    blk.sin = DeviceBuffer(device, tables.sin);
    blk.cos = DeviceBuffer(device, tables.cos);
    blk.workspace = DeviceBuffer(device, qattn_block_workspace_size(blk.layer.get(), MAX_ROWS));
    return blk;
}

// A cache of either layout for `batch` sequences; paged caches get their blocks in
// scrambled order so that a wrong block lookup cannot pass by accident.
struct Cache {
    qattn_kv_cache desc = qattn_kv_cache_default();
    DeviceBuffer k, v, table;
};

Cache make_cache(int device, qattn_kv_layout layout, int batch) {
    Cache cache;
    cache.desc.layout = layout;
    size_t rows = 0;
    if (layout == QATTN_KV_CONTIGUOUS) {
        cache.desc.max_seq_len = MAX_SEQ;
        rows = static_cast<size_t>(batch) * MAX_SEQ;
    } else {
        cache.desc.block_size = 16;
        cache.desc.max_blocks_per_seq = MAX_SEQ / 16;
        cache.desc.num_blocks = batch * cache.desc.max_blocks_per_seq + 3;
        std::vector<int32_t> table(static_cast<size_t>(batch) * cache.desc.max_blocks_per_seq);
        for (size_t i = 0; i < table.size(); ++i) table[i] = static_cast<int32_t>((i * 7 + 2) % cache.desc.num_blocks);
        cache.table = DeviceBuffer(device, table);
        cache.desc.block_table = cache.table.as<int32_t>();
        rows = static_cast<size_t>(cache.desc.num_blocks) * cache.desc.block_size;
    }
    std::vector<uint16_t> poison(rows * NKV * D, 0x7e00);  // NaN: unwritten rows that are read show up
    cache.k = DeviceBuffer(device, poison);
    cache.v = DeviceBuffer(device, poison);
    cache.desc.k = cache.k.get();
    cache.desc.v = cache.v.get();
    return cache;
}

qattn_status run_block(Block& blk, Cache& cache, DeviceBuffer& x, int batch, int q_len, int past, void* stream,
                       int* calls) {
    qattn_block_args a = qattn_block_args_default();
    a.batch = batch;
    a.q_len = q_len;
    a.x = x.get();
    a.past_len = past;
    a.sin = blk.sin.as<float>();
    a.cos = blk.cos.as<float>();
    a.max_positions = MAX_SEQ;
    a.cache = &cache.desc;
    a.attention = reference_attention;
    a.user_data = calls;
    a.workspace = blk.workspace.get();
    a.workspace_size = qattn_block_workspace_size(blk.layer.get(), MAX_ROWS);
    return qattn_forward(blk.layer.get(), &a, stream);
}

class WholeBlock : public ::testing::TestWithParam<int> {};

// N decode steps through the cache give the same outputs as one prefill of the N
// tokens, for both cache layouts: the callback saw the right positions, the cache
// was appended where the next step reads it, and forward2 added the result.
TEST_P(WholeBlock, DecodeStepsMatchPrefillForBothLayouts) {
    const int device = GetParam();
    QTEST_SKIP_IF_ABSENT(device);
    qtest::Random rng(11);
    Block blk = make_block(device, rng);
    qtest::Stream stream(device);
    const int batch = 2, steps = 5;
    const std::vector<uint16_t> x0 = rng.halves(static_cast<size_t>(batch) * steps * H, -1, 1);

    int calls = 0;
    Cache prefill_cache = make_cache(device, QATTN_KV_CONTIGUOUS, batch);
    DeviceBuffer prefill_x(device, x0);
    QTEST_ASSERT_OK(run_block(blk, prefill_cache, prefill_x, batch, steps, 0, stream.get(), &calls));
    const std::vector<double> expected = qtest::widen(prefill_x.download<uint16_t>());
    EXPECT_EQ(calls, 1);

    for (qattn_kv_layout layout : {QATTN_KV_CONTIGUOUS, QATTN_KV_PAGED}) {
        Cache cache = make_cache(device, layout, batch);
        std::vector<double> decoded(expected.size());
        for (int t = 0; t < steps; ++t) {
            std::vector<uint16_t> step_x(static_cast<size_t>(batch) * H);
            for (int b = 0; b < batch; ++b)
                std::copy_n(x0.begin() + (static_cast<size_t>(b) * steps + t) * H, H, step_x.begin() + b * H);
            DeviceBuffer x(device, step_x);
            QTEST_ASSERT_OK(run_block(blk, cache, x, batch, 1, t, stream.get(), &calls));
            const std::vector<uint16_t> y = x.download<uint16_t>();
            for (int b = 0; b < batch; ++b)
                for (int i = 0; i < H; ++i) decoded[(static_cast<size_t>(b) * steps + t) * H + i] = qtest::from_half(y[b * H + i]);
        }
        // fp16 outputs of the same computation split differently: a few ulps.
        EXPECT_LT(qtest::relative_error(decoded, expected), 2e-3) << "layout " << layout;
    }
    EXPECT_EQ(calls, 1 + 2 * steps);
    // The block really changed x: the residual update is far larger than the tolerance.
    EXPECT_GT(qtest::relative_error(qtest::widen(x0), expected), 0.05);
}

TEST_P(WholeBlock, RejectsCachesTheTokensDoNotFit) {
    const int device = GetParam();
    QTEST_SKIP_IF_ABSENT(device);
    qtest::Random rng(12);
    Block blk = make_block(device, rng);
    qtest::Stream stream(device);
    DeviceBuffer x(device, rng.halves(static_cast<size_t>(2) * H, -1, 1));
    const std::vector<uint16_t> before = x.download<uint16_t>();
    int calls = 0;

    Cache contiguous = make_cache(device, QATTN_KV_CONTIGUOUS, 1);
    QTEST_EXPECT_ERROR(run_block(blk, contiguous, x, 1, 2, MAX_SEQ - 1, stream.get(), &calls), QATTN_ERROR_OUT_OF_RANGE,
                       "do not fit the cache");
    Cache paged = make_cache(device, QATTN_KV_PAGED, 1);
    paged.desc.block_size = 24;
    QTEST_EXPECT_ERROR(run_block(blk, paged, x, 1, 1, 0, stream.get(), &calls), QATTN_ERROR_INVALID_ARGUMENT,
                       "multiple of 16");
    EXPECT_EQ(calls, 0);
    EXPECT_EQ(x.download<uint16_t>(), before);
}

TEST(WholeBlockCpu, RejectsBlockIdsPastTheCache) {
    qtest::Random rng(13);
    Block blk = make_block(QATTN_DEVICE_CPU, rng);
    Cache paged = make_cache(QATTN_DEVICE_CPU, QATTN_KV_PAGED, 1);
    paged.table.as<int32_t>()[1] = paged.desc.num_blocks;  // the block of positions 16..31
    DeviceBuffer x(QATTN_DEVICE_CPU, rng.halves(H, -1, 1));
    int calls = 0;
    QTEST_ASSERT_OK(run_block(blk, paged, x, 1, 1, 15, nullptr, &calls));  // still inside block 0
    QTEST_EXPECT_ERROR(run_block(blk, paged, x, 1, 1, 16, nullptr, &calls), QATTN_ERROR_OUT_OF_RANGE,
                       "block_table[0][1]");
    EXPECT_EQ(calls, 1);
}

TEST(WholeBlockCpu, ReportsCallbackFailureAndMissingWorkspace) {
    qtest::Random rng(14);
    Block blk = make_block(QATTN_DEVICE_CPU, rng);
    Cache cache = make_cache(QATTN_DEVICE_CPU, QATTN_KV_CONTIGUOUS, 1);
    DeviceBuffer x(QATTN_DEVICE_CPU, rng.halves(H, -1, 1));
    qattn_block_args a = qattn_block_args_default();
    a.x = x.get();
    a.sin = blk.sin.as<float>();
    a.cos = blk.cos.as<float>();
    a.max_positions = MAX_SEQ;
    a.cache = &cache.desc;
    a.attention = [](const qattn_attention_params*) { return QATTN_ERROR_NOT_SUPPORTED; };
    QTEST_EXPECT_ERROR(qattn_forward(blk.layer.get(), &a, nullptr), QATTN_ERROR_INVALID_ARGUMENT, "workspace");
    a.workspace = blk.workspace.get();
    a.workspace_size = qattn_block_workspace_size(blk.layer.get(), 1) - 1;
    QTEST_EXPECT_ERROR(qattn_forward(blk.layer.get(), &a, nullptr), QATTN_ERROR_INVALID_ARGUMENT, "workspace is");
    a.workspace_size = qattn_block_workspace_size(blk.layer.get(), 1);
    QTEST_EXPECT_ERROR(qattn_forward(blk.layer.get(), &a, nullptr), QATTN_ERROR_NOT_SUPPORTED, "attention callback");
    a.attention = nullptr;
    QTEST_EXPECT_ERROR(qattn_forward(blk.layer.get(), &a, nullptr), QATTN_ERROR_INVALID_ARGUMENT, "callback is NULL");
}

// past_lens is checked as a tensor (alignment; device memory on a CUDA build)
// before the cache check reads it on the host.
TEST(WholeBlockCpu, ChecksPastLensBeforeReadingThem) {
    qtest::Random rng(15);
    Block blk = make_block(QATTN_DEVICE_CPU, rng);
    Cache cache = make_cache(QATTN_DEVICE_CPU, QATTN_KV_CONTIGUOUS, 1);
    DeviceBuffer x(QATTN_DEVICE_CPU, rng.halves(H, -1, 1));
    // Read one byte off, these bytes make a length far past the cache.
    alignas(4) unsigned char bytes[8] = {0, 0x7f, 0x7f, 0x7f, 0x7f, 0, 0, 0};
    int calls = 0;
    qattn_block_args a = qattn_block_args_default();
    a.x = x.get();
    a.past_lens = reinterpret_cast<const int32_t*>(bytes + 1);
    a.sin = blk.sin.as<float>();
    a.cos = blk.cos.as<float>();
    a.max_positions = MAX_SEQ;
    a.cache = &cache.desc;
    a.attention = reference_attention;
    a.user_data = &calls;
    a.workspace = blk.workspace.get();
    a.workspace_size = qattn_block_workspace_size(blk.layer.get(), 1);
    QTEST_EXPECT_ERROR(qattn_forward(blk.layer.get(), &a, nullptr), QATTN_ERROR_INVALID_ARGUMENT,
                       "past_lens");
    EXPECT_EQ(calls, 0);
}

INSTANTIATE_TEST_SUITE_P(Devices, WholeBlock, ::testing::Values(QATTN_DEVICE_CPU, 0),
                         [](const ::testing::TestParamInfo<int>& info) { return qtest::device_name(info.param); });

}  // namespace
