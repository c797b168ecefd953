"""Build a preset's model with random weights, and its inputs, without a checkpoint on disk.

`build_model` calls `from_pretrained` itself, with no path and a lazy random state dict (`RandomCheckpoint`)
standing for the checkpoint: every weight of two or more dimensions is a slice that gives its tensor (normal, the
config's `initializer_range`, in the checkpoint's dtype, in host memory) only when the loader reads it, as a
safetensors slice does. So the loader does what it does for a real checkpoint: the same modules quantized or
skipped, the same dtypes, the same quantization statistics, the same transfers to the device; the other
parameters (norms, biases) are initialised by the model's own `_init_weights`, as missing keys are. One random
tensor is drawn per shape (on the GPU for a load onto it, kept in pinned host memory), and read by every weight
of that shape (the layers of a model hold the same values): a checkpoint of 8 billion weights costs a few random
tensors, not minutes of drawing.

VLM inputs come from the model's own processor, built offline from its published settings (presets.py) with a
word-level tokenizer that holds the special tokens at the config's ids: the image placeholder is expanded to as
many image tokens as that processor counts for the image size, and random text tokens fill the prompt to length.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    BitsAndBytesConfig,
    CLIPImageProcessorPil,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    LlavaProcessor,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)
from transformers import logging as hf_logging

from xcomp_lab.core.checks import check_choice, check_int
from xcomp_lab.model.bnb_cpu import apply_cpu_path
from xcomp_lab.plan.presets import Preset, get_preset

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
ATTENTIONS = ("eager", "sdpa")
QUANTIZATIONS = ("none", "int8", "nf4")


def dtype_of(name: str | torch.dtype) -> torch.dtype:
    """The torch dtype for "fp16", "bf16" or "fp32" (a torch dtype among them is returned as is)."""
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    return DTYPES[check_choice("dtype", name, list(DTYPES), hint="the dtype of the weights that stay unquantized")]


def quantization_config(quantization: str, dtype: str | torch.dtype) -> BitsAndBytesConfig | None:
    """The bitsandbytes config for "int8" (LLM.int8()) or "nf4" (double-quantized, computing in `dtype`); None for "none"."""
    check_choice("quantization", quantization, QUANTIZATIONS, hint="bitsandbytes INT8, NF4, or none")
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype_of(dtype))
    return None


def model_class(config: PretrainedConfig) -> type:
    """The auto class that builds a config's generating model: image-text-to-text for a VLM, else causal LM."""
    return AutoModelForImageTextToText if "vision_config" in config.to_dict() else AutoModelForCausalLM


class RandomSlice:
    """A checkpoint entry that makes its tensor when read (`slice[...]`), like a safetensors slice."""

    def __init__(self, source: RandomCheckpoint, shape: tuple[int, ...]) -> None:
        self.source, self.shape = source, shape

    def get_shape(self) -> list[int]:
        """The tensor's shape, as safetensors' slices answer it."""
        return list(self.shape)

    def __getitem__(self, index: object) -> torch.Tensor:
        tensor = self.source.tensor(self.shape)[index]
        # A load onto the CPU keeps the tensor read (`.to` is a no-op there): each read is then a fresh copy, as a
        # safetensors slice reads one from its file, so that no two weights share storage. A load onto a GPU
        # copies it there itself.
        return tensor.clone() if self.source.device.type == "cpu" else tensor


