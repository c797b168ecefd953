"""Notebook 07: read one caption's memory with the tools PyTorch gives, and their CPU counterparts.

The notebook imports four of these:

- `caption_timeline()` makes one measured FP16 caption with a marker at the vision tower and at every call of
  the decoder ("prefill", then one "decode" per new token), appends its results record, and returns a
  `CaptionTimeline`. On a CPU the tensor accounting samples every allocation, so the timeline is complete. On
  CUDA the allocator keeps no timeline, so each marker also reads its allocation counter, and
  `CaptionTimeline.timeline(snapshot)` rebuilds every allocation and free from the memory history that
  `torch.cuda.memory._record_memory_history()` recorded (`trace_timeline()`).
- `largest_allocations()` ranks the allocations a CUDA memory snapshot recorded, with the line of model code
  that made each.
- `measure_prefill_parts()` runs the prefill's two suspects alone on the real prompt: one layer's eager
  attention and the output head with its FP32 upcast.
- `host_memory()` reads the machine's and the process's memory (Linux `/proc`): what `torch.cuda.mem_get_info()`
  is to a GPU, for a CPU.

`Timeline` reads a timeline marker by marker (`phases()`, `step_floors()`) and draws it.

The shared measurement (`xcomp_lab.memory.measure`) keeps only its phase markers on CUDA; `trace_timeline()` is
the workaround until it fills the CUDA timeline from the memory history itself.
"""

from __future__ import annotations

import contextlib
import linecache
import os
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

import torch
from matplotlib.figure import Figure

from xcomp_lab.core.checks import check_int
from xcomp_lab.core.units import fmt_bytes
from xcomp_lab.course.charts import timeline_chart
from xcomp_lab.course.notebook import record
from xcomp_lab.course.params import CourseParams
from xcomp_lab.course.results import build_record
from xcomp_lab.course.steps import course_budget, get_step
from xcomp_lab.lessons.host_memory import read_rss
from xcomp_lab.memory import Budget, GuardedResult, measure, run_guarded
from xcomp_lab.run.call import CaptionRun, autocast, cache_bytes, grad_mode
from xcomp_lab.run.captioning import prompt_batch

Sample = tuple[float, int, str]  # (seconds, bytes in use, marker label or "")


# --------------------------------------------------------------------------------------------- reading a timeline

@dataclass(frozen=True)
class Phase:
    """From one marker to the next marker of another label: memory at the marker, the highest sample, the last."""

    label: str
    start_s: float
    end_s: float
    at_start_bytes: int
    highest_bytes: int
    at_end_bytes: int  # the last sample before the next phase (or the last sample of the timeline)
    samples: int
    markers: int  # markers of this label in a row (one per decode step)


def phases(timeline: Sequence[Sample]) -> list[Phase]:
    """Split a timeline at its markers; markers of the same label in a row make one phase.

    Samples before the first marker are ignored.
    """
    marks = [i for i, (_, _, label) in enumerate(timeline) if label]
    if not marks:
        raise ValueError("the timeline has no marker: measure with phase marks (caption_timeline marks vision, "
                         "prefill and decode)")
    starts = [i for k, i in enumerate(marks) if k == 0 or timeline[i][2] != timeline[marks[k - 1]][2]]
    out = []
    for k, i in enumerate(starts):
        j = starts[k + 1] if k + 1 < len(starts) else len(timeline)
        chunk = timeline[i:j]
        out.append(Phase(label=timeline[i][2], start_s=float(timeline[i][0]), end_s=float(chunk[-1][0]),
                         at_start_bytes=int(chunk[0][1]), highest_bytes=int(max(b for _, b, _ in chunk)),
                         at_end_bytes=int(chunk[-1][1]), samples=len(chunk),
                         markers=sum(1 for _, _, label in chunk if label)))
    return out


