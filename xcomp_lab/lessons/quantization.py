"""Notebook 06: what bitsandbytes INT8 (LLM.int8()) and NF4 save and cost, measured step by step.

The notebook imports five of these; each returns an object that prints its own lines:

- `take_reference()` loads the FP32 model once, keeps its captions and prefill logits of a held-out subset as
  the reference every other model is scored against, then frees it.
- `load_step()` loads a course step (`"fp16"`, `"int8"`, `"nf4"`) and returns its `Footprint`: the bytes as
  stored (bitsandbytes' statistics included, which are not parameters), by part and by module class, and for an
  unquantized model the footprint each quantization is predicted to leave (`predicted_footprint()`).
- `caption_step()` times the model outside any memory measurement, scores it against the reference and makes
  the step's measured caption, appending its results record.
- `plora_check()` runs the same prompt with and without `im_mask` (PLoRA on at image tokens, or off) and says
  where the logits first differ; for an INT8 model it repeats this without LLM.int8()'s outlier decomposition
  (threshold 0) and counts the outlier columns that rows at and after the image add to the text rows before it.
  LLM.int8() picks its outlier columns over every row it multiplies at once, so image tokens can change how
  text positions are quantized: that, not PLoRA, is what changes the text before the image.
- `quantized_kernels()` looks at the decoder's largest quantized linear: what one call makes in memory, which
  CPU kernel runs, and how long the product takes against dequantizing the weight and a 16-bit product.
"""

from __future__ import annotations

import contextlib
import gc
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from xcomp_lab.core.checks import check_choice, check_int
from xcomp_lab.core.units import fmt_bytes
from xcomp_lab.course.charts import (
    format_breakdown,
    weight_breakdown,
    weight_breakdown_chart,
)
from xcomp_lab.course.notebook import record
from xcomp_lab.course.params import CourseParams
from xcomp_lab.course.steps import STEPS, course_budget, get_step, load_for_step
from xcomp_lab.data.quality import QualityReport, quality_report
from xcomp_lab.memory import Budget, measure
from xcomp_lab.memory.budget import resolve_device
from xcomp_lab.memory.footprint import (
    module_bytes,
    quantized_linear_bytes,
    statistics,
    statistics_bytes,
)
from xcomp_lab.model.bnb_cpu import (
    apply_cpu_path,
    cpu_has_avx512bf16,
    packed_format_accepts,
)
from xcomp_lab.run.call import CaptionRun
from xcomp_lab.run.captioning import prompt_batch

if TYPE_CHECKING:  # the replica's precision lesson and speed imports load its code: only where they are used
    from xcomp_lab.lessons.precision import Reference, WeightsChange
    from xcomp_lab.run.speed import Speed

QUANTIZED_CLASSES = ("Linear8bitLt", "Linear4bit")
STEP_NAMES = ("fp16", "int8", "nf4")  # the steps notebook 06 compares; FP32 is the reference


def is_quantized(module: torch.nn.Module) -> bool:
    """True for bitsandbytes' 8-bit and 4-bit linears (checked by name: bitsandbytes need not be importable)."""
    return type(module).__name__ in QUANTIZED_CLASSES


def _free(device: str) -> None:
    gc.collect()
    if device != "cpu":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------- the FP32 reference

@dataclass(frozen=True)
class Baseline:
    """The FP32 model's captions and logits of a held-out subset, its weights, and the budget in force."""

    reference: Reference
    fp32_weights_bytes: int
    budget: Budget
    random_weights: bool  # full scale without real weights: every quality figure is noise

    def __str__(self) -> str:
        score = quality_report(self.reference.captions, self.reference.truths).exact_match
        noise = " (random weights: noise)" if self.random_weights else ""
        return (f"FP32 weights {fmt_bytes(self.fp32_weights_bytes)} | captions: exact match {score:.0%} of "
                f"{len(self.reference.captions)} held-out scenes{noise}")


def take_reference(params: CourseParams, *, n: int = 4, n_logits: int = 2) -> Baseline:
    """Load the FP32 model, caption `n` held-out scenes and keep the prefill logits of `n_logits`, then free it."""
    from xcomp_lab.lessons.precision import fp32_reference, measure_load

    (model, tokenizer), load = measure_load(lambda: load_for_step(STEPS["fp32-no-autocast"], params), params.device,
                                            label="dtype=torch.float32 at load")
    budget = course_budget(params, model.config)
    reference = fp32_reference(model, tokenizer, n=n, n_logits=n_logits, max_new_tokens=params.max_new_tokens,
                               image_size=params.image_size)
    del model, tokenizer
    _free(params.device)
    return Baseline(reference, load.after_bytes, budget, params.random_weights)


# ------------------------------------------------------------------------------------------------ the footprint

@dataclass(frozen=True)
class ModuleKind:
    """All modules of one class that hold tensors themselves (not through children)."""

    kind: str  # class name, e.g. "Linear4bit"
    count: int
    storage: str  # dtypes of their own parameters and buffers, e.g. "uint8 + float16"
    nbytes: int  # their parameters and buffers plus bitsandbytes statistics
    quantized: bool
    example: str  # the first module's name


