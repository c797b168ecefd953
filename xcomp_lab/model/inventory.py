"""What the replica stores, counted once per configuration on the meta device (no memory, no weights).

`parameter_count("full")` is the original's 8,666,840,064. The inventory also lists the linears that
bitsandbytes converts (transformers' own skip list leaves out the output head) and the buffers, which is
all the estimator and the course's budget rule need to know about a configuration.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from xcomp_lab.model.configuration_internlm_xcomposer2 import InternLMXcomposer2Config
from xcomp_lab.model.modeling_internlm_xcomposer2 import InternLMXComposer2ForCausalLM
from xcomp_lab.model.scales import SCALES, config_for_scale


@dataclass(frozen=True)
class Inventory:
    """What the replica stores, by kind: numbers of values, and the linears bitsandbytes would convert."""

    params: int  # all parameter values
    linear_weights: tuple[tuple[int, int], ...]  # (out_features, in_features) of each convertible linear
    float_buffers: int  # floating buffer values (the rotary tables), created in the default dtype
    other_buffer_bytes: int  # integer buffers keep their own dtype (CLIP's position ids)


def as_config(target: Any) -> InternLMXcomposer2Config:
    """A private copy of the configuration of a scale name, a configuration or a loaded replica (or its config).

    A model loaded with trust_remote_code carries its own copy of the configuration class: it is converted.
    """
    if isinstance(target, str):
        if target not in SCALES:
            raise ValueError(f"Unknown scale {target!r}; pass one of {sorted(SCALES)}, a configuration or a model.")
        return config_for_scale(target)
    if isinstance(target, InternLMXcomposer2Config):
        return copy.deepcopy(target)
    config = getattr(target, "config", target)
    if getattr(config, "model_type", None) == InternLMXcomposer2Config.model_type:
        return InternLMXcomposer2Config.from_dict(config.to_dict())
    raise TypeError(f"Cannot read a replica configuration from a {type(target).__name__}; pass a scale "
                    f"({sorted(SCALES)}), an InternLMXcomposer2Config or a loaded replica model.")


def _key(config: InternLMXcomposer2Config) -> str:
    return json.dumps(config.to_dict(), sort_keys=True, default=str)


@lru_cache(maxsize=8)
def _inventory(config_json: str) -> Inventory:
    from transformers.quantizers.base import get_keys_to_not_convert

    config = InternLMXcomposer2Config.from_dict(json.loads(config_json))
    with torch.device("meta"):
        model = InternLMXComposer2ForCausalLM(config)
    skip = set(get_keys_to_not_convert(model))
    linears = [m for n, m in model.named_modules() if type(m) is nn.Linear and n not in skip]
    return Inventory(
        params=sum(p.numel() for p in model.parameters()),
        linear_weights=tuple((m.out_features, m.in_features) for m in linears),
        float_buffers=sum(b.numel() for b in model.buffers() if b.is_floating_point()),
        other_buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers() if not b.is_floating_point()),
    )


def inventory(target: Any) -> Inventory:
    """The inventory of a scale name, a configuration or a loaded replica (cached per configuration)."""
    return _inventory(_key(as_config(target)))


def parameter_count(target: Any) -> int:
    """Parameters of the replica, counted on the meta device: 8,666,840,064 at full scale."""
    return inventory(target).params
