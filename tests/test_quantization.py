"""quantization: footprint prediction and statistics, what stays 16-bit, PLoRA under bitsandbytes (and LLM.int8()'s
outlier columns, which couple positions), matmul costs, and the notebook's step helpers."""

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
    with pytest.raises(ValueError, match="no Linear8bitLt"):
        with q.int8_threshold(fp16_model, 0.0):
            pass


def test_llm_int8_outlier_columns_couple_the_rows_multiplied_together(quantized):
    """A text row's INT8 product changes when another row brings an outlier column; not without the decomposition."""
    kind, model = quantized
    if kind != "int8":
        pytest.skip("only LLM.int8() has an outlier decomposition")
    _, layer = q.largest_quantized_linear(model)
    torch.manual_seed(0)
    text = torch.randn(3, layer.in_features).half()  # (3, in): values well below 6
    image = torch.randn(2, layer.in_features).half()
    image[:, 5] = 20.0  # an outlier column only the later rows hold
    with torch.inference_mode():
        alone, together = layer(text), layer(torch.cat([text, image]))[:3]
        assert not torch.equal(alone, together)
        with q.int8_threshold(model, 0.0):
            assert torch.equal(layer(text), layer(torch.cat([text, image]))[:3])
    assert layer.state.threshold == 6.0  # restored


def test_outlier_columns_count_what_the_image_rows_add(quantized):
    kind, model = quantized
    embeds, im_mask = synthetic_prompt(model.config.hidden_size)
    if kind != "int8":
        with pytest.raises(ValueError, match="no Linear8bitLt"):
            q.outlier_columns(model, embeds.half(), im_mask)
        return
    calm = q.outlier_columns(model, embeds.half(), im_mask)
    assert calm.calls == sum(1 for n, m in model.named_modules() if n.startswith("model.") and q.is_quantized(m))
    assert calm.calls_widened == 0 and calm.columns_all_rows == calm.columns_text_rows
    loud = embeds.clone()
    loud[0, 5:13, 3] = 20.0  # image rows only: every layer's input norm keeps it an outlier
    counted = q.outlier_columns(model, loud.half(), im_mask)
    assert counted.calls_widened > 0 and counted.columns_all_rows > counted.columns_text_rows
    assert "outlier columns" in str(counted)


def effect(first_difference, before=0.0):
    return q.PLoRAEffect(first_image_position=5, image_tokens=8, first_difference=first_difference,
                         max_diff_before_image=before, min_diff_from_image_on=0.1, positions=20)


@pytest.mark.parametrize("as_loaded, no_decomposition, acts, mixes, words", [
    (effect(5), None, True, False, "text before it is unchanged"),
    (effect(0, 0.05), effect(5), True, True, "outlier columns are picked over all positions"),
    (effect(0, 0.05), effect(0, 0.05), False, False, "something other than PLoRA"),
    (effect(None), None, False, False, "changed nothing"),
])
def test_plora_check_tells_plora_apart_from_the_outlier_decomposition(as_loaded, no_decomposition, acts, mixes, words):
    check = q.PLoRACheck("int8" if no_decomposition else "nf4", as_loaded, 6.0 if no_decomposition else None,
                         no_decomposition)
    assert check.plora_acts is acts and check.outliers_mix_positions is mixes
    assert words in check.verdict()
    assert str(check).count("\n") == (1 if no_decomposition else 0)


@pytest.fixture(scope="module")
def params(tmp_path_factory):
    from xcomp_lab.course.params import check_params

    return check_params(scale="tiny", device="cpu", results_path=tmp_path_factory.mktemp("q") / "results.jsonl")


def test_plora_check_on_a_loaded_model(quantized, params, scene_image, tiny_checkpoint):
    kind, model = quantized
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    check = q.plora_check(model, tokenizer, [scene_image], params)
    assert check.quantization == kind and check.plora_acts
    if kind == "int8":
        assert check.threshold == 6.0 and check.no_decomposition is not None and check.outliers is not None
        assert check.no_decomposition.acts_only_from_image_on
    else:
        assert check.no_decomposition is None and check.as_loaded.acts_only_from_image_on


