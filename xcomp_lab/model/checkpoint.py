"""Synthetic checkpoints of the replica, laid out exactly as the released model's Hugging Face directory.

A checkpoint directory holds safetensors shards with their index, `config.json` with `auto_map`, the
configuration and modeling source files, and the tokenizer, so `AutoModel.from_pretrained(dir,
trust_remote_code=True)` and `AutoTokenizer.from_pretrained(dir)` load it as they load the real model.
Random weights are drawn tensor by tensor and written shard by shard: building the 35 GB FP32 model never
holds more than one shard in memory.

Every write is safe against a second writer and never deletes what the course did not make: a checkpoint is
written into a staging folder beside its directory and renamed into place under a file lock (`.<name>.lock`
beside it; `filelock`'s flock-based lock, released by the OS if the process dies), so two kernels or test
workers asking for the same checkpoint share one build, and a half-written one is never found. A directory is
only ever replaced when it is absent, empty or a course checkpoint (it holds `DONE_MARKER`); each checkpoint
carries a manifest of shard checksums (`xcomp_lab.model.manifest`) that loading verifies.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import sys
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from xcomp_lab.core.dtypes import check_dtype, dtype_name
from xcomp_lab.core.resources import package_file
from xcomp_lab.data.scenes import VOCABULARY
from xcomp_lab.model import configuration_internlm_xcomposer2, modeling_internlm_xcomposer2
from xcomp_lab.model.configuration_internlm_xcomposer2 import InternLMXcomposer2Config
from xcomp_lab.model.manifest import has_manifest, write_manifest
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
    `out_dir` (default: the cache, see `checkpoint_dir`; returned absolute, symlinks resolved) must be absent,
    empty or a course checkpoint. A finished one built with the same scale, dtype and seed is reused;
    `overwrite=True` rebuilds it, replacing the whole folder. A non-empty folder that is not a course checkpoint
    is refused even with `overwrite=True`: the builder never deletes what it did not make.
    """
    torch_dtype = check_dtype(dtype)
    if torch_dtype is None:
        raise ValueError("A checkpoint needs a concrete storage dtype; 'auto' only makes sense when loading.")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r}; pass a non-negative integer.")
    if shard_bytes < 1024**2:
        raise ValueError(f"shard_bytes={shard_bytes} is below 1 MiB; shards that small only slow loading down.")
    wanted = {"scale": check_scale(scale), "dtype": dtype_name(torch_dtype), "seed": seed}
    in_cache = out_dir is None
    directory = checkpoint_dir(scale, torch_dtype, seed) if in_cache else Path(os.path.realpath(out_dir))
    if not overwrite and _is_checkpoint_of(directory, wanted):
        return directory
    if not in_cache:
        _check_replaceable(directory, wanted, replace=overwrite)
    with _lock(directory, announce=progress):
        if not overwrite and _is_checkpoint_of(directory, wanted):
            return directory
        if not in_cache:
            _check_replaceable(directory, wanted, replace=overwrite)
        call = ", ".join(
            [repr(wanted["scale"]), repr(wanted["dtype"]), f"seed={seed}"]
            + ([] if in_cache else [f"out_dir={os.fspath(directory)!r}"])
            + ([] if shard_bytes == DEFAULT_SHARD_BYTES else [f"shard_bytes={shard_bytes}"])
            + ([] if device == "cpu" else [f"device={device!r}"])
        )
        rebuild = f"Rebuild it: xcomp_lab.model.checkpoint.build_checkpoint({call}, overwrite=True)" + (
            f", or delete the folder {directory}; the next call that needs it builds it again." if in_cache else "."
        )
        with _staging(directory) as staging:
            _write_random_weights(staging, scale, torch_dtype, seed, shard_bytes, device, progress)
            write_manifest(staging, rebuild)
            (staging / DONE_MARKER).write_text(json.dumps({**wanted, "device": device, "shard_bytes": shard_bytes}))
            _swap_into_place(staging, directory)
    return directory


def _write_random_weights(
    directory: Path, scale: str, torch_dtype: torch.dtype, seed: int, shard_bytes: int, device: str, progress: bool
) -> None:
    """Write the model files, the random shards and their index into `directory`."""
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
    if _is_complete(directory):
        return directory
    with _lock(directory, announce=True):
        if _is_complete(directory):
            return directory
        with _staging(directory) as staging:
            write_model_files(staging, config, course_tokenizer())
            (staging / "model.safetensors").write_bytes(weights)
            (staging / DONE_MARKER).write_text(package_file(*TRAINED_TINY, TRAINED_RECIPE_NAME).read_text())
            write_manifest(
                staging,
                f"Delete the folder {directory}: the next trained_tiny_checkpoint() call (load_model() makes one for "
                "scale='tiny') assembles it again from the package's weights.",
            )
            _swap_into_place(staging, directory)
    return directory


