"""The checked settings of one predicted captioning call, from a scale, a configuration or a loaded model."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from xcomp_lab.core.checks import BATCH_SIZE, IMAGE_SIZE, NEW_TOKENS, check_choice
from xcomp_lab.core.dtypes import check_dtype, dtype_name
from xcomp_lab.memory import Budget
from xcomp_lab.memory.budget import DEVICE_KINDS
from xcomp_lab.model.configuration_internlm_xcomposer2 import InternLMXcomposer2Config
from xcomp_lab.model.inventory import as_config
from xcomp_lab.model.loading import QUANTIZATIONS
from xcomp_lab.model.modeling_internlm_xcomposer2 import (
    SUPPORTED_ATTENTION,
)
from xcomp_lab.run.call import GRAD_MODES


def check_device(device: Any) -> str:
    text = str(device) if isinstance(device, (str, torch.device)) else None
    kind = text.split(":")[0] if text else None
    if kind not in DEVICE_KINDS or (kind == "cpu" and text != "cpu"):
        raise ValueError(f"device={device!r}; predict for 'cpu' or 'cuda' (any CUDA index counts the same).")
    return kind


def config_of(target: Any) -> tuple[InternLMXcomposer2Config, nn.Module | None]:
    """(a private copy of the configuration, the model if one was given)."""
    return as_config(target), target if isinstance(target, nn.Module) else None


def model_settings(model: nn.Module) -> tuple[str, str]:
    """(dtype, quantization) of a loaded model: what it stores in floating point, and its bitsandbytes layers."""
    import bitsandbytes as bnb

    quantization = "none"
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear8bitLt):
            quantization = "int8"
        elif isinstance(module, bnb.nn.Linear4bit):
            quantization = module.weight.quant_type
    floating = Counter(p.dtype for p in model.parameters() if p.is_floating_point())
    return dtype_name(floating.most_common(1)[0][0]), quantization


def resolve_budget(budget: Any, device: str) -> int | None:
    if budget is None:
        return None
    if isinstance(budget, Budget):
        if ("cpu" if budget.device == "cpu" else "cuda") != device:
            raise ValueError(f"the budget is for {budget.device!r} but the prediction is for {device!r}: "
                             f"make the budget for {device!r}, or pass its limit in bytes")
        return budget.limit_bytes
    if isinstance(budget, int) and not isinstance(budget, bool) and budget > 0:
        return budget
    raise ValueError(f"budget={budget!r}; pass a Budget, a limit in bytes (e.g. gb_to_bytes(48)) or None.")


@dataclass(frozen=True)
class CaptionCall:
    """The checked settings of one predicted captioning call."""

    config: InternLMXcomposer2Config  # a private copy, with the attention kind set
    dtype: torch.dtype
    quantization: str
    attn: str
    grad: str
    use_autocast: bool
    batch_size: int
    image_size: int
    new_tokens: int
    device: str  # "cpu" or "cuda"

    def settings(self) -> dict[str, Any]:
        """What `Estimate.settings` reports."""
        return dict(dtype=dtype_name(self.dtype), quantization=self.quantization, grad=self.grad,
                    use_autocast=self.use_autocast, attn_implementation=self.attn, batch_size=self.batch_size,
                    image_size=self.image_size, new_tokens=self.new_tokens)

    def kv_cache_bytes(self, prompt_tokens: int, layers: int | None = None) -> int:
        """2 x layers x kv_heads x head_dim x batch x (prompt + new - 1) x bytes (all layers by default)."""
        config = self.config
        kv_dtype = torch.float16 if self.use_autocast else self.dtype
        return (2 * (config.num_hidden_layers if layers is None else layers) * config.num_key_value_heads
                * config.head_dim * self.batch_size * (prompt_tokens + self.new_tokens - 1)
                * torch.empty((), dtype=kv_dtype).element_size())


def check_call(target: Any, *, dtype: Any, quantization: Any, grad: Any, use_autocast: Any,
                attn_implementation: Any, batch_size: Any, image_size: Any, new_tokens: Any, device: Any) -> CaptionCall:
    """The settings of `estimate_caption`, checked, with a loaded model's own dtype, quantization and attention."""
    config, model = config_of(target)
    model_dtype, model_quant = model_settings(model) if model is not None else ("float32", "none")
    torch_dtype = check_dtype(dtype if dtype is not None else model_dtype)
    if torch_dtype is None:
        raise ValueError("dtype='auto' has no size to predict with; pass 'float32', 'float16' or 'bfloat16'.")
    quant = check_choice("quantization", quantization if quantization is not None else model_quant, QUANTIZATIONS)
    attn = attn_implementation or (config._attn_implementation if model is not None else None) or "eager"
    check_choice("attn_implementation", attn, SUPPORTED_ATTENTION, "eager materialises the scores")
    check_choice("grad", grad, GRAD_MODES, "the quick start's torch.set_grad_enabled(False) is 'no_grad'")
    if not isinstance(use_autocast, bool):
        raise ValueError(f"use_autocast={use_autocast!r}; pass True (the quick start's autocast) or False.")
    BATCH_SIZE.check("batch_size", batch_size, hint="images captioned together")
    NEW_TOKENS.check("new_tokens", new_tokens, hint="tokens generated per caption")
    patch = config.vision_config.patch_size
    size = config.image_size if image_size is None else IMAGE_SIZE.check("image_size", image_size,
                                                                        hint="pixels per side")
    if size % patch:
        raise ValueError(f"image_size={size}; it must be a multiple of the {patch} px patch size, "
                         f"e.g. {max(patch, size // patch * patch)}.")
    kind = check_device(device)
    config._attn_implementation = attn
    return CaptionCall(config=config, dtype=torch_dtype, quantization=quant, attn=attn, grad=grad,
                 use_autocast=use_autocast, batch_size=batch_size, image_size=size, new_tokens=new_tokens, device=kind)
