"""Loads libqattn and declares the whole C ABI of include/qattn.h for ctypes.

Struct field order mirrors the header exactly; instances are initialised from the
C *_default() functions so that struct_size and the defaults come from the library.
"""
import ctypes
import glob
import os

# The header this module mirrors: a library with another major.minor may lay out
# its structs differently.
ABI_VERSION = (0, 1)

DEVICE_CPU = -1

QMATRIX_DENSE_F16 = 0
QMATRIX_GPTQ = 1

NORM_NONE, NORM_RMS, NORM_LAYER = 0, 1, 2
ROPE_NONE, ROPE_NEOX, ROPE_GPTJ = 0, 1, 2
PROJ_Q, PROJ_K, PROJ_V, PROJ_O = 0, 1, 2, 3


class QMatrixDesc(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("format", ctypes.c_int),
        ("device", ctypes.c_int),
        ("in_features", ctypes.c_int64),
        ("out_features", ctypes.c_int64),
        ("bias", ctypes.c_void_p),
        ("weight", ctypes.c_void_p),
        ("bits", ctypes.c_int),
        ("group_size", ctypes.c_int),
        ("num_groups", ctypes.c_int64),
        ("zero_offset_one", ctypes.c_int),
        ("qweight", ctypes.c_void_p),
        ("qzeros", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("g_idx", ctypes.c_void_p),
    ]


class NormDesc(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("eps", ctypes.c_float),
        ("weight", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("per_head", ctypes.c_int),
    ]


class LayerConfig(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("device", ctypes.c_int),
        ("hidden_size", ctypes.c_int),
        ("num_heads", ctypes.c_int),
        ("num_kv_heads", ctypes.c_int),
        ("head_dim", ctypes.c_int),
        ("max_rows", ctypes.c_int),
        ("max_seq_len", ctypes.c_int),
        ("input_norm", NormDesc),
        ("q_norm", NormDesc),
        ("k_norm", NormDesc),
        ("post_norm", NormDesc),
        ("rope", ctypes.c_int),
        ("rotary_dim", ctypes.c_int),
        ("has_residual", ctypes.c_int),
        ("residual_fp32", ctypes.c_int),
        ("use_graphs", ctypes.c_int),
        ("q_proj", ctypes.c_void_p),
        ("k_proj", ctypes.c_void_p),
        ("v_proj", ctypes.c_void_p),
        ("o_proj", ctypes.c_void_p),
        ("scratch", ctypes.c_void_p),
    ]


class Forward1Args(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("batch", ctypes.c_int),
        ("q_len", ctypes.c_int),
        ("x", ctypes.c_void_p),
        ("past_len", ctypes.c_int),
        ("past_lens", ctypes.c_void_p),
        ("sin", ctypes.c_void_p),
        ("cos", ctypes.c_void_p),
        ("max_positions", ctypes.c_int),
        ("q", ctypes.c_void_p),
        ("k", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
        ("lora_ids", ctypes.POINTER(ctypes.c_int32)),
        ("num_lora_ids", ctypes.c_int),
        ("k_cache", ctypes.c_void_p),
        ("v_cache", ctypes.c_void_p),
        ("kv_slots", ctypes.c_void_p),
        ("num_kv_slots", ctypes.c_int64),
    ]


class Forward2Args(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("batch", ctypes.c_int),
        ("q_len", ctypes.c_int),
        ("x", ctypes.c_void_p),
        ("attn_out", ctypes.c_void_p),
        ("lora_ids", ctypes.POINTER(ctypes.c_int32)),
        ("num_lora_ids", ctypes.c_int),
    ]


class LoraDesc(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("id", ctypes.c_int),
        ("proj", ctypes.c_int),
        ("rank", ctypes.c_int),
        ("a", ctypes.c_void_p),
        ("b", ctypes.c_void_p),
    ]


KV_CONTIGUOUS, KV_PAGED = 0, 1


class KVCache(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("layout", ctypes.c_int),
        ("k", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
        ("max_seq_len", ctypes.c_int),
        ("num_blocks", ctypes.c_int),
        ("block_size", ctypes.c_int),
        ("block_table", ctypes.c_void_p),
        ("max_blocks_per_seq", ctypes.c_int),
    ]


class AttentionParams(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("device", ctypes.c_int),
        ("stream", ctypes.c_void_p),
        ("batch", ctypes.c_int),
        ("q_len", ctypes.c_int),
        ("num_heads", ctypes.c_int),
        ("num_kv_heads", ctypes.c_int),
        ("head_dim", ctypes.c_int),
        ("q", ctypes.c_void_p),
        ("k", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
        ("cache", ctypes.POINTER(KVCache)),
        ("past_len", ctypes.c_int),
        ("past_lens", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("softmax_scale", ctypes.c_float),
        ("causal", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
    ]


# qattn_attention_fn; keep a reference to every instance passed to C while C may call it.
ATTENTION_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(AttentionParams))


class BlockArgs(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("batch", ctypes.c_int),
        ("q_len", ctypes.c_int),
        ("x", ctypes.c_void_p),
        ("past_len", ctypes.c_int),
        ("past_lens", ctypes.c_void_p),
        ("sin", ctypes.c_void_p),
        ("cos", ctypes.c_void_p),
        ("max_positions", ctypes.c_int),
        ("lora_ids", ctypes.POINTER(ctypes.c_int32)),
        ("num_lora_ids", ctypes.c_int),
        ("cache", ctypes.POINTER(KVCache)),
        ("softmax_scale", ctypes.c_float),
        ("causal", ctypes.c_int),
        ("attention", ATTENTION_FN),
        ("user_data", ctypes.c_void_p),
        ("workspace", ctypes.c_void_p),
        ("workspace_size", ctypes.c_size_t),
    ]


def _candidates():
    path = os.environ.get("QATTN_LIBRARY")
    if path:
        return [path]
    here = os.path.dirname(os.path.abspath(__file__))
    exact = [os.path.join(here, name) for name in ("libqattn.so", "libqattn.dylib", "qattn.dll")]
    return [p for p in exact if os.path.exists(p)] + sorted(glob.glob(os.path.join(here, "libqattn.so.*")))


def _load():
    candidates = _candidates()
    if not candidates:
        raise ImportError(
            "qattn: libqattn was not found in the package folder %s; install the package with "
            "`pip install .` or set QATTN_LIBRARY to the path of libqattn.so"
            % os.path.dirname(os.path.abspath(__file__))
        )
    try:
        lib = ctypes.CDLL(candidates[0])
    except OSError as e:
        raise ImportError("qattn: cannot load %s: %s" % (candidates[0], e)) from e
    _declare(lib)
    version = lib.qattn_version()
    found = (version // 10000, version // 100 % 100)
    if found != ABI_VERSION:
        raise ImportError(
            "qattn: %s is version %d.%d; this Python package needs %d.%d"
            % (candidates[0], found[0], found[1], ABI_VERSION[0], ABI_VERSION[1])
        )
    return lib, candidates[0]


def _declare(lib):
    status = ctypes.c_int
    handle = ctypes.c_void_p
    signatures = {
        "qattn_status_string": (ctypes.c_char_p, [ctypes.c_int]),
        "qattn_last_error": (ctypes.c_char_p, []),
        "qattn_version": (ctypes.c_int, []),
        "qattn_build_info": (ctypes.c_char_p, []),
        "qattn_cuda_device_count": (ctypes.c_int, []),
        "qattn_qmatrix_desc_default": (QMatrixDesc, []),
        "qattn_qmatrix_create": (status, [ctypes.POINTER(QMatrixDesc), ctypes.POINTER(handle)]),
        "qattn_qmatrix_destroy": (status, [handle]),
        "qattn_scratch_create": (status, [ctypes.c_int, ctypes.POINTER(handle)]),
        "qattn_scratch_destroy": (status, [handle]),
        "qattn_layer_config_default": (LayerConfig, []),
        "qattn_create": (status, [ctypes.POINTER(LayerConfig), ctypes.POINTER(handle)]),
        "qattn_destroy": (status, [handle]),
        "qattn_forward1_args_default": (Forward1Args, []),
        "qattn_forward2_args_default": (Forward2Args, []),
        "qattn_forward1": (status, [handle, ctypes.POINTER(Forward1Args), ctypes.c_void_p]),
        "qattn_forward2": (status, [handle, ctypes.POINTER(Forward2Args), ctypes.c_void_p]),
        "qattn_check_device_errors": (status, [handle, ctypes.c_void_p]),
        "qattn_lora_desc_default": (LoraDesc, []),
        "qattn_set_loras": (
            status,
            [handle, ctypes.POINTER(LoraDesc), ctypes.c_int, ctypes.POINTER(ctypes.c_int)],
        ),
        "qattn_kv_cache_default": (KVCache, []),
        "qattn_block_args_default": (BlockArgs, []),
        "qattn_block_workspace_size": (ctypes.c_size_t, [handle, ctypes.c_int]),
        "qattn_forward": (status, [handle, ctypes.POINTER(BlockArgs), ctypes.c_void_p]),
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes


lib, path = _load()
