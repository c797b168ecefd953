"""The gradient mode and autocast setting a measured call runs under, as the course's steps name them.

Imports only torch, so the original remote code's environment (transformers 4.33.2, `xcomp_lab.original`) runs its
calls under the very same contexts as the course's replica.
"""

from __future__ import annotations

import contextlib

import torch

GRAD_MODES = ("enabled", "no_grad", "inference_mode")


def grad_mode(mode: str) -> contextlib.AbstractContextManager:
    """The context for "enabled" (autograd records), "no_grad" or "inference_mode"."""
    if mode not in GRAD_MODES:
        raise ValueError(f"grad mode {mode!r} is not one of {list(GRAD_MODES)}.")
    if mode == "no_grad":
        return torch.no_grad()
    if mode == "inference_mode":
        return torch.inference_mode()
    return contextlib.nullcontext()


def autocast(device: str, enabled: bool) -> contextlib.AbstractContextManager:
    """`torch.cuda.amp.autocast()` as the quick start uses it: FP16 compute, on CUDA or (same dtype) on CPU."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.float16)
