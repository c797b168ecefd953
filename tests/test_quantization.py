"""quantization: footprint prediction and statistics, what stays 16-bit, PLoRA under bitsandbytes, matmul costs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("bitsandbytes")

from xcomp_lab.core.units import fmt_bytes
from xcomp_lab.course.charts import weight_breakdown
from xcomp_lab.lessons import quantization as q
from xcomp_lab.memory.footprint import resident_bytes, statistics_bytes
from xcomp_lab.model.loading import load_model, quantization_config
from xcomp_lab.model.modeling_internlm_xcomposer2 import InternLMXComposer2ForCausalLM
from xcomp_lab.model.scales import config_for_scale


@pytest.fixture(scope="module")
def fp16_model(tiny_checkpoint: Path):
    return load_model(tiny_checkpoint, dtype="float16")[0]


@pytest.fixture(scope="module", params=["int8", "nf4"])
def quantized(request, tiny_checkpoint: Path):
    model, _ = load_model(tiny_checkpoint, dtype="float16", quantization_config=quantization_config(request.param))
    return request.param, model


def test_predicted_footprint_matches_the_quantized_model_to_the_byte(fp16_model, quantized):
    kind, model = quantized
    measured = resident_bytes(model, "cpu") + statistics_bytes(model)
    assert q.predicted_footprint(fp16_model, kind) == measured
    assert statistics_bytes(fp16_model) == 0


def test_weight_breakdown_counts_the_int8_scales_kept_on_the_layer_state(quantized):
    kind, model = quantized
    if kind == "int8":
        layer = model.model.layers[0].attention.wqkv.base_layer
        with torch.inference_mode():
            layer(torch.randn(1, 2, layer.in_features).half())  # the first call moves the scales to layer.state
        assert getattr(layer.weight, "SCB", None) is None and layer.state.SCB is not None
    total = sum(b for _, _, b in weight_breakdown(model))
    stats = statistics_bytes(model)
    assert total == resident_bytes(model, "cpu") + stats


def test_module_precisions_show_what_stays_16_bit(fp16_model, quantized):
    kind, model = quantized
    rows = {r.kind: r for r in q.module_precisions(model)}
    linears = sum(type(m) is torch.nn.Linear for m in fp16_model.modules())
    quantized_kind = "Linear8bitLt" if kind == "int8" else "Linear4bit"
    assert rows[quantized_kind].quantized and rows[quantized_kind].count == linears - 1
    assert rows["Linear"].count == 1 and rows["Linear"].example == "output" and rows["Linear"].storage == "float16"
    assert not rows["Embedding"].quantized and not rows["InternLM2RMSNorm"].quantized
    assert next(iter(rows)) == quantized_kind  # quantized classes first
    assert sum(r.nbytes for r in rows.values()) == resident_bytes(model, "cpu") + statistics_bytes(model)
    table = q.format_module_precisions(list(rows.values()), fmt_bytes)
    assert table.splitlines()[0].split()[:3] == ["module", "class", "count"] and "output" in table


def synthetic_prompt(hidden: int, tokens: int = 20, image: tuple[int, int] = (5, 13)):
    torch.manual_seed(0)
    embeds = torch.randn(1, tokens, hidden) * 0.1  # (1, T, C)
    im_mask = torch.zeros(1, tokens, dtype=torch.bool)
    im_mask[0, image[0]:image[1]] = True
    return embeds, im_mask


def test_plora_effect_starts_at_the_first_image_token_and_vanishes_without_the_branch():
    torch.manual_seed(0)
    model = InternLMXComposer2ForCausalLM(config_for_scale("tiny")).eval()
    embeds, im_mask = synthetic_prompt(model.config.hidden_size)
    effect = q.plora_effect(model, embeds, im_mask)
    assert effect.first_image_position == 5 and effect.image_tokens == 8 and effect.positions == 20
    assert effect.acts_only_from_image_on and effect.min_diff_from_image_on > 0
    for module in model.modules():
        if hasattr(module, "Plora_B"):
            torch.nn.init.zeros_(module.Plora_B.weight)
    assert q.plora_effect(model, embeds, im_mask).first_difference is None
    with pytest.raises(ValueError, match="no image token"):
        q.plora_effect(model, embeds, torch.zeros_like(im_mask))


def test_plora_still_acts_after_quantization(quantized):
    _, model = quantized
    embeds, im_mask = synthetic_prompt(model.config.hidden_size)
    assert q.plora_effect(model, embeds.half(), im_mask).acts_only_from_image_on


def test_dequantized_weight_reproduces_the_layer(quantized):
    kind, model = quantized
    name, layer = q.largest_quantized_linear(model)
    assert name.startswith("model.layers.") and q.is_quantized(layer)
    x = torch.randn(1, 7, layer.in_features).half()
    with torch.inference_mode():
        expected, got = layer(x).float(), F.linear(x, q.dequantized_weight(layer)).float()
    tolerance = 1e-3 if kind == "nf4" else 0.05  # LLM.int8() also rounds the activations to int8
    assert (expected - got).abs().max() <= tolerance * expected.abs().max()


def test_matmul_cost_and_call_memory(quantized):
    kind, model = quantized
    _, layer = q.largest_quantized_linear(model)
    cost = q.matmul_cost(layer, 3, device="cpu", repeats=1)
    assert cost.quantized_s > 0 and cost.dequantize_s > 0 and cost.fp16_matmul_s > 0
    assert cost.dequantized_bytes == layer.in_features * layer.out_features * 2
    assert "tokens" in str(cost)
    seen = q.call_memory(layer, 8, device="cpu")
    assert seen.output_bytes == 8 * layer.out_features * 2 and seen.peak_above_start_bytes >= seen.output_bytes
    assert not seen.sees_dequantized_copy  # the copy lives inside the bitsandbytes call, unseen by the accounting
    with pytest.raises(ValueError, match="tokens"):
        q.matmul_cost(layer, 0, device="cpu")


def test_argument_errors(fp16_model, quantized):
    _, model = quantized
    with pytest.raises(ValueError, match="already quantized"):
        q.predicted_footprint(model, "int8")
    with pytest.raises(ValueError, match=r"quantization='fp8'; choose one of \['int8', 'nf4'\]"):
        q.predicted_footprint(fp16_model, "fp8")
    with pytest.raises(ValueError, match="no bitsandbytes linear"):
        q.largest_quantized_linear(fp16_model)
    with pytest.raises(TypeError):
        q.dequantized_weight(fp16_model.output)
