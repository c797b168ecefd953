"""LLM.int8()'s outlier columns: how many input columns of each INT8 linear reach the threshold, measured on a real
model and given to a plan.

bitsandbytes (0.50.2, `MatMul8bitLt.forward` with transformers' threshold 6.0) keeps in 16 bits the input columns
where any row reaches the threshold: it copies them, gathers and dequantizes the weight's columns and adds a second
product, every tensor in proportion to the number of those columns. Which columns do depends on the activations'
values, which a plan from a config does not have: by default the plan takes every column as one (an upper bound).
Where the columns are known, `OutlierColumns` gives the plan their number for each phase and input width:

    estimate("llama-3-8b", quantization="int8", int8_outliers=0.05)            # 5% of every input's columns
    counts = calibrate_int8_outliers(model, inputs)                             # a real INT8 model's own call
    estimate("llama-3-8b", quantization="int8", int8_outliers=counts)          # the most in one input, per linear

`count_outliers` is the one counting rule (`tools.plan_matrix` records it for every INT8 call of the matrix): for
each call of `int8_vectorwise_quant` with a threshold, by phase and input width, [inputs, outlier columns in all,
inputs with every column an outlier, the most columns in one input]; and the same four numbers for each INT8 linear
by its module name, under the key "layers" (phase -> module -> numbers). The layers differ (the peak is reached in
the one whose input holds the most columns), so a plan gives each linear its own count where the counts have it,
and the count of its width otherwise. `RunningInt8Linear` names the linear running, on a real model and on the
plan's fake one alike.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from numbers import Real
from pathlib import Path
from typing import Any

import torch

from xcomp_lab.core.checks import check_choice
from xcomp_lab.plan.families import family_of

OUTLIER_PHASES = ("vision", "prefill", "decode")
STATISTICS = ("largest", "mean")
LAYERS = "layers"  # the counts' key of the per-linear numbers: phase -> module name -> the same four numbers
Counts = dict[str, dict[str, Any]]  # phase -> input width -> [inputs, columns, every column, most in one]; LAYERS


@dataclass(frozen=True)
class OutlierColumns:
    """The outlier columns an INT8 linear's input holds: a fraction of its width, or a number per phase and width.

    `columns(phase, width, layer)`: the fraction of the width, rounded; else the number of the linear named `layer`
    in the phase ("decode step 3" reads "decode"), else the table's for the phase and width; a phase and width the
    table lacks gets every column (the bound).
    """

    fraction: float | None = None
    table: Mapping[str, Mapping[int, int]] = field(default_factory=dict)
    layers: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # phase -> module name -> columns
    source: str = ""

    def columns(self, phase: str, width: int, layer: str | None = None) -> int:
        if self.fraction is not None:
            return round(self.fraction * width)
        phase = phase.split()[0]
        if layer is not None and layer in self.layers.get(phase, {}):
            return min(self.layers[phase][layer], width)
        return min(self.table.get(phase, {}).get(width, width), width)

    def __str__(self) -> str:
        if self.fraction is not None:
            return f"{self.fraction:.2%} of each input's columns"
        return self.source or "the columns per phase and input width given"


def from_counts(counts: Mapping[str, Mapping[Any, Any]], statistic: str = "largest") -> OutlierColumns:
    """The columns per phase and width, and per linear where the counts have them ("layers"), from counts in
    `count_outliers`' format (a matrix record's `int8_outliers`).

    `statistic`: "largest" (the default), the most columns one input held (the 4th number; counts with three give
    the width where some input had every column an outlier, else the mean, which is then a lower estimate of it);
    "mean", the columns per input on average. The peak is reached in the layer whose input holds the most outlier
    columns (their temporaries are the size of the weight's columns), so the mean under-predicts it where the
    layers differ (the H200 matrix: down to -3%), and the largest of a width, given to every layer of that width,
    is at or above it; the per-linear counts give each layer its own.
    """
    check_choice("statistic", statistic, STATISTICS, "how the counts of many inputs become one number of columns")
    table: dict[str, dict[int, int]] = {}
    layers: dict[str, dict[str, int]] = {}
    for phase, widths in counts.items():
        if phase == LAYERS:
            for layer_phase, lines in widths.items():
                check_choice("phase", layer_phase, OUTLIER_PHASES, f"the phases of the per-linear counts ({list(widths)})")
                layers[layer_phase] = {name: _columns(f"[{LAYERS!r}][{layer_phase!r}][{name!r}]", line, None,
                                                      statistic) for name, line in lines.items()}
            continue
        check_choice("phase", phase, OUTLIER_PHASES, f"the phases of INT8 outlier counts ({list(counts)})")
        for width, line in widths.items():
            if not str(width).isdigit():
                raise ValueError(f"int8_outliers[{phase!r}][{width!r}]: an input width is a whole number of columns, "
                                 "as calibrate_int8_outliers returns them.")
            table.setdefault(phase, {})[int(width)] = _columns(f"[{phase!r}][{width!r}]", line, int(width), statistic)
    return OutlierColumns(table=table, layers=layers, source=f"the {statistic} columns per input of the counts given")


def _columns(where: str, line: Any, width: int | None, statistic: str) -> int:
    """One count line [inputs, columns in all, inputs with every column, (most in one)] as a number of columns;
    a linear's line (`width` None) needs all four."""
    if not isinstance(line, (list, tuple)) or len(line) < (3 if width else 4):
        raise ValueError(f"int8_outliers{where}={line!r}; each entry is [inputs, outlier columns in all, inputs with "
                         "every column an outlier, most in one input] (a width's may omit the last), as "
                         "calibrate_int8_outliers returns them.")
    inputs, columns, every = (int(v) for v in line[:3])
    if inputs < 1 or columns < 0 or (width is not None and columns > inputs * width):
        raise ValueError(f"int8_outliers{where}={line!r}; each entry is [inputs, outlier columns in all, inputs with "
                         "every column an outlier(, most in one input)] with at least one input, as "
                         "calibrate_int8_outliers returns them.")
    if statistic == "mean":
        return round(columns / inputs)
    if len(line) > 3:
        return int(line[3])
    return width if every else round(columns / inputs)


def check_int8_outliers(value: Any, statistic: str = "largest") -> OutlierColumns | None:
    """A plan's `int8_outliers` checked: None (every column, the bound), a fraction from 0 to 1 of each input's
    columns, counts as `calibrate_int8_outliers` returns them, a JSON file of such counts, or an `OutlierColumns`."""
    if value is None or isinstance(value, OutlierColumns):
        return value
    if isinstance(value, Real) and not isinstance(value, bool):
        if not 0.0 <= float(value) <= 1.0 or math.isnan(value):
            raise ValueError(f"int8_outliers={value!r}; a fraction of each input's columns is from 0 to 1.")
        return OutlierColumns(fraction=float(value))
    if isinstance(value, (str, Path)):
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"int8_outliers={str(value)!r} is not a file; pass a fraction from 0 to 1 or a JSON "
                             "file of counts (calibrate_int8_outliers' result, json.dump'ed).")
        counts = from_counts(json.loads(path.read_text()), statistic)
        return replace(counts, source=f"the {statistic} columns per input in {path.name}")
    if isinstance(value, Mapping):
        return from_counts(value, statistic)
    raise TypeError(f"int8_outliers={value!r}; pass None (every column an outlier: the bound), a fraction from 0 "
                    "to 1, counts from calibrate_int8_outliers, a JSON file of them, or an OutlierColumns.")


