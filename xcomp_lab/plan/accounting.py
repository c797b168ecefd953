"""The accounting of a planned call: `memory.measure`'s CPU tensor accounting over the replay's fake and real
tensors, with the phase and the part of the model at each peak, and for CUDA every allocation and free also
passed to the simulated caching allocator (`allocator.CachingAllocator`), whose statistics are what
`torch.cuda.max_memory_allocated` and `max_memory_reserved` report.

For CUDA it also adds what CUDA kernels allocate inside one op, which the fake kernels do not show: bitsandbytes'
CUDA temporaries (`estimate.accounting.bnb_cuda_temporaries`, and `int8_mm_dequant`'s FP16 result before its cast)
and three ATen kernels' (`aten_temporaries`), each a block of its own, made before or after the op's outputs as the
CUDA code makes them (the caching allocator places blocks by that order); and `scaled_dot_product_attention`
allocates what CUDA's fused kernels allocate (`CudaSdpa`).

LLM.int8() (bitsandbytes 0.50.2, `MatMul8bitLt.forward` with transformers' threshold 6.0) keeps in higher precision
the input columns where any row reaches the threshold: which columns depends on the activations' values, which a
plan does not have. `Int8Outliers` runs that path with a given number of outlier columns (`outliers.OutlierColumns`;
by default every column, the most it can take): the columns of the input copied (rows x columns), the weight's
columns gathered (int8), dequantized (two FP32 temporaries) and cast, a second output from `addmm`, and the column
indices kept on the module (`state.idx`). Every size in it grows with the number of outlier columns, so with every
column the plan is an upper bound of an INT8 call, and with the columns a real call had it is that call; the rest
of the call is exact.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from xcomp_lab.estimate.accounting import bnb_cuda_temporaries, round_cuda
from xcomp_lab.memory.measure import CpuAccounting
from xcomp_lab.plan.allocator import BothOrders, CachingAllocator
from xcomp_lab.plan.outliers import OutlierColumns


@dataclass(frozen=True)
class PhasePeak:
    """The highest memory of one phase, and where in the model it was reached."""

    allocated: int
    reserved: int | None  # CUDA only
    where: str


class PlanAccounting(CpuAccounting):
    """Counts fake and real storages; with an allocator, mirrors every allocation and free into it."""

    counts_fake = True

    def __init__(self, start_bytes: int, allocator: CachingAllocator | BothOrders | None = None) -> None:
        # No budget and no timeline: a plan keeps peaks.
        super().__init__(start_bytes, None, sample_every=1 << 30, max_samples=64)
        self.allocator = allocator
        self.blocks: dict[int, object] = {}  # storage key -> the allocator's block
        self.phase = "start"
        self.where = ""
        self.peaks: dict[str, PhasePeak] = {}
        # With a device map: the device whose module runs now, each storage's device and size, and per device the
        # bytes allocated now and at their peak (`place_on_devices`).
        self.device: str | None = None
        self.device_of: dict[int, tuple[str, int]] = {}
        self.device_bytes: dict[str, int] = {}
        self.device_peaks: dict[str, int] = {}

    # ----- what runs -----

    def mark(self, phase: str) -> None:
        self.phase, self.where = phase, ""

    def at(self, where: str) -> None:
        self.where = where

    @property
    def level(self) -> int:
        """Memory allocated now: the allocator's figure on CUDA, the accounting's on CPU."""
        return self.allocator.allocated if self.allocator is not None else self.current

    # ----- the hooks of CpuAccounting -----

    def place_on_devices(self, start: dict[str, int]) -> None:
        """Count every storage from now on against the device running (`device`), from `start` bytes per device."""
        self.device_bytes = dict(start)
        self.device_peaks = dict(start)
        self.device = next(iter(start))

    def allocated(self, nbytes: int) -> None:
        if self.allocator is not None or self.device is not None:
            for key in self._fresh(self.blocks if self.allocator is not None else self.device_of):
                size = self.live[key]().nbytes()
                if self.allocator is not None:
                    self.blocks[key] = self.allocator.malloc(size)
                if self.device is not None:
                    self.device_of[key] = (self.device, round_cuda(size))
                    self._device_add(self.device, round_cuda(size))
        super().allocated(nbytes)
        self.record()

    def _device_add(self, device: str, nbytes: int) -> None:
        self.device_bytes[device] = self.device_bytes.get(device, 0) + nbytes
        self.device_peaks[device] = max(self.device_peaks.get(device, 0), self.device_bytes[device])

    def _fresh(self, known: dict[int, object]) -> list[int]:
        """The storages just counted, oldest first: the newest entries of `live` not yet in `known`."""
        while True:
            fresh = []
            try:
                for key in reversed(self.live):
                    if key in known:
                        break
                    fresh.append(key)
            except RuntimeError:  # a storage freed by the garbage collector meanwhile: look again
                continue
            return fresh[::-1]

    def freed(self, key: int, nbytes: int, ref: weakref.ref) -> None:
        if self.live.get(key) is ref and key in self.blocks:
            self.allocator.free(self.blocks.pop(key))
        if self.live.get(key) is ref and key in self.device_of:
            device, size = self.device_of.pop(key)
            self.device_bytes[device] -= size
        super().freed(key, nbytes, ref)

    def hold(self, sizes: tuple[int, ...]) -> list[tuple[object, int]]:
        """Allocate blocks of these sizes, in order, for memory a kernel makes inside one op (CUDA only)."""
        held = []
        for nbytes in sizes:
            held.append((self.allocator.malloc(nbytes), nbytes))
            self.record()
            if self.device is not None:
                self._device_add(self.device, nbytes)
        return held

    def release(self, held: list[tuple[object, int]]) -> None:
        """Free what `hold` allocated."""
        for block, nbytes in held:
            self.allocator.free(block)
            if self.device is not None:
                self.device_bytes[self.device] -= nbytes

    def record(self) -> None:
        """Note the memory now against the phase's peaks."""
        level = self.level
        group = self.phase.split()[0]  # "decode step 3" counts as "decode"
        reserved = self.allocator.reserved if self.allocator is not None else None
        known = self.peaks.get(group)
        if known is None:
            known = self.peaks[group] = PhasePeak(-1, reserved, "")
        if level > known.allocated:
            where = f"{self.phase}, {self.where}" if self.where else self.phase
            known = self.peaks[group] = PhasePeak(level, known.reserved, where)
        if reserved is not None and reserved > known.reserved:
            self.peaks[group] = PhasePeak(known.allocated, reserved, known.where)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.allocator is None:
            return super().__torch_dispatch__(func, types, args, kwargs)
        kwargs = kwargs or {}
        if func.namespace == "bitsandbytes":
            before, after = bnb_cuda_temporaries(func, args, kwargs)
            before += int8_dequant_scratch(func, args, kwargs)
        else:
            before, after = aten_temporaries(func, args, kwargs)
            if not before + after:
                return super().__torch_dispatch__(func, types, args, kwargs)
        held = self.hold(before)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        self.release(held + self.hold(after))
        return out


