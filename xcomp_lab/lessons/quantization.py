"""Look inside a bitsandbytes-quantized model: what was converted, what its statistics cost, whether PLoRA still
acts at image positions, and what one quantized matrix product costs on this device.

- `module_precisions()` groups the modules that hold tensors by class, with their storage dtype and bytes: the
  quantized linears next to what stayed 16-bit (output head, embeddings, norms, the ViT's patch convolution).
- `plora_effect()` runs the same prompt with and without `im_mask` and says where the logits start to differ.
- `matmul_cost()` times one quantized linear against the dequantization of its weight and a 16-bit product
  with the dequantized weight: on a CPU bitsandbytes turns the stored weight back into floats for every call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter
from typing import Any

import torch
import torch.nn.functional as F

from xcomp_lab.core.checks import check_choice, check_int
from xcomp_lab.memory.budget import resolve_device
from xcomp_lab.memory.footprint import module_bytes, quantized_linear_bytes, statistics

QUANTIZED_CLASSES = ("Linear8bitLt", "Linear4bit")


def is_quantized(module: torch.nn.Module) -> bool:
    """True for bitsandbytes' 8-bit and 4-bit linears (checked by name: bitsandbytes need not be importable)."""
    return type(module).__name__ in QUANTIZED_CLASSES


@dataclass(frozen=True)
class ModuleKind:
    """All modules of one class that hold tensors themselves (not through children)."""

    kind: str  # class name, e.g. "Linear4bit"
    count: int
    storage: str  # dtypes of their own parameters and buffers, e.g. "uint8 + float16"
    nbytes: int  # their parameters and buffers plus bitsandbytes statistics
    quantized: bool
    example: str  # the first module's name


