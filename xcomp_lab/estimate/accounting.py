"""The accounting of a prediction: `measure`'s CPU accounting over fake tensors, with the phase, the autocast
copies, the budget crossing and, for CUDA, the caching allocator's rounding and bitsandbytes' CUDA temporaries."""

from __future__ import annotations

import traceback
import weakref
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from xcomp_lab.core.dtypes import dtype_name
from xcomp_lab.memory.measure import CpuAccounting
from xcomp_lab.memory.oom import model_frame

CUDA_BLOCK = 512  # the CUDA caching allocator rounds every allocation up to a multiple of this
# bitsandbytes' CUDA gemm_4bit multiplies this many rows or fewer with its fused kernel; above 512 rows it
# always dequantizes the weight and calls F.linear (in between it decides per GPU: dequantizing is assumed).
BNB_FUSED_MAX_ROWS = 4
PACKAGE_DIR = Path(__file__).resolve().parent
_SOFTMAXES = (torch.nn.functional.softmax, torch.softmax, torch.Tensor.softmax)


def round_cuda(nbytes: int) -> int:
    return -(-nbytes // CUDA_BLOCK) * CUDA_BLOCK


@dataclass
class Crossing:
    op: str
    phase: str
    in_use: int
    location: str | None
    described: bool = False


class SimulatedAccounting(CpuAccounting):
    """`measure`'s CPU accounting over fake tensors, plus what a prediction needs to report.

    It keeps the phase and the autocast weight copies alive at the peak, notes the first op whose
    allocation crosses the budget (and goes on, to find the whole peak), and for CUDA rounds allocations
    and adds the temporaries bitsandbytes' CUDA kernels allocate inside one op.
    """

    counts_fake = True

    def __init__(self, start_bytes: int, limit: int | None, cuda: bool, autocast_on: bool,
                 device: str | torch.device = "cpu") -> None:
        # No budget for the base class, which would raise at the crossing: it is checked here, to go on to the
        # whole peak. No timeline either: a prediction keeps peaks, not samples.
        super().__init__(start_bytes, None, sample_every=1 << 30, max_samples=64)
        self.counted_device = torch.device(device)  # the fake device this accounting stands for
        self.cuda = cuda
        self.autocast_on = autocast_on
        self.budget_limit = limit
        self.phase = "start"
        self.where = ""  # the part of the model running: "vision tower", "decoder layer 3/32", "output head"
        self.peak_phase = "start"
        self.phase_peaks: dict[str, int] = {}
        self.copies = 0  # live bytes of autocast's copies of weights
        self.copies_at_peak = 0
        self.crossing: Crossing | None = None
        self._func: Any = None

    def storage_bytes(self, storage: torch.UntypedStorage) -> int:
        nbytes = storage.nbytes()
        return round_cuda(nbytes) if self.cuda and nbytes else nbytes

    def mark(self, phase: str) -> None:
        self.phase, self.where = phase, ""

    def at(self, where: str, *_: Any) -> None:
        self.where = where

    def position(self) -> str:
        return f"{self.phase}, {self.where}" if self.where else self.phase

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._func = func
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.cuda and func.namespace == "bitsandbytes":
            self._transient(bnb_cuda_scratch(func, args, kwargs or {}))
        if self.crossing is not None and not self.crossing.described:
            self._describe_crossing(out)
        if self.autocast_on and func is torch.ops.aten._to_copy.default and is_param(args[0]):
            self._tag_copy(out)
        return out

    def _tag_copy(self, out: torch.Tensor) -> None:
        storage = out.untyped_storage()
        if storage._cdata not in self.live:
            return
        nbytes = self.storage_bytes(storage)
        self.copies += nbytes
        weakref.finalize(storage, partial(self._untag, nbytes))
        if self.current == self.peak:
            self.copies_at_peak = self.copies

    def _untag(self, nbytes: int) -> None:
        self.copies -= nbytes

    def allocated(self, nbytes: int) -> None:
        self._check_budget(nbytes)
        super().allocated(nbytes)
        self._record(self.current)

    def _record(self, level: int) -> None:
        group = self.phase.split()[0]  # "decode step 3" counts as "decode"
        if level > self.phase_peaks.get(group, 0):
            self.phase_peaks[group] = level
        if level >= self.peak:
            self.peak = level
            self.peak_phase = self.position()
            self.copies_at_peak = self.copies

    def _transient(self, nbytes: int) -> None:
        """Memory an op allocates and frees inside itself, on top of its outputs."""
        if not nbytes:
            return
        self._check_budget(nbytes)
        self._record(self.current + nbytes)

    def _check_budget(self, nbytes: int) -> None:
        if self.crossing is None and self.budget_limit is not None and self.current + nbytes > self.budget_limit:
            stack = [f for f in traceback.extract_stack() if not is_estimator_frame(Path(f.filename))]
            frame = model_frame(traceback.StackSummary.from_list(stack))
            location = f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}: {frame.line}" if frame else None
            self.crossing = Crossing(op=str(self._func), phase=self.position(), in_use=self.current,
                                      location=location)

    def _describe_crossing(self, out: Any) -> None:
        """Add the largest output's shape and dtype to the op that crossed, as `run_guarded` reports a failed op."""
        items = out if isinstance(out, (list, tuple)) else (out,)
        tensors = [t for t in items if isinstance(t, torch.Tensor)]
        if tensors:
            largest = max(tensors, key=lambda t: t.numel() * t.element_size())
            self.crossing.op += f" -> {tuple(largest.shape)} {dtype_name(largest.dtype)}"
        self.crossing.described = True


