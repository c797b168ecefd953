"""The dtypes the course uses, accepted by name or as torch dtypes, checked in one place."""

from __future__ import annotations

import torch

DTYPE_NAMES = ("float32", "float16", "bfloat16")  # the floating dtypes the course loads, by canonical name
DTYPE_ALIASES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def check_dtype(dtype: str | torch.dtype) -> torch.dtype | None:
    """Return the torch dtype for `dtype`, None for "auto" (the checkpoint's own), or raise a clear error."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPE_ALIASES.values():
            return dtype
    elif isinstance(dtype, str):
        if dtype == "auto":
            return None
        if dtype.lower() in DTYPE_ALIASES:
            return DTYPE_ALIASES[dtype.lower()]
    raise ValueError(
        f"Unsupported dtype {dtype!r}; use one of {sorted(set(DTYPE_ALIASES))}, a matching torch dtype, or 'auto' "
        "(the dtype the checkpoint was saved in). For INT8/4-bit, pass a quantization instead."
    )


def dtype_name(dtype: torch.dtype) -> str:
    """'float32', 'float16' or 'bfloat16'."""
    return str(dtype).removeprefix("torch.")
