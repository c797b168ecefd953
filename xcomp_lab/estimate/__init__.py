"""Predict the memory of a captioning call without a GPU and without allocating it.

The replica is built on fake tensors (shapes, dtypes and storages, no data), quantized by the real bitsandbytes
modules, and the call the course measures is replayed on it under the CPU tensor accounting (with the CUDA
allocator's rules for a GPU). Public API:

- `estimate_caption(scale | config | model, ...)` -> `Estimate`: weights, KV cache, activations, the peak and its
  phase, and whether a budget is crossed (and where); `estimate_step(step, params)` for a course step.
- `weights_only(...)`, analytic weights; `fits(estimate, budget)`.
- `estimate_split_caption(...)` -> `SplitEstimate`: the peak on each GPU of a model split by a device map, and
  `course_split_estimates()` for the course's two-card cases.
- `plan_device_map`, `plan_from_pretrained`, `summarize_map`, `offload_layers_map`, `meta_model`,
  `quiet_accelerate`: device maps as accelerate and transformers compute them, on the meta device.

Modules: `result` (Estimate), `call` (checked settings), `weights`, `fake` (the fake model), `accounting`,
`replay` (generate's loop written out), `caption` (the API above), `split` (per card), `placement` (maps).
"""

from __future__ import annotations

import importlib

# Imported on first use (PEP 562), so that a submodule that needs only torch (the accounting, the allocator)
# also imports where transformers is another major version (the original code's environment, transformers 4.33.2).
_EXPORTS = {
    "Estimate": "xcomp_lab.estimate.result",
    "fits": "xcomp_lab.estimate.result",
    "estimate_caption": "xcomp_lab.estimate.caption",
    "estimate_step": "xcomp_lab.estimate.caption",
    "weights_only": "xcomp_lab.estimate.weights",
    "SplitEstimate": "xcomp_lab.estimate.split",
    "estimate_split_caption": "xcomp_lab.estimate.split",
    "course_split_estimates": "xcomp_lab.estimate.split",
    "DevicePlan": "xcomp_lab.estimate.placement",
    "plan_device_map": "xcomp_lab.estimate.placement",
    "plan_from_pretrained": "xcomp_lab.estimate.placement",
    "summarize_map": "xcomp_lab.estimate.placement",
    "offload_layers_map": "xcomp_lab.estimate.placement",
    "meta_model": "xcomp_lab.estimate.placement",
    "quiet_accelerate": "xcomp_lab.estimate.placement",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
