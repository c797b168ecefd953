"""The charts: what each figure draws (bars, lines, labels), the weight breakdown's figures, and input checks."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.text import Annotation  # noqa: E402

from xcomp_lab.core.units import GIB, MIB  # noqa: E402
from xcomp_lab.course import charts  # noqa: E402
from xcomp_lab.model.modeling_internlm_xcomposer2 import InternLMXComposer2ForCausalLM  # noqa: E402
from xcomp_lab.model.scales import config_for_scale  # noqa: E402

BUDGET = 48 * 10**9  # a 48 GB card: 44.70 GiB


def record(step: str, weights: float, kv: float, act: float, **fields) -> dict:
    """A results record with its byte figures given in GiB and the peak as their sum."""
    nbytes = {"weights_bytes": int(weights * GIB), "kv_cache_bytes": int(kv * GIB), "activations_bytes": int(act * GIB)}
    base = {"step": step, **nbytes, "peak_bytes": sum(nbytes.values()), "budget_bytes": BUDGET, "oom": False,
            "predicted_peak_bytes": None, "tokens_per_s": None, "extra": {}}
    return {**base, **fields}


@pytest.fixture
def records() -> list[dict]:
    return [
        record("01-fp32", 33.29, 0.5, 10.59, oom=True, predicted_peak_bytes=int(44.0 * GIB)),
        record("02-fp16", 16.72, 0.4, 0.94, tokens_per_s=19.2, extra={"exact_match": 0.85},
               predicted_peak_bytes=int(17.8 * GIB)),
        record("06-nf4", 5.3, 0.4, 0.6, tokens_per_s=30.0, extra={"exact_match": 0.7}),
    ]


def meta_model(scale: str) -> InternLMXComposer2ForCausalLM:
    with torch.device("meta"):
        return InternLMXComposer2ForCausalLM(config_for_scale(scale))


def texts(fig: Figure) -> list[str]:
    return [t.get_text() for t in fig.axes[0].texts]


def annotations(fig: Figure) -> list[str]:
    """The annotations of a chart's axes, left to right (budget labels are plain text, not annotations)."""
    notes = [t for t in fig.axes[0].texts if isinstance(t, Annotation)]
    return [t.get_text() for t in sorted(notes, key=lambda t: t.xy[0])]


def bar_tops(ax, n: int) -> np.ndarray:
    """Top of each stacked bar: the highest patch edge over each of the n x positions."""
    tops = np.zeros(n)
    for patch in ax.patches:
        i = round(patch.get_x() + patch.get_width() / 2)
        tops[i] = max(tops[i], patch.get_y() + patch.get_height())
    return tops


def check_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


# ----- steps_chart --------------------------------------------------------------------------------


def test_steps_chart_stacks_four_segments_per_step_up_to_the_peak(records):
    fig = charts.steps_chart(records)
    ax = fig.axes[0]
    assert isinstance(fig, Figure)
    assert len(ax.patches) == 4 * len(records)  # weights, KV cache, activations, other per step
    expected = [r["peak_bytes"] / GIB for r in records]
    np.testing.assert_allclose(bar_tops(ax, len(records)), expected, rtol=1e-9)
    weights = [p for p in ax.patches if p.get_y() == 0]
    np.testing.assert_allclose([p.get_height() for p in weights], [r["weights_bytes"] / GIB for r in records])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["01-fp32", "02-fp16", "06-nf4"]


def test_steps_chart_marks_the_oom_step_in_red_hatching(records):
    ax = charts.steps_chart(records).axes[0]
    oom_bars = [p for p in ax.patches if p.get_hatch()]
    assert len(oom_bars) == 4 and {round(p.get_x() + p.get_width() / 2) for p in oom_bars} == {0}
    assert all(matplotlib.colors.same_color(p.get_edgecolor(), charts.COLORS["oom"]) for p in oom_bars)
    above = annotations(ax.figure)
    assert above[0].startswith("OOM") and "44.38 GiB" in above[0]
    assert not any(t.startswith("OOM") for t in above[1:])
    legend_labels = [t.get_text() for t in ax.figure.legends[0].get_texts()]
    assert "OOM: in use when it failed" in legend_labels