def format_phases(rows: Sequence[Phase], fmt_bytes: Callable[[float], str]) -> str:
    """A table of phases: marker, memory at it, highest sample in the phase and the rise above the marker."""
    if not rows:
        raise ValueError("rows is empty: pass phases(timeline)")
    width = max(len("marker"), *(len(r.label) + (len(f" x{r.markers}") if r.markers > 1 else 0) for r in rows))
    lines = [f"{'marker':<{width}}  {'at marker':>11}  {'highest':>11}  {'rise':>11}"]
    for r in rows:
        name = r.label + (f" x{r.markers}" if r.markers > 1 else "")
        lines.append(f"{name:<{width}}  {fmt_bytes(r.at_start_bytes):>11}  {fmt_bytes(r.highest_bytes):>11}  "
                     f"{fmt_bytes(r.highest_bytes - r.at_start_bytes):>11}")
    return "\n".join(lines)


def step_floors(timeline: Sequence[Sample], label: str) -> list[int]:
    """The lowest sample from each `label` marker to the next marker of any label (one per decode step).

    Between two decode steps only what persists is left (the model, the KV cache, the tokens so far), so the
    floors climb with the cache while each step's own temporaries come and go above them.
    """
    marks = [i for i, (_, _, name) in enumerate(timeline) if name]
    mine = [i for i in marks if timeline[i][2] == label]
    if not mine:
        raise ValueError(f"no marker {label!r} in the timeline; its markers are {sorted({timeline[i][2] for i in marks})}")
    floors = []
    for i in mine:
        j = next((m for m in marks if m > i), len(timeline))
        floors.append(int(min(b for _, b, _ in timeline[i:j])))
    return floors


def timeline_with_load(load_seconds: float, weights_bytes: int, timeline: Sequence[Sample],
                       before_bytes: int = 0) -> list[Sample]:
    """A "load" marker at 0 s (memory `before_bytes`), the weights in place after `load_seconds`, then the call.

    The time between the end of the load and the start of the call is left out.
    """
    if not timeline:
        raise ValueError("timeline is empty: pass the samples of a measured call")
    if load_seconds < 0 or weights_bytes < 0 or before_bytes < 0:
        raise ValueError(f"load_seconds, weights_bytes and before_bytes must not be negative, got "
                         f"{load_seconds}, {weights_bytes}, {before_bytes}")
    load: list[Sample] = [(0.0, int(before_bytes), "load"), (float(load_seconds), int(weights_bytes), "")]
    return load + [(float(load_seconds) + float(t), int(b), label) for t, b, label in timeline]


@dataclass(frozen=True)
class Timeline:
    """Memory over one call: every allocation and free, with the phase markers among them."""

    samples: tuple[Sample, ...]
    source: str  # what the samples come from, for a reader

    def phases(self) -> list[Phase]:
        return phases(self.samples)

    def phase(self, label: str) -> Phase:
        """The phase that starts at the first marker `label`."""
        found = [p for p in self.phases() if p.label == label]
        if not found:
            raise ValueError(f"no phase {label!r}; the timeline's phases are {[p.label for p in self.phases()]}")
        return found[0]

    def table(self) -> str:
        return format_phases(self.phases(), fmt_bytes)

    def floors(self, label: str = "decode") -> list[int]:
        return step_floors(self.samples, label)

    @property
    def start_bytes(self) -> int:
        """Memory at the first sample: what was there before the call (the weights)."""
        return self.samples[0][1]

    @property
    def highest_bytes(self) -> int:
        return max(b for _, b, _ in self.samples)

    def above(self, floor_bytes: int) -> list[Sample]:
        """The samples less `floor_bytes` (e.g. the weights), to see what the call itself adds."""
        return [(t, b - floor_bytes, label) for t, b, label in self.samples]

    def chart(self, *, load_seconds: float | None = None, weights_bytes: int = 0, floor_bytes: int = 0,
              budget_bytes: int | None = None, title: str | None = None) -> Figure:
        """The timeline drawn; with `load_seconds`, the load in front of it; with `floor_bytes`, less that floor."""
        samples = self.above(floor_bytes) if floor_bytes else list(self.samples)
        if load_seconds is not None:
            samples = timeline_with_load(load_seconds, weights_bytes, samples)
        return timeline_chart(samples, budget_bytes=budget_bytes, title=title)


# -------------------------------------------------------------------------------------- the CUDA memory history