def is_estimator_frame(path: Path) -> bool:
    """A frame of the estimator itself (a module of this package), never the model line to report."""
    return path.resolve().parent == PACKAGE_DIR


def is_param(tensor: Any) -> bool:
    return isinstance(tensor, nn.Parameter) or getattr(tensor, "is_param", False)


def bnb_cuda_scratch(func: Any, args: tuple, kwargs: dict) -> int:
    """Bytes a bitsandbytes op allocates and frees inside its CUDA kernel (CPU accounting cannot see them)."""
    before, after = bnb_cuda_temporaries(func, args, kwargs)
    return sum(before) + sum(after)


def bnb_cuda_temporaries(func: Any, args: tuple, kwargs: dict) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The temporaries a bitsandbytes op's CUDA code (bitsandbytes 0.50.2, `backends/cuda/ops.py`) allocates and
    frees inside the op, each in its 512-byte blocks, in their order: (those made before the op's outputs, those
    made after them). All are freed when the op returns."""
    named = dict(zip((a.name for a in func._schema.arguments), args)) | kwargs
    name = func._schema.name
    if name == "bitsandbytes::gemm_4bit":
        a, (n, k) = named["A"], named["shapeB"]
        if a.numel() // a.shape[-1] <= BNB_FUSED_MAX_ROWS:
            return (), ()
        # `_dequant_linear_fallback`: the nested absmax decoded to FP32 and its offset added (two FP32 tensors),
        # then the weight dequantized to the input's dtype; F.linear's output comes after them.
        nested = named.get("absmax_8bit")
        absmax = (round_cuda(nested.numel() * 4),) * 2 if nested is not None else ()
        return (*absmax, round_cuda(n * k * a.element_size())), ()
    if name == "bitsandbytes::int8_scaled_mm":
        a, b = named["A"], named["B"]
        return (round_cuda(a.numel() // a.shape[-1] * b.shape[0] * 4),), ()  # the int32 product before dequantizing
    if name == "bitsandbytes::int8_vectorwise_quant":
        a = named["A"]
        # With transformers' outlier threshold (6.0), after the outputs: |A|, then the outlier mask.
        return (), (round_cuda(a.numel() * a.element_size()), round_cuda(a.numel()))
    return (), ()


class CudaSoftmax(TorchFunctionMode):
    """softmax(FP16 -> FP32) as CUDA runs it, in one kernel; on CPU it first copies the input to FP32."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SOFTMAXES and kwargs.get("dtype") == torch.float32 and args[0].dtype == torch.float16:
            dim = args[1] if len(args) > 1 else kwargs["dim"]
            return torch._softmax(args[0], dim, True)
        return func(*args, **kwargs)


def stored_bytes(tensors: Sequence[torch.Tensor], cuda: bool) -> dict[torch.device, dict[int, int]]:
    """Each storage once, by device, in the bytes the device's allocator gives it: {device: {storage: bytes}}."""
    stored: dict[torch.device, dict[int, int]] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        stored.setdefault(tensor.device, {})[storage._cdata] = (
            round_cuda(storage.nbytes()) if cuda else storage.nbytes())
    return stored