def module_precisions(model: torch.nn.Module) -> list[ModuleKind]:
    """Modules holding tensors, grouped by class, quantized classes first, then by bytes (largest first)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"module_precisions needs a torch.nn.Module, got {type(model).__name__}")
    groups: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if not own:
            continue
        kind = type(module).__name__
        group = groups.setdefault(kind, {"count": 0, "dtypes": [], "nbytes": 0, "example": name or "(model)",
                                         "quantized": is_quantized(module)})
        group["count"] += 1
        group["nbytes"] += module_bytes(module)
        for tensor in own:
            dtype = str(tensor.dtype).removeprefix("torch.")
            if dtype not in group["dtypes"]:
                group["dtypes"].append(dtype)
    rows = [ModuleKind(kind, g["count"], " + ".join(g["dtypes"]), g["nbytes"], g["quantized"], g["example"])
            for kind, g in groups.items()]
    return sorted(rows, key=lambda r: (not r.quantized, -r.nbytes))


def format_module_precisions(rows: list[ModuleKind], fmt_bytes: Callable[[float], str]) -> str:
    """A table: class, count, storage dtypes, bytes, quantized or not, one example name."""
    if not rows:
        raise ValueError("rows is empty: pass module_precisions(model)")
    kind_width = max(len("module class"), *(len(r.kind) for r in rows))
    storage_width = max(len("storage"), *(len(r.storage) for r in rows))
    lines = [f"{'module class':<{kind_width}}  {'count':>5}  {'storage':<{storage_width}}  {'bytes':>10}  "
             f"{'quantized':<9}  example"]
    for r in rows:
        lines.append(f"{r.kind:<{kind_width}}  {r.count:>5}  {r.storage:<{storage_width}}  {fmt_bytes(r.nbytes):>10}  "
                     f"{'yes' if r.quantized else 'no':<9}  {r.example}")
    return "\n".join(lines)


def predicted_footprint(model: torch.nn.Module, quantization: str) -> int:
    """Bytes the model would keep quantized by bitsandbytes, predicted from the unquantized model.

    Every `nn.Linear` except the output head becomes 1 byte (int8) or half a byte (nf4) per weight plus its
    statistics (`memory.footprint.quantized_linear_bytes`); biases and every other parameter or buffer keep
    their size.
    """
    check_choice("quantization", quantization, ("int8", "nf4"))
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"predicted_footprint needs a torch.nn.Module, got {type(model).__name__}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    total = 0
    for module in model.modules():
        if is_quantized(module):
            raise ValueError("the model is already quantized: predict from the FP16 (or FP32) model")
        if type(module) is not torch.nn.Linear or module is head:
            total += module_bytes(module)
            continue
        total += sum(quantized_linear_bytes(module.out_features, module.in_features, quantization))
        if module.bias is not None:
            total += module.bias.numel() * module.bias.element_size()
    return total


@dataclass(frozen=True)
class Footprint:
    """A loaded model's bytes as stored: parameters and buffers, plus bitsandbytes' statistics beside them."""

    step: str
    load: WeightsChange  # how the load was measured (CUDA: the allocator's peak; CPU: resident bytes only)
    resident_bytes: int  # parameters and buffers on the device: what summing them gives
    statistics_bytes: int  # bitsandbytes' scales and code tables, which are not parameters
    transformers_bytes: int  # model.get_memory_footprint(): parameters and buffers as transformers counts them
    parts: list[tuple[str, int, int]]  # (part, parameter count, bytes) from course.charts.weight_breakdown
    modules: list[ModuleKind]
    predicted: dict[str, int] = field(default_factory=dict)  # unquantized only: bytes predicted for int8 and nf4

    @property
    def total_bytes(self) -> int:
        return self.resident_bytes + self.statistics_bytes

    def part_bytes(self, part: str) -> int:
        """Bytes of one row of the breakdown, e.g. "decoder (without PLoRA)"."""
        for name, _, nbytes in self.parts:
            if name == part:
                return nbytes
        raise ValueError(f"part={part!r}; the breakdown has {[name for name, _, _ in self.parts]}")

    def part_params(self, part: str) -> int:
        """Parameters of one row of the breakdown."""
        for name, count, _ in self.parts:
            if name == part:
                return count
        raise ValueError(f"part={part!r}; the breakdown has {[name for name, _, _ in self.parts]}")

    def table(self) -> str:
        """The breakdown by part, then the stored weights and the statistics beside them."""
        return (f"{format_breakdown(self.parts)}\nstored weights {fmt_bytes(self.resident_bytes)} + statistics "
                f"{fmt_bytes(self.statistics_bytes)} = {fmt_bytes(self.total_bytes)}")

    def module_table(self) -> str:
        """The modules holding tensors, by class: which were quantized and which stayed 16-bit."""
        return format_module_precisions(self.modules, fmt_bytes)

    def chart(self, title: str) -> Figure:
        """The breakdown as a bar chart."""
        return weight_breakdown_chart(self.parts, title=title)


def load_step(name: str, params: CourseParams) -> tuple[Any, Any, Footprint]:
    """Load course step `name` ("fp16", "int8" or "nf4") and return (model, tokenizer, its footprint)."""
    from xcomp_lab.lessons.precision import measure_load

    check_choice("name", name, STEP_NAMES, hint="notebook 06 compares these steps")
    step = get_step(name)
    (model, tokenizer), load = measure_load(lambda: load_for_step(step, params), params.device, label=step.title)
    quantized = any(is_quantized(m) for m in model.modules())
    predicted = {} if quantized else {q: predicted_footprint(model, q) for q in ("int8", "nf4")}
    footprint = Footprint(name, load, load.after_bytes, statistics_bytes(model), int(model.get_memory_footprint()),
                          weight_breakdown(model), module_precisions(model), predicted)
    return model, tokenizer, footprint


# --------------------------------------------------------------------------------------------- a measured caption

@dataclass(frozen=True)
class StepRun:
    """One step's speed (timed outside any memory measurement), its drift from FP32 and its measured caption."""

    name: str
    weights_bytes: int  # the footprint, statistics included
    speed: Speed
    drift: QualityReport
    run: CaptionRun
    record: dict[str, Any]

    @property
    def peak_bytes(self) -> int:
        return self.run.memory.peak_bytes

    def __str__(self) -> str:
        from xcomp_lab.lessons.precision import drift_line

        return drift_line(self.drift)


