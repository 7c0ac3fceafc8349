"""Scratch: per-call device memory that layers of one device share (qattn_scratch)."""
import ctypes
import weakref

import torch

from . import _lib
from ._tensors import device_index, torch_device
from .errors import check, invalid


class Scratch:
    """Layers created with one Scratch (Layer(scratch=...)) share their per-call
    device memory, sized for the largest of them, instead of holding one each:
    a model whose layers run one after another needs one layer's worth. Such
    layers must never run at the same time (one stream, or streams the caller
    orders, one thread at a time). Creating a layer with it or set_loras on one
    may grow it: graphs captured before must be captured again. Its memory goes
    with the last of its layers; on the CPU it holds nothing."""

    def __init__(self, device):
        index = device_index(torch.device(device))
        handle = ctypes.c_void_p()
        check(_lib.lib.qattn_scratch_create(index, ctypes.byref(handle)))
        self.device = torch_device(index)
        self._handle = handle
        self._finalizer = weakref.finalize(self, _lib.lib.qattn_scratch_destroy, handle)

    @property
    def handle(self):
        """The qattn_scratch* as an int; raises once closed."""
        if not self._finalizer.alive:
            raise invalid("Scratch is closed")
        return self._handle.value

    def close(self):
        """Gives up this handle; layers made with it keep the memory they share."""
        self._finalizer()

    def __repr__(self):
        return "Scratch(%s%s)" % (self.device, "" if self._finalizer.alive else ", closed")
