"""A faithful replica of InternLM-XComposer2-VL, built bottom-up in the Hugging Face style.

Blocks, shapes and parameter names follow the released model's remote code: RMSNorm, per-layer rotary
tables, PLoRA projections, grouped-query attention with a packed `wqkv`, SwiGLU MLP, the InternLM2
decoder, a CLIP ViT-L/14 vision tower at 490 px and a two-layer projector. Two deliberate differences:
- The PLoRA base weight sits at `<proj>.base_layer.weight` (the original keeps it at `<proj>.weight`)
  so that bitsandbytes, which converts plain `nn.Linear` modules, quantizes it while the low-rank
  branch keeps working. `ORIGINAL_KEY_MAPPING` maps the original names for `from_pretrained(key_mapping=)`.
- PLoRA is applied by masking rather than by boolean indexing, so the forward pass has no
  data-dependent shapes and runs on meta/fake tensors for memory estimation.

Memory follows the original's by default (`config.original_memory`): transformers 4.33.2 kept the cache as a
tuple of the tensors each layer made, so the prefill's values stayed views into the packed `wqkv` output and
held all of it; `TupleCacheLayer` stores them the same way. (What 4.33.2's greedy loop held is the loop's
business: `xcomp_lab.run.generate`.)

This file travels inside every checkpoint the course builds (next to its configuration file), so
`AutoModel.from_pretrained(path, trust_remote_code=True)` loads the replica as it loads the real model.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import CLIPVisionModel, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_internlm_xcomposer2 import InternLMXcomposer2Config

IMAGE_PLACEHOLDER = "<ImageHere>"
IM_START = "[UNUSED_TOKEN_146]"
IM_END = "[UNUSED_TOKEN_145]"
SUPPORTED_ATTENTION = ("eager", "sdpa")
# CLIP's normalisation constants, as the original's image processor uses them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ACCEPTED_IMAGE_MODES = ("RGB", "RGBA", "L", "LA", "P", "1")

DEFAULT_META_INSTRUCTION = (
    "You are an AI assistant whose name is InternLM-XComposer (浦语·灵笔).\n"
    "- InternLM-XComposer (浦语·灵笔) is a multi-modality conversational language model that is developed "
    "by Shanghai AI Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM-XComposer (浦语·灵笔) can understand and communicate fluently in the language chosen by "
    "the user such as English and 中文.\n"
    "- InternLM-XComposer (浦语·灵笔) is capable of comprehending and articulating responses effectively "
    "based on the provided image."
)

_PROJECTIONS = r"(attention\.(?:wqkv|wo)|feed_forward\.w[123])"
ORIGINAL_KEY_MAPPING = {
    rf"{_PROJECTIONS}\.weight$": r"\1.base_layer.weight",
    # transformers 4.33's CLIPVisionModel nested its modules under `vision_model.`; 5.x does not.
    r"^vit\.vision_tower\.vision_model\.": "vit.vision_tower.",
}

ImageInput = Union[str, os.PathLike, Image.Image, torch.Tensor]


class InternLM2RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class InternLM2RotaryEmbedding(nn.Module):
    """Rotary tables with dynamic NTK scaling, one instance per layer as in the original.

    The cos/sin tables cover all `max_position_embeddings` positions from the start and are
    non-persistent buffers: memory the parameter count misses (1 GiB in FP32 at full scale).
    """

    def __init__(self, config: InternLMXcomposer2Config) -> None:
        super().__init__()
        self.dim = config.head_dim
        self.base = config.rope_theta
        self.max_position_embeddings = config.max_position_embeddings
        self.scaling_factor = config.rope_scaling_factor
        self.max_seq_len_cached = config.max_position_embeddings
        cos, sin = self._tables(self.max_seq_len_cached, self.base)
        dtype = torch.get_default_dtype()
        self.register_buffer("cos_cached", cos.to(dtype), persistent=False)  # (max_pos, head_dim)
        self.register_buffer("sin_cached", sin.to(dtype), persistent=False)

    def _tables(self, seq_len: int, base: float, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = 1.0 / (base ** (torch.arange(0, self.dim, 2, dtype=torch.float32, device=device) / self.dim))
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)  # (seq, head_dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (seq, head_dim)
        return emb.cos(), emb.sin()

    @torch.no_grad()
    def reset_tables(self) -> None:
        """Refill the tables in place (after loading, when buffers were created empty)."""
        cos, sin = self._tables(self.cos_cached.shape[0], self.base, device=self.cos_cached.device)
        self.cos_cached.copy_(cos)
        self.sin_cached.copy_(sin)

    def forward(self, x: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        if seq_len > self.max_seq_len_cached:
            # Dynamic NTK: stretch the base so positions past the trained length stay in range.
            ratio = self.scaling_factor * seq_len / self.max_position_embeddings - (self.scaling_factor - 1)
            base = self.base * ratio ** (self.dim / (self.dim - 2))
            cos, sin = self._tables(seq_len, base, device=x.device)
            self.max_seq_len_cached = seq_len
            self.cos_cached, self.sin_cached = cos, sin
        return self.cos_cached[:seq_len].to(dtype=x.dtype), self.sin_cached[:seq_len].to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    cos = cos[position_ids].unsqueeze(1)  # (B, 1, T, head_dim)
    sin = sin[position_ids].unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


class PLoRA(nn.Module):
    """A linear projection plus a low-rank branch that acts only at image-token positions.

    `base_layer` is a plain `nn.Linear`, so quantizers that convert linears convert it; `Plora_A` and
    `Plora_B` keep the original's names. Text-only steps (im_mask None) skip the branch entirely.
    """

    def __init__(self, in_features: int, out_features: int, config: InternLMXcomposer2Config) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.base_layer = nn.Linear(in_features, out_features, bias=config.bias)
        self.Plora_A = nn.Linear(in_features, config.plora_rank, bias=False)
        self.Plora_B = nn.Linear(config.plora_rank, out_features, bias=False)
        self.lora_dropout = nn.Dropout(config.plora_dropout)
        self.lora_scaling = config.plora_alpha / config.plora_rank

    def forward(self, x: torch.Tensor, im_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.base_layer(x)  # (B, T, out)
        if im_mask is None:
            return out
        lora = self.Plora_B(self.Plora_A(self.lora_dropout(x)))  # (B, T, out)
        gate = im_mask.unsqueeze(-1).to(lora.dtype) * self.lora_scaling  # (B, T, 1)
        # In place, like the original's `res[im_mask] += ...`: no third (B, T, out) tensor at the peak.
        return out.add_(lora.mul_(gate).to(out.dtype))


class InternLM2MLP(nn.Module):
    def __init__(self, config: InternLMXcomposer2Config) -> None:
        super().__init__()
        self.w1 = PLoRA(config.hidden_size, config.intermediate_size, config)  # gate
        self.w3 = PLoRA(config.hidden_size, config.intermediate_size, config)  # up
        self.w2 = PLoRA(config.intermediate_size, config.hidden_size, config)  # down
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor, im_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.w2(self.act_fn(self.w1(x, im_mask)) * self.w3(x, im_mask), im_mask)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, kv_heads, T, D) -> (B, kv_heads * n_rep, T, D), materialised as the original does."""
    batch, kv_heads, seq_len, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None].expand(batch, kv_heads, n_rep, seq_len, head_dim)
    return hidden_states.reshape(batch, kv_heads * n_rep, seq_len, head_dim)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scores materialised as (B, H, T, S), masked additively, softmax in FP32: the original's path."""
    attn_weights = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if mask is not None:
        attn_weights = attn_weights + mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(attn_weights, v)  # (B, H, T, D)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """PyTorch's fused kernel: never materialises the scores when a flash or memory-efficient kernel applies."""
    is_causal = mask is None and q.shape[2] > 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)


