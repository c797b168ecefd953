"""Caption many images at once through the same prompt path as `chat()`, and score the captions.

Every caption prompt has the same length (one image, the same query), so a batch needs no padding:
each image is embedded and spliced in by the model's own `encode_img` / `interleav_wrap_chat`, the rows
are stacked, and `run.generate.greedy_generate` decodes greedily until the end of the turn, as `chat()` does. Inputs follow the model's embedding device and
dtype, so the same calls serve FP32, FP16, BF16 and bitsandbytes INT8/NF4 models.

A model of the original's own code (`xcomp_lab.original.detect.is_original_model`, in its environment with
transformers 4.33.2) is handed to `xcomp_lab.original.prompts`: its own `chat()` prompt, and one `model.chat` per
caption. The replica's modules are imported only where the replica runs, so this module imports there too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from xcomp_lab.core.checks import IMAGE_SIZE, check_int
from xcomp_lab.core.prompts import CAPTION_QUERY
from xcomp_lab.data import scenes
from xcomp_lab.data.quality import QualityReport, quality_report
from xcomp_lab.original import prompts as original_prompts
from xcomp_lab.original.detect import is_original_model

if TYPE_CHECKING:
    from xcomp_lab.model.modeling_internlm_xcomposer2 import ImageInput


def vision_size(model: PreTrainedModel) -> int:
    """The side in pixels the model's vision tower sees by default: the replica's `config.image_size` (112 px at
    tiny scale, 490 at full), the original's `config.img_size` (490 at every scale)."""
    return int(model.config.img_size if is_original_model(model) else model.config.image_size)


def caption_query(query: str | None) -> str:
    """`query`, or the course's caption query (`xcomp_lab.core.prompts.CAPTION_QUERY`) when None."""
    return CAPTION_QUERY if query is None else query


def _images(images: Sequence[ImageInput]) -> list[ImageInput]:
    if isinstance(images, (str, torch.Tensor)) or not isinstance(images, Sequence):
        raise TypeError(
            f"images must be a list of images (paths, PIL images or tensors), got {type(images).__name__}; "
            "wrap one image in a list."
        )
    if len(images) == 0:
        raise ValueError("images is empty; pass at least one image.")
    return list(images)


def prompt_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    images: Sequence[ImageInput],
    query: str | None = None,
    image_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The caption prompt for each image, as `chat()` embeds it: inputs_embeds (N, T, C) and im_mask (N, T).

    `query`: None is the course's caption query. The original's code sees its own 490 px (`image_size` unused).
    """
    query = caption_query(query)
    if is_original_model(model):
        return original_prompts.prompt_batch(model, tokenizer, list(images), query)
    from xcomp_lab.model.modeling_internlm_xcomposer2 import IMAGE_PLACEHOLDER

    image_embeds = model.encode_img(list(images), image_size)  # (N, P, C)
    query = IMAGE_PLACEHOLDER + query
    rows = [model.interleav_wrap_chat(tokenizer, query, image_embeds[i : i + 1]) for i in range(len(images))]
    return torch.cat([embeds for embeds, _ in rows]), torch.cat([mask for _, mask in rows])


@torch.inference_mode()
def caption_images(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    images: Sequence[ImageInput],
    *,
    query: str | None = None,
    max_new_tokens: int = 16,
    batch_size: int = 8,
    image_size: int | None = None,
) -> list[str]:
    """Greedy captions of `images`, `batch_size` at a time; each is what `chat(do_sample=False)` would answer.

    `image_size` is the side the model sees (default: its vision tower's own size), as in `chat()`.
    """
    images = _images(images)
    check_int("max_new_tokens", max_new_tokens)
    check_int("batch_size", batch_size)
    query = caption_query(query)
    if is_original_model(model):
        return original_prompts.chat_captions(model, tokenizer, images, query, max_new_tokens)
    from xcomp_lab.run.generate import greedy_generate, turn_texts

    captions: list[str] = []
    for start in range(0, len(images), batch_size):
        inputs_embeds, im_mask = prompt_batch(model, tokenizer, images[start : start + batch_size], query, image_size)
        generated = greedy_generate(model, tokenizer, inputs_embeds, im_mask, max_new_tokens=max_new_tokens)
        captions += turn_texts(tokenizer, generated)
    return captions


@torch.inference_mode()
def reference_logits(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    images: Sequence[ImageInput],
    *,
    query: str | None = None,
    batch_size: int = 8,
    image_size: int | None = None,
) -> torch.Tensor:
    """Prefill logits of the caption prompt, (N, T, vocab) in FP32 on the CPU, for `quality.logit_stats`."""
    images = _images(images)
    check_int("batch_size", batch_size)
    chunks = []
    for start in range(0, len(images), batch_size):
        inputs_embeds, im_mask = prompt_batch(model, tokenizer, images[start : start + batch_size], query, image_size)
        logits = model(inputs_embeds=inputs_embeds, im_mask=im_mask, use_cache=False).logits  # (n, T, vocab)
        chunks.append(logits.float().cpu())
    return torch.cat(chunks)


def evaluate_captioner(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    n: int = 200,
    image_size: int | None = None,
    *,
    batch_size: int = 8,
) -> QualityReport:
    """Exact match and word accuracy of greedy captions on the first `n` held-out scenes.

    The scenes are drawn at `image_size` and the model sees them at that size; the default is the
    vision tower's own size (112 px at tiny scale, 490 at full).
    """
    check_int("n", n)
    size = vision_size(model) if image_size is None else IMAGE_SIZE.check("image_size", image_size)
    data = scenes.held_out_dataset(n, image_size=size)
    images = [image for image, _ in data]
    predictions = caption_images(model, tokenizer, images, batch_size=batch_size, image_size=size)
    return quality_report(predictions, [text for _, text in data])
