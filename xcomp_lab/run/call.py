"""One measured captioning call, the way the official quick start makes it, with every knob the course turns.

`run_caption()` encodes the images, splices them into the chat prompt and generates, inside the gradient
mode and autocast setting given, under `memory.measure` (and a budget, if any). It marks the phases
(vision, prefill, decode) on the memory timeline and reports the KV cache the call built. An OOM does not
escape: it comes back as a failed run with a report, and memory is back at its baseline.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import Any

import torch

from xcomp_lab.memory import Budget, GuardedResult, MemoryResult, run_guarded
from xcomp_lab.run.modes import GRAD_MODES, autocast, grad_mode

__all__ = [
    "GRAD_MODES",
    "CaptionRun",
    "autocast",
    "autocast_copy_bytes",
    "cache_bytes",
    "cache_bytes_by_device",
    "grad_mode",
    "phase_marks",
    "run_caption",
]


def cache_bytes_by_device(cache: Any) -> dict[torch.device, int]:
    """Bytes held by a transformers Cache (keys and values of every layer), by the device they are on."""
    held: dict[torch.device, int] = {}
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                held[tensor.device] = held.get(tensor.device, 0) + tensor.numel() * tensor.element_size()
    return held


def cache_bytes(cache: Any) -> int:
    """Bytes held by a transformers Cache (keys and values of every layer), on every device."""
    return sum(cache_bytes_by_device(cache).values())


@contextlib.contextmanager
def phase_marks(model: Any, m: Any, vision: Any = None, decoder: Any = None) -> Iterator[None]:
    """Mark "vision" when the vision tower runs, then "prefill" and "decode" at the decoder's first two calls.

    `m` has a `mark(phase)` method; `vision` and `decoder` are the model's modules (default: the replica's `vit`
    and `model`; `vision` None for a language model when `decoder` is given).
    """
    if decoder is None:
        vision, decoder = model.vit, model.model
    calls = {"decoder": 0}

    def on_vision(*_: Any) -> None:
        m.mark("vision")

    def on_decoder(*_: Any) -> None:
        calls["decoder"] += 1
        if calls["decoder"] <= 2:
            m.mark("prefill" if calls["decoder"] == 1 else "decode")

    handles = [decoder.register_forward_pre_hook(on_decoder)]
    if vision is not None:
        handles.append(vision.register_forward_pre_hook(on_vision))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class CaptionRun:
    """A measured captioning call; `captions` is None when it ran out of memory."""

    captions: list[str] | None
    prompt_tokens: int
    new_tokens: int
    seconds: float
    memory: MemoryResult
    oom_report: str | None
    after_release_bytes: int  # memory in use once the call (or its failure) was cleaned up

    @property
    def ok(self) -> bool:
        return self.captions is not None

    @property
    def tokens_per_s(self) -> float | None:
        return self.new_tokens / self.seconds if self.ok and self.seconds > 0 else None


def run_caption(
    model: Any,
    tokenizer: Any,
    images: Sequence[Any],
    *,
    device: str,
    max_new_tokens: int = 16,
    grad: str = "inference_mode",
    use_autocast: bool = False,
    budget: Budget | None = None,
    image_size: int | None = None,
    query: str | None = None,
    label: str = "",
    sample_every: int = 256,
) -> CaptionRun:
    """Caption `images` (one prompt each, greedy) as one measured call; OOM is caught and reported.

    `sample_every`: on CPU, one timeline sample every that many allocations (1 catches every spike; on CUDA
    the timeline holds the phase markers only, the peak comes from the allocator). `query`: None is the course's
    caption query. The replica's prompt and generation code is imported here, not with the module, so that this
    module's other names import under the original's transformers 4.33.2 too.
    """
    from xcomp_lab.model.tokenizer import CAPTION_QUERY
    from xcomp_lab.run.captioning import prompt_batch
    from xcomp_lab.run.generate import generated_tokens, greedy_generate, turn_texts

    query = CAPTION_QUERY if query is None else query
    if not images:
        raise ValueError("images is empty; pass at least one image to caption.")
    shapes: dict[str, int] = {}
    meters: list[Any] = []

    def step() -> list[str]:
        meter = meters[0]
        with grad_mode(grad), autocast(device, use_autocast), phase_marks(model, meter):
            embeds, im_mask = prompt_batch(model, tokenizer, images, query, image_size)
            shapes["prompt"] = embeds.shape[1]
            out = greedy_generate(model, tokenizer, embeds, im_mask, max_new_tokens=max_new_tokens, return_cache=True)
            meter.set_kv_cache_bytes(cache_bytes(out.cache))
            shapes["new"] = generated_tokens(tokenizer, out.sequences)
            return turn_texts(tokenizer, out.sequences)

    start = perf_counter()
    result: GuardedResult = run_guarded(step, device, model=model, budget=budget, label=label, on_start=meters.append,
                                        sample_every=sample_every)
    seconds = perf_counter() - start
    return CaptionRun(
        captions=result.value,
        prompt_tokens=shapes.get("prompt", 0),
        new_tokens=shapes.get("new", 0),
        seconds=seconds,
        memory=result.memory,
        oom_report=None if result.ok else result.report(),
        after_release_bytes=result.after_release_bytes,
    )


def autocast_copy_bytes(model: torch.nn.Module, dtype: torch.dtype = torch.float16) -> int:
    """Bytes of the `dtype` copies autocast makes of every linear and convolution weight (and bias).

    Autocast keeps these copies for as long as the autocast block lasts whenever the weight requires grad,
    which parameters do even under `no_grad`: this is what the FP32 quick start pays on top of its weights.
    Subclasses count (the original code's PLoRA is an `nn.Linear`); parameters that do not require grad (the
    original's CLIP tower, frozen by its constructor) are not cached, so they do not count.
    """
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            total += sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad) * size
    return total
