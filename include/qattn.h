/*
 * qattn — the attention block of quantized LLMs, as a C library.
 *
 * One call pair runs a whole attention block:
 *
 *   qattn_forward1:  x -> input norm -> Q,K,V projections (+bias, +LoRA)
 *                      -> head norms -> RoPE -> q, k, v
 *   (the caller runs attention over its KV cache between the phases)
 *   qattn_forward2:  attn_out -> O projection (+bias, +LoRA) -> [post-norm]
 *                      -> added to the residual x in place
 *
 * Conventions
 *   - Every call returns a qattn_status. On failure, qattn_last_error() holds a
 *     message for the calling thread. The library never aborts and never prints.
 *   - Structs that may grow start with `struct_size`; fill them with the matching
 *     *_default() initialiser, then set what you need.
 *   - A device is an int: QATTN_DEVICE_CPU, or a CUDA device ordinal (>= 0).
 *   - Tensors are data pointers plus the sizes given in the config; all are
 *     dense and row-major. Weights passed at creation may live in host memory or
 *     in the memory of the target device; the library copies (and may repack)
 *     them, so the caller may free its copies afterwards. Activations passed to
 *     forward calls must live in the memory of the layer's device.
 *   - Work runs on the caller's stream (`void* stream` is a cudaStream_t; NULL is
 *     the legacy default stream; ignored on the CPU). Forward calls allocate
 *     nothing: scratch is sized at creation and by qattn_set_loras.
 *   - Handles are not thread-safe: one thread (and one stream) at a time per
 *     layer. Distinct layers may run concurrently on distinct streams.
 */
#ifndef QATTN_H
#define QATTN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#  if defined(QATTN_BUILDING)
#    define QATTN_API __declspec(dllexport)
#  else
#    define QATTN_API __declspec(dllimport)
#  endif
#else
#  define QATTN_API __attribute__((visibility("default")))
#endif

#define QATTN_VERSION_MAJOR 0
#define QATTN_VERSION_MINOR 1
#define QATTN_VERSION_PATCH 0
#define QATTN_VERSION (QATTN_VERSION_MAJOR * 10000 + QATTN_VERSION_MINOR * 100 + QATTN_VERSION_PATCH)

#define QATTN_DEVICE_CPU (-1)

typedef enum qattn_status {
    QATTN_SUCCESS = 0,
    QATTN_ERROR_INVALID_ARGUMENT = 1, /* null pointer, bad size, inconsistent shapes */
    QATTN_ERROR_OUT_OF_RANGE = 2,     /* positions past the tables, rows past max_rows, unknown ids */
    QATTN_ERROR_NOT_SUPPORTED = 3,    /* backend not compiled in, device absent, format/option unsupported */
    QATTN_ERROR_OUT_OF_MEMORY = 4,
    QATTN_ERROR_CUDA = 5,             /* a CUDA or cuBLAS call failed; the message carries its text */
    QATTN_ERROR_INTERNAL = 6
} qattn_status;

/* Name of a status code ("QATTN_ERROR_OUT_OF_RANGE"); never NULL. */
QATTN_API const char* qattn_status_string(qattn_status status);
/* Message of the last failed call on this thread ("" if none); valid until the next call. */
QATTN_API const char* qattn_last_error(void);

/* QATTN_VERSION of the library actually loaded. */
QATTN_API int qattn_version(void);
/* Human-readable: version, backends compiled in, CUDA architectures. */
QATTN_API const char* qattn_build_info(void);
/* Number of CUDA devices usable by this build (0 without CUDA support or driver). */
QATTN_API int qattn_cuda_device_count(void);

/* ------------------------------------------------------------------------ */
/* Quantized matrices                                                         */
/* ------------------------------------------------------------------------ */

/* A QMatrix maps `in_features` (K) inputs to `out_features` (N) outputs:
 * y[r, n] = sum_k x[r, k] * W[k, n] (+ bias[n]). It lives on one device and may
 * be shared by any number of layers on that device; destroy it only after them. */