def caption_step(name: str, model: Any, tokenizer: Any, images: Sequence[Any], params: CourseParams,
                 baseline: Baseline, footprint: Footprint) -> StepRun:
    """Time `model`, score it against the FP32 reference, then caption `images` measured; the record is appended.

    Speed comes first and outside the measurement: its CPU accounting slows every operation. Every model makes
    exactly `params.max_new_tokens` tokens per image for the timing (end of turn ignored), the same work.
    """
    from xcomp_lab.lessons.precision import run_precision_step
    from xcomp_lab.run.speed import generation_speed

    check_choice("name", name, STEP_NAMES, hint="notebook 06 compares these steps")
    if footprint.step != name:
        raise ValueError(f"footprint is of step {footprint.step!r}, not {name!r}: pass load_step({name!r}, ...)'s")
    speed = generation_speed(model, tokenizer, images, device=params.device, new_tokens=params.max_new_tokens,
                             image_size=params.image_size, repeats=1)
    run = run_precision_step(get_step(name), model, tokenizer, images, params, baseline.budget, baseline.reference,
                             footprint.load, speed=speed)
    record(params, run.record)
    return StepRun(name, footprint.total_bytes, speed, run.drift.report, run.run, run.record)


# ------------------------------------------------------------------------------------------------- PLoRA checks

@dataclass(frozen=True)
class PLoRAEffect:
    """Where the logits with `im_mask` first differ from those without it, in the first prompt of the batch."""

    first_image_position: int
    image_tokens: int
    first_difference: int | None  # None: the two runs agree everywhere (PLoRA did nothing)
    max_diff_before_image: float
    min_diff_from_image_on: float  # the smallest per-position max |diff| from the first image token on
    positions: int

    @property
    def acts_only_from_image_on(self) -> bool:
        return self.first_difference == self.first_image_position and self.max_diff_before_image == 0.0

    def __str__(self) -> str:
        first = "nowhere" if self.first_difference is None else f"at position {self.first_difference}"
        return (f"logits with vs without im_mask first differ {first} (first image token {self.first_image_position}"
                f") | largest difference before it {self.max_diff_before_image:.3g}, smallest from it on "
                f"{self.min_diff_from_image_on:.3g}")


def _check_prompt(inputs_embeds: torch.Tensor, im_mask: torch.Tensor) -> int:
    """The first image position of the first prompt, after checking the mask."""
    if im_mask.dtype != torch.bool or im_mask.shape != inputs_embeds.shape[:2]:
        raise ValueError(f"im_mask must be a bool tensor of shape {tuple(inputs_embeds.shape[:2])} (batch, tokens), "
                         f"got {im_mask.dtype} {tuple(im_mask.shape)}: use captioning.prompt_batch")
    image_positions = im_mask[0].nonzero().flatten()
    if image_positions.numel() == 0:
        raise ValueError("the first prompt has no image token: PLoRA acts only at image positions")
    return int(image_positions[0])