def module_precisions(model: torch.nn.Module) -> list[ModuleKind]:
    """Modules holding tensors, grouped by class, quantized classes first, then by bytes (largest first)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"module_precisions needs a torch.nn.Module, got {type(model).__name__}")
    groups: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if not own:
            continue
        kind = type(module).__name__
        group = groups.setdefault(kind, {"count": 0, "dtypes": [], "nbytes": 0, "example": name or "(model)",
                                         "quantized": is_quantized(module)})
        group["count"] += 1
        group["nbytes"] += module_bytes(module)
        for tensor in own:
            dtype = str(tensor.dtype).removeprefix("torch.")
            if dtype not in group["dtypes"]:
                group["dtypes"].append(dtype)
    rows = [ModuleKind(kind, g["count"], " + ".join(g["dtypes"]), g["nbytes"], g["quantized"], g["example"])
            for kind, g in groups.items()]
    return sorted(rows, key=lambda r: (not r.quantized, -r.nbytes))


def format_module_precisions(rows: list[ModuleKind], fmt_bytes: Callable[[float], str]) -> str:
    """A table: class, count, storage dtypes, bytes, quantized or not, one example name."""
    if not rows:
        raise ValueError("rows is empty: pass module_precisions(model)")
    kind_width = max(len("module class"), *(len(r.kind) for r in rows))
    storage_width = max(len("storage"), *(len(r.storage) for r in rows))
    lines = [f"{'module class':<{kind_width}}  {'count':>5}  {'storage':<{storage_width}}  {'bytes':>10}  "
             f"{'quantized':<9}  example"]
    for r in rows:
        lines.append(f"{r.kind:<{kind_width}}  {r.count:>5}  {r.storage:<{storage_width}}  {fmt_bytes(r.nbytes):>10}  "
                     f"{'yes' if r.quantized else 'no':<9}  {r.example}")
    return "\n".join(lines)


@dataclass(frozen=True)
class PLoRAEffect:
    """Where the logits with `im_mask` first differ from those without it, in the first prompt of the batch."""

    first_image_position: int
    image_tokens: int
    first_difference: int | None  # None: the two runs agree everywhere (PLoRA did nothing)
    max_diff_before_image: float
    min_diff_from_image_on: float  # the smallest per-position max |diff| from the first image token on
    positions: int

    @property
    def acts_only_from_image_on(self) -> bool:
        return self.first_difference == self.first_image_position and self.max_diff_before_image == 0.0


@torch.inference_mode()
def plora_effect(model: Any, inputs_embeds: torch.Tensor, im_mask: torch.Tensor) -> PLoRAEffect:
    """Prefill logits of the same prompt with `im_mask` (PLoRA on at image tokens) and with None (PLoRA off).

    Positions before the first image token see only text, in both runs, so a working PLoRA leaves them
    unchanged; from the first image token on the low-rank branch adds to every projection.
    """
    if im_mask.dtype != torch.bool or im_mask.shape != inputs_embeds.shape[:2]:
        raise ValueError(f"im_mask must be a bool tensor of shape {tuple(inputs_embeds.shape[:2])} (batch, tokens), "
                         f"got {im_mask.dtype} {tuple(im_mask.shape)}: use captioning.prompt_batch")
    image_positions = im_mask[0].nonzero().flatten()
    if image_positions.numel() == 0:
        raise ValueError("the first prompt has no image token: PLoRA acts only at image positions")
    with_mask = model(inputs_embeds=inputs_embeds[:1], im_mask=im_mask[:1], use_cache=False).logits[0]  # (T, V)
    without = model(inputs_embeds=inputs_embeds[:1], im_mask=None, use_cache=False).logits[0]  # (T, V)
    per_position = (with_mask.float() - without.float()).abs().amax(dim=-1).cpu()  # (T,)
    first = int(image_positions[0])
    differing = per_position.nonzero().flatten()
    return PLoRAEffect(
        first_image_position=first,
        image_tokens=int(image_positions.numel()),
        first_difference=int(differing[0]) if differing.numel() else None,
        max_diff_before_image=float(per_position[:first].max()) if first > 0 else 0.0,
        min_diff_from_image_on=float(per_position[first:].min()),
        positions=int(per_position.numel()),
    )


def largest_quantized_linear(model: torch.nn.Module, prefix: str = "model.layers.") -> tuple[str, torch.nn.Module]:
    """The quantized linear with the most weights whose name starts with `prefix` (the decoder's, by default)."""
    found = [(name, m) for name, m in model.named_modules() if is_quantized(m) and name.startswith(prefix)]
    if not found:
        raise ValueError(f"no bitsandbytes linear under {prefix!r}: load the model with a BitsAndBytesConfig")
    return max(found, key=lambda item: item[1].in_features * item[1].out_features)


def dequantized_weight(layer: torch.nn.Module, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The (out, in) weight of a bitsandbytes linear turned back into `dtype`, as a dequantizing kernel does."""
    kind = type(layer).__name__
    if kind == "Linear4bit":
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
    if kind == "Linear8bitLt":
        state = getattr(layer, "state", None)
        cb = getattr(state, "CB", None)
        cb = layer.weight.data if cb is None else cb  # (out, in) int8
        scb = next(t for t in statistics(layer) if t.dtype == torch.float32)  # (out,) FP32 absmax of each row
        return (cb.float() * (scb.float().unsqueeze(1) / 127.0)).to(dtype)
    raise TypeError(f"{kind} is not a bitsandbytes Linear8bitLt or Linear4bit")


@dataclass(frozen=True)
class MatmulCost:
    """Best-of-n seconds of one quantized linear and of what a dequantizing kernel does in its place."""

    tokens: int
    quantized_s: float  # layer(x)
    dequantize_s: float  # the weight back to 16 bits
    fp16_matmul_s: float  # F.linear(x, dequantized weight)
    stored_bytes: int  # the packed weight and its statistics
    dequantized_bytes: int  # the 16-bit weight a dequantizing kernel makes for every call

    def __str__(self) -> str:
        return (f"{self.tokens:>4} tokens: quantized {1e3 * self.quantized_s:8.3f} ms | dequantize alone "
                f"{1e3 * self.dequantize_s:8.3f} ms + 16-bit product {1e3 * self.fp16_matmul_s:8.3f} ms | "
                f"x{self.quantized_s / self.fp16_matmul_s:.2f} the 16-bit product")


def _best_time(fn: Callable[[], Any], device: str, repeats: int) -> float:
    def sync() -> None:
        if device != "cpu":
            torch.cuda.synchronize(device)

    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = perf_counter()
        fn()
        sync()
        best = min(best, perf_counter() - start)
    return best


@torch.inference_mode()
def matmul_cost(layer: torch.nn.Module, tokens: int, *, device: str, repeats: int = 5,
                dtype: torch.dtype = torch.float16, seed: int = 0) -> MatmulCost:
    """Time `layer` on `tokens` random rows (1 = a decode step, the prompt length = prefill)."""
    check_int("tokens", tokens, hint="1 for a decode step, the prompt length for prefill")
    device = resolve_device(device)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, tokens, layer.in_features, generator=generator).to(device=device, dtype=dtype)  # (1, T, in)
    weight = dequantized_weight(layer, dtype)
    stored = module_bytes(layer)
    return MatmulCost(
        tokens=tokens,
        quantized_s=_best_time(lambda: layer(x), device, repeats),
        dequantize_s=_best_time(lambda: dequantized_weight(layer, dtype), device, repeats),
        fp16_matmul_s=_best_time(lambda: F.linear(x, weight), device, repeats),
        stored_bytes=stored,
        dequantized_bytes=weight.numel() * weight.element_size(),
    )


def predicted_footprint(model: torch.nn.Module, quantization: str) -> int:
    """Bytes the model would keep quantized by bitsandbytes, predicted from the unquantized model.

    Every `nn.Linear` except the output head becomes 1 byte (int8) or half a byte (nf4) per weight plus its
    statistics (`memory.footprint.quantized_linear_bytes`); biases and every other parameter or buffer keep
    their size.
    """
    check_choice("quantization", quantization, ("int8", "nf4"))
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"predicted_footprint needs a torch.nn.Module, got {type(model).__name__}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    total = 0
    for module in model.modules():
        if is_quantized(module):
            raise ValueError("the model is already quantized: predict from the FP16 (or FP32) model")
        if type(module) is not torch.nn.Linear or module is head:
            total += module_bytes(module)
            continue
        total += sum(quantized_linear_bytes(module.out_features, module.in_features, quantization))
        if module.bias is not None:
            total += module.bias.numel() * module.bias.element_size()
    return total


@dataclass(frozen=True)
class CallMemory:
    """What the memory measurement saw during one call of a layer."""

    tokens: int
    peak_above_start_bytes: int  # highest memory above the level before the call
    output_bytes: int
    dequantized_bytes: int  # the 16-bit weight a dequantizing kernel makes inside the call

    @property
    def sees_dequantized_copy(self) -> bool:
        return self.peak_above_start_bytes >= self.output_bytes + self.dequantized_bytes


@torch.inference_mode()
def call_memory(layer: torch.nn.Module, tokens: int, *, device: str, dtype: torch.dtype = torch.float16,
                seed: int = 0) -> CallMemory:
    """Measure one call of `layer` on `tokens` random rows: is the dequantized weight visible to `measure`?"""
    from xcomp_lab.memory import measure

    device = resolve_device(device)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, tokens, layer.in_features, generator=generator).to(device=device, dtype=dtype)  # (1, T, in)
    layer(x)  # warm-up: first-call state (LLM.int8() moves its scales on the first call)
    with measure(device) as m:
        out = layer(x)  # (1, T, out)
    result = m.result
    return CallMemory(tokens, result.peak_bytes - result.start_bytes, out.numel() * out.element_size(),
                      layer.in_features * layer.out_features * torch.empty((), dtype=dtype).element_size())
