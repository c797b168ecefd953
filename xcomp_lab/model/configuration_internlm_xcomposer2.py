"""Configuration of the InternLM-XComposer2-VL replica.

The defaults are the released 7B-VL model's values (its public config.json and remote code): an
InternLM2-7B decoder with PLoRA on every projection, a CLIP ViT-L/14 vision tower run at 490 px and a
two-layer projector. This file travels inside every checkpoint the course builds, so it imports only
transformers.
"""

from __future__ import annotations

from typing import Any

from transformers import CLIPVisionConfig, PretrainedConfig

# CLIP ViT-L/14-336 with its position embedding grown to 35 x 35 patches for 490 px input.
VIT_L14_490 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    projection_dim=768,
    image_size=490,
    patch_size=14,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)


class InternLMXcomposer2Config(PretrainedConfig):
    """Decoder, PLoRA and vision settings of InternLM-XComposer2-VL.

    Derived sizes (head_dim, image tokens) are properties, not stored fields, so they never disagree
    with the fields they come from.
    """

    model_type = "internlmxcomposer2"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 92544,
        hidden_size: int = 4096,
        intermediate_size: int = 14336,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int = 8,
        hidden_act: str = "silu",
        max_position_embeddings: int = 32768,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-5,
        use_cache: bool = True,
        pad_token_id: int = 0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        tie_word_embeddings: bool = False,
        bias: bool = False,
        rope_theta: float = 1_000_000.0,
        rope_scaling_factor: float = 1.0,
        plora_rank: int = 256,
        plora_alpha: float = 256.0,
        plora_dropout: float = 0.05,
        vision_config: dict[str, Any] | CLIPVisionConfig | None = None,
        vision_select_layer: int = -1,
        projector_hidden_act: str = "gelu",
        original_memory: bool = True,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.hidden_act = hidden_act
        # Every layer builds rotary cos/sin tables for all these positions (as the original does): 1 GiB in FP32.
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.bias = bias
        self.rope_theta = rope_theta
        # The original uses dynamic NTK scaling with factor 1.0: tables grow only past max_position_embeddings.
        self.rope_scaling_factor = rope_scaling_factor
        # PLoRA: a low-rank branch added at image-token positions only; rank 256, alpha 256 in the release.
        self.plora_rank = plora_rank
        self.plora_alpha = plora_alpha
        self.plora_dropout = plora_dropout
        if isinstance(vision_config, CLIPVisionConfig):
            vision_config = vision_config.to_dict()
        self.vision_config = CLIPVisionConfig(**{**VIT_L14_490, **(vision_config or {})})
        self.vision_select_layer = vision_select_layer
        self.projector_hidden_act = projector_hidden_act
        # Hold in memory what the original code under transformers 4.33.2 holds: the prefill's cache keeps each
        # layer's packed wqkv output (modeling: TupleCacheLayer), and the course's greedy loop keeps the previous
        # step's outputs and cache during each forward (xcomp_lab.run.generate). False: transformers 5's memory.
        if not isinstance(original_memory, bool):
            raise TypeError(f"original_memory={original_memory!r}; pass True (hold what the original code holds, "
                             "the default) or False (free it as transformers 5 does).")
        self.original_memory = original_memory
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size={hidden_size} is not divisible by num_attention_heads={num_attention_heads}; "
                "choose a head count that divides the hidden size."
            )
        if num_attention_heads % num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={num_attention_heads} is not a multiple of "
                f"num_key_value_heads={num_key_value_heads}; grouped-query attention needs whole groups."
            )
        # The original runs eager attention; sdpa is a choice the course measures, not a silent default.
        kwargs.setdefault("attn_implementation", "eager")
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def image_size(self) -> int:
        return self.vision_config.image_size

    @property
    def image_tokens(self) -> int:
        """Tokens one image adds to the prompt: one per patch, the CLS token dropped."""
        return (self.vision_config.image_size // self.vision_config.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        if isinstance(output.get("vision_config"), CLIPVisionConfig):
            output["vision_config"] = output["vision_config"].to_dict()
        return output
