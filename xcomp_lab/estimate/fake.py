"""The fake model: the replica built under `FakeTensorMode` in the dtype asked for and quantized by the real
bitsandbytes modules, as `load_for_step` leaves it, with shapes and storages but no data."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from xcomp_lab.memory.footprint import statistics

if TYPE_CHECKING:  # the replica's modules need transformers 5; quantize_with and the rest need only torch
    from xcomp_lab.model.configuration_internlm_xcomposer2 import (
        InternLMXcomposer2Config,
    )


def fake_param(data: torch.Tensor, **attributes: Any) -> nn.Parameter:
    # bitsandbytes' parameter classes cannot wrap a FakeTensor, so the weight is a plain (fake) parameter
    # carrying the attributes their modules read: CB/SCB for int8, quant_state for 4-bit.
    param = nn.Parameter(data, requires_grad=False)
    for name, value in attributes.items():
        setattr(param, name, value)
    return param


def quantize(model: nn.Module, quantization: str, compute: torch.dtype, fake_mode: FakeTensorMode) -> None:
    """Convert the linears as `from_pretrained(quantization_config=...)` does, quantizing the fake weights."""
    from xcomp_lab.model.loading import quantization_config

    quantize_with(model, quantization_config(quantization, compute), fake_mode)


def quantize_with(model: nn.Module, config: Any, fake_mode: FakeTensorMode) -> None:
    """Quantize any model's fake linears as `from_pretrained(quantization_config=config)` does (a BitsAndBytesConfig):
    the same modules skipped (the output embeddings, tied and fp32-kept modules, the config's skip list)."""
    import bitsandbytes as bnb
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.base import HfQuantizer

    double_quant_map()
    originals = {name: module for name, module in model.named_modules() if type(module) is nn.Linear}
    # Outside the fake mode: the new modules make bitsandbytes parameters on the meta device.
    skip = HfQuantizer.get_modules_to_not_convert(model, config.llm_int8_skip_modules,
                                                  getattr(model, "_keep_in_fp32_modules", None))
    replace_with_bnb_linear(model, skip, config)
    with fake_mode:
        for name, module in model.named_modules():
            if isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)):
                quantize_fake_linear(module, originals[name].weight.detach().contiguous(), originals[name].bias)


def double_quant_map() -> None:
    """Make the global map double quantization reads, outside the fake mode, so that it is a real tensor."""
    import bitsandbytes.functional as bnb_f

    if "dynamic" not in bnb_f.name2qmap:
        bnb_f.name2qmap["dynamic"] = bnb_f.create_dynamic_map()


def quantize_fake_linear(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Give a bitsandbytes linear made on the meta device (outside the fake mode) the fake form of `weight` as
    bitsandbytes quantizes it on `.to(device)`, and `bias`. Call it inside the fake mode, after `double_quant_map()`
    outside it."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_f

    if isinstance(module, bnb.nn.Linear8bitLt):
        cb, scb, _ = bnb_f.int8_vectorwise_quant(weight.to(torch.float16))
        module.weight = fake_param(cb, CB=cb, SCB=scb, has_fp16_weights=False)
        # Outlier columns depend on the activations' values: the simulation assumes none.
        module.state.threshold = 0.0
    else:
        packed, state = bnb_f.quantize_4bit(
            weight, blocksize=module.weight.blocksize, compress_statistics=module.weight.compress_statistics,
            quant_type=module.weight.quant_type, quant_storage=module.weight.quant_storage)
        module.weight = fake_param(packed, quant_state=state)
        module.quant_state = state
        # CPUs with AVX512-BF16 repack 4-bit weights on the first call; that path is not simulated.
        module.support_avx512bf16_for_cpu = False
    module.bias = bias


def build_fake_model(config: InternLMXcomposer2Config, dtype: torch.dtype, quantization: str,
           fake_mode: FakeTensorMode) -> nn.Module:
    """The replica with fake tensors, as `load_for_step` leaves it (eval mode, dtype set at construction)."""
    from xcomp_lab.model.modeling_internlm_xcomposer2 import (
        InternLMXComposer2ForCausalLM,
    )

    previous = torch.get_default_dtype()
    try:
        with fake_mode:
            # from_pretrained(dtype=...) builds under this default dtype: the rotary tables follow it.
            torch.set_default_dtype(dtype)
            model = InternLMXComposer2ForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    if quantization != "none":
        compute = dtype if dtype != torch.float32 else torch.float16
        quantize(model, quantization, compute, fake_mode)
    return model


def quant_state_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The statistics bitsandbytes keeps beside the weights (not parameters or buffers)."""
    return [t for module in model.modules() for t in statistics(module)]
