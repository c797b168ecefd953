"""Caption quality against peak memory, one point per step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from xcomp_lab.course.charts.base import (
    COLORS,
    AxisUnit,
    budget_line,
    finish,
    new_axes,
)
from xcomp_lab.course.charts.records import common_budget, read_step_records

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
    """Quality (`extra[quality_key]`, in %) against peak memory (GiB, MiB when small), one labelled point per step.

    Steps that ran out of memory or have no quality or no memory figure are listed under the axis, not drawn.
    """
    steps = read_step_records(records, quality_key)
    budget = common_budget(steps, budget_bytes)
    drawable = [not s.oom and s.quality is not None and s.top_bytes is not None for s in steps]
    shown = [s for s, ok in zip(steps, drawable) if ok]
    if not shown:
        raise ValueError(f"no record has both a memory figure and extra[{quality_key!r}] (OOM steps have no "
                         f"quality): add quality figures with build_record(..., extra={{{quality_key!r}: ...}})")
    left_out = [f"{s.name} ({'OOM' if s.oom else 'no quality' if s.quality is None else 'no memory figure'})"
                for s, ok in zip(steps, drawable) if not ok]

    unit = AxisUnit.for_bytes(max([s.top_bytes for s in shown] + [budget or 0]))
    fig, ax = new_axes(7.5, 4.8)
    xs = [unit.of(s.top_bytes) for s in shown]
    ys = [100 * s.quality for s in shown]
    ax.scatter(xs, ys, s=60, color=COLORS["quality"], zorder=3)
    xmax = max(xs + [unit.of(budget or 0)]) * 1.2
    _label_points(ax, xs, ys, [s.name for s in shown], xmax)
    if budget is not None:
        budget_line(ax, budget, unit, vertical=True)
    ax.set_xlim(0, xmax)
    ax.set_ylim(*QUALITY_YLIM)
    xlabel = f"peak memory, {unit.label}"
    ax.set_xlabel(xlabel + (f"\nnot shown: {', '.join(left_out)}" if left_out else ""))
    ax.set_ylabel(f"{quality_key.replace('_', ' ')} (%)")
    ax.set_title(title or "Quality against peak memory")
    ax.grid(alpha=0.3)
    ax.set_axisbelow(True)
    return finish(fig, path)