class RunningInt8Linear:
    """While entered, the name of `model`'s LLM.int8() linear that runs now (called: None before the first): a
    forward pre-hook on each linear with an outlier threshold, on a real model and on the plan's fake one alike."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.name, self.handles = model, None, []

    def __call__(self) -> str | None:
        return self.name

    def _runs(self, name: str, *_: Any) -> None:
        self.name = name

    def __enter__(self) -> RunningInt8Linear:
        self.handles = [module.register_forward_pre_hook(partial(self._runs, name))
                        for name, module in self.model.named_modules()
                        if getattr(getattr(module, "state", None), "threshold", None) is not None]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.name = [], None


@contextmanager
def count_outliers(counts: Counts, phase: Callable[[], str], layer: Callable[[], str | None] | None = None
                   ) -> Iterator[None]:
    """Count LLM.int8()'s outlier columns of every quantized linear's input into `counts`, by `phase()` and the
    input's width: [inputs, outlier columns in all, inputs with every column an outlier, most columns in one]; with
    `layer` (a `RunningInt8Linear`), the same numbers by the linear's name too, under `counts["layers"][phase]`."""
    import bitsandbytes.functional as bnb_f

    quantize = bnb_f.int8_vectorwise_quant

    def add(line: list[int], width: int, found: int) -> None:
        line[0] += 1
        line[1] += found
        line[2] += found == width
        line[3] = max(line[3], found)

    def counting(a: torch.Tensor, threshold: float = 0.0) -> Any:
        out = quantize(a, threshold)
        if threshold > 0.0 and out[2] is not None:
            width, found, now = a.shape[-1], out[2].numel(), phase()
            add(counts.setdefault(now, {}).setdefault(str(width), [0, 0, 0, 0]), width, found)
            name = layer() if layer is not None else None
            if name is not None:
                add(counts.setdefault(LAYERS, {}).setdefault(now, {}).setdefault(name, [0, 0, 0, 0]), width, found)
        return out

    bnb_f.int8_vectorwise_quant = counting
    try:
        yield
    finally:
        bnb_f.int8_vectorwise_quant = quantize


class _Phase:
    """The phase `run.call.phase_marks` marks."""

    def __init__(self) -> None:
        self.phase = "prefill"

    def mark(self, phase: str) -> None:
        self.phase = phase


def calibrate_int8_outliers(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor],
                            new_tokens: int = 8) -> Counts:
    """Run one greedy `generate` of a model loaded in LLM.int8() (bitsandbytes, on a GPU or a CPU) on real inputs,
    and count its outlier columns (`count_outliers`): the counts a plan takes as `int8_outliers`.

    One call on the user's own weights and data measures what a plan cannot know; the counts change with the
    inputs, so calibrate on prompts (and images) like the ones to plan for.
    """
    from xcomp_lab.run.call import phase_marks

    if not any(getattr(getattr(m, "state", None), "threshold", 0.0) > 0.0 for m in model.modules()):
        raise ValueError(f"{type(model).__name__} has no LLM.int8() linear with an outlier threshold: load it with "
                         "BitsAndBytesConfig(load_in_8bit=True) (threshold 6.0) to calibrate its outlier columns.")
    family = family_of(model.config)
    decoder = model.get_submodule(family.layers.rsplit(".", 1)[0])
    vision = model.get_submodule(family.vision) if family.vision else None
    marks, counts = _Phase(), {}
    eos = model.generation_config.eos_token_id
    with phase_marks(model, marks, vision=vision, decoder=decoder), RunningInt8Linear(model) as layer, \
            count_outliers(counts, lambda: marks.phase, layer), torch.inference_mode():
        model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       pad_token_id=eos[0] if isinstance(eos, list) else eos)
    return counts
