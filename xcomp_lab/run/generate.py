"""The one greedy `generate` call of the course, and the one rule for where a chat turn ends.

Every caption the course makes, measured or timed or scored, goes through `greedy_generate`: greedy
(`do_sample=False`, one beam, no repetition penalty) from the chat prompt's embeddings, stopping at the
end-of-turn token `[UNUSED_TOKEN_145]` or end of sequence, as `chat(do_sample=False)` does. `turn_texts` cuts
each generated row at its first stop token and decodes it. (The model's own `chat()` in its remote code file
makes the same call; that file must stand alone, so it cannot use this one.)
"""

from __future__ import annotations

from typing import Any

import torch

from xcomp_lab.core.checks import check_int
from xcomp_lab.model.modeling_internlm_xcomposer2 import IM_END


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The ids that end a turn: end of sequence and `[UNUSED_TOKEN_145]`."""
    return [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)]


def greedy_generate(model: Any, tokenizer: Any, inputs_embeds: torch.Tensor, im_mask: torch.Tensor, *,
                    max_new_tokens: int, stop_at_end_of_turn: bool = True, return_cache: bool = False) -> Any:
    """Greedy decoding from the prompt embeddings: the new tokens (N, new), or generate's output with its cache.

    `stop_at_end_of_turn=False` generates exactly `max_new_tokens` (for timing a fixed amount of work).
    """
    check_int("max_new_tokens", max_new_tokens)
    length = {} if stop_at_end_of_turn else {"min_new_tokens": max_new_tokens}
    return model.generate(
        inputs_embeds=inputs_embeds,
        im_mask=im_mask,
        max_new_tokens=max_new_tokens,
        num_beams=1,
        do_sample=False,
        repetition_penalty=1.0,
        eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        return_dict_in_generate=return_cache,
        **length,
    )  # with inputs_embeds only, generate returns just the new tokens


def turn_texts(tokenizer: Any, new_tokens: torch.Tensor) -> list[str]:
    """Each row of generated ids cut at its first end-of-turn or end-of-sequence token, decoded and stripped."""
    stops = set(stop_token_ids(tokenizer))
    texts = []
    for row in new_tokens.tolist():
        end = next((position for position, token in enumerate(row) if token in stops), len(row))
        texts.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
    return texts


def generated_tokens(tokenizer: Any, new_tokens: torch.Tensor) -> int:
    """New tokens actually generated over the batch (padding after an early stop not counted)."""
    return int((new_tokens != tokenizer.pad_token_id).sum())