def test_quantized_kernels_report_the_largest_decoder_linear(quantized):
    kind, model = quantized
    report = q.quantized_kernels(model, 8, device="cpu", repeats=1)
    assert report.kind == ("Linear8bitLt" if kind == "int8" else "Linear4bit") and len(report.costs) == 2
    assert [c.tokens for c in report.costs] == [1, 8] and not report.call.sees_dequantized_copy
    facts = report.facts()
    assert "NOT in the measured peak" in facts
    assert ("torch._int_mm" in facts) == (kind == "int8")
    assert ("4-bit linears" in facts) == (kind == "nf4") and ("CPU path" in facts) == (kind == "nf4")
    assert report.machine.startswith("CPU") and report.timings().count("\n") == 1


def test_the_notebook_steps_load_score_and_record(params):
    baseline = q.take_reference(params, n=1, n_logits=1)
    assert baseline.fp32_weights_bytes > 0 and not baseline.random_weights and "exact match" in str(baseline)
    model, tokenizer, fp16 = q.load_step("fp16", params)
    assert fp16.statistics_bytes == 0 and set(fp16.predicted) == {"int8", "nf4"}
    assert fp16.total_bytes == fp16.resident_bytes == fp16.transformers_bytes
    assert sum(b for _, _, b in fp16.parts) == fp16.total_bytes and "stored weights" in fp16.table()
    run = q.caption_step("fp16", model, tokenizer, baseline.reference.images[:1], params, baseline, fp16)
    assert run.peak_bytes >= fp16.resident_bytes and run.speed.tokens_per_s > 0
    assert run.record["step"] == "fp16" and params.results_path.read_text().count("\n") >= 1
    assert str(run).startswith("exact match") and "exact_match" in run.record["extra"]
    with pytest.raises(ValueError, match="footprint is of step 'fp16'"):
        q.caption_step("int8", model, tokenizer, baseline.reference.images[:1], params, baseline, fp16)
    del model
    model, _, int8 = q.load_step("int8", params)
    assert int8.total_bytes == fp16.predicted["int8"] and int8.statistics_bytes > 0 and not int8.predicted
    assert int8.transformers_bytes == int8.resident_bytes  # transformers' count misses the scales
    assert "Linear8bitLt" in int8.module_table()
    with pytest.raises(ValueError, match="name='fp32'"):
        q.load_step("fp32", params)


# ----------------------------------------------------------------------------- the original's own code (no model)

class _PLoRALike(torch.nn.Linear):
    """A linear carrying a low-rank branch, shaped as the original's PLoRA (the names are what is read)."""

    def __init__(self) -> None:
        super().__init__(4, 4, bias=False)
        self.Plora_A = torch.nn.Linear(4, 2, bias=False)
        self.Plora_B = torch.nn.Linear(2, 4, bias=False)


def _decoder(projection: type[torch.nn.Module]) -> torch.nn.Module:
    attention = torch.nn.Module()
    attention.wqkv, attention.wo = projection(), projection()
    layer = torch.nn.Module()
    layer.attention = attention
    root = torch.nn.Module()
    root.model = torch.nn.Module()
    root.model.layers = torch.nn.ModuleList([layer])
    return root


def test_projection_classes_say_whether_the_plora_branch_survived():
    assert q.projection_classes(_decoder(_PLoRALike)) == "decoder projections: 2 x _PLoRALike (with its PLoRA branch)"
    swapped = q.projection_classes(_decoder(lambda: torch.nn.Linear(4, 4)))
    assert swapped == "decoder projections: 2 x Linear (WITHOUT its PLoRA branch)"
    with pytest.raises(ValueError, match="no decoder projection"):
        q.projection_classes(torch.nn.Linear(2, 2))


def test_failure_line_names_the_model_code_line(tmp_path, monkeypatch):
    (tmp_path / "modeling_fake.py").write_text("def attend(layer, x, mask):\n    return layer(x, mask)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import modeling_fake

    with pytest.raises(TypeError) as caught:
        modeling_fake.attend(lambda x: x, 1, 2)
    line = q.failure_line(caught.value)
    assert line.startswith("TypeError: ") and "takes 1 positional argument but 2 were given" in line
    assert line.endswith("raised through modeling_fake.py:2: return layer(x, mask)")