@dataclass(frozen=True)
class Mark:
    """The CUDA allocator's counters at a phase marker: how many allocations so far, and the bytes in use."""

    label: str
    allocations: int  # memory_stats()["allocation.all.allocated"]: allocations made since the process began
    allocated_bytes: int  # torch.cuda.memory_allocated(): blocks in use, each rounded up by the allocator
    requested_bytes: int  # memory_stats()["requested_bytes.all.current"]: what the tensors asked for


def cuda_mark(label: str, device: str | int | torch.device = "cuda") -> Mark:
    """Read the allocator's counters now (cheap: no synchronisation, no allocation)."""
    stats = torch.cuda.memory_stats(device)
    return Mark(label, int(stats["allocation.all.allocated"]), int(stats["allocated_bytes.all.current"]),
                int(stats["requested_bytes.all.current"]))


def device_traces(snapshot: Mapping[str, Any], device: int) -> Sequence[Any]:
    """The snapshot's per-device allocation histories, checked to be a snapshot's and to hold `device`."""
    traces = snapshot.get("device_traces") if isinstance(snapshot, Mapping) else None
    if not isinstance(traces, Sequence):
        raise ValueError("snapshot must be the dict of torch.cuda.memory._snapshot(), with 'device_traces': record "
                         "history first with torch.cuda.memory._record_memory_history()")
    if not 0 <= device < len(traces):
        raise ValueError(f"device={device}: the snapshot has traces for {len(traces)} device(s)")
    return traces


def trace_timeline(snapshot: Mapping[str, Any], marks: Sequence[Mark], device: int = 0) -> list[Sample]:
    """Every allocation and free between the first and the last mark, from a snapshot's memory history.

    `torch.cuda.memory._record_memory_history()` makes the allocator log each "alloc" and "free_requested" with
    the size the tensor asked for; `torch.cuda.memory._snapshot()["device_traces"]` returns that log. Counting
    back from the last mark's requested bytes gives the bytes in use after every entry. Each mark is placed by
    its allocation counter (after that many allocations, before the next) where the bytes equal its own, which
    checks the log against the allocator. The last mark must be read after the call and before the snapshot,
    with nothing allocated or freed in between. Times are the log's (`time_us`), from the first mark on.
    """
    traces = device_traces(snapshot, device)
    if len(marks) < 2:
        raise ValueError(f"marks must hold at least the start and the end of the call, got {len(marks)}")
    events = [e for e in traces[device] if e.get("action") in ("alloc", "free_requested")]
    if not events:
        raise ValueError("the memory history holds no allocation: record it before the call with "
                         "torch.cuda.memory._record_memory_history()")
    if any("time_us" not in e for e in events):
        raise ValueError("the memory history's entries carry no 'time_us': this torch version does not time them")
    deltas = [int(e["size"]) if e["action"] == "alloc" else -int(e["size"]) for e in events]
    at = [0] * (len(events) + 1)  # at[p]: bytes in use before entry p (at[-1]: after the last entry)
    at[-1] = marks[-1].requested_bytes
    for p in range(len(events) - 1, -1, -1):
        at[p] = at[p + 1] - deltas[p]
    allocs_before = [0] * (len(events) + 1)  # logged allocations before entry p
    for p, event in enumerate(events):
        allocs_before[p + 1] = allocs_before[p] + (event["action"] == "alloc")
    before_log = marks[-1].allocations - allocs_before[-1]  # allocations made before the log's first one
    if marks[0].allocations < before_log:
        raise ValueError(f"the memory history holds {allocs_before[-1]:,} allocations but the call made "
                         f"{marks[-1].allocations - marks[0].allocations:,}: record it with a larger max_entries")

    def position(mark: Mark, after: int) -> int:
        wanted = mark.allocations - before_log
        for p in range(after, len(events) + 1):
            if allocs_before[p] > wanted:
                break
            if allocs_before[p] == wanted and at[p] == mark.requested_bytes:
                return p
        raise ValueError(f"the memory history never holds the {mark.requested_bytes:,} bytes the allocator gave at "
                         f"marker {mark.label!r}: take the snapshot right after the call, with nothing allocated or "
                         f"freed in between")

    placed, p = [], 0
    for mark in marks:
        p = position(mark, p)
        placed.append(p)
    t0 = events[min(placed[0], len(events) - 1)]["time_us"]

    def seconds(p: int) -> float:
        return (events[min(p, len(events) - 1)]["time_us"] - t0) / 1e6

    labels: dict[int, list[str]] = {}
    for mark, p in zip(marks, placed):
        labels.setdefault(p, []).append(mark.label)
    samples: list[Sample] = []
    for p in range(placed[0], placed[-1] + 1):
        samples += [(seconds(p), at[p], label) for label in labels.get(p, [])]
        if p < placed[-1]:
            samples.append((seconds(p), at[p + 1], ""))  # after entry p, at its time
    return samples