class RandomCheckpoint(Mapping):
    """A lazy state dict of random weights for `model`'s parameters of two or more dimensions, in `dtype`, for a
    load onto `device`.

    Reading an entry draws one normal tensor (std `std`, seeded by its shape) per shape, kept for the entries of
    the same shape (drawn on the GPU and kept in pinned host memory for a load onto a GPU); `draw()` draws them
    all at once (before a measured load), `clear()` lets them go.
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, std: float, seed: int = 0,
                 device: str | torch.device = "cpu") -> None:
        self.dtype, self.std, self.seed, self.device = dtype, std, seed, torch.device(device)
        self._shapes = {name: tuple(p.shape) for name, p in model.named_parameters() if p.dim() >= 2}
        # Each shape's own seed, fixed here: the loader reads entries from several threads, in no fixed order.
        self._seeds = {shape: seed + i for i, shape in enumerate(sorted(set(self._shapes.values())))}
        self._drawn: dict[tuple[int, ...], torch.Tensor] = {}
        self._lock = threading.Lock()

    def tensor(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The random tensor every entry of this shape reads."""
        with self._lock:
            if shape not in self._drawn:
                # Drawn on the GPU for a load onto it (seconds, not minutes, for 8 billion weights), then kept in
                # pinned host memory, where a checkpoint's tensors would be.
                generator = torch.Generator(self.device).manual_seed(self._seeds[shape])
                drawn = torch.empty(shape, dtype=self.dtype, device=self.device).normal_(0.0, self.std,
                                                                                         generator=generator)
                if self.device.type == "cuda":
                    drawn = torch.empty(shape, dtype=self.dtype, pin_memory=True).copy_(drawn)
                self._drawn[shape] = drawn
            return self._drawn[shape]

    def draw(self) -> None:
        """Draw every shape's tensor now (so that a measured load only copies them)."""
        for shape in self._seeds:
            self.tensor(shape)

    def clear(self) -> None:
        """Forget the drawn tensors (host memory)."""
        self._drawn.clear()

    def __getitem__(self, name: str) -> RandomSlice:
        return RandomSlice(self, self._shapes[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """Silence the loading report, which lists the norms and biases left to `_init_weights` as missing keys."""
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    names = ("transformers.modeling_utils", "transformers.utils.loading_report")
    levels = [logging.getLogger(name).level for name in names]
    for name in names:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        for name, level in zip(names, levels):
            logging.getLogger(name).setLevel(level)


def resolve_config(model: str | Preset | PretrainedConfig, tiny: bool = False) -> PretrainedConfig:
    """A config from a preset name, a preset or a config object (returned as is)."""
    if isinstance(model, PretrainedConfig):
        return model
    preset = model if isinstance(model, Preset) else get_preset(model)
    return preset.config(tiny)


def meta_model(config: PretrainedConfig, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The model of `config` on the meta device (no memory), in `dtype` (default: float32, as from_config)."""
    with torch.device("meta"):
        return model_class(config).from_config(config, **({} if dtype is None else {"dtype": dtype}))


def random_checkpoint(model: str | Preset | PretrainedConfig, dtype: str | torch.dtype, device: str | torch.device,
                      seed: int = 0, tiny: bool = False) -> RandomCheckpoint:
    """The random checkpoint of a model in `dtype`, for loads onto `device` (share it between builds)."""
    config = resolve_config(model, tiny)
    return RandomCheckpoint(meta_model(config), dtype_of(dtype), config.get_text_config().initializer_range, seed,
                            device)


def build_model(model: str | Preset | PretrainedConfig, *, dtype: str | torch.dtype = "bf16", attn: str = "sdpa",
                quantization: str = "none", device: str | torch.device = "cpu", tiny: bool = False, seed: int = 0,
                checkpoint: RandomCheckpoint | None = None) -> PreTrainedModel:
    """A model with random weights as `from_pretrained(dtype=, attn_implementation=, quantization_config=,
    device_map=device)` leaves it, without a checkpoint on disk.

    `model` is a preset name, a preset (full size, or its tiny variant with `tiny=True`) or a config. Pass the
    same `checkpoint` (a `RandomCheckpoint` of this model and dtype) to several builds to draw its tensors once.
    On a CPU an NF4 model takes the course's 4-bit CPU kernel (`model.bnb_cpu.apply_cpu_path`, portable by default),
    as `load_model` gives every 4-bit model: bitsandbytes' own choice repacks the weights on CPUs with AVX512-BF16,
    which adds their packed copies (a tiny Llama 3 in NF4: 296,168 bytes at its peak instead of 220,392).
    """
    torch_dtype = dtype_of(dtype)
    check_choice("attn", attn, ATTENTIONS, hint="the attention implementation")
    bnb = quantization_config(quantization, torch_dtype)
    check_int("seed", seed, minimum=0)
    config = resolve_config(model, tiny)
    skeleton_class = type(meta_model(config))
    if checkpoint is None:
        checkpoint = random_checkpoint(config, torch_dtype, device, seed)
    elif checkpoint.dtype != torch_dtype or checkpoint.device != torch.device(device):
        raise ValueError(f"checkpoint holds {checkpoint.dtype} weights for {checkpoint.device}, but dtype={dtype!r} "
                         f"and device={str(device)!r} were asked; pass a RandomCheckpoint made for them, or none.")
    torch.manual_seed(seed)  # the norms and biases `_init_weights` sets
    with _quiet_loading():
        built = skeleton_class.from_pretrained(None, config=config, state_dict=checkpoint, dtype=torch_dtype,
                                               attn_implementation=attn, quantization_config=bnb,
                                               device_map=str(device))
    if quantization == "nf4" and torch.device(device).type == "cpu":
        apply_cpu_path(built)  # the course's 4-bit CPU kernel (XCOMP_LAB_BNB_CPU_PATH): the same bytes on every CPU
    return built


class Qwen2VLImageProcessorOnly(Qwen2VLProcessor):
    """Qwen2-VL's processor without its video processor (which needs torchvision, not a course requirement)."""

    def __init__(self, image_processor: Qwen2VLImageProcessorPil, tokenizer: PreTrainedTokenizerFast) -> None:
        super().__init__(image_processor, tokenizer)


def _special_tokenizer(tokens: Mapping[str, int]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer holding `tokens` (special tokens) at their ids and [UNK] for any other word."""
    # [UNK] takes the first id no special token holds: inside any vocabulary (an id past it fails on a GPU).
    unknown = next(i for i in range(len(tokens) + 1) if i not in tokens.values())
    vocab = {"[UNK]": unknown, **tokens}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tokenizer.add_special_tokens({"additional_special_tokens": list(tokens)})
    return tokenizer


def build_processor(preset: str | Preset, tiny: bool = False) -> ProcessorMixin:
    """The VLM's processor, from its published settings, with a tokenizer holding the config's special tokens."""
    preset = preset if isinstance(preset, Preset) else get_preset(preset)
    settings = preset.processor_settings(tiny)
    config = preset.config(tiny)
    kind = config.model_type
    if kind == "qwen2_vl":
        tokenizer = _special_tokenizer({"<|vision_start|>": config.vision_start_token_id,
                                        "<|vision_end|>": config.vision_end_token_id,
                                        "<|image_pad|>": config.image_token_id,
                                        "<|video_pad|>": config.video_token_id})
        return Qwen2VLImageProcessorOnly(Qwen2VLImageProcessorPil(**settings["image_processor"]), tokenizer)
    if kind == "llava":
        tokenizer = _special_tokenizer({"<image>": config.image_token_id})
        return LlavaProcessor(image_processor=CLIPImageProcessorPil(**settings["image_processor"]), tokenizer=tokenizer,
                              **settings["processor"])
    if kind == "idefics3":
        image_id = config.image_token_id
        tokenizer = _special_tokenizer({"<fake_token_around_image>": image_id - 1, "<image>": image_id,
                                        "<end_of_utterance>": image_id + 1})
        return Idefics3Processor(image_processor=Idefics3ImageProcessorPil(**settings["image_processor"]),
                                 tokenizer=tokenizer, **settings["processor"])
    raise ValueError(f"no processor is known for model_type {kind!r}; the VLM presets are qwen2_vl, llava and "
                     f"idefics3.")


# The text placeholder a processor expands into the image's tokens, per model type.
_IMAGE_PLACEHOLDER = {"qwen2_vl": "<|vision_start|> <|image_pad|> <|vision_end|>", "llava": "<image>",
                      "idefics3": "<image>"}


def random_image(image_size: int, seed: int = 0) -> Image.Image:
    """A square RGB image of uniform random pixels, the same for the same seed."""
    check_int("image_size", image_size, minimum=1)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(image_size, image_size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def image_inputs(preset: str | Preset, image_size: int, tiny: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """What the processor makes of one image (and its placeholder text): input_ids (1, n) and the pixel tensors."""
    preset = preset if isinstance(preset, Preset) else get_preset(preset)
    processor = build_processor(preset, tiny)
    placeholder = _IMAGE_PLACEHOLDER[preset.config(tiny).model_type]
    out = processor(text=[placeholder], images=[[random_image(image_size, seed)]], return_tensors="pt")
    return {key: value for key, value in out.items() if isinstance(value, torch.Tensor)}


def image_token_count(preset: str | Preset, image_size: int, tiny: bool = False) -> int:
    """How many image tokens the model's own processor puts in the prompt for one square image of that side."""
    preset = preset if isinstance(preset, Preset) else get_preset(preset)
    inputs = image_inputs(preset, image_size, tiny)
    return int((inputs["input_ids"] == preset.config(tiny).image_token_id).sum())


def _special_ids(config: PretrainedConfig) -> set[int]:
    """Every token id the config names (bos, eos, pad, image and vision markers), in it or its text config."""
    ids: set[int] = set()
    for part in (config, config.get_text_config()):
        for key, value in part.to_dict().items():
            if key.endswith(("_token_id", "_token_index")) and value is not None:
                ids.update(value if isinstance(value, list) else [value])
    return ids


def make_inputs(model: str | Preset, *, batch_size: int, prompt_tokens: int, image_size: int | None = None,
                tiny: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded inputs of one generate call: `batch_size` equal prompts of `prompt_tokens` tokens in all.

    For a VLM, each prompt holds one image of side `image_size` (default: the preset's), as many image tokens as
    its processor counts, after random text tokens that make up the length; text tokens avoid the special ids.
    """
    preset = model if isinstance(model, Preset) else get_preset(model)
    check_int("batch_size", batch_size)
    check_int("prompt_tokens", prompt_tokens)
    config = preset.config(tiny)
    generator = torch.Generator().manual_seed(seed)
    special = _special_ids(config)
    vocab = config.get_text_config().vocab_size
    allowed = torch.tensor([i for i in range(vocab) if i not in special])
    extra: dict[str, torch.Tensor] = {}
    image_ids = torch.empty(0, dtype=torch.long)
    if preset.is_vlm:
        image_size = preset.default_image_size(tiny) if image_size is None else image_size
        extra = image_inputs(preset, image_size, tiny, seed)
        image_ids = extra.pop("input_ids")[0]
        extra.pop("attention_mask", None)
        extra.pop("mm_token_type_ids", None)
        if image_ids.numel() >= prompt_tokens:
            raise ValueError(f"prompt_tokens={prompt_tokens} cannot hold the {image_ids.numel()} tokens "
                             f"{preset.name}'s processor makes of a {image_size} px image; give at least "
                             f"{image_ids.numel() + 1} or a smaller image_size.")
        extra = {key: torch.cat([value] * batch_size) for key, value in extra.items()}
    elif image_size is not None:
        raise ValueError(f"image_size={image_size} was given, but {preset.name} is a language model; leave it None.")
    text = allowed[torch.randint(len(allowed), (prompt_tokens - image_ids.numel(),), generator=generator)]
    input_ids = torch.cat([text, image_ids]).unsqueeze(0).repeat(batch_size, 1)  # (batch, prompt_tokens)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **extra}
