"""The inverse questions: the largest batch, prompt, image or generation that fits a card, and the cheapest recipe.

Memory grows with each of batch, prompt tokens, image size and new tokens, so the largest value that fits is
found by bisection over `estimate` calls: the value doubles from the one given until a call no longer fits, then
the interval is halved, each step one estimate. A call fits when its reserved peak (what the caching allocator
holds, which is what runs out) is within the card's usable memory (`memory.cards.Card.usable_bytes`).

The cheapest recipe is the first that fits in an order of what each costs in quality and speed: the published
dtype before quantization, INT8 before NF4, sdpa before eager (eager only where sdpa is missing).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from xcomp_lab.core.checks import BATCH_SIZE, IMAGE_SIZE, NEW_TOKENS, check_choice
from xcomp_lab.memory.cards import Card, card_named
from xcomp_lab.plan.estimate import (
    Plan,
    check_call,
    estimate,
    resolve_model,
    supports_sdpa,
)

# The most each knob is searched up to: the course's limits (core.checks), and the model's context for prompts.
LIMITS = {"batch": BATCH_SIZE.maximum, "new_tokens": NEW_TOKENS.maximum, "image_size": IMAGE_SIZE.maximum}
KNOBS = ("batch", "prompt_tokens", "image_size", "new_tokens")
RECIPES = (("none", "sdpa"), ("int8", "sdpa"), ("nf4", "sdpa"), ("none", "eager"), ("int8", "eager"),
           ("nf4", "eager"))


@dataclass(frozen=True)
class Largest:
    """The largest value of one knob that fits, the plan at that value, and how many estimates it took."""

    knob: str
    value: int | None  # None when even the smallest value does not fit
    limit: int  # the largest value searched
    plan: Plan | None
    estimates: int

    def __str__(self) -> str:
        if self.value is None:
            return f"largest {self.knob}: none fits"
        capped = " (the search's limit)" if self.value == self.limit else ""
        return f"largest {self.knob}: {self.value}{capped}"


def bisect_largest(fits_at: Callable[[int], Plan | None], start: int, low: int, limit: int,
                   step: int = 1) -> tuple[int | None, Plan | None, int]:
    """The largest multiple of `step` in [low, limit] at which `fits_at` gives a plan (None where it does not fit),
    searched from `start`: doubling while it fits, then halving the interval. (value or None, its plan, calls)."""
    calls = 0
    best: tuple[int | None, Plan | None] = (None, None)
    probe = min(max(start // step * step, low), limit // step * step)
    while True:  # double while it fits
        calls += 1
        plan = fits_at(probe)
        if plan is None:
            hi = probe
            break
        best = (probe, plan)
        if probe >= limit // step * step:
            return probe, plan, calls
        probe = min(probe * 2, limit // step * step)
    lo = best[0] if best[0] is not None else low - step
    while hi - lo > step:  # lo fits (or lies below the range), hi does not
        mid = max((lo + hi) // 2 // step * step, lo + step)
        calls += 1
        plan = fits_at(mid)
        if plan is None:
            hi = mid
        else:
            lo, best = mid, (mid, plan)
    return best[0], best[1], calls


def largest(model: Any, knob: str, *, card: str | Card, show_progress: bool = True, **settings: Any) -> Largest:
    """The largest `knob` ("batch", "prompt_tokens", "image_size", "new_tokens") for which `estimate(model,
    **settings)` fits `card`, the other settings held. For a VLM, `prompt_tokens` includes the image's tokens;
    when the image grows, its text stays and its prompt grows by the tokens the processor adds."""
    check_choice("knob", knob, list(KNOBS), "the setting to make as large as the card allows")
    source = resolve_model(model)
    card = card if isinstance(card, Card) else card_named(card)
    if knob == "image_size" and not source.family.is_vlm:
        raise ValueError(f"knob='image_size': {source.name} is a language model; ask about batch, prompt_tokens or "
                         "new_tokens.")
    call = check_call(source, **{**_defaults(), **settings, "device": "cuda", "card": card})
    given = getattr(call, knob)
    step = _step(source) if knob == "image_size" else 1
    limit = LIMITS.get(knob) or source.config.get_text_config().max_position_embeddings
    low = step if knob == "image_size" else 1
    if knob == "prompt_tokens" and source.family.is_vlm:
        low = call.prompt_tokens  # the image's tokens and one more
    bar = tqdm(desc=f"largest {knob}", unit="estimate", disable=not show_progress)

    text = call.prompt_tokens - image_segment(source, call.image_size) if knob == "image_size" else 0

    def fits_at(value: int) -> Plan | None:
        bar.update()
        changed = {knob: value}
        if knob == "image_size":  # the text stays, the image's tokens follow its size
            changed["prompt_tokens"] = text + image_segment(source, value)
        plan = estimate(source, **{**call.settings(), **changed}, device="cuda", card=card)
        return plan if plan.fits else None

    try:
        value, plan, count = bisect_largest(fits_at, given, low, limit, step)
    finally:
        bar.close()
    return Largest(knob, value, limit, plan, count)


def cheapest_recipe(model: Any, *, card: str | Card, show_progress: bool = True, **settings: Any) -> Plan | None:
    """The first recipe (quantization, attention) in `RECIPES` order whose call fits `card`, or None."""
    source = resolve_model(model)
    for quantization, attn in tqdm(RECIPES, desc="cheapest recipe", unit="estimate", disable=not show_progress):
        if attn == "sdpa" and not supports_sdpa(source.config):
            continue
        outliers = settings.get("int8_outliers") if quantization == "int8" else None  # LLM.int8()'s only
        plan = estimate(source, **{**settings, "quantization": quantization, "attn": attn, "int8_outliers": outliers},
                        device="cuda", card=card)
        if plan.fits:
            return plan
    return None


def _defaults() -> dict[str, Any]:
    """`estimate`'s defaults for the settings a call has."""
    return {name: p.default for name, p in inspect.signature(estimate).parameters.items()
            if p.kind is p.KEYWORD_ONLY and name not in ("device", "card", "exact_decode")}


def image_segment(source: Any, image_size: int) -> int:
    """The prompt tokens the model's processor makes of one image of that side (image tokens and markers)."""
    from xcomp_lab.plan.build import image_inputs

    return image_inputs(source.preset, image_size, tiny=source.tiny)["input_ids"].shape[1]


def _step(source: Any) -> int:
    """Image sides are searched in multiples of the vision patch (Qwen2-VL: of its merged patch, 28 px)."""
    vision = source.config.vision_config
    return vision.patch_size * getattr(vision, "spatial_merge_size", 1)
