"""qattn: the attention block of quantized LLMs, through the C library libqattn (ctypes)."""
from . import _lib
from . import attention
from .cache import ContiguousKVCache, PagedKVCache
from .errors import QattnError
from .layer import Layer, LoRA, Norm
from .qmatrix import QMatrix
from .rope import default_inv_freq, rope_tables
from .scratch import Scratch

__all__ = [
    "QattnError",
    "QMatrix",
    "Layer",
    "Norm",
    "LoRA",
    "ContiguousKVCache",
    "PagedKVCache",
    "Scratch",
    "attention",
    "rope_tables",
    "default_inv_freq",
    "version",
    "build_info",
    "cuda_device_count",
    "library_path",
]


def version():
    """Version of the loaded library as a string "major.minor.patch"."""
    v = _lib.lib.qattn_version()
    return "%d.%d.%d" % (v // 10000, v // 100 % 100, v % 100)


def build_info():
    return _lib.lib.qattn_build_info().decode()


def cuda_device_count():
    return int(_lib.lib.qattn_cuda_device_count())


def library_path():
    """Path of the libqattn that was loaded."""
    return _lib.path
