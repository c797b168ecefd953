"""The one greedy `generate` call of the course, and the one rule for where a chat turn ends.

Every caption the course makes, measured or timed or scored, goes through `greedy_generate`: greedy
(`do_sample=False`, one beam, no repetition penalty) from the chat prompt's embeddings, stopping at the
end-of-turn token `[UNUSED_TOKEN_145]` or end of sequence, as `chat(do_sample=False)` does. `turn_texts` cuts
each generated row at its first stop token and decodes it. (The model's own `chat()` in its remote code file
makes the same call; that file must stand alone, so it cannot use this one.)

With the replica's `config.original_memory` (its default) the decoding loop is `legacy_greedy_search`, passed as
`generate(custom_generate=...)`: transformers 4.33.2's `greedy_search`, which the original code ran under, holds
during each forward the previous step's outputs (in the first decode step the prefill's logits for every prompt
position) and the previous step's cache, so the original's peak in the first decode step is reproduced. transformers
5's own loop frees both before the next forward (`original_memory=False`).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.generation import (
    GenerateDecoderOnlyOutput,
    GenerationConfig,
    LogitsProcessorList,
    StoppingCriteriaList,
)

from xcomp_lab.core.checks import check_int
from xcomp_lab.model.modeling_internlm_xcomposer2 import IM_END


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The ids that end a turn: end of sequence and `[UNUSED_TOKEN_145]`."""
    return [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)]


def legacy_greedy_search(model: Any, input_ids: torch.LongTensor, logits_processor: LogitsProcessorList,
                         stopping_criteria: StoppingCriteriaList, generation_config: GenerationConfig,
                         **model_kwargs: Any) -> torch.LongTensor | GenerateDecoderOnlyOutput:
    """transformers 4.33.2's greedy loop, for `generate(custom_generate=legacy_greedy_search)`: what it held, held.

    Its `outputs` of one step were replaced only when the next forward returned, so the first decode step ran with
    the prefill's logits (every prompt position, the full vocabulary) still alive; and the cache it passed in, a
    tuple of each layer's tensors, stayed referenced by the step's inputs while the forward concatenated each
    layer's new keys and values. Here `previous_cache` is that tuple: the cache's tensors as the step starts.
    """
    pad_token_id = generation_config.pad_token_id
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    while True:
        model_inputs = model.prepare_inputs_for_generation(input_ids, **model_kwargs)
        previous_cache = [(layer.keys, layer.values) for layer in model_kwargs["cache"].layers]
        outputs = model(**model_inputs, return_dict=True)  # the previous step's outputs are released only here
        model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs)
        next_token_logits = outputs.logits[:, -1, :]  # a view, as 4.33.2 took it: all the logits stay alive
        scores = logits_processor(input_ids, next_token_logits)
        next_tokens = torch.argmax(scores, dim=-1)
        if pad_token_id is not None:
            next_tokens = next_tokens * unfinished + pad_token_id * (1 - unfinished)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        unfinished = unfinished & ~stopping_criteria(input_ids, scores)
        if unfinished.max() == 0:
            break
    del previous_cache
    if generation_config.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(sequences=input_ids, cache=model_kwargs["cache"])
    return input_ids


def greedy_generate(model: Any, tokenizer: Any, inputs_embeds: torch.Tensor, im_mask: torch.Tensor, *,
                    max_new_tokens: int, stop_at_end_of_turn: bool = True, return_cache: bool = False) -> Any:
    """Greedy decoding from the prompt embeddings: the new tokens (N, new), or generate's output with its cache.

    `stop_at_end_of_turn=False` generates exactly `max_new_tokens` (for timing a fixed amount of work). The
    replica's own cache (`make_cache`) and, with `config.original_memory`, `legacy_greedy_search` hold in memory
    what the original code held.
    """
    check_int("max_new_tokens", max_new_tokens)
    options: dict[str, Any] = {} if stop_at_end_of_turn else {"min_new_tokens": max_new_tokens}
    if getattr(model.config, "original_memory", False):
        options["custom_generate"] = legacy_greedy_search
    if hasattr(model, "make_cache"):
        options["cache"] = model.make_cache()
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
        **options,
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
