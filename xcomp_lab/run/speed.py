"""How fast a model captions, timed outside any memory measurement (whose CPU accounting slows every op).

`generation_speed()` builds the caption prompt once, then times the prefill (one forward pass over the
prompts) and `generate` making exactly `new_tokens` tokens per image (end-of-turn ignored, so every precision
does the same work), best of a few repeats after a warm-up call. On a CPU it runs on one thread by default:
with two or more threads, other processes on a shared machine stall PyTorch's thread pool and the timings
swing by a factor of ten; one thread is slower but steady, and the same for every dtype compared. Timings are
still noisy: notebooks print them in cells nbval does not compare.

A model of the original's own code (`xcomp_lab.original.detect.is_original_model`, transformers 4.33.2) is timed on
its own prompt and its own `generate` (`xcomp_lab.original.prompts`: `chat()`'s prompt, `generate_exactly` for
exactly `new_tokens` tokens). On a CPU its 16-bit products are computed in FP32 (`xcomp_lab.original.matmul`: ATen's
16-bit kernels take minutes per call at its real widths), so such a speed is not the CPU's 16-bit speed: `Speed`
says so (`emulated_products`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from time import perf_counter
from typing import Any, Iterator, Sequence

import torch

from xcomp_lab.core.checks import check_int
from xcomp_lab.core.prompts import CAPTION_QUERY
from xcomp_lab.memory.budget import resolve_device
from xcomp_lab.original import prompts as original_prompts
from xcomp_lab.original.detect import is_original_model
from xcomp_lab.original.matmul import emulated, products_for
from xcomp_lab.run.call import autocast, grad_mode
from xcomp_lab.run.captioning import prompt_batch


@dataclass(frozen=True)
class Speed:
    """Best-of-`repeats` times of the prefill (one forward pass over the prompts) and of one `generate` call.

    The prefill is compute-bound (big matrix products over every prompt token); generation makes one token at a
    time per prompt, where at tiny scale per-call overhead weighs as much as arithmetic.
    """

    seconds: float  # one generate call making `new_tokens` tokens for each of `batch` prompts
    new_tokens: int
    batch: int
    repeats: int
    prompt_tokens: int = 0  # tokens of one prompt
    prefill_seconds: float | None = None  # one forward pass over the `batch` prompts, without cache
    cpu_threads: int | None = None  # CPU threads PyTorch used; None on CUDA
    emulated_products: bool = False  # 16-bit products computed in FP32 (the original's code on a CPU): not its speed

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second of generation, over the whole batch."""
        return self.new_tokens * self.batch / self.seconds

    @property
    def prefill_tokens_per_s(self) -> float | None:
        """Prompt tokens per second of the prefill, over the whole batch."""
        if self.prefill_seconds is None:
            return None
        return self.prompt_tokens * self.batch / self.prefill_seconds

    def __str__(self) -> str:
        prefill = ("" if self.prefill_seconds is None else
                   f"prefill {self.prefill_tokens_per_s:.0f} prompt tokens/s ({self.batch} x {self.prompt_tokens} "
                   f"in {self.prefill_seconds:.3f} s) | ")
        threads = "" if self.cpu_threads is None else f", {self.cpu_threads} CPU thread{'s' * (self.cpu_threads > 1)}"
        emulated_note = (" | 16-bit products computed in FP32 (xcomp_lab.original.matmul): not this CPU's 16-bit "
                         "speed" if self.emulated_products else "")
        return (f"{prefill}generation {self.tokens_per_s:.1f} tokens/s ({self.batch} x {self.new_tokens} new tokens "
                f"in {self.seconds:.3f} s), best of {self.repeats}{threads}{emulated_note}")


def generation_speed(model: Any, tokenizer: Any, images: Sequence[Any], *, device: str, new_tokens: int = 16,
                     repeats: int = 3, image_size: int | None = None, use_autocast: bool = False,
                     query: str = CAPTION_QUERY, cpu_threads: int | None = 1) -> Speed:
    """Time the prefill and greedy generation of exactly `new_tokens` tokens per image, under `inference_mode`.

    On a CPU, `cpu_threads` threads are used for the timing (None: leave PyTorch's setting), then restored.
    """
    for name, value in (("new_tokens", new_tokens), ("repeats", repeats), ("cpu_threads", cpu_threads or 1)):
        check_int(name, value)
    if not images:
        raise ValueError("images is empty; pass at least one image to caption.")
    device = resolve_device(device)
    with _threads(cpu_threads if device == "cpu" else None) as threads:
        speed = _timed_generation(model, tokenizer, images, device, new_tokens, repeats, image_size, use_autocast,
                                  query)
    return replace(speed, cpu_threads=threads if device == "cpu" else None, emulated_products=emulated(model))


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[int]:
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _timed_generation(model: Any, tokenizer: Any, images: Sequence[Any], device: str, new_tokens: int, repeats: int,
                      image_size: int | None, use_autocast: bool, query: str) -> Speed:
    def timed(fn: Any) -> float:
        if device != "cpu":
            torch.cuda.synchronize(device)
        start = perf_counter()
        fn()
        if device != "cpu":
            torch.cuda.synchronize(device)
        return perf_counter() - start

    original = is_original_model(model)
    with grad_mode("inference_mode"), autocast(device, use_autocast), products_for(model):
        embeds, im_mask = prompt_batch(model, tokenizer, list(images), query, image_size)  # (N, T, C), (N, T)

        def prefill() -> None:
            model(inputs_embeds=embeds, im_mask=im_mask, use_cache=False)

        def generate() -> None:
            if original:
                original_prompts.generate_exactly(model, tokenizer, embeds, im_mask, new_tokens)
                return
            from xcomp_lab.run.generate import greedy_generate

            greedy_generate(model, tokenizer, embeds, im_mask, max_new_tokens=new_tokens, stop_at_end_of_turn=False)

        generate()  # warm-up: first-call allocations and kernel selection
        prefill_best = min(timed(prefill) for _ in range(repeats))
        best = min(timed(generate) for _ in range(repeats))
    return Speed(best, new_tokens, len(images), repeats, prompt_tokens=embeds.shape[1], prefill_seconds=prefill_best)
