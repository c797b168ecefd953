"""The planner: pick a card, a dtype, a quantization, batch, image size and new tokens; see the predicted peak.

`plan()` is a plain function (it works in papermill and scripts); `planner()` wraps it in ipywidgets with
a chart that updates when "Predict" is pressed. Predictions come from `estimate.estimate_caption`, which
replays the captioning call on fake tensors, so nothing is allocated. The replica's modules are imported where they
are used, so that this module imports under the original's transformers 4.33.2 too.

`predict_original_steps()` predicts the measured steps of the original model's own code with its estimator
(`xcomp_lab.original.estimate.estimate_original`, which replays the original's `model.chat` on fake tensors).

A card is named (`memory.cards.CARDS`: the memory PyTorch sees on it), or given by its marketed size
(`card_gb=24`: the course's card of that class, the RTX 4090), or is the GPU in this machine (`machine_card()`).
Its budget follows the course's one rule (`memory.budget.card_limit_bytes`): what PyTorch sees on the card less
the CUDA context on CUDA, that figure scaled to the model on a CPU.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib.figure import Figure

from xcomp_lab.core.checks import BATCH_SIZE, check_int, check_number
from xcomp_lab.core.dtypes import DTYPE_NAMES
from xcomp_lab.core.units import fmt_bytes
from xcomp_lab.course.charts import steps_chart
from xcomp_lab.course.params import CourseParams
from xcomp_lab.memory.budget import card_budget_bytes, card_limit_bytes
from xcomp_lab.memory.cards import CARDS, Card, card_named, card_of_size, machine_card

if TYPE_CHECKING:
    from xcomp_lab.estimate import Estimate

DEFAULT_CARD_GB = 48  # the story's card class: the course's card for it is the L40S
GPU_PRESETS_GB = (16, 24, 40, 48, 80)  # sizes the error for a bad card_gb suggests


def size_card(gb: float) -> Card:
    """The course's card for a marketed size (`memory.cards.card_of_size`), checked as the planner takes sizes."""
    check_number("card_gb", gb, maximum=1000, hint=f"a card size in GB such as {GPU_PRESETS_GB}")
    return card_of_size(gb)


def card_label(card: Card) -> str:
    """How the planner lists a card: its name, marketed size and what PyTorch sees on it."""
    return f"{card.name} ({card.marketed_gb} GB, PyTorch sees {fmt_bytes(card.total_bytes)})"


def card_choices(card_gb: float = DEFAULT_CARD_GB) -> list[Card]:
    """The cards the planner offers: this machine's GPU first (where there is one), the catalogue by the memory
    PyTorch sees, and the card of `card_gb` where it is not in the catalogue."""
    cards = sorted(CARDS.values(), key=lambda c: (c.total_bytes, c.name))
    own = machine_card()
    of_size = size_card(card_gb)
    return ([own] if own else []) + cards + ([] if of_size in cards else [of_size])


def resolve_card(card: str | Card) -> Card:
    """A card by its catalogue name (see `memory.cards.CARDS`), or a `Card` (e.g. `machine_card()`) as it is."""
    return card if isinstance(card, Card) else card_named(card)


@dataclass(frozen=True)
class Plan:
    """A prediction for one configuration on one card."""

    card_gb: float
    budget_bytes: int
    estimate: Estimate
    card: Card

    @property
    def fits(self) -> bool:
        return not self.estimate.oom

    def record(self) -> dict[str, Any]:
        """The estimate in the results-record shape the charts read."""
        e = self.estimate
        return {
            "step": e.label,
            "weights_bytes": e.weights_bytes,
            "kv_cache_bytes": e.kv_cache_bytes,
            "activations_bytes": e.activations_bytes,
            "peak_bytes": e.peak_bytes,
            "budget_bytes": self.budget_bytes,
            "oom": bool(e.oom),
            "predicted_peak_bytes": e.peak_bytes,
        }

    def line(self) -> str:
        """One line: the card, the configuration, the predicted peak against the budget and the verdict."""
        return (f"{self.card.name}, {self.estimate.label}: predicted peak {fmt_bytes(self.estimate.peak_bytes)} of "
                f"{fmt_bytes(self.budget_bytes)} -> {'fits' if self.fits else 'does not fit'}")


