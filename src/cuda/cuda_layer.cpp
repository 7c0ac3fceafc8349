// The attention block on a CUDA device. forward1:
//   [input norm -> fp16, written in input order and/or gathered into the packed
//   row order of the GPTQ matrices, one kernel]  ->  Q|K|V into one fp32
//   accumulator (packed GPTQ 4-bit and <= 32 rows: one tensor-core launch for all
//   three; beyond, on Hopper, one launch of the fused dequantize + wgmma GEMM
//   for those it fits; otherwise cuBLAS, with packed weights dequantized a
//   bounded slice of columns at a time against the gathered x)  ->  LoRA
//   (two cuBLAS GEMMs per adapter, accumulating into the same buffer)  ->  one
//   epilogue kernel: bias, head norms, RoPE, fp16 q/k/v, and the accumulator
//   rows that split-K atomics use zeroed again.
// forward2 is the same with attn_out, the O projection and the residual epilogue
// (or, beyond the small-row path with nothing between O and the residual, cuBLAS
// adding the projection to x itself).
// All scratch is allocated at creation (LoRA scratch by set_loras), the layer's
// own or grown in a CudaScratch shared with other layers; forward only launches
// work on the caller's stream and never waits for the device.
#include "core/backend.h"
#include "cuda/blas_handles.h"
#include "cuda/cublas_gemm.h"
#include "cuda/cuda_qmatrix.h"
#include "cuda/cuda_scratch.h"
#include "cuda/graphs.h"
#include "cuda/kernels.h"

#include <algorithm>

namespace qattn::cuda {
namespace {

constexpr size_t kCublasWorkspaceBytes = size_t(8) << 20;
// Bound on the fp16 scratch that the large-row path dequantizes into (32 MiB).
constexpr int64_t kDequantScratchElements = int64_t(16) << 20;

struct Adapter {
    qattn_proj proj = QATTN_PROJ_Q;
    int rank = 0;
    DeviceBuffer a, b;  // fp16 [in, rank], [rank, out]
};

struct DeviceNorm {
    NormInfo info;
    DeviceBuffer weight, bias;
    NormParams params() const {
        NormParams p;
        p.type = info.type;
        p.eps = info.eps;
        p.weight = weight.get<__half>();
        p.bias = bias.get<__half>();
        p.per_head = info.per_head ? 1 : 0;
        return p;
    }
    qattn_status load(const NormInfo& i, const NormWeights& w) {
        info = i;
        if (!i.enabled()) return QATTN_SUCCESS;
        QATTN_TRY(weight.upload(w.weight.data(), sizeof(uint16_t) * w.weight.size()));
        if (!w.bias.empty()) QATTN_TRY(bias.upload(w.bias.data(), sizeof(uint16_t) * w.bias.size()));
        return QATTN_SUCCESS;
    }
};

class CudaLayer final : public LayerImpl {
public:
    static qattn_status create(const LayerInfo& info, const LayerHostWeights& weights,
                               const LayerProjections& projections, std::shared_ptr<ScratchImpl> shared,
                               std::unique_ptr<LayerImpl>* out) {
        DeviceGuard guard;
        QATTN_TRY(guard.enter(info.device));
        std::unique_ptr<CudaLayer> layer(new CudaLayer(info, projections));
        // The core hands over only scratch made by this backend for this device.
        layer->scratch_ = shared ? std::static_pointer_cast<CudaScratch>(shared)
                                 : std::make_shared<CudaScratch>(info.device);
        QATTN_TRY(layer->init(weights));
        *out = std::move(layer);
        return QATTN_SUCCESS;
    }

    ~CudaLayer() override {
        DeviceGuard guard;
        if (guard.enter(info_.device) != QATTN_SUCCESS) return;
        graphs_.reset();
        if (blas_user_) detach_blas_user(info_.device);
        if (fork_) cudaEventDestroy(fork_);
        if (join_) cudaEventDestroy(join_);
        if (side_) cudaStreamDestroy(side_);
    }

    qattn_status forward1(const Forward1Call& call, void* stream) override {
        return dispatch(1, call.batch, call.q_len, *call.loras, stream,
                        [&](cudaStream_t s) { return forward1_body(call, s); });
    }

    qattn_status forward2(const Forward2Call& call, void* stream) override {
        return dispatch(2, call.batch, call.q_len, *call.loras, stream,
                        [&](cudaStream_t s) { return forward2_body(call, s); });
    }