# ----------------------------------------------------------------------------------------------- a marked caption

@dataclass(frozen=True)
class CaptionTimeline:
    """One measured caption with its markers, its results record and the budget it ran under."""

    run: CaptionRun
    marks: tuple[Mark, ...]  # CUDA only: the allocator's counters at each marker
    budget: Budget
    record: dict[str, Any]
    first_decode: FirstDecode | None = None  # the original's code only: its first decode step read apart
    im_mask: torch.Tensor | None = None  # the original's code only: the prompt's image positions, (1, T) bool

    @property
    def device(self) -> str:
        return self.run.memory.device

    def timeline(self, snapshot: Mapping[str, Any] | None = None) -> Timeline:
        """The call's timeline: on a CPU the accounting's samples; on CUDA rebuilt from `snapshot`'s history."""
        if self.device == "cpu":
            return Timeline(tuple(self.run.memory.timeline), "CPU tensor accounting (a sample at every allocation)")
        if snapshot is None:
            raise ValueError("on CUDA the timeline comes from the memory history: pass "
                             "torch.cuda.memory._snapshot(), taken right after the call")
        index = torch.device(self.device).index
        samples = trace_timeline(snapshot, self.marks, torch.cuda.current_device() if index is None else index)
        return Timeline(tuple(samples), "CUDA memory history (every allocation and free, requested sizes)")


def caption_timeline(model: Any, tokenizer: Any, images: Sequence[Any], params: CourseParams, *,
                     step_name: str = "fp16", label: str = "07-caption-timeline") -> CaptionTimeline:
    """Caption `images` as course step `step_name` says, measured, with a marker at every decoder call.

    What `xcomp_lab.run.call.run_caption` does, plus a "decode" marker per new token (it marks the first only)
    and, on CUDA, the allocator's counters at each marker for `trace_timeline()`. On a CPU every allocation is
    a timeline sample. The results record is appended to `params.results_path`.
    """
    if not images:
        raise ValueError("images is empty; pass at least one image to caption.")
    step = get_step(step_name)
    device = params.device
    cuda = device != "cpu"
    budget = course_budget(params, model.config)
    if params.original_code:
        return _original_caption_timeline(model, tokenizer, images, params, step, budget, label)
    # The replica's prompt and generation loop: imported here, as they load the replica's code.
    from xcomp_lab.model.tokenizer import CAPTION_QUERY
    from xcomp_lab.run.generate import generated_tokens, greedy_generate, turn_texts

    marks: list[Mark] = []
    meters: list[Any] = []
    shapes: dict[str, int] = {}

    def mark(name: str) -> None:
        meters[0].mark(name)
        if cuda:
            marks.append(cuda_mark(name, device))

    def on_start(meter: Any) -> None:
        meters.append(meter)
        if cuda:
            marks.append(cuda_mark("start", device))

    def caption() -> list[str]:
        calls = {"decoder": 0}

        def on_decoder(*_: Any) -> None:
            calls["decoder"] += 1
            mark("prefill" if calls["decoder"] == 1 else "decode")

        handles = [model.vit.register_forward_pre_hook(lambda *_: mark("vision")),
                   model.model.register_forward_pre_hook(on_decoder)]
        try:
            with grad_mode(step.grad), autocast(device, step.use_autocast):
                embeds, im_mask = prompt_batch(model, tokenizer, list(images), CAPTION_QUERY, params.image_size)
                shapes["prompt"] = embeds.shape[1]
                out = greedy_generate(model, tokenizer, embeds, im_mask, max_new_tokens=params.max_new_tokens,
                                      return_cache=True)
                meters[0].set_kv_cache_bytes(cache_bytes(out.cache))
                shapes["new"] = generated_tokens(tokenizer, out.sequences)
                return turn_texts(tokenizer, out.sequences)
        finally:
            for handle in handles:
                handle.remove()

    started = perf_counter()
    result: GuardedResult = run_guarded(caption, device, model=model, budget=budget, label=label, on_start=on_start,
                                        sample_every=1)
    seconds = perf_counter() - started
    if cuda:
        marks.append(cuda_mark("end", device))
    run = CaptionRun(captions=result.value, prompt_tokens=shapes.get("prompt", 0), new_tokens=shapes.get("new", 0),
                     seconds=seconds, memory=result.memory, oom_report=None if result.ok else result.report(),
                     after_release_bytes=result.after_release_bytes)
    record_ = build_record(label, {**params.as_dict(), "step": step.name}, run.memory, tokens_per_s=run.tokens_per_s,
                           caption=run.captions[0] if run.ok else None,
                           extra={"prompt_tokens": run.prompt_tokens, "new_tokens": run.new_tokens,
                                  "timeline_source": "memory history" if cuda else "cpu accounting"})
    record(params, record_)
    return CaptionTimeline(run, tuple(marks), budget, record_)


