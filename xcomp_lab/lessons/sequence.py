"""How a caption's memory grows with its sequence: image tokens, attention scores, KV cache and logits.

The formulas the course checks its measurements against (notebook 04), one function each:

- `image_tokens`: patches per image at a given side, (side / patch)^2; the full model's 490 px give 1225.
- `eager_scores_bytes`: eager attention's scores of one layer, batch x heads x T x T, in the activations'
  dtype; the softmax makes an FP32 copy of the same shape (`dtype=torch.float32`).
- `kv_cache_formula`: 2 (keys, values) x layers x KV heads x head dim x batch x tokens x bytes.
- `prefill_logits_bytes`: the FP32 logits the original computes for every prompt position at prefill,
  batch x tokens x vocab x 4 bytes.
- `logits_peak_bytes`: what the prefill's last step holds at once, the output head's logits in the
  activations' dtype and their FP32 upcast: batch x tokens x vocab x (2 + 4) bytes in FP16.

Which of these sets the peak depends on the model's shape: `measure_peak_terms` measures, at one prompt
length, one layer's eager attention, one layer's sdpa attention and the output head with its upcast, each on
its own (`memory.measure`: the CUDA allocator's peak, or the CPU tensor accounting); `crossover_tokens` is
the prompt length at which one layer's eager attention catches up with the logits; `peak_setter` reads the
measured gap between the eager and the sdpa peaks against those terms.

`leaf_ops` lists the ATen kernels a call really ran (composite ops decomposed), so a notebook can show which
attention kernel `sdpa` picked on this machine (`attention_kernels`: one prefill pass), and `peak_vs_tokens_chart`
draws peak memory against prompt length, one line per attention kind.

The same functions take a model of the original's own code (`original.detect.is_original_model`, transformers
4.33.2). Its config names no head size, image side or patch, so the formulas read a `ModelShape` (`model_shape`:
the replica's config, or the original's config and CLIP tower; `scale_shapes`: both scales of either). The original
resizes every image to its own side (`img_size`, 490 px), so its prompts grow by images, not pixels
(`prompt_shapes`: 1, 2, ... images in one prompt, as long as its `chat()` keeps the prompt, `max_length`). It has
eager attention only (`attention_kind`, `attention_code`, `attention_refusal` say so from its code), and
`measure_peak_terms` measures its layer 0's attention module (`lessons.forensics.measure_original_prefill_parts`).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch.utils._python_dispatch import TorchDispatchMode

from xcomp_lab.core.checks import check_int
from xcomp_lab.core.dtypes import check_dtype
from xcomp_lab.core.units import fmt_bytes
from xcomp_lab.course.charts import COLORS, AxisUnit, finish, new_axes
from xcomp_lab.course.params import CourseParams
from xcomp_lab.course.step_table import Step
from xcomp_lab.memory import measure
from xcomp_lab.original.detect import is_original_model

FP32_BYTES = 4
SWEEP_SIZES = (112, 224, 336)  # the image sides notebook 04 sweeps besides the tower's own (the replica)
ATTENTION_OPS = ("attention", "softmax", "bmm")  # the kernels `attention_kernels` lists


@dataclass(frozen=True)
class ModelShape:
    """The sizes the formulas read, named as the replica's config names them, for the replica or the original."""

    vocab_size: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    head_dim: int
    image_size: int  # the side the vision tower sees by default
    patch_size: int
    fixed_image_size: bool = False  # the original resizes every image to image_size
    max_prompt_tokens: int | None = None  # where the original's chat() cuts a prompt (max_length); None: no cut


def shape_of_config(config: Any) -> ModelShape:
    """The replica's configuration as a `ModelShape`."""
    return ModelShape(config.vocab_size, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                      config.num_hidden_layers, config.head_dim, config.image_size, config.vision_config.patch_size)


def original_shape(config: Mapping[str, Any], patch_size: int) -> ModelShape:
    """The original's configuration (its config.json fields) and its CLIP tower's patch as a `ModelShape`: head size
    hidden / heads, as its attention computes it; every image at `img_size`; prompts cut at `max_length`."""
    return ModelShape(config["vocab_size"], config["hidden_size"], config["num_attention_heads"],
                      config["num_key_value_heads"], config["num_hidden_layers"],
                      config["hidden_size"] // config["num_attention_heads"], config["img_size"], patch_size,
                      fixed_image_size=True, max_prompt_tokens=config["max_length"])


def model_shape(model: Any) -> ModelShape:
    """The loaded model's `ModelShape` (the original's: its config and its CLIP tower's patch)."""
    if is_original_model(model):
        return original_shape(model.config.to_dict(), model.vit.vision_tower.config.patch_size)
    return shape_of_config(model.config)