    qattn_status set_loras(const std::vector<LoraSpec>& specs) override {
        DeviceGuard guard;
        QATTN_TRY(guard.enter(info_.device));
        std::vector<Adapter> adapters(specs.size());
        int max_rank = 0;
        for (size_t i = 0; i < specs.size(); ++i) {
            const LoraSpec& s = specs[i];
            adapters[i].proj = s.proj;
            adapters[i].rank = s.rank;
            QATTN_TRY(adapters[i].a.upload(s.a.data(), sizeof(uint16_t) * s.a.size()));
            QATTN_TRY(adapters[i].b.upload(s.b.data(), sizeof(uint16_t) * s.b.size()));
            max_rank = std::max(max_rank, s.rank);
        }
        bool qkv_lora = false, o_lora = false;
        for (const LoraSpec& s : specs) (s.proj == QATTN_PROJ_O ? o_lora : qkv_lora) = true;
        QATTN_TRY(size_accumulators(qkv_lora, o_lora));
        QATTN_TRY(scratch_->reserve(CudaScratch::kLora, sizeof(uint16_t) * info_.max_rows * max_rank));
        QATTN_CUDA_TRY(cudaStreamSynchronize(nullptr));  // uploads done before any stream reads them
        if (graphs_) graphs_->clear();
        adapters_ = std::move(adapters);
        return QATTN_SUCCESS;
    }

    qattn_status check_device_errors(void* stream) override {
        DeviceGuard guard;
        QATTN_TRY(guard.enter(info_.device));
        QATTN_CUDA_TRY(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)));
        int flag = 0;
        QATTN_CUDA_TRY(cudaMemcpy(&flag, error_flag_.get(), sizeof flag, cudaMemcpyDeviceToHost));
        if (flag == 0) return QATTN_SUCCESS;
        QATTN_CUDA_TRY(cudaMemset(error_flag_.get(), 0, sizeof flag));
        QATTN_CUDA_TRY(cudaStreamSynchronize(nullptr));
        return fail(QATTN_ERROR_OUT_OF_RANGE,
                    "a forward1 call on this layer had a row whose position (past_lens[b] + t) was outside "
                    "[0, min(max_seq_len, max_positions)) (left unrotated) or whose kv_slots entry was outside "
                    "[0, num_kv_slots) (not written to the cache)");
    }

private:
    // A stream of another device would fail in some launch half-way through the
    // call; refuse it up front. NULL and the special handles mean the current
    // device, which the guard made the layer's. Not asked of a capturing stream
    // (cudaStreamGetDevice would invalidate the capture); a launch into a foreign
    // one fails with its CUDA error.
    qattn_status check_stream(cudaStream_t s) const {
        if (s == nullptr || s == cudaStreamLegacy || s == cudaStreamPerThread) return QATTN_SUCCESS;
        int device = -1;
        QATTN_CUDA_TRY(cudaStreamGetDevice(s, &device));
        if (device != info_.device)
            return fail(QATTN_ERROR_INVALID_ARGUMENT, "the stream belongs to CUDA device %d, the layer is on device %d",
                        device, info_.device);
        return QATTN_SUCCESS;
    }

    CudaLayer(const LayerInfo& info, const LayerProjections& p) : info_(info) {
        proj_[0] = static_cast<const CudaQMatrix*>(p.q);
        proj_[1] = static_cast<const CudaQMatrix*>(p.k);
        proj_[2] = static_cast<const CudaQMatrix*>(p.v);
        proj_[3] = static_cast<const CudaQMatrix*>(p.o);
        for (int i = 0; i < 4; ++i)
            for (int j = 0; j < i; ++j)
                if (order_[i] == i && proj_[i]->same_row_order(*proj_[j])) order_[i] = order_[j];
        column_[0] = 0;
        column_[1] = info.q_width();
        column_[2] = info.q_width() + info.kv_width();
        qkv_width_ = info.q_width() + 2 * info.kv_width();
    }

    qattn_status init(const LayerHostWeights& w) {
        QATTN_TRY(input_norm_.load(info_.input_norm, w.input_norm));
        QATTN_TRY(q_norm_.load(info_.q_norm, w.q_norm));
        QATTN_TRY(k_norm_.load(info_.k_norm, w.k_norm));
        QATTN_TRY(post_norm_.load(info_.post_norm, w.post_norm));
        QATTN_CUDA_TRY(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, info_.device));

