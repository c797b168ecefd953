"""Allocated memory during one captioning call, with its phases and its peak."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.transforms import blended_transform_factory

from xcomp_lab.course.charts.base import (
    COLORS,
    AxisUnit,
    budget_line,
    check_budget,
    finish,
    is_number,
    new_axes,
)


def _read_timeline(timeline: Any) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if isinstance(timeline, (str, Mapping)) or not isinstance(timeline, Sequence) or not timeline:
        raise ValueError(f"timeline must be a non-empty list of (t_seconds, allocated_bytes, label) samples, "
                         f"got {timeline!r:.80}: use MemoryResult.timeline or record['timeline']")
    times, sizes, labels = [], [], []
    for i, sample in enumerate(timeline):
        if not isinstance(sample, Sequence) or isinstance(sample, str) or len(sample) != 3:
            raise ValueError(f"timeline sample {i} must be (t_seconds, allocated_bytes, label), got {sample!r}")
        t, nbytes, label = sample
        if not (is_number(t) and is_number(nbytes)) or nbytes < 0 or not isinstance(label, str):
            raise ValueError(f"timeline sample {i} = {sample!r} is not a valid (t_seconds, allocated_bytes, label): "
                             f"t must be a finite number of seconds, allocated bytes a non-negative number and "
                             f"label a string ('' for a plain sample)")
        times.append(float(t))
        sizes.append(float(nbytes))
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
    """Allocated memory (GiB, MiB when small) over time, a dotted line and label at each marker, the peak annotated.

    Samples are `(t_seconds, allocated_bytes, label)`; a non-empty label marks the start of a phase. A run of
    markers with the same label (one per decoded token, say) gets a line each but one label, and markers at
    the same moment ("start", "load") share one label.
    """
    times, nbytes, labels = _read_timeline(timeline)
    budget = check_budget(budget_bytes)
    unit = AxisUnit.for_bytes(max(float(nbytes.max()), budget or 0))
    level = nbytes / unit.size
    fig, ax = new_axes(9.0, 4.5)
    ax.plot(times, level, drawstyle="steps-post", color=COLORS["allocated"], linewidth=1.5, label="allocated")
    ax.fill_between(times, level, step="post", color=COLORS["allocated"], alpha=0.15)

    span = (times[-1] - times[0]) or 1.0
    _phase_markers(ax, times, labels, span)
    peak = int(np.argmax(level))
    position = (times[peak] - times[0]) / span
    align = "right" if position > 0.8 else "left" if position < 0.2 else "center"
    ax.plot([times[peak]], [level[peak]], marker="o", color=COLORS["oom"], linestyle="none", label="peak")
    ax.annotate(f"peak {unit.fmt(nbytes[peak])}\nat {times[peak]:.3g} s", (times[peak], level[peak]),
                xytext=(0, 8), textcoords="offset points", ha=align, va="bottom", fontsize=9, color=COLORS["oom"])
    if budget is not None:
        budget_line(ax, budget, unit)
    ymax = max(float(level.max()), unit.of(budget or 0)) or 1.0
    ax.set_ylim(0, ymax * 1.25)
    ax.set_xlabel("time since the call started (s)")
    ax.set_ylabel(f"allocated, {unit.label}")
    ax.set_title(title or "Allocated memory during one captioning call")
    ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8)
    return finish(fig, path)
