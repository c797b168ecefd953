"""Where the model's bytes are, by part: a table and a bar chart (bitsandbytes statistics included)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from xcomp_lab.core.units import fmt_bytes
from xcomp_lab.course.charts.base import (
    COLORS,
    AxisUnit,
    finish,
    fmt_count,
    fmt_share,
    new_axes,
)
from xcomp_lab.memory.footprint import statistics

VISION, PROJECTOR, EMBEDDINGS, DECODER = "vision tower", "projector", "embeddings", "decoder (without PLoRA)"
PLORA, NORM, OUTPUT, ROTARY = "PLoRA", "final norm", "output head", "rotary tables"
PARTS = (VISION, PROJECTOR, EMBEDDINGS, DECODER, PLORA, NORM, OUTPUT, ROTARY)
# Parameter-name prefixes of each part; PLoRA ("Plora_" anywhere in the name) is checked before these.
_PREFIXES = (("vit.", VISION), ("vision_proj.", PROJECTOR), ("model.tok_embeddings.", EMBEDDINGS),
             ("model.layers.", DECODER), ("model.norm.", NORM), ("output.", OUTPUT))

BreakdownRow = tuple[str, int, int]  # (part, parameter count, bytes)


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
        lines.append(f"{name:<{width}}  {params:>15,}  {fmt_bytes(nbytes):>12}  {fmt_share(share):>6}")
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
    unit = AxisUnit.for_bytes(total_bytes)
    values = np.array([unit.of(r[2]) for r in rows])
    shares = [100 * r[2] / total_bytes if total_bytes else 0.0 for r in rows]
    colors = [COLORS["buffers"] if r[0] == ROTARY else COLORS["weights"] for r in rows]

    fig, ax = new_axes(8.0, 0.45 * len(rows) + 1.6)
    y = np.arange(len(rows))
    bars = ax.barh(y, values, color=colors)
    labels = [f"{fmt_bytes(r[2])} ({fmt_share(share)})" for r, share in zip(rows, shares)]
    ax.bar_label(bars, labels, padding=3, fontsize=8)
    ax.set_yticks(y, [f"{r[0]} (buffers)" if r[0] == ROTARY else r[0] for r in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, (values.max() or 1.0) * 1.35)
    ax.set_xlabel(unit.label)
    ax.set_title(title or f"Weights by part: {fmt_count(total_params)} parameters, "
                          f"{fmt_bytes(total_bytes)} with buffers")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    return finish(fig, path)
