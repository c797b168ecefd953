"""bitsandbytes for the original model's PLoRA layers: why transformers' own INT8/NF4 load fails, and two recipes.

The original's `PLoRA` subclasses `nn.Linear` and adds a low-rank branch applied at image tokens only; it is
called as `self.wqkv(hidden_states, im_mask)`. transformers 4.33.2's `load_in_8bit`/`load_in_4bit` swaps every
`nn.Linear` (subclasses included) for a plain `Linear8bitLt`/`Linear4bit`: the branch's `Plora_A`/`Plora_B` are
dropped (their weights become unexpected keys) and the first forward raises `TypeError: Linear8bitLt.forward()
takes 2 positional arguments but 3 were given`.

Two ways that work with the unchanged remote code:

- `quantize_plora(model, "int8" | "nf4")`: load in FP16 as usual, then replace each PLoRA by a
  `QuantizedPLoRA` that keeps the branch (FP16) and quantizes the base weight, which holds nearly all of the
  decoder's parameters. The model saves what the course's replica saves with its `base_layer` design.
- `skip_plora_config(...)`: transformers' own load with the PLoRA projections in `llm_int8_skip_modules`. It
  runs, but keeps the whole decoder in FP16 and quantizes only the vision tower and projector: about 4% less
  memory than FP16 instead of about half (the steps' records measure it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from xcomp_lab.core.checks import check_choice

PLORA_NAMES = ("wqkv", "wo", "w1", "w2", "w3")  # the decoder projections the original builds as PLoRA
QUANTIZATIONS = ("int8", "nf4")


def is_plora(module: nn.Module) -> bool:
    """True for the original's PLoRA layers: a linear that carries its own `Plora_A` and `Plora_B`."""
    return isinstance(module, nn.Linear) and isinstance(getattr(module, "Plora_A", None), nn.Linear) \
        and isinstance(getattr(module, "Plora_B", None), nn.Linear)


class QuantizedPLoRA(nn.Module):
    """A PLoRA layer whose base weight is a bitsandbytes layer; the low-rank branch stays in floating point.

    Called like the original, `layer(x, im_mask)`: the base product for every token, plus
    `Plora_B(Plora_A(x)) * lora_scaling` at the tokens `im_mask` marks (image tokens).
    """

    def __init__(self, base: nn.Module, plora: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.Plora_A = plora.Plora_A
        self.Plora_B = plora.Plora_B
        self.lora_scaling = plora.lora_scaling
        self.lora_dropout = plora.lora_dropout
        self.in_features, self.out_features = plora.in_features, plora.out_features

    def forward(self, x: torch.Tensor, im_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.base(x)  # (B, T, out)
        if im_mask is None or not bool(im_mask.any()):
            return out
        image_rows = x[im_mask]  # (image tokens, in)
        out[im_mask] += self.Plora_B(self.Plora_A(self.lora_dropout(image_rows))) * self.lora_scaling
        return out


def plora_base_layer(plora: nn.Linear, quantization: str, compute_dtype: torch.dtype) -> nn.Module:
    """The bitsandbytes layer (on the meta device, no weights yet) that takes `plora`'s base weight: LLM.int8()
    with its outlier threshold 6.0, or NF4 with double quantization."""
    import bitsandbytes as bnb

    with torch.device("meta"):
        if quantization == "int8":
            return bnb.nn.Linear8bitLt(plora.in_features, plora.out_features, bias=plora.bias is not None,
                                       has_fp16_weights=False, threshold=6.0)
        return bnb.nn.Linear4bit(plora.in_features, plora.out_features, bias=plora.bias is not None,
                                 compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")


def _quantized_base(plora: nn.Linear, quantization: str, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A bitsandbytes layer holding `plora`'s base weight quantized on `device` (bitsandbytes quantizes on `.to`)."""
    import bitsandbytes as bnb

    weight = plora.weight.detach().to("cpu", torch.float16)
    bias = plora.bias
    layer = plora_base_layer(plora, quantization, compute_dtype)
    if quantization == "int8":
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                         module=layer)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to("cpu", compute_dtype), requires_grad=False)
    return layer.to(device)


def quantize_plora(model: nn.Module, quantization: str, *, compute_dtype: torch.dtype = torch.float16) -> int:
    """Quantize the base weight of every PLoRA layer of `model` in place (LLM.int8() or NF4 with double
    quantization, as the course's steps); returns how many layers were replaced.

    Each layer is quantized on the device its weight is on, one at a time (its FP16 weight is freed as soon as it
    is replaced). The rest of the model (embeddings, norms, vision tower, projector, output) is left as loaded.
    """
    check_choice("quantization", quantization, QUANTIZATIONS,
                 hint="'int8' is LLM.int8(), 'nf4' 4-bit NormalFloat with double quantization")
    targets = [name for name, module in model.named_modules() if is_plora(module)]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no PLoRA layer (a linear with Plora_A and Plora_B): is it the "
                         "original InternLM-XComposer2 remote code, and not yet quantized?")
    for name in targets:  # by name, so each replaced layer's FP16 weight is freed before the next is quantized
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        plora = getattr(parent, child)
        setattr(parent, child, QuantizedPLoRA(_quantized_base(plora, quantization, compute_dtype, plora.weight.device),
                                              plora))
        del plora
    return len(targets)


def skip_plora_config(quantization: str, compute_dtype: torch.dtype = torch.float16) -> Any:
    """transformers' BitsAndBytesConfig with the PLoRA projections (and the output layer, which transformers
    keeps in full precision by default) in `llm_int8_skip_modules`: the load and the chat run, the decoder stays
    unquantized. Needs transformers imported (the original's environment)."""
    from transformers import BitsAndBytesConfig

    check_choice("quantization", quantization, QUANTIZATIONS)
    skip = [*PLORA_NAMES, "output"]
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip)
