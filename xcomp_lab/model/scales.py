"""The two sizes of the replica: `full` is the released 7B-VL model, `tiny` keeps every part but fits a laptop.

`tiny` keeps the full model's proportions where they drive the memory story: grouped-query attention with
4 query heads per KV head, an MLP 3.5x the hidden size, PLoRA rank 1/16 of the hidden size, per-layer
rotary tables, image tokens dominating the prompt. It is small enough to caption in well under a second
and to be trained on CPU in minutes.
"""

from __future__ import annotations

from typing import Any

from xcomp_lab.model.configuration_internlm_xcomposer2 import InternLMXcomposer2Config

SCALES: dict[str, dict[str, Any]] = {
    "full": {},
    "tiny": dict(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=896,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=512,
        plora_rank=16,
        plora_alpha=16.0,
        vision_config=dict(
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            projection_dim=64,
            image_size=112,
            patch_size=14,
        ),
    ),
}


def check_scale(scale: str) -> str:
    """Return `scale` if it is known, else raise a ValueError that lists the known ones."""
    if scale not in SCALES:
        raise ValueError(f"Unknown scale {scale!r}; choose one of {sorted(SCALES)} ('tiny' runs on a CPU in seconds).")
    return scale


def config_for_scale(scale: str, **overrides: Any) -> InternLMXcomposer2Config:
    """The configuration of the replica at `scale`, with any field overridden."""
    settings = {**SCALES[check_scale(scale)], **overrides}
    return InternLMXcomposer2Config(**settings)
