"""What `.eval()`, `torch.no_grad()` and `torch.inference_mode()` each change, measured piece by piece.

- `run_prefill()`: one forward pass over the caption prompt (a scoring call, as for a perplexity or a
  logit comparison) under a gradient mode, measured and budgeted like `run_caption`. With gradients enabled
  every op keeps what backward would need, for as long as the output lives. With `use_autocast=True` it runs
  inside the quick start's autocast, and `cache_enabled=False` turns off autocast's cache of the weight copies
  it casts (`torch.autocast(..., cache_enabled=False)`): where `no_grad` and `inference_mode` differ in
  memory (on torch before 2.10, `inference_mode` does not avoid it either: PyTorch PR #165068).
- `run_prompt()`: only what `run_caption` does before `generate`: the vision tower, the projector and
  the splice of image tokens into the prompt. `generate()` is itself decorated with `torch.no_grad()`,
  so this is the only part of a captioning call that a forgotten `no_grad` can make record a graph.
- `grad_enabled_by_part()`: whether autograd was on when each part of the model ran during a call.
- `dropout_modules()`: the dropout layers `.eval()` switches off.
- `copies_kept()`: whether an autocast run kept the weight copies, judged from its peak.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from xcomp_lab.memory import Budget, MemoryResult, run_guarded
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


def autocast_context(device: str, use_autocast: bool, cache_enabled: bool = True) -> contextlib.AbstractContextManager:
    """The quick start's autocast (`xcomp_lab.run.call.autocast`), or the same without its weight-copy cache."""
    if not use_autocast or cache_enabled:
        return autocast(device, use_autocast)
    return torch.autocast(torch.device(device).type, dtype=torch.float16, cache_enabled=False)


def _measured(call: Callable[[], torch.Tensor], model: Any, *, device: str, grad: str, use_autocast: bool,
              budget: Budget | None, label: str, cache_enabled: bool = True) -> GradRun:
    seen: dict[str, Any] = {}

    def step() -> torch.Tensor:
        with grad_mode(grad), autocast_context(device, use_autocast, cache_enabled):
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
                use_autocast: bool = False, cache_enabled: bool = True, budget: Budget | None = None,
                image_size: int | None = None, query: str | None = None, label: str = "") -> GradRun:
    """One forward pass over the caption prompts of `images` under `grad`, measured (and budgeted).

    The prompt embeddings are made beforehand under `no_grad`, so the measurement holds the decoder's pass
    only: with gradients enabled, what it keeps for backward is the activations of the decoder and head.
    `use_autocast` runs it in the quick start's autocast, `cache_enabled=False` without autocast's weight cache.
    """
    with torch.no_grad():
        embeds, im_mask = prompt_batch(model, tokenizer, list(images), query, image_size)  # (N, T, C), (N, T)

    def call() -> torch.Tensor:
        return model(inputs_embeds=embeds, im_mask=im_mask, use_cache=False).logits  # (N, T, vocab)

    return _measured(call, model, device=device, grad=grad, use_autocast=use_autocast, budget=budget, label=label,
                     cache_enabled=cache_enabled)


def run_prompt(model: Any, tokenizer: Any, images: Sequence[Any], *, device: str, grad: str = "no_grad",
               use_autocast: bool = False, budget: Budget | None = None, image_size: int | None = None,
               query: str | None = None, label: str = "") -> GradRun:
    """Vision tower, projector and prompt splice (what a captioning call runs before `generate`), measured."""
    images = list(images)

    def call() -> torch.Tensor:
        embeds, _ = prompt_batch(model, tokenizer, images, query, image_size)  # (N, T, C)
        return embeds

    return _measured(call, model, device=device, grad=grad, use_autocast=use_autocast, budget=budget, label=label)


def copies_kept(run: GradRun, without_autocast: GradRun, copies_bytes: int) -> bool:
    """Whether `run` (under autocast) kept autocast's weight copies: it ran out of memory where the same pass without
    autocast fit, or it peaked at least half of `copies_bytes` (`xcomp_lab.run.call.autocast_copy_bytes`) higher."""
    if not without_autocast.ok:
        raise ValueError(f"the pass without autocast ({without_autocast.memory.label!r}) ran out of memory: compare "
                         f"with a run that fits, e.g. under a larger budget or none.")
    if not run.ok:
        return True
    return run.memory.peak_bytes - without_autocast.memory.peak_bytes >= copies_bytes / 2


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
