"""Named presets: the published dimensions of the LLMs and VLMs the planner is validated on, built offline.

Each preset holds the model's `config.json` as published on the Hugging Face Hub (the fields that shape the
model; the file is cited beside each), turned into the transformers config object by the config class's own
`from_dict`, so that legacy keys (`rope_scaling`, `torch_dtype`) are read exactly as `from_pretrained` reads
them. A VLM also holds its processor's published settings (`preprocessor_config.json`, `processor_config.json`).

Every preset has a tiny variant of the same architecture (two layers, three in LLaVA's vision tower, which reads
the one before last; widths of tens, a vocabulary of 512, token ids inside it, 56 px images) for tests on a CPU:

    preset = get_preset("qwen2-vl-7b")
    config = preset.config()            # Qwen2VLConfig, full size
    tiny = preset.config(tiny=True)     # Qwen2VLConfig, 2 layers, hidden 64
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

# OpenAI CLIP's normalisation, published by Qwen2-VL and LLaVA 1.5 alike.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

_TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 512, "bos_token_id": 1, "eos_token_id": 2}


def _merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`base` updated by `overrides`, nested dicts (text_config, vision_config) merged key by key."""
    out = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        out[key] = _merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) \
            else copy.deepcopy(value)
    return out


def _frozen(data: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(copy.deepcopy(dict(data)))


@dataclass(frozen=True)
class Preset:
    """One model: its published config and processor settings, a tiny variant of each, and its default image."""

    name: str
    source: str  # the Hub repository whose config.json the dimensions come from
    published: Mapping[str, Any]  # config.json as published (the fields that shape the model)
    tiny_overrides: Mapping[str, Any]  # merged over `published` for the tiny variant
    dtype: torch.dtype  # the dtype the model is published and run in
    processor: Mapping[str, Any] | None = None  # VLMs: the processor's published settings
    tiny_processor_overrides: Mapping[str, Any] = field(default_factory=dict)
    image_size: int | None = None  # VLMs: the side in px of the one square image a call sees by default
    tiny_image_size: int | None = None

    @property
    def is_vlm(self) -> bool:
        """Whether the model takes images."""
        return self.processor is not None

    def config_dict(self, tiny: bool = False) -> dict[str, Any]:
        """The config.json fields of the full model or of its tiny variant (a fresh copy)."""
        return _merge(self.published, self.tiny_overrides) if tiny else copy.deepcopy(dict(self.published))

    def config(self, tiny: bool = False) -> PretrainedConfig:
        """The transformers config object, read by the model type's config class as from_pretrained reads it."""
        data = self.config_dict(tiny)
        return AutoConfig.for_model(data["model_type"]).__class__.from_dict(data)

    def processor_settings(self, tiny: bool = False) -> dict[str, Any]:
        """The processor's published settings (or the tiny variant's); ValueError for an LLM."""
        if self.processor is None:
            raise ValueError(f"preset {self.name!r} is a language model: it has no image processor; choose one "
                             f"of the VLMs {[p.name for p in PRESETS.values() if p.is_vlm]}.")
        return _merge(self.processor, self.tiny_processor_overrides) if tiny else copy.deepcopy(dict(self.processor))

    def default_image_size(self, tiny: bool = False) -> int:
        """The side in px of the default image (VLMs only)."""
        self.processor_settings(tiny)  # refuses an LLM
        return self.tiny_image_size if tiny else self.image_size


PRESETS: dict[str, Preset] = {}


def _add(preset: Preset) -> None:
    PRESETS[preset.name] = preset


# https://huggingface.co/meta-llama/Meta-Llama-3-8B/blob/main/config.json
_add(Preset(
    name="llama-3-8b", source="meta-llama/Meta-Llama-3-8B", dtype=torch.bfloat16,
    published=_frozen({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 8192,
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
        "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 500000.0, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 128256}),
    tiny_overrides=_frozen(_TINY_TEXT)))

# https://huggingface.co/Qwen/Qwen2.5-7B-Instruct/blob/main/config.json
_add(Preset(
    name="qwen2.5-7b", source="Qwen/Qwen2.5-7B-Instruct", dtype=torch.bfloat16,
    published=_frozen({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584,
        "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 32768,
        "max_window_layers": 28, "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 152064}),
    tiny_overrides=_frozen({**_TINY_TEXT, "max_window_layers": 2})))

# https://huggingface.co/mistralai/Mistral-7B-v0.3/blob/main/config.json
_add(Preset(
    name="mistral-7b-v0.3", source="mistralai/Mistral-7B-v0.3", dtype=torch.bfloat16,
    published=_frozen({
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "attention_dropout": 0.0,
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
        "intermediate_size": 14336, "max_position_embeddings": 32768, "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 32768}),
    tiny_overrides=_frozen(_TINY_TEXT)))

# https://huggingface.co/google/gemma-2-9b/blob/main/config.json. Its torch_dtype field says float32, but Gemma 2
# was trained in and is run in bfloat16 (its model card; float16 overflows its activations), so it is run in it.
# The tiny variant keeps one sliding-window and one global layer, with a window short enough for test prompts.
_add(Preset(
    name="gemma-2-9b", source="google/gemma-2-9b", dtype=torch.bfloat16,
    published=_frozen({
        "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "attention_bias": False,
        "attention_dropout": 0.0, "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid",
        "eos_token_id": 1, "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 3584, "initializer_range": 0.02,
        "intermediate_size": 14336, "max_position_embeddings": 8192, "num_attention_heads": 16,
        "num_hidden_layers": 42, "num_key_value_heads": 8, "pad_token_id": 0, "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096, "torch_dtype": "float32",
        "use_cache": True, "vocab_size": 256000}),
    tiny_overrides=_frozen({**_TINY_TEXT, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 24,
                            "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0})))

# https://huggingface.co/microsoft/Phi-3-mini-4k-instruct/blob/main/config.json: every layer attends through a
# sliding window of 2047 tokens, so its cache keeps at most that many (the tiny variant: 24).
_add(Preset(
    name="phi-3-mini-4k", source="microsoft/Phi-3-mini-4k-instruct", dtype=torch.bfloat16,
    published=_frozen({
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 1, "embd_pdrop": 0.0, "eos_token_id": 32000, "hidden_act": "silu", "hidden_size": 3072,
        "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 4096,
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
        "original_max_position_embeddings": 4096, "pad_token_id": 32000, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
        "rope_scaling": None, "rope_theta": 10000.0, "sliding_window": 2047, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32064}),
    tiny_overrides=_frozen({**_TINY_TEXT, "num_key_value_heads": 4, "sliding_window": 24, "pad_token_id": 2})))

# https://huggingface.co/Qwen/Qwen2-VL-7B-Instruct/blob/main/config.json and preprocessor_config.json. Its
# resolution is dynamic (min_pixels..max_pixels): the default image is 448 px, 32x32 patches, 256 tokens.
_add(Preset(
    name="qwen2-vl-7b", source="Qwen/Qwen2-VL-7B-Instruct", dtype=torch.bfloat16,
    published=_frozen({
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
        "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
        "intermediate_size": 18944, "max_position_embeddings": 32768, "max_window_layers": 28,
        "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "use_cache": True, "use_sliding_window": False,
        "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                          "hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                          "temporal_patch_size": 2},
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 152064}),
    tiny_overrides=_frozen({
        **_TINY_TEXT, "max_window_layers": 2, "vision_start_token_id": 10, "vision_end_token_id": 11,
        "vision_token_id": 12, "image_token_id": 13, "video_token_id": 14,
        "vision_config": {"depth": 2, "embed_dim": 32, "num_heads": 2, "hidden_size": 64},
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}),
    processor=_frozen({
        "image_processor": {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                            "merge_size": 2, "image_mean": CLIP_MEAN, "image_std": CLIP_STD},
        "processor": {}}),
    image_size=448, tiny_image_size=56))

# https://huggingface.co/llava-hf/llava-1.5-7b-hf/blob/main/config.json (its text_config leaves the 7B widths to
# LlamaConfig's defaults; they are written out here), preprocessor_config.json and processor_config.json.
_add(Preset(
    name="llava-1.5-7b", source="llava-hf/llava-1.5-7b-hf", dtype=torch.float16,
    published=_frozen({
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "ignore_index": -100,
        "image_token_index": 32000, "pad_token_id": 32001, "projector_hidden_act": "gelu",
        "text_config": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
                        "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                        "num_key_value_heads": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
                        "torch_dtype": "float16", "vocab_size": 32064},
        "tie_word_embeddings": False, "torch_dtype": "float16",
        "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                          "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                          "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064}),
    tiny_overrides=_frozen({
        "image_token_index": 13, "pad_token_id": 0,
        "text_config": {**_TINY_TEXT, "num_key_value_heads": 4},
        "vision_config": {"hidden_size": 32, "image_size": 56, "intermediate_size": 64, "num_attention_heads": 2,
                          "num_hidden_layers": 3, "projection_dim": 32}}),
    processor=_frozen({
        "image_processor": {"crop_size": {"height": 336, "width": 336}, "do_center_crop": True,
                            "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
                            "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "resample": 3,
                            "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 336}},
        "processor": {"patch_size": 14, "vision_feature_select_strategy": "default",
                      "num_additional_image_tokens": 1, "image_token": "<image>"}}),
    tiny_processor_overrides=_frozen({"image_processor": {"crop_size": {"height": 56, "width": 56},
                                                          "size": {"shortest_edge": 56}}}),
    image_size=336, tiny_image_size=56))

# https://huggingface.co/HuggingFaceM4/Idefics3-8B-Llama3/blob/main/config.json, preprocessor_config.json and
# processor_config.json. Its processor first resizes an image's longest edge to 4 x 364 px (up or down), then
# cuts it into 364 px tiles plus a global view, 169 tokens each: a 364 px image becomes 17 x 169 = 2873 tokens.
_add(Preset(
    name="idefics3-8b", source="HuggingFaceM4/Idefics3-8B-Llama3", dtype=torch.bfloat16,
    published=_frozen({
        "architectures": ["Idefics3ForConditionalGeneration"], "model_type": "idefics3", "image_token_id": 128257,
        "scale_factor": 2, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128259,
        "text_config": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "bos_token_id": 128000,
                        "eos_token_id": [128001, 128008, 128009], "hidden_size": 4096, "intermediate_size": 14336,
                        "max_position_embeddings": 131072, "num_attention_heads": 32, "num_hidden_layers": 32,
                        "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
                        "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                        "rope_theta": 500000.0, "torch_dtype": "bfloat16", "vocab_size": 128259},
        "vision_config": {"hidden_size": 1152, "image_size": 364, "intermediate_size": 4304,
                          "model_type": "idefics3", "num_attention_heads": 16, "num_hidden_layers": 27,
                          "patch_size": 14}}),
    tiny_overrides=_frozen({
        "image_token_id": 13, "vocab_size": 512, "text_config": {**_TINY_TEXT, "eos_token_id": [2]},
        "vision_config": {"hidden_size": 32, "image_size": 56, "intermediate_size": 64, "num_attention_heads": 2,
                          "num_hidden_layers": 2}}),
    processor=_frozen({
        "image_processor": {"do_convert_rgb": True, "do_image_splitting": True, "do_normalize": True,
                            "do_pad": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
                            "image_std": [0.5, 0.5, 0.5], "max_image_size": {"longest_edge": 364}, "resample": 1,
                            "rescale_factor": 0.00392156862745098, "size": {"longest_edge": 1456}},
        "processor": {"image_seq_len": 169}}),
    tiny_processor_overrides=_frozen({"image_processor": {"max_image_size": {"longest_edge": 56},
                                                          "size": {"longest_edge": 112}},
                                      "processor": {"image_seq_len": 4}}),
    image_size=364, tiny_image_size=56))


def preset_names(kind: str | None = None) -> list[str]:
    """The presets' names, all or only the "llm" or "vlm" ones."""
    if kind not in (None, "llm", "vlm"):
        raise ValueError(f"kind={kind!r}; choose one of [None, 'llm', 'vlm'].")
    return [name for name, p in PRESETS.items() if kind is None or p.is_vlm == (kind == "vlm")]


def get_preset(name: str) -> Preset:
    """The preset called `name`; ValueError listing the names if there is none."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"preset={name!r} is not a known model; choose one of {preset_names()} (or pass a "
                         f"config object or a folder holding a config.json).")
    return PRESETS[name]
