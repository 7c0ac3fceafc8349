"""python -m qattn info | check | bench [args]"""
import sys

import torch

import qattn


def info():
    print("qattn %s (library %s)" % (qattn.version(), qattn.library_path()))
    print("build: %s" % qattn.build_info())
    count = qattn.cuda_device_count()
    print("CUDA devices usable by qattn: %d" % count)
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print("  cuda:%d %s, sm_%d%d, %.1f GiB" % (i, p.name, p.major, p.minor, p.total_memory / 2**30))
    print("torch %s (CUDA %s)" % (torch.__version__, torch.version.cuda or "none"))
    print("attention backends available: %s (default on CUDA: %s)"
          % (", ".join(qattn.attention.available_backends()), qattn.attention.default_backend()))
    return 0


def _pack(values, bits, dim):
    """Packs unsigned values along `dim` into int32 words, value j of a word in bits j*bits.."""
    per_word = 32 // bits
    v = values.to(torch.int64).movedim(dim, 0)
    v = v.reshape(v.shape[0] // per_word, per_word, *v.shape[1:])
    words = sum(v[:, j] << (bits * j) for j in range(per_word)) & 0xFFFFFFFF
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(0, dim).contiguous()


def _random_gptq(k, n, group_size, gen):
    """4-bit act-order GPTQ (classic zero - 1 storage) and its float64 W [K, N]."""
    groups = k // group_size
    q = torch.randint(0, 16, (k, n), generator=gen)
    z = torch.randint(1, 16, (groups, n), generator=gen)
    scales = ((torch.rand(groups, n, generator=gen) + 0.5) * (2.0 / (15 * k**0.5))).half()
    g_idx = (torch.arange(k) // group_size)[torch.randperm(k, generator=gen)]
    w = scales.double()[g_idx] * (q - z[g_idx]).double()
    return (_pack(q, 4, 0), _pack(z - 1, 4, 1), scales, g_idx.to(torch.int32)), w


def _rms(x, w, eps):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _neox(t, sin, cos):
    half = t.shape[-1] // 2
    a, b = t[..., :half], t[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def check():
    use_cuda = torch.cuda.is_available() and qattn.cuda_device_count() > 0
    device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    H, NH, NKV, D, batch, q_len, group, rank, eps = 256, 8, 2, 32, 2, 5, 32, 8, 1e-6
    gen = torch.Generator().manual_seed(0)
    print("qattn %s, %s; checking on %s" % (qattn.version(), qattn.build_info(), device))
    print("layer: H=%d NH=%d NKV=%d D=%d, GPTQ 4-bit act-order (group %d) on q/k/v/o, RMSNorm, "
          "q/k RMS head norms, NeoX RoPE, LoRA rank %d on q and o; batch %d x q_len %d" % (H, NH, NKV, D, group, rank,
                                                                                        batch, q_len))

    mats, w = {}, {}
    for name, (k, n) in {"q": (H, NH * D), "k": (H, NKV * D), "v": (H, NKV * D), "o": (NH * D, H)}.items():
        tensors, w[name] = _random_gptq(k, n, group, gen)
        mats[name] = qattn.QMatrix.gptq(*(t.to(device) for t in tensors), bits=4, group_size=group)
    norm_w = {name: (1 + 0.3 * torch.randn(width, generator=gen)).half() for name, width in
              (("input", H), ("q", D), ("k", D))}
    lora = {p: ((torch.randn(k, rank, generator=gen) / k**0.5).half(), (0.3 * torch.randn(rank, n, generator=gen)).half())
            for p, (k, n) in (("q", (H, NH * D)), ("o", (NH * D, H)))}
    sin, cos = qattn.rope_tables(qattn.default_inv_freq(D), 64, device=device)
    x = (torch.randn(batch, q_len, H, generator=gen)).half().to(device)
    x_in = x.cpu().double()

    with qattn.Layer(hidden_size=H, num_heads=NH, num_kv_heads=NKV, head_dim=D, q_proj=mats["q"], k_proj=mats["k"],
                     v_proj=mats["v"], o_proj=mats["o"], input_norm=qattn.Norm("rms", norm_w["input"].to(device), eps=eps),
                     q_norm=qattn.Norm("rms", norm_w["q"].to(device), eps=eps),
                     k_norm=qattn.Norm("rms", norm_w["k"].to(device), eps=eps), rope="neox",
                     max_rows=batch * q_len, max_seq_len=64) as layer:
        layer.set_loras([qattn.LoRA(1, p, a.to(device), b.to(device)) for p, (a, b) in lora.items()])
        q, k, v = layer.forward1(x, sin=sin, cos=cos, loras=[1])
        # Attention as a caller would run it: torch SDPA, causal, KV heads shared by groups.
        qt, kt, vt = (t.transpose(1, 2).float() for t in (q, k, v))
        kt, vt = (t.repeat_interleave(NH // NKV, dim=1) for t in (kt, vt))
        attn = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        attn = attn.transpose(1, 2).half().contiguous()
        layer.forward2(x, attn, loras=[1])
    for m in mats.values():
        m.close()

    # float64 reference, from the math of DESIGN.md.
    def proj(name, inp):
        y = inp @ w[name]
        if name in lora:
            a, b = lora[name]
            y = y + (inp @ a.double()) @ b.double()
        return y

    n = _rms(x_in, norm_w["input"].double(), eps)
    s, c = sin.cpu().double()[:q_len, None, :], cos.cpu().double()[:q_len, None, :]
    rq = _neox(_rms(proj("q", n).reshape(batch, q_len, NH, D), norm_w["q"].double(), eps), s, c)
    rk = _neox(_rms(proj("k", n).reshape(batch, q_len, NKV, D), norm_w["k"].double(), eps), s, c)
    rv = proj("v", n).reshape(batch, q_len, NKV, D)
    kk, vv = (t.repeat_interleave(NH // NKV, dim=2) for t in (rk, rv))
    scores = torch.einsum("bqhd,bkhd->bhqk", rq, kk) / D**0.5
    scores = scores.masked_fill(torch.ones(q_len, q_len, dtype=torch.bool).triu(1), float("-inf"))
    r_attn = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), vv).reshape(batch, q_len, NH * D)
    rx = x_in + proj("o", r_attn)

    def rel(out, ref):
        return float((out.cpu().double().reshape(ref.shape) - ref).norm() / ref.norm())

    # fp16 outputs (~3e-4 rounding); the new x also carries fp16 q/k/v and the fp16
    # attention output through the O projection.
    results = [("q (forward1)", rel(q, rq), 3e-3), ("k (forward1)", rel(k, rk), 3e-3),
               ("v (forward1)", rel(v, rv), 3e-3), ("x (forward2, after SDPA)", rel(x, rx), 5e-3)]
    ok = True
    for name, err, tol in results:
        good = err < tol
        ok &= good
        print("  %-26s relative error %.2e (tolerance %.0e) %s" % (name, err, tol, "ok" if good else "FAILED"))
    print("check %s" % ("passed" if ok else "FAILED"))
    return 0 if ok else 1


def bench(argv):
    try:
        from . import bench as module
    except ModuleNotFoundError as e:
        if e.name != "qattn.bench":
            raise
        print("qattn bench: the benchmark module (qattn/bench.py) is not part of this installation", file=sys.stderr)
        return 2
    return module.main(argv)


USAGE = "usage: python -m qattn {info | check | bench [args...]}"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "info":
        return info()
    if command == "check":
        return check()
    if command == "bench":
        return bench(rest)
    print("qattn: unknown command %r\n%s" % (command, USAGE), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