# ------------------------------------------------------------------------------------------------- the snapshot

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
    traces = device_traces(snapshot, device)
    check_int("n", n, hint="how many sizes to list")
    groups: dict[tuple[int, str], int] = {}
    for entry in traces[device]:
        if entry.get("action") != "alloc":
            continue
        key = (int(entry["size"]), _where(entry.get("frames", [])))
        groups[key] = groups.get(key, 0) + 1
    ranked = sorted(groups.items(), key=lambda item: (-item[0][0], item[0][1]))
    return [Allocation(size, count, where) for (size, where), count in ranked[:n]]


# ---------------------------------------------------------------------------------------------- the two suspects

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


# --------------------------------------------------------------------------------------------- the host's memory

@dataclass(frozen=True)
class HostMemory:
    """The machine's memory and this process's resident set, as Linux reports them (None elsewhere)."""

    available_bytes: int | None  # MemAvailable: what new allocations can get without swapping
    total_bytes: int | None  # MemTotal
    process_resident_bytes: int | None  # this process's resident set (RSS): the interpreter and libraries too


def _meminfo() -> dict[str, int]:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[name] = int(parts[0]) * 1024  # the file counts in KiB
    return fields


def host_memory() -> HostMemory:
    """`/proc/meminfo` and the process's RSS (`lessons.host_memory.read_rss`): the CPU's `torch.cuda.mem_get_info()`."""
    info = _meminfo()
    try:
        rss = read_rss()[0]
    except RuntimeError:
        rss = None
    return HostMemory(info.get("MemAvailable"), info.get("MemTotal"), rss)


# ----------------------------------------------------------------------------- the original code's first decode step

