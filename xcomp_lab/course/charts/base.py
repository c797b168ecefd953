"""What every chart shares: one colour per kind of memory, one unit, the budget line, figure handling."""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.transforms import blended_transform_factory

from xcomp_lab.core.units import GIB, MIB

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


@dataclass(frozen=True)
class AxisUnit:
    """The unit of one chart's memory axis: GiB, or MiB when everything drawn is below 1 GiB (the tiny replica)."""

    name: str  # "GiB" or "MiB"
    size: int  # bytes per unit

    @classmethod
    def for_bytes(cls, largest: float) -> AxisUnit:
        """GiB from 1 GiB up, MiB below: a tiny model's chart reads "25.17 MiB", not "0.0246 GiB"."""
        return cls("GiB", GIB) if largest >= GIB else cls("MiB", MIB)

    def of(self, nbytes: float) -> float:
        return nbytes / self.size

    def fmt(self, nbytes: float) -> str:
        return f"{self.of(nbytes):.2f} {self.name}"

    @property
    def label(self) -> str:
        return f"{self.name} ({'1024³' if self.name == 'GiB' else '1024²'} bytes)"


def fmt_count(n: int) -> str:
    if n >= 10**9:
        return f"{n / 10**9:.2f} B"
    if n >= 10**6:
        return f"{n / 10**6:.2f} M"
    return f"{n:,}"


def fmt_share(percent: float) -> str:
    return "<0.1%" if 0 < percent < 0.1 else f"{percent:.1f}%"


def is_number(value: Any) -> bool:
    """A finite real number, numpy scalars included, booleans not."""
    return isinstance(value, Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)


def check_budget(budget_bytes: Any) -> int | None:
    if budget_bytes is None:
        return None
    if not is_number(budget_bytes) or not budget_bytes > 0:
        raise ValueError(f"budget_bytes must be a positive number of bytes or None, got {budget_bytes!r}: "
                         f"e.g. Budget.for_card(48).limit_bytes")
    return int(budget_bytes)


def budget_line(ax: Axes, budget_bytes: int, unit: AxisUnit, *, vertical: bool = False) -> None:
    """The budget as a dashed line across the axes, labelled with its size at the far end."""
    label = f"budget {unit.fmt(budget_bytes)}"
    value = unit.of(budget_bytes)
    style = dict(color=COLORS["budget"], linestyle="--", linewidth=1.5, label=label)
    if vertical:
        ax.axvline(value, **style)
        where = blended_transform_factory(ax.transData, ax.transAxes)
        ax.text(value, 0.99, f" {label}", transform=where, ha="left", va="top", fontsize=8, color=COLORS["budget"])
    else:
        ax.axhline(value, **style)
        where = blended_transform_factory(ax.transAxes, ax.transData)
        ax.text(0.99, value, label, transform=where, ha="right", va="bottom", fontsize=8, color=COLORS["budget"])
