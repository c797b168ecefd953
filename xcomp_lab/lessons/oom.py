"""Notebook 01's helpers: read an out-of-memory message field by field, and watch autocast's weight copies pile up.

- `parse_oom_message()` reads the text of a `torch.OutOfMemoryError` into an `OomMessage` whose `table()` names
  each field and what it means: the CUDA caching allocator's message (torch 2.x: "Tried to allocate ... GPU 0 has
  a total capacity of ... of which ... is free ..."; older releases: "(GPU 0; ... total capacity; ... already
  allocated; ...)") or the course's CPU `BudgetExceededError` (`memory.measure`: op, shape, dtype, requested, in use,
  budget).
- `copy_recorder()` labels every allocation of a call with the part of the model that made it and marks the copies
  autocast makes of weights. On CUDA it writes the labels into the allocator's own history
  (`torch.cuda.memory._set_memory_metadata`, read back from `torch.cuda.memory._snapshot()`); on a CPU it is the
  course's tensor accounting (`memory.measure.CpuAccounting`), which keeps the same history in the same format.
- `copy_trace()` reads such a history into a `CopyTrace` (memory in use and bytes held by the copies after each
  event, where each part of the model began, the failed request); `copy_trace_chart()` draws it, and
  `with_categories()` colours the copies in PyTorch's own viewer (`torch.cuda._memory_viz.trace_plot`).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.transforms import blended_transform_factory
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from xcomp_lab.core.checks import check_int
from xcomp_lab.core.units import fmt_bytes
from xcomp_lab.course.charts.base import COLORS, AxisUnit, budget_line, check_budget, finish
from xcomp_lab.memory.footprint import resident_bytes
from xcomp_lab.memory.measure import CpuAccounting

# ------------------------------------------------------------------------------------------------ the message

_UNITS = {"bytes": 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4}
_SIZE = r"(\d+(?:\.\d+)?) (bytes|B|KiB|MiB|GiB|TiB)"
_CUDA_FIELDS = {
    "requested": re.compile(rf"Tried to allocate {_SIZE}"),
    "total": re.compile(rf"GPU (\d+) has a total capaci?ty of {_SIZE}"),  # some releases printed "capacty"
    "free": re.compile(rf"of which {_SIZE} is free"),
    "this_process": re.compile(rf"this process has {_SIZE} memory in use"),
    "allowed": re.compile(rf"{_SIZE} allowed;"),
    "allocated": re.compile(rf"Of the allocated memory {_SIZE} is allocated by PyTorch"),
    "private": re.compile(rf"with {_SIZE} allocated in private pools"),
    "unallocated": re.compile(rf"and {_SIZE} is reserved by PyTorch but unallocated"),
}
_OTHER_PROCESS = re.compile(rf"Process (\d+) has {_SIZE} memory in use")
_CUDA_ONE_LINE_RE = re.compile(
    rf"Tried to allocate {_SIZE} \(GPU (\d+); {_SIZE} total capacity; {_SIZE} already allocated; {_SIZE} free; "
    rf"(?:{_SIZE} allowed; )?{_SIZE} reserved in total by PyTorch\)")
_CPU = re.compile(
    rf"CPU budget exceeded \(emulating a (\d+(?:\.\d+)?) GB card\): Tried to allocate {_SIZE} in (\S+) -> shape "
    rf"\(([\d, ]*)\) (\w+)\. {_SIZE} in use of a budget of {_SIZE}\.")

CUDA = "CUDA caching allocator"
CUDA_ONE_LINE = "CUDA caching allocator (the older one-line form)"
CPU = "CPU tensor accounting (the course's BudgetExceededError)"
SMALL_REQUEST = 0.10  # a failed request below this share of the limit is not what filled the memory
CUDA_HISTORY = "the CUDA allocator's history"
CPU_HISTORY = "the course's CPU tensor accounting"


def _bytes(number: str, unit: str) -> int:
    """A size as the message prints it (two decimals at most), in bytes."""
    return round(float(number) * _UNITS[unit])


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.replace(" ", "").split(",") if part)


@dataclass(frozen=True)
class OomMessage:
    """The fields of one out-of-memory message, in bytes (as rounded as the message prints them).

    `allocated_bytes` is what live tensors held: "allocated by PyTorch" on CUDA, "in use" on the CPU accounting.
    `limit_bytes` is what this process was allowed: on CUDA the "... allowed" that
    `torch.cuda.set_per_process_memory_fraction` adds (None without one: the whole card), on a CPU the budget.
    """

    source: str  # CUDA, CUDA_ONE_LINE or CPU
    text: str = field(repr=False)
    requested_bytes: int
    allocated_bytes: int
    limit_bytes: int | None
    gpu: int | None = None
    total_capacity_bytes: int | None = None
    free_bytes: int | None = None
    reserved_unallocated_bytes: int | None = None
    private_pools_bytes: int | None = None
    processes: tuple[tuple[str, int], ...] = ()  # ("this process" or "process <pid>", bytes in use on the GPU)
    op: str | None = None  # CPU: the aten op whose outputs broke the budget
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    card_gb: float | None = None  # CPU: the card the budget emulates

    @property
    def is_cuda(self) -> bool:
        return self.source != CPU

    @property
    def reserved_bytes(self) -> int | None:
        """CUDA: what PyTorch's caching allocator holds from the driver (`torch.cuda.memory_reserved()`)."""
        if self.reserved_unallocated_bytes is None:
            return None
        return self.allocated_bytes + self.reserved_unallocated_bytes

    @property
    def this_process_bytes(self) -> int | None:
        return dict(self.processes).get("this process")

    @property
    def outside_allocator_bytes(self) -> int | None:
        """CUDA: this process's memory on the card that PyTorch's allocator does not hold (CUDA context, kernels)."""
        if self.this_process_bytes is None or self.reserved_bytes is None:
            return None
        return self.this_process_bytes - self.reserved_bytes

    @property
    def over_by_bytes(self) -> int | None:
        """How far the request went past what was left: the limit (budget, or "allowed"), else the card's free memory.

        On CUDA the allocator counts the memory it has reserved, not only what is allocated, against "allowed".
        Sizes are as rounded as the message prints them, so a few MiB either way are rounding.
        """
        if self.limit_bytes is not None:
            held = self.allocated_bytes if self.reserved_bytes is None else self.reserved_bytes
            return held + self.requested_bytes - self.limit_bytes
        if self.free_bytes is not None:
            return self.requested_bytes - self.free_bytes
        return None

    def rows(self) -> list[tuple[str, str, str]]:
        """(the message's words, the value, what it means), one row per field the message has."""
        if not self.is_cuda:
            return [
                ("Tried to allocate", fmt_bytes(self.requested_bytes), "the outputs of the op that broke the budget"),
                ("in <op>", str(self.op), "the aten op that asked for them"),
                ("-> shape, dtype", f"{self.shape} {self.dtype}", "its output"),
                ("... in use", fmt_bytes(self.allocated_bytes),
                 "tensors alive when it asked, weights included (the accounting's count)"),
                ("a budget of", fmt_bytes(self.limit_bytes),
                 f"what the emulated {self.card_gb:g} GB card allows, scaled to this model"),
            ]
        rows = [("Tried to allocate", fmt_bytes(self.requested_bytes),
                 "the one allocation that failed, as the allocator rounds it")]
        if self.total_capacity_bytes is not None:
            rows.append((f"GPU {self.gpu} has a total capacity of", fmt_bytes(self.total_capacity_bytes),
                         "the card's memory as the driver reports it (get_device_properties().total_memory)"))
        if self.free_bytes is not None:
            rows.append(("of which ... is free", fmt_bytes(self.free_bytes),
                         "free on the whole card at the failure (torch.cuda.mem_get_info()[0])"))
        for who, nbytes in self.processes:
            meaning = ("everything this process holds on the card: PyTorch's reserved memory, CUDA context, kernels"
                       if who == "this process" else "another process on the same card")
            rows.append((f"{who} has ... memory in use", fmt_bytes(nbytes), meaning))
        if self.limit_bytes is not None:
            rows.append(("... allowed", fmt_bytes(self.limit_bytes),
                         "the limit torch.cuda.set_per_process_memory_fraction set (absent without one)"))
        rows.append(("... is allocated by PyTorch", fmt_bytes(self.allocated_bytes),
                     "live tensors (torch.cuda.memory_allocated())"))
        if self.private_pools_bytes is not None:
            rows.append(("with ... allocated in private pools", fmt_bytes(self.private_pools_bytes),
                         "of which CUDA graphs' private pools hold this"))
        if self.reserved_unallocated_bytes is not None:
            rows.append(("... is reserved by PyTorch but unallocated", fmt_bytes(self.reserved_unallocated_bytes),
                         "cached by the allocator for reuse, free to PyTorch but not to others"))
        return rows

    def reading(self) -> list[str]:
        """What the fields add up to, as sentences computed from them."""
        lines = []
        if self.reserved_bytes is not None:
            lines.append(f"reserved by PyTorch = allocated + unallocated = {fmt_bytes(self.reserved_bytes)} "
                         f"(torch.cuda.memory_reserved())")
        if self.outside_allocator_bytes is not None:
            lines.append(f"this process outside PyTorch's allocator = in use - reserved = "
                         f"{fmt_bytes(self.outside_allocator_bytes)} (CUDA context and kernels)")
        over = self.over_by_bytes
        if over is not None:
            if self.limit_bytes is not None:
                held, name = ((self.allocated_bytes, "in use") if self.reserved_bytes is None
                              else (self.reserved_bytes, "reserved"))
                total = f"{name} {fmt_bytes(held)} + request {fmt_bytes(self.requested_bytes)} = " \
                        f"{fmt_bytes(held + self.requested_bytes)}"
                limit = f"the limit of {fmt_bytes(self.limit_bytes)}"
            else:
                total, limit = f"request {fmt_bytes(self.requested_bytes)}", f"the {fmt_bytes(self.free_bytes)} free"
            lines.append(f"{total}: over {limit} by {fmt_bytes(over)}" if over > 0 else
                         f"{total}: at {limit} within the message's rounding")
            whole = self.limit_bytes or self.total_capacity_bytes
            if whole:
                share = self.requested_bytes / whole
                why = ("what was already held decided the failure" if share < SMALL_REQUEST else
                       "the request itself is a large part of it")
                lines.append(f"the request is {share:.2%} of the {'limit' if self.limit_bytes else 'card'}: {why}")
        return lines

    def table(self) -> str:
        """The fields as a three-column table, then what they add up to."""
        rows = [("the message says", "value", "what it is")] + self.rows()
        widths = [max(len(row[i]) for row in rows) for i in range(2)]
        lines = [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c}" for a, b, c in rows]
        lines.insert(1, "-" * (widths[0] + widths[1] + 4 + max(len(row[2]) for row in rows)))
        return "\n".join(lines + [f"-> {line}" for line in self.reading()])


