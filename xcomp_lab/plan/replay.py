"""The replay: one `model.generate` call of any transformers model, run by transformers itself on fake weights.

The model is built by its own class (`from_config`, the dtype and attention asked for, on fake tensors) and
quantized as `from_pretrained(quantization_config=BitsAndBytesConfig(...))` leaves it, by the real bitsandbytes
modules (`estimate.fake.quantize_with`). Then `model.generate(**inputs, do_sample=False, max_new_tokens=N,
min_new_tokens=N)` runs as written: transformers' own generate loop, logits processors, cache classes (dynamic,
sliding-window, hybrid, whatever the model asks for), masks and modeling file. The inputs are real tensors
and the values the code reads stay real (`realvalues.RealValues`), so every branch goes the way the real call
goes and every op allocates what it allocates there.

Hooks tell the accounting what runs: the phase (vision encoder, prefill, decode step n) and the part (decoder
layer i/n, output head), and they read the cache's size at the last step.

Decode steps only grow: each runs the same ops as the one before on a cache one token longer, and frees all its
activations before the next. So by default (`fast_forward`) only the first and the last decode steps run the
model; the steps between keep everything that outlives a step exactly as the real call does (generate's loop,
its logits processing, the cache grown token by token through the cache's own `update`, the logits of one
token) and skip the layers' passing activations. `exact_decode=True` runs every step in full.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from xcomp_lab.estimate.fake import quantize_with
from xcomp_lab.plan.accounting import PlanAccounting
from xcomp_lab.plan.families import Family


def greedy_generate(model: nn.Module, inputs: dict[str, torch.Tensor], new_tokens: int) -> torch.Tensor:
    """The planned call: greedy, exactly `new_tokens` new tokens, the first end-of-sequence id as the only one and
    as padding (a model whose config lists several keeps the first)."""
    eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = eos = eos[0] if isinstance(eos, list) else eos
    return model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          pad_token_id=eos)


def build_fake_model(config: Any, *, dtype: torch.dtype, attn: str, bnb_config: Any,
                     fake_mode: FakeTensorMode) -> nn.Module:
    """The model on fake tensors, as `from_pretrained(dtype=, attn_implementation=, quantization_config=)` leaves it."""
    from xcomp_lab.plan.build import model_class

    config = copy.deepcopy(config)
    with fake_mode:
        model = model_class(config).from_config(config, dtype=dtype, attn_implementation=attn).eval()
    if bnb_config is not None:
        quantize_with(model, bnb_config, fake_mode)
        # The new bitsandbytes modules are made in training mode; on a CPU a training Linear8bitLt takes another
        # path (MatMul8bitFp) than the CUDA one, and the real call runs the model in eval mode.
        model.eval()
    return model


@contextlib.contextmanager
def fast_forward(model: nn.Module, new_tokens: int) -> Iterator[None]:
    """Run decode steps 2 to new_tokens - 2 without the model's layers (see the module's docstring)."""
    forward, state = model.forward, {"step": 0, "output": None}
    head = model.get_output_embeddings()

    @functools.wraps(forward)  # generate checks its kwargs against the forward's signature
    def skipping(*args: Any, **kwargs: Any) -> Any:
        step = state["step"]
        state["step"] += 1
        if not 2 <= step <= new_tokens - 2:
            state["output"] = type(out := forward(*args, **kwargs))
            return out
        cache = kwargs["cache"]
        for layer in cache.layers:
            shape = (*layer.keys.shape[:-2], 1, layer.keys.shape[-1])  # (B, kv heads, 1, head dim)
            layer.update(torch.empty(shape, dtype=layer.keys.dtype), torch.empty(shape, dtype=layer.values.dtype))
        batch = kwargs["input_ids"].shape[0] if kwargs.get("input_ids") is not None else kwargs[
            "inputs_embeds"].shape[0]
        logits = torch.empty((batch, 1, head.out_features), dtype=head.weight.dtype)  # (B, 1, vocab)
        return state["output"](logits=logits, cache=cache)

    model.forward = skipping
    try:
        yield
    finally:
        del model.forward


@contextlib.contextmanager
def phases(model: nn.Module, family: Family, acc: PlanAccounting, new_tokens: int,
           cache_bytes: list[int]) -> Iterator[None]:
    """Mark the phase and part for the accounting while generate runs; put the final cache's bytes in `cache_bytes`."""
    layers = model.get_submodule(family.layers)
    state = {"forward": 0}

    def forward_starts(*_: Any) -> None:
        step = state["forward"]
        if step:
            acc.mark(f"decode step {step}")
        elif acc.phase != "vision":  # generate may have run the vision encoder already, before this forward
            acc.mark("vision" if family.is_vlm else "prefill")

    def vision_starts(*_: Any) -> None:
        if acc.phase != "vision":
            acc.mark("vision")
        acc.at("vision encoder")

    def forward_ends(_module: Any, _args: Any, output: Any) -> None:
        state["forward"] += 1
        if state["forward"] == new_tokens:
            cache_bytes.append(stored_cache_bytes(output.cache))

    def layer_starts(index: int, *_: Any) -> None:
        if acc.phase == "vision":
            acc.mark("prefill")
        acc.at(f"decoder layer {index + 1}/{len(layers)}")

    handles = [model.register_forward_pre_hook(forward_starts), model.register_forward_hook(forward_ends),
               model.lm_head.register_forward_pre_hook(lambda *_: acc.at("output head"))]
    handles += [layer.register_forward_pre_hook(partial(layer_starts, i)) for i, layer in enumerate(layers)]
    if family.vision:
        handles.append(model.get_submodule(family.vision).register_forward_pre_hook(vision_starts))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def stored_cache_bytes(cache: Any) -> int:
    """Bytes the cache's key and value tensors hold, each storage once."""
    storages = {}
    for layer in getattr(cache, "layers", ()):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                storages[tensor.untyped_storage()._cdata] = tensor.untyped_storage().nbytes()
    return sum(storages.values())