@dataclass(frozen=True)
class FirstDecode:
    """What the original code holds when its first decode step starts, read from the live tensors of the run.

    Three things of the original's code and of transformers 4.33.2 that a plain cache would not hold there:
    the storages behind the cache (each layer's V is a view into the packed `wqkv` output, so the cache keeps all
    of it), the prefill's logits (4.33.2's greedy loop still references them), and the new K and V that
    `torch.cat` builds in each layer while the old cache is still referenced.
    """

    layers: int
    prompt_tokens: int
    at_start_bytes: int  # memory above the call's start when decode step 1 begins
    cache_view_bytes: int  # the cached K and V as their shapes say
    cache_storage_bytes: int  # the storages behind them: what the cache keeps alive
    prefill_logits_bytes: int  # the prefill's logits tensors still alive at decode step 1 (0: freed)
    new_kv_bytes: int  # one layer's K and V after the first decode step's concatenation

    @property
    def packed_bytes(self) -> int:
        """What the cache keeps beyond its K and V: the rest of each layer's packed `wqkv` output."""
        return self.cache_storage_bytes - self.cache_view_bytes

    def lines(self, timeline: Timeline) -> str:
        """One line per cause, from the run's figures; `timeline` (the call's) gives decode step 1's rise."""
        one = timeline.phase("decode-1")
        rise = one.highest_bytes - one.at_start_bytes
        per_layer = self.cache_storage_bytes // max(self.layers, 1)
        packed = (f"{fmt_bytes(self.packed_bytes)} more, the packed wqkv outputs the V views keep alive"
                  if self.packed_bytes > 0 else "nothing more (no view into a larger tensor)")
        logits = (f"are still alive: {fmt_bytes(self.prefill_logits_bytes)}" if self.prefill_logits_bytes
                  else "were freed before decode step 1")
        start = (f"at decode step 1's start: {fmt_bytes(self.at_start_bytes)} above the call's start ({self.layers} "
                 f"decoder layer(s), {self.prompt_tokens} prompt tokens)")
        cache = (f"1. the cache's K and V are {fmt_bytes(self.cache_view_bytes)}; the storages behind them "
                 f"{fmt_bytes(self.cache_storage_bytes)} ({fmt_bytes(per_layer)} per layer): {packed}")
        cat = (f"3. decode step 1 rises {fmt_bytes(rise)} above its start; torch.cat builds each layer's "
               f"new K and V ({fmt_bytes(self.new_kv_bytes)} per layer) while the old cache is still referenced")
        return "\n".join([start, cache, f"2. the prefill's logits {logits}", cat])


@dataclass(frozen=True)
class OriginalTimeline:
    """One measured `model.chat` of the original code, its phase markers, and its first decode step read apart."""

    caption: str | None
    memory: Any  # xcomp_lab.memory.MemoryResult
    marks: tuple[Mark, ...]  # CUDA only: the allocator's counters at each marker
    first_decode: FirstDecode | None  # None when the call ended before a decode step
    error: str | None  # the failure, if the call ran out of memory
    prompt_tokens: int
    new_tokens: int  # calls of the decoder: the prefill and each decode step, one new token each
    im_mask: torch.Tensor | None  # the prompt's image positions as chat() passed them, (1, T) bool
    seconds: float
    after_release_bytes: int

    def timeline(self, snapshot: Mapping[str, Any] | None = None) -> Timeline:
        """The call's timeline: on a CPU the accounting's samples; on CUDA rebuilt from `snapshot`'s history."""
        if self.memory.device == "cpu":
            return Timeline(tuple(self.memory.timeline), "CPU tensor accounting (a sample at every allocation)")
        if snapshot is None:
            raise ValueError("on CUDA the timeline comes from the memory history: pass "
                             "torch.cuda.memory._snapshot(), taken right after the call")
        index = torch.device(self.memory.device).index
        samples = trace_timeline(snapshot, self.marks, torch.cuda.current_device() if index is None else index)
        return Timeline(tuple(samples), "CUDA memory history (every allocation and free, requested sizes)")


