"""Measure the memory of a block of code, with one result schema on CUDA and on CPU.

    with measure("cpu", model=model) as m:
        m.mark("prefill"); ...; m.mark("decode"); ...
    print(m.result)

On CUDA the caching allocator's own statistics are read (peak reset at entry). On CPU the process RSS is
too coarse, so a `TorchDispatchMode` sees every op's outputs and accounts tensor storage exactly: each new
storage is counted once and subtracted when it is freed. Storages alive before the block are invisible to
it, except the model's parameters and buffers, which count in `start_bytes`.

What the CPU accounting cannot see, unlike the CUDA allocator: scratch memory a kernel allocates for
itself (not as an op's output), storages grown in place by `resize_`, and the freeing of tensors that
existed before the block (weights replaced inside it stay counted). The Python dispatch makes every op
slower (about x1.2 on a 512-wide model, x2 to x3.5 on a 128-wide one): time tokens/s outside it.
"""

from __future__ import annotations

import gc
import traceback
import weakref
from dataclasses import dataclass, field
from functools import partial
from time import perf_counter
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode

from xcomp_lab.core.checks import check_int
from xcomp_lab.core.units import fmt_bytes
from xcomp_lab.memory.budget import Budget, BudgetExceededError, resolve_device
from xcomp_lab.memory.footprint import resident_bytes

Sample = tuple[float, int, str]  # (seconds since entry, allocated bytes, phase label or "")

CUDA_KIND = "cuda-allocator"
CPU_KIND = "cpu-accounting"


