"""Notebook 05's helpers: the report of the two-GPU run against its prediction, the map it recorded, and the
offloaded caption's activations taken apart."""

from __future__ import annotations

from pathlib import Path

import pytest

from xcomp_lab.core.jsonl import read_jsonl
from xcomp_lab.lessons.device_map import offload_effect, split_layers, split_report
from xcomp_lab.memory import MemoryResult

SPLIT = Path(__file__).resolve().parent.parent / "results" / "full-h100x2" / "split.jsonl"
MIB = 2**20


def test_split_report_reads_the_committed_two_gpu_run():
    records = read_jsonl(SPLIT)
    lines = split_report(SPLIT).splitlines()
    splits = [r for r in records if r["kind"] == "split"]
    assert [line.split(":")[0] for line in lines] == [r["case"] for r in splits]
    for line, r in zip(lines, splits):
        for c in r["cards"].values():
            assert f"x{c['measured_over_predicted']:.3f}" in line
            assert abs(c["measured_over_predicted"] - 1) < 0.03  # the goal, per card
        assert "one card:" in line


def test_split_layers_reads_the_map_the_load_made():
    layers = split_layers(SPLIT)  # FP32
    recorded = next(r for r in read_jsonl(SPLIT) if r["kind"] == "split" and r["dtype"] == "float32")["device_map"]
    assert {card: len(v) for card, v in layers.items()} == {
        card: sum(1 for k, d in recorded.items() if k.startswith("model.layers.") and int(d) == card) for card in (0, 1)}
    assert sorted(layers) == [0, 1]
    assert sorted(layers[0] + layers[1]) == list(range(32))  # every decoder layer once, whole
    assert max(layers[0]) < min(layers[1])  # filled in order
    with pytest.raises(ValueError, match="no split run of dtype='bfloat16'"):
        split_layers(SPLIT, dtype="bfloat16")


def test_split_report_says_how_to_make_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="gpu_split_run --out"):
        split_report(tmp_path / "split.jsonl")


def memory(start: int, weights: int, peak: int, end: int, kv: int = MIB) -> MemoryResult:
    """A CUDA-style result: activations as `measure` computes them (less what was allocated at the start)."""
    activations = max(peak - weights - kv - max(start - weights, 0), 0)
    return MemoryResult(device="cuda:0", kind="cuda-allocator", label="t", start_bytes=start, peak_bytes=peak,
                        end_bytes=end, reserved_peak_bytes=None, weights_bytes=weights, kv_cache_bytes=kv,
                        activations_bytes=activations, budget_bytes=None, wall_s=0.0, oom=False, error=None)


def test_offload_effect_explains_a_negative_difference():
    # The reference is the process's first call: it makes a 33 MiB workspace inside its measurement and keeps it;
    # the offloaded run finds it allocated at its start. Weights in flight add nothing at the peak.
    reference = memory(start=100 * MIB, weights=100 * MIB, peak=(100 + 1 + 750 + 33) * MIB, end=133 * MIB)
    offloaded = memory(start=(60 + 33) * MIB, weights=60 * MIB, peak=(60 + 33 + 1 + 750) * MIB, end=93 * MIB)
    lines = offload_effect(reference, offloaded, largest_weight_bytes=112 * MIB, seen_weight_bytes=112 * MIB).splitlines()
    assert lines[0] == "activations, offloaded minus reference: -33.00 MiB"
    assert "reference 0.0 KiB, offloaded 33.00 MiB" in lines[1]
    assert "ended 33.00 MiB above its start" in lines[2]
    assert lines[3] == "corrected for what each run found allocated: 0.0 KiB"
    assert lines[-1].startswith("the weights in flight did not raise the peak")


def test_offload_effect_sees_weights_in_flight_or_says_it_cannot():
    reference = memory(start=100 * MIB, weights=100 * MIB, peak=851 * MIB, end=100 * MIB)
    offloaded = memory(start=60 * MIB, weights=60 * MIB, peak=(811 + 112) * MIB, end=60 * MIB)
    raised = offload_effect(reference, offloaded, largest_weight_bytes=112 * MIB, seen_weight_bytes=112 * MIB)
    assert raised.splitlines()[-1].startswith("the weights in flight raised the peak by 112.00 MiB")
    blind = offload_effect(reference, offloaded, largest_weight_bytes=112 * MIB, seen_weight_bytes=0)
    assert "says nothing about the weights in flight" in blind.splitlines()[-1]
    lower = memory(start=60 * MIB, weights=60 * MIB, peak=700 * MIB, end=60 * MIB)
    assert "not the weights in flight" in offload_effect(reference, lower, largest_weight_bytes=112 * MIB,
                                                         seen_weight_bytes=1).splitlines()[-1]
    with pytest.raises(ValueError, match="seen_weight_bytes"):
        offload_effect(reference, offloaded, largest_weight_bytes=112 * MIB, seen_weight_bytes=-1)


def test_cut_modules_names_the_layers_a_map_cuts():
    import torch

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

    from xcomp_lab.lessons.device_map import cut_modules

    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([Block(), Block()])
    device_map = {"layers.0": 0, "layers.1.a": 0, "layers.1.b": 1}
    assert cut_modules(model, device_map, ["Block"]) == ["layers.1"]
    assert cut_modules(model, {"layers": 0}, ["Block"]) == []
    with pytest.raises(ValueError, match="classes is empty"):
        cut_modules(model, device_map, [])


@pytest.mark.parametrize("max_memory, balanced", [({0: "24GB", 1: "24GB"}, True), ({0: "24GB", "cpu": "64GiB"}, False),
                                                  ({0: "31GB", 1: "2GB"}, False)])
def test_plan_original_makes_the_estimators_map(max_memory, balanced):
    """The original's planner (accelerate's calls without the replica's estimator) gives the map and the lines
    `estimate.plan_device_map` gives, on the replica's full model built on the meta device."""
    from xcomp_lab.estimate import meta_model, plan_device_map
    from xcomp_lab.lessons.device_map import plan_original

    model = meta_model("full", "float32")
    ours = plan_original(model, max_memory, dtype="float32", balanced=balanced)
    theirs = plan_device_map(model, max_memory, dtype="float32", balanced=balanced)
    assert ours.device_map == theirs.device_map
    assert ours.describe() == theirs.describe()
    with pytest.raises(ValueError, match="max_memory is empty"):
        plan_original(model, {})
