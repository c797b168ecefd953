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
attention kernel `sdpa` picked on this machine, and `peak_vs_tokens_chart` draws peak memory against prompt
length, one line per attention kind.
"""

from __future__ import annotations

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
from xcomp_lab.memory import measure
from xcomp_lab.model.modeling_internlm_xcomposer2 import eager_attention, sdpa_attention

FP32_BYTES = 4


def _element_size(dtype: str | torch.dtype) -> int:
    return torch.empty((), dtype=check_dtype(dtype)).element_size()


def image_tokens(config: Any, image_size: int | None = None) -> int:
    """Image tokens per image at `image_size` px (default: the vision tower's own size): (side / patch)^2."""
    patch = config.vision_config.patch_size
    size = config.image_size if image_size is None else check_int("image_size", image_size)
    if size % patch:
        raise ValueError(f"image_size={size} is not a multiple of the {patch} px patch; use e.g. {max(patch, size // patch * patch)}.")
    return (size // patch) ** 2


def eager_scores_bytes(config: Any, batch: int, tokens: int, dtype: str | torch.dtype = "float16") -> int:
    """One layer's attention scores as eager attention materialises them: batch x heads x T x T x bytes."""
    return (check_int("batch", batch) * config.num_attention_heads * check_int("tokens", tokens) ** 2
            * _element_size(dtype))


def kv_cache_formula(config: Any, batch: int, tokens: int, dtype: str | torch.dtype = "float16") -> int:
    """Bytes of the KV cache: 2 x layers x KV heads x head dim x batch x tokens x bytes per element."""
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
    eager_bytes: int  # one layer's eager attention: scores, mask added, FP32 softmax and its cast back
    sdpa_bytes: int  # one layer's sdpa attention
    logits_bytes: int  # the output head over every position and the FP32 upcast

    @property
    def eager_multiple(self) -> float:
        """Eager attention's peak in units of one layer's scores tensor."""
        return self.eager_bytes / self.scores_bytes

    @property
    def larger(self) -> str:
        """Which of one layer's eager attention and the logits holds more: "eager attention" or "logits"."""
        return "eager attention" if self.eager_bytes > self.logits_bytes else "logits"


def measure_peak_terms(model: torch.nn.Module, tokens: int, *, device: str, batch: int = 1) -> PeakTerms:
    """Measure, at a prompt of `tokens`, one layer's eager and sdpa attention and the output head with its
    FP32 upcast, on zero inputs of the model's shapes and dtype, each as its peak above its inputs."""
    config = model.config
    check_int("tokens", tokens)
    check_int("batch", batch)
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


def crossover_tokens(config: Any, eager_multiple: float, dtype: str | torch.dtype = "float16") -> float:
    """The prompt length at which one layer's eager attention, `eager_multiple` x B x H x T x T x bytes, equals
    the prefill's logits, B x T x vocab x (bytes + 4): T* = vocab x (bytes + 4) / (multiple x heads x bytes)."""
    if not eager_multiple > 0:
        raise ValueError(f"eager_multiple={eager_multiple!r}; give eager attention's peak in units of one layer's "
                         f"scores, e.g. PeakTerms.eager_multiple (4 to 5).")
    per_token_logits = logits_peak_bytes(config, 1, 1, dtype)
    return per_token_logits / (eager_multiple * config.num_attention_heads * _element_size(dtype))


def peak_setter(terms: PeakTerms, gap_bytes: int) -> str:
    """What set the eager peak, read from the measured eager-minus-sdpa peak gap at the same prompt.

    Eager attention sets its peak when the gap is a sizeable part (a quarter or more) of what one layer's eager
    attention holds beyond sdpa; otherwise both peaks are set by the same term, one both kinds share.
    """
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
