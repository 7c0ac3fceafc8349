"""`python -m qattn bench`: how many layers it cycles to keep L2 cold, and one run
of every code path on the CPU reference backend (--tiny: the timings mean nothing)."""
import json
import math

from qattn import bench


def _eight_b_cases():
    cases, sweep = bench.make_cases(False)
    return [c for c in cases.values() if c.shape == "8B"] + sweep


def test_each_timed_loop_moves_several_times_the_l2():
    shape, cases = bench.FULL_SHAPES["8B"], _eight_b_cases()
    smallest = min(bench.traffic(shape, c)["bytes"][part] for c in cases for part in bench.timed_parts(c))
    # forward2 at one row is the smallest part: the O projection's packed weights.
    assert smallest == bench.traffic(shape, bench.make_cases(False)[0]["D1"])["bytes"]["f2"]
    for l2 in (50 << 20, 60 << 20, 62914560, 256 << 20):
        layers = bench.layers_to_cycle(shape, cases, l2)
        assert layers * smallest >= bench.L2_CYCLES * l2 > (layers - 1) * smallest
        # Then no case notes a loop under twice the L2.
        assert not any(bench.l2_notes(shape, c, layers, l2) for c in cases)
    assert bench.layers_to_cycle(shape, cases, 50 << 20) == 18  # H100
    assert bench.layers_to_cycle(shape, cases, 62914560) == 22  # H200
    # A small L2, or none known (the CPU), leaves the floor of 8 layers.
    assert bench.layers_to_cycle(shape, cases, 4 << 20) == bench.LEAST_LAYERS
    assert bench.layers_to_cycle(shape, cases, None) == bench.LEAST_LAYERS
    # With 8 layers on an H200 the notes say what the counting avoids.
    d1 = bench.make_cases(False)[0]["D1"]
    assert any("f2 cycles" in n for n in bench.l2_notes(shape, d1, 8, 62914560))


def test_timed_parts():
    cases, sweep = bench.make_cases(False)
    assert bench.timed_parts(cases["D1"]) == ("f1", "f2", "block")
    assert bench.timed_parts(cases["D16-paged"]) == ("block",)
    assert all(bench.timed_parts(c) == ("block",) for c in sweep)


def test_tiny_run_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--device", "cpu", "--tiny", "--cases", "D1,D1-paged", "--json", str(out),
                "--plot", str(tmp_path / "bench.png")])
    printed = capsys.readouterr().out
    assert "layers cycled: 2;" in printed and "built 2 8B layers" in printed and "results written to" in printed
    report = json.loads(out.read_text())
    assert report["settings"]["layers_cycled"] == {"8B": 2}
    assert report["memory_per_layer"] == {"8B": None}  # measured on CUDA devices only
    by_name = {c["name"]: c for c in report["cases"]}
    assert set(by_name) == {"D1", "D1-paged"}
    for case in by_name.values():
        assert case["error"] is None, case["error"]
        block = case["time"]["qattn_block_eager"]
        assert block is not None and math.isfinite(block["median_us"]) and block["median_us"] > 0
    assert by_name["D1"]["time"]["qattn_f2_eager"] is not None
    assert by_name["D1-paged"]["time"].get("qattn_f2_eager") is None
    # The accuracy bound: the block output no worse than 1.5x PyTorch's fp16 layer.
    for name in ("D1", "D1-paged"):
        acc = report["accuracy"][name]
        assert acc["qattn_output_rel_err"] < 3e-3 and acc["output_ratio"] <= 1.5, acc
