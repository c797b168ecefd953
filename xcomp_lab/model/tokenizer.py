"""A small byte-level BPE tokenizer with the InternLM2 special tokens, built offline.

The real InternLM2 tokenizer (92,544 pieces) cannot be downloaded here, so the course trains its own on
the chat template, the default system prompt and the caption vocabulary. It uses the same special
tokens and ids the chat code relies on (`<unk>` 0, `<s>` 1, `</s>` 2, `[UNUSED_TOKEN_145]` as the end of a
turn, `[UNUSED_TOKEN_146]` as its start) and, like the original, puts BOS in front of every encoded text.
Training is deterministic, so every build gives the same vocabulary.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from xcomp_lab.core.prompts import CAPTION_QUERY
from xcomp_lab.model.modeling_internlm_xcomposer2 import DEFAULT_META_INSTRUCTION, IM_END, IM_START

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", IM_END, IM_START]
TOKENIZER_VOCAB_SIZE = 1024

# Words the captioning scenes and the course's prompts use; each becomes one token.
_COURSE_TEXT = [
    "system", "user", "assistant", CAPTION_QUERY, "Please describe this image in detail.",
    "What is in the picture?", "a small large red green blue yellow purple orange circle square triangle",
    "left of right of above below and on the of a an the image picture shape shapes",
]


def _corpus(extra_words: list[str]) -> list[str]:
    template = f"{IM_START}system\n{DEFAULT_META_INSTRUCTION}{IM_END}\n{IM_START}user\n"
    # A leading space makes every word also appear in its mid-sentence form ("Ġleft").
    lines = [template] * 4 + [" " + line for line in _COURSE_TEXT] * 8
    lines += [" " + " ".join(extra_words)] * 8
    return lines


def build_tokenizer(extra_words: list[str] | None = None, vocab_size: int = TOKENIZER_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train the course tokenizer (deterministic) and wrap it for transformers."""
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_corpus(sorted(extra_words or [])), trainer=trainer)
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
        additional_special_tokens=[IM_END, IM_START],
    )
    tokenizer.padding_side = "left"
    return tokenizer
