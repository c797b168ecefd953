"""Steps side by side: stacked bars of weights, KV cache and activations, the budget, OOM and the prediction."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from xcomp_lab.course.charts.base import (
    COLORS,
    LIFT_WITHIN,
    MIN_OTHER_SHARE,
    OOM_HATCH,
    QUALITY_SHORT,
    SEGMENTS,
    AxisUnit,
    budget_line,
    finish,
    new_axes,
)
from xcomp_lab.course.charts.records import StepBar, common_budget, read_step_records


def _bar_text(step: StepBar, quality_key: str | None, unit: AxisUnit) -> str:
    top = step.top_bytes
    if step.oom:
        lines = ["OOM"] + ([f"at {unit.fmt(top)}"] if top else [])
    else:
        lines = [unit.fmt(top)] if top else ["not measured"]
    if step.quality is not None:
        lines.append(f"{QUALITY_SHORT.get(quality_key, quality_key)} {step.quality:.0%}")
    if step.tokens_per_s is not None:
        lines.append(f"{step.tokens_per_s:.1f} tok/s")
    return "\n".join(lines)


def _bar_text_key(steps: list[StepBar], quality_key: str | None) -> str:
    """What the text above the bars says, as the x-axis label."""
    parts = ["above each bar: peak"]
    short = QUALITY_SHORT.get(quality_key, quality_key)
    if any(s.quality is not None for s in steps):
        parts.append(f"{short} = {quality_key.replace('_', ' ')}" if short != quality_key else quality_key)
    if any(s.tokens_per_s is not None for s in steps):
        parts.append("generation speed")
    return ", ".join(parts)


def _draw_budgets(ax: Axes, steps: list[StepBar], budget_bytes: int | None, width: float,
                  unit: AxisUnit) -> list[float]:
    """One line for a common budget, else a short dashed line over each bar at its own budget.

    Per-step budgets are labelled with their size where it changes from the bar before.
    """
    if budget_bytes is not None:
        budget_line(ax, budget_bytes, unit)
        return [unit.of(budget_bytes)]
    levels = []
    previous = None
    for x, step in enumerate(steps):
        if step.budget_bytes is not None:
            level = unit.of(step.budget_bytes)
            right = x + width / 2 + 0.1
            ax.plot([x - width / 2 - 0.1, right], [level, level], color=COLORS["budget"], linestyle="--",
                    linewidth=1.5, label="budget (per step)" if not levels else "_nolegend_")
            if step.budget_bytes != previous:
                ax.text(right, level, unit.fmt(step.budget_bytes), ha="right", va="top", fontsize=7,
                        color=COLORS["budget"], bbox=dict(facecolor="white", edgecolor="none", pad=1, alpha=0.8))
            levels.append(level)
        previous = step.budget_bytes
    return levels


def _draw_stacks(ax: Axes, steps: list[StepBar], width: float, unit: AxisUnit) -> list[tuple[Artist, str]]:
    """The stacked segments of every bar, OOM bars hatched red; returns the legend entries."""
    legend: list[tuple[Artist, str]] = []
    tallest = max(unit.of(s.top_bytes or 0) for s in steps)
    bottom = np.zeros(len(steps))
    for field, label, color in SEGMENTS:
        heights = np.array([unit.of(getattr(s, field)) for s in steps])
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


def _draw_predicted(ax: Axes, steps: list[StepBar], unit: AxisUnit) -> list[float]:
    """The predicted peaks as hollow diamonds (one line artist); returns their levels in the axis unit."""
    predicted = [(i, unit.of(s.predicted_peak_bytes)) for i, s in enumerate(steps) if s.predicted_peak_bytes is not None]
    if not predicted:
        return []
    px, py = zip(*predicted)
    ax.plot(px, py, linestyle="none", marker="D", markersize=8, markerfacecolor="none",
            markeredgecolor=COLORS["predicted"], markeredgewidth=1.5, label="predicted peak")
    return list(py)


def _write_bar_texts(ax: Axes, steps: list[StepBar], budget_bytes: int | None, ymax: float, quality_key: str | None,
                     unit: AxisUnit) -> None:
    """The text above each bar, lifted over a budget line or prediction marker sitting just above the bar."""
    for i, step in enumerate(steps):
        top = unit.of(step.top_bytes or 0)
        budget = budget_bytes if budget_bytes is not None else step.budget_bytes
        nearby = [unit.of(v) for v in (budget, step.predicted_peak_bytes) if v is not None]
        anchor = max([top] + [level for level in nearby if top <= level < top + LIFT_WITHIN * ymax])
        ax.annotate(_bar_text(step, quality_key, unit), (i, anchor), xytext=(0, 4), textcoords="offset points",
                    ha="center", va="bottom", fontsize=8, color=COLORS["oom"] if step.oom else "black",
                    fontweight="bold" if step.oom else "normal")


def steps_chart(records: Sequence[Mapping[str, Any]], *, budget_bytes: int | None = None, title: str | None = None,
                quality_key: str | None = "exact_match", path: str | Path | None = None) -> Figure:
    """Each step's peak as a stacked bar (weights / KV cache / activations / other), in GiB (MiB when small).

    The budget (given, or the one all records share; else each record's own) is a dashed line; an OOM step's
    bar is hatched red up to the memory in use when it failed and says "OOM"; the predicted peak is a hollow
    diamond; `extra[quality_key]` (None: no quality, as for random weights) and tokens/s, when present, are
    written above the bar.
    """
    steps = read_step_records(records, quality_key)
    budget = common_budget(steps, budget_bytes)
    width = 0.6
    drawn = [s.top_bytes or 0 for s in steps] + [s.budget_bytes or 0 for s in steps]
    drawn += [budget or 0] + [s.predicted_peak_bytes or 0 for s in steps]
    unit = AxisUnit.for_bytes(max(drawn))
    fig, ax = new_axes(max(6.0, 1.3 * len(steps) + 3.0), 4.8)
    legend = _draw_stacks(ax, steps, width, unit)
    levels = _draw_budgets(ax, steps, budget, width, unit) + _draw_predicted(ax, steps, unit)
    ymax = max([unit.of(s.top_bytes or 0) for s in steps] + levels) or 1.0
    _write_bar_texts(ax, steps, budget, ymax, quality_key, unit)

    ax.set_ylim(0, ymax * 1.3)
    long_names = len(steps) > 5 or max(len(s.name) for s in steps) > 12
    ax.set_xticks(np.arange(len(steps)), [s.name for s in steps], rotation=20 if long_names else 0,
                  ha="right" if long_names else "center")
    ax.set_xlim(-0.7, len(steps) - 0.3)
    ax.set_ylabel(unit.label)
    ax.set_xlabel(_bar_text_key(steps, quality_key), fontsize=8)
    ax.set_title(title or "Peak memory per step")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    handles, labels = ax.get_legend_handles_labels()  # budget and prediction lines
    legend += list(zip(handles, labels))
    fig.legend(*zip(*legend), loc="outside right upper", fontsize=8)
    return finish(fig, path)
