"""What `.eval()`, `torch.no_grad()` and `torch.inference_mode()` each change, measured piece by piece.

- `run_prefill()`: one forward pass over the caption prompt (a scoring call, as for a perplexity or a
  logit comparison) under a gradient mode, measured and budgeted like `run_caption`. With gradients enabled
  every op keeps what backward would need, for as long as the output lives.
- `run_prompt()`: only what `run_caption` does before `generate`: the vision tower, the projector and
  the splice of image tokens into the prompt. `generate()` is itself decorated with `torch.no_grad()`,
  so this is the only part of a captioning call that a forgotten `no_grad` can make record a graph.
- `grad_enabled_by_part()`: whether autograd was on when each part of the model ran during a call.
- `dropout_modules()`: the dropout layers `.eval()` switches off.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from xcomp_lab.memory import Budget, MemoryResult, run_guarded
from xcomp_lab.model.tokenizer import CAPTION_QUERY
from xcomp_lab.run.call import autocast, grad_mode
from xcomp_lab.run.captioning import prompt_batch


@dataclass(frozen=True)
class GradRun:
    """One measured call under a gradient mode; `held_bytes` is what its output kept alive at the end."""

    grad: str
    training: bool  # the model's mode (`model.training`) during the call
    tokens: int  # prompt length, positions per image
    memory: MemoryResult
    held_bytes: int  # memory in use at the end of the block, the output still alive, minus memory at start
    output_requires_grad: bool | None  # None when the call ran out of memory
    oom_report: str | None
    after_release_bytes: int

    @property
    def ok(self) -> bool:
        return self.oom_report is None


def _measured(call: Callable[[], torch.Tensor], model: Any, *, device: str, grad: str, use_autocast: bool,
              budget: Budget | None, label: str) -> GradRun:
    seen: dict[str, Any] = {}

    def step() -> torch.Tensor:
        with grad_mode(grad), autocast(device, use_autocast):
            out = call()  # (N, T, ...)
        seen.update(requires_grad=out.requires_grad, tokens=out.shape[1])
        return out

    result = run_guarded(step, device, model=model, budget=budget, label=label)
    memory = result.memory
    return GradRun(
        grad=grad,
        training=model.training,
        tokens=seen.get("tokens", 0),
        memory=memory,
        held_bytes=max(memory.end_bytes - memory.start_bytes, 0),
        output_requires_grad=seen.get("requires_grad"),
        oom_report=None if result.ok else result.report(),
        after_release_bytes=result.after_release_bytes,
    )


def run_prefill(model: Any, tokenizer: Any, images: Sequence[Any], *, device: str, grad: str = "no_grad",
                use_autocast: bool = False, budget: Budget | None = None, image_size: int | None = None,
                query: str = CAPTION_QUERY, label: str = "") -> GradRun:
    """One forward pass over the caption prompts of `images` under `grad`, measured (and budgeted).

    The prompt embeddings are made beforehand under `no_grad`, so the measurement holds the decoder's pass
    only: with gradients enabled, what it keeps for backward is the activations of the decoder and head.
    """
    with torch.no_grad():
        embeds, im_mask = prompt_batch(model, tokenizer, list(images), query, image_size)  # (N, T, C), (N, T)

    def call() -> torch.Tensor:
        return model(inputs_embeds=embeds, im_mask=im_mask, use_cache=False).logits  # (N, T, vocab)

    return _measured(call, model, device=device, grad=grad, use_autocast=use_autocast, budget=budget, label=label)


def run_prompt(model: Any, tokenizer: Any, images: Sequence[Any], *, device: str, grad: str = "no_grad",
               use_autocast: bool = False, budget: Budget | None = None, image_size: int | None = None,
               query: str = CAPTION_QUERY, label: str = "") -> GradRun:
    """Vision tower, projector and prompt splice (what a captioning call runs before `generate`), measured."""
    images = list(images)

    def call() -> torch.Tensor:
        embeds, _ = prompt_batch(model, tokenizer, images, query, image_size)  # (N, T, C)
        return embeds

    return _measured(call, model, device=device, grad=grad, use_autocast=use_autocast, budget=budget, label=label)


PARTS = {"vision tower": "vit", "projector": "vision_proj", "decoder": "model", "output head": "output"}


@contextlib.contextmanager
def grad_enabled_by_part(model: Any) -> Iterator[dict[str, set[bool]]]:
    """Within the block, record `torch.is_grad_enabled()` each time a part of the model runs.

    Yields {part: set of values seen}; a part that never ran has an empty set.
    """
    seen: dict[str, set[bool]] = {part: set() for part in PARTS}
    handles = []
    for part, attribute in PARTS.items():
        module = getattr(model, attribute)
        handles.append(module.register_forward_pre_hook(
            lambda *_, part=part: seen[part].add(torch.is_grad_enabled())))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def dropout_modules(model: torch.nn.Module) -> dict[float, int]:
    """How many dropout layers the model has at each probability p (p = 0 ones included)."""
    counts: dict[float, int] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            counts[module.p] = counts.get(module.p, 0) + 1
    return dict(sorted(counts.items()))
