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

from xcomp_lab.estimate.caption import estimate_caption, estimate_step
from xcomp_lab.estimate.placement import (
    DevicePlan,
    meta_model,
    offload_layers_map,
    plan_device_map,
    plan_from_pretrained,
    quiet_accelerate,
    summarize_map,
)
from xcomp_lab.estimate.result import Estimate, fits
from xcomp_lab.estimate.split import SplitEstimate, course_split_estimates, estimate_split_caption
from xcomp_lab.estimate.weights import weights_only

__all__ = [
    "Estimate", "fits", "estimate_caption", "estimate_step", "weights_only",
    "SplitEstimate", "estimate_split_caption", "course_split_estimates",
    "DevicePlan", "plan_device_map", "plan_from_pretrained", "summarize_map", "offload_layers_map", "meta_model",
    "quiet_accelerate",
]