def plan(
    card_gb: float = DEFAULT_CARD_GB,
    dtype: str = "float16",
    quantization: str = "none",
    batch_size: int = 1,
    image_size: int | None = None,
    new_tokens: int = 16,
    attn_implementation: str = "eager",
    scale: str = "full",
    device: str = "cuda",
    card: str | Card | None = None,
) -> Plan:
    """Predict a captioning call (inference_mode, no autocast) on a card.

    `card`: a card by name (`plan(card="L4")`) or a `Card` (`machine_card()`); without it, the course's card of
    the marketed size `card_gb` (`plan(24)`: the RTX 4090). A `card_gb` other than the default must agree with
    the named card's size.
    """
    from xcomp_lab.estimate import estimate_caption
    from xcomp_lab.model.inventory import parameter_count
    from xcomp_lab.model.scales import check_scale

    check_number("card_gb", card_gb, maximum=1000, hint=f"a card size in GB such as {GPU_PRESETS_GB}")
    check_scale(scale)
    fp32_bytes = parameter_count(scale) * 4
    if card is None:
        chosen, budget = size_card(card_gb), card_limit_bytes(card_gb, device, fp32_bytes)
    else:
        chosen = resolve_card(card)
        if card_gb not in (DEFAULT_CARD_GB, chosen.marketed_gb):
            raise ValueError(f"card_gb={card_gb!r} and card={chosen.name!r} ({chosen.marketed_gb} GB) disagree: give "
                             f"the card alone, or card_gb alone for the course's card of that size")
        budget = card_budget_bytes(chosen, device, fp32_bytes)
    label = f"{dtype}{'' if quantization == 'none' else '+' + quantization}, batch {batch_size}"
    estimate = estimate_caption(
        scale,
        dtype=dtype,
        quantization=quantization,
        grad="inference_mode",
        attn_implementation=attn_implementation,
        batch_size=batch_size,
        image_size=image_size,
        new_tokens=new_tokens,
        device=device,
        budget=budget,
        label=label,
    )
    return Plan(float(chosen.marketed_gb if card is not None else card_gb), budget, estimate, chosen)


def plan_chart(result: Plan) -> Figure:
    """The predicted peak as a stacked bar against the card's budget."""
    verdict = "fits" if result.fits else "does not fit"
    return steps_chart([result.record()], budget_bytes=result.budget_bytes, title=f"{result.card.name}: {verdict}")


def planner(scale: str = "full", device: str = "cuda", card_gb: float = DEFAULT_CARD_GB) -> Any:
    """An ipywidgets planner: controls, a Predict button, the verdict table and the chart.

    The card list is `card_choices()`; the course's card of `card_gb` is selected at first.
    """
    import ipywidgets as widgets

    from xcomp_lab.model.loading import QUANTIZATIONS
    from xcomp_lab.model.modeling_internlm_xcomposer2 import SUPPORTED_ATTENTION

    cards = card_choices(card_gb)
    controls = dict(
        card=widgets.Dropdown(options=[(card_label(c), c) for c in cards], value=size_card(card_gb),
                              description="card", layout=widgets.Layout(width="max-content")),
        dtype=widgets.Dropdown(options=DTYPE_NAMES, value="float16", description="dtype"),
        quantization=widgets.Dropdown(options=QUANTIZATIONS, value="none", description="quantization"),
        batch_size=widgets.IntSlider(value=1, min=1, max=8, description="batch"),
        image_size=widgets.IntSlider(value=490 if scale == "full" else 112, min=112, max=980, step=14,
                                     description="image px"),
        new_tokens=widgets.IntSlider(value=16, min=1, max=512, description="new tokens"),
        attn_implementation=widgets.Dropdown(options=SUPPORTED_ATTENTION, value="eager", description="attention"),
    )
    button = widgets.Button(description="Predict", button_style="primary")
    output = widgets.Output()

    def predict(_: Any = None) -> None:
        # Filled through its `outputs` rather than `with output:`: capturing into an Output widget while a
        # headless client (papermill, nbval) runs the cell can leave nbclient waiting forever.
        result = plan(**{k: w.value for k, w in controls.items()}, scale=scale, device=device)
        output.outputs = ()
        output.append_stdout(result.estimate.table() + "\n")
        output.append_display_data(plan_chart(result))

    button.on_click(predict)
    rows = list(controls.values())
    box = widgets.VBox([widgets.HBox(rows[:1]), widgets.HBox(rows[1:4]), widgets.HBox([*rows[4:], button]), output])
    predict()
    return box


@dataclass(frozen=True)
class BatchSearch:
    """The planner's answer to "how many images at once?" and the peaks it predicted on the way."""

    largest: int  # the largest batch that fits; 0 when one image does not
    peaks: dict[int, int]  # predicted peak per batch size tried (where the replay stopped, for one that did not fit)
    budget_bytes: int
    capped: bool  # the search stopped at its limit with the batch still fitting: the answer is a lower bound
    card: Card


def search_largest(try_batch: Callable[[int], tuple[int, bool]], limit: int = 256) -> tuple[int, dict[int, int], bool]:
    """Largest batch in 1..`limit` for which `try_batch(batch)` -> (peak, fits) fits: doubling, then bisection.

    Batches 1 and 2 are always tried (the per-image cost the worked solution reads); returns the largest batch,
    the peaks tried and whether `limit` itself fitted.
    """
    check_int("limit", limit, minimum=2, hint="the largest batch to try")
    peaks: dict[int, int] = {}

    def fits(batch: int) -> bool:
        peaks[batch], ok = try_batch(batch)
        return ok

    first, second = fits(1), fits(2)
    if not first:
        return 0, peaks, False
    if not second:
        return 1, peaks, False
    low, high = 2, None
    while high is None and low < limit:
        batch = min(2 * low, limit)
        if fits(batch):
            low = batch
        else:
            high = batch
    if high is None:
        return low, peaks, True
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low, peaks, False