def test_steps_chart_draws_one_budget_line_with_its_label(records):
    ax = charts.steps_chart(records).axes[0]
    budget_lines = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert len(budget_lines) == 1
    assert budget_lines[0].get_ydata()[0] == pytest.approx(BUDGET / GIB)
    assert "budget 44.70 GiB" in texts(ax.figure)


def test_steps_chart_gives_each_step_its_own_budget_when_they_differ(records):
    records[2]["budget_bytes"] = 8 * GIB
    ax = charts.steps_chart(records).axes[0]
    budget_lines = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert sorted(line.get_ydata()[0] for line in budget_lines) == pytest.approx([8.0, BUDGET / GIB, BUDGET / GIB])
    assert [t for t in texts(ax.figure) if "OOM" not in t and t.endswith("GiB")] == ["44.70 GiB", "8.00 GiB"]
    ax = charts.steps_chart(records, budget_bytes=BUDGET).axes[0]  # an explicit budget wins
    assert len([line for line in ax.lines if line.get_linestyle() == "--"]) == 1


def test_steps_chart_marks_predicted_peaks_and_writes_quality_and_speed(records):
    ax = charts.steps_chart(records).axes[0]
    predicted = [line for line in ax.lines if line.get_marker() == "D"]
    assert len(predicted) == 1
    np.testing.assert_allclose(predicted[0].get_xdata(), [0, 1])
    np.testing.assert_allclose(predicted[0].get_ydata(), [44.0, 17.8])
    above = annotations(ax.figure)
    assert "EM 85%" in above[1] and "19.2 tok/s" in above[1]
    assert "EM 70%" in above[2] and "30.0 tok/s" in above[2]
    assert "EM = exact match" in ax.get_xlabel()


def test_steps_chart_leaves_quality_out_when_asked(records):
    ax = charts.steps_chart(records, quality_key=None).axes[0]  # random weights: their quality is noise
    above = annotations(ax.figure)
    assert not any("EM" in text for text in above) and "19.2 tok/s" in above[1]
    assert "exact match" not in ax.get_xlabel()


def test_steps_chart_lifts_bar_text_over_a_budget_line_just_above_the_bar(records):
    notes = sorted((t for t in charts.steps_chart(records).axes[0].texts if isinstance(t, Annotation)),
                   key=lambda t: t.xy[0])
    assert notes[0].xy[1] == pytest.approx(BUDGET / GIB)  # 44.38 GiB bar under a 44.70 GiB budget
    assert notes[1].xy[1] == pytest.approx(records[1]["peak_bytes"] / GIB)  # far below it: on the bar


def test_steps_chart_takes_records_with_only_some_fields():
    minimal = [
        {"step": "peak only", "peak_bytes": 3 * GIB},
        {"step": "parts only", "weights_bytes": 2 * GIB, "kv_cache_bytes": None},
        {"step": "not measured", "weights_bytes": None, "extra": {"exact_match": 0.5}},
        {"step": "oom, nothing else", "oom": True},
    ]
    fig = charts.steps_chart(minimal, title="minimal")
    ax = fig.axes[0]
    np.testing.assert_allclose(bar_tops(ax, 4), [3.0, 2.0, 0.0, 0.0])
    assert not [line for line in ax.lines if line.get_linestyle() == "--"]  # no budget known
    above = annotations(fig)
    assert above[0] == "3.00 GiB" and above[1] == "2.00 GiB"
    assert above[2].startswith("not measured") and above[3] == "OOM"
    assert ax.get_title() == "minimal"


def test_steps_chart_saves_a_png(records, tmp_path):
    path = tmp_path / "nested" / "steps.png"
    fig = charts.steps_chart(records, path=path)
    assert isinstance(fig, Figure)
    check_png(path)