@torch.inference_mode()
def plora_effect(model: Any, inputs_embeds: torch.Tensor, im_mask: torch.Tensor) -> PLoRAEffect:
    """Prefill logits of the same prompt with `im_mask` (PLoRA on at image tokens) and with None (PLoRA off).

    In a model that computes each position on its own, positions before the first image token see only text in
    both runs, so a working PLoRA leaves them unchanged; from the first image token on the low-rank branch adds
    to every projection.
    """
    first = _check_prompt(inputs_embeds, im_mask)
    with_mask = model(inputs_embeds=inputs_embeds[:1], im_mask=im_mask[:1], use_cache=False).logits[0]  # (T, V)
    without = model(inputs_embeds=inputs_embeds[:1], im_mask=None, use_cache=False).logits[0]  # (T, V)
    per_position = (with_mask.float() - without.float()).abs().amax(dim=-1).cpu()  # (T,)
    differing = per_position.nonzero().flatten()
    return PLoRAEffect(
        first_image_position=first,
        image_tokens=int(im_mask[0].sum()),
        first_difference=int(differing[0]) if differing.numel() else None,
        max_diff_before_image=float(per_position[:first].max()) if first > 0 else 0.0,
        min_diff_from_image_on=float(per_position[first:].min()),
        positions=int(per_position.numel()),
    )


def int8_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's bitsandbytes `Linear8bitLt` layers (empty for other models)."""
    return [m for m in model.modules() if type(m).__name__ == "Linear8bitLt"]


@contextlib.contextmanager
def int8_threshold(model: torch.nn.Module, threshold: float) -> Iterator[None]:
    """Run LLM.int8() with another outlier threshold (0: no outlier decomposition), then restore each layer's.

    The same as loading with `BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold)`: the layers
    read `state.threshold` at every call.
    """
    layers = int8_layers(model)
    if not layers:
        raise ValueError("the model has no Linear8bitLt layer: load it with BitsAndBytesConfig(load_in_8bit=True)")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
        raise ValueError(f"threshold={threshold!r}; pass a number >= 0 (0 turns the outlier decomposition off)")
    saved = [layer.state.threshold for layer in layers]
    for layer in layers:
        layer.state.threshold = float(threshold)
    try:
        yield
    finally:
        for layer, value in zip(layers, saved):
            layer.state.threshold = value


@dataclass(frozen=True)
class OutlierColumns:
    """LLM.int8()'s outlier columns during one prefill: input columns holding a value >= threshold in any row."""

    threshold: float
    calls: int  # Linear8bitLt calls in the prefill
    calls_with_outliers: int  # calls where some column holds an outlier
    calls_widened: int  # calls where rows from the first image token on add columns the earlier rows lack
    columns_all_rows: int  # outlier columns summed over calls, picked over every row (what bitsandbytes does)
    columns_text_rows: int  # the same, picked over the rows before the first image token alone

    def __str__(self) -> str:
        return (f"LLM.int8() outlier columns (a value >= {self.threshold:g} in any row): found in "
                f"{self.calls_with_outliers} of {self.calls} INT8 calls of the prefill; in {self.calls_widened} the rows "
                f"from the image on add columns the text rows before it lack ({self.columns_all_rows:,} columns over "
                f"all rows, {self.columns_text_rows:,} over the text rows before the image, summed over calls)")


