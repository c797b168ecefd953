"""Run a step under a budget, catch its out-of-memory error, say where it failed, and prove the memory is back.

The report names the operation that failed (on CPU the aten op and the output the accounting saw; on CUDA
the size from the allocator's "Tried to allocate" message) and the innermost line of model code on the
stack, such as `attn_weights = attn_weights + attention_mask`.
"""

from __future__ import annotations

import gc
import re
import sys
import sysconfig
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Generic, TypeVar

import torch

from xcomp_lab.core.units import fmt_bytes
from xcomp_lab.memory.budget import Budget
from xcomp_lab.memory.measure import Measurement, MemoryResult, OomEvent, measure

T = TypeVar("T")

_UNIT_BYTES = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4}
_SIZE = r"([\d.]+) (B|KiB|MiB|GiB|TiB)"
_TRIED = re.compile(rf"Tried to allocate {_SIZE}")
# Taken when the allocation failed; by the time the error leaves the block, C++ temporaries are gone.
_ALLOCATED = re.compile(rf"{_SIZE} is allocated by PyTorch")

_STDLIB = Path(sysconfig.get_paths()["stdlib"])
_SITE_DIRS = tuple(Path(sysconfig.get_paths()[key]) for key in ("purelib", "platlib"))
# Machinery rather than model code: torch, quantisation and offload wrappers, this package.
_MACHINERY_MODULES = ("torch", "bitsandbytes", "accelerate", "xcomp_lab.memory")


def _is_machinery(path: Path) -> bool:
    for name in _MACHINERY_MODULES:
        module = sys.modules.get(name)  # a module never imported has no frames on the stack
        location = getattr(module, "__file__", None)
        if location is not None and path.is_relative_to(Path(location).parent):
            return True
    # A venv's site-packages may live under the stdlib folder; what is installed there is not stdlib.
    return path.is_relative_to(_STDLIB) and not any(path.is_relative_to(site) for site in _SITE_DIRS)


def model_frame(stack: traceback.StackSummary) -> traceback.FrameSummary | None:
    """The innermost frame that is model code, not torch, a wrapper library or the standard library."""
    for frame in reversed(stack):
        if not _is_machinery(Path(frame.filename)):
            return frame
    return None


def _size_in_message(pattern: re.Pattern, message: str) -> int | None:
    """A size quoted in a CUDA OOM message, in bytes (as rounded as the message), or None if absent."""
    match = pattern.search(message)
    if match is None:
        return None
    return round(float(match.group(1)) * _UNIT_BYTES[match.group(2)])


@dataclass(frozen=True)
class GuardedResult(Generic[T]):
    """The outcome of `run_guarded`: the value, or where the OOM happened and proof the memory came back."""

    ok: bool
    value: T | None = field(repr=False)
    memory: MemoryResult
    failed_op: str | None  # CPU: "aten.bmm.default -> (1, 8, 300, 300) float32"; CUDA: the model source line
    location: str | None  # "file.py:123 in forward: <source line>"
    requested_bytes: int | None
    in_use_at_failure_bytes: int | None
    after_release_bytes: int

    @property
    def released(self) -> bool:
        """True when memory is back at (or below) its value before the step."""
        return self.after_release_bytes <= self.memory.start_bytes

    def report(self) -> str:
        """A few lines for a notebook."""
        mem = self.memory
        name = f" '{mem.label}'" if mem.label else ""
        budget = f", budget {fmt_bytes(mem.budget_bytes)}" if mem.budget_bytes is not None else ""
        if self.ok:
            return (f"step{name} ran on {mem.device}{budget}: peak {fmt_bytes(mem.peak_bytes)} "
                    f"(weights {fmt_bytes(mem.weights_bytes)}, activations {fmt_bytes(mem.activations_bytes)})")
        requested = ("" if self.requested_bytes is None
                     else f", tried to allocate {fmt_bytes(self.requested_bytes)}")
        back = self.after_release_bytes - mem.start_bytes
        release = ("back at its value before the step" if back == 0 else
                   f"below its value before the step by {fmt_bytes(-back)}" if back < 0 else
                   f"NOT back: {fmt_bytes(back)} more than before the step")
        return "\n".join([
            f"OOM in step{name} on {mem.device}{budget}",
            f"  failed op: {self.failed_op or 'unknown'}{requested}",
            f"  at {self.location or 'no model frame on the stack'}",
            f"  in use at failure: {fmt_bytes(self.in_use_at_failure_bytes)} (before the step: "
            f"{fmt_bytes(mem.start_bytes)})",
            f"  after release: {fmt_bytes(self.after_release_bytes)}, {release}",
        ])


def _describe_failure(event: OomEvent) -> tuple[str | None, str | None, int | None, int]:
    """(failed_op, location, requested bytes, bytes in use at the failure) from what measure kept."""
    frame = model_frame(event.stack)
    location = f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}: {frame.line}" if frame else None
    if event.op is not None:
        return f"{event.op} -> {event.shape} {event.dtype}", location, event.requested_bytes, event.in_use_bytes
    failed_op = frame.line if frame is not None and frame.line else None
    in_use = _size_in_message(_ALLOCATED, event.message) or event.in_use_bytes
    return failed_op, location, _size_in_message(_TRIED, event.message), in_use


def run_guarded(step: Callable[[], T], device: str | torch.device, *, model: torch.nn.Module | None = None,
                budget: Budget | None = None, label: str = "",
                on_start: Callable[[Measurement], None] | None = None, sample_every: int = 256) -> GuardedResult[T]:
    """Run `step()` under `measure` and `budget`; on `torch.OutOfMemoryError` report it and release its memory.

    `on_start(measurement)` is called inside the measured block before the step, so a caller can keep the
    measurement to mark phases (`m.mark("prefill")`) or report KV cache bytes from inside the step.
    `sample_every`: on CPU, one timeline sample every that many allocations (1: every allocation).

    Other exceptions propagate. `after_release_bytes` is measured after the failed step's frames are dropped
    and garbage collected (and, on CUDA, the cache emptied).
    """
    if not callable(step):
        raise ValueError(f"step must be a callable taking no arguments, got {type(step).__name__}: "
                         f"wrap the call, e.g. run_guarded(lambda: model(**inputs), 'cpu')")
    guard = measure(device, model=model, budget=budget, label=label, raise_oom=False, sample_every=sample_every)
    value = None
    with guard:
        if on_start is not None:
            on_start(guard)
        value = step()
    # measure dropped the traceback; frames in reference cycles still need a collection to go.
    gc.collect()
    if guard.is_cuda:
        torch.cuda.synchronize(guard.device)
        torch.cuda.empty_cache()
    after = guard.current_bytes()
    event = guard.failure
    if event is None:
        return GuardedResult(ok=True, value=value, memory=guard.result, failed_op=None, location=None,
                             requested_bytes=None, in_use_at_failure_bytes=None, after_release_bytes=after)
    failed_op, location, requested, in_use = _describe_failure(event)
    return GuardedResult(ok=False, value=None, memory=guard.result, failed_op=failed_op, location=location,
                         requested_bytes=requested, in_use_at_failure_bytes=in_use, after_release_bytes=after)
