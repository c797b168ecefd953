"""Plan any transformers LLM or VLM: predict the memory of a generate call from its config, with no weights and no GPU.

The model's own code and `generate` run on fake weights with the real inputs its processor makes; every allocation
is counted, and for CUDA passed through a simulation of PyTorch's caching allocator. Public API:

- `estimate(model, dtype=, quantization=, attn=, batch=, prompt_tokens=, new_tokens=, image_size=, device=, card=)`
  -> `Plan`: weights, KV cache, activations, the peak of each phase (load, vision, prefill, decode) and where,
  `max_memory_allocated` and `max_memory_reserved` on CUDA, whether it fits a card; `Plan.table()` prints it.
- `largest(model, knob, card=, ...)` -> `Largest`: the largest batch, prompt, image size or new tokens that fits;
  `cheapest_recipe(model, card=, ...)`: the first quantization and attention that fits.
- `CachingAllocator`: the allocator simulation; `greedy_generate`: the planned call on a real model.
- `estimate(..., max_memory={0: "20GiB", 1: "20GiB"})`: the model placed as `from_pretrained(device_map=...,
  max_memory=...)` places it, each device's weights and allocated peak (`Plan.devices`).
- `estimate(..., quantization="int8", int8_outliers=...)`: LLM.int8()'s outlier columns where they are known (a
  fraction, or the counts `outliers.calibrate_int8_outliers` measures on the real model, per input width and per
  linear); by default every column (an upper bound).
- `python -m xcomp_lab.plan --model <preset|dir> --card <name> ...`: the table and the inverse answers;
  `python -m xcomp_lab.plan.validate <matrix folder>`: the prediction of every measured call, its error, and the
  summary against issue 17's bars.

Modules, one job each: `families` (the architectures known), `realvalues` (data kept real where code reads it),
`replay` (the model and its generate call on fake tensors), `accounting` (the counting), `outliers` (LLM.int8()'s
outlier columns: given, counted), `allocator` (the CUDA caching allocator), `estimate` (the API and `Plan`), `devicemap` (a device map's placement and per-device peaks),
`inverse` (the searches), `validate` (against measurements);
`presets` and `build` hold the published models and build them for real.
"""

from xcomp_lab.plan.allocator import CachingAllocator
from xcomp_lab.plan.estimate import Plan, estimate, resolve_model
from xcomp_lab.plan.families import FAMILIES
from xcomp_lab.plan.inverse import Largest, cheapest_recipe, largest
from xcomp_lab.plan.replay import greedy_generate

__all__ = [
           "FAMILIES",
           "CachingAllocator",
           "Largest",
           "Plan",
           "cheapest_recipe",
           "estimate",
           "greedy_generate",
           "largest",
           "resolve_model",
]
