"""Synthetic checkpoints of the replica, laid out exactly as the released model's Hugging Face directory.

A checkpoint directory holds safetensors shards with their index, `config.json` with `auto_map`, the
configuration and modeling source files, and the tokenizer, so `AutoModel.from_pretrained(dir,
trust_remote_code=True)` and `AutoTokenizer.from_pretrained(dir)` load it as they load the real model.
Random weights are drawn tensor by tensor and written shard by shard: building the 35 GB FP32 model never
holds more than one shard in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from xcomp_lab.core.dtypes import check_dtype, dtype_name
from xcomp_lab.core.resources import package_file
from xcomp_lab.data.scenes import VOCABULARY
from xcomp_lab.model import configuration_internlm_xcomposer2, modeling_internlm_xcomposer2
from xcomp_lab.model.configuration_internlm_xcomposer2 import InternLMXcomposer2Config
from xcomp_lab.model.modeling_internlm_xcomposer2 import InternLMXComposer2ForCausalLM
from xcomp_lab.model.scales import check_scale, config_for_scale
from xcomp_lab.model.tokenizer import build_tokenizer

AUTO_MAP = {
    "AutoConfig": "configuration_internlm_xcomposer2.InternLMXcomposer2Config",
    "AutoModel": "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM",
    "AutoModelForCausalLM": "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM",
}
INDEX_NAME = "model.safetensors.index.json"
DONE_MARKER = ".xcomp-lab-complete"
DEFAULT_SHARD_BYTES = 2 * 1024**3
# FP16 weights of the trained tiny captioner (package data); tiny-captioner.json beside them says how they
# were made.
TRAINED_TINY = ("xcomp_lab.model", "trained")
TRAINED_WEIGHTS_NAME, TRAINED_RECIPE_NAME = "tiny-captioner.safetensors", "tiny-captioner.json"


def cache_root() -> Path:
    """Where built checkpoints are kept: $XCOMP_LAB_CACHE, else ~/.cache/xcomp-lab."""
    return Path(os.environ.get("XCOMP_LAB_CACHE", Path.home() / ".cache" / "xcomp-lab"))


def course_tokenizer() -> PreTrainedTokenizerBase:
    """The tokenizer every synthetic checkpoint ships, covering the caption vocabulary."""
    return build_tokenizer(extra_words=VOCABULARY)


def write_model_files(directory: Path, config: InternLMXcomposer2Config, tokenizer: PreTrainedTokenizerBase) -> None:
    """Write config.json (with auto_map), the two source files and the tokenizer into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    config.auto_map = AUTO_MAP
    config.architectures = [InternLMXComposer2ForCausalLM.__name__]
    config.save_pretrained(directory)
    for module in (configuration_internlm_xcomposer2, modeling_internlm_xcomposer2):
        shutil.copyfile(module.__file__, directory / Path(module.__file__).name)
    tokenizer.save_pretrained(directory)


def _init_tensor(name: str, shape: torch.Size, config: InternLMXcomposer2Config, seed: int, device: str) -> torch.Tensor:
    """Draw one tensor as the model's own init would, seeded by (seed, name) so shards are reproducible."""
    leaf = name.rsplit(".", 1)[-1]
    parent = name.rsplit(".", 2)[-2] if name.count(".") else ""
    if leaf == "bias":
        return torch.zeros(shape, device=device)
    if leaf == "weight" and ("norm" in parent or "layrnorm" in parent):
        return torch.ones(shape, device=device)
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=generator, device=device) * config.initializer_range