def parse_oom_message(text: str) -> OomMessage:
    """The fields of an out-of-memory message: CUDA's (torch 2.x, or the older one-line form) or the CPU budget's.

    A leading exception name ("OutOfMemoryError: ", "torch.OutOfMemoryError: ") is allowed.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be the message string, got {type(text).__name__}: pass str(error) or "
                        f"run.memory.error")
    found = _CPU.search(text)
    if found:
        card, req, req_u, op, shape, dtype, used, used_u, limit, limit_u = found.groups()
        return OomMessage(CPU, text, _bytes(req, req_u), _bytes(used, used_u), _bytes(limit, limit_u), op=op,
                          shape=_shape(shape), dtype=dtype, card_gb=float(card))
    found = _CUDA_ONE_LINE_RE.search(text)
    if found:
        g = found.groups()
        reserved = _bytes(g[11], g[12])
        allocated = _bytes(g[5], g[6])
        return OomMessage(CUDA_ONE_LINE, text, _bytes(g[0], g[1]), allocated,
                          _bytes(g[9], g[10]) if g[9] is not None else None, gpu=int(g[2]),
                          total_capacity_bytes=_bytes(g[3], g[4]), free_bytes=_bytes(g[7], g[8]),
                          reserved_unallocated_bytes=reserved - allocated)
    fields = {name: pattern.search(text) for name, pattern in _CUDA_FIELDS.items()}
    if fields["requested"] is None or fields["allocated"] is None:
        raise ValueError(f"not an out-of-memory message this course can read: {text[:160]!r}. It reads CUDA's "
                         f"('CUDA out of memory. Tried to allocate ...') and the CPU budget's ('CPU budget exceeded "
                         f"...'): pass the error's full text, e.g. str(error) or run.memory.error")

    def size(name: str) -> int | None:
        match = fields[name]
        return None if match is None else _bytes(*match.groups()[-2:])

    total = fields["total"]
    processes = tuple((f"process {pid}", _bytes(n, u)) for pid, n, u in _OTHER_PROCESS.findall(text))
    if fields["this_process"] is not None:
        processes = (("this process", size("this_process")),) + processes
    return OomMessage(CUDA, text, size("requested"), size("allocated"), size("allowed"),
                      gpu=int(total.group(1)) if total else None, total_capacity_bytes=size("total"),
                      free_bytes=size("free"), reserved_unallocated_bytes=size("unallocated"),
                      private_pools_bytes=size("private"), processes=processes)


# ------------------------------------------------------------------------------------- labelling allocations

COPY_TAG = "autocast copy of a weight"
SEPARATOR = " | "  # between the part's label and COPY_TAG in an allocation's metadata
_TO_COPY = torch.ops.aten._to_copy.default


def is_weight_copy(func: Any, args: Sequence[Any]) -> bool:
    """An op that copies a parameter to another dtype: what autocast does to each weight it multiplies."""
    return func is _TO_COPY and bool(args) and isinstance(args[0], nn.Parameter)


def model_parts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The parts of the replica a trace names, in the order a caption runs them."""
    decoder = model.model
    return ([("vision tower", model.vit), ("projector", model.vision_proj), ("embeddings", decoder.tok_embeddings)]
            + [(f"decoder layer {i}", layer) for i, layer in enumerate(decoder.layers)]
            + [("final norm", decoder.norm), ("output head", model.output)])


