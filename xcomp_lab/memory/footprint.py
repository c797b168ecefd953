"""What a model's weights occupy: parameters, buffers and bitsandbytes' statistics, counted or predicted.

bitsandbytes keeps, beside each quantized weight, tensors that are neither parameters nor buffers, so
`model.parameters()` misses them (the CPU tensor accounting does too; the CUDA allocator counts them):

- LLM.int8() (`Linear8bitLt`): one FP32 scale per output row, `SCB`, on the weight or, after the first call,
  on the layer's `state`.
- 4-bit (`Linear4bit`): one absmax per block of 64 values and the 16-entry FP32 code of NF4 or FP4; with double
  quantization the absmax are themselves 8-bit, with one FP32 absmax per 256 of them, the 256-entry FP32 code
  of that second quantization and one FP32 offset. Every layer holds its own copy of each code.

`statistics()` lists them on a real (or fake) layer; `quantized_linear_bytes()` predicts them from a shape.
Both follow the same rule, so a prediction and a count of the same model agree to the byte.
"""

from __future__ import annotations

from itertools import chain

import torch
from torch import nn

from xcomp_lab.core.checks import check_choice

BLOCK = 64  # bitsandbytes' 4-bit block: one absmax per 64 values
NESTED_BLOCK = 256  # double quantization: one FP32 absmax per 256 absmax
CODE_4BIT = 16  # entries of the NF4 / FP4 code
CODE_NESTED = 256  # entries of the 8-bit code of double quantization
QUANTIZED_LINEARS = ("int8", "nf4", "fp4")
FP32 = 4


def statistics(module: nn.Module) -> list[torch.Tensor]:
    """The tensors bitsandbytes keeps beside the weight of `module` (none for a layer that is not quantized)."""
    weight = getattr(module, "weight", None)
    found = [getattr(weight, "SCB", None)]
    if found[0] is None:
        found[0] = getattr(getattr(module, "state", None), "SCB", None)
    state = getattr(weight, "quant_state", None)
    while state is not None:
        found += [state.absmax, state.code, getattr(state, "offset", None)]
        state = getattr(state, "state2", None)
    return [t for t in found if isinstance(t, torch.Tensor)]


def _storage_bytes(tensors: list[torch.Tensor]) -> int:
    seen = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    return sum(seen.values())


def statistics_bytes(model: nn.Module) -> int:
    """Bytes of bitsandbytes' statistics over a whole model (0 when nothing is quantized)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"statistics_bytes needs a torch.nn.Module, got {type(model).__name__}")
    return _storage_bytes([t for module in model.modules() for t in statistics(module)])


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's own parameters and buffers (not its children's) plus its bitsandbytes statistics."""
    own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    return sum(t.numel() * t.element_size() for t in own) + _storage_bytes(statistics(module))


def resident_bytes(model: nn.Module | None, device: str) -> int:
    """Bytes of the model's parameters and buffers stored on `device`, each storage counted once.

    A bare "cuda" means the current CUDA device, as everywhere in PyTorch.
    """
    if model is None:
        return 0
    target = torch.device(device)
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    return _storage_bytes([t for t in chain(model.parameters(), model.buffers()) if t.device == target])


def quantized_linear_bytes(out_features: int, in_features: int, quantization: str,
                           double_quant: bool = True) -> tuple[int, int]:
    """(stored weight bytes, statistics bytes) of one linear as bitsandbytes 0.50 keeps it quantized.

    `double_quant` is the 4-bit config's `bnb_4bit_use_double_quant` (the course's is True).
    """
    check_choice("quantization", quantization, QUANTIZED_LINEARS)
    values = out_features * in_features
    if quantization == "int8":
        return values, out_features * FP32  # int8 weight, one FP32 scale per output row
    blocks = -(-values // BLOCK)
    if double_quant:
        stats = blocks + -(-blocks // NESTED_BLOCK) * FP32 + CODE_NESTED * FP32 + FP32
    else:
        stats = blocks * FP32
    return -(-values // 2), stats + CODE_4BIT * FP32
