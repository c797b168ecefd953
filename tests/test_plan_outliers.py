"""LLM.int8()'s outlier columns given to a plan (`plan.outliers`): the replay with k columns between none and every
one, the counts a real INT8 call makes (`calibrate_int8_outliers`, on a CPU), and the errors a user meets."""

from __future__ import annotations

import json

import pytest
import torch

from xcomp_lab.plan.estimate import estimate
from xcomp_lab.plan.outliers import OutlierColumns, calibrate_int8_outliers, check_int8_outliers, from_counts

TINY = "llama-3-8b:tiny"


def int8_plan(outliers: object) -> tuple[int, int]:
    plan = estimate(TINY, quantization="int8", attn="sdpa", batch=2, prompt_tokens=16, new_tokens=4,
                    int8_outliers=outliers)
    return plan.peak_bytes, plan.reserved_peak_bytes


def test_outlier_columns_from_none_to_every_one() -> None:
    """The allocated peak grows with the outlier columns replayed; every column is the bound a plan without data
    gives (int8_outliers=None), no column is below it."""
    from xcomp_lab.plan.presets import get_preset

    text = get_preset("llama-3-8b").config(tiny=True).get_text_config()
    widths = (text.hidden_size, text.intermediate_size)
    bound = int8_plan(None)
    peaks = [int8_plan(fraction)[0] for fraction in (0.0, 0.25, 0.5, 1.0)]
    assert peaks == sorted(peaks) and peaks[0] < peaks[-1]
    assert int8_plan(1.0) == bound
    every = {phase: {str(w): [3, 3 * w, 3] for w in widths} for phase in ("prefill", "decode")}
    assert int8_plan(every)[0] == bound[0]  # counts of every column: the bound again
    none = {phase: {str(w): [3, 0, 0] for w in widths} for phase in ("prefill", "decode")}
    assert int8_plan(none)[0] == peaks[0]
    # The widest input's columns alone (the MLP's down projection) move the peak.
    some = {phase: {str(widths[0]): [3, 0, 0], str(widths[1]): [2, widths[1], 0]} for phase in ("prefill", "decode")}
    assert peaks[0] < int8_plan(some)[0] < bound[0]


def test_counts_give_the_mean_or_the_largest_per_input() -> None:
    counts = {"prefill": {"64": [4, 100, 1, 64]}, "decode": {"64": [10, 35, 0]}}
    mean, largest = from_counts(counts, "mean"), from_counts(counts)
    assert mean.columns("prefill", 64) == 25 and mean.columns("decode step 3", 64) == 4
    assert largest.columns("prefill", 64) == 64 and largest.columns("decode", 64) == 4  # no 4th number, none all
    assert from_counts({"prefill": {"64": [4, 100, 1]}}).columns("prefill", 64) == 64
    assert mean.columns("vision", 64) == 64 and mean.columns("prefill", 128) == 128  # unknown: every column
    assert OutlierColumns(fraction=0.1).columns("decode", 128) == 13


def test_bad_outlier_settings_say_what_to_do(tmp_path) -> None:
    with pytest.raises(ValueError, match="from 0 to 1"):
        check_int8_outliers(1.5)
    with pytest.raises(ValueError, match="is not a file"):
        check_int8_outliers(str(tmp_path / "missing.json"))
    with pytest.raises(TypeError, match="calibrate_int8_outliers"):
        check_int8_outliers([1, 2])
    with pytest.raises(ValueError, match="at least one input"):
        from_counts({"prefill": {"64": [0, 0, 0]}})
    with pytest.raises(ValueError, match="phase"):
        from_counts({"warmup": {"64": [1, 0, 0]}})
    with pytest.raises(ValueError, match="statistic"):
        from_counts({"prefill": {"64": [1, 0, 0]}}, "median")
    with pytest.raises(ValueError, match="quantization='int8'"):
        estimate(TINY, quantization="nf4", int8_outliers=0.1)
    with pytest.raises(ValueError, match="device='cuda'"):
        estimate(TINY, quantization="int8", device="cpu", int8_outliers=0.1)
    path = tmp_path / "counts.json"
    path.write_text(json.dumps({"prefill": {"64": [2, 10, 0, 8]}, "layers": {"prefill": {"l.0": [1, 3, 0, 3]}}}))
    assert check_int8_outliers(path).columns("prefill", 64) == 8
    assert check_int8_outliers(path, "mean").columns("prefill", 64) == 5
    assert check_int8_outliers(path).columns("prefill", 64, "l.0") == 3  # a file's per-linear counts kept


