"""Read memory step by step: the allocator's summary, a snapshot's largest allocations, a timeline's phases.

- `trim_memory_summary()` keeps the rows of `torch.cuda.memory_summary()` a reader needs first.
- `largest_allocations()` ranks the allocations a CUDA memory snapshot recorded, with the line of model code
  that made each (`torch.cuda.memory._record_memory_history()` + `torch.cuda.memory._snapshot()`).
- `timeline_with_load()` puts the load in front of a captioning call's timeline; `phases()` reads a timeline
  marker by marker: memory at each marker and the highest sample until the next one.
- `process_resident_bytes()` is the process's resident memory on Linux, for what tensor accounting cannot see.
"""

from __future__ import annotations

import linecache
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xcomp_lab.core.checks import check_int

Sample = tuple[float, int, str]  # (seconds, allocated bytes, marker label or "")

SUMMARY_ROWS = ("Allocated memory", "Requested memory", "GPU reserved memory", "Non-releasable memory",
                "Allocations", "GPU reserved segments")


def trim_memory_summary(summary: str, rows: Sequence[str] = SUMMARY_ROWS) -> str:
    """The title, the OOM line, the column header and the `rows` of a `torch.cuda.memory_summary()` table.

    The per-pool sub-rows ("from large pool", "from small pool") and the other metrics are dropped.
    """
    if not isinstance(summary, str) or "Metric" not in summary:
        raise ValueError("summary must be the text of torch.cuda.memory_summary(), which has a 'Metric' header row")
    kept: list[str] = []
    in_table = False
    for line in summary.splitlines():
        cell = line.strip("|").strip()
        if cell.startswith("Metric"):
            in_table = True
            kept.append(line)
        elif not in_table:
            if cell and set(cell) not in ({"="}, {"-"}):
                kept.append(line)
        elif any(cell.startswith(name) for name in rows):
            kept.append(line)
    width = max(len(line) for line in kept)
    rule, edge = "|" + "-" * (width - 2) + "|", "|" + "=" * (width - 2) + "|"
    header_end = next(i for i, line in enumerate(kept) if line.strip("|").strip().startswith("Metric")) + 1
    return "\n".join([edge] + kept[:header_end] + [rule] + kept[header_end:] + [edge])


def _is_model_frame(frame: Mapping[str, Any]) -> bool:
    name = str(frame.get("filename", ""))
    return name.endswith(".py") and f"{os.sep}torch{os.sep}" not in name


def _where(frames: Sequence[Mapping[str, Any]]) -> str:
    """The innermost frame outside PyTorch (snapshot frames run innermost first), preferring the model's code."""
    candidates = [f for f in frames if _is_model_frame(f)]
    if not candidates:
        return "no Python frame outside torch"
    preferred = [f for f in candidates if "modeling_" in str(f["filename"]) or "xcomp_lab" in str(f["filename"])]
    frame = (preferred or candidates)[0]
    code = linecache.getline(str(frame["filename"]), int(frame["line"])).strip()
    where = f"{Path(str(frame['filename'])).name}:{frame['line']} in {frame['name']}"
    return f"{where}: {code}" if code else where


@dataclass(frozen=True)
class Allocation:
    """Allocations of one size made at one line, as a snapshot's history recorded them."""

    size: int
    count: int
    where: str


def largest_allocations(snapshot: Mapping[str, Any], n: int = 5, device: int = 0) -> list[Allocation]:
    """The `n` largest allocations of the recorded history, grouped by size and the line of code that made them."""
    traces = snapshot.get("device_traces") if isinstance(snapshot, Mapping) else None
    if not isinstance(traces, Sequence):
        raise ValueError("snapshot must be the dict of torch.cuda.memory._snapshot(), with 'device_traces': record "
                         "history first with torch.cuda.memory._record_memory_history()")
    if not 0 <= device < len(traces):
        raise ValueError(f"device={device}: the snapshot has traces for {len(traces)} device(s)")
    groups: dict[tuple[int, str], int] = {}
    for entry in traces[device]:
        if entry.get("action") != "alloc":
            continue
        key = (int(entry["size"]), _where(entry.get("frames", [])))
        groups[key] = groups.get(key, 0) + 1
    ranked = sorted(groups.items(), key=lambda item: (-item[0][0], item[0][1]))
    return [Allocation(size, count, where) for (size, where), count in ranked[:n]]


def timeline_with_load(load_seconds: float, weights_bytes: int, timeline: Sequence[Sample],
                       before_bytes: int = 0) -> list[Sample]:
    """A "load" marker at 0 s (memory `before_bytes`), the weights in place after `load_seconds`, then the call.

    The time between the end of the load and the start of the call is left out.
    """
    if not timeline:
        raise ValueError("timeline is empty: pass run.memory.timeline of a measured call")
    if load_seconds < 0 or weights_bytes < 0 or before_bytes < 0:
        raise ValueError(f"load_seconds, weights_bytes and before_bytes must not be negative, got "
                         f"{load_seconds}, {weights_bytes}, {before_bytes}")
    load: list[Sample] = [(0.0, int(before_bytes), "load"), (float(load_seconds), int(weights_bytes), "")]
    return load + [(float(load_seconds) + float(t), int(b), label) for t, b, label in timeline]