class TupleCacheLayer(DynamicLayer):
    """A cache layer that holds what the original's tuple cache held (transformers 4.33.2's `past_key_values`).

    The prefill's keys and values are stored as given, not copied into the cache's own tensors: the values are a
    view into the layer's packed `wqkv` output, so that whole output (queries and keys included) stays alive as
    long as the prefill's cache does. Each decode step concatenates into new tensors, as `DynamicLayer` does.
    """

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.is_initialized:
            return super().update(key_states, value_states, *args, **kwargs)
        self.lazy_initialization(key_states, value_states)
        self.keys, self.values = key_states, value_states
        return self.keys, self.values


class InternLM2Attention(nn.Module):
    def __init__(self, config: InternLMXcomposer2Config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.head_dim = config.head_dim
        qkv_out = (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim
        self.wqkv = PLoRA(config.hidden_size, qkv_out, config)
        self.wo = PLoRA(self.num_heads * self.head_dim, config.hidden_size, config)
        self.rotary_emb = InternLM2RotaryEmbedding(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        cache: Cache | None = None,
        im_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        bsz, q_len, _ = hidden_states.shape
        qkv = self.wqkv(hidden_states, im_mask)  # (B, T, (H + 2 * KV) * D)
        # Packed per KV group: [q_1 .. q_g, k, v] for each of the KV heads.
        qkv = qkv.view(bsz, q_len, self.num_key_value_heads, self.num_key_value_groups + 2, self.head_dim)
        query = qkv[..., : self.num_key_value_groups, :].reshape(bsz, q_len, self.num_heads, self.head_dim)
        query = query.transpose(1, 2)  # (B, H, T, D)
        key = qkv[..., -2, :].transpose(1, 2)  # (B, KV, T, D)
        value = qkv[..., -1, :].transpose(1, 2)  # (B, KV, T, D)

        past_len = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        cos, sin = self.rotary_emb(value, seq_len=past_len + q_len)
        query, key = apply_rotary_pos_emb(query, key, cos, sin, position_ids)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)  # (B, KV, S, D)

        key = repeat_kv(key, self.num_key_value_groups)  # (B, H, S, D)
        value = repeat_kv(value, self.num_key_value_groups)
        attend = sdpa_attention if self.config._attn_implementation == "sdpa" else eager_attention
        attn_output = attend(query, key, value, attention_mask)  # (B, H, T, D)
        attn_output = attn_output.transpose(1, 2).reshape(bsz, q_len, self.num_heads * self.head_dim)
        return self.wo(attn_output, im_mask)


class InternLM2DecoderLayer(nn.Module):
    def __init__(self, config: InternLMXcomposer2Config, layer_idx: int) -> None:
        super().__init__()
        self.attention = InternLM2Attention(config, layer_idx)
        self.feed_forward = InternLM2MLP(config)
        self.attention_norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.ffn_norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        cache: Cache | None = None,
        im_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.attention(
            self.attention_norm(hidden_states), attention_mask, position_ids, cache, im_mask
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.feed_forward(self.ffn_norm(hidden_states), im_mask)
        return residual + hidden_states


class InternLM2Model(nn.Module):
    """The decoder stack: token embeddings, layers and the final norm (checkpoint prefix `model.`)."""

    def __init__(self, config: InternLMXcomposer2Config) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(InternLM2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def build_attention_mask(
        self, attention_mask: torch.Tensor | None, q_len: int, past_len: int, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """A 4D mask for the attention kind in force, or None when causality alone is enough.

        Eager attention gets the original's additive (B, 1, T, S) mask in the activations' dtype; sdpa
        gets a boolean mask only when there is padding, and otherwise uses its causal kernel.
        """
        has_padding = attention_mask is not None and not bool(attention_mask.all())
        eager = self.config._attn_implementation != "sdpa"
        if not has_padding and (q_len == 1 or not eager):
            return None
        device = self.tok_embeddings.weight.device
        total = past_len + q_len
        allowed = torch.ones(q_len, total, dtype=torch.bool, device=device).tril(diagonal=past_len)  # (T, S)
        allowed = allowed[None, None]  # (1, 1, T, S)
        if has_padding:
            allowed = allowed & attention_mask[:, None, None, :total].bool().to(device)  # (B, 1, T, S)
        if not eager:
            return allowed
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        cache: Cache | None,
        im_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        past_len = cache.get_seq_length() if cache is not None else 0
        mask = self.build_attention_mask(attention_mask, inputs_embeds.shape[1], past_len, inputs_embeds.dtype)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, mask, position_ids, cache, im_mask)
        return self.norm(hidden_states)


class CLIPVisionTower(nn.Module):
    """CLIP ViT-L/14 run at 490 px; returns the last layer's patch features without the CLS token."""

    def __init__(self, config: InternLMXcomposer2Config) -> None:
        super().__init__()
        self.select_layer = config.vision_select_layer
        self.vision_tower = CLIPVisionModel(config.vision_config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        trained_size = self.vision_tower.config.image_size
        outputs = self.vision_tower(
            pixel_values,
            output_hidden_states=True,
            interpolate_pos_encoding=pixel_values.shape[-1] != trained_size,
        )
        return outputs.hidden_states[self.select_layer][:, 1:]  # (B, patches, vision_hidden)


class InternLMXComposer2PreTrainedModel(PreTrainedModel):
    config_class = InternLMXcomposer2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["InternLM2DecoderLayer", "CLIPEncoderLayer"]
    _skip_keys_device_placement = ["cache"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, InternLM2RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, InternLM2RotaryEmbedding):
            module.reset_tables()


class InternLMXComposer2ForCausalLM(InternLMXComposer2PreTrainedModel, GenerationMixin):
    """InternLM-XComposer2-VL: vision tower, projector, PLoRA decoder and output head, with `chat()`."""

    def __init__(self, config: InternLMXcomposer2Config) -> None:
        super().__init__(config)
        self.model = InternLM2Model(config)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.vit = CLIPVisionTower(config)
        self.vision_proj = nn.Sequential(
            nn.Linear(config.vision_config.hidden_size, config.hidden_size),
            ACT2FN[config.projector_hidden_act],
            nn.Linear(config.hidden_size, config.hidden_size),
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.tok_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.tok_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.output

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.output = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        im_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.model.tok_embeddings(input_ids)  # (B, T, C)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = self.make_cache()
        if not use_cache:
            cache = None
        past_len = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + inputs_embeds.shape[1], device=inputs_embeds.device)
            position_ids = position_ids.unsqueeze(0)  # (1, T)
        hidden_states = self.model(inputs_embeds, attention_mask, position_ids, cache, im_mask)
        # The original computes logits for every position and upcasts them: real memory at prefill.
        logits = self.output(hidden_states).float()  # (B, T, vocab)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1).to(logits.device),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    def make_cache(self) -> Cache:
        """An empty KV cache: `TupleCacheLayer`s with `config.original_memory` (the default), else `DynamicCache`'s."""
        if self.config.original_memory:
            return Cache(layer_class_to_replicate=TupleCacheLayer)
        return DynamicCache(config=self.config)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        im_mask: torch.Tensor | None = None,
        use_cache: bool = True,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Feed the prompt embeddings (with their image mask) once, then only new tokens.

        Without a cache every step re-reads the whole sequence: the prompt embeddings followed by the
        embeddings of the tokens generated so far.
        """
        past_len = cache.get_seq_length() if cache is not None else 0
        step = dict(cache=cache, attention_mask=attention_mask, use_cache=use_cache)
        if inputs_embeds is None:
            return {**step, "input_ids": input_ids[:, past_len:], "im_mask": im_mask if past_len == 0 else None}
        prompt_len = inputs_embeds.shape[1]
        if past_len > 0:
            return {**step, "input_ids": input_ids[:, past_len - prompt_len :], "im_mask": None}
        if input_ids.shape[1] == 0:  # the prefill: the prompt's embeddings as given, not a copy (as the original)
            return {**step, "inputs_embeds": inputs_embeds, "im_mask": im_mask}
        new_embeds = self.model.tok_embeddings(input_ids).to(inputs_embeds.dtype)  # (B, generated, C)
        embeds = torch.cat([inputs_embeds, new_embeds], dim=1)
        if im_mask is not None:
            pad = torch.zeros(im_mask.shape[0], input_ids.shape[1], dtype=im_mask.dtype, device=im_mask.device)
            im_mask = torch.cat([im_mask, pad], dim=1)
        return {**step, "inputs_embeds": embeds, "im_mask": im_mask}

    # ----- images ---------------------------------------------------------------------------------

    def vis_processor(self, image: ImageInput, image_size: int | None = None) -> torch.Tensor:
        """Load, check and normalise one image to a (3, S, S) tensor; S is `image_size`, by default the tower's."""
        patch = self.config.vision_config.patch_size
        if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                       or image_size < 1):
            raise ValueError(
                f"image_size={image_size!r}; pass None for the model's own {self.config.image_size} px, or a positive "
                f"multiple of the {patch} px patch size."
            )
        size = self.config.image_size if image_size is None else image_size
        if size % patch:
            raise ValueError(
                f"image_size={size} is not a multiple of the patch size {patch}; "
                f"use a multiple of {patch}, e.g. {max(patch, size // patch * patch)}."
            )
        if isinstance(image, (str, os.PathLike)):
            if not os.path.isfile(image):
                raise FileNotFoundError(f"No image file at {os.fspath(image)!r}; pass an existing path or a PIL image.")
            image = Image.open(image)
        if isinstance(image, Image.Image):
            try:
                image.load()  # PIL opens lazily: a damaged or cut-short file fails here, not deep in the resize
            except OSError as exc:
                name = getattr(image, "filename", "") or "the PIL image"
                raise OSError(
                    f"Cannot read the image {name!r}: {exc}. The file is damaged or was cut short (an interrupted "
                    "download or copy); save or download it again."
                ) from None
        if isinstance(image, torch.Tensor):
            if image.ndim != 3 or tuple(image.shape) != (3, size, size):
                raise ValueError(
                    f"A tensor image must be preprocessed to shape (3, {size}, {size}); got {tuple(image.shape)}. "
                    "Pass a PIL image or a path to let the model resize and normalise it."
                )
            return image
        if not isinstance(image, Image.Image):
            raise TypeError(
                f"Unsupported image type {type(image).__name__}; pass a file path, a PIL image or a "
                f"(3, {size}, {size}) tensor."
            )
        if image.mode not in ACCEPTED_IMAGE_MODES:
            raise ValueError(
                f"Image mode {image.mode!r} is not supported (accepted: {', '.join(ACCEPTED_IMAGE_MODES)}); "
                "convert it first, e.g. image.convert('RGB')."
            )
        if min(image.size) < patch:
            raise ValueError(
                f"The image is {image.size[0]}x{image.size[1]} px; each side needs at least {patch} px "
                "(one patch) before resizing."
            )
        image = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, S, S)
        mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        std = torch.tensor(CLIP_STD).view(3, 1, 1)
        return (pixels - mean) / std

    def encode_img(self, image: ImageInput | Sequence[ImageInput], image_size: int | None = None) -> torch.Tensor:
        """Images -> projected image tokens (N, patches, hidden) on the embeddings' device."""
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        pixels = torch.stack([self.vis_processor(im, image_size) for im in images])  # (N, 3, S, S)
        vit_weight = self.vit.vision_tower.embeddings.patch_embedding.weight
        pixels = pixels.to(device=vit_weight.device, dtype=vit_weight.dtype)
        features = self.vit(pixels)  # (N, patches, vision_hidden)
        proj_device = self.vision_proj[0].weight.device
        image_embeds = self.vision_proj(features.to(proj_device))  # (N, patches, hidden)
        return image_embeds.to(self.model.tok_embeddings.weight.device)

    # ----- chat -----------------------------------------------------------------------------------

    @staticmethod
    def build_prompt(query: str, history: Sequence[tuple[str, str]] = (), meta_instruction: str = "") -> str:
        """The InternLM2 chat template the original uses."""
        prompt = f"{IM_START}system\n{meta_instruction}{IM_END}\n" if meta_instruction else ""
        for user, assistant in history:
            prompt += f"{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n{assistant}{IM_END}\n"
        return prompt + f"{IM_START}user\n{query}{IM_END}\n{IM_START}assistant\n"

    def interleav_wrap_chat(
        self,
        tokenizer: Any,
        query: str,
        image: torch.Tensor,
        history: Sequence[tuple[str, str]] = (),
        meta_instruction: str = DEFAULT_META_INSTRUCTION,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed the prompt with image tokens spliced in at each `<ImageHere>`.

        Returns inputs_embeds (1, T, C) and im_mask (1, T), True at image positions. Each text part is
        tokenized on its own, with BOS, as the original does.
        """
        prompt = self.build_prompt(query, history, meta_instruction)
        parts = prompt.split(IMAGE_PLACEHOLDER)
        if len(parts) != len(image) + 1:
            raise ValueError(
                f"The prompt has {len(parts) - 1} {IMAGE_PLACEHOLDER} placeholder(s) but {len(image)} image(s) "
                f"were given; put one {IMAGE_PLACEHOLDER} in the query for each image."
            )
        embed = self.model.tok_embeddings
        pieces, masks = [], []
        for idx, part in enumerate(parts):
            if part:
                ids = tokenizer(part, return_tensors="pt").input_ids.to(embed.weight.device)
                pieces.append(embed(ids))  # (1, t, C)
                masks.append(torch.zeros(ids.shape, dtype=torch.bool, device=embed.weight.device))
            if idx < len(image):
                pieces.append(image[idx].unsqueeze(0).to(embed.weight.dtype))  # (1, patches, C)
                masks.append(torch.ones(1, image[idx].shape[0], dtype=torch.bool, device=embed.weight.device))
        return torch.cat(pieces, dim=1), torch.cat(masks, dim=1)

    def chat(
        self,
        tokenizer: Any,
        query: str,
        image: ImageInput | Sequence[ImageInput] | None = None,
        history: Sequence[tuple[str, str]] = (),
        streamer: Any = None,
        max_new_tokens: int = 1024,
        do_sample: bool = True,
        temperature: float = 1.0,
        top_p: float = 0.8,
        repetition_penalty: float = 1.005,
        meta_instruction: str = DEFAULT_META_INSTRUCTION,
        image_size: int | None = None,
        **kwargs: Any,
    ) -> tuple[str, list[tuple[str, str]]]:
        """Answer `query` about `image` as the original `chat()` does; returns (response, history).

        An image without a `<ImageHere>` placeholder in the query is put in front of it.
        """
        if not isinstance(query, str):
            raise ValueError(f"query={query!r:.80}; pass the question as a string, "
                             "e.g. '<ImageHere>Describe the image.'")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r}; it must be an integer of at least 1.")
        if isinstance(image, (list, tuple)) and not image:
            raise ValueError(
                f"image={image!r} holds no image; pass an image (a path, a PIL image or a tensor), a list of them, "
                "or None to chat without one."
            )
        if image is None:
            ids = tokenizer(self.build_prompt(query, history, meta_instruction), return_tensors="pt").input_ids
            inputs_embeds = self.model.tok_embeddings(ids.to(self.model.tok_embeddings.weight.device))
            im_mask = None
        else:
            images = list(image) if isinstance(image, (list, tuple)) else [image]
            if IMAGE_PLACEHOLDER not in query:
                query = IMAGE_PLACEHOLDER * len(images) + query
            image_embeds = self.encode_img(images, image_size)
            inputs_embeds, im_mask = self.interleav_wrap_chat(tokenizer, query, image_embeds, history, meta_instruction)
        sampling = dict(temperature=temperature, top_p=top_p) if do_sample else {}
        cache = kwargs.pop("cache", None)
        outputs = self.generate(
            inputs_embeds=inputs_embeds,
            im_mask=im_mask,
            cache=self.make_cache() if cache is None else cache,
            streamer=streamer,
            max_new_tokens=max_new_tokens,
            num_beams=1,
            do_sample=do_sample,
            repetition_penalty=repetition_penalty,
            eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)],
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
            **kwargs,
        )
        response = tokenizer.decode(outputs[0].tolist(), skip_special_tokens=True)
        response = response.split(IM_END)[0].strip()
        return response, list(history) + [(query, response)]

