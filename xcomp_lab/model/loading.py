"""One loading path for the replica and for real weights: `AutoModel.from_pretrained(..., trust_remote_code=True)`.

`load_model()` checks every argument first, so a typo fails with a message instead of deep inside
transformers, then loads exactly as the model card says. With `model_name_or_path=None` it loads the
course's own checkpoint for `scale` (building it on first use). A local checkpoint's shards are checked before
loading (`xcomp_lab.model.manifest.verify_checkpoint`), so a damaged one fails with a message naming the shard.

A checkpoint of the original model's own remote code (`xcomp_lab.original.detect.uses_original_code`) loads as
that code needs, in its environment (transformers 4.33.2): `torch_dtype=` (not transformers 5's `dtype=`) and no
`attn_implementation`, which its constructor refuses (it has eager attention only: asking for another is refused
here with that said). This module imports the replica's code only where the replica is loaded, so it imports
under transformers 4.33.2 too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModel,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from xcomp_lab.core.dtypes import check_dtype
from xcomp_lab.model.bnb_cpu import apply_cpu_path
from xcomp_lab.model.manifest import verify_checkpoint
from xcomp_lab.original.detect import ORIGINAL_ATTENTION, uses_original_code

QUANTIZATIONS = ("none", "int8", "nf4", "fp4")


def check_attn_implementation(attn_implementation: str | None, original_code: bool = False) -> str | None:
    """None (the checkpoint's default, eager) or one of the kinds the checkpoint's code supports."""
    if original_code:
        if attn_implementation is not None and attn_implementation not in ORIGINAL_ATTENTION:
            raise ValueError(
                f"Unsupported attn_implementation {attn_implementation!r}: the original InternLM-XComposer2-VL-7B code "
                f"has eager attention only ({list(ORIGINAL_ATTENTION)}), and under transformers 4.33.2 its constructor "
                "refuses the argument; pass None or 'eager' (the replica has sdpa)."
            )
        return attn_implementation
    from xcomp_lab.model.modeling_internlm_xcomposer2 import SUPPORTED_ATTENTION

    if attn_implementation is not None and attn_implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"Unsupported attn_implementation {attn_implementation!r}; the replica supports "
            f"{list(SUPPORTED_ATTENTION)} (eager materialises the attention scores, sdpa uses PyTorch's fused kernel)."
        )
    return attn_implementation


def pretrained_keywords(model_name_or_path: str | os.PathLike | None, dtype: str | torch.dtype = "auto",
                        attn_implementation: str | None = None) -> dict[str, Any]:
    """The dtype and attention keywords of `from_pretrained` for this checkpoint's code, checked.

    The replica (transformers 5): `dtype=` and `attn_implementation=`. The original's code (transformers 4.33.2,
    `original.detect.uses_original_code`): `torch_dtype=` (as a torch dtype: 4.33.2 takes no names but "auto") and no
    `attn_implementation`, which its constructor refuses (eager, its only attention, is what it builds).
    """
    torch_dtype = check_dtype(dtype)
    original = uses_original_code(model_name_or_path)
    check_attn_implementation(attn_implementation, original)
    if original:
        return {"torch_dtype": torch_dtype or "auto"}
    keywords: dict[str, Any] = {"dtype": torch_dtype or "auto"}
    if attn_implementation is not None:
        keywords["attn_implementation"] = attn_implementation
    return keywords


def quantization_config(quantization: str, compute_dtype: torch.dtype = torch.float16) -> BitsAndBytesConfig | None:
    """A bitsandbytes config for "int8" (LLM.int8()), "nf4" or "fp4" (4-bit, double quantization), or None."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"Unknown quantization {quantization!r}; choose one of {list(QUANTIZATIONS)}.")
    if quantization == "none":
        return None
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def resolve_checkpoint(model_name_or_path: str | os.PathLike | None, scale: str = "tiny") -> str:
    """The directory (or hub id) to load: the course checkpoint for `scale` when none is given.

    A directory's shards are verified first: checkpoints the course builds against their manifest of checksums
    (hashed once, then trusted while each shard's size and timestamps stay the same); real checkpoints, which
    have no manifest, only against their own safetensors headers, which catches empty and truncated shards but
    not bytes changed inside the tensor data. A hub id is left to transformers to download and is not verified.
    """
    if model_name_or_path is None:
        from xcomp_lab.model.checkpoint import default_checkpoint
        from xcomp_lab.model.scales import check_scale

        directory = default_checkpoint(check_scale(scale))
        verify_checkpoint(directory)
        return str(directory)
    path = Path(model_name_or_path)
    looks_like_hub_id = not path.is_absolute() and len(path.parts) == 2 and not str(model_name_or_path).startswith(".")
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{os.fspath(path)!r} exists but has no config.json; point model_name_or_path at a checkpoint "
                "directory (xcomp_lab.model.checkpoint.build_checkpoint() makes one)."
            )
        verify_checkpoint(path)
        return os.fspath(path)
    if looks_like_hub_id:
        return os.fspath(model_name_or_path)
    raise FileNotFoundError(
        f"No checkpoint at {os.fspath(model_name_or_path)!r}; pass an existing directory, a hub id such as "
        "'internlm/internlm-xcomposer2-vl-7b', or None to use the course's synthetic checkpoint."
    )


def load_model(
    model_name_or_path: str | os.PathLike | None = None,
    *,
    scale: str = "tiny",
    dtype: str | torch.dtype = "auto",
    device_map: str | dict[str, Any] | None = None,
    quantization_config: BitsAndBytesConfig | None = None,
    attn_implementation: str | None = None,
    **kwargs: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model and tokenizer as the model card does, after checking every argument.

    `dtype="auto"` keeps the checkpoint's own dtype (transformers 5's default); pass "float32" to get the
    FP32 model older transformers gave by default. Both model and tokenizer run code from the checkpoint
    (`trust_remote_code=True`): for a hub id, pass `revision="<commit hash>"` to pin the code you read; it
    reaches the tokenizer too. A 4-bit model takes the bitsandbytes CPU path `XCOMP_LAB_BNB_CPU_PATH` names
    (default "portable", the same on every processor: see `xcomp_lab.model.bnb_cpu`). An original-code checkpoint
    is given `torch_dtype` and never `attn_implementation` (see the module docstring); its quantized recipes that
    work are `xcomp_lab.original.quantize`'s.
    """
    keywords = pretrained_keywords(model_name_or_path, dtype, attn_implementation)
    if quantization_config is not None and not isinstance(quantization_config, BitsAndBytesConfig):
        raise TypeError(
            f"quantization_config must be a transformers.BitsAndBytesConfig, got {type(quantization_config).__name__}; "
            "xcomp_lab.model.loading.quantization_config('int8' | 'nf4') builds one."
        )
    path = resolve_checkpoint(model_name_or_path, scale)
    options: dict[str, Any] = {"trust_remote_code": True, **keywords, **kwargs}
    if device_map is not None:
        options["device_map"] = device_map
    if quantization_config is not None:
        options["quantization_config"] = quantization_config
    model = AutoModel.from_pretrained(path, **options)
    if quantization_config is not None and quantization_config.load_in_4bit:
        apply_cpu_path(model)  # the same 4-bit CPU kernels on every processor (see bnb_cpu)
    pinned = {"revision": kwargs["revision"]} if "revision" in kwargs else {}
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True, **pinned)
    return model.eval(), tokenizer