typedef struct qattn_qmatrix qattn_qmatrix;

typedef enum qattn_qmatrix_format {
    /* weight: fp16 [N, K] (nn.Linear.weight layout). */
    QATTN_QMATRIX_DENSE_F16 = 0,
    /* GPTQ, `bits` in {4, 8}, packed along K into int32 words (32/bits values per
     * word, value j of a word in bits j*bits .. j*bits+bits-1):
     *   qweight int32 [K*bits/32, N]; qzeros int32 [G, N*bits/32] (packed along N);
     *   scales fp16 [G, N]; g_idx int32 [K] or NULL (then g = k / group_size).
     *   W[k, n] = scales[g, n] * (q[k, n] - z[g, n]),  g = g_idx[k],
     *   z = stored zero + 1 when zero_offset_one is set (the classic checkpoint format). */
    QATTN_QMATRIX_GPTQ = 1
} qattn_qmatrix_format;

typedef struct qattn_qmatrix_desc {
    size_t struct_size;
    qattn_qmatrix_format format;
    int device;           /* QATTN_DEVICE_CPU or CUDA ordinal */
    int64_t in_features;  /* K, at most 2^20 */
    int64_t out_features; /* N, at most 2^20 */
    const void* bias;     /* fp16 [N], optional */

    /* QATTN_QMATRIX_DENSE_F16 */
    const void* weight;   /* fp16 [N, K] */

    /* QATTN_QMATRIX_GPTQ */
    int bits;             /* 4 or 8; default 4 */
    int group_size;       /* > 0; used when g_idx is NULL; default 128 */
    int64_t num_groups;   /* G; 0 means ceil(K / group_size) */
    int zero_offset_one;  /* default 1: qzeros hold z - 1 (AutoGPTQ, ExLlama checkpoints) */
    const int32_t* qweight;
    const int32_t* qzeros;
    const void* scales;   /* fp16 [G, N] */
    const int32_t* g_idx; /* [K], values in [0, G); optional; any order (act-order) */
} qattn_qmatrix_desc;

QATTN_API qattn_qmatrix_desc qattn_qmatrix_desc_default(void);
QATTN_API qattn_status qattn_qmatrix_create(const qattn_qmatrix_desc* desc, qattn_qmatrix** out);
/* NULL is accepted and ignored. */
QATTN_API qattn_status qattn_qmatrix_destroy(qattn_qmatrix* matrix);

/* ------------------------------------------------------------------------ */
/* Attention layer                                                            */
/* ------------------------------------------------------------------------ */

typedef struct qattn_layer qattn_layer;

typedef enum qattn_norm_type {
    QATTN_NORM_NONE = 0,
    QATTN_NORM_RMS = 1,   /* x * rsqrt(mean(x^2) + eps) * w */
    QATTN_NORM_LAYER = 2  /* (x - mean) * rsqrt(var + eps) * w (+ b) */
} qattn_norm_type;

typedef struct qattn_norm_desc {
    qattn_norm_type type;
    float eps;
    const void* weight;   /* fp16; [width], or [heads, head_dim] for a per-head head norm */
    const void* bias;     /* fp16, same shape as weight; LayerNorm only; optional */
    int per_head;         /* head norms only: weight is [heads, head_dim] (Cohere) not [head_dim] (Qwen3) */
} qattn_norm_desc;

typedef enum qattn_rope_type {
    QATTN_ROPE_NONE = 0,
    QATTN_ROPE_NEOX = 1,  /* rotate halves: pairs (i, i + rotary_dim/2) */
    QATTN_ROPE_GPTJ = 2   /* rotate interleaved pairs (2i, 2i + 1) */
} qattn_rope_type;