def scale_shapes(model: Any) -> dict[str, ModelShape]:
    """Both scales of the model's code by name: the replica's "tiny" and "full", the original's "small" build and
    the released "full" model (their configs as `model.original` writes them)."""
    if is_original_model(model):
        from xcomp_lab.model.original import clip_config, original_config

        return {scale: original_shape(original_config(scale), clip_config(scale)["vision_config"]["patch_size"])
                for scale in ("small", "full")}
    from xcomp_lab.model.scales import config_for_scale

    return {scale: shape_of_config(config_for_scale(scale)) for scale in ("tiny", "full")}


@dataclass(frozen=True)
class PromptShape:
    """One prompt of notebook 04's sweep: `images` images of `image_size` px; `fixed` where the model resizes every
    image to that side (the original), so its prompts differ by their number of images."""

    image_size: int
    images: int = 1
    fixed: bool = False

    @property
    def name(self) -> str:
        """For record names: "224px", or "2img" where the size is fixed."""
        return f"{self.images}img" if self.fixed else f"{self.image_size}px"

    @property
    def image_size_parameter(self) -> int | None:
        """The notebook's `image_size` for this prompt: None where the model fixes it."""
        return None if self.fixed else self.image_size

    def describe(self) -> str:
        """" 224 px", or "2 images of 490 px" where the size is fixed."""
        if not self.fixed:
            return f"{self.image_size:4d} px"
        return f"{self.images} image{'s' if self.images > 1 else ''} of {self.image_size} px"

    def tokens(self, shape: ModelShape, text_tokens: int) -> int:
        """The prompt's length: `text_tokens` and every image's tokens."""
        return text_tokens + self.images * image_tokens(shape, self.image_size)


def default_prompt(shape: ModelShape, image_size: int | None = None) -> PromptShape:
    """The notebook's own prompt: one image at `image_size` (default: the tower's own side)."""
    return PromptShape(image_size or shape.image_size, 1, shape.fixed_image_size)


def prompt_shapes(shape: ModelShape, text_tokens: int) -> list[PromptShape]:
    """The prompts notebook 04 grows, shortest first: one image at each of SWEEP_SIZES and the tower's own side; for
    the original (one fixed side), 1, 2, ... images in one prompt, as many as fit in `max_prompt_tokens`."""
    if not shape.fixed_image_size:
        return [PromptShape(size) for size in sorted({*SWEEP_SIZES, shape.image_size})]
    per_image = image_tokens(shape)
    most = (shape.max_prompt_tokens - check_int("text_tokens", text_tokens)) // per_image
    if most < 1:
        raise ValueError(f"text_tokens={text_tokens} leave no room for a {per_image}-token image in a prompt of "
                         f"{shape.max_prompt_tokens} tokens; pass the text tokens of one caption prompt.")
    return [PromptShape(shape.image_size, k, True) for k in range(1, most + 1)]


def attention_kind(model: Any) -> str:
    """The attention the loaded model runs: the replica's `config._attn_implementation`; for the original, the
    one its decoder layer chose ("eager", or "flash_attention_2" where its config enables flash-attention 2)."""
    if is_original_model(model):
        return "flash_attention_2" if getattr(model.config, "_flash_attn_2_enabled", False) else "eager"
    return model.config._attn_implementation


def attention_code(model: Any) -> str:
    """One line read from the code of the loaded model's attention: its attention classes, the one layer 0 runs,
    and whether that code calls `scaled_dot_product_attention`."""
    layer = type(model.model.layers[0].attention)
    module = sys.modules[layer.__module__]
    classes = sorted(name for name, obj in vars(module).items()
                     if isinstance(obj, type) and issubclass(obj, torch.nn.Module) and "Attention" in name)
    calls = "scaled_dot_product_attention" in inspect.getsource(module)
    return (f"{Path(module.__file__).name} defines {', '.join(classes)}; layer 0 runs {layer.__name__}; "
            f"the file {'calls' if calls else 'never calls'} scaled_dot_product_attention")


def attention_refusal(step: Step, params: CourseParams) -> str | None:
    """Why `step`'s attention cannot be loaded with these parameters (the original's code has eager attention only:
    `course.steps.check_original_attention`), None where it can."""
    if not params.original_code:
        return None
    from xcomp_lab.course.steps import check_original_attention

    try:
        check_original_attention(step, params)
    except ValueError as refused:
        return str(refused)
    return None


def _element_size(dtype: str | torch.dtype) -> int:
    return torch.empty((), dtype=check_dtype(dtype)).element_size()


