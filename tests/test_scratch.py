"""Layers sharing one qattn.Scratch: each gives what it gives alone (against the
float64 reference), whatever ran before it on the scratch (layers of other
widths, small and large row counts, LoRA that grew the scratch, graphs), and a
bad scratch is refused with a clear error."""
import dataclasses

import pytest
import torch

import qattn
from layer_case import Spec, assert_close, build, reference, run
from test_lora import make_adapters

GPTQ = dict(bits=4, group_size=32)
# Three widths (Q|K|V 512, 384, 640 columns) and both weight formats; 40 and 60
# rows take the CUDA backend's large-row path, 1 and 16 the small-row one.
SPECS = [
    Spec(hidden=128, heads=4, kv_heads=2, head_dim=64, gptq=GPTQ, max_rows=60),
    Spec(hidden=256, heads=8, kv_heads=2, head_dim=32, head_norm="rms", biases=True, max_rows=40,
         gptq=dict(GPTQ, act_order=True)),
    Spec(hidden=192, heads=6, kv_heads=2, head_dim=64, post_norm="rms", max_rows=60),
]
ROWS = [(1, 1), (2, 30), (16, 1), (1, 1), (3, 20), (1, 1)]


def _run_all(layers, device, gen, rows=ROWS, lora_ids=None):
    for batch, q_len in rows:
        for spec, (layer, ref) in layers:
            if batch * q_len > spec.max_rows:
                continue
            ids = lora_ids.get(id(layer), ()) if lora_ids else ()
            out, ctx = run(spec, layer, device, gen, batch=batch, q_len=q_len, past_len=3, lora_ids=ids)
            assert_close(out, reference(ref, ctx))


def test_layers_sharing_a_scratch_match_the_reference(device, gen):
    scratch = qattn.Scratch(device)
    layers = [(spec, build(spec, device, gen, scratch=scratch)) for spec in SPECS]
    _run_all(layers, device, gen)


def test_lora_grows_a_shared_scratch(device, gen):
    scratch = qattn.Scratch(device)
    layers = [(spec, build(spec, device, gen, scratch=scratch)) for spec in SPECS]
    _run_all(layers, device, gen, rows=[(2, 30), (1, 1)])
    # Adapters on the middle layer only: its fp32 sums and LoRA temporaries grow
    # the scratch the others share.
    spec, (layer, ref) = layers[1]
    loras, ref_loras = make_adapters(spec, gen, device, [(3, "q", 8), (3, "v", 4), (4, "o", 16)])
    layer.set_loras(loras)
    layers[1] = (spec, (layer, dataclasses.replace(ref, loras=ref_loras)))
    _run_all(layers, device, gen, lora_ids={id(layer): (3, 4)})


def test_layers_outlive_the_scratch_handle(device, gen):
    scratch = qattn.Scratch(device)
    layers = [(spec, build(spec, device, gen, scratch=scratch)) for spec in SPECS[:2]]
    scratch.close()
    with pytest.raises(qattn.QattnError, match="Scratch is closed"):
        scratch.handle
    _run_all(layers, device, gen, rows=[(1, 1), (2, 20)])


def test_bad_scratch_is_refused(device, gen):
    spec = SPECS[0]
    with pytest.raises(qattn.QattnError, match="scratch must be a qattn.Scratch"):
        build(spec, device, gen, scratch="shared")
    closed = qattn.Scratch(device)
    closed.close()
    with pytest.raises(qattn.QattnError, match="Scratch is closed"):
        build(spec, device, gen, scratch=closed)
    other = torch.device("cpu") if device.type == "cuda" else torch.device("cuda", 0)
    if other.type == "cuda" and qattn.cuda_device_count() == 0:
        with pytest.raises(qattn.QattnError) as info:
            qattn.Scratch(other)
        assert info.value.status == "QATTN_ERROR_NOT_SUPPORTED" and "CUDA device 0" in str(info.value)
        return
    with pytest.raises(qattn.QattnError, match="config.scratch belongs to device"):
        build(spec, device, gen, scratch=qattn.Scratch(other))


CUDA = pytest.mark.skipif(not torch.cuda.is_available() or qattn.cuda_device_count() == 0,
                          reason="needs a CUDA device and a qattn build with the CUDA backend")


@CUDA
def test_graphs_of_layers_sharing_a_scratch(gen):
    # The library's own graphs follow the scratch when a later layer grows it.
    device = torch.device("cuda", 0)
    scratch = qattn.Scratch(device)
    first = dataclasses.replace(SPECS[0], max_rows=20, use_graphs=True)
    layers = [(first, build(first, device, gen, scratch=scratch))]
    _run_all(layers, device, gen, rows=[(1, 1), (2, 10)])
    layers += [(spec, build(spec, device, gen, scratch=scratch)) for spec in SPECS]  # grows the buffers
    _run_all(layers, device, gen, rows=[(1, 1), (2, 10), (1, 1)])


@CUDA
def test_shared_scratch_takes_one_layers_worth(gen):
    device = torch.device("cuda", 0)
    spec = Spec(hidden=1024, heads=8, kv_heads=2, head_dim=128, gptq=dict(bits=4, group_size=128), max_rows=2048)

    def memory_of(count, shared):
        torch.cuda.synchronize()
        weights = [build(spec, device, gen) for _ in range(count)]  # made first: only the layers are measured
        mats = [(l._projections, l) for l, _ in weights]
        torch.cuda.synchronize()
        free = torch.cuda.mem_get_info()[0]
        scratch = qattn.Scratch(device) if shared else None
        layers = [qattn.Layer(hidden_size=spec.hidden, num_heads=spec.heads, num_kv_heads=spec.kv_heads,
                              head_dim=spec.head_dim, q_proj=p[0], k_proj=p[1], v_proj=p[2], o_proj=p[3],
                              max_rows=spec.max_rows, max_seq_len=64, rope=None, scratch=scratch)
                  for p, _ in mats]
        torch.cuda.synchronize()
        used = free - torch.cuda.mem_get_info()[0]
        del layers, weights, mats
        return used

    memory_of(1, False)  # the device's cuBLAS handle, made with its first layer
    one = memory_of(1, False)
    six_shared = memory_of(6, True)
    assert six_shared < 2 * one, "one layer %.1f MiB, six sharing %.1f MiB" % (one / 2**20, six_shared / 2**20)
