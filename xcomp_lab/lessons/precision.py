"""What a change of precision costs and changes: the memory of a load or a cast, and the drift from FP32.

`measure_load()` and `measure_cast()` report the model's resident weights before and after, and on CUDA the
allocator's peak during the load or cast itself. On CPU there is no honest peak to give: the tensor
accounting of `xcomp_lab.memory` is a TorchDispatchMode, which sees only the thread it was entered in, and
transformers 5 makes the loaded tensors in a pool of worker threads (`core_model_loading.GLOBAL_WORKERS`), so
`peak_bytes` is None there and only resident bytes are reported. The host-RAM peak of a load on any device is
`xcomp_lab.lessons.host_memory`'s.

`stored_dtypes()` reads which dtypes a checkpoint stores from its safetensors headers. Where the course
parameters load random weights (`CourseParams.random_weights`), caption and top-1 figures are noise.

`fp32_reference()` captions a held-out subset and keeps the prefill logits of a few prompts once;
`drift_from()` then scores any other model against it (captions vs the truth and vs FP32, logit stats), and
`run_precision_step()` adds one measured captioning call whose results record carries both.

A model of the original's own code is captioned and scored through its own `chat()` prompt and `model.chat`
(`xcomp_lab.run.captioning`), on a CPU with its 16-bit products computed in FP32 (`original.matmul.products_for`);
`file_chat_line()` says whether the quick start's call, the image given as a file, runs under a step's settings.
"""

from __future__ import annotations

import gc
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any, Callable, Sequence, TypeVar

import torch

from xcomp_lab.core.checks import IMAGE_SIZE, check_int
from xcomp_lab.core.units import fmt_bytes
from xcomp_lab.course.params import CourseParams
from xcomp_lab.course.steps import Step, run_step
from xcomp_lab.data import scenes
from xcomp_lab.data.quality import QualityReport, quality_report
from xcomp_lab.memory.budget import Budget, resolve_device
from xcomp_lab.memory.footprint import resident_bytes
from xcomp_lab.memory.measure import CUDA_KIND, MemoryResult, measure
from xcomp_lab.run.call import CaptionRun
from xcomp_lab.original.detect import is_original_model
from xcomp_lab.original.matmul import products_for
from xcomp_lab.run.captioning import caption_images, reference_logits, vision_size
from xcomp_lab.run.speed import Speed

T = TypeVar("T")
RESIDENT_KIND = "cpu-resident"  # CPU: resident bytes of the model before and after, no peak


@dataclass(frozen=True)
class WeightsChange:
    """The model's resident weights before and after a load or a cast, and the peak in between where known."""

    label: str
    device: str
    kind: str  # "cuda-allocator" (peak measured) or "cpu-resident" (no peak: see the module docstring)
    before_bytes: int  # the model's parameters and buffers on the device before (0 for a load)
    after_bytes: int  # the same after
    peak_bytes: int | None  # CUDA: the allocator's peak during the block, absolute; None on CPU
    start_bytes: int  # CUDA: allocated at entry; CPU: before_bytes
    seconds: float
    memory: MemoryResult | None  # CUDA: the full measurement; None on CPU

    @property
    def peak_or_lower_bound(self) -> int:
        """The measured peak; on CPU the larger of before and after, which the peak is at least."""
        return self.peak_bytes if self.peak_bytes is not None else max(self.before_bytes, self.after_bytes)

    def __str__(self) -> str:
        peak = (f"peak {fmt_bytes(self.peak_bytes)} (allocator)" if self.peak_bytes is not None
                else "peak not visible to CPU accounting")
        return (f"{self.label}: resident {fmt_bytes(self.before_bytes)} -> {fmt_bytes(self.after_bytes)} | {peak}")


def _measured(fn: Callable[[], T], device: str, label: str, model_before: torch.nn.Module | None,
              model_of: Callable[[T], torch.nn.Module]) -> tuple[T, WeightsChange]:
    device = resolve_device(device)
    before = resident_bytes(model_before, device)
    if device == "cpu":
        start = perf_counter()
        value = fn()
        seconds = perf_counter() - start
        after = resident_bytes(model_of(value), device)
        return value, WeightsChange(label, device, RESIDENT_KIND, before, after, None, before, seconds, None)
    holder: list[T] = []
    with measure(device, label=label) as m:
        holder.append(fn())
    value = holder.pop()
    memory = m.result
    after = resident_bytes(model_of(value), device)
    return value, WeightsChange(label, memory.device, CUDA_KIND, before, after, memory.peak_bytes,
                                memory.start_bytes, memory.wall_s, memory)