/* ---- Scratch shared by layers ---------------------------------------------
 *
 * A layer's per-call device memory (the normed input, the projections' sums,
 * slices of dequantized weights, the cuBLAS workspace, LoRA temporaries) is
 * sized at creation from max_rows and the weights' shapes: on CUDA about 100 MiB
 * for a Llama-3-8B layer at max_rows 2048. Layers created with the same
 * qattn_scratch share one set, sized for the largest of them, instead of holding
 * one each: a model whose layers run one after another needs one layer's worth.
 *
 * Layers that share a scratch must never run at the same time: call them on one
 * stream, or order their streams (events), and from one thread at a time.
 * Creating a layer with it, or qattn_set_loras on one of its layers, may grow it
 * and so move its memory: a graph the caller captured before (of any of its
 * layers) must then be captured again. The library's own graphs (use_graphs)
 * follow by themselves. On the CPU a scratch is accepted and holds nothing (the
 * reference backend allocates per call). */
typedef struct qattn_scratch qattn_scratch;

/* An empty scratch of `device`; it grows as layers are created with it. */
QATTN_API qattn_status qattn_scratch_create(int device, qattn_scratch** out);
/* Gives up the caller's reference: the memory goes with the last layer created
 * with the scratch (or now, if there is none). NULL is accepted and ignored. */
QATTN_API qattn_status qattn_scratch_destroy(qattn_scratch* scratch);

typedef struct qattn_layer_config {
    size_t struct_size;
    int device;
    int hidden_size;      /* H */
    int num_heads;        /* NH */
    int num_kv_heads;     /* NKV; NH % NKV == 0 */
    int head_dim;         /* D; even, at most 512 */
    int max_rows;         /* most batch * q_len rows in one forward call */
    int max_seq_len;      /* positions must stay below this */

    qattn_norm_desc input_norm; /* over H, applied to x before Q/K/V */
    qattn_norm_desc q_norm;     /* over D of each query head, before RoPE */
    qattn_norm_desc k_norm;     /* over D of each key head, before RoPE */
    qattn_norm_desc post_norm;  /* over H, applied to the O projection output (Gemma-2) */

    qattn_rope_type rope;
    int rotary_dim;       /* even, <= head_dim; 0 means head_dim */

    int has_residual;     /* default 1: x += y; 0: x = y */
    int residual_fp32;    /* x is fp32 instead of fp16 */
    int use_graphs;       /* CUDA: capture each (batch, q_len) once, replay after */

    /* Borrowed, not owned: must outlive the layer and live on its device. */
    qattn_qmatrix* q_proj; /* H -> NH*D */
    qattn_qmatrix* k_proj; /* H -> NKV*D */
    qattn_qmatrix* v_proj; /* H -> NKV*D */
    qattn_qmatrix* o_proj; /* NH*D -> H */

    /* Optional, NULL by default: a scratch of the layer's device to share with
     * other layers (see qattn_scratch above); NULL gives the layer its own. */
    qattn_scratch* scratch;
} qattn_layer_config;

QATTN_API qattn_layer_config qattn_layer_config_default(void);
QATTN_API qattn_status qattn_create(const qattn_layer_config* config, qattn_layer** out);
/* NULL is accepted and ignored. */
QATTN_API qattn_status qattn_destroy(qattn_layer* layer);

typedef struct qattn_forward1_args {
    size_t struct_size;
    int batch;
    int q_len;                  /* rows = batch * q_len <= max_rows */
    const void* x;              /* [rows, H], fp16 (fp32 if residual_fp32) */
    /* Token t of sequence b sits at position past_lens[b] + t, or past_len + t
     * when past_lens is NULL. past_lens is int32 [batch] in the layer's device
     * memory, so a captured graph reads fresh values at each replay. */
    int past_len;
    const int32_t* past_lens;
    /* RoPE tables, fp32 [max_positions, rotary_dim / 2], layer's device memory. */
    const float* sin;
    const float* cos;
    int max_positions;
    void* q;                    /* out: fp16 [rows, NH*D] */
    void* k;                    /* out: fp16 [rows, NKV*D] */
    void* v;                    /* out: fp16 [rows, NKV*D] */
    const int32_t* lora_ids;    /* host memory; active adapters; may be NULL if num_lora_ids == 0 */
    int num_lora_ids;
    /* Optional: k and v written straight into a KV cache, so that no copy runs
     * between forward1 and attention. Row r goes to slot kv_slots[r] of k_cache
     * and of v_cache, each fp16 [num_kv_slots, NKV*D] in the layer's device memory:
     * a contiguous cache [batch, max_seq_len, NKV, D] has slot
     * b * max_seq_len + position, a paged one [num_blocks, block_size, NKV, D]
     * block * block_size + position % block_size. kv_slots is int32 [rows] in the
     * layer's device memory. With kv_slots set, k and v may be NULL (then only the
     * cache is written). A slot outside [0, num_kv_slots) is refused on the CPU;
     * on CUDA that row is not written to the cache and the layer's device error
     * flag is set (qattn_check_device_errors). */
    void* k_cache;
    void* v_cache;
    const int32_t* kv_slots;
    int64_t num_kv_slots;
} qattn_forward1_args;

