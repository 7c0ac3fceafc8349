"""RoPE sin/cos tables in the layout the library reads: fp32 [max_positions, rotary_dim/2]."""
import torch

from .errors import invalid


def default_inv_freq(rotary_dim, base=10000.0):
    """inv_freq[i] = base^(-2i / rotary_dim), float64 [rotary_dim / 2]."""
    if not isinstance(rotary_dim, int) or rotary_dim <= 0 or rotary_dim % 2:
        raise invalid("rotary_dim must be a positive even int, got %r" % (rotary_dim,))
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    return 1.0 / (float(base) ** exponent)


def rope_tables(inv_freq, max_positions, *, attention_scaling=1.0, device=None):
    """(sin, cos) fp32 [max_positions, len(inv_freq)]: angle[p, i] = p * inv_freq[i] in
    float64, times attention_scaling (as Hugging Face rotary embeddings scale them)."""
    if not isinstance(max_positions, int) or max_positions <= 0:
        raise invalid("max_positions must be a positive int, got %r" % (max_positions,))
    inv_freq = torch.as_tensor(inv_freq)
    if inv_freq.dim() != 1 or inv_freq.numel() == 0:
        raise invalid("inv_freq must be a non-empty 1-D tensor, got shape %s" % list(inv_freq.shape))
    if device is None:
        device = inv_freq.device
    inv = inv_freq.detach().to("cpu", torch.float64)
    angle = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv)
    sin = (torch.sin(angle) * attention_scaling).to(device=device, dtype=torch.float32).contiguous()
    cos = (torch.cos(angle) * attention_scaling).to(device=device, dtype=torch.float32).contiguous()
    return sin, cos