def test_charts_are_deterministic(records, tmp_path):
    charts.steps_chart(records, path=tmp_path / "a.png")
    charts.steps_chart(records, path=tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


@pytest.mark.parametrize("bad, message", [
    ({"step": "x"}, "list of result dicts"),
    ([], "empty"),
    ([{"peak_bytes": 1}], "non-empty string 'step'"),
    ([{"step": "x", "peak_bytes": -1}], "peak_bytes must be a non-negative number"),
    ([{"step": "x", "peak_bytes": "12"}], "peak_bytes must be a non-negative number"),
    ([{"step": "x", "peak_bytes": float("inf")}], "peak_bytes must be a non-negative number"),
    ([{"step": "x", "oom": "yes"}], "oom must be True or False"),
    ([{"step": "x", "extra": {"exact_match": 85}}], r"fraction in \[0, 1\]"),
    (["x"], "must be a dict"),
])
def test_steps_chart_rejects_bad_records(bad, message):
    with pytest.raises(ValueError, match=message):
        charts.steps_chart(bad)


def test_charts_refuse_paths_that_are_not_png(records, tmp_path):
    with pytest.raises(ValueError, match=r"\.png"):
        charts.steps_chart(records, path=tmp_path / "steps.jpg")


# ----- timeline_chart -----------------------------------------------------------------------------


@pytest.fixture
def timeline() -> list[tuple[float, int, str]]:
    samples = [(0.0, 1 * GIB, "load"), (0.1, 2 * GIB, ""), (0.2, 2 * GIB, "vision"), (0.3, 3 * GIB, ""),
               (0.4, 3 * GIB, "prefill"), (0.5, 5 * GIB, ""), (0.6, 4 * GIB, "decode"), (0.7, 4 * GIB, "decode"),
               (0.8, 4 * GIB, "")]
    return samples


def test_timeline_chart_draws_memory_phases_and_peak(timeline, tmp_path):
    fig = charts.timeline_chart(timeline, budget_bytes=BUDGET, path=tmp_path / "timeline.png")
    ax = fig.axes[0]
    memory = [line for line in ax.lines if line.get_drawstyle() == "steps-post"]
    assert len(memory) == 1
    np.testing.assert_allclose(memory[0].get_ydata(), [s[1] / GIB for s in timeline])
    phase_lines = [line for line in ax.lines if line.get_linestyle() == ":"]
    assert sorted(line.get_xdata()[0] for line in phase_lines) == [0.0, 0.2, 0.4, 0.6, 0.7]
    labels = [t.strip() for t in texts(fig)]
    phases = ["load", "vision", "prefill", "decode"]
    assert [t for t in labels if t in phases] == phases  # "decode" twice in a row: labelled once
    peak = [t for t in texts(fig) if t.startswith("peak")]
    assert peak == ["peak 5.00 GiB\nat 0.5 s"]
    peak_marker = [line for line in ax.lines if line.get_marker() == "o"]
    assert peak_marker[0].get_xdata()[0] == 0.5 and peak_marker[0].get_ydata()[0] == pytest.approx(5.0)
    assert len([line for line in ax.lines if line.get_linestyle() == "--"]) == 1
    check_png(tmp_path / "timeline.png")


def test_timeline_chart_gives_markers_at_one_moment_one_label():
    samples = [(0.0, GIB, "start"), (0.0, GIB, "load"), (1.0, 2 * GIB, "vision"), (2.0, GIB, "end")]
    fig = charts.timeline_chart(samples)
    assert len([line for line in fig.axes[0].lines if line.get_linestyle() == ":"]) == 4
    assert [t.strip() for t in texts(fig) if not t.startswith("peak")] == ["start / load", "vision", "end"]


def test_timeline_chart_takes_json_lists_numpy_numbers_and_no_markers():
    fig = charts.timeline_chart([[0, 10 * MIB, ""], [np.float64(1), np.int64(30 * MIB), ""]])
    ax = fig.axes[0]
    assert not [line for line in ax.lines if line.get_linestyle() == ":"]
    assert [t for t in texts(fig) if t.startswith("peak")] == ["peak 30.00 MiB\nat 1 s"]  # small: in MiB
    assert ax.get_ylabel() == "allocated, MiB (1024² bytes)"


@pytest.mark.parametrize("bad", [[], "abc", [(0.0, 1)], [(0.0, -1, "")], [(0.0, 1, None)], [(float("nan"), 1, "")]])
def test_timeline_chart_rejects_bad_samples(bad):
    with pytest.raises(ValueError, match="t_seconds, allocated_bytes, label"):
        charts.timeline_chart(bad)


# ----- weight_breakdown ---------------------------------------------------------------------------


def test_weight_breakdown_of_the_tiny_model_sums_to_its_parameters_and_buffers():
    model = meta_model("tiny")
    rows = charts.weight_breakdown(model)
    assert [r[0] for r in rows] == list(charts.PARTS)
    assert sum(r[1] for r in rows) == sum(p.numel() for p in model.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    total_bytes = sum(p.numel() * 4 for p in model.parameters()) + buffer_bytes
    assert sum(r[2] for r in rows) == total_bytes
    config = model.config
    rotary = dict((r[0], r) for r in rows)["rotary tables"]
    head_dim = config.hidden_size // config.num_attention_heads
    assert rotary == ("rotary tables", 0, config.num_hidden_layers * 2 * config.max_position_embeddings * head_dim * 4)
    plora = dict((r[0], r[1]) for r in rows)["PLoRA"]
    assert plora == sum(p.numel() for n, p in model.named_parameters() if "Plora_" in n) > 0


def test_weight_breakdown_at_full_scale_gives_the_design_figures():
    rows = {name: (params, nbytes) for name, params, nbytes in charts.weight_breakdown(meta_model("full"))}
    assert rows["vision tower"][0] == 304_172_032
    assert rows["projector"][0] == 20_979_712
    assert rows["embeddings"][0] == 379_060_224
    assert rows["PLoRA"][0] == 603_979_776
    assert rows["output head"][0] == 379_060_224
    assert rows["final norm"][0] == 4_096
    assert rows["decoder (without PLoRA)"][0] == 7_583_563_776 - 603_979_776  # 32 layers less their PLoRA
    assert sum(params for params, _ in rows.values()) == 8_666_840_064
    assert rows["rotary tables"] == (0, GIB)  # 32 layers x cos+sin x 32768 x 128 x 4 bytes


def test_weight_breakdown_follows_the_dtype():
    model = meta_model("tiny")
    fp32 = charts.weight_breakdown(model)
    fp16 = charts.weight_breakdown(model.half())
    assert [r[1] for r in fp16] == [r[1] for r in fp32]
    by_part = {r[0]: (a[2], r[2]) for a, r in zip(fp32, fp16)}
    assert by_part["decoder (without PLoRA)"][1] * 2 == by_part["decoder (without PLoRA)"][0]
    assert by_part["rotary tables"][1] * 2 == by_part["rotary tables"][0]


def test_weight_breakdown_counts_bitsandbytes_storage_and_statistics():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = InternLMXComposer2ForCausalLM(config_for_scale("tiny"))
    before = {r[0]: r for r in charts.weight_breakdown(model)}
    attention = model.model.layers[0].attention
    weight = attention.wqkv.base_layer.weight.data
    out_features, in_features = weight.shape
    four_bit = bnb.nn.Linear4bit(in_features, out_features, bias=False, compress_statistics=True, quant_type="nf4")
    four_bit.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True)
    attention.wqkv.base_layer = four_bit.to("cpu")  # quantizes on CPU
    wo_out, wo_in = attention.wo.base_layer.weight.shape
    eight_bit = bnb.nn.Linear8bitLt(wo_in, wo_out, bias=False, has_fp16_weights=False)
    eight_bit.weight = bnb.nn.Int8Params(attention.wo.base_layer.weight.data.clone(), requires_grad=False,
                                         has_fp16_weights=False)
    attention.wo.base_layer = eight_bit.to("cpu")
    after = {r[0]: r for r in charts.weight_breakdown(model)}

    state = attention.wqkv.base_layer.weight.quant_state
    # Two values a byte; one uint8 absmax per 64 values (double quantization), one FP32 absmax per 256 of them,
    # the 256-entry FP32 code of that quantization, its FP32 offset and the 16-entry FP32 NF4 code.
    blocks = weight.numel() // 64
    four_bit_bytes = weight.numel() // 2 + blocks + -(-blocks // 256) * 4 + 256 * 4 + 4 + 16 * 4
    assert state.absmax.numel() == blocks and state.state2.code.numel() == 256 and state.code.numel() == 16
    eight_bit_bytes = wo_out * wo_in + wo_out * 4  # int8 values + one FP32 scale per row
    fp32_bytes = (weight.numel() + wo_out * wo_in) * 4
    assert after["decoder (without PLoRA)"][1] == before["decoder (without PLoRA)"][1]  # logical count kept
    expected = before["decoder (without PLoRA)"][2] - fp32_bytes + four_bit_bytes + eight_bit_bytes
    assert after["decoder (without PLoRA)"][2] == expected
    assert after["PLoRA"] == before["PLoRA"]


def test_weight_breakdown_rejects_what_is_not_the_whole_model():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        charts.weight_breakdown("model")
    with pytest.raises(ValueError, match="belong to no known part"):
        charts.weight_breakdown(meta_model("tiny").model)


def test_format_breakdown_prints_a_table_with_shares():
    rows = [("a", 1_000, 3 * MIB), ("b", 2_000_000, MIB), ("c", 0, 0)]
    table = charts.format_breakdown(rows)
    lines = table.splitlines()
    assert lines[0].split() == ["part", "parameters", "size", "share"]
    assert "1,000" in lines[1] and "3.00 MiB" in lines[1] and lines[1].endswith("75.0%")
    assert "2,000,000" in lines[2] and lines[2].endswith("25.0%")
    assert lines[3].endswith("0.0%")
    assert lines[-1].split()[:2] == ["total", "2,001,000"] and lines[-1].endswith("100.0%")
    full = charts.format_breakdown(charts.weight_breakdown(meta_model("tiny")))
    assert all(part in full for part in charts.PARTS)


def test_weight_breakdown_chart_draws_one_labelled_bar_per_part(tmp_path):
    model = meta_model("tiny")
    fig = charts.weight_breakdown_chart(model, path=tmp_path / "weights.png")
    ax = fig.axes[0]
    rows = charts.weight_breakdown(model)
    assert len(ax.patches) == len(charts.PARTS)
    np.testing.assert_allclose([p.get_width() for p in ax.patches], [r[2] / MIB for r in rows])  # under 1 GiB: MiB
    assert ax.get_xlabel().startswith("MiB")
    labels = texts(fig)
    assert len(labels) == len(rows) and all("%" in t for t in labels)
    shares = [float(t.rsplit("(", 1)[1].rstrip("%)").lstrip("<")) for t in labels]
    assert sum(shares) == pytest.approx(100, abs=0.5)
    assert [t.get_text() for t in ax.get_yticklabels()][-1] == "rotary tables (buffers)"
    check_png(tmp_path / "weights.png")


def test_weight_breakdown_chart_uses_gib_for_big_models_and_checks_rows():
    ax = charts.weight_breakdown_chart([("decoder", 10, 3 * GIB), ("rotary tables", 0, GIB)]).axes[0]
    assert ax.get_xlabel().startswith("GiB")
    np.testing.assert_allclose([p.get_width() for p in ax.patches], [3.0, 1.0])
    assert texts(ax.figure) == ["3.00 GiB (75.0%)", "1.00 GiB (25.0%)"]
    with pytest.raises(ValueError, match="part, parameter count, bytes"):
        charts.weight_breakdown_chart([("decoder", -1, 3)])


# ----- quality_memory_chart -----------------------------------------------------------------------


def test_quality_memory_chart_places_each_step_and_lists_the_ones_left_out(records, tmp_path):
    records.append({"step": "no quality", "peak_bytes": GIB})
    fig = charts.quality_memory_chart(records, path=tmp_path / "quality.png")
    ax = fig.axes[0]
    points = ax.collections[0].get_offsets()
    np.testing.assert_allclose(points, [[18.06, 85.0], [6.3, 70.0]], rtol=1e-3)
    assert annotations(fig) == ["06-nf4", "02-fp16"]  # sorted by x: peak memory
    assert "not shown: 01-fp32 (OOM), no quality (no quality)" in ax.get_xlabel()
    budget = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert len(budget) == 1 and budget[0].get_xdata()[0] == pytest.approx(BUDGET / GIB)
    check_png(tmp_path / "quality.png")


def test_quality_memory_chart_moves_labels_of_crowded_points_apart():
    crowded = [{"step": name, "peak_bytes": GIB + i * MIB, "extra": {"exact_match": 0.75}}
               for i, name in enumerate(["a", "b", "c"])]
    notes = [t for t in charts.quality_memory_chart(crowded).axes[0].texts if isinstance(t, Annotation)]
    assert len({tuple(t.xyann) for t in notes}) == 3


def test_quality_memory_chart_needs_some_quality():
    with pytest.raises(ValueError, match="exact_match"):
        charts.quality_memory_chart([{"step": "x", "peak_bytes": GIB}])