def _storage_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one storage count once)."""
    seen: dict[tuple[str, int], int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def original_chat_timeline(model: Any, tokenizer: Any, image: Any, *, device: str, query: str,
                           max_new_tokens: int, grad: str = "no_grad", use_autocast: bool = False,
                           budget: Budget | None = None) -> OriginalTimeline:
    """`model.chat` of the original remote code, measured with a marker at the vision tower ("vision"), the
    decoder's first call ("prefill"), its second ("decode-1") and every later one ("decode").

    At decode step 1 the hooks read the live objects: the cache the original passes in (`past_key_values`, its
    views and their storages) and whether the prefill's logits are still referenced. On CUDA each marker also
    reads the allocator's counters, for `OriginalTimeline.timeline(snapshot)`.
    """
    check_int("max_new_tokens", max_new_tokens, minimum=2, hint="decode step 1 needs at least two new tokens")
    cuda = device != "cpu"
    meters: list[Any] = []
    marks: list[Mark] = []
    state: dict[str, Any] = {"calls": 0, "logits": []}

    def now() -> int:
        return meters[0].current_bytes()

    def mark(name: str) -> None:
        meters[0].mark(name)
        if cuda:
            marks.append(cuda_mark(name, device))

    def on_decoder(_module: Any, _args: tuple, kwargs: dict) -> None:
        state["calls"] += 1
        calls = state["calls"]
        if calls == 1:
            state["prompt"] = int(kwargs["inputs_embeds"].shape[1])
            mask = kwargs.get("im_mask")
            state["im_mask"] = None if mask is None else mask.detach().to("cpu", torch.bool).clone()
        mark("prefill" if calls == 1 else "decode-1" if calls == 2 else "decode")
        if calls == 2:
            cache = [t for layer in kwargs.get("past_key_values") or () for t in layer]
            alive = [t for t in (ref() for ref in state["logits"]) if t is not None]
            state["first"] = {"at": now(), "views": sum(t.numel() * t.element_size() for t in cache),
                              "storages": _storage_bytes(cache), "logits": _storage_bytes(alive),
                              "new_kv": sum((t.numel() // t.shape[-2]) * (t.shape[-2] + 1) * t.element_size()
                                            for t in cache[:2]),
                              "layers": len(cache) // 2}

    def after_decoder(_module: Any, _args: Any, output: Any) -> None:
        cache = getattr(output, "past_key_values", None) or ()
        state["kv"] = sum(t.numel() * t.element_size() for layer in cache for t in layer)

    def on_head(_module: Any, _args: Any, output: torch.Tensor) -> None:
        if state["calls"] == 1:
            state["logits"].append(weakref.ref(output))

    def on_model(_module: Any, _args: Any, output: Any) -> None:
        logits = getattr(output, "logits", None)
        if state["calls"] == 1 and logits is not None:
            state["logits"].append(weakref.ref(logits))

    def on_start(meter: Any) -> None:
        meters.append(meter)
        if cuda:
            marks.append(cuda_mark("start", device))

    def call() -> str:
        handles = [model.vit.register_forward_pre_hook(lambda *_: mark("vision")),
                   model.model.register_forward_pre_hook(on_decoder, with_kwargs=True),
                   model.model.register_forward_hook(after_decoder),
                   model.output.register_forward_hook(on_head), model.register_forward_hook(on_model)]
        try:
            with grad_mode(grad), autocast(device, use_autocast):
                response, _ = model.chat(tokenizer, query, image=image, history=[], do_sample=False,
                                         max_new_tokens=max_new_tokens)
            meters[0].set_kv_cache_bytes(state.get("kv", 0))
            return response
        finally:
            for handle in handles:
                handle.remove()

    from xcomp_lab.original.matmul import FloatMatmul

    started = perf_counter()
    with FloatMatmul() if not cuda else contextlib.nullcontext():  # CPU: FP16 products in FP32, same tensors
        result = run_guarded(call, device, model=model, budget=budget, label="original-chat-timeline",
                             on_start=on_start, sample_every=1)
    seconds = perf_counter() - started
    if cuda:
        marks.append(cuda_mark("end", device))
    first = None
    if "first" in state:
        f = state["first"]
        first = FirstDecode(layers=f["layers"], prompt_tokens=state["prompt"],
                            at_start_bytes=f["at"] - result.memory.start_bytes, cache_view_bytes=f["views"],
                            cache_storage_bytes=f["storages"], prefill_logits_bytes=f["logits"],
                            new_kv_bytes=f["new_kv"])
    return OriginalTimeline(result.value if result.ok else None, result.memory, tuple(marks), first,
                            None if result.ok else result.memory.error, state.get("prompt", 0), state["calls"],
                            state.get("im_mask"), seconds, result.after_release_bytes)


def _original_caption_timeline(model: Any, tokenizer: Any, images: Sequence[Any], params: CourseParams, step: Any,
                               budget: Budget, label: str) -> CaptionTimeline:
    """caption_timeline for the original's code: its `model.chat` on the first image, saved as the file it reads."""
    import tempfile

    from xcomp_lab.original.steps import CODE_NAME, QUERY

    with tempfile.TemporaryDirectory(prefix="xcomp-lab-07-") as folder:
        image = Path(folder) / "image.png"
        images[0].save(image)
        chat = original_chat_timeline(model, tokenizer, str(image), device=params.device, query=QUERY,
                                      max_new_tokens=params.max_new_tokens, grad=step.grad,
                                      use_autocast=step.use_autocast, budget=budget)
    run = CaptionRun(captions=None if chat.caption is None else [chat.caption], prompt_tokens=chat.prompt_tokens,
                     new_tokens=chat.new_tokens, seconds=chat.seconds, memory=chat.memory,
                     oom_report=None if chat.error is None else chat.error,
                     after_release_bytes=chat.after_release_bytes)
    record_ = build_record(label, {**params.as_dict(), "step": step.name}, run.memory, tokens_per_s=None,
                           caption=chat.caption,
                           extra={"prompt_tokens": run.prompt_tokens, "new_tokens": run.new_tokens, "code": CODE_NAME,
                                  "timeline_source": "memory history" if params.device != "cpu" else "cpu accounting",
                                  "peak_phase": max(Timeline(tuple(run.memory.timeline), "").phases(),
                                                    key=lambda p: p.highest_bytes).label
                                  if params.device == "cpu" else None})
    record(params, record_)
    return CaptionTimeline(run, chat.marks, budget, record_, chat.first_decode, chat.im_mask)


