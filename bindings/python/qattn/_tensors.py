"""Checks every tensor before its pointer crosses into C: the library sees only
pointers and sizes, so dtype, shape, device and layout are checked here."""
import operator

import torch

from . import _lib
from .errors import invalid

# Sizes, positions and ids cross the ABI as C ints, which ctypes would silently
# wrap (2**32 + 1 becomes 1).
INT32_MIN, INT32_MAX = -2**31, 2**31 - 1


def as_c_int(name, value):
    """value as an int that fits a C int; floats and bools are refused, not converted."""
    try:
        result = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        result = None
    if result is None or not INT32_MIN <= result <= INT32_MAX:
        raise invalid("%s must be an int32, got %r" % (name, value))
    return result


def device_index(device):
    """The C device int of a torch device."""
    if device.type == "cpu":
        return _lib.DEVICE_CPU
    if device.type == "cuda":
        return device.index if device.index is not None else torch.cuda.current_device()
    raise invalid("device %s is not supported (use a CPU or CUDA tensor)" % device)


def torch_device(index):
    return torch.device("cpu") if index == _lib.DEVICE_CPU else torch.device("cuda", index)


def same_device(a, b):
    return a.type == b.type and (a.type == "cpu" or device_index(a) == device_index(b))


try:
    # The raw handle without building a torch.cuda.Stream object (what Inductor's
    # generated code calls per kernel launch): a few microseconds less per call.
    from torch._C import _cuda_getCurrentRawStream as _raw_stream
except ImportError:  # torch built without CUDA, or a torch that renamed it
    def _raw_stream(index):
        return torch.cuda.current_stream(index).cuda_stream


def current_stream(index):
    """The current CUDA stream of device `index` (a C device int) as a void*, None on the CPU."""
    return None if index == _lib.DEVICE_CPU else _raw_stream(index)


def stream_of(device):
    """The caller's current CUDA stream as a void*, or None on the CPU."""
    return current_stream(device_index(device))


def check_tensor(t, name, dtype, shape=None, device=None, allow_cpu=False):
    """Checks a tensor; `shape` entries of None match any size. With `allow_cpu`, a
    weight may be in host memory instead of `device` (the library copies it)."""
    if not isinstance(t, torch.Tensor):
        raise invalid("%s must be a torch.Tensor, got %s" % (name, type(t).__name__))
    if t.layout != torch.strided:
        raise invalid("%s must be a dense (strided) tensor, got layout %s" % (name, t.layout))
    if t.dtype != dtype:
        raise invalid("%s must have dtype %s, got %s" % (name, dtype, t.dtype))
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            expected = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise invalid("%s must have shape %s, got %s" % (name, expected, list(t.shape)))
    if device is not None and not same_device(t.device, device):
        if not (allow_cpu and t.device.type == "cpu"):
            raise invalid("%s is on %s, expected %s" % (name, t.device, device))
    if not t.is_contiguous():
        raise invalid("%s must be contiguous (call .contiguous())" % name)
    if t.numel() == 0:
        raise invalid("%s is empty (shape %s)" % (name, list(t.shape)))
    return t


def is_ready(t, dtype, shape, device):
    """True when check_tensor(t, dtype=dtype, shape=shape, device=device) would pass,
    for a `shape` tuple of known positive sizes: the per-call fast path, with
    check_tensor left to word the error when it is False."""
    return (isinstance(t, torch.Tensor) and t.dtype is dtype and t.layout is torch.strided and t.shape == shape
            and t.device == device and t.is_contiguous())


def ptr(t):
    return None if t is None else t.data_ptr()


def sync_for_host_read(*tensors):
    """Weights on a CUDA device are copied by the library on the legacy default
    stream; work queued on the caller's stream must be finished first."""
    for t in tensors:
        if t is not None and t.device.type == "cuda":
            torch.cuda.current_stream(t.device).synchronize()
