"""Prompts of several images, and several prompts at once, through the original's own code (notebook 04).

The original's `chat()` answers one prompt, but that prompt may hold several images: given a (k, 3, 490, 490)
image tensor and a query with k placeholders, `interleav_wrap_chat` splices the k images' tokens in at the
placeholders (up to `max_length` tokens, where it cuts the prompt). Its model's `forward` and `generate` take
batched `inputs_embeds` with their `im_mask`, so several prompts can run at once through the `generate` call
`chat()` makes (`original.prompts.generate_exactly`).

- `prompt_images()`: images cut into prompts of k images each.
- `prompt_batch()`: each prompt's images embedded together and spliced in as `chat()` does, the rows stacked.
- `answer_prompts()`: one prompt through `model.chat` itself, several through that `generate` call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from xcomp_lab.core.checks import check_int
from xcomp_lab.original.prompts import IMAGE_PLACEHOLDER, chat_instruction, generate_exactly, model_image


def prompt_images(images: Sequence[Any], images_per_prompt: int) -> list[list[Any]]:
    """`images` cut into prompts of `images_per_prompt` images each, in order."""
    k = check_int("images_per_prompt", images_per_prompt)
    if not images or len(images) % k:
        raise ValueError(f"{len(images)} images cannot fill prompts of images_per_prompt={k} images each: pass a "
                         f"multiple of {k} images (prompts x images per prompt).")
    return [list(images[i:i + k]) for i in range(0, len(images), k)]


def image_batch(model: Any, images: Sequence[Any]) -> torch.Tensor:
    """The images of one prompt preprocessed as `chat()` takes several: (k, 3, 490, 490) on the model."""
    return torch.cat([model_image(model, image) for image in images])


def prompt_batch(model: Any, tokenizer: Any, images: Sequence[Any], query: str,
                 images_per_prompt: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt's images embedded together (`encode_img`) and spliced at one placeholder each before `query`
    (`interleav_wrap_chat`, `chat()`'s own prompt), the rows stacked: (N, T, C) embeddings, (N, T) mask."""
    instruction = chat_instruction(model)
    rows = []
    for group in prompt_images(images, images_per_prompt):
        embeds = model.encode_img(image_batch(model, group))  # (k, 1225, C)
        inputs, im_mask = model.interleav_wrap_chat(tokenizer, IMAGE_PLACEHOLDER * len(group) + query, embeds, [],
                                                    instruction)
        rows.append((inputs["inputs_embeds"], im_mask))
    return torch.cat([embeds for embeds, _ in rows]), torch.cat([mask for _, mask in rows])


def answer_prompts(model: Any, tokenizer: Any, images: Sequence[Any], query: str, max_new_tokens: int,
                   images_per_prompt: int = 1) -> list[str]:
    """Greedy answers to the prompts of `images_per_prompt` images each: one prompt is one `model.chat` (its
    images in one tensor, one placeholder each); several (which `chat()` does not take) run stacked through the
    `generate` call `chat()` makes, for exactly `max_new_tokens` new tokens each."""
    groups = prompt_images(images, images_per_prompt)
    check_int("max_new_tokens", max_new_tokens)
    if len(groups) == 1:
        response, _ = model.chat(tokenizer, IMAGE_PLACEHOLDER * len(groups[0]) + query,
                                 image=image_batch(model, groups[0]), history=[], do_sample=False,
                                 max_new_tokens=max_new_tokens)
        return [response]
    with torch.no_grad():  # as chat() is decorated
        embeds, im_mask = prompt_batch(model, tokenizer, images, query, images_per_prompt)
        new = generate_exactly(model, tokenizer, embeds, im_mask, max_new_tokens)
    return [tokenizer.decode(row.cpu().tolist(), skip_special_tokens=True).split("[UNUSED_TOKEN_145]")[0]
            for row in new]
