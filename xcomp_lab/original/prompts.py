"""The caption prompt and captions of the original's own code, as its `chat()` makes them, for the course's helpers.

`xcomp_lab.run.captioning` and `xcomp_lab.run.speed` hand an original-code model
(`xcomp_lab.original.detect.is_original_model`) to these:

- `prompt_batch()`: each image preprocessed by the model's `vis_processor` (490 px, as `encode_img` does for a
  file), embedded by `img2emb` and spliced into `chat()`'s own prompt (its default system instruction, no history)
  by `interleav_wrap_chat`; the rows stacked: `inputs_embeds` (N, T, 4096) and `im_mask` (N, T), which the
  original's `forward(inputs_embeds=..., im_mask=...)` takes.
- `chat_captions()`: one greedy `model.chat` per image, the quick start's call.
- `generate_exactly()`: `model.generate` as `chat()` calls it, for exactly a given number of new tokens.

Both pass the image in the dtype the vision tower casts it to (`model_image`): from a file, `chat()` makes it in
FP32, and the tower casts its features back to the image's dtype, so a 16-bit projector receives FP32 features and
refuses them without autocast ("mat1 and mat2 must have the same dtype"); given in the tower's dtype, the tower
computes the same values and its features arrive in the projector's dtype. For an FP32 model nothing changes.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from xcomp_lab.model.original import IM_END

IMAGE_PLACEHOLDER = "<ImageHere>"  # where chat() splices the image into the query


def chat_instruction(model: Any) -> str:
    """The system instruction `chat()` puts before every prompt by default (its `meta_instruction`)."""
    return inspect.signature(model.chat).parameters["meta_instruction"].default


def image_tensor(model: Any, image: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`image` (a PIL image or a file) as `encode_img` makes it from a file: (1, 3, 490, 490) on the model, FP32 (or
    `dtype`)."""
    if isinstance(image, str):
        from PIL import Image

        image = Image.open(image).convert("RGB")
    return model.vis_processor(image).unsqueeze(0).to(model.device, dtype or torch.float32)


def model_image(model: Any, image: Any) -> torch.Tensor:
    """`image_tensor` in the dtype the vision tower casts its input to, so that its features come back in the
    projector's dtype (see the module docstring)."""
    return image_tensor(model, image, model.vit.dtype)


def prompt_batch(model: Any, tokenizer: Any, images: Sequence[Any], query: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The caption prompt of each image as the original's `chat()` embeds it: (N, T, C) embeddings, (N, T) mask."""
    instruction = chat_instruction(model)
    rows = []
    for image in images:
        embeds = model.encode_img(model_image(model, image))  # (1, 1225, C)
        inputs, im_mask = model.interleav_wrap_chat(tokenizer, IMAGE_PLACEHOLDER + query, embeds, [], instruction)
        rows.append((inputs["inputs_embeds"], im_mask))
    return torch.cat([embeds for embeds, _ in rows]), torch.cat([mask for _, mask in rows])


def chat_captions(model: Any, tokenizer: Any, images: Sequence[Any], query: str, max_new_tokens: int) -> list[str]:
    """One greedy `model.chat(tokenizer, query, image=..., history=[])` per image, as the quick start calls it."""
    captions = []
    for image in images:
        response, _ = model.chat(tokenizer, IMAGE_PLACEHOLDER + query, image=model_image(model, image), history=[],
                                 do_sample=False, max_new_tokens=max_new_tokens, repetition_penalty=1.0)
        captions.append(response)
    return captions


def generate_exactly(model: Any, tokenizer: Any, inputs_embeds: torch.Tensor, im_mask: torch.Tensor,
                     new_tokens: int) -> torch.Tensor:
    """`model.generate` as `chat()` calls it (greedy, its end-of-text and end-of-turn ids, `im_mask`), held to exactly
    `new_tokens` new tokens per prompt (`min_new_tokens`: the end ids are masked until then); returns the new ids,
    (N, new_tokens) (transformers 4.33.2 puts a start id before them, given only `inputs_embeds`)."""
    end_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids([IM_END])[0]]
    output = model.generate(inputs_embeds=inputs_embeds, im_mask=im_mask, max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, eos_token_id=end_ids, repetition_penalty=1.0)
    return output[:, -new_tokens:]