def measure_load(load: Callable[[], T], device: str, *, label: str = "load",
                 model_of: Callable[[T], torch.nn.Module] = lambda value: value[0]) -> tuple[T, WeightsChange]:
    """Call `load()` (returning e.g. `(model, tokenizer)`) and report the weights it leaves on `device`.

    On CUDA the allocator's peak during the load is measured; free the previous model first, or it counts.
    """
    if not callable(load):
        raise ValueError(f"load must be a callable taking no arguments, got {type(load).__name__}: "
                         "wrap the call, e.g. measure_load(lambda: load_for_step(step, params), params.device)")
    return _measured(load, device, label, None, model_of)


def measure_cast(model: torch.nn.Module, dtype: torch.dtype, device: str, *,
                 label: str = "cast") -> tuple[torch.nn.Module, WeightsChange]:
    """Cast `model` in place with `model.to(dtype)` (what `.half()` does) and report its weights before and after."""
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype such as torch.float16, got {dtype!r}")
    return _measured(lambda: model.to(dtype), device, label, model, lambda m: m)


def free(device: str) -> None:
    """Collect garbage and, on CUDA, return cached blocks: call after `del model` before the next load."""
    gc.collect()
    if resolve_device(device) != "cpu":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def stored_dtypes(checkpoint: str | Path) -> dict[str, int]:
    """Bytes of tensor data per stored dtype ("F16", "F32", "BF16", ...) in a local checkpoint's safetensors files.

    Read from each file's header (8 bytes of length, then JSON), without loading a tensor; empty for a hub id.
    """
    folder = Path(checkpoint)
    if not folder.is_dir():
        return {}  # a hub id: nothing downloaded to read
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{str(checkpoint)!r} has no .safetensors files; pass a checkpoint directory, e.g. "
                         f"xcomp_lab.model.loading.resolve_checkpoint(None, 'tiny').")
    stored: dict[str, int] = {}
    for file in files:
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                begin, end = entry["data_offsets"]
                stored[entry["dtype"]] = stored.get(entry["dtype"], 0) + end - begin
    return stored


def hub_cached_dtypes(repo_id: str, cache_dir: str | Path | None = None) -> dict[str, int]:
    """`stored_dtypes` of `repo_id`'s snapshot in the Hugging Face hub cache (`cache_dir`, default `HF_HUB_CACHE`),
    empty where it is not cached: e.g. the CLIP tower the original's constructor loads before the checkpoint's own
    weights."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir)
    if not isinstance(config, str):
        return {}
    folder = Path(config).parent
    return stored_dtypes(folder) if any(folder.glob("*.safetensors")) else {}


@dataclass(frozen=True)
class Reference:
    """A model's captions of a held-out subset and its prefill logits on the first few, to compare others with."""

    images: list[Any]
    truths: list[str]
    captions: list[str]
    logits: torch.Tensor  # (n_logits, T, vocab), FP32 on the CPU
    max_new_tokens: int
    image_size: int | None


def fp32_reference(model: Any, tokenizer: Any, *, n: int = 16, n_logits: int = 4, max_new_tokens: int = 16,
                   image_size: int | None = None) -> Reference:
    """Caption the first `n` held-out scenes and keep the prefill logits of the first `n_logits` prompts."""
    for name, value in (("n", n), ("n_logits", n_logits), ("max_new_tokens", max_new_tokens)):
        check_int(name, value)
    if n_logits > n:
        raise ValueError(f"n_logits={n_logits} is more than n={n}; compare logits on at most the captioned images.")
    size = vision_size(model) if image_size is None else IMAGE_SIZE.check("image_size", image_size)
    data = scenes.held_out_dataset(n, image_size=size)
    images = [image for image, _ in data]
    with products_for(model):
        captions = caption_images(model, tokenizer, images, max_new_tokens=max_new_tokens, image_size=size)
        logits = reference_logits(model, tokenizer, images[:n_logits], image_size=size)
    return Reference(images, [text for _, text in data], captions, logits, max_new_tokens, size)


@dataclass(frozen=True)
class Drift:
    """A model's captions of the reference's images and their scores against the truth and the reference."""

    captions: list[str]
    report: QualityReport


def drift_from(reference: Reference, model: Any, tokenizer: Any) -> Drift:
    """Captions of `model` against the truth and against the reference's, and its logits against the reference's."""
    n_logits = reference.logits.shape[0]
    with products_for(model):
        captions = caption_images(model, tokenizer, reference.images, max_new_tokens=reference.max_new_tokens,
                                  image_size=reference.image_size)
        logits = reference_logits(model, tokenizer, reference.images[:n_logits], image_size=reference.image_size)
    return Drift(captions, quality_report(captions, reference.truths, reference.captions, logits, reference.logits))


