"""LLM.int8()'s outlier columns: how many input columns of each INT8 linear reach the threshold, measured on a real
model and given to a plan.

bitsandbytes (0.50.2, `MatMul8bitLt.forward` with transformers' threshold 6.0) keeps in 16 bits the input columns
where any row reaches the threshold: it copies them, gathers and dequantizes the weight's columns and adds a second
product, every tensor in proportion to the number of those columns. Which columns do depends on the activations'
values, which a plan from a config does not have: by default the plan takes every column as one (an upper bound).
Where the columns are known, `OutlierColumns` gives the plan their number for each phase and input width:

    estimate("llama-3-8b", quantization="int8", int8_outliers=0.05)            # 5% of every input's columns
    counts = calibrate_int8_outliers(model, inputs)                             # a real INT8 model's own call
    estimate("llama-3-8b", quantization="int8", int8_outliers=counts)          # the most in one input, per width

`count_outliers` is the one counting rule (`tools.plan_matrix` records it for every INT8 call of the matrix): for
each call of `int8_vectorwise_quant` with a threshold, by phase and input width, [inputs, outlier columns in all,
inputs with every column an outlier, the most columns in one input].
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path
from typing import Any

import torch

from xcomp_lab.core.checks import check_choice
from xcomp_lab.plan.families import family_of

OUTLIER_PHASES = ("vision", "prefill", "decode")
STATISTICS = ("largest", "mean")
Counts = dict[str, dict[str, list[int]]]  # phase -> input width -> [inputs, columns, every column, most in one]


@dataclass(frozen=True)
class OutlierColumns:
    """The outlier columns an INT8 linear's input holds: a fraction of its width, or a number per phase and width.

    `columns(phase, width)`: the fraction of the width, rounded; else the table's number for the phase ("decode
    step 3" reads "decode") and width; a phase and width the table lacks gets every column (the bound).
    """

    fraction: float | None = None
    table: Mapping[str, Mapping[int, int]] = field(default_factory=dict)
    source: str = ""

    def columns(self, phase: str, width: int) -> int:
        if self.fraction is not None:
            return round(self.fraction * width)
        return min(self.table.get(phase.split()[0], {}).get(width, width), width)

    def __str__(self) -> str:
        if self.fraction is not None:
            return f"{self.fraction:.2%} of each input's columns"
        return self.source or "the columns per phase and input width given"


def from_counts(counts: Mapping[str, Mapping[Any, Any]], statistic: str = "largest") -> OutlierColumns:
    """The columns per phase and width from counts in `count_outliers`' format (a matrix record's `int8_outliers`).

    `statistic`: "largest" (the default), the most columns one input held (the 4th number; counts with three give
    the width where some input had every column an outlier, else the mean, which is then a lower estimate of it);
    "mean", the columns per input on average. The peak is reached in the layer whose input holds the most outlier
    columns (their temporaries are the size of the weight's columns), so the mean under-predicts it where the
    layers differ (the H200 matrix: down to -3%), and the largest, given to every layer, is at or above it.
    """
    check_choice("statistic", statistic, STATISTICS, "how the counts of many inputs become one number of columns")
    table: dict[str, dict[int, int]] = {}
    for phase, widths in counts.items():
        check_choice("phase", phase, OUTLIER_PHASES, f"the phases of INT8 outlier counts ({dict(counts)!r})")
        for width, line in widths.items():
            inputs, columns, every = (int(v) for v in line[:3])
            if not str(width).isdigit() or inputs < 1 or not 0 <= columns <= inputs * int(width):
                raise ValueError(f"int8_outliers[{phase!r}][{width!r}]={line!r}; each entry is [inputs, outlier "
                                 "columns in all, inputs with every column an outlier(, most in one input)] with "
                                 "at least one input, as calibrate_int8_outliers returns them.")
            mean = round(columns / inputs)
            if statistic == "largest":
                mean = int(line[3]) if len(line) > 3 else (int(width) if every else mean)
            table.setdefault(phase, {})[int(width)] = mean
    return OutlierColumns(table=table, source=f"the {statistic} columns per input of the counts given")


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
        return OutlierColumns(table=counts.table, source=f"the {statistic} columns per input in {path.name}")
    if isinstance(value, Mapping):
        return from_counts(value, statistic)
    raise TypeError(f"int8_outliers={value!r}; pass None (every column an outlier: the bound), a fraction from 0 "
                    "to 1, counts from calibrate_int8_outliers, a JSON file of them, or an OutlierColumns.")


@contextmanager
def count_outliers(counts: Counts, phase: Callable[[], str]) -> Iterator[None]:
    """Count LLM.int8()'s outlier columns of every quantized linear's input into `counts`, by `phase()` and the
    input's width: [inputs, outlier columns in all, inputs with every column an outlier, most columns in one]."""
    import bitsandbytes.functional as bnb_f

    quantize = bnb_f.int8_vectorwise_quant

    def counting(a: torch.Tensor, threshold: float = 0.0) -> Any:
        out = quantize(a, threshold)
        if threshold > 0.0 and out[2] is not None:
            width, found = a.shape[-1], out[2].numel()
            line = counts.setdefault(phase(), {}).setdefault(str(width), [0, 0, 0, 0])
            line[0] += 1
            line[1] += found
            line[2] += found == width
            line[3] = max(line[3], found)
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
    with phase_marks(model, marks, vision=vision, decoder=decoder), count_outliers(counts, lambda: marks.phase), \
            torch.inference_mode():
        model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       pad_token_id=eos[0] if isinstance(eos, list) else eos)
    return counts
