"""FP16 and BF16 matrix products on a CPU computed in FP32 and rounded back, for speed, not for memory.

The original code keeps its real widths at every scale (4096-wide decoder, 1225 image tokens), so a caption of
the small original checkpoint is some hundreds of GFLOP. On CPUs without FP16/BF16 matrix instructions ATen's
low-precision products are far slower than its FP32 ones (measured on this project's AVX2 CPU, torch 2.14: a
1349 x 4096 by 4096 x 6144 product took 1.3 s in FP32, 9.9 s in FP16 and 18.5 s in BF16), which would make the
FP16, BF16, autocast and 4-bit steps minutes each.

`FloatMatmul` is a `TorchDispatchMode` that runs `mm`, `addmm`, `bmm`, `baddbmm` (and `linear`/`matmul` when
they arrive whole) on FP16/BF16 CPU tensors as FP32 products rounded to the same dtype. Enter it *outside*
`xcomp_lab.memory.measure`: the accounting mode then sits above it, sees each op with its FP16 output, a new
storage of the same size as ATen's own kernel returns, and never sees the FP32 temporaries (as it never sees a
kernel's scratch memory). Values differ from ATen's kernel by rounding only (both accumulate in FP32).
`products_for(model)` applies it where it is wanted: a model of the original's code on a CPU.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from xcomp_lab.original.detect import is_original_model

LOW_PRECISION = (torch.float16, torch.bfloat16)
_ops = torch.ops.aten
PRODUCTS = frozenset({_ops.mm.default, _ops.addmm.default, _ops.bmm.default, _ops.baddbmm.default,
                      _ops.linear.default, _ops.matmul.default})


class FloatMatmul(TorchDispatchMode):
    """Compute the matrix products of FP16/BF16 CPU tensors in FP32 and return them in their own dtype."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in PRODUCTS:
            tensors = [arg for arg in args if isinstance(arg, torch.Tensor)]
            dtype = tensors[0].dtype if tensors else None
            if dtype in LOW_PRECISION and all(t.is_cpu and t.dtype == dtype for t in tensors):
                widened = [arg.float() if isinstance(arg, torch.Tensor) else arg for arg in args]
                return func(*widened, **kwargs).to(dtype)
        return func(*args, **kwargs)


def _original_on_cpu(model: Any) -> bool:
    return getattr(model, "device", torch.device("cpu")).type == "cpu" and is_original_model(model)


def products_for(model: Any) -> contextlib.AbstractContextManager:
    """`FloatMatmul()` for a model of the original's code on a CPU, else a context that changes nothing."""
    return FloatMatmul() if _original_on_cpu(model) else contextlib.nullcontext()


def emulated(model: Any) -> bool:
    """True where `products_for(model)` computes the model's 16-bit products in FP32: not the hardware's speed."""
    return _original_on_cpu(model) and getattr(model, "dtype", None) in LOW_PRECISION
