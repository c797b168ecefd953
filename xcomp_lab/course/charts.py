"""The course's figures, drawn with matplotlib's object-oriented API; every axis in GiB (1024**3 bytes).

- `steps_chart`: steps side by side as stacked bars (weights / KV cache / activations), budget, OOM, prediction.
- `timeline_chart`: allocated memory during one captioning call, with its phases and its peak.
- `weight_breakdown` / `format_breakdown` / `weight_breakdown_chart`: where the model's bytes are, by part.
- `quality_memory_chart`: caption quality against peak memory, one point per step.

Each chart returns its Figure and saves a PNG when given `path`. Figures are made with pyplot and closed
at once: pyplot wires up the notebook's inline display, and closing stops it showing the figure a second
time at the end of the cell, so a notebook shows a returned figure exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.transforms import blended_transform_factory

from xcomp_lab.core.units import GIB, MIB, fmt_bytes, to_gib
from xcomp_lab.memory.footprint import statistics

# One colour per kind of memory, the same in every chart.
COLORS: dict[str, str] = {
    "weights": "#4C72B0",
    "buffers": "#9DB4DA",  # memory the parameter count misses (rotary tables)
    "kv_cache": "#DD8452",
    "activations": "#55A868",
    "other": "#B8B8B8",
    "oom": "#C44E52",
    "budget": "#333333",
    "predicted": "#000000",
    "allocated": "#2F4B7C",
    "quality": "#8172B3",
}
DPI = 120
OOM_HATCH = "///"
# (record field, legend label, colour key) of each stacked segment, bottom to top.
SEGMENTS = (
    ("weights_bytes", "weights", "weights"),
    ("kv_cache_bytes", "KV cache", "kv_cache"),
    ("activations_bytes", "activations", "activations"),
    ("other_bytes", "other (resident before the step)", "other"),
)
QUALITY_SHORT = {"exact_match": "EM"}
MIN_OTHER_SHARE = 0.005  # "other" joins the legend once it reaches this share of the tallest bar
LIFT_WITHIN = 0.25  # a bar's text goes over a budget or prediction less than this share of the chart above it

VISION, PROJECTOR, EMBEDDINGS, DECODER = "vision tower", "projector", "embeddings", "decoder (without PLoRA)"
PLORA, NORM, OUTPUT, ROTARY = "PLoRA", "final norm", "output head", "rotary tables"
PARTS = (VISION, PROJECTOR, EMBEDDINGS, DECODER, PLORA, NORM, OUTPUT, ROTARY)
# Parameter-name prefixes of each part; PLoRA ("Plora_" anywhere in the name) is checked before these.
_PREFIXES = (("vit.", VISION), ("vision_proj.", PROJECTOR), ("model.tok_embeddings.", EMBEDDINGS),
             ("model.layers.", DECODER), ("model.norm.", NORM), ("output.", OUTPUT))

BreakdownRow = tuple[str, int, int]  # (part, parameter count, bytes)


# ----- shared helpers ------------------------------------------------------------------------------


def new_axes(width: float, height: float) -> tuple[Figure, Axes]:
    """A figure of `width` x `height` inches with one set of axes, closed to pyplot (the caller displays it)."""
    fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
    plt.close(fig)  # the caller displays the returned figure; pyplot must not show it again
    return fig, ax


def finish(fig: Figure, path: str | Path | None) -> Figure:
    """Save `fig` as a PNG at `path` (folders created) when a path is given; return it."""
    if path is not None:
        path = Path(path)
        if path.suffix.lower() != ".png":
            raise ValueError(f"path must end in .png, got {str(path)!r}: the charts are saved as PNG images")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=DPI, format="png")
    return fig


def _fmt_gib(nbytes: float) -> str:
    """'44.38 GiB' from 1 GiB up, three significant digits below ('0.0187 GiB'): one unit on every chart."""
    gib = to_gib(nbytes)
    return f"{gib:.2f} GiB" if gib >= 1 else f"{gib:.3g} GiB"


def _fmt_count(n: int) -> str:
    if n >= 10**9:
        return f"{n / 10**9:.2f} B"
    if n >= 10**6:
        return f"{n / 10**6:.2f} M"
    return f"{n:,}"


def _fmt_share(percent: float) -> str:
    return "<0.1%" if 0 < percent < 0.1 else f"{percent:.1f}%"


def _is_number(value: Any) -> bool:
    """A finite real number, numpy scalars included, booleans not."""
    return isinstance(value, Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)


def _check_budget(budget_bytes: Any) -> int | None:
    if budget_bytes is None:
        return None
    if not _is_number(budget_bytes) or not budget_bytes > 0:
        raise ValueError(f"budget_bytes must be a positive number of bytes or None, got {budget_bytes!r}: "
                         f"e.g. Budget.for_card(48).limit_bytes")
    return int(budget_bytes)


def _budget_line(ax: Axes, budget_bytes: int, *, vertical: bool = False) -> None:
    """The budget as a dashed line across the axes, labelled with its size at the far end."""
    label = f"budget {_fmt_gib(budget_bytes)}"
    value = to_gib(budget_bytes)
    style = dict(color=COLORS["budget"], linestyle="--", linewidth=1.5, label=label)
    if vertical:
        ax.axvline(value, **style)
        where = blended_transform_factory(ax.transData, ax.transAxes)
        ax.text(value, 0.99, f" {label}", transform=where, ha="left", va="top", fontsize=8, color=COLORS["budget"])
    else:
        ax.axhline(value, **style)
        where = blended_transform_factory(ax.transAxes, ax.transData)
        ax.text(0.99, value, label, transform=where, ha="right", va="bottom", fontsize=8, color=COLORS["budget"])


# ----- results records -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Step:
    """One results record, checked, with the fields the charts use (bytes as ints, None if not measured)."""

    name: str
    weights_bytes: int
    kv_cache_bytes: int
    activations_bytes: int
    peak_bytes: int | None
    budget_bytes: int | None
    oom: bool
    predicted_peak_bytes: int | None
    tokens_per_s: float | None
    quality: float | None

    @property
    def top_bytes(self) -> int | None:
        """The measured peak, else the sum of the parts, else None (nothing measured)."""
        if self.peak_bytes is not None:
            return self.peak_bytes
        parts = self.weights_bytes + self.kv_cache_bytes + self.activations_bytes
        return parts or None

    @property
    def other_bytes(self) -> int:
        """What the peak holds beyond weights, KV cache and activations (memory resident before the step)."""
        if self.peak_bytes is None:
            return 0
        return max(self.peak_bytes - self.weights_bytes - self.kv_cache_bytes - self.activations_bytes, 0)


def _number(record: Mapping[str, Any], key: str, where: str) -> float | None:
    value = record.get(key)
    if value is None:
        return None
    if not _is_number(value) or value < 0:
        raise ValueError(f"{where}: {key} must be a non-negative number or None, got {value!r}: "
                         f"records come from xcomp_lab.course.results.build_record")
    return value


def _quality(record: Mapping[str, Any], key: str, where: str) -> float | None:
    extra = record.get("extra")
    if extra is None:
        return None
    if not isinstance(extra, Mapping):
        raise ValueError(f"{where}: extra must be a dict or None, got {type(extra).__name__}")
    value = extra.get(key)
    if value is None:
        return None
    if not _is_number(value) or not 0 <= value <= 1:
        raise ValueError(f"{where}: extra[{key!r}] must be a fraction in [0, 1] (as xcomp_lab.data.quality returns it), "
                         f"got {value!r}")
    return float(value)


def _read_step(record: Any, index: int, quality_key: str) -> _Step:
    if not isinstance(record, Mapping):
        raise ValueError(f"record {index} must be a dict (one results line), got {type(record).__name__}: "
                         f"read records with xcomp_lab.course.results.read_results")
    name = record.get("step")
    if not isinstance(name, str) or not name:
        raise ValueError(f"record {index} needs a non-empty string 'step', got {name!r}")
    where = f"record {index} ({name!r})"
    oom = record.get("oom", False)
    if not isinstance(oom, (bool, np.bool_)):
        raise ValueError(f"{where}: oom must be True or False, got {oom!r}")

    def as_int(key: str) -> int | None:
        value = _number(record, key, where)
        return None if value is None else int(value)

    return _Step(
        name=name,
        weights_bytes=as_int("weights_bytes") or 0,
        kv_cache_bytes=as_int("kv_cache_bytes") or 0,
        activations_bytes=as_int("activations_bytes") or 0,
        peak_bytes=as_int("peak_bytes"),
        budget_bytes=as_int("budget_bytes") or None,
        oom=bool(oom),
        predicted_peak_bytes=as_int("predicted_peak_bytes"),
        tokens_per_s=_number(record, "tokens_per_s", where),
        quality=_quality(record, quality_key, where),
    )


def _read_records(records: Any, quality_key: str) -> list[_Step]:
    if isinstance(records, Mapping) or not isinstance(records, Sequence) or isinstance(records, str):
        raise ValueError(f"records must be a list of result dicts, got {type(records).__name__}: "
                         f"pass read_results(path) or list(latest_by_step(records).values())")
    if not records:
        raise ValueError("records is empty: there is nothing to chart; run a notebook that appends results first")
    return [_read_step(record, index, quality_key) for index, record in enumerate(records)]


def _common_budget(steps: list[_Step], budget_bytes: Any) -> int | None:
    """The explicit budget, else the one budget all records that have one share, else None."""
    explicit = _check_budget(budget_bytes)
    if explicit is not None:
        return explicit
    budgets = {s.budget_bytes for s in steps if s.budget_bytes is not None}
    return budgets.pop() if len(budgets) == 1 else None


# ----- 1. steps side by side ----------------------------------------------------------------------


def _bar_text(step: _Step, quality_key: str) -> str:
    top = step.top_bytes
    if step.oom:
        lines = ["OOM"] + ([f"at {_fmt_gib(top)}"] if top else [])
    else:
        lines = [_fmt_gib(top)] if top else ["not measured"]
    if step.quality is not None:
        lines.append(f"{QUALITY_SHORT.get(quality_key, quality_key)} {step.quality:.0%}")
    if step.tokens_per_s is not None:
        lines.append(f"{step.tokens_per_s:.1f} tok/s")
    return "\n".join(lines)


def _bar_text_key(steps: list[_Step], quality_key: str) -> str:
    """What the text above the bars says, as the x-axis label."""
    parts = ["above each bar: peak"]
    short = QUALITY_SHORT.get(quality_key, quality_key)
    if any(s.quality is not None for s in steps):
        parts.append(f"{short} = {quality_key.replace('_', ' ')}" if short != quality_key else quality_key)
    if any(s.tokens_per_s is not None for s in steps):
        parts.append("generation speed")
    return ", ".join(parts)


def _draw_budgets(ax: Axes, steps: list[_Step], budget_bytes: int | None, width: float) -> list[float]:
    """One line for a common budget, else a short dashed line over each bar at its own budget.

    Per-step budgets are labelled with their size where it changes from the bar before.
    """
    if budget_bytes is not None:
        _budget_line(ax, budget_bytes)
        return [to_gib(budget_bytes)]
    levels = []
    previous = None
    for x, step in enumerate(steps):
        if step.budget_bytes is not None:
            level = to_gib(step.budget_bytes)
            right = x + width / 2 + 0.1
            ax.plot([x - width / 2 - 0.1, right], [level, level], color=COLORS["budget"], linestyle="--",
                    linewidth=1.5, label="budget (per step)" if not levels else "_nolegend_")
            if step.budget_bytes != previous:
                ax.text(right, level, _fmt_gib(step.budget_bytes), ha="right", va="top", fontsize=7,
                        color=COLORS["budget"], bbox=dict(facecolor="white", edgecolor="none", pad=1, alpha=0.8))
            levels.append(level)
        previous = step.budget_bytes
    return levels


def _draw_stacks(ax: Axes, steps: list[_Step], width: float) -> list[tuple[Artist, str]]:
    """The stacked segments of every bar, OOM bars hatched red; returns the legend entries."""
    legend: list[tuple[Artist, str]] = []
    tallest = max(to_gib(s.top_bytes or 0) for s in steps)
    bottom = np.zeros(len(steps))
    for field, label, color in SEGMENTS:
        heights = np.array([to_gib(getattr(s, field)) for s in steps])
        bars = ax.bar(np.arange(len(steps)), heights, width, bottom=bottom, color=COLORS[color], edgecolor="white",
                      linewidth=0.5)
        # A sliver of "other" (a few inputs resident before the step) is not worth a legend entry.
        if heights.max() > (MIN_OTHER_SHARE * tallest if field == "other_bytes" else 0):
            legend.append((Patch(facecolor=COLORS[color]), label))
        for bar, step in zip(bars, steps):
            if step.oom:
                bar.set_hatch(OOM_HATCH)
                bar.set_edgecolor(COLORS["oom"])
                bar.set_linewidth(1.5)
        bottom += heights
    if any(s.oom for s in steps):
        oom_patch = Patch(facecolor="white", hatch=OOM_HATCH, edgecolor=COLORS["oom"])
        legend.append((oom_patch, "OOM: in use when it failed"))
    return legend


def _draw_predicted(ax: Axes, steps: list[_Step]) -> list[float]:
    """The predicted peaks as hollow diamonds (one line artist); returns their levels in GiB."""
    predicted = [(i, to_gib(s.predicted_peak_bytes)) for i, s in enumerate(steps) if s.predicted_peak_bytes is not None]
    if not predicted:
        return []
    px, py = zip(*predicted)
    ax.plot(px, py, linestyle="none", marker="D", markersize=8, markerfacecolor="none",
            markeredgecolor=COLORS["predicted"], markeredgewidth=1.5, label="predicted peak")
    return list(py)


def _write_bar_texts(ax: Axes, steps: list[_Step], budget_bytes: int | None, ymax: float, quality_key: str) -> None:
    """The text above each bar, lifted over a budget line or prediction marker sitting just above the bar."""
    for i, step in enumerate(steps):
        top = to_gib(step.top_bytes or 0)
        budget = budget_bytes if budget_bytes is not None else step.budget_bytes
        nearby = [to_gib(v) for v in (budget, step.predicted_peak_bytes) if v is not None]
        anchor = max([top] + [level for level in nearby if top <= level < top + LIFT_WITHIN * ymax])
        ax.annotate(_bar_text(step, quality_key), (i, anchor), xytext=(0, 4), textcoords="offset points",
                    ha="center", va="bottom", fontsize=8, color=COLORS["oom"] if step.oom else "black",
                    fontweight="bold" if step.oom else "normal")


def steps_chart(records: Sequence[Mapping[str, Any]], *, budget_bytes: int | None = None, title: str | None = None,
                quality_key: str = "exact_match", path: str | Path | None = None) -> Figure:
    """Each step's peak as a stacked bar (weights / KV cache / activations / other), in GiB.

    The budget (given, or the one all records share; else each record's own) is a dashed line; an OOM step's
    bar is hatched red up to the memory in use when it failed and says "OOM"; the predicted peak is a hollow
    diamond; `extra[quality_key]` and tokens/s, when present, are written above the bar.
    """
    steps = _read_records(records, quality_key)
    budget = _common_budget(steps, budget_bytes)
    width = 0.6
    fig, ax = new_axes(max(6.0, 1.3 * len(steps) + 3.0), 4.8)
    legend = _draw_stacks(ax, steps, width)
    levels = _draw_budgets(ax, steps, budget, width) + _draw_predicted(ax, steps)
    ymax = max([to_gib(s.top_bytes or 0) for s in steps] + levels) or 1.0
    _write_bar_texts(ax, steps, budget, ymax, quality_key)

    ax.set_ylim(0, ymax * 1.3)
    long_names = len(steps) > 5 or max(len(s.name) for s in steps) > 12
    ax.set_xticks(np.arange(len(steps)), [s.name for s in steps], rotation=20 if long_names else 0,
                  ha="right" if long_names else "center")
    ax.set_xlim(-0.7, len(steps) - 0.3)
    ax.set_ylabel("GiB (1024³ bytes)")
    ax.set_xlabel(_bar_text_key(steps, quality_key), fontsize=8)
    ax.set_title(title or "Peak memory per step")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    handles, labels = ax.get_legend_handles_labels()  # budget and prediction lines
    legend += list(zip(handles, labels))
    fig.legend(*zip(*legend), loc="outside right upper", fontsize=8)
    return finish(fig, path)


# ----- 2. timeline of one call --------------------------------------------------------------------


def _read_timeline(timeline: Any) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if isinstance(timeline, (str, Mapping)) or not isinstance(timeline, Sequence) or not timeline:
        raise ValueError(f"timeline must be a non-empty list of (t_seconds, allocated_bytes, label) samples, "
                         f"got {timeline!r:.80}: use MemoryResult.timeline or record['timeline']")
    times, sizes, labels = [], [], []
    for i, sample in enumerate(timeline):
        if not isinstance(sample, Sequence) or isinstance(sample, str) or len(sample) != 3:
            raise ValueError(f"timeline sample {i} must be (t_seconds, allocated_bytes, label), got {sample!r}")
        t, nbytes, label = sample
        if not (_is_number(t) and _is_number(nbytes)) or nbytes < 0 or not isinstance(label, str):
            raise ValueError(f"timeline sample {i} = {sample!r} is not a valid (t_seconds, allocated_bytes, label): "
                             f"t must be a finite number of seconds, allocated bytes a non-negative number and "
                             f"label a string ('' for a plain sample)")
        times.append(float(t))
        sizes.append(to_gib(nbytes))
        labels.append(label)
    return np.array(times), np.array(sizes), labels


def _phase_markers(ax: Axes, times: np.ndarray, labels: list[str], span: float) -> None:
    """A dotted line at each marker; one label per phase, markers closer than 1% of the span sharing a label."""
    top_of_axes = blended_transform_factory(ax.transData, ax.transAxes)
    groups: list[tuple[float, list[str]]] = []  # (time of the first marker, labels)
    previous = None
    for t, label in zip(times, labels):
        if not label:
            continue
        ax.axvline(t, color="grey", linestyle=":", linewidth=1)
        if groups and t - groups[-1][0] < 0.01 * span:
            groups[-1][1].append(label)
        else:
            groups.append((t, [label]))
    for t, group in groups:
        names = [name for name in dict.fromkeys(group) if name != previous]
        if names:
            ax.text(t, 0.98, " " + " / ".join(names), transform=top_of_axes, rotation=90, ha="left", va="top",
                    fontsize=8)
        previous = group[-1]


def timeline_chart(timeline: Sequence[Sequence[Any]], *, budget_bytes: int | None = None, title: str | None = None,
                   path: str | Path | None = None) -> Figure:
    """Allocated memory (GiB) over time, a dotted line and label at each phase marker, the peak annotated.

    Samples are `(t_seconds, allocated_bytes, label)`; a non-empty label marks the start of a phase. A run of
    markers with the same label (one per decoded token, say) gets a line each but one label, and markers at
    the same moment ("start", "load") share one label.
    """
    times, gib, labels = _read_timeline(timeline)
    budget = _check_budget(budget_bytes)
    fig, ax = new_axes(9.0, 4.5)
    ax.plot(times, gib, drawstyle="steps-post", color=COLORS["allocated"], linewidth=1.5, label="allocated")
    ax.fill_between(times, gib, step="post", color=COLORS["allocated"], alpha=0.15)

    span = (times[-1] - times[0]) or 1.0
    _phase_markers(ax, times, labels, span)
    peak = int(np.argmax(gib))
    position = (times[peak] - times[0]) / span
    align = "right" if position > 0.8 else "left" if position < 0.2 else "center"
    ax.plot([times[peak]], [gib[peak]], marker="o", color=COLORS["oom"], linestyle="none", label="peak")
    ax.annotate(f"peak {_fmt_gib(gib[peak] * GIB)}\nat {times[peak]:.3g} s", (times[peak], gib[peak]),
                xytext=(0, 8), textcoords="offset points", ha=align, va="bottom", fontsize=9, color=COLORS["oom"])
    if budget is not None:
        _budget_line(ax, budget)
    ymax = max(float(gib.max()), to_gib(budget or 0)) or 1.0
    ax.set_ylim(0, ymax * 1.25)
    ax.set_xlabel("time since the call started (s)")
    ax.set_ylabel("allocated, GiB (1024³ bytes)")
    ax.set_title(title or "Allocated memory during one captioning call")
    ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8)
    return finish(fig, path)


# ----- 3. where the weights are --------------------------------------------------------------------


def _part_of(name: str) -> str | None:
    if "Plora_" in name:
        return PLORA
    return next((part for prefix, part in _PREFIXES if name.startswith(prefix)), None)


def _parameter_count(p: torch.Tensor) -> int:
    """Logical parameter count: a bitsandbytes 4-bit weight packs two values a byte; its quant_state knows the shape."""
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    return math.prod(shape) if shape is not None else p.numel()


def _stored_bytes(p: torch.Tensor, owner: torch.nn.Module | None = None) -> int:
    """Bytes of the tensor's own storage plus, for a quantized layer's weight, bitsandbytes' statistics."""
    stats = statistics(owner) if owner is not None and p is getattr(owner, "weight", None) else []
    return p.numel() * p.element_size() + sum(t.numel() * t.element_size() for t in stats)


def weight_breakdown(model: torch.nn.Module) -> list[BreakdownRow]:
    """(part, parameter count, bytes) for each part of the model, in the order of `PARTS`.

    Bytes come from the actual storage (`numel * element_size`, so a 4-bit or INT8 weight counts as stored,
    plus bitsandbytes' statistics) and work on meta, CPU and CUDA alike. Buffers count in their
    part's bytes; the per-layer rotary cos/sin tables form their own row, with no parameters.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"weight_breakdown needs the model (a torch.nn.Module), got {type(model).__name__}")
    counts = {part: [0, 0] for part in PARTS}
    unknown = []
    modules = dict(model.named_modules())
    for name, p in model.named_parameters():
        part = _part_of(name)
        if part is None:
            unknown.append(name)
            continue
        counts[part][0] += _parameter_count(p)
        counts[part][1] += _stored_bytes(p, modules.get(name.rpartition(".")[0]))
    for name, b in model.named_buffers():
        part = ROTARY if ".rotary_emb." in name else _part_of(name)
        if part is None:
            unknown.append(name)
            continue
        counts[part][1] += b.numel() * b.element_size()
    if unknown:
        raise ValueError(f"{len(unknown)} tensor(s) belong to no known part, e.g. {unknown[:3]}; weight_breakdown "
                         f"knows InternLM-XComposer2 names (prefixes {[p for p, _ in _PREFIXES]}): pass the whole "
                         f"InternLMXComposer2ForCausalLM, not a submodule")
    return [(part, params, nbytes) for part, (params, nbytes) in counts.items()]


def _check_rows(rows: Any) -> list[BreakdownRow]:
    ok = isinstance(rows, Sequence) and not isinstance(rows, str) and len(rows) > 0
    for row in rows if ok else ():
        fields_ok = isinstance(row, Sequence) and len(row) == 3 and isinstance(row[0], str)
        ok = ok and fields_ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in row[1:])
    if not ok:
        raise ValueError(f"expected a non-empty list of (part, parameter count, bytes) rows with non-negative ints, "
                         f"got {rows!r:.120}: use weight_breakdown(model)")
    return [tuple(row) for row in rows]


def format_breakdown(rows: Sequence[BreakdownRow]) -> str:
    """A table of part / parameters / size / % share of the bytes, with a total line."""
    rows = _check_rows(rows)
    total_params = sum(r[1] for r in rows)
    total_bytes = sum(r[2] for r in rows)
    width = max(len(r[0]) for r in rows + [("total", 0, 0)])
    lines = [f"{'part':<{width}}  {'parameters':>15}  {'size':>12}  {'share':>6}"]
    for name, params, nbytes in rows + [("total", total_params, total_bytes)]:
        share = 100 * nbytes / total_bytes if total_bytes else 0.0
        lines.append(f"{name:<{width}}  {params:>15,}  {fmt_bytes(nbytes):>12}  {_fmt_share(share):>6}")
    lines.insert(-1, "-" * len(lines[0]))
    return "\n".join(lines)


def weight_breakdown_chart(model_or_rows: torch.nn.Module | Sequence[BreakdownRow], *, title: str | None = None,
                           path: str | Path | None = None) -> Figure:
    """Horizontal bars of each part's bytes (GiB, or MiB for a model under 1 GiB) labelled with size and % share.

    Buffers (the rotary tables) are drawn lighter: memory the parameter count misses.
    """
    if isinstance(model_or_rows, torch.nn.Module):
        rows = weight_breakdown(model_or_rows)
    else:
        rows = _check_rows(model_or_rows)
    total_params = sum(r[1] for r in rows)
    total_bytes = sum(r[2] for r in rows)
    unit, scale = ("GiB", GIB) if total_bytes >= GIB else ("MiB", MIB)
    values = np.array([r[2] / scale for r in rows])
    shares = [100 * r[2] / total_bytes if total_bytes else 0.0 for r in rows]
    colors = [COLORS["buffers"] if r[0] == ROTARY else COLORS["weights"] for r in rows]

    fig, ax = new_axes(8.0, 0.45 * len(rows) + 1.6)
    y = np.arange(len(rows))
    bars = ax.barh(y, values, color=colors)
    labels = [f"{fmt_bytes(r[2])} ({_fmt_share(share)})" for r, share in zip(rows, shares)]
    ax.bar_label(bars, labels, padding=3, fontsize=8)
    ax.set_yticks(y, [f"{r[0]} (buffers)" if r[0] == ROTARY else r[0] for r in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, (values.max() or 1.0) * 1.35)
    ax.set_xlabel(f"{unit} ({'1024³' if unit == 'GiB' else '1024²'} bytes)")
    ax.set_title(title or f"Weights by part: {_fmt_count(total_params)} parameters, "
                          f"{fmt_bytes(total_bytes)} with buffers")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    return finish(fig, path)


# ----- 4. quality against memory ------------------------------------------------------------------


QUALITY_YLIM = (-5.0, 112.0)  # percent, with room for the labels of points at 0% and 100%
# Label offsets in points (and alignment) tried in turn when points crowd each other.
_LABEL_PLACES = (((6, 6), "left", "bottom"), ((6, -6), "left", "top"), ((-6, 6), "right", "bottom"),
                 ((-6, -6), "right", "top"))


def _label_points(ax: Axes, xs: list[float], ys: list[float], names: list[str], xmax: float) -> None:
    """Name each point; a point near earlier ones (within 10% across, 6% up) takes the next free placement."""
    height = QUALITY_YLIM[1] - QUALITY_YLIM[0]
    for i, (x, y, name) in enumerate(zip(xs, ys, names)):
        crowd = sum(abs(x - xs[j]) < 0.1 * xmax and abs(y - ys[j]) < 0.06 * height for j in range(i))
        offset, ha, va = _LABEL_PLACES[crowd % len(_LABEL_PLACES)]
        ax.annotate(name, (x, y), xytext=offset, textcoords="offset points", ha=ha, va=va, fontsize=9)


def quality_memory_chart(records: Sequence[Mapping[str, Any]], *, budget_bytes: int | None = None,
                         quality_key: str = "exact_match", title: str | None = None,
                         path: str | Path | None = None) -> Figure:
    """Quality (`extra[quality_key]`, in %) against peak memory (GiB), one labelled point per step.

    Steps that ran out of memory or have no quality or no memory figure are listed under the axis, not drawn.
    """
    steps = _read_records(records, quality_key)
    budget = _common_budget(steps, budget_bytes)
    drawable = [not s.oom and s.quality is not None and s.top_bytes is not None for s in steps]
    shown = [s for s, ok in zip(steps, drawable) if ok]
    if not shown:
        raise ValueError(f"no record has both a memory figure and extra[{quality_key!r}] (OOM steps have no "
                         f"quality): add quality figures with build_record(..., extra={{{quality_key!r}: ...}})")
    left_out = [f"{s.name} ({'OOM' if s.oom else 'no quality' if s.quality is None else 'no memory figure'})"
                for s, ok in zip(steps, drawable) if not ok]

    fig, ax = new_axes(7.5, 4.8)
    xs = [to_gib(s.top_bytes) for s in shown]
    ys = [100 * s.quality for s in shown]
    ax.scatter(xs, ys, s=60, color=COLORS["quality"], zorder=3)
    xmax = max(xs + [to_gib(budget or 0)]) * 1.2
    _label_points(ax, xs, ys, [s.name for s in shown], xmax)
    if budget is not None:
        _budget_line(ax, budget, vertical=True)
    ax.set_xlim(0, xmax)
    ax.set_ylim(*QUALITY_YLIM)
    xlabel = "peak memory, GiB (1024³ bytes)"
    ax.set_xlabel(xlabel + (f"\nnot shown: {', '.join(left_out)}" if left_out else ""))
    ax.set_ylabel(f"{quality_key.replace('_', ' ')} (%)")
    ax.set_title(title or "Quality against peak memory")
    ax.grid(alpha=0.3)
    ax.set_axisbelow(True)
    return finish(fig, path)
