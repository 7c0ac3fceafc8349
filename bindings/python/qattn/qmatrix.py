"""QMatrix: a weight matrix (dense fp16 or GPTQ) living on one device."""
import ctypes
import operator
import weakref

import torch

from . import _lib
from ._tensors import as_c_int, check_tensor, device_index, ptr, sync_for_host_read, torch_device
from .errors import check, invalid


def _destroy(handle):
    _lib.lib.qattn_qmatrix_destroy(handle)


class QMatrix:
    """Maps in_features (K) to out_features (N): y = x . W (+ bias). Build with
    QMatrix.dense or QMatrix.gptq. Layers using it keep it alive."""

    def __init__(self, desc, device, tensors):
        sync_for_host_read(*tensors)
        handle = ctypes.c_void_p()
        check(_lib.lib.qattn_qmatrix_create(ctypes.byref(desc), ctypes.byref(handle)))
        self._handle = handle
        self._finalizer = weakref.finalize(self, _destroy, handle)
        self._users = weakref.WeakSet()
        self.in_features = int(desc.in_features)
        self.out_features = int(desc.out_features)
        self.device = device

    @classmethod
    def dense(cls, weight, bias=None):
        """weight: fp16 [N, K] (nn.Linear.weight layout); bias: fp16 [N]."""
        check_tensor(weight, "weight", torch.float16, (None, None))
        n, k = weight.shape
        if bias is not None:
            check_tensor(bias, "bias", torch.float16, (n,), weight.device)
        desc = _lib.lib.qattn_qmatrix_desc_default()
        desc.format = _lib.QMATRIX_DENSE_F16
        desc.device = device_index(weight.device)
        desc.in_features = k
        desc.out_features = n
        desc.weight = ptr(weight)
        desc.bias = ptr(bias)
        return cls(desc, torch_device(desc.device), (weight, bias))

    @classmethod
    def gptq(cls, qweight, qzeros, scales, g_idx=None, bias=None, *, bits=4, group_size=128, zero_offset_one=True):
        """GPTQ as in the header: qweight int32 [K*bits/32, N], qzeros int32 [G, N*bits/32],
        scales fp16 [G, N], g_idx int32 [K] (optional), bias fp16 [N]; all on one device."""
        try:
            bits_ok = not isinstance(bits, bool) and operator.index(bits) in (4, 8)
        except TypeError:  # a float 4.0 would pass `in (4, 8)` and fail in ctypes
            bits_ok = False
        if not bits_ok:
            raise invalid("bits must be 4 or 8, got %r" % (bits,))
        bits = operator.index(bits)
        per_word = 32 // bits
        check_tensor(qweight, "qweight", torch.int32, (None, None))
        device = qweight.device
        k, n = qweight.shape[0] * per_word, qweight.shape[1]
        check_tensor(scales, "scales", torch.float16, (None, n), device)
        groups = scales.shape[0]
        if n % per_word:
            raise invalid("out_features (%d) must be a multiple of %d for %d-bit qzeros" % (n, per_word, bits))
        check_tensor(qzeros, "qzeros", torch.int32, (groups, n // per_word), device)
        if g_idx is not None:
            check_tensor(g_idx, "g_idx", torch.int32, (k,), device)
        if bias is not None:
            check_tensor(bias, "bias", torch.float16, (n,), device)
        desc = _lib.lib.qattn_qmatrix_desc_default()
        desc.format = _lib.QMATRIX_GPTQ
        desc.device = device_index(device)
        desc.in_features = k
        desc.out_features = n
        desc.bits = bits
        desc.group_size = as_c_int("group_size", group_size)
        desc.num_groups = groups
        desc.zero_offset_one = 1 if zero_offset_one else 0
        desc.qweight = ptr(qweight)
        desc.qzeros = ptr(qzeros)
        desc.scales = ptr(scales)
        desc.g_idx = ptr(g_idx)
        desc.bias = ptr(bias)
        return cls(desc, torch_device(desc.device), (qweight, qzeros, scales, g_idx, bias))

    @property
    def closed(self):
        return not self._finalizer.alive

    @property
    def handle(self):
        """The qattn_qmatrix* as an int; raises once closed."""
        if self.closed:
            raise invalid("QMatrix is closed")
        return self._handle.value

    def close(self):
        """Destroys the matrix now. Refused while an open Layer uses it."""
        users = [layer for layer in self._users if not layer.closed]
        if users:
            raise invalid("QMatrix is still used by %d open layer(s); close them first" % len(users))
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "closed" if self.closed else "%d -> %d" % (self.in_features, self.out_features)
        return "QMatrix(%s, device=%s)" % (state, self.device)