SUMS = (torch.ops.aten.sum.default, torch.ops.aten.sum.dim_IntList)
LOW_PRECISION = (torch.float16, torch.bfloat16)


def aten_temporaries(func: Any, args: tuple, kwargs: dict) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """What an ATen CUDA kernel allocates and frees inside itself, which its fake kernel does not show (in blocks,
    in their order: those made before the op's outputs, those made after them), as the H200 traces show them
    (results/plan-matrix-h200/traced): `masked_scatter` (how LLaVA, Qwen2-VL and Idefics3 put the image features
    into the prompt) keeps an int64 prefix sum of the mask and a contiguous copy of it, both of the output's size;
    `native_layer_norm` on a non-contiguous input first copies it to a contiguous one (`expect_contiguous`:
    Idefics3's SigLIP, whose residual stream keeps the patch embedding's transposed strides); a `sum` into another
    dtype copies its input to that dtype first (`make_reduction`'s `self.to(in_dtype)`, after the output; FP16/BF16
    inputs of an FP32 sum are read as they are): Idefics3's padding-image test sums a boolean mask of every pixel
    as int64."""
    if func is torch.ops.aten.masked_scatter.default:
        n = torch.Size(torch.broadcast_shapes(args[0].shape, args[1].shape)).numel()
        return (), (round_cuda(n * 8), round_cuda(n))
    if func is torch.ops.aten.native_layer_norm.default and not args[0].is_contiguous():
        return (round_cuda(args[0].numel() * args[0].element_size()),), ()
    if func in SUMS:
        x = args[0]
        out = kwargs.get("dtype") or (torch.int64 if not (x.is_floating_point() or x.is_complex()) else x.dtype)
        if out != x.dtype and not (x.dtype in LOW_PRECISION and out == torch.float32):
            return (), (round_cuda(x.numel() * dtype_bytes(out)),)
    return (), ()