def move_into_place(staging: Path, directory: Path) -> Path:
    """Publish the finished checkpoint in `staging` as `directory`, so a half-written checkpoint is never found.

    Writes the shard manifest, then, under the directory's lock, replaces `directory` if it is absent, empty or
    a course checkpoint. Any other folder is refused (FileExistsError) and left as it was, and `staging` is kept
    for the caller to move; after any other failure `staging` is removed.
    """
    try:
        write_manifest(staging, f"Write it again with the command that made it (its {DONE_MARKER} records how).")
        with _lock(directory, announce=True):
            _check_replaceable(directory, None, replace=True)
            _swap_into_place(staging, directory)
    except FileExistsError as error:
        raise FileExistsError(f"{error} The finished checkpoint is kept at {staging}; move it yourself.") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _read_marker(directory: Path) -> dict[str, Any] | None:
    """The record in `directory`'s DONE_MARKER ({} if it is not JSON), or None without one."""
    try:
        record = json.loads((directory / DONE_MARKER).read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def _is_complete(directory: Path) -> bool:
    """A finished checkpoint of this version: marked complete and carrying its shard manifest."""
    return (directory / DONE_MARKER).is_file() and has_manifest(directory)


def _is_checkpoint_of(directory: Path, wanted: dict[str, Any]) -> bool:
    record = _read_marker(directory)
    return record is not None and has_manifest(directory) and {key: record.get(key) for key in wanted} == wanted


def _check_replaceable(directory: Path, wanted: dict[str, Any] | None, *, replace: bool) -> None:
    """Raise FileExistsError unless `directory` is absent, empty, or a course checkpoint that may be replaced.

    `wanted` (scale, dtype, seed) is the checkpoint asked for, None when any course checkpoint may be replaced.
    """
    if not os.path.lexists(directory):
        return
    if not directory.is_dir():
        raise FileExistsError(f"{directory} is a file, not a folder; pass a new or empty folder for the checkpoint.")
    cwd = Path.cwd().resolve()
    if directory.resolve() == cwd or directory.resolve() in cwd.parents:
        raise FileExistsError(
            f"{directory} is the current working directory or contains it; a checkpoint is put in place by renaming "
            "a finished folder over its directory, which would replace the folder you are working in. Pass a new "
            f"folder inside it instead, e.g. {os.fspath(directory / 'checkpoint')!r}."
        )
    contents = sorted(entry.name for entry in directory.iterdir())
    if not contents:
        return
    shown = ", ".join(contents[:5]) + (f" and {len(contents) - 5} more" if len(contents) > 5 else "")
    record = _read_marker(directory)
    if record is None:
        raise FileExistsError(
            f"{directory} is not empty and is not a course checkpoint (it has no {DONE_MARKER}); it holds {shown}. "
            "xcomp_lab never deletes a folder it did not make, not even with overwrite=True: choose a new or empty "
            "folder, or delete this one yourself if nothing in it is needed."
        )
    if not replace:
        built = {key: record[key] for key in ("scale", "dtype", "seed") if key in record}
        made = f"built with {built}" if built else "that build_checkpoint did not make (a trained one?)"
        stale = "" if has_manifest(directory) else ", without a shard manifest (an older xcomp_lab wrote it)"
        raise FileExistsError(
            f"{directory} holds a course checkpoint {made}{stale}, not the one asked for ({wanted}). "
            "Pass overwrite=True to replace the whole folder with a new build, or choose another out_dir."
        )


@contextmanager
def _lock(directory: Path, *, announce: bool) -> Iterator[None]:
    """Hold the lock beside `directory` that every writer of it takes; say so when another process holds it.

    filelock's FileLock is flock(2) on Unix: exclusive between processes, released by the OS when its holder
    dies, and the lock file stays in place on release so every waiter locks the same inode.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(directory.with_name(f".{directory.name}.lock"))
    try:
        lock.acquire(blocking=False)
    except Timeout:
        if announce:
            print(f"Waiting for another process that is writing {directory} ...", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextmanager
def _staging(directory: Path) -> Iterator[Path]:
    """A new folder beside `directory` to write the checkpoint into; removed afterwards unless it was moved."""
    staging = directory.with_name(f"{directory.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    staging.mkdir()
    try:
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _swap_into_place(staging: Path, directory: Path) -> None:
    """Rename `staging` to `directory`, first renaming aside what is there (removed once the swap is done).

    Both renames are atomic, so a reader finds the old checkpoint, none or the new one, never a half-written one;
    files a reader already opened stay readable after the old folder is removed.
    """
    if not os.path.lexists(directory):
        os.replace(staging, directory)
        return
    retired = directory.with_name(f"{directory.name}.replaced-{os.getpid()}-{secrets.token_hex(4)}")
    os.replace(directory, retired)
    try:
        os.replace(staging, directory)
    except BaseException:
        os.replace(retired, directory)
        raise
    shutil.rmtree(retired)


def default_checkpoint(scale: str) -> Path:
    """The checkpoint the course loads when no model_name_or_path is given.

    tiny: the trained captioner (its captions can be checked against the truth); full: released-style
    FP16 random weights of the real 7B-VL size, since the real weights cannot be shipped or trained here.
    """
    if check_scale(scale) == "tiny":
        return trained_tiny_checkpoint()
    return build_checkpoint(scale, "float16", seed=0)