@contextmanager
def part_labels(model: nn.Module, on_label: Callable[[str], None]) -> Iterator[None]:
    """Call `on_label("prefill: decoder layer 3")` as each part starts; the phase comes from the decoder's calls."""
    state = {"calls": 0}

    def phase() -> str:
        calls = state["calls"]
        return "" if calls == 0 else "prefill" if calls == 1 else "decode"

    def on_decoder(*_: Any) -> None:
        state["calls"] += 1

    def on_part(name: str, *_: Any) -> None:
        on_label(f"{phase()}: {name}" if phase() else name)

    handles = [model.model.register_forward_pre_hook(on_decoder)]
    handles += [module.register_forward_pre_hook(partial(on_part, name)) for name, module in model_parts(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class CudaCopyTagger(TorchDispatchMode):
    """Writes the part of the model running, and COPY_TAG on each weight copy, into the CUDA allocator's history.

    `torch.cuda.memory._set_memory_metadata(text)` stamps every allocation after it with `text` (the snapshot's
    `user_metadata`); record the history with `torch.cuda.memory._record_memory_history()` around this block.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.label = ""
        self._labels: Any = None

    def _set_label(self, label: str) -> None:
        self.label = label
        torch.cuda.memory._set_memory_metadata(label)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not is_weight_copy(func, args):
            return func(*args, **kwargs)
        torch.cuda.memory._set_memory_metadata(self.label + SEPARATOR + COPY_TAG)
        try:
            return func(*args, **kwargs)
        finally:
            torch.cuda.memory._set_memory_metadata(self.label)

    def __enter__(self) -> CudaCopyTagger:
        self._labels = part_labels(self.model, self._set_label)
        self._labels.__enter__()
        self._set_label("")
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._labels.__exit__(None, None, None)
        torch.cuda.memory._set_memory_metadata("")


class CpuCopyRecorder(CpuAccounting):
    """The course's CPU tensor accounting, keeping a history of allocations and frees in the CUDA snapshot format.

    Used around a measured call (`run_step`), it sees the same ops as the call's own accounting and counts the
    same storages; each allocation gets the label of the part of the model running, and COPY_TAG when it is a
    weight copy. Addresses are made up (each allocation gets the next free one): a CPU storage has no place in a
    GPU's memory. `snapshot()` returns the history as `torch.cuda.memory._snapshot()` would.
    """

    def __init__(self, model: nn.Module) -> None:
        start = resident_bytes(model, "cpu")
        super().__init__(start, None, sample_every=1 << 30, max_samples=64)
        self.model = model
        self.start_bytes = start
        self.label = ""
        self.events: list[dict[str, Any]] = []
        self._addresses: dict[int, int] = {}  # storage key -> made-up address
        self._next_address = start  # the weights sit below it
        self._ops = 0
        self._labels: Any = None

    def _set_label(self, label: str) -> None:
        self.label = label

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        self._ops += 1
        metadata = self.label + SEPARATOR + COPY_TAG if is_weight_copy(func, args) else self.label
        for tensor in _tensors(out):
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in self.live and key not in self._addresses:
                size = storage.nbytes()
                self._addresses[key] = self._next_address
                self.events.append({"action": "alloc", "addr": self._next_address, "size": size, "stream": 0,
                                    "frames": [{"filename": self.label or "(outside the model)", "line": 0,
                                                "name": str(func)}],
                                    "user_metadata": metadata, "op": self._ops})
                self._next_address += size
        return out

    def freed(self, key: int, nbytes: int, ref: weakref.ref) -> None:
        counted = self.live.get(key) is ref
        super().freed(key, nbytes, ref)
        address = self._addresses.pop(key, None) if counted else None
        if address is not None:
            for action in ("free_requested", "free_completed"):
                self.events.append({"action": action, "addr": address, "size": nbytes, "stream": 0, "frames": [],
                                    "user_metadata": ""})

    def __enter__(self) -> CpuCopyRecorder:
        self._labels = part_labels(self.model, self._set_label)
        self._labels.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._labels.__exit__(None, None, None)

    def snapshot(self, error: str | None = None) -> dict[str, Any]:
        """The history as `torch.cuda.memory._snapshot()` returns it: `device_traces` and the `segments` at the end.

        `error`: the recorded call's out-of-memory message (`run.memory.error`), None when it did not fail. The
        accounting counts the failed op's outputs before it refuses them; here they become one "oom" event, as
        CUDA's allocator records a request it could not serve.
        """
        events = [dict(e) for e in self.events]
        if error is not None:
            oom = parse_oom_message(error)
            if oom.is_cuda:
                raise ValueError("error is a CUDA message; a CPU history ends in the CPU budget's message "
                                 "(run.memory.error of the CPU run)")
            allocs = [e for e in events if e["action"] == "alloc"]
            failed = [e for e in allocs if e["op"] == allocs[-1]["op"]] if allocs else []
            asked = sum(e["size"] for e in failed)
            if abs(asked - oom.requested_bytes) > max(64, oom.requested_bytes // 200):  # the message rounds sizes
                raise ValueError(f"the history does not end with the failed request of "
                                 f"{fmt_bytes(oom.requested_bytes)}: record the failing call itself, with "
                                 f"copy_recorder() around run_step()")
            addresses = {e["addr"] for e in failed}
            index = next(i for i, e in enumerate(events) if e["addr"] in addresses)
            oom_event = {"action": "oom", "size": asked,
                         "device_free": oom.limit_bytes - oom.allocated_bytes, "stream": 0,
                         "frames": failed[0]["frames"], "user_metadata": failed[0]["user_metadata"]}
            # The failed outputs' allocations and frees go; everything before the first of them stays in place.
            events = events[:index] + [oom_event] + [e for e in events[index:] if e["addr"] not in addresses]
        live = {e["addr"]: e for e in events if e["action"] == "alloc"}
        for e in events:
            if e["action"] == "free_completed":
                live.pop(e["addr"], None)
        blocks = [{"address": 0, "size": self.start_bytes, "requested_size": self.start_bytes,
                   "state": "active_allocated", "frames": []}]
        blocks += [{"address": addr, "size": e["size"], "requested_size": e["size"], "state": "active_allocated",
                    "frames": e["frames"]} for addr, e in sorted(live.items())]
        filled, cursor = [], 0
        for block in blocks:  # the viewer places blocks one after the other in their segment
            if block["address"] > cursor:
                filled.append({"address": cursor, "size": block["address"] - cursor,
                               "requested_size": 0, "state": "inactive", "frames": []})
            filled.append(block)
            cursor = block["address"] + block["size"]
        for e in events:
            e.pop("op", None)
        return {"segments": [{"device": 0, "address": 0, "total_size": cursor, "stream": 0,
                              "segment_type": "large", "blocks": filled}],
                "device_traces": [events]}


def _tensors(out: Any) -> Iterator[torch.Tensor]:
    items = out if isinstance(out, (list, tuple)) else (out,)
    for item in items:
        if isinstance(item, (list, tuple)):
            yield from _tensors(item)
        elif isinstance(item, torch.Tensor) and item.device.type == "cpu":
            yield item


def copy_recorder(model: nn.Module, device: str) -> CudaCopyTagger | CpuCopyRecorder:
    """What labels a call's allocations on `device`: the CUDA allocator's history, or the CPU accounting's own."""
    if str(device).startswith("cuda"):
        return CudaCopyTagger(model)
    if str(device) != "cpu":
        raise ValueError(f"device={device!r}; use 'cpu' or 'cuda' (the notebook's params.device)")
    return CpuCopyRecorder(model)


# ------------------------------------------------------------------------------------------------ the trace

@dataclass(frozen=True)
class CopyTrace:
    """A recorded call, event by event: memory in use and bytes held by autocast's weight copies after each.

    `allocations[i]` is how many allocations were made up to event i: the x axis, "allocation order".
    """

    source: str
    start_bytes: int
    allocations: tuple[int, ...]
    in_use: tuple[int, ...]
    copies: tuple[int, ...]
    parts: tuple[tuple[int, str], ...]  # (allocation number, label) where a part of the model first allocated
    part_rows: tuple[tuple[str, int, int, int], ...]  # (label, copies made, copies held, in use) at each part's end
    oom_event: int | None  # index of the event at which the request failed
    oom_label: str | None
    requested_bytes: int | None

    @property
    def oom_at(self) -> int | None:
        return None if self.oom_event is None else self.allocations[self.oom_event]

    @property
    def in_use_at_oom(self) -> int | None:
        return None if self.oom_event is None else self.in_use[self.oom_event]

    @property
    def copies_at_oom(self) -> int | None:
        return None if self.oom_event is None else self.copies[self.oom_event]

    @property
    def copies_made(self) -> int:
        return sum(row[1] for row in self.part_rows)

    def table(self) -> str:
        """Per part of the model, in the order it ran: copies it made, copies held and memory in use at its end."""
        width = max(len("part"), *(len(row[0]) for row in self.part_rows))
        lines = [f"{'part':<{width}}  {'copies made':>12}  {'copies held':>12}  {'in use':>11}"]
        for label, made, held, in_use in self.part_rows:
            lines.append(f"{label:<{width}}  {fmt_bytes(made):>12}  {fmt_bytes(held):>12}  {fmt_bytes(in_use):>11}")
        if self.oom_event is not None:
            lines.append(f"OOM in {self.oom_label}: asked for {fmt_bytes(self.requested_bytes)} with "
                         f"{fmt_bytes(self.in_use_at_oom)} in use, of which autocast's copies "
                         f"{fmt_bytes(self.copies_at_oom)}")
        return "\n".join(lines)


def copy_trace(snapshot: Mapping[str, Any], start_bytes: int, *, device: int = 0,
               max_entries: int | None = None, source: str = CUDA_HISTORY) -> CopyTrace:
    """Read a recorded history (`torch.cuda.memory._snapshot()` or `CpuCopyRecorder.snapshot()`) into a CopyTrace.

    `start_bytes`: memory allocated when recording began (`torch.cuda.memory_allocated()`, or the recorder's
    `start_bytes`). `max_entries`: the limit the history was recorded with; a history that reached it has lost its
    oldest events, and is refused.
    """
    traces = snapshot.get("device_traces") if isinstance(snapshot, Mapping) else None
    if not isinstance(traces, Sequence) or not 0 <= device < len(traces):
        raise ValueError("snapshot must be the dict of torch.cuda.memory._snapshot() (or CpuCopyRecorder.snapshot()) "
                         f"with a trace for device {device}: record with torch.cuda.memory._record_memory_history()")
    check_int("start_bytes", start_bytes, minimum=0, hint="memory allocated when the recording began")
    events = traces[device]
    if max_entries is not None and len(events) >= max_entries:
        raise ValueError(f"the history holds {len(events)} events, the max_entries={max_entries} it was recorded "
                         f"with: its oldest events were overwritten; record again with a larger max_entries")
    in_use, copies, allocs = start_bytes, 0, 0
    live_copies: dict[int, int] = {}
    xs, used, held = [], [], []
    parts: list[tuple[int, str]] = []
    rows: dict[str, list[int]] = {}  # label -> [copies made, copies held, in use] at its last event
    oom_event = oom_label = requested = None
    for event in events:
        action = event.get("action")
        metadata = str(event.get("user_metadata", ""))
        label, _, tag = metadata.partition(SEPARATOR)
        if action == "alloc":
            allocs += 1
            in_use += event["size"]
            if tag == COPY_TAG:
                copies += event["size"]
                live_copies[event["addr"]] = event["size"]
            if label and label not in rows:
                parts.append((allocs, label))
                rows[label] = [0, 0, 0]
            if label:
                rows[label][0] += event["size"] if tag == COPY_TAG else 0
        elif action == "free_requested":
            in_use -= event["size"]
            copies -= live_copies.pop(event["addr"], 0)
        elif action == "oom" and oom_event is None:
            oom_event, oom_label, requested = len(xs), label or "(outside the model)", event["size"]
        else:
            continue
        if label in rows and action != "free_requested":
            rows[label][1:] = [copies, in_use]
        xs.append(allocs)
        used.append(in_use)
        held.append(copies)
    if not xs:
        raise ValueError("the history has no allocation: record around the call (torch.cuda.memory."
                         "_record_memory_history() before it, _snapshot() after it)")
    return CopyTrace(source=source, start_bytes=start_bytes, allocations=tuple(xs), in_use=tuple(used),
                     copies=tuple(held), parts=tuple(parts),
                     part_rows=tuple((label, *values) for label, values in rows.items()),
                     oom_event=oom_event, oom_label=oom_label, requested_bytes=requested)


def with_categories(snapshot: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the snapshot whose allocations carry a category, so PyTorch's viewer colours autocast's copies.

    The viewer (`torch.cuda._memory_viz.trace_plot`) colours by an event's "category" and adds "unknown" for
    blocks allocated before recording; it expects "unknown" among the events' categories, so the frees carry it.
    """
    out = deepcopy(dict(snapshot))
    for trace in out["device_traces"]:
        for event in trace:
            if event.get("action") == "alloc":
                tag = str(event.get("user_metadata", "")).partition(SEPARATOR)[2]
                event["category"] = COPY_TAG if tag == COPY_TAG else "other tensor"
            elif event.get("action", "").startswith("free"):
                event["category"] = "unknown"
    return out


COPIES_COLOR = "#C9A227"
_SHORT_PARTS = {"vision tower": "ViT", "projector": "proj", "output head": "head"}


def _part_mark(label: str) -> str | None:
    """The short name a chart writes at a part's start: "L3" for decoder layer 3, "ViT", "proj", "head"."""
    part = label.rsplit(": ", 1)[-1]
    if part.startswith("decoder layer "):
        return "L" + part.rsplit(" ", 1)[1]
    return _SHORT_PARTS.get(part)


def copy_trace_chart(trace: CopyTrace, *, budget_bytes: int | None = None, title: str | None = None,
                     path: str | Path | None = None) -> Figure:
    """Above, memory in use against allocation order with autocast's copies shaded on top; below, the copies alone.

    Dotted lines mark where each part of the model began (L0, L1, ... for decoder layers), a cross the request
    that failed; a recorded failure ends the chart there (the frees that follow it are the unwinding). GiB on
    the axes, MiB when everything drawn is below 1 GiB.
    """
    budget = check_budget(budget_bytes)
    end = len(trace.allocations) if trace.oom_event is None else trace.oom_event + 1
    x = list(trace.allocations[:end])
    top = max(max(trace.in_use[:end]), budget or 0, (trace.in_use_at_oom or 0) + (trace.requested_bytes or 0))
    unit = AxisUnit.for_bytes(top)
    used = [unit.of(b) for b in trace.in_use[:end]]
    copies = [unit.of(c) for c in trace.copies[:end]]
    below = [u - c for u, c in zip(used, copies)]
    fig, (ax, low) = plt.subplots(2, 1, figsize=(9.5, 6.0), sharex=True, height_ratios=(2, 1), layout="constrained")
    plt.close(fig)  # the caller displays the returned figure
    ax.plot(x, used, drawstyle="steps-post", color=COLORS["allocated"], linewidth=1.2, label="in use")
    ax.fill_between(x, 0, below, step="post", color=COLORS["allocated"], alpha=0.12)
    ax.fill_between(x, below, used, step="post", color=COPIES_COLOR, alpha=0.7,
                    label="of which autocast's weight copies")
    low.fill_between(x, 0, copies, step="post", color=COPIES_COLOR, alpha=0.7)
    low.plot(x, copies, drawstyle="steps-post", color=COPIES_COLOR, linewidth=1.2)
    top_of_axes = blended_transform_factory(ax.transData, ax.transAxes)
    marks = [(n, _part_mark(label)) for n, label in trace.parts if n <= x[-1]]
    every = max(1, sum(1 for _, m in marks if m and m.startswith("L")) // 16)
    for n, mark in marks:
        for axes in (ax, low):
            axes.axvline(n, color="grey", linestyle=":", linewidth=0.8)
        if mark and not (mark.startswith("L") and int(mark[1:]) % every):
            ax.text(n, 0.99, mark, transform=top_of_axes, ha="left", va="top", fontsize=7)
    if budget is not None:
        budget_line(ax, budget, unit)
    if trace.oom_event is not None:
        asked = trace.in_use_at_oom + trace.requested_bytes
        ax.plot([trace.oom_at], [unit.of(asked)], marker="x", markersize=9, color=COLORS["oom"], linestyle="none",
                label=f"OOM: asked {fmt_bytes(trace.requested_bytes)} in {trace.oom_label}")
    ax.set_ylabel(unit.label)
    ax.set_ylim(0, unit.of(top) * 1.08)
    ax.legend(loc="lower right", fontsize=8)
    low.set_ylabel(f"copies held ({unit.name})")
    low.set_ylim(0, max(max(copies), 1e-9) * 1.15)
    low.set_xlabel("allocations made (allocation order)")
    low.set_xlim(0, x[-1] * 1.02)
    ax.set_title(title or f"Autocast's weight copies piling up ({trace.source})", fontsize=10)
    return finish(fig, path)