@dataclass(frozen=True)
class MemoryResult:
    """What one measured block used. Byte counts are of the measured device only."""

    device: str
    kind: str  # "cuda-allocator" | "cpu-accounting"
    label: str
    start_bytes: int
    peak_bytes: int
    end_bytes: int
    reserved_peak_bytes: int | None  # the CUDA allocator's reserved peak; None on CPU
    weights_bytes: int  # the model's parameters+buffers on this device
    kv_cache_bytes: int  # as set by the caller with set_kv_cache_bytes
    activations_bytes: int  # peak - weights - KV cache - other memory resident at start, never negative
    budget_bytes: int | None
    wall_s: float
    oom: bool
    error: str | None
    timeline: tuple[Sample, ...] = field(default=(), repr=False)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (the timeline as lists)."""
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out["timeline"] = [list(sample) for sample in self.timeline]
        return out

    def __str__(self) -> str:
        name = f"[{self.label}] " if self.label else ""
        reserved = ("" if self.reserved_peak_bytes is None
                    else f", reserved peak {fmt_bytes(self.reserved_peak_bytes)}")
        budget = f" of {fmt_bytes(self.budget_bytes)} budget" if self.budget_bytes is not None else ""
        status = f" | OOM: {self.error.splitlines()[0][:120]}" if self.oom else ""
        return (f"{name}{self.device} ({self.kind}): peak {fmt_bytes(self.peak_bytes)}{budget} = weights "
                f"{fmt_bytes(self.weights_bytes)} + KV cache {fmt_bytes(self.kv_cache_bytes)} + activations "
                f"{fmt_bytes(self.activations_bytes)} | start {fmt_bytes(self.start_bytes)}, end "
                f"{fmt_bytes(self.end_bytes)}{reserved} | {self.wall_s:.3f} s{status}")


@dataclass(frozen=True)
class OomEvent:
    """What `measure` saw of a `torch.OutOfMemoryError`, kept without the frames (which hold tensors)."""

    message: str
    in_use_bytes: int  # memory in use when the error reached the end of the block
    stack: traceback.StackSummary  # file, line, function and source of each frame, no locals
    op: str | None = None  # CPU accounting only: the aten op whose outputs broke the budget
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    requested_bytes: int | None = None


# Ops whose output aliases an input although their schema does not say so.
_UNANNOTATED_VIEWS = frozenset({"aten::_unsafe_view", "aten::unsafe_chunk", "aten::unsafe_split",
                                "aten::unsafe_split_with_sizes"})
# torch.tensor(data) allocates below the Python dispatch key, then hands the new tensor to lift_fresh.
_LIFTS = frozenset({"aten::lift_fresh", "aten::lift"})
_NOTHING = "nothing"  # the op's outputs are all views or in-place results: no new storage
_ALL = "all"  # one return, tensor or list of tensors, newly allocated
_COMPOSITE = torch._C.DispatchKey.CompositeImplicitAutograd


class _Decompose:
    """Plan for a composite op: run its decomposition with the mode on, so its inner ops are seen."""

    __slots__ = ("kernel",)

    def __init__(self, func: torch._ops.OpOverload) -> None:
        # What func.decompose would pick, looked up once instead of on every call.
        self.kernel = func.py_kernels.get(_COMPOSITE) or partial(func._op_dk, _COMPOSITE)


Plan = str | tuple[bool, ...] | _Decompose


def _plan_for(func: torch._ops.OpOverload) -> Plan:
    """Which of an op's returns may be new storage, from its schema's alias annotations."""
    if func.namespace == "prim":  # fake tensors answer `.device` through prim ops, unknown to the dispatcher
        return _NOTHING
    # Composite ops reach this mode whole when autograd is off (inference_mode). Their schema cannot say
    # whether they copy (`to`, `reshape`, `contiguous` may or may not) nor show their temporaries (`matmul`).
    if _COMPOSITE in func.py_kernels or torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), _COMPOSITE):
        return _Decompose(func)
    schema = func._schema
    if schema.name in _LIFTS:
        return _ALL
    fresh = tuple(ret.alias_info is None and "Tensor" in str(ret.type) for ret in schema.returns)
    if schema.name in _UNANNOTATED_VIEWS or not any(fresh):
        return _NOTHING
    return _ALL if len(fresh) == 1 else fresh


class CpuAccounting(TorchDispatchMode):
    """Counts every new CPU storage an op returns, once, and subtracts it when the storage is freed.

    Keyed by the C++ StorageImpl address (`_cdata`), so views and in-place results, which share a storage,
    are never counted twice. The per-op path is kept short because it runs for every aten op.

    Subclasses (the estimator's accounting, notebook 01's allocation recorder) extend two hooks: `allocated(nbytes)`
    runs after every counted allocation, `freed(key, nbytes, ref)` when a counted storage dies; `live` maps each
    storage counted now to a weak reference to it.
    """

    # Fake tensors (FakeTensorMode) hold no memory, so a measured block that makes some ignores them; the
    # estimator's subclass counts them, as the memory they stand for.
    counts_fake = False
    # The device whose storages count. The estimator's per-card accounting counts a fake device standing for a GPU.
    counted_device = torch.device("cpu")

    def __init__(self, start_bytes: int, budget: Budget | None, sample_every: int, max_samples: int) -> None:
        super().__init__()
        self.current = start_bytes
        self.peak = start_bytes
        self.budget = budget
        self.limit = budget.limit_bytes if budget is not None else None
        self.timeline: list[Sample] = []
        self.t0 = perf_counter()
        self.live: dict[int, weakref.ref] = {}  # StorageImpl address -> weak ref to the storage
        self._plans: dict[Any, Plan] = {}
        self._sample_every = sample_every
        self._countdown = sample_every
        self._max_samples = max_samples

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # Otherwise torch wraps __torch_dispatch__ in a dynamo-disabling shim, two more Python calls per op;
        # nothing in this mode is compiled.
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        plan = self._plans.get(func)
        if plan is None:
            plan = self._plans[func] = _plan_for(func)
        if type(plan) is _Decompose:
            # Re-push this mode for the inner ops; the plain push is much cheaper than `with self`, whose
            # bookkeeping is already in place while the mode is active.
            torch._C._push_on_torch_dispatch_stack(self)
            try:
                return plan.kernel(*args, **kwargs) if kwargs else plan.kernel(*args)
            finally:
                torch._C._pop_torch_dispatch_stack(None)
        out = func(*args, **kwargs) if kwargs else func(*args)
        if plan is _NOTHING:
            return out
        if plan is _ALL and type(out) is torch.Tensor:
            if not out.is_cpu:
                return out
            storage = out.untyped_storage()
            key = storage._cdata
            if key in self.live:
                return out
            nbytes = storage.nbytes()
            if nbytes == 0:
                return out
            # Made before reading `current`: allocating the ref may run the GC, whose frees adjust `current`.
            ref = weakref.ref(storage, partial(self.freed, key, nbytes))
            if self.limit is not None and self.current + nbytes > self.limit:
                error = self._over_budget(func, tuple(out.shape), out.dtype, nbytes)
                # The traceback keeps this frame alive: drop the op's outputs so they are freed now.
                out = storage = ref = None
                raise error
            self.live[key] = ref
            self.allocated(nbytes)
            return out
        self._account_many(func, plan, out)
        return out

    def _account_many(self, func: Any, plan: Plan, out: Any) -> None:
        """The general path: several returns, lists of tensors, tensor subclasses."""
        if plan is _ALL:
            items = out if isinstance(out, (list, tuple)) else (out,)
        else:
            items = []
            for item, fresh in zip(out, plan):
                if fresh:
                    items.extend(item if isinstance(item, (list, tuple)) else (item,))
        refs: dict[int, weakref.ref] = {}
        total = 0
        largest = None
        for tensor in items:
            if not isinstance(tensor, torch.Tensor) or tensor.device != self.counted_device:
                continue
            if isinstance(tensor, FakeTensor) and not self.counts_fake:
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            nbytes = self.storage_bytes(storage)
            if key in self.live or key in refs or nbytes == 0:
                continue
            refs[key] = weakref.ref(storage, partial(self.freed, key, nbytes))
            total += nbytes
            if largest is None or nbytes > largest[2]:
                largest = (tuple(tensor.shape), tensor.dtype, nbytes)
        if not refs:
            return
        if self.limit is not None and self.current + total > self.limit:
            shape, dtype, _ = largest
            items = refs = storage = tensor = None
            raise self._over_budget(func, shape, dtype, total)
        self.live.update(refs)
        self.allocated(total)

    @staticmethod
    def storage_bytes(storage: torch.UntypedStorage) -> int:
        """What a new storage costs on the general path (a hook for `xcomp_lab.estimate.caption`).

        The estimator's fake tensors always take this path, and it rounds sizes as the CUDA caching allocator
        does; plain tensors take the fast path in `__torch_dispatch__`, which reads `nbytes()` itself.
        """
        return storage.nbytes()

    def allocated(self, nbytes: int) -> None:
        """Count `nbytes` of new storage (the hook subclasses extend)."""
        self.current += nbytes
        if self.current > self.peak:
            self.peak = self.current
        self._countdown -= 1
        if not self._countdown:
            self._countdown = self._sample_every
            self.sample("")

    def freed(self, key: int, nbytes: int, ref: weakref.ref) -> None:
        """Uncount a dead storage, if it is the one counted under `key` (the hook subclasses extend)."""
        if self.live.get(key) is ref:
            del self.live[key]
            self.current -= nbytes

    def sample(self, label: str) -> None:
        """Append (time, current bytes, label); thin out unlabelled samples when the list is full."""
        self.timeline.append((perf_counter() - self.t0, self.current, label))
        if len(self.timeline) > self._max_samples:
            self.timeline = [s for i, s in enumerate(self.timeline) if s[2] or i % 2 == 0]
            self._sample_every *= 2

    def _over_budget(self, func: Any, shape: tuple[int, ...], dtype: torch.dtype,
                     nbytes: int) -> BudgetExceededError:
        dtype_name = str(dtype).removeprefix("torch.")
        message = (f"CPU budget exceeded (emulating a {self.budget.card_gb:g} GB card): Tried to allocate "
                   f"{fmt_bytes(nbytes)} in {func} -> shape {shape} {dtype_name}. "
                   f"{fmt_bytes(self.current)} in use "
                   f"of a budget of {fmt_bytes(self.limit)}.")
        return BudgetExceededError(message, op=str(func), shape=shape, dtype=dtype_name, requested_bytes=nbytes,
                                   in_use_bytes=self.current, budget_bytes=self.limit)


class Measurement:
    """The context manager `measure` returns; `result` holds the `MemoryResult` after the block."""

    def __init__(self, device: str, model: torch.nn.Module | None, label: str, budget: Budget | None,
                 raise_oom: bool, sample_every: int, max_samples: int) -> None:
        self.device = device
        self.model = model
        self.label = label
        self.budget = budget
        self.raise_oom = raise_oom
        self.failure: OomEvent | None = None
        self._sample_every = sample_every
        self._max_samples = max_samples
        self._cpu: CpuAccounting | None = None
        self._timeline: list[Sample] = []
        self._kv_cache_bytes = 0
        self._state = "new"
        self._numbers: dict[str, Any] = {}

    @property
    def is_cuda(self) -> bool:
        return self.device != "cpu"

    def __enter__(self) -> Measurement:
        if self._state != "new":
            raise RuntimeError("a measurement can be entered only once: call measure(...) again for a new block")
        self._state = "running"
        weights = resident_bytes(self.model, self.device)
        if self.is_cuda:
            # Garbage still held by reference cycles would count as in use at the start.
            gc.collect()
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            start = torch.cuda.memory_allocated(self.device)
            if self.budget is not None:
                self.budget.apply()
            self._t0 = perf_counter()
            self._timeline.append((0.0, start, "start"))
        else:
            # The weights existed before the block, so the accounting starts from them.
            start = weights
            self._cpu = CpuAccounting(start, self.budget, self._sample_every, self._max_samples)
            self._cpu.sample("start")
            self._cpu.__enter__()
            self._t0 = self._cpu.t0
        self._numbers.update(start=start, weights=weights)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._cpu is not None:
            self._cpu.__exit__(None, None, None)
        try:
            if self.is_cuda:
                torch.cuda.synchronize(self.device)
            wall = perf_counter() - self._t0
            end = self.current_bytes()
            if self.is_cuda:
                peak = torch.cuda.max_memory_allocated(self.device)
                reserved_peak = torch.cuda.max_memory_reserved(self.device)
                self._timeline.append((wall, end, "end"))
            else:
                peak, reserved_peak = self._cpu.peak, None
                self._cpu.sample("end")
                self._timeline = self._cpu.timeline
        finally:
            if self.is_cuda and self.budget is not None:
                self.budget.restore()
        self._numbers.update(peak=peak, end=end, reserved_peak=reserved_peak, wall=wall,
                             error=None if exc is None else f"{type(exc).__name__}: {exc}")
        self._state = "done"
        if not isinstance(exc, torch.OutOfMemoryError):
            return False
        self.failure = OomEvent(
            message=str(exc), in_use_bytes=getattr(exc, "in_use_bytes", end),
            stack=traceback.extract_tb(tb), op=getattr(exc, "op", None), shape=getattr(exc, "shape", None),
            dtype=getattr(exc, "dtype", None), requested_bytes=getattr(exc, "requested_bytes", None))
        if self.raise_oom:
            return False
        # The traceback's frames hold the step's tensors; without it they can be freed.
        exc.__traceback__ = None
        return True

    def mark(self, label: str) -> None:
        """Record a phase marker ("vision", "prefill", "decode") with the memory allocated now."""
        if self._state != "running":
            raise RuntimeError(f"mark({label!r}) called outside the with block: mark phases while it runs")
        if not isinstance(label, str) or not label:
            raise ValueError(f"mark() needs a non-empty string label, got {label!r}: e.g. m.mark('prefill')")
        if self._cpu is not None:
            self._cpu.sample(label)
        else:
            self._timeline.append((perf_counter() - self._t0, torch.cuda.memory_allocated(self.device), label))

    def set_kv_cache_bytes(self, nbytes: int) -> None:
        """Tell the measurement how many bytes of the peak are KV cache (inside or after the block)."""
        check_int("nbytes", nbytes, minimum=0, hint="KV cache bytes: sum k.nbytes + v.nbytes over the cache's layers")
        self._kv_cache_bytes = nbytes

    def current_bytes(self) -> int:
        """Memory in use now as this measurement counts it (after the block, CPU frees are still counted)."""
        if self.is_cuda:
            return torch.cuda.memory_allocated(self.device)
        if self._cpu is None:
            raise RuntimeError("current_bytes() needs the measurement to have started: enter the with block first")
        return self._cpu.current

    @property
    def result(self) -> MemoryResult:
        if self._state != "done":
            raise RuntimeError("m.result is available after the with block ends")
        n = self._numbers
        other_at_start = max(n["start"] - n["weights"], 0)
        activations = max(n["peak"] - n["weights"] - self._kv_cache_bytes - other_at_start, 0)
        return MemoryResult(
            device=self.device, kind=CUDA_KIND if self.is_cuda else CPU_KIND, label=self.label,
            start_bytes=n["start"], peak_bytes=n["peak"], end_bytes=n["end"],
            reserved_peak_bytes=n["reserved_peak"], weights_bytes=n["weights"],
            kv_cache_bytes=self._kv_cache_bytes, activations_bytes=activations,
            budget_bytes=self.budget.limit_bytes if self.budget is not None else None,
            wall_s=n["wall"], oom=self.failure is not None, error=n["error"], timeline=tuple(self._timeline))


def measure(device: str | torch.device, *, model: torch.nn.Module | None = None, label: str = "",
            budget: Budget | None = None, raise_oom: bool = True, sample_every: int = 256,
            max_samples: int = 4096) -> Measurement:
    """Measure the memory of a `with` block on `device` ("cpu", "cuda" or "cuda:N").

    `model`: its parameters and buffers on `device` are reported as weights. `budget`: enforced for the
    block (allocator limit on CUDA, tensor accounting on CPU); an OOM sets `oom` and `error` and is re-raised
    unless `raise_oom=False`. On CPU a timeline sample is taken every `sample_every` allocations, at most
    about `max_samples` kept.
    """
    dev = resolve_device(device)
    if model is not None and not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module or None, got {type(model).__name__}: "
                         f"pass the model whose weights to count")
    if not isinstance(label, str):
        raise ValueError(f"label must be a string, got {label!r}")
    if budget is not None:
        if not isinstance(budget, Budget):
            raise ValueError(f"budget must be a Budget, got {type(budget).__name__}: "
                             f"use Budget.for_card(...) or Budget.scaled_to(...)")
        if budget.device != dev:
            raise ValueError(f"the budget is for {budget.device!r} but the measurement is on {dev!r}: "
                             f"make the budget with device={dev!r}")
    for name, value in (("sample_every", sample_every), ("max_samples", max_samples)):
        check_int(name, value)
    return Measurement(dev, model, label, budget, bool(raise_oom), sample_every, max_samples)