def measure_original_prefill_parts(model: Any, im_mask: torch.Tensor, *, device: str, dtype: torch.dtype,
                                   grad: str = "no_grad", use_autocast: bool = False) -> PrefillParts:
    """The prefill's two suspects for the original's code, each run alone and measured: layer 0's attention and
    the output head with the FP32 upcast its forward makes, on a hidden state of the prompt's shape.

    `im_mask` is the prompt's image positions as `chat()` passed them (`CaptionTimeline.im_mask`): the PLoRA branch
    runs at those rows. The hidden state is random (memory depends on shapes, not values); the causal mask is the
    one the original's decoder builds (`_prepare_decoder_attention_mask`).
    """
    if im_mask is None or im_mask.dim() != 2:
        raise ValueError(f"im_mask must be the prompt's (1, T) bool mask (CaptionTimeline.im_mask), got {im_mask!r}")
    from xcomp_lab.original.matmul import FloatMatmul

    tokens = int(im_mask.shape[1])
    decoder = model.model
    width = model.config.hidden_size
    speed = FloatMatmul() if device == "cpu" else contextlib.nullcontext()  # CPU: FP16 products in FP32, same tensors
    with speed, grad_mode(grad), autocast(device, use_autocast):
        hidden = torch.randn(1, tokens, width, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        mask = decoder._prepare_decoder_attention_mask(torch.ones(1, tokens, dtype=torch.bool, device=device),
                                                       (1, tokens), hidden, 0)  # (1, 1, T, T)
        positions = torch.arange(tokens, device=device).unsqueeze(0)  # (1, T)
        image = im_mask.to(device)
        with measure(device) as m:
            out = decoder.layers[0].attention(hidden_states=hidden, attention_mask=mask, position_ids=positions,
                                              past_key_value=None, use_cache=False, im_mask=image)
        attention = m.result.peak_bytes - m.result.start_bytes
        del out
        with measure(device) as m:
            logits = model.output(hidden).float()  # (1, T, vocab), as the original's forward makes them
        head = m.result.peak_bytes - m.result.start_bytes
        del logits
    return PrefillParts(tokens, attention, head)


def recorded_peak_phases(*paths: str | os.PathLike) -> dict[str, str]:
    """{step: where its peak fell} from results files of `original.steps.run_steps` (a later file's record of a step
    replaces an earlier one's, as a rerun does); a step that ran out of memory reads "OOM in <phase>", one that
    failed otherwise "failed"."""
    from xcomp_lab.core.jsonl import read_jsonl

    if not paths:
        raise ValueError("pass at least one results file, e.g. '../results/original-h200/results-1.jsonl'")
    found: dict[str, str] = {}
    for path in paths:
        for r in read_jsonl(Path(path), what="original-code step records",
                            hint="run `python -m xcomp_lab.tools.original_gpu_run` (or original_steps) first"):
            extra = r.get("extra") or {}
            if r.get("error") and not r.get("oom"):
                found[r["step"]] = "failed"
            else:
                found[r["step"]] = f"OOM in {extra.get('peak_phase')}" if r.get("oom") else str(extra.get("peak_phase"))
    return found
