"""The planner's presets and random-weight builds: published sizes, from_pretrained's exact result, VLM inputs."""

from __future__ import annotations

import json
import tempfile

import pytest
import torch

from xcomp_lab.core.jsonl import read_jsonl
from xcomp_lab.plan import validate
from xcomp_lab.plan.build import (
    build_model,
    image_token_count,
    make_inputs,
    model_class,
    quantization_config,
)
from xcomp_lab.plan.presets import get_preset, preset_names
from xcomp_lab.tools import plan_matrix

# The parameter counts the Hub shows for each published checkpoint ("Model size"), in billions, two decimals.
PUBLISHED_BILLIONS = {"llama-3-8b": 8.03, "qwen2.5-7b": 7.62, "mistral-7b-v0.3": 7.25, "gemma-2-9b": 9.24,
                      "phi-3-mini-4k": 3.82, "qwen2-vl-7b": 8.29, "llava-1.5-7b": 7.06, "idefics3-8b": 8.46}


def test_presets_have_the_published_sizes() -> None:
    assert sorted(PUBLISHED_BILLIONS) == sorted(preset_names())
    for name, billions in PUBLISHED_BILLIONS.items():
        config = get_preset(name).config()
        with torch.device("meta"):
            model = model_class(config).from_config(config)
        assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == billions, name


def test_unknown_preset_lists_the_names() -> None:
    with pytest.raises(ValueError, match="llama-3-8b.*idefics3-8b"):
        get_preset("llama-4")
    with pytest.raises(ValueError, match="language model"):
        get_preset("mistral-7b-v0.3").processor_settings()


@pytest.mark.parametrize("dtype, quantization, attn", [("fp8", "none", "sdpa"), ("bf16", "int4", "sdpa"),
                                                        ("bf16", "none", "flash")])
def test_bad_settings_are_refused(dtype: str, quantization: str, attn: str) -> None:
    with pytest.raises(ValueError, match="choose one of"):
        build_model("llama-3-8b", tiny=True, dtype=dtype, quantization=quantization, attn=attn)


def _layout(model: torch.nn.Module) -> dict[str, tuple]:
    """Every parameter's and buffer's class, dtype, shape and device, with its bitsandbytes statistics."""
    out = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        row: tuple = (type(tensor).__name__, tensor.dtype, tuple(tensor.shape), str(tensor.device))
        if getattr(tensor, "SCB", None) is not None:  # LLM.int8(): one scale per output row
            row += (tensor.SCB.dtype, tuple(tensor.SCB.shape), float(tensor.SCB.sum()))
        state = getattr(tensor, "quant_state", None)
        if state is not None:  # NF4: absmax per block, itself quantized (double quantization)
            row += (state.quant_type, state.blocksize, state.dtype, tuple(state.shape), state.absmax.dtype,
                    tuple(state.absmax.shape), state.nested, state.state2.absmax.dtype,
                    tuple(state.state2.absmax.shape), float(state.offset))
        out[name] = row
    return out


# Every architecture quantized both ways; unquantized for one LLM and one VLM (the loader's plain path is shared).
@pytest.mark.parametrize("name, quantization", [(name, q) for name in preset_names() for q in ("int8", "nf4")]
                         + [("mistral-7b-v0.3", "none"), ("qwen2-vl-7b", "none")])
def test_build_leaves_what_from_pretrained_leaves(name: str, quantization: str) -> None:
    built = build_model(name, tiny=True, dtype="bf16", attn="eager", quantization=quantization)
    plain = build_model(name, tiny=True, dtype="bf16", attn="eager")
    with tempfile.TemporaryDirectory() as folder:
        plain.save_pretrained(folder)
        loaded = type(plain).from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="eager",
                                             quantization_config=quantization_config(quantization, "bf16"),
                                             device_map="cpu")
    assert {n: type(m).__name__ for n, m in built.named_modules()} == \
        {n: type(m).__name__ for n, m in loaded.named_modules()}
    assert _layout(built) == _layout(loaded)
    if quantization != "none":
        assert any(type(m).__name__ in ("Linear8bitLt", "Linear4bit") for m in built.modules())


def test_weights_do_not_share_storage() -> None:
    model = build_model("llama-3-8b", tiny=True, dtype="fp32", attn="eager")
    pointers = [p.data_ptr() for p in model.parameters()]
    assert len(set(pointers)) == len(pointers)