def test_calibration_counts_a_real_int8_call() -> None:
    """A tiny model loaded in LLM.int8() on the CPU: its norms scaled so that the model's width holds outliers;
    the counts name every quantized linear's input once per forward, by phase and width, and a plan takes them."""
    from xcomp_lab.plan.build import build_model, make_inputs
    from xcomp_lab.plan.presets import get_preset

    text = get_preset("llama-3-8b").config(tiny=True).get_text_config()
    model = build_model("llama-3-8b", tiny=True, dtype="bf16", attn="sdpa", quantization="int8")
    with torch.no_grad():  # the norms before the attention and the MLP scaled: their outputs reach 6.0
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight"):
                param.mul_(100.0)
    with pytest.raises(ValueError, match="load_in_8bit"):
        calibrate_int8_outliers(build_model("llama-3-8b", tiny=True, dtype="bf16", attn="sdpa"), {})
    counts = calibrate_int8_outliers(model, make_inputs("llama-3-8b", batch_size=2, prompt_tokens=16, tiny=True),
                                     new_tokens=3)
    layers, hidden = text.num_hidden_layers, str(text.hidden_size)
    assert set(counts) == {"prefill", "decode", "layers"}
    # q, k, v, o, gate, up at the model's width; down at the MLP's; decode: two steps.
    assert counts["prefill"][hidden][0] == 6 * layers and counts["decode"][hidden][0] == 2 * 6 * layers
    assert counts["prefill"][str(text.intermediate_size)][0] == layers
    inputs, columns, every, most = counts["prefill"][hidden]
    assert 0 < columns <= inputs * text.hidden_size and 0 < most <= text.hidden_size
    assert int8_plan(counts)[0] <= int8_plan(None)[0]


def test_command_takes_outlier_columns(tmp_path, capsys) -> None:
    from xcomp_lab.plan.__main__ import main

    path = tmp_path / "counts.json"
    path.write_text(json.dumps({"prefill": {"64": [12, 120, 0], "128": [2, 100, 0]}}))
    common = ["--model", TINY, "--quantization", "int8", "--batch", "2", "--prompt-tokens", "16", "--new-tokens", "4",
              "--no-inverse", "--json"]
    assert main([*common, "--int8-outliers", str(path)]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert "counts.json" in plan["settings"]["int8_outliers"]
    assert plan["peak_bytes"] < int8_plan(None)[0]
    assert main([*common, "--int8-outliers", "1.5"]) == 2
    assert "from 0 to 1" in capsys.readouterr().err


def test_each_linear_gets_its_own_count() -> None:
    """Per-linear counts ("layers") win over their width's; a linear they lack falls back to its width's count;
    on the tiny model, the counts a real call records per linear give a plan at or below the one with the largest
    of each width given to every linear."""
    counts = {"prefill": {"64": [4, 100, 1, 64]},
              "layers": {"prefill": {"model.layers.0.mlp.down_proj": [1, 5, 0, 5]}}}
    given = from_counts(counts)
    assert given.columns("prefill", 64, "model.layers.0.mlp.down_proj") == 5
    assert given.columns("prefill", 64, "model.layers.1.mlp.down_proj") == 64
    assert from_counts(counts, "mean").columns("prefill", 64, "model.layers.0.mlp.down_proj") == 5
    with pytest.raises(ValueError, match="most in one input"):
        from_counts({"layers": {"prefill": {"model.layers.0.mlp.down_proj": [1, 5, 0]}}})
    with pytest.raises(ValueError, match="phase"):
        from_counts({"layers": {"warmup": {}}})


def test_calibration_counts_each_linear() -> None:
    """The tiny INT8 model's real call: one line per quantized linear and phase, whose inputs add up to the widths'
    lines; the plan with them is at most the plan with each width's largest."""
    from xcomp_lab.plan.build import build_model, make_inputs
    from xcomp_lab.plan.presets import get_preset

    text = get_preset("llama-3-8b").config(tiny=True).get_text_config()
    model = build_model("llama-3-8b", tiny=True, dtype="bf16", attn="sdpa", quantization="int8")
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):  # layers unlike each other: their outliers differ
            layer.post_attention_layernorm.weight.mul_(20.0 * (index + 1))
    counts = calibrate_int8_outliers(model, make_inputs("llama-3-8b", batch_size=2, prompt_tokens=16, tiny=True),
                                     new_tokens=3)
    layers = counts["layers"]
    assert len(layers["prefill"]) == 7 * text.num_hidden_layers
    for phase in ("prefill", "decode"):
        assert sum(line[0] for line in layers[phase].values()) == sum(line[0] for line in counts[phase].values())
        assert sum(line[1] for line in layers[phase].values()) == sum(line[1] for line in counts[phase].values())
    down = [layers["prefill"][f"model.layers.{i}.mlp.down_proj"][3] for i in range(text.num_hidden_layers)]
    assert len(set(down)) > 1, down
    widths_only = {phase: lines for phase, lines in counts.items() if phase != "layers"}
    assert int8_plan(counts)[0] < int8_plan(widths_only)[0] <= int8_plan(None)[0]