@dataclass(frozen=True)
class Phase:
    """From one marker to the next: memory at the marker, the highest sample until the next marker, and after."""

    label: str
    start_s: float
    end_s: float
    at_start_bytes: int
    highest_bytes: int
    at_end_bytes: int  # the last sample before the next marker (or the last sample of the timeline)
    samples: int


def phases(timeline: Sequence[Sample]) -> list[Phase]:
    """Split a timeline at its markers (samples with a label); samples before the first marker are ignored."""
    marks = [i for i, (_, _, label) in enumerate(timeline) if label]
    if not marks:
        raise ValueError("the timeline has no marker: measure with phase marks (run_caption marks vision, prefill "
                         "and decode)")
    out = []
    for k, i in enumerate(marks):
        j = marks[k + 1] if k + 1 < len(marks) else len(timeline)
        chunk = timeline[i:j]
        out.append(Phase(label=timeline[i][2], start_s=float(timeline[i][0]), end_s=float(chunk[-1][0]),
                         at_start_bytes=int(chunk[0][1]), highest_bytes=int(max(b for _, b, _ in chunk)),
                         at_end_bytes=int(chunk[-1][1]), samples=len(chunk)))
    return out


def format_phases(rows: Sequence[Phase], fmt_bytes: Callable[[float], str]) -> str:
    """A table of phases: marker, memory at it, highest sample in the phase and the rise above the marker."""
    if not rows:
        raise ValueError("rows is empty: pass phases(timeline)")
    width = max(len("marker"), *(len(r.label) for r in rows))
    lines = [f"{'marker':<{width}}  {'at marker':>11}  {'highest':>11}  {'rise':>11}"]
    for r in rows:
        lines.append(f"{r.label:<{width}}  {fmt_bytes(r.at_start_bytes):>11}  {fmt_bytes(r.highest_bytes):>11}  "
                     f"{fmt_bytes(r.highest_bytes - r.at_start_bytes):>11}")
    return "\n".join(lines)


def process_resident_bytes() -> int | None:
    """The process's resident memory (RSS) from /proc/self/statm, or None where there is no /proc (not Linux)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class PrefillParts:
    """The prefill's two suspects, each run alone on the real prompt and measured: how much each adds at its highest."""

    tokens: int
    attention_bytes: int  # one decoder layer's attention (eager: the T x T scores and their softmax)
    logits_bytes: int  # the output head over every position, then the FP32 upcast, as the model's forward does


def measure_prefill_parts(model: Any, tokenizer: Any, images: Sequence[Any], *, device: str, grad: str = "no_grad",
                          use_autocast: bool = False, image_size: int | None = None) -> PrefillParts:
    """Run layer 0's attention and the output head alone on the caption prompt, each under `measure`.

    Each figure is the measured peak minus the memory at the start of that block, so it holds what the part
    makes (and frees) itself, not its input.
    """
    import torch

    from xcomp_lab.memory import measure
    from xcomp_lab.run.call import autocast, grad_mode
    from xcomp_lab.run.captioning import prompt_batch

    with grad_mode(grad), autocast(device, use_autocast):
        embeds, im_mask = prompt_batch(model, tokenizer, list(images), image_size=image_size)  # (B, T, C), (B, T)
        tokens = embeds.shape[1]
        decoder = model.model
        mask = decoder.build_attention_mask(None, tokens, 0, embeds.dtype)  # (1, 1, T, T) or None
        positions = torch.arange(tokens, device=embeds.device).unsqueeze(0)  # (1, T)
        layer = decoder.layers[0]
        hidden = layer.attention_norm(embeds)  # (B, T, C)
        with measure(device) as m:
            out = layer.attention(hidden, mask, positions, None, im_mask)  # (B, T, C)
        attention = m.result.peak_bytes - m.result.start_bytes
        del out
        with measure(device) as m:
            logits = model.output(embeds).float()  # (B, T, vocab), as the model's forward makes them
        head = m.result.peak_bytes - m.result.start_bytes
        del logits
    return PrefillParts(tokens, attention, head)


def phase_floors(timeline: Sequence[Sample], label: str, pieces: int) -> list[int] | None:
    """The lowest sample of each of `pieces` equal slices of phase `label` (e.g. one slice per decode step).

    Between two decode steps only what persists is left (the model, the KV cache), so the floors climb with
    the cache while each step's own temporaries come and go above them. None when the phase has fewer samples
    than `pieces` (a CUDA timeline holds only its markers).
    """
    check_int("pieces", pieces, hint="e.g. the number of decode steps")
    phase = next((p for p in phases(timeline) if p.label == label), None)
    if phase is None:
        raise ValueError(f"no marker {label!r} in the timeline; its markers are "
                         f"{[s[2] for s in timeline if s[2]]}")
    start = next(i for i, s in enumerate(timeline) if s[2] == label)
    samples = [b for _, b, _ in timeline[start:start + phase.samples]]
    if len(samples) < pieces:
        return None
    bounds = [round(k * len(samples) / pieces) for k in range(pieces + 1)]
    return [min(samples[a:b]) for a, b in zip(bounds, bounds[1:])]