typedef struct qattn_forward2_args {
    size_t struct_size;
    int batch;
    int q_len;
    void* x;                    /* in/out residual [rows, H], fp16 (fp32 if residual_fp32) */
    const void* attn_out;       /* fp16 [rows, NH*D] */
    const int32_t* lora_ids;
    int num_lora_ids;
} qattn_forward2_args;

QATTN_API qattn_forward1_args qattn_forward1_args_default(void);
QATTN_API qattn_forward2_args qattn_forward2_args_default(void);

QATTN_API qattn_status qattn_forward1(qattn_layer* layer, const qattn_forward1_args* args, void* stream);
QATTN_API qattn_status qattn_forward2(qattn_layer* layer, const qattn_forward2_args* args, void* stream);

/* Positions and KV slots given in device memory (past_lens, kv_slots) cannot be
 * checked on the host without a synchronisation, which forward calls never do.
 * Device kernels check them instead: a row whose position is past max_positions
 * or max_seq_len is not rotated, a row whose slot is outside the cache is not
 * written to it, nothing is written past any buffer, and a sticky flag is set in
 * the layer.
 * This call waits for `stream`, returns QATTN_ERROR_OUT_OF_RANGE if the flag was
 * set since the last check (and clears it), else QATTN_SUCCESS. */
QATTN_API qattn_status qattn_check_device_errors(qattn_layer* layer, void* stream);

/* ------------------------------------------------------------------------ */
/* LoRA                                                                       */
/* ------------------------------------------------------------------------ */

typedef enum qattn_proj {
    QATTN_PROJ_Q = 0,
    QATTN_PROJ_K = 1,
    QATTN_PROJ_V = 2,
    QATTN_PROJ_O = 3
} qattn_proj;

/* One adapter on one projection: adds (n . A) . B to that projection's output.
 * Fold any scaling (alpha / rank) into B. */
typedef struct qattn_lora_desc {
    size_t struct_size;
    int id;               /* adapter id, chosen by the caller; one id may cover several projections */
    qattn_proj proj;
    int rank;             /* 0 < r <= 4096 */
    const void* a;        /* fp16 [in, r] */
    const void* b;        /* fp16 [r, out] */
} qattn_lora_desc;

QATTN_API qattn_lora_desc qattn_lora_desc_default(void);

/* Replaces the layer's whole adapter set by `count` adapters (count 0 clears it).
 * `loras` is an array of descriptors, each `loras[0].struct_size` bytes apart.
 * Writes the largest rank to *max_rank if max_rank is not NULL. An (id, proj) pair
 * may appear once. Not safe while the layer's stream still runs a forward. It may
 * grow the layer's scratch (LoRA needs fp32 sums of every row): forward calls
 * captured into a caller's CUDA graph before it must be captured again. */
QATTN_API qattn_status qattn_set_loras(qattn_layer* layer, const qattn_lora_desc* loras, int count,
                                       int* max_rank);

/* ------------------------------------------------------------------------ */
/* Whole block: forward1 -> attention (a callback) -> forward2                */
/* ------------------------------------------------------------------------ */

