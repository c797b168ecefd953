"""The caption prompt and captions of the original's own code, as its `chat()` makes them, for the course's helpers.

`xcomp_lab.run.captioning` hands an original-code model (`xcomp_lab.original.detect.is_original_model`) to these:

- `prompt_batch()`: each image preprocessed by the model's `vis_processor` (490 px, FP32, as `encode_img` does for
  a file), embedded by `img2emb` and spliced into `chat()`'s own prompt (its default system instruction, no
  history) by `interleav_wrap_chat`; the rows stacked: `inputs_embeds` (N, T, 4096) and `im_mask` (N, T), which the
  original's `forward(inputs_embeds=..., im_mask=...)` takes.
- `chat_captions()`: one greedy `model.chat` per image, the quick start's call.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

IMAGE_PLACEHOLDER = "<ImageHere>"  # where chat() splices the image into the query


def chat_instruction(model: Any) -> str:
    """The system instruction `chat()` puts before every prompt by default (its `meta_instruction`)."""
    return inspect.signature(model.chat).parameters["meta_instruction"].default


def image_tensor(model: Any, image: Any) -> torch.Tensor:
    """`image` (a PIL image or a file) as `encode_img` makes it from a file: (1, 3, 490, 490) FP32 on the model."""
    if isinstance(image, str):
        from PIL import Image

        image = Image.open(image).convert("RGB")
    return model.vis_processor(image).unsqueeze(0).to(model.device)


def prompt_batch(model: Any, tokenizer: Any, images: Sequence[Any], query: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The caption prompt of each image as the original's `chat()` embeds it: (N, T, C) embeddings, (N, T) mask."""
    instruction = chat_instruction(model)
    rows = []
    for image in images:
        embeds = model.encode_img(image_tensor(model, image))  # (1, 1225, C)
        inputs, im_mask = model.interleav_wrap_chat(tokenizer, IMAGE_PLACEHOLDER + query, embeds, [], instruction)
        rows.append((inputs["inputs_embeds"], im_mask))
    return torch.cat([embeds for embeds, _ in rows]), torch.cat([mask for _, mask in rows])


def chat_captions(model: Any, tokenizer: Any, images: Sequence[Any], query: str, max_new_tokens: int) -> list[str]:
    """One greedy `model.chat(tokenizer, query, image=..., history=[])` per image, as the quick start calls it."""
    captions = []
    for image in images:
        response, _ = model.chat(tokenizer, IMAGE_PLACEHOLDER + query, image=image_tensor(model, image), history=[],
                                 do_sample=False, max_new_tokens=max_new_tokens, repetition_penalty=1.0)
        captions.append(response)
    return captions