@torch.inference_mode()
def outlier_columns(model: Any, inputs_embeds: torch.Tensor, im_mask: torch.Tensor) -> OutlierColumns:
    """Count, at every `Linear8bitLt` call of one prefill (PLoRA on), the outlier columns bitsandbytes picks.

    bitsandbytes takes a column out of the int8 product, for every row, when any row holds a value of at least
    `threshold` in it (`int8_vectorwise_quant`: `outliers.any(dim=0)`). Columns that only rows at or after the
    first image token make outliers change how the text rows before it are multiplied.
    """
    first = _check_prompt(inputs_embeds, im_mask)
    layers = int8_layers(model)
    if not layers:
        raise ValueError("the model has no Linear8bitLt layer: load it with BitsAndBytesConfig(load_in_8bit=True)")
    counts = {"calls": 0, "with": 0, "widened": 0, "all": 0, "text": 0}

    def count(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].reshape(-1, args[0].shape[-1])  # (T, in): one prompt, one row per position
        big = x.abs() >= module.state.threshold  # (T, in)
        every_row, text_rows = big.any(dim=0), big[:first].any(dim=0)  # (in,), (in,)
        n_all, n_text = int(every_row.sum()), int(text_rows.sum())
        counts["calls"] += 1
        counts["with"] += n_all > 0
        counts["widened"] += n_all > n_text
        counts["all"] += n_all
        counts["text"] += n_text

    handles = [layer.register_forward_pre_hook(count) for layer in layers]
    try:
        model(inputs_embeds=inputs_embeds[:1], im_mask=im_mask[:1], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return OutlierColumns(float(layers[0].state.threshold), counts["calls"], counts["with"], counts["widened"],
                          counts["all"], counts["text"])


@dataclass(frozen=True)
class PLoRACheck:
    """Does PLoRA act only from the first image token on, and if the text before it changes, why?"""

    quantization: str  # "none", "int8" or "nf4"
    as_loaded: PLoRAEffect
    threshold: float | None = None  # INT8: the outlier threshold the model was loaded with
    no_decomposition: PLoRAEffect | None = None  # INT8: the same check with threshold 0
    outliers: OutlierColumns | None = None  # INT8: the outlier columns of the prefill with PLoRA on

    @property
    def plora_acts(self) -> bool:
        """PLoRA changes the logits from the first image token on and nothing before, once positions are apart."""
        clean = self.no_decomposition if self.no_decomposition is not None else self.as_loaded
        return clean.acts_only_from_image_on and clean.min_diff_from_image_on > 0

    @property
    def outliers_mix_positions(self) -> bool:
        """The text before the image changes as loaded, and no longer without the outlier decomposition."""
        return (self.no_decomposition is not None and not self.as_loaded.acts_only_from_image_on
                and self.no_decomposition.acts_only_from_image_on)

    def verdict(self) -> str:
        """One computed sentence telling "PLoRA acts" apart from "LLM.int8() mixes positions"."""
        if self.as_loaded.first_difference is None:
            return "PLoRA changed nothing: the branch is lost or its update is zero."
        if self.as_loaded.acts_only_from_image_on:
            return "PLoRA acts from the first image token on, and the text before it is unchanged."
        if self.outliers_mix_positions:
            return ("PLoRA acts from the first image token on: without the outlier decomposition the text before it "
                    "is unchanged. The differences there come from LLM.int8(), whose outlier columns are picked over "
                    "all positions at once, so the image tokens change how the text before them is quantized.")
        return ("the text before the image changes even without the outlier decomposition: something other than "
                "PLoRA and LLM.int8()'s outlier columns mixes positions here.")

    def __str__(self) -> str:
        name = {"none": "unquantized", "int8": "INT8", "nf4": "NF4"}[self.quantization]
        lines = [f"{name}, as loaded: {self.as_loaded}"]
        if self.no_decomposition is not None:
            lines.append(f"{name}, llm_int8_threshold=0 (no outlier decomposition): {self.no_decomposition}")
        if self.outliers is not None:
            lines.append(str(self.outliers))
        return "\n".join(lines)


def plora_check(model: Any, tokenizer: Any, images: Sequence[Any], params: CourseParams) -> PLoRACheck:
    """PLoRA on and off on the first image's caption prompt; for INT8 also without the outlier decomposition."""
    if not images:
        raise ValueError("images is empty: pass the images the notebook captions")
    with torch.inference_mode():
        embeds, im_mask = prompt_batch(model, tokenizer, list(images[:1]), image_size=params.image_size)  # (1, T, C)
    return plora_check_on(model, embeds, im_mask)


def plora_check_on(model: Any, embeds: torch.Tensor, im_mask: torch.Tensor) -> PLoRACheck:
    """`plora_check` on a prompt already embedded: `embeds` (1, T, C) and its image positions `im_mask` (1, T)."""
    as_loaded = plora_effect(model, embeds, im_mask)
    layers = int8_layers(model)
    if not layers:
        kind = "nf4" if any(is_quantized(m) for m in model.modules()) else "none"
        return PLoRACheck(kind, as_loaded)
    with int8_threshold(model, 0.0):
        no_decomposition = plora_effect(model, embeds, im_mask)
    return PLoRACheck("int8", as_loaded, float(layers[0].state.threshold), no_decomposition,
                      outlier_columns(model, embeds, im_mask))


# ----------------------------------------------------------------------------------- the quantized matrix product

def largest_quantized_linear(model: torch.nn.Module, prefix: str = "model.layers.") -> tuple[str, torch.nn.Module]:
    """The quantized linear with the most weights whose name starts with `prefix` (the decoder's, by default)."""
    found = [(name, m) for name, m in model.named_modules() if is_quantized(m) and name.startswith(prefix)]
    if not found:
        raise ValueError(f"no bitsandbytes linear under {prefix!r}: load the model with a BitsAndBytesConfig")
    return max(found, key=lambda item: item[1].in_features * item[1].out_features)


def dequantized_weight(layer: torch.nn.Module, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The (out, in) weight of a bitsandbytes linear turned back into `dtype`, as a dequantizing kernel does."""
    kind = type(layer).__name__
    if kind == "Linear4bit":
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
    if kind == "Linear8bitLt":
        state = getattr(layer, "state", None)
        cb = getattr(state, "CB", None)
        cb = layer.weight.data if cb is None else cb  # (out, in) int8
        scb = next(t for t in statistics(layer) if t.dtype == torch.float32)  # (out,) FP32 absmax of each row
        return (cb.float() * (scb.float().unsqueeze(1) / 127.0)).to(dtype)
    raise TypeError(f"{kind} is not a bitsandbytes Linear8bitLt or Linear4bit")


@dataclass(frozen=True)
class MatmulCost:
    """Best-of-n seconds of one quantized linear and of what a dequantizing kernel does in its place."""

    tokens: int
    quantized_s: float  # layer(x)
    dequantize_s: float  # the weight back to 16 bits
    fp16_matmul_s: float  # F.linear(x, dequantized weight)
    stored_bytes: int  # the packed weight and its statistics
    dequantized_bytes: int  # the 16-bit weight a dequantizing kernel makes for every call

    @property
    def vs_fp16(self) -> float:
        """The quantized call's time as a multiple of the 16-bit product's."""
        return self.quantized_s / self.fp16_matmul_s

    def __str__(self) -> str:
        return (f"{self.tokens:>4} tokens: quantized {1e3 * self.quantized_s:8.3f} ms | dequantize alone "
                f"{1e3 * self.dequantize_s:8.3f} ms + 16-bit product {1e3 * self.fp16_matmul_s:8.3f} ms | "
                f"x{self.vs_fp16:.2f} the 16-bit product")


def _best_time(fn: Callable[[], Any], device: str, repeats: int) -> float:
    def sync() -> None:
        if device != "cpu":
            torch.cuda.synchronize(device)

    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = perf_counter()
        fn()
        sync()
        best = min(best, perf_counter() - start)
    return best


@torch.inference_mode()
def matmul_cost(layer: torch.nn.Module, tokens: int, *, device: str, repeats: int = 5,
                dtype: torch.dtype = torch.float16, seed: int = 0) -> MatmulCost:
    """Time `layer` on `tokens` random rows (1 = a decode step, the prompt length = prefill)."""
    check_int("tokens", tokens, hint="1 for a decode step, the prompt length for prefill")
    device = resolve_device(device)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, tokens, layer.in_features, generator=generator).to(device=device, dtype=dtype)  # (1, T, in)
    weight = dequantized_weight(layer, dtype)
    stored = module_bytes(layer)
    return MatmulCost(
        tokens=tokens,
        quantized_s=_best_time(lambda: layer(x), device, repeats),
        dequantize_s=_best_time(lambda: dequantized_weight(layer, dtype), device, repeats),
        fp16_matmul_s=_best_time(lambda: F.linear(x, weight), device, repeats),
        stored_bytes=stored,
        dequantized_bytes=weight.numel() * weight.element_size(),
    )


@dataclass(frozen=True)
class CallMemory:
    """What the memory measurement saw during one call of a layer."""

    tokens: int
    peak_above_start_bytes: int  # highest memory above the level before the call
    output_bytes: int
    dequantized_bytes: int  # the 16-bit weight a dequantizing kernel makes inside the call

    @property
    def made_beyond_output_bytes(self) -> int:
        """What the call held at its highest besides its output: the kernel's own tensors, as measured."""
        return self.peak_above_start_bytes - self.output_bytes

    @property
    def sees_dequantized_copy(self) -> bool:
        return self.made_beyond_output_bytes >= self.dequantized_bytes


@torch.inference_mode()
def call_memory(layer: torch.nn.Module, tokens: int, *, device: str, dtype: torch.dtype = torch.float16,
                seed: int = 0) -> CallMemory:
    """Measure one call of `layer` on `tokens` random rows: is the dequantized weight visible to `measure`?"""
    device = resolve_device(device)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, tokens, layer.in_features, generator=generator).to(device=device, dtype=dtype)  # (1, T, in)
    layer(x)  # warm-up: first-call state (LLM.int8() moves its scales on the first call)
    with measure(device) as m:
        out = layer(x)  # (1, T, out)
    result = m.result
    return CallMemory(tokens, result.peak_bytes - result.start_bytes, out.numel() * out.element_size(),
                      layer.in_features * layer.out_features * torch.empty((), dtype=dtype).element_size())


@dataclass(frozen=True)
class KernelReport:
    """The decoder's largest quantized linear: what one call makes, which CPU kernel runs, and timings."""

    name: str
    kind: str  # "Linear8bitLt" or "Linear4bit"
    in_features: int
    out_features: int
    stored_bytes: int
    device: str
    call: CallMemory  # one call on the prompt's tokens, measured
    widest_input: int  # the widest input of any quantized linear of the model
    layers_4bit: int  # 4-bit linears of the model (0 for INT8)
    packed_rejects: tuple[str, ...]  # names (last part) of 4-bit linears the packed CPU format cannot hold
    packed_rejected: int  # how many 4-bit linears the packed CPU format cannot hold
    plora_rank: int | None  # the model's PLoRA rank: the small side of Plora_A and Plora_B
    cpu_path: str | None  # the 4-bit CPU path in force (None on a GPU or for INT8)
    machine: str  # the CPU's capability or the GPU's name: machine-dependent, print it where nbval ignores
    costs: tuple[MatmulCost, ...]  # one decode-step row, then the whole prompt: timings, machine-dependent

    def facts(self) -> str:
        """Lines that depend on the model and the device kind only (deterministic)."""
        c = self.call
        lines = [f"{self.name}: {self.kind}({self.in_features} -> {self.out_features}) | stored "
                 f"{fmt_bytes(self.stored_bytes)} | dequantized to FP16 {fmt_bytes(c.dequantized_bytes)}"]
        if self.kind == "Linear8bitLt" and self.device == "cpu":
            bound = 127 * 127 * self.widest_input
            agree = "agree exactly" if bound < 2**24 else "may round differently"
            lines.append(f"widest quantized input: {self.widest_input} -> int8 sums up to 127 x 127 x "
                         f"{self.widest_input} = {bound:,}, {'below' if bound < 2**24 else 'above'} 2^24 = {2**24:,}: "
                         f"FP32 and torch._int_mm {agree}")
        seen = (f"one call on {c.tokens} tokens, measured on {self.device}: peak {fmt_bytes(c.peak_above_start_bytes)} "
                f"above the start, of which the output is {fmt_bytes(c.output_bytes)} and the kernel's own tensors "
                f"{fmt_bytes(c.made_beyond_output_bytes)}")
        if self.device == "cpu":
            lines.append(seen + f": a {fmt_bytes(c.dequantized_bytes)} dequantized copy is "
                         f"{'in' if c.sees_dequantized_copy else 'NOT in'} the measured peak (the accounting sees an "
                         f"op's outputs, not the scratch a bitsandbytes kernel makes inside)")
        else:
            made = "room for" if c.sees_dequantized_copy else "less than"
            lines.append(seen + f": {made} a {fmt_bytes(c.dequantized_bytes)} dequantized copy (the allocator sees "
                         f"every block a kernel takes, so this is what the kernel made)")
        if self.layers_4bit and self.device == "cpu":
            rejected = (f" ({', '.join(self.packed_rejects)}: rank {self.plora_rank})" if self.packed_rejects else "")
            lines.append(f"{self.layers_4bit} 4-bit linears; the packed CPU format rejects {self.packed_rejected} of "
                         f"them{rejected}")
            lines.append(str(self.cpu_path))
        return "\n".join(lines)

    def timings(self) -> str:
        """The timings, machine-dependent: print them where nbval ignores the output."""
        return "\n".join(f"{self.machine}: {cost} | dequantizing alone takes x{cost.dequantize_s / cost.fp16_matmul_s:.2f} "
                         f"the product" for cost in self.costs)


def quantized_kernels(model: torch.nn.Module, tokens: int, *, device: str, repeats: int = 5) -> KernelReport:
    """Measure one call of the decoder's largest quantized linear on `tokens` rows and time it for 1 and `tokens`."""
    check_int("tokens", tokens, hint="the prompt's length")
    device = resolve_device(device)
    name, layer = largest_quantized_linear(model)
    quantized = [(n, m) for n, m in model.named_modules() if is_quantized(m)]
    fours = [(n, m) for n, m in quantized if type(m).__name__ == "Linear4bit"]
    rejected = [n for n, m in fours if not packed_format_accepts(m.in_features, m.out_features)]
    cpu_path = str(apply_cpu_path(model)) if fours and device == "cpu" else None
    if device == "cpu":
        avx = "has" if cpu_has_avx512bf16() else "lacks"
        machine = f"CPU {torch.backends.cpu.get_cpu_capability()} ({avx} AVX512-BF16)"
    else:
        machine = torch.cuda.get_device_name(device)
    return KernelReport(
        name=name, kind=type(layer).__name__, in_features=layer.in_features, out_features=layer.out_features,
        stored_bytes=module_bytes(layer), device=device, call=call_memory(layer, tokens, device=device),
        widest_input=max(m.in_features for _, m in quantized), layers_4bit=len(fours),
        packed_rejects=tuple(sorted({n.rsplit(".", 1)[-1] for n in rejected})), packed_rejected=len(rejected),
        plora_rank=getattr(getattr(model, "config", None), "plora_rank", None), cpu_path=cpu_path, machine=machine,
        costs=tuple(matmul_cost(layer, t, device=device, repeats=repeats) for t in (1, tokens)))


# ------------------------------------------------------------------------------------ the original's own code

def projection_classes(model: torch.nn.Module) -> str:
    """The classes of the decoder's PLoRA projections (the original's `wqkv`, `wo`, `w1`, `w2`, `w3`), counted, and
    whether each still carries its low-rank branch (`Plora_A` and `Plora_B`)."""
    from xcomp_lab.original.quantize import PLORA_NAMES

    kinds: dict[str, int] = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in PLORA_NAMES and name.startswith("model.layers."):
            branch = hasattr(module, "Plora_A") and hasattr(module, "Plora_B")
            kind = f"{type(module).__name__} ({'with' if branch else 'WITHOUT'} its PLoRA branch)"
            kinds[kind] = kinds.get(kind, 0) + 1
    if not kinds:
        raise ValueError(f"{type(model).__name__} has no decoder projection named {PLORA_NAMES}: is it the original "
                         "InternLM-XComposer2 remote code?")
    return "decoder projections: " + ", ".join(f"{count} x {kind}" for kind, count in kinds.items())


def failure_line(error: BaseException) -> str:
    """The error as raised, and the innermost line of the model's own code it came through."""
    import traceback

    frames = [f for f in traceback.extract_tb(error.__traceback__) if Path(f.filename).name.startswith("modeling_")]
    where = f" | raised through {Path(frames[-1].filename).name}:{frames[-1].lineno}: {frames[-1].line}" if frames else ""
    return f"{type(error).__name__}: {error}{where}"


@dataclass(frozen=True)
class RecipeRun:
    """One original-code step loaded and captioned as `course.steps` does: its footprint and its measured call."""

    name: str
    title: str
    projection: str  # projection_classes() of the loaded model
    weights_bytes: int  # parameters and buffers plus bitsandbytes' statistics
    modules: list[ModuleKind]  # module_precisions() of the loaded model: what was quantized, what stayed
    run: CaptionRun
    record: dict[str, Any]
    plora: PLoRACheck  # does PLoRA still act from the first image token on, and only there?

    def module_table(self) -> str:
        """The modules holding tensors, by class: which were quantized and which stayed 16-bit."""
        return format_module_precisions(self.modules, fmt_bytes)


def run_original_recipes(params: CourseParams, images: Sequence[Any], names: Sequence[str]) -> list[RecipeRun]:
    """Load, measure and caption each original-code step of `names` (`xcomp_lab.original.steps.ORIGINAL_STEPS`, e.g.
    "fp16", "int8-plora", "nf4-skip") with the course's `load_for_step`/`run_step`, one model at a time, and check
    its PLoRA layers on the original's own prompt (`original_plora_check`); each record is appended to the results
    file."""
    from xcomp_lab.course.steps import run_step
    from xcomp_lab.original.steps import get_original_step

    if not params.original_code:
        raise ValueError(f"{params.model_name_or_path!r} is not a checkpoint of the original's own code: these recipes "
                         "are for its PLoRA layers (the replica's quantize through BitsAndBytesConfig as they are).")
    budget = course_budget(params, None)
    out = []
    for name in names:
        step = get_original_step(name).step
        model, tokenizer = load_for_step(step, params)
        weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        projection = projection_classes(model)
        run, record_ = run_step(step, model, tokenizer, list(images[:1]), params, budget,
                                extra={"original_step": name, "statistics_bytes": statistics_bytes(model)})
        with tempfile.TemporaryDirectory(prefix="xcomp-lab-plora-") as folder:
            image = Path(folder) / "image.png"
            images[0].save(image)
            plora = original_plora_check(model, tokenizer, image, device=params.device, use_autocast=step.use_autocast)
        out.append(RecipeRun(name, step.title, projection, weights + statistics_bytes(model), module_precisions(model),
                             run, record(params, record_), plora))
        del model, tokenizer
        _free(params.device)
    return out


def recipe_table(runs: Sequence[RecipeRun], reference: str = "fp16") -> str:
    """One line per recipe: weights (statistics included) against `reference`'s, the caption's peak and its verdict."""
    base = next((r for r in runs if r.name == reference), None)
    if base is None:
        raise ValueError(f"reference={reference!r} is not among the runs {[r.name for r in runs]}")
    lines = []
    for r in runs:
        m = r.run.memory
        verdict = "OOM" if m.oom else "fits"
        lines.append(f"{r.name:11s} weights {fmt_bytes(r.weights_bytes):>11s} (x{r.weights_bytes / base.weights_bytes:.2f} "
                     f"{reference}'s) | peak {fmt_bytes(m.peak_bytes):>11s} of {fmt_bytes(m.budget_bytes or 0)}: "
                     f"{verdict} | {r.projection.removeprefix('decoder projections: ')}")
    return "\n".join(lines)


def original_prompt(model: Any, tokenizer: Any, image: str | Path, query: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt the original's `chat()` embeds for `image` and `query`: (inputs_embeds (1, T, C), im_mask (1, T)),
    as its decoder receives them (one chat of one new token, read by a hook on the decoder's first call)."""
    seen: dict[str, torch.Tensor] = {}

    def keep(_module: Any, _args: tuple, kwargs: dict) -> None:
        if not seen:
            seen["embeds"], seen["im_mask"] = kwargs["inputs_embeds"].detach(), kwargs["im_mask"].detach().bool()

    handle = model.model.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.inference_mode():
            model.chat(tokenizer, query, image=str(image), history=[], do_sample=False, max_new_tokens=1)
    finally:
        handle.remove()
    return seen["embeds"], seen["im_mask"]


def original_plora_check(model: Any, tokenizer: Any, image: str | Path, *, device: str,
                         use_autocast: bool = True) -> PLoRACheck:
    """`plora_check` for the original's code: its own prompt (`original_prompt`), PLoRA on (`im_mask`) and off, under
    the autocast its FP16 and quantized models need; on a CPU the FP16 products in FP32 (`original.matmul`)."""
    from xcomp_lab.original.matmul import FloatMatmul
    from xcomp_lab.original.steps import QUERY
    from xcomp_lab.run.modes import autocast

    speed = FloatMatmul() if device == "cpu" else contextlib.nullcontext()
    with speed, autocast(device, use_autocast):
        embeds, im_mask = original_prompt(model, tokenizer, image, QUERY)
        return plora_check_on(model, embeds, im_mask)