typedef enum qattn_kv_layout {
    QATTN_KV_CONTIGUOUS = 0, /* k, v: fp16 [batch, max_seq_len, NKV, D] */
    QATTN_KV_PAGED = 1       /* k, v: fp16 [num_blocks, block_size, NKV, D] + block table */
} qattn_kv_layout;

/* A KV cache in the layer's device memory, in flash-attn's layouts. */
typedef struct qattn_kv_cache {
    size_t struct_size;
    qattn_kv_layout layout;
    void* k;
    void* v;
    int max_seq_len;              /* contiguous: positions per sequence */
    int num_blocks;               /* paged */
    int block_size;               /* paged: tokens per block, a multiple of 16 */
    const int32_t* block_table;   /* paged: int32 [batch, max_blocks_per_seq] */
    int max_blocks_per_seq;       /* paged */
} qattn_kv_cache;

QATTN_API qattn_kv_cache qattn_kv_cache_default(void);

/* What an attention callback receives. The callback must (1) write this call's
 * k and v into the cache at positions past_len(s)[b] + t, as
 * flash_attn_with_kvcache does when given k and v, and (2) write to `out` the
 * attention of each query over keys 0 .. past + t of its sequence (causal) or
 * over all past + q_len keys (not causal), with query head h reading KV head
 * h / (num_heads / num_kv_heads). Work is enqueued on `stream` (CUDA) or done
 * before returning (CPU). A status other than QATTN_SUCCESS aborts the block
 * before forward2 and is returned by qattn_forward. */
typedef struct qattn_attention_params {
    size_t struct_size;
    int device;
    void* stream;
    int batch, q_len, num_heads, num_kv_heads, head_dim;
    const void* q;                /* fp16 [batch, q_len, NH, D], RoPE applied */
    const void* k;                /* fp16 [batch, q_len, NKV, D], RoPE applied */
    const void* v;                /* fp16 [batch, q_len, NKV, D] */
    const qattn_kv_cache* cache;
    int past_len;                 /* used when past_lens is NULL */
    const int32_t* past_lens;     /* int32 [batch], layer's device memory, or NULL */
    void* out;                    /* fp16 [batch, q_len, NH, D] */
    float softmax_scale;
    int causal;
    void* user_data;
} qattn_attention_params;

typedef qattn_status (*qattn_attention_fn)(const qattn_attention_params* params);

typedef struct qattn_block_args {
    size_t struct_size;
    int batch;
    int q_len;
    void* x;                      /* in/out residual [rows, H] */
    int past_len;                 /* tokens already cached, as in forward1 */
    const int32_t* past_lens;
    const float* sin;
    const float* cos;
    int max_positions;
    const int32_t* lora_ids;
    int num_lora_ids;
    const qattn_kv_cache* cache;
    float softmax_scale;          /* 0 means 1/sqrt(head_dim) */
    int causal;                   /* default 1 */
    qattn_attention_fn attention;
    void* user_data;
    /* Scratch for q, k, v and the attention output, in the layer's device
     * memory, at least qattn_block_workspace_size() bytes, 16-byte aligned.
     * One workspace may serve every layer run on the same stream. */
    void* workspace;
    size_t workspace_size;
} qattn_block_args;

QATTN_API qattn_block_args qattn_block_args_default(void);

/* Bytes of workspace qattn_forward needs for `rows` = batch * q_len rows; 0 for a
 * NULL layer or rows <= 0. */
QATTN_API size_t qattn_block_workspace_size(const qattn_layer* layer, int rows);

/* Runs forward1 into the workspace, the attention callback, and forward2, on
 * `stream`. Checks that the new tokens fit the cache (positions < max_seq_len,
 * or < max_blocks_per_seq * block_size for a paged cache) and, on the CPU, that
 * every block id the call touches is in [0, num_blocks). */
QATTN_API qattn_status qattn_forward(qattn_layer* layer, const qattn_block_args* args, void* stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* QATTN_H */