def largest_batch(params: CourseParams, dtype: str = "float16", quantization: str = "none",
                  limit: int = 256, card: str | Card | None = None) -> BatchSearch:
    """The planner's largest batch at this notebook's scale, image size, new tokens and attention, on its card
    (the course's card of `budget_gb`) or on `card` (a name or a `Card`)."""
    BATCH_SIZE.check("limit", limit, minimum=2, hint="the largest batch to try")
    plans: list[Plan] = []

    def try_batch(batch: int) -> tuple[int, bool]:
        result = plan(params.budget_gb if card is None else DEFAULT_CARD_GB, dtype=dtype, quantization=quantization,
                      batch_size=batch, image_size=params.image_size, new_tokens=params.max_new_tokens,
                      attn_implementation=params.attn_implementation, scale=params.scale, device=params.device,
                      card=card)
        plans.append(result)
        return result.estimate.peak_bytes, result.fits

    largest, peaks, capped = search_largest(try_batch, limit)
    return BatchSearch(largest, peaks, plans[0].budget_bytes, capped, plans[0].card)


@dataclass(frozen=True)
class OriginalPrediction:
    """The original-code estimator's prediction for one measured step, or why there is none."""

    step: str
    peak_bytes: int | None  # None: the estimator cannot replay how this step loads
    peak_phase: str | None
    oom: bool | None  # predicted against the budget the step was measured under
    reason: str | None = None  # why there is no prediction
    seconds: float | None = None  # how long the replay took


def predict_original_steps(measured: Mapping[str, dict[str, Any]], checkpoint: str | Path, *, scale: str, device: str,
                           image: str | Path, max_new_tokens: int, names: Sequence[str] | None = None,
                           workers: int | None = None) -> dict[str, OriginalPrediction]:
    """Predict each measured step (`{step: record}` from the results file) that is an original-code step, with
    `estimate_original` on `device` ("cpu": the tensor accounting's figure; "cuda": the allocator's simulation);
    the OOM verdict compares the prediction with the budget the record names. Steps the estimator cannot load
    (transformers' own bitsandbytes and device_map loads) get a reason instead, and so do steps left out of
    `names` (None: every step; a replay of the full model takes minutes on one CPU core).

    Each replay runs on one core: `workers` processes run them side by side, each started fresh and prepared for
    transformers 4.33.2 (`original.environment`), which costs seconds; by default one per step (at most the
    machine's cores) at full scale, where a replay takes minutes, and none (this process) at the small one.
    """
    from xcomp_lab.original.steps import ORIGINAL_STEPS

    out: dict[str, OriginalPrediction] = {}
    todo: list[str] = []
    for name in measured:
        step = ORIGINAL_STEPS.get(name)
        if step is None:
            continue
        if names is not None and name not in names:
            out[name] = OriginalPrediction(name, None, None, None, f"not among the steps predicted here ({', '.join(names)})")
        elif step.recipe not in ("load", "plora") or step.device_map is not None:
            out[name] = OriginalPrediction(name, None, None, None, f"loads through from_pretrained ({step.recipe}"
                                           f"{', device_map=' + step.device_map if step.device_map else ''}), which "
                                           "the estimator does not replay")
        else:
            todo.append(name)
    if workers is None:
        workers = max(1, min(len(todo), os.cpu_count() or 1)) if scale == "full" else 1
    check_int("workers", workers, minimum=1, hint="processes replaying steps side by side")
    replay = functools.partial(_replay_step, checkpoint=checkpoint, scale=scale, image=image, device=device,
                               max_new_tokens=max_new_tokens)
    if workers == 1 or len(todo) < 2:
        estimates = map(replay, todo)
    else:
        pool = ProcessPoolExecutor(min(workers, len(todo)), mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_prepare_worker)
        with pool:
            estimates = list(pool.map(replay, todo))
    for name, estimate in zip(todo, estimates):
        budget = measured[name].get("budget_bytes")
        out[name] = OriginalPrediction(name, estimate.peak_bytes, estimate.peak_phase,
                                       None if budget is None else estimate.peak_bytes > budget,
                                       seconds=estimate.seconds)
    return {name: out[name] for name in measured if name in out}


def _prepare_worker() -> None:
    """A replay process: transformers 4.33.2 prepared as in the notebook's kernel (its variables are inherited)."""
    from xcomp_lab.original.environment import prepare_transformers

    prepare_transformers({})


def _replay_step(name: str, *, checkpoint: str | Path, scale: str, image: str | Path, device: str,
                 max_new_tokens: int) -> Any:
    from xcomp_lab.original.estimate import estimate_original

    return estimate_original(name, checkpoint, scale=scale, image=image, device=device, max_new_tokens=max_new_tokens)