class CudaSdpa(TorchFunctionMode):
    """`scaled_dot_product_attention` as CUDA's fused kernels run it without gradients: the output alone, laid out
    (batch, query, heads, head dim) and returned as its (batch, heads, query, head dim) view, no log-sum-exp. The
    CPU's fused kernel, which the fake tensors run, also returns an FP32 log-sum-exp of (batch, heads, query): in the
    H200 traces LLaVA's batch-4 prefill made no such block, where the plan made one per layer (1.28 MiB at 2624
    tokens, each needing a 20 MiB segment of its own)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)
        query = args[0] if args else kwargs["query"]
        value = args[2] if len(args) > 2 else kwargs["value"]
        *batch, heads, length, _ = query.shape
        return torch.empty((*batch, length, heads, value.shape[-1]), dtype=query.dtype).transpose(-3, -2)


def int8_dequant_scratch(func: Any, args: tuple, kwargs: dict) -> tuple[int, ...]:
    """`bitsandbytes::int8_mm_dequant` on CUDA writes FP16, then casts to the asked dtype: when that is not FP16
    (BF16 models), the FP16 result is a temporary of the output's size, made before the output."""
    if func._schema.name != "bitsandbytes::int8_mm_dequant":
        return ()
    named = dict(zip((a.name for a in func._schema.arguments), args)) | kwargs
    a, dtype = named["A"], named.get("dtype")
    return () if dtype in (None, torch.float16) else (round_cuda(a.numel() * 2),)


# bitsandbytes ops whose fake kernel hides the tensors their real (composite) kernel makes: run the composite.
INT8_COMPOSITES = ("int8_mixed_scaled_mm", "int8_scaled_mm", "int8_vectorwise_dequant")
COMPOSITE = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)


class Int8Outliers(TorchFunctionMode):
    """LLM.int8()'s mixed-precision path with `columns` outlier columns in each input (see the module's docstring).

    `int8_vectorwise_quant` with a threshold returns the indices of `columns.columns(phase(), width, layer())`
    columns (every column when `columns` is None; `layer`: the linear running, `outliers.RunningInt8Linear`);
    `int8_mixed_scaled_mm`, `int8_scaled_mm` and `int8_vectorwise_dequant` run bitsandbytes' own composite kernels
    (those CUDA runs too) instead of their fake kernels, so that each tensor they make is counted.
    """

    def __init__(self, columns: OutlierColumns | None = None, phase: Callable[[], str] = lambda: "prefill",
                 layer: Callable[[], str | None] = lambda: None) -> None:
        super().__init__()
        self.outliers, self.phase, self.layer = columns, phase, layer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = getattr(func, "default", func)
        name = op._schema.name if isinstance(op, torch._ops.OpOverload) else ""
        if name == "bitsandbytes::int8_vectorwise_quant":
            named = dict(zip((a.name for a in op._schema.arguments), args)) | kwargs
            if named.get("threshold", 0.0) > 0.0:
                width = named["A"].shape[-1]
                given = self.outliers
                count = width if given is None else given.columns(self.phase(), width, self.layer())
                return outlier_columns(op, named["A"], count)
        elif name.startswith("bitsandbytes::") and name.split("::")[1] in INT8_COMPOSITES:
            with self:
                return op.redispatch(COMPOSITE, *args, **kwargs)
        return func(*args, **kwargs)


def outlier_columns(op: Any, a: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`int8_vectorwise_quant(A, threshold)` as CUDA runs it when `count` columns hold an outlier: the quantized
    rows and their statistics, the outlier columns' indices (empty for none), and those columns of the quantized
    rows zeroed."""
    out_row, row_stats, _ = op(a, 0.0)
    columns = torch.arange(count, dtype=torch.int64)
    if a.numel() // a.shape[-1] > 1:
        out_row[:, columns] = 0
    return out_row, row_stats, columns


def peak_of(peaks: dict[str, PhasePeak]) -> PhasePeak:
    """The highest of the phases' peaks (its `reserved` is the highest reserved of any phase)."""
    top = max(peaks.values(), key=lambda p: p.allocated)
    reserved = [p.reserved for p in peaks.values() if p.reserved is not None]
    return PhasePeak(top.allocated, max(reserved) if reserved else None, top.where)


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
