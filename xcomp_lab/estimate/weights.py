"""Weights, analytically: parameters, buffers and bitsandbytes statistics of a configuration, no simulation."""

from __future__ import annotations

import torch

from xcomp_lab.core.checks import check_choice
from xcomp_lab.core.dtypes import check_dtype
from xcomp_lab.estimate.call import config_of
from xcomp_lab.memory.footprint import quantized_linear_bytes
from xcomp_lab.model.configuration_internlm_xcomposer2 import InternLMXcomposer2Config
from xcomp_lab.model.inventory import inventory
from xcomp_lab.model.loading import QUANTIZATIONS


def weight_bytes(config: InternLMXcomposer2Config, dtype: torch.dtype, quantization: str) -> tuple[int, int]:
    """(weights bytes incl. buffers and quantization statistics, of which statistics), analytically."""
    inv = inventory(config)
    size = torch.empty((), dtype=dtype).element_size()
    if quantization == "none":
        return (inv.params + inv.float_buffers) * size + inv.other_buffer_bytes, 0
    converted = sum(o * i for o, i in inv.linear_weights)
    stored = stats = 0
    for out_features, in_features in inv.linear_weights:
        weight, extra = quantized_linear_bytes(out_features, in_features, quantization)
        stored += weight
        stats += extra
    unconverted = (inv.params - converted + inv.float_buffers) * size + inv.other_buffer_bytes
    return unconverted + stored + stats, stats


def weights_only(scale_or_config: str | InternLMXcomposer2Config, dtype: str | torch.dtype = "float32",
                 quantization: str = "none") -> int:
    """Bytes of parameters + buffers (+ bitsandbytes statistics), from the parameter count: no simulation.

    E.g. weights_only("full") is 8,666,840,064 parameters x 4 bytes + 1 GiB of rotary tables = 33.29 GiB.
    """
    config, _ = config_of(scale_or_config)
    torch_dtype = check_dtype(dtype)
    if torch_dtype is None:
        raise ValueError("dtype='auto' has no size; pass 'float32', 'float16' or 'bfloat16'.")
    check_choice("quantization", quantization, QUANTIZATIONS)
    return weight_bytes(config, torch_dtype, quantization)[0]