        const size_t rows = static_cast<size_t>(info_.max_rows);
        stages_input_ = info_.input_norm.enabled() || info_.residual_fp32;
        if (stages_input_)
            QATTN_TRY(scratch_->reserve(CudaScratch::kNormed, sizeof(__half) * rows * info_.hidden_size));
        QATTN_TRY(size_accumulators(false, false));
        QATTN_TRY(error_flag_.allocate(sizeof(int)));
        counters_o_ = small_gemm_counters(qkv_width_);
        QATTN_TRY(scratch_->reserve(CudaScratch::kCounters,
                                    sizeof(int) * (counters_o_ + small_gemm_counters(info_.hidden_size))));
        QATTN_CUDA_TRY(cudaMemset(error_flag_.get(), 0, sizeof(int)));

        // The large-row path of packed matrices dequantizes whole columns (all
        // packed rows); a slice of columns is bounded by kDequantScratchElements.
        // x is gathered into packed row order beside it; a matrix in input order
        // reads x where it lies, gathered only by the small-row path (an input
        // that is not 16-byte aligned), so it needs at most kSmallRows rows.
        int64_t need = 0, gathered = 0;
        for (const CudaQMatrix* m : proj_) {
            if (!m->packed()) continue;
            const int64_t rows_packed = m->packed_rows();
            const int64_t gathered_rows =
                m->identity_order() ? std::min<int64_t>(info_.max_rows, kSmallRows) : info_.max_rows;
            gathered = std::max(gathered, rows_packed * gathered_rows);
            if (info_.max_rows <= kSmallRows) continue;
            need = std::max(need, std::min(rows_packed * m->out_features(),
                                           std::max(kDequantScratchElements, 8 * rows_packed)));
        }
        QATTN_TRY(scratch_->reserve(CudaScratch::kDequant, sizeof(__half) * need));
        QATTN_TRY(scratch_->reserve(CudaScratch::kGathered, sizeof(__half) * gathered));
        dequant_elements_ = need;
        if (need > 0) {
            QATTN_CUDA_TRY(cudaStreamCreateWithFlags(&side_, cudaStreamNonBlocking));
            QATTN_CUDA_TRY(cudaEventCreateWithFlags(&fork_, cudaEventDisableTiming));
            QATTN_CUDA_TRY(cudaEventCreateWithFlags(&join_, cudaEventDisableTiming));
        }

        const bool hopper = gptq4_gemm_large_available(info_.device);
        for (int p = 0; p < 4; ++p) {
            const CudaQMatrix& m = *proj_[p];
            fused_large_[p] = hopper && m.packed() && m.single_group_chunks() && m.out_features() % 256 == 0;
        }