@pytest.mark.parametrize("name, image_size, tokens", [
    ("qwen2-vl-7b", 448, (448 // 14) ** 2 // 2 ** 2),  # patches merged 2x2
    ("qwen2-vl-7b", 300, (308 // 14) * (308 // 14) // 4),  # sides rounded to 28 px
    ("llava-1.5-7b", 336, (336 // 14) ** 2),  # the CLS token dropped ("default" strategy)
    ("idefics3-8b", 364, (4 * 4 + 1) * 169),  # resized to 1456 px: 4x4 tiles and the global view
])
def test_image_tokens_as_the_processor_counts_them(name: str, image_size: int, tokens: int) -> None:
    assert image_token_count(name, image_size) == tokens


def test_inputs_fill_the_prompt_and_avoid_special_ids() -> None:
    config = get_preset("llava-1.5-7b").config(tiny=True)
    inputs = make_inputs("llava-1.5-7b", batch_size=3, prompt_tokens=40, tiny=True, seed=1)
    assert inputs["input_ids"].shape == (3, 40) and inputs["pixel_values"].shape == (3, 3, 56, 56)
    ids = inputs["input_ids"][0]
    assert int((ids == config.image_token_id).sum()) == 16
    assert not set(ids[:24].tolist()) & {config.image_token_id, 1, 2, 0}
    assert torch.equal(inputs["input_ids"], make_inputs("llava-1.5-7b", batch_size=3, prompt_tokens=40, tiny=True,
                                                        seed=1)["input_ids"])
    with pytest.raises(ValueError, match="cannot hold the 16 tokens"):
        make_inputs("llava-1.5-7b", batch_size=1, prompt_tokens=16, tiny=True)
    with pytest.raises(ValueError, match="language model"):
        make_inputs("llama-3-8b", batch_size=1, prompt_tokens=16, image_size=224, tiny=True)


def test_matrix_tool_on_one_tiny_preset(tmp_path) -> None:
    plan_matrix.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--presets", "qwen2-vl-7b",
                      "--quantizations", "none", "--attns", "sdpa", "--batches", "1", "2", "--text-tokens", "8",
                      "--new-tokens", "2", "--workers", "0"])
    records = read_jsonl(tmp_path / plan_matrix.RECORDS)
    assert [r["batch"] for r in records] == [1, 2]
    for record in records:
        assert record["prompt_tokens"] == 8 + 6 and record["image_tokens"] == 4  # 4 image tokens + 2 markers
        assert record["start_allocated"] == record["weights_bytes"] and not record["oom"]
        assert set(record["phases"]) == {"prefill", "vision", "decode"}
        assert record["allocated_peak"] == max(p["allocated"] for p in record["phases"].values())
    assert records[1]["allocated_peak"] > records[0]["allocated_peak"]
    assert json.loads((tmp_path / plan_matrix.ENV).read_text())["runs"][0]["device"] == "cpu"
    plan_matrix.main(["--compare", "--out", str(tmp_path)])  # the one comparison, plan.validate's, and the chart
    rows = read_jsonl(tmp_path / plan_matrix.COMPARE)  # the planner on the CPU predicts the CPU accounting exactly
    assert [(r["measured_allocated"], r["error_allocated"]) for r in rows] == \
        [(r["allocated_peak"], 0.0) for r in records]
    assert (tmp_path / plan_matrix.CHART).stat().st_size > 0
    (line,) = validate.matrix_summary(rows)
    assert (line["group"], line["calls"], line["not_predicted"], line["median_allocated"], line["worst_allocated"],
            line["under_1pct"]) == ("qwen2_vl", 2, 0, 0.0, 0.0, 0)


def test_matrix_builds_cover_every_preset_and_quantization_first() -> None:
    order = plan_matrix.build_order(preset_names(), ["none", "int8", "nf4"])
    first = order[:len(preset_names())]
    assert {name for name, _ in first} == set(preset_names()) and {q for _, q in first} == {"none", "int8", "nf4"}
    assert sorted(order) == sorted({(n, q) for n in preset_names() for q in ("none", "int8", "nf4")})


def test_accelerate_anchor_is_its_weights_rule(tmp_path) -> None:
    records = plan_matrix.accelerate_anchors(["phi-3-mini-4k"], tmp_path / plan_matrix.ANCHORS)
    sizes = {r["accelerate_dtype"]: r["total_bytes"] for r in records}
    parameters = PUBLISHED_BILLIONS["phi-3-mini-4k"] * 1e9
    assert sizes["float32"] == pytest.approx(4 * parameters, rel=0.01)
    assert sizes["float16"] * 2 == sizes["int8"] * 4 == sizes["int4"] * 8 == sizes["float32"]  # FP32 /2, /4, /8