def image_tokens(config: Any, image_size: int | None = None) -> int:
    """Image tokens per image at `image_size` px (default: the vision tower's own size): (side / patch)^2.

    `config`: the replica's config or a `ModelShape`; the original (a fixed side) takes its own size only."""
    shape = config if isinstance(config, ModelShape) else shape_of_config(config)
    patch = shape.patch_size
    size = shape.image_size if image_size is None else check_int("image_size", image_size)
    if shape.fixed_image_size and size != shape.image_size:
        raise ValueError(f"image_size={size}: the original's code resizes every image to its {shape.image_size} px; "
                         f"pass None (or {shape.image_size}).")
    if size % patch:
        raise ValueError(f"image_size={size} is not a multiple of the {patch} px patch; use e.g. {max(patch, size // patch * patch)}.")
    return (size // patch) ** 2


def eager_scores_bytes(config: Any, batch: int, tokens: int, dtype: str | torch.dtype = "float16") -> int:
    """One layer's attention scores as eager attention materialises them: batch x heads x T x T x bytes."""
    return (check_int("batch", batch) * config.num_attention_heads * check_int("tokens", tokens) ** 2
            * _element_size(dtype))


def kv_cache_formula(config: Any, batch: int, tokens: int, dtype: str | torch.dtype = "float16") -> int:
    """Bytes of the KV cache: 2 x layers x KV heads x head dim x batch x tokens x bytes per element (`config`: the
    replica's or a `ModelShape`)."""
    return (2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
            * check_int("batch", batch) * check_int("tokens", tokens) * _element_size(dtype))


def prefill_logits_bytes(config: Any, batch: int, tokens: int) -> int:
    """The prefill's FP32 logits over the whole vocabulary for every prompt position: batch x T x vocab x 4."""
    return check_int("batch", batch) * check_int("tokens", tokens) * config.vocab_size * FP32_BYTES


def logits_peak_bytes(config: Any, batch: int, tokens: int, dtype: str | torch.dtype = "float16") -> int:
    """The prefill's last step: the head's logits in `dtype` and their FP32 upcast, alive together,
    batch x T x vocab x (bytes + 4); FP32 alone when `dtype` is FP32 (`.float()` then returns the same tensor)."""
    size = _element_size(dtype)
    return prefill_logits_bytes(config, batch, tokens) + (0 if size == FP32_BYTES else
                                                          batch * tokens * config.vocab_size * size)


@dataclass(frozen=True)
class PeakTerms:
    """The transient terms of one prefill at one prompt length, each measured on its own above its inputs."""

    tokens: int
    scores_bytes: int  # one layer's B x H x T x T in the activations' dtype (formula)
    eager_bytes: int  # one layer's eager attention: scores, mask added, FP32 softmax and its cast back (the
    # original's: its whole attention module, the packed wqkv and wo projections with their PLoRA included)
    sdpa_bytes: int | None  # one layer's sdpa attention; None for the original, which has none
    logits_bytes: int  # the output head over every position and the FP32 upcast

    @property
    def eager_multiple(self) -> float:
        """Eager attention's peak in units of one layer's scores tensor."""
        return self.eager_bytes / self.scores_bytes

    @property
    def larger(self) -> str:
        """Which of one layer's eager attention and the logits holds more: "eager attention" or "logits"."""
        return "eager attention" if self.eager_bytes > self.logits_bytes else "logits"

    def line(self) -> str:
        """One row: the prompt, one layer's eager (and sdpa) attention, the logits and which is larger."""
        sdpa = "no sdpa    " if self.sdpa_bytes is None else f"sdpa {fmt_bytes(self.sdpa_bytes):>10s}"
        return (f"{self.tokens:5d} tokens | one layer: eager {fmt_bytes(self.eager_bytes):>10s} "
                f"(x{self.eager_multiple:.1f} its scores), {sdpa} | logits {fmt_bytes(self.logits_bytes):>10s} | "
                f"larger: {self.larger}")


def measure_peak_terms(model: torch.nn.Module, tokens: int, *, device: str, batch: int = 1,
                       image_tokens: int = 0) -> PeakTerms:
    """Measure, at a prompt of `tokens`, one layer's eager and sdpa attention and the output head with its
    FP32 upcast, on zero inputs of the model's shapes and dtype, each as its peak above its inputs.

    For the original's code (batch 1): its layer 0's attention module and its head, on a hidden state of the
    prompt's shape with `image_tokens` of its positions marked as image tokens (where its PLoRA runs; where they
    sit does not change the memory), by `lessons.forensics.measure_original_prefill_parts`; it has no sdpa."""
    check_int("tokens", tokens)
    check_int("batch", batch)
    if is_original_model(model):
        return _original_peak_terms(model, tokens, device, batch, image_tokens)
    from xcomp_lab.model.modeling_internlm_xcomposer2 import eager_attention, sdpa_attention

    config = model.config
    dtype = model.output.weight.dtype
    heads, head_dim = config.num_attention_heads, config.head_dim
    on = model.output.weight.device
    q = torch.zeros(batch, heads, tokens, head_dim, dtype=dtype, device=on)  # (B, H, T, D), after repeat_kv
    mask = torch.zeros(batch, 1, tokens, tokens, dtype=dtype, device=on)  # the additive causal mask eager gets
    hidden = torch.zeros(batch, tokens, config.hidden_size, dtype=dtype, device=on)  # (B, T, C), the last layer's

    def above_inputs(fn: Callable[[], Any]) -> int:
        with torch.inference_mode(), measure(device) as m:
            fn()
        return m.result.peak_bytes - m.result.start_bytes

    return PeakTerms(
        tokens=tokens,
        scores_bytes=eager_scores_bytes(config, batch, tokens, dtype),
        eager_bytes=above_inputs(lambda: eager_attention(q, q, q, mask)),
        sdpa_bytes=above_inputs(lambda: sdpa_attention(q, q, q, None)),
        logits_bytes=above_inputs(lambda: model.output(hidden).float()),
    )


def _original_peak_terms(model: Any, tokens: int, device: str, batch: int, image_tokens: int) -> PeakTerms:
    from xcomp_lab.lessons.forensics import measure_original_prefill_parts

    if batch != 1:
        raise ValueError(f"batch={batch}: the original's terms are measured on one prompt; pass batch=1.")
    check_int("image_tokens", image_tokens, minimum=0, maximum=tokens)
    im_mask = torch.zeros(1, tokens, dtype=torch.bool)
    im_mask[:, :image_tokens] = True
    dtype = model.output.weight.dtype
    parts = measure_original_prefill_parts(model, im_mask, device=device, dtype=dtype)
    return PeakTerms(tokens=tokens, scores_bytes=eager_scores_bytes(model_shape(model), 1, tokens, dtype),
                     eager_bytes=parts.attention_bytes, sdpa_bytes=None, logits_bytes=parts.logits_bytes)


def crossover_tokens(config: Any, eager_multiple: float, dtype: str | torch.dtype = "float16") -> float:
    """The prompt length at which one layer's eager attention, `eager_multiple` x B x H x T x T x bytes, equals
    the prefill's logits, B x T x vocab x (bytes + 4): T* = vocab x (bytes + 4) / (multiple x heads x bytes)."""
    if not eager_multiple > 0:
        raise ValueError(f"eager_multiple={eager_multiple!r}; give eager attention's peak in units of one layer's "
                         f"scores, e.g. PeakTerms.eager_multiple (4 to 5).")
    per_token_logits = logits_peak_bytes(config, 1, 1, dtype)
    return per_token_logits / (eager_multiple * config.num_attention_heads * _element_size(dtype))


def peak_setter(terms: PeakTerms, gap_bytes: int | None, activations_bytes: int | None = None) -> str:
    """What set the eager peak, read from the measured eager-minus-sdpa peak gap at the same prompt.

    Eager attention sets its peak when the gap is a sizeable part (a quarter or more) of what one layer's eager
    attention holds beyond sdpa; otherwise both peaks are set by the same term, one both kinds share. Without an
    sdpa run (`gap_bytes` None: the original has eager only) the two terms are read against the prefill's measured
    `activations_bytes` instead: the larger sets the peak where it alone is more than half of them.
    """
    if gap_bytes is None or terms.sdpa_bytes is None:
        line = (f"no sdpa run to compare (eager attention only): one layer's eager attention holds "
                f"x{terms.eager_bytes / terms.logits_bytes:.2f} the logits")
        if not activations_bytes:
            return line
        larger = max(terms.eager_bytes, terms.logits_bytes)
        share = f"x{larger / activations_bytes:.2f} of the prefill's {fmt_bytes(activations_bytes)} of activations"
        if larger > activations_bytes / 2:
            setter = "it, " if terms.larger == "eager attention" else "the logits, "
            return f"{line}; {setter}{share}, {'sets' if setter == 'it, ' else 'set'} the peak"
        return f"{line}; the larger, {share}, is not most of them: the terms every layer keeps add up to the peak"
    extra = terms.eager_bytes - terms.sdpa_bytes
    if extra <= 0:
        return "eager attention holds no more than sdpa here: the same term sets both peaks"
    share = f"x{gap_bytes / extra:.2f} of what eager attention holds beyond sdpa"
    if gap_bytes >= extra / 4:
        return f"eager attention sets the eager peak: sdpa's is {fmt_bytes(gap_bytes)} lower, {share}"
    shared = "the logits" if terms.larger == "logits" else "a term both kinds share"
    return f"{shared} set both peaks: they differ by {fmt_bytes(gap_bytes)}, {share}"


class _LeafOps(TorchDispatchMode):
    """Counts the kernels that run: a composite op is decomposed (with this mode on) and not counted itself."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        torch._C._push_on_torch_dispatch_stack(self)
        try:
            out = func.decompose(*args, **kwargs)
        finally:
            torch._C._pop_torch_dispatch_stack(None)
        if out is not NotImplemented:
            return out
        self.calls[func.name()] += 1
        return func(*args, **kwargs)


def leaf_ops(fn: Callable[[], Any], contains: Sequence[str] = ()) -> dict[str, int]:
    """Run `fn()` and return {kernel name: calls} of the ATen kernels it ran, e.g.
    {"aten::_scaled_dot_product_flash_attention_for_cpu": 4}; only names containing one of `contains`
    when given."""
    if not callable(fn):
        raise ValueError(f"fn must be a callable taking no arguments, got {type(fn).__name__}: wrap the call in a lambda")
    mode = _LeafOps()
    with mode:
        fn()
    return {name: n for name, n in sorted(mode.calls.items()) if not contains or any(c in name for c in contains)}


def attention_kernels(model: Any, tokenizer: Any, images: Sequence[Any], device: str) -> dict[str, int]:
    """The attention kernels (`ATTENTION_OPS`) one prefill pass over the first image's caption prompt ran, no cache.

    The original's FP16 products run in FP32 on a CPU (`original.matmul.FloatMatmul`, outside the listing: the
    kernels listed are the ones its code called)."""
    from xcomp_lab.run.captioning import prompt_batch

    speed = contextlib.nullcontext()
    if is_original_model(model) and device == "cpu":
        from xcomp_lab.original.matmul import FloatMatmul

        speed = FloatMatmul()
    with speed, torch.inference_mode():
        embeds, im_mask = prompt_batch(model, tokenizer, images[:1])
        return leaf_ops(lambda: model(inputs_embeds=embeds, im_mask=im_mask, use_cache=False), contains=ATTENTION_OPS)


def peak_vs_tokens_chart(series: Mapping[str, Sequence[tuple[int, int]]], *, budget_bytes: int | None = None,
                         weights_bytes: int | None = None, title: str | None = None,
                         path: str | Path | None = None) -> Figure:
    """Peak memory against prompt tokens, one line per series, e.g. {"eager": [(196, peak), ...]}.

    The axis is in GiB, or in MiB when everything drawn is below 1 GiB (the tiny replica). The budget, when
    given, is a dashed line; the weights, when given, a dotted one: the gap above it is what the sequence costs.
    """
    if not series or not all(points for points in series.values()):
        raise ValueError("series must map a label to at least one (prompt tokens, peak bytes) point, "
                         "e.g. {'eager': [(196, 12_600_000)]}")
    levels = [y for points in series.values() for _, y in points] + [b for b in (budget_bytes, weights_bytes) if b]
    unit = AxisUnit.for_bytes(max(levels))
    fig, ax = new_axes(7.0, 4.2)
    palette = [COLORS["oom"], COLORS["allocated"], COLORS["activations"], COLORS["kv_cache"]]
    for i, (label, points) in enumerate(series.items()):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, [unit.of(y) for y in ys], marker="o", color=palette[i % len(palette)], label=label)
        ax.annotate(fmt_bytes(ys[-1]), (xs[-1], unit.of(ys[-1])), textcoords="offset points", xytext=(6, -3), fontsize=8)
    if weights_bytes is not None:
        ax.axhline(unit.of(weights_bytes), color=COLORS["weights"], linestyle=":", linewidth=1.5,
                   label=f"weights {fmt_bytes(weights_bytes)}")
    if budget_bytes is not None:
        ax.axhline(unit.of(budget_bytes), color=COLORS["budget"], linestyle="--", linewidth=1.5,
                   label=f"budget {fmt_bytes(budget_bytes)}")
    xmax = max(x for points in series.values() for x, _ in points)
    ax.set_xlim(0, xmax * 1.18)
    ax.set_ylim(0, unit.of(max(levels)) * 1.15)
    ax.set_xlabel("prompt tokens (text + image)")
    ax.set_ylabel(f"peak, {unit.label}")
    ax.set_title(title or "Peak memory against prompt length")
    ax.grid(alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, loc="upper left")
    return finish(fig, path)