def drift_line(report: QualityReport, *, noise: bool = False) -> str:
    """One line: captions against the truth and the reference, logits against the reference's.

    `noise=True` (random weights, see `CourseParams.random_weights`) marks the caption and top-1 figures as noise.
    """
    stats = report.logit_stats or {}
    agree = ("" if report.agreement_with_reference is None
             else f" | same caption as FP32 {report.agreement_with_reference:.0%}")
    logits = ("" if not stats else
              f" | logits vs FP32: max |diff| {stats['max_abs_diff']:.3g}, mean |diff| {stats['mean_abs_diff']:.2g}, "
              f"top-1 agreement {stats['top1_agreement']:.1%}")
    label = " | random weights: the caption and top-1 figures are noise" if noise else ""
    return f"exact match {report.exact_match:.0%} of {report.n}{agree}{logits}{label}"


@dataclass(frozen=True)
class PrecisionRun:
    """One precision step measured: how it loaded, one captioning call, and its drift from FP32."""

    name: str
    load: WeightsChange  # the load, or for a cast after loading, the cast
    run: CaptionRun
    drift: Drift
    record: dict[str, Any]


def load_extra(load: WeightsChange, load_peak_bytes: int | None = None) -> dict[str, Any]:
    """The load figures a results record keeps in `extra`; `load_peak_bytes` overrides the peak of `load`."""
    return {"load_kind": load.kind, "load_before_bytes": load.before_bytes, "load_after_bytes": load.after_bytes,
            "load_peak_bytes": load.peak_bytes if load_peak_bytes is None else load_peak_bytes}


def run_precision_step(step: Step, model: Any, tokenizer: Any, images: Sequence[Any], params: CourseParams,
                       budget: Budget | None, reference: Reference, load: WeightsChange,
                       load_peak_bytes: int | None = None, speed: Speed | None = None) -> PrecisionRun:
    """Score `model` against the FP32 `reference`, then caption `images` as `step` says, measured.

    The results record carries the drift (`exact_match`, `agreement_with_reference`, logit stats) and the
    load figures in `extra`; `load_peak_bytes` overrides the peak of `load` (e.g. the larger of an FP32
    load and the cast after it). With `speed` (timed outside the measurement, see `xcomp_lab.run.speed`), the
    record's `tokens_per_s` is that speed instead of the measured call's, which the CPU accounting slows.
    """
    drift = drift_from(reference, model, tokenizer)
    extra = {**drift.report.as_dict(), **load_extra(load, load_peak_bytes)}
    run, record_ = run_step(step, model, tokenizer, images, params, budget, extra=extra)
    if speed is not None:
        record_ = with_speed(record_, speed)
    return PrecisionRun(step.name, load, run, drift, record_)


def with_speed(record_: dict[str, Any], speed: Speed) -> dict[str, Any]:
    """A copy of a results record whose `tokens_per_s` is `speed`'s, timed outside any memory measurement."""
    return {**record_, "tokens_per_s": speed.tokens_per_s,
            "extra": {**record_.get("extra", {}), "tokens_per_s_timed_outside_measurement": True}}


def file_chat_line(step: Step, model: Any, tokenizer: Any, image: Any, device: str) -> str:
    """Whether the original's `model.chat`, given the image as a file as its quick start does, runs under `step`'s
    gradient mode and autocast (one new token), and if not, the error as raised and how the step gives the image."""
    import tempfile

    from xcomp_lab.lessons.quantization import failure_line
    from xcomp_lab.original.steps import QUERY, original_step_for
    from xcomp_lab.run.modes import autocast, grad_mode

    if not is_original_model(model):
        raise ValueError(f"{type(model).__name__} is not a model of the original's own code: the replica's chat() takes "
                         "a PIL image in any dtype.")
    how = original_step_for(step).image
    given = "as a file" if how == "file" else f"preprocessed, in {model.vit.dtype}"
    settings = f"{step.grad}, {'autocast' if step.use_autocast else 'no autocast'}, weights in {model.dtype}"
    with tempfile.TemporaryDirectory(prefix="xcomp-lab-file-chat-") as folder:
        path = Path(folder) / "image.png"
        image.save(path)
        try:
            with products_for(model), grad_mode(step.grad), autocast(device, step.use_autocast):
                model.chat(tokenizer, QUERY, image=str(path), history=[], do_sample=False, max_new_tokens=1)
        except (RuntimeError, TypeError) as error:
            return (f"the quick start's call, chat(image=<file>) ({settings}), fails: {failure_line(error)}; this "
                    f"step gives chat() the image {given}")
    return f"the quick start's call, chat(image=<file>) ({settings}), runs; this step gives chat() the image {given}"