        QATTN_TRY(attach_blas_user(info_.device));
        blas_user_ = true;
        QATTN_TRY(scratch_->reserve(CudaScratch::kWorkspace, kCublasWorkspaceBytes));
        if (info_.use_graphs) {
            graphs_.reset(new GraphCache());
            QATTN_TRY(graphs_->init());
        }
        QATTN_CUDA_TRY(cudaStreamSynchronize(nullptr));
        return QATTN_SUCCESS;
    }

    static std::vector<int> graph_key(int phase, int batch, int q_len, const ActiveLoras& loras) {
        std::vector<int> key{phase, batch, q_len};
        for (const auto& list : loras) {
            key.push_back(-1);
            key.insert(key.end(), list.begin(), list.end());
        }
        return key;
    }

    // A phase on the layer's device: straight onto the caller's stream when it
    // is capturing (its graph takes the kernels) or graphs are off, else
    // through the layer's graph for this shape.
    template <typename Body>
    qattn_status dispatch(int phase, int batch, int q_len, const ActiveLoras& loras, void* stream, Body&& body) {
        DeviceGuard guard;
        QATTN_TRY(guard.enter(info_.device));
        const auto s = static_cast<cudaStream_t>(stream);
        bool capturing = false;
        QATTN_TRY(stream_is_capturing(s, &capturing));
        if (!capturing) QATTN_TRY(check_stream(s));
        if (!graphs_ || capturing) return run(s, capturing, body);
        const auto record = [&](cudaStream_t cs) { return run(cs, true, body); };
        return graphs_->run(graph_key(phase, batch, q_len, loras), record, s);
    }

    // The accumulators and the GEMM's arrival counters are zero between calls
    // (each epilogue zeroes what it read). A call that failed half-way may leave
    // partial sums or counts: the next call clears them.
    template <typename Body>
    qattn_status run(cudaStream_t s, bool capturing, Body&& body) {
        QATTN_TRY(scratch_->clear_if_dirty(s));
        BlasLease lease(info_.device);
        lease_ = &lease;
        lease_capturing_ = capturing;
        blas_ = nullptr;
        blas_stream_bound_ = false;
        dequantized_ahead_ = -1;
        kv_together_ = false;
        const qattn_status status = body(s);
        lease_ = nullptr;
        blas_ = nullptr;
        if (status != QATTN_SUCCESS) scratch_->dirty = true;
        return status;
    }

    // The fp32 accumulators of the small-row path (up to kSmallRows rows, zero
    // between calls), and beyond it one phase's sums: Q|K|V leave cuBLAS in fp16,
    // except with LoRA on q, k or v, whose products add to fp32 sums; the O sums
    // are kept only with an O bias, a post-norm or LoRA on O (else cuBLAS adds O
    // into the residual itself). So LoRA, known only from set_loras, grows them.
    // Apart, so that layers of other widths sharing the scratch find the
    // small-row accumulators zero after any large call.
    qattn_status size_accumulators(bool qkv_lora, bool o_lora) {
        const size_t rows = static_cast<size_t>(info_.max_rows), small = std::min<size_t>(rows, kSmallRows);
        QATTN_TRY(scratch_->reserve(CudaScratch::kAccQkv, sizeof(float) * small * qkv_width_));
        QATTN_TRY(scratch_->reserve(CudaScratch::kAccO, sizeof(float) * small * info_.hidden_size));
        if (rows <= kSmallRows) return QATTN_SUCCESS;
        const bool o_all_rows = o_lora || proj_[3]->bias() || info_.post_norm.enabled();
        const size_t qkv = (qkv_lora ? sizeof(float) : sizeof(__half)) * rows * qkv_width_;
        const size_t o = o_all_rows ? sizeof(float) * rows * info_.hidden_size : 0;
        return scratch_->reserve(CudaScratch::kSums, std::max(qkv, o));
    }

    // The call's cuBLAS handle (leased in run), on this stream with this layer's
    // workspace; cublasSetStream also resets the workspace, so both are set
    // together, once per call.
    qattn_status bind_blas(cudaStream_t s) {
        if (blas_stream_bound_) return QATTN_SUCCESS;
        QATTN_TRY(lease_->get(lease_capturing_, &blas_));
        QATTN_CUBLAS_TRY(cublasSetStream(blas_, s));
        QATTN_CUBLAS_TRY(cublasSetWorkspace(blas_, scratch_->get<void>(CudaScratch::kWorkspace), kCublasWorkspaceBytes));
        blas_stream_bound_ = true;
        return QATTN_SUCCESS;
    }

    // c[r, 0:N] = x . W + beta * c (c fp32 or fp16) for a matrix not taken by the
    // small-row kernel. Packed weights multiply x gathered into their packed row
    // order (gathered_), which the input staging may already have written for this order.
    template <typename T>
    qattn_status project_large(int p, const __half* x, int ldx, int rows, T* c, int ldc, cudaStream_t s,
                               float beta = 0.0f) {
        const CudaQMatrix& m = *proj_[p];
        if (p == 2 && kv_together_) return QATTN_SUCCESS;  // K's GEMM computed V
        const bool joint = p == 1 && kv_together_;
        QATTN_TRY(bind_blas(s));
        const int K = static_cast<int>(m.in_features());
        const int N = static_cast<int>(m.out_features() + (joint ? proj_[2]->out_features() : 0));
        if (!m.packed()) return gemm_xwT(blas_, rows, N, K, x, ldx, m.dense(), c, ldc, beta);
        const int packed_rows = static_cast<int>(m.packed_rows());
        const PackedGptq4& w = m.packed_gptq();
        const __half* xg = x;  // x in packed row order, row stride ldg
        int ldg = ldx;
        if (!m.identity_order()) {
            if (gathered_order_ != order_[p]) {
                QATTN_TRY(stage_gathered(x, ldx, rows, K, p, s));
                gathered_order_ = order_[p];
            }
            xg = scratch_->get<__half>(CudaScratch::kGathered);
            ldg = packed_rows;
        }
        if (fused_large_[p] && !joint && (beta == 0.0f || beta == 1.0f)) {
            const Gptq4GemmLargeProblem problem{w, N, xg, ldg, c};
            if (gptq4_gemm_large_fits(problem) && ldc % 8 == 0)
                return launch_gptq4_gemm_large(&problem, 1, rows, sizeof(T) == sizeof(float), ldc, beta != 0.0f, s);
        }
        const int slice = joint ? N : dequant_slice(m);
        for (int n0 = 0; n0 < N; n0 += slice) {
            const int count = std::min(slice, N - n0);
            __half* const weights = scratch_->get<__half>(CudaScratch::kDequant);
            if (n0 == 0 && dequantized_ahead_ == p) {
                QATTN_CUDA_TRY(cudaStreamWaitEvent(s, join_, 0));
                dequantized_ahead_ = -1;
            } else if (!joint) {
                const DequantizeSlice d{w, N, n0, count, weights};
                QATTN_TRY(launch_dequantize_gptq4(&d, 1, sm_count_, s));
            }
            QATTN_TRY(gemm_xwT(blas_, rows, count, packed_rows, xg, ldg, weights, c + n0, ldc, beta));
        }
        return QATTN_SUCCESS;
    }

    // Q, K and V that the fused dequantize + wgmma GEMM fits, in one launch (K
    // and V alone would each leave half of an H200 idle for a whole wave): those
    // whose x needs no gathering of its own, in input order or in the order the
    // input staging gathered. fused[p] says which it computed.
    qattn_status project_large_fused(const __half* x, int ldx, int rows, __half* acc16, float* acc, bool* fused,
                                     cudaStream_t s) {
        Gptq4GemmLargeProblem problems[3];
        int count = 0, which[3];
        for (int p = 0; p < 3; ++p) {
            const CudaQMatrix& m = *proj_[p];
            if (!fused_large_[p] || (!m.identity_order() && gathered_order_ != order_[p])) continue;
            const bool gathered = !m.identity_order();
            void* out = acc16 ? static_cast<void*>(acc16 + column_[p]) : static_cast<void*>(acc + column_[p]);
            const Gptq4GemmLargeProblem problem{
                m.packed_gptq(), static_cast<int>(m.out_features()),
                gathered ? scratch_->get<__half>(CudaScratch::kGathered) : x,
                gathered ? static_cast<int>(m.packed_rows()) : ldx, out};
            if (!gptq4_gemm_large_fits(problem)) continue;
            which[count] = p;
            problems[count++] = problem;
        }
        if (count == 0 || qkv_width_ % 8 != 0) return QATTN_SUCCESS;
        QATTN_TRY(launch_gptq4_gemm_large(problems, count, rows, acc16 == nullptr, qkv_width_, false, s));
        for (int i = 0; i < count; ++i) fused[which[i]] = true;
        return QATTN_SUCCESS;
    }

    // K and V of one packed row order that fit the scratch together are
    // dequantized by one launch, side by side (each alone leaves most of the GPU
    // idle: 512 blocks for Llama-3-8B's 4096 x 1024), and multiplied by one GEMM
    // over both (their columns are adjacent in the accumulator): project_large(K)
    // covers V too (kv_together_), project_large(V) does nothing.
    qattn_status dequantize_kv_together(cudaStream_t s) {
        const CudaQMatrix &k = *proj_[1], &v = *proj_[2];
        if (!k.packed() || !v.packed() || order_[2] != order_[1] || k.packed_rows() != v.packed_rows() ||
            dequantized_ahead_ == 1 || dequantized_ahead_ == 2 ||
            (k.out_features() + v.out_features()) * k.packed_rows() > dequant_elements_)
            return QATTN_SUCCESS;
        const int nk = static_cast<int>(k.out_features()), nv = static_cast<int>(v.out_features());
        __half* scratch = scratch_->get<__half>(CudaScratch::kDequant);
        const DequantizeSlice d[2] = {{k.packed_gptq(), nk, 0, nk, scratch},
                                      {v.packed_gptq(), nv, 0, nv, scratch + static_cast<int64_t>(nk) * k.packed_rows()}};
        QATTN_TRY(launch_dequantize_gptq4(d, 2, sm_count_, s));
        kv_together_ = true;
        return QATTN_SUCCESS;
    }

    // Columns of a packed matrix dequantized at a time (the scratch's bound).
    int dequant_slice(const CudaQMatrix& m) const {
        return static_cast<int>(std::min<int64_t>(m.out_features(), dequant_elements_ / m.packed_rows() / 8 * 8));
    }

    // The large-row path's first dequantization (the first slice of matrix p)
    // runs on a second stream while this one stages x: neither reads what the
    // other writes, and the fork comes after everything queued before (the last
    // call's GEMMs that read the scratch). project_large joins it.
    qattn_status dequantize_ahead(int p, cudaStream_t s) {
        const CudaQMatrix& m = *proj_[p];
        if (!m.packed()) return QATTN_SUCCESS;
        QATTN_CUDA_TRY(cudaEventRecord(fork_, s));
        QATTN_CUDA_TRY(cudaStreamWaitEvent(side_, fork_, 0));
        const DequantizeSlice d{m.packed_gptq(), static_cast<int>(m.out_features()), 0, dequant_slice(m),
                                scratch_->get<__half>(CudaScratch::kDequant)};
        QATTN_TRY(launch_dequantize_gptq4(&d, 1, sm_count_, side_));
        QATTN_CUDA_TRY(cudaEventRecord(join_, side_));
        dequantized_ahead_ = p;
        return QATTN_SUCCESS;
    }

    qattn_status add_loras(qattn_proj proj, const std::vector<int>& active, const __half* x, int ldx, int rows,
                           float* c, int ldc, cudaStream_t s) {
        for (int index : active) {
            const Adapter& a = adapters_[index];
            QATTN_TRY(bind_blas(s));
            const CudaQMatrix& m = *proj_[proj];
            QATTN_TRY(lora_add(blas_, rows, static_cast<int>(m.in_features()), a.rank,
                               static_cast<int>(m.out_features()), x, ldx, a.a.get<__half>(), a.b.get<__half>(),
                               scratch_->get<__half>(CudaScratch::kLora), c, ldc));
        }
        return QATTN_SUCCESS;
    }

    // gathered_ = x [rows, K] in the packed row order of matrix p.
    qattn_status stage_gathered(const __half* x, int ldx, int rows, int K, int p, cudaStream_t s) {
        StageRowsParams st;
        st.x = x;
        st.rows = rows;
        st.width = K;
        st.ldx = ldx;
        st.perm = proj_[p]->packed_gptq().perm;
        st.columns = static_cast<int>(proj_[p]->packed_rows());
        st.gathered = scratch_->get<__half>(CudaScratch::kGathered);
        return launch_stage_rows(st, s);
    }

    // Up to this many rows the small-row kernel gathers x through perm itself
    // (scattered loads, repeated by every block of a K slice) rather than pay a
    // staging launch; beyond, or when the input norm runs anyway, x is staged.
    static constexpr int kGatherInKernelRows = 4;

    qattn_status forward1_body(const Forward1Call& call, cudaStream_t s) {
        const int rows = call.rows, H = info_.hidden_size;
        const bool small_rows = rows <= kSmallRows;
        // The staging of x (norm, fp32 -> fp16) also gathers it into the packed row
        // order of the first packed matrix that has one; x in input order is
        // written only where something reads it: dense matrices, packed ones in
        // input order (no act-order), LoRA, a packed matrix with another row
        // order, or the small-row kernel gathering for itself.
        int gather_for = -1;
        bool need_plain = false;
        for (int p = 0; p < 3; ++p) {
            const CudaQMatrix& m = *proj_[p];
            if (!m.packed() || m.identity_order() || (gather_for >= 0 && order_[p] != gather_for))
                need_plain = true;
            else if (gather_for < 0)
                gather_for = p;
            if (!(*call.loras)[p].empty()) need_plain = true;
        }
        const bool stage_gather =
            gather_for >= 0 && (!small_rows || stages_input_ || rows > kGatherInKernelRows);
        gathered_order_ = -1;
        if (!small_rows && !fused_large_[0]) QATTN_TRY(dequantize_ahead(0, s));
        const __half* x = static_cast<const __half*>(call.x);
        if (stages_input_) {
            StageRowsParams st;
            st.x = call.x;
            st.x_fp32 = info_.residual_fp32;
            st.rows = rows;
            st.width = H;
            st.ldx = H;
            st.norm = input_norm_.params();
            if (need_plain) {
                st.out = scratch_->get<__half>(CudaScratch::kNormed);
                x = st.out;
            }
            if (stage_gather) {
                st.perm = proj_[gather_for]->packed_gptq().perm;
                st.columns = static_cast<int>(proj_[gather_for]->packed_rows());
                st.gathered = scratch_->get<__half>(CudaScratch::kGathered);
            }
            QATTN_TRY(launch_stage_rows(st, s));
        } else if (stage_gather) {
            QATTN_TRY(stage_gathered(x, H, rows, H, gather_for, s));
        }
        if (stage_gather) gathered_order_ = gather_for;

        bool any_lora = false;
        for (int p = 0; p < 3; ++p) any_lora = any_lora || !(*call.loras)[p].empty();
        // Beyond the small-row path and without LoRA, Q|K|V leave cuBLAS in fp16
        // (its fp32 sums rounded once, as the outputs will be): half the bytes to
        // write and for the epilogue to read back.
        float* acc = small_rows ? scratch_->get<float>(CudaScratch::kAccQkv) : scratch_->get<float>(CudaScratch::kSums);
        __half* acc16 = !small_rows && !any_lora ? scratch_->get<__half>(CudaScratch::kSums) : nullptr;
        HeadEpilogueParams e = head_epilogue(call, acc);
        e.acc16 = acc16;
        SmallGemmProblem small[3];
        int small_count = 0;
        for (int p = 0; p < 3; ++p) {
            const CudaQMatrix& m = *proj_[p];
            if (m.packed() && small_rows)
                small[small_count++] = SmallGemmProblem{
                    m.packed_gptq(), static_cast<int>(m.out_features() / 8), column_[p],
                    m.identity_order() && is_aligned(x, 16) ? x
                    : gathered_order_ == order_[p]     ? scratch_->get<__half>(CudaScratch::kGathered)
                                                       : nullptr};
        }
        SmallGemmEpilogue finish;
        if (small_count == 3 && !any_lora && rows <= kSmallGemmFinishRows && small_gemm_can_finish_heads(e)) {
            finish.kind = SmallGemmEpilogue::kHeads;
            finish.counters = scratch_->get<int>(CudaScratch::kCounters);
            finish.heads = e;
        }
        bool finished = false;
        QATTN_TRY(launch_gptq4_gemm_small(small, small_count, x, H, rows, acc, qkv_width_, sm_count_, finish,
                                          &finished, s));
        bool fused[3] = {};
        if (!small_rows) QATTN_TRY(project_large_fused(x, H, rows, acc16, acc, fused, s));
        for (int p = 0; p < 3; ++p) {
            if (p == 1 && !small_rows && !fused[1] && !fused[2]) QATTN_TRY(dequantize_kv_together(s));
            if (acc16 && !fused[p])
                QATTN_TRY(project_large(p, x, H, rows, acc16 + column_[p], qkv_width_, s));
            else if (!acc16 && !fused[p] && !(proj_[p]->packed() && small_rows))
                QATTN_TRY(project_large(p, x, H, rows, acc + column_[p], qkv_width_, s));
            QATTN_TRY(add_loras(static_cast<qattn_proj>(p), (*call.loras)[p], x, H, rows, acc + column_[p],
                                qkv_width_, s));
        }
        if (finished) return QATTN_SUCCESS;
        e.caller_data_ready_at_start = small_count == 3 && !any_lora;
        return launch_head_epilogue(e, s);
    }

    HeadEpilogueParams head_epilogue(const Forward1Call& call, float* acc) const {
        HeadEpilogueParams e;
        e.acc = acc;
        e.acc_stride = qkv_width_;
        e.rows = call.rows;
        e.q_len = call.q_len;
        e.num_heads = info_.num_heads;
        e.num_kv_heads = info_.num_kv_heads;
        e.head_dim = info_.head_dim;
        for (int p = 0; p < 3; ++p) e.bias[p] = proj_[p]->bias();
        e.norm[0] = q_norm_.params();
        e.norm[1] = k_norm_.params();
        e.rope = info_.rope;
        e.rotary_dim = info_.rotary_dim;
        e.sin = call.sin;
        e.cos = call.cos;
        e.past_len = call.past_len;
        e.past_lens = call.past_lens;
        e.max_positions = call.max_positions;
        e.out[0] = static_cast<__half*>(call.q);
        e.out[1] = static_cast<__half*>(call.k);
        e.out[2] = static_cast<__half*>(call.v);
        e.cache[0] = static_cast<__half*>(call.k_cache);
        e.cache[1] = static_cast<__half*>(call.v_cache);
        e.kv_slots = call.kv_slots;
        e.num_kv_slots = call.num_kv_slots;
        e.error_flag = error_flag_.get<int>();
        return e;
    }

    qattn_status forward2_body(const Forward2Call& call, cudaStream_t s) {
        const int rows = call.rows, K = info_.q_width(), H = info_.hidden_size;
        const auto* attn = static_cast<const __half*>(call.attn_out);
        const CudaQMatrix& m = *proj_[3];
        float* acc = rows <= kSmallRows ? scratch_->get<float>(CudaScratch::kAccO)
                                        : scratch_->get<float>(CudaScratch::kSums);
        ResidualEpilogueParams e;
        e.acc = acc;
        e.rows = rows;
        e.width = H;
        e.bias = m.bias();
        e.post_norm = post_norm_.params();
        e.x = call.x;
        e.x_fp32 = info_.residual_fp32;
        e.has_residual = info_.has_residual;
        const std::vector<int>& loras = (*call.loras)[QATTN_PROJ_O];
        SmallGemmEpilogue finish;
        bool finished = false;
        gathered_order_ = -1;
        if (m.packed() && rows <= kSmallRows) {
            const __half* xg = m.identity_order() && is_aligned(attn, 16) ? attn : nullptr;
            if (!xg && rows > kGatherInKernelRows) {
                QATTN_TRY(stage_gathered(attn, K, rows, K, 3, s));
                xg = scratch_->get<__half>(CudaScratch::kGathered);
            }
            if (loras.empty() && rows <= kSmallGemmFinishRows && small_gemm_can_finish_residual(e)) {
                finish.kind = SmallGemmEpilogue::kResidual;
                finish.counters = scratch_->get<int>(CudaScratch::kCounters) + counters_o_;
                finish.residual = e;
            }
            const SmallGemmProblem problem{m.packed_gptq(), H / 8, 0, xg};
            QATTN_TRY(launch_gptq4_gemm_small(&problem, 1, attn, K, rows, acc, H, sm_count_, finish, &finished, s));
        } else {
            if (!m.identity_order() && !fused_large_[3])
                QATTN_TRY(dequantize_ahead(3, s));  // beside the gather of attn_out
            // With nothing between the projection and the residual, cuBLAS adds it
            // to x itself (beta = 1; its fp32 sums rounded once, as the epilogue
            // would): no fp32 accumulator round trip and no epilogue kernel.
            if (loras.empty() && !e.bias && e.post_norm.type == QATTN_NORM_NONE) {
                const float beta = e.has_residual ? 1.0f : 0.0f;
                return e.x_fp32 ? project_large(3, attn, K, rows, static_cast<float*>(call.x), H, s, beta)
                                : project_large(3, attn, K, rows, static_cast<__half*>(call.x), H, s, beta);
            }
            QATTN_TRY(project_large(3, attn, K, rows, acc, H, s));
        }
        QATTN_TRY(add_loras(QATTN_PROJ_O, loras, attn, K, rows, acc, H, s));
        return finished ? QATTN_SUCCESS : launch_residual_epilogue(e, s);
    }

    LayerInfo info_;
    const CudaQMatrix* proj_[4] = {};
    int column_[3] = {};
    int qkv_width_ = 0;
    int sm_count_ = 1;
    DeviceNorm input_norm_, q_norm_, k_norm_, post_norm_;
    std::shared_ptr<CudaScratch> scratch_;
    // Whether forward1 stages x (input norm, fp32 residual) into CudaScratch::kNormed.
    bool stages_input_ = false;
    DeviceBuffer error_flag_;
    // Where forward2's arrival counters start in CudaScratch::kCounters (forward1's first).
    int counters_o_ = 0;
    int64_t dequant_elements_ = 0;
    // Which packed matrices the fused dequantize + wgmma GEMM may take beyond
    // the small-row path (a Hopper GPU, single-group chunks, columns % 256 == 0).
    bool fused_large_[4] = {};
    // order_[p]: the first projection with the same packed row order as p (p
    // itself if none; dense: p). gathered_order_: the order gathered_ holds in
    // this call, -1 for none.
    int order_[4] = {0, 1, 2, 3};
    int gathered_order_ = -1;
    std::vector<Adapter> adapters_;
    // The current call's lease of a cuBLAS handle of the device (blas_handles.h)
    // and the handle, once bind_blas took it.
    bool blas_user_ = false;
    BlasLease* lease_ = nullptr;
    bool lease_capturing_ = false;
    cublasHandle_t blas_ = nullptr;
    bool blas_stream_bound_ = false;
    std::unique_ptr<GraphCache> graphs_;
    // The second stream of dequantize_ahead, its fork and join events, and the
    // matrix whose first slice it has queued (-1: none).
    cudaStream_t side_ = nullptr;
    cudaEvent_t fork_ = nullptr, join_ = nullptr;
    int dequantized_ahead_ = -1;
    // Whether this call dequantized K and V side by side at the start of the
    // dequantization scratch, for one GEMM over both (dequantize_kv_together).
    bool kv_together_ = false;
};

}  // namespace

qattn_status create_layer(const LayerInfo& info, const LayerHostWeights& weights,
                          const LayerProjections& projections, std::shared_ptr<ScratchImpl> scratch,
                          std::unique_ptr<LayerImpl>* out) {
    return CudaLayer::create(info, weights, projections, std::move(scratch), out);
}

}  // namespace qattn::cuda
