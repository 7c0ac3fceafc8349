"""GPTQ packing of random weights, written from the format in include/qattn.h
(independent of the library), for the tests and the Hugging Face parity tests."""
import torch


def _to_int32(words):
    """int64 holding unsigned 32-bit words -> int32 with the same bits."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_along_rows(values, bits):
    """[K, N] unsigned values -> int32 [K*bits/32, N]; row r*per_word + j in bits j*bits.."""
    per_word = 32 // bits
    k, n = values.shape
    assert k % per_word == 0
    v = values.to(torch.int64).reshape(k // per_word, per_word, n)
    words = torch.zeros(k // per_word, n, dtype=torch.int64)
    for j in range(per_word):
        words |= v[:, j, :] << (bits * j)
    return _to_int32(words)


def pack_along_cols(values, bits):
    """[G, N] unsigned values -> int32 [G, N*bits/32], packed along N the same way."""
    return pack_along_rows(values.t().contiguous(), bits).t().contiguous()


def unpack_along_rows(words, bits):
    per_word = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    parts = [(w >> (bits * j)) & ((1 << bits) - 1) for j in range(per_word)]
    return torch.stack(parts, dim=1).reshape(w.shape[0] * per_word, w.shape[1])


def unpack_along_cols(words, bits):
    return unpack_along_rows(words.t().contiguous(), bits).t().contiguous()


def dequantize_gptq(qweight, qzeros, scales, g_idx, bits, zero_offset_one=True, group_size=128):
    """float64 W [K, N] (x @ W layout) of a GPTQ matrix: scales[g, n] * (q[k, n] - z[g, n])."""
    q = unpack_along_rows(qweight.cpu(), bits)
    z = unpack_along_cols(qzeros.cpu(), bits) + (1 if zero_offset_one else 0)
    k = q.shape[0]
    g = g_idx.cpu().long() if g_idx is not None else torch.arange(k) // group_size
    return scales.cpu().double()[g] * (q - z[g]).double()


def random_gptq(k, n, *, bits=4, group_size=128, act_order=False, zero_offset_one=True, generator=None,
                g_idx=None):
    """Random GPTQ tensors (CPU) and their float64 dequantized W [K, N], built from the
    unpacked values (not from the packed words). Scales are chosen so that x @ W keeps
    the scale of x. Under act-order, g_idx is a random permutation of the group ids,
    unless one is given (matrices of one input quantized together share theirs)."""
    maxq = (1 << bits) - 1
    groups = (k + group_size - 1) // group_size
    q = torch.randint(0, maxq + 1, (k, n), generator=generator)
    # With the offset, stored = z - 1 must stay in [0, maxq], so z >= 1.
    low = 1 if zero_offset_one else 0
    z = torch.randint(low, maxq + 1, (groups, n), generator=generator)
    scales = ((torch.rand(groups, n, generator=generator) + 0.5) * (2.0 / (maxq * k**0.5))).half()
    if g_idx is None:
        g_idx = torch.arange(k) // group_size
        if act_order:
            g_idx = g_idx[torch.randperm(k, generator=generator)]
    w = scales.double()[g_idx] * (q - z[g_idx]).double()
    stored_z = z - 1 if zero_offset_one else z
    return {
        "qweight": pack_along_rows(q, bits),
        "qzeros": pack_along_cols(stored_z, bits),
        "scales": scales,
        "g_idx": g_idx.to(torch.int32),
        "bits": bits,
        "group_size": group_size,
        "zero_offset_one": zero_offset_one,
        "w": w,
    }
