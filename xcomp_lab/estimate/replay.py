"""The replay: what `run_caption` computes, on the fake model, with `generate`'s greedy loop written out."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any, Iterator

import torch
from torch import nn

from xcomp_lab.estimate.accounting import SimulatedAccounting
from xcomp_lab.model.modeling_internlm_xcomposer2 import (
    CLIP_MEAN,
    CLIP_STD,
)
from xcomp_lab.run.call import autocast, cache_bytes_by_device, grad_mode
from xcomp_lab.run.captioning import prompt_batch
from xcomp_lab.run.generate import stop_token_ids


@dataclass
class Replayed:
    prompt_tokens: int
    cache_bytes_by_device: dict[torch.device, int]  # where each layer's keys and values live

    @property
    def cache_bytes(self) -> int:
        return sum(self.cache_bytes_by_device.values())


def fast_forward(cache: Any, length: int) -> None:
    """Grow every cache layer to `length` tokens, as the skipped decode steps would have."""
    for layer in cache.layers:
        for name in ("keys", "values"):
            old = getattr(layer, name)
            shape, dtype, device = (*old.shape[:-2], length, old.shape[-1]), old.dtype, old.device
            setattr(layer, name, None)  # freed first: the skipped steps never held two copies at once
            del old
            setattr(layer, name, torch.empty(shape, dtype=dtype, device=device))


@contextlib.contextmanager
def mark_parts(model: nn.Module, acc: SimulatedAccounting) -> Iterator[None]:
    """Tell the accounting which part of the model runs, for the peak's and the budget crossing's position."""
    layers = model.model.layers
    parts = [(model.vit, "vision tower"), (model.vision_proj, "projector"), (model.output, "output head")]
    parts += [(layer, f"decoder layer {i + 1}/{len(layers)}") for i, layer in enumerate(layers)]
    handles = [module.register_forward_pre_hook(partial(acc.at, where)) for module, where in parts]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def replay(model: nn.Module, tokenizer: Any, pixels: list[torch.Tensor], *, query: str, image_size: int,
            new_tokens: int, grad: str, use_autocast: bool, exact_decode: bool,
            acc: SimulatedAccounting) -> Replayed:
    """What `run_caption` computes, with `generate`'s greedy loop written out (its stopping checks read data)."""
    with grad_mode(grad), autocast("cpu", use_autocast), mark_parts(model, acc):
        acc.mark("vision")
        # As vis_processor normalises a decoded image (the decoded pixels themselves are not counted).
        mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
        images = [(p - mean) / std for p in pixels]  # (3, S, S) each
        del mean, std
        embeds, im_mask = prompt_batch(model, tokenizer, images, query, image_size)  # (B, T, C), (B, T)
        del images
        with torch.no_grad():  # generate() is decorated with it
            batch, prompt = embeds.shape[:2]
            # generate's special-token tensors (bos, the two stops, pad) and its position ids, grown each step,
            # on the inputs' device; its input ids on the model's (the first parameter's) device.
            at, ids_at = embeds.device, next(model.parameters()).device
            stops = stop_token_ids(tokenizer)
            specials = [torch.tensor(token, device=at) for token in (tokenizer.bos_token_id, stops,
                                                                     tokenizer.pad_token_id)]
            mask = torch.ones((batch, prompt), dtype=torch.long, device=at)
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # (B, T)
            prompt_positions = positions  # generate's own model_kwargs hold them until it returns
            del mask
            input_ids = torch.ones((batch, 0), dtype=torch.long, device=ids_at)
            unfinished = torch.ones(batch, dtype=torch.long, device=ids_at)
            legacy = bool(getattr(model.config, "original_memory", False))
            cache = outputs = None
            previous_cache: list[tuple[torch.Tensor, torch.Tensor]] = []
            # Decode step 1 is always simulated: under `original_memory` it holds the prefill's logits and cache.
            steps = range(new_tokens) if exact_decode else sorted({0, min(1, new_tokens - 1), new_tokens - 1})
            done = 0
            for step in steps:
                if step > done + 1:
                    previous_cache = []  # the skipped steps' loop held the cache of the step before only
                    fast_forward(cache, prompt + step - 1)
                    input_ids = torch.empty((batch, step), dtype=torch.long, device=ids_at)
                    positions = torch.empty((batch, prompt + step), dtype=torch.long, device=at)
                acc.mark("prefill" if step == 0 else f"decode step {step}")
                model_inputs = model.prepare_inputs_for_generation(
                    input_ids, cache=cache, inputs_embeds=embeds, im_mask=im_mask, use_cache=True)
                if legacy:  # run.generate.legacy_greedy_search: the previous outputs and cache held meanwhile
                    previous_cache = [] if cache is None else [(layer.keys, layer.values) for layer in cache.layers]
                    outputs = model(**model_inputs, return_dict=True)
                    next_token_logits = outputs.logits[:, -1, :]  # a view: the step's whole logits stay alive
                else:
                    outputs = model(**model_inputs, return_dict=True)
                    if step == 0:
                        del model_inputs  # _prefill's own local: gone when it returns
                    # Kept until the next step reassigns them, as in generate's loop.
                    next_token_logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32,
                                                                  device=input_ids.device)  # (B, vocab)
                cache = outputs.cache
                next_tokens = torch.argmax(next_token_logits, dim=-1)
                next_tokens = next_tokens * unfinished + specials[2] * (1 - unfinished)
                input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
                positions = torch.cat([positions, positions[..., -1:] + 1], dim=-1)
                if not legacy:
                    del outputs  # the prefill logits go here, as generate deletes them
                done = step
            del previous_cache, prompt_positions
        return Replayed(prompt_tokens=prompt, cache_bytes_by_device=cache_bytes_by_device(cache))


@lru_cache(maxsize=1)
def course_tokenizer() -> Any:
    from xcomp_lab.model.checkpoint import course_tokenizer

    return course_tokenizer()