def _plan_shards(shapes: dict[str, torch.Size], bytes_per_value: int, shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for name, shape in shapes.items():
        size = shape.numel() * bytes_per_value
        if shards[-1] and used + size > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def checkpoint_dir(scale: str, dtype: str | torch.dtype, seed: int) -> Path:
    """The cache directory of the random checkpoint for (scale, dtype, seed), keyed by the scale's config.

    The key changes whenever the configuration or the modeling code changes, so a stale build is never reused.
    """
    key = _source_digest(config_for_scale(scale)).hexdigest()[:10]
    return cache_root() / "checkpoints" / f"random-{check_scale(scale)}-{dtype_name(check_dtype(dtype))}-seed{seed}-{key}"


def _source_digest(config: InternLMXcomposer2Config) -> Any:
    """A sha256 of the configuration and the modeling code, the two things a cached checkpoint must match."""
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    digest.update(Path(modeling_internlm_xcomposer2.__file__).read_bytes())
    return digest


def build_checkpoint(
    scale: str = "tiny",
    dtype: str | torch.dtype = "float16",
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    *,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Build (or reuse) a random-weight checkpoint of the replica and return its directory.

    `dtype` is the storage dtype (the released weights are FP16). `device` is where the random numbers
    are drawn: "cuda" is much faster for `full`, and gives other (equally random) values than "cpu".
    """
    torch_dtype = check_dtype(dtype)
    if torch_dtype is None:
        raise ValueError("A checkpoint needs a concrete storage dtype; 'auto' only makes sense when loading.")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r}; pass a non-negative integer.")
    if shard_bytes < 1024**2:
        raise ValueError(f"shard_bytes={shard_bytes} is below 1 MiB; shards that small only slow loading down.")
    directory = Path(out_dir) if out_dir is not None else checkpoint_dir(scale, torch_dtype, seed)
    if (directory / DONE_MARKER).exists() and not overwrite:
        return directory
    if directory.exists():
        shutil.rmtree(directory)

    config = config_for_scale(scale)
    config.dtype = dtype_name(torch_dtype)
    with torch.device("meta"):
        shapes = {name: tensor.shape for name, tensor in InternLMXComposer2ForCausalLM(config).state_dict().items()}
    write_model_files(directory, config, course_tokenizer())

    bytes_per_value = torch.empty((), dtype=torch_dtype).element_size()
    shards = _plan_shards(shapes, bytes_per_value, shard_bytes)
    total_bytes = sum(shape.numel() for shape in shapes.values()) * bytes_per_value
    weight_map: dict[str, str] = {}
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"writing {scale} checkpoint", disable=not progress)
    for index, names in enumerate(shards, start=1):
        filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            tensors[name] = _init_tensor(name, shapes[name], config, seed, device).to(torch_dtype).cpu()
            weight_map[name] = filename
        save_file(tensors, directory / filename, metadata={"format": "pt"})
        bar.update(sum(t.numel() for t in tensors.values()) * bytes_per_value)
        del tensors
    bar.close()
    index_file = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index_file, indent=2))
    (directory / DONE_MARKER).write_text(json.dumps({"scale": scale, "dtype": dtype_name(torch_dtype), "seed": seed}))
    return directory


def trained_tiny_checkpoint() -> Path:
    """The course's trained tiny captioner as a checkpoint directory, assembled once in the cache.

    Only its FP16 weights ship with the package (`xcomp_lab/model/trained/`, with the record of how they were
    trained beside them); the config, the source files and the tokenizer are written from this version
    of the package, keyed by a hash of the weights and the code, so they always match each other.
    """
    config = config_for_scale("tiny")
    config.dtype = "float16"
    digest = _source_digest(config)
    weights = package_file(*TRAINED_TINY, TRAINED_WEIGHTS_NAME).read_bytes()
    digest.update(weights)
    directory = cache_root() / "checkpoints" / f"trained-tiny-{digest.hexdigest()[:10]}"
    if (directory / DONE_MARKER).exists():
        return directory
    staging = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
    write_model_files(staging, config, course_tokenizer())
    (staging / "model.safetensors").write_bytes(weights)
    (staging / DONE_MARKER).write_text(package_file(*TRAINED_TINY, TRAINED_RECIPE_NAME).read_text())
    return move_into_place(staging, directory)


def move_into_place(staging: Path, directory: Path) -> Path:
    """Replace `directory` with the finished `staging` one, so a half-written checkpoint is never found."""
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(staging, directory)
    return directory


def default_checkpoint(scale: str) -> Path:
    """The checkpoint the course loads when no model_name_or_path is given.

    tiny: the trained captioner (its captions can be checked against the truth); full: released-style
    FP16 random weights of the real 7B-VL size, since the real weights cannot be shipped or trained here.
    """
    if check_scale(scale) == "tiny":
        return trained_tiny_checkpoint()
    return build_checkpoint(scale, "float16", seed=0)
