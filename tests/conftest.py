import pytest
import torch

import qattn


def _cuda_reason():
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    if qattn.cuda_device_count() == 0:
        return "this qattn build has no CUDA backend or no usable CUDA device (%s)" % qattn.build_info()
    return None


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    if request.param == "cuda":
        reason = _cuda_reason()
        if reason:
            pytest.skip(reason)
        return torch.device("cuda", 0)
    return torch.device("cpu")


@pytest.fixture
def gen():
    """A seeded CPU generator: tests draw on the CPU and move tensors to the device."""
    return torch.Generator().manual_seed(1234)
