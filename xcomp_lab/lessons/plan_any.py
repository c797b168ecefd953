"""Notebook 09, plan your own model: the planner (`xcomp_lab.plan`) on any model, checked, inverted and validated.

- `model_name` and `config_folder`: a preset at the notebook's scale, and a model folder holding only a
  `config.json`, the way a downloaded model's configuration arrives.
- `run_on_cpu`: the planned call run for real on a tiny model under the course's CPU tensor accounting
  (`memory.measure`), to set against the planner's CPU prediction.
- `scaled_card`: at tiny scale a tiny model fits every real card; the inverse questions are asked of a card with
  a stated room above the call's reserved peak instead.
- `batch_search`: the largest batch that fits, by the planner's own bisection (`plan.inverse.bisect_largest`)
  with every plan it made kept for the chart (`search_chart`).
- `read_matrix`, `matrix_reading`, `matrix_chart`: the measured validation matrix (`results/plan-matrix-h200`,
  `tools.plan_matrix`) read back, what it says against issue 17's bars, and its chart; `reserved_repeats` and
  `reserved_alone`: its calls measured again, in a fresh process as in the matrix and alone (`merge_alone`: the
  matrix with those in place of its rows); the summary per
  architecture or quantization is `plan.validate`'s (`matrix_summary`, `matrix_table`, `matrix_markdown`,
  `measured_calls`, `bars`), which the notebook imports from there.
- `plan_chart` and `plan_widget`: one plan's phases as bars against the card, and the planner in ipywidgets.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from xcomp_lab.core.checks import check_choice, check_int, check_number
from xcomp_lab.core.jsonl import read_jsonl
from xcomp_lab.core.units import GIB, MIB, fmt_bytes
from xcomp_lab.memory.cards import CARDS, CONTEXT_BYTES, Card, card_named, machine_card
from xcomp_lab.memory.measure import MemoryResult, measure
from xcomp_lab.plan import Plan, estimate
from xcomp_lab.plan.estimate import ATTENTIONS, DTYPES, PHASES, QUANTIZATIONS
from xcomp_lab.plan.inverse import LIMITS, bisect_largest
from xcomp_lab.plan.presets import get_preset, preset_names
from xcomp_lab.plan.validate import BARS, UNDER_TOLERANCE, bars, settings_key

SCALES = ("tiny", "full")
OFF_CHART = 4  # a card more than this many times the tallest bar is named in the title, not drawn


def model_name(preset: str, scale: str) -> str:
    """The planner's name for a preset at the notebook's scale: the published size, or its tiny variant."""
    check_choice("scale", scale, SCALES, "the notebook's scale")
    check_choice("preset", preset, preset_names(), "one of the planner's presets")
    return preset if scale == "full" else f"{preset}:tiny"


def config_folder(preset: str, folder: str | Path, tiny: bool = False) -> Path:
    """Write the preset's configuration as a model folder holds it (`config.json` only, no weights); the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    get_preset(preset).config(tiny=tiny).save_pretrained(folder)
    return folder


def run_on_cpu(preset: str, *, dtype: str, attn: str, batch: int, prompt_tokens: int, new_tokens: int,
               seed: int = 0) -> MemoryResult:
    """The planned call for real: the preset's tiny variant with random weights (`plan.build.build_model`) and its
    seeded inputs, `generate` as the planner replays it (`plan.greedy_generate`), under `memory.measure("cpu")`."""
    from xcomp_lab.plan import greedy_generate
    from xcomp_lab.plan.build import build_model, make_inputs

    if get_preset(preset).is_vlm:
        raise ValueError(f"preset={preset!r} is a VLM; run_on_cpu takes a language model "
                         f"({', '.join(n for n in preset_names() if not get_preset(n).is_vlm)}).")
    inputs = make_inputs(preset, batch_size=batch, prompt_tokens=prompt_tokens, tiny=True, seed=seed)
    model = build_model(preset, dtype=dtype, attn=attn, tiny=True, seed=seed)
    with measure("cpu", model=model, label=f"{preset}:tiny generate") as m:
        greedy_generate(model, inputs, new_tokens)
    return m.result


def scaled_card(card: Card, plan: Plan, room: float = 3.0) -> Card:
    """A card whose usable memory is `room` times the plan's reserved peak (its allocated peak on CPU): the card
    the inverse questions are asked of at tiny scale, where a tiny model fits any real card with room to spare."""
    check_number("room", room, above=1, maximum=100, hint="how many times the call's peak the card holds")
    peak = plan.reserved_peak_bytes or plan.peak_bytes
    usable = round(peak * room)
    return Card(f"{card.name} shrunk to the tiny model ({room:g} x a call's reserved peak)", 0, usable + CONTEXT_BYTES,
                f"made for tiny scale: {room:g} x the reserved peak {fmt_bytes(peak)} of the planned call")


@dataclass(frozen=True)
class BatchSearch:
    """The largest batch that fits a card, and every plan the search made on the way (batch -> plan)."""

    largest: int | None  # None when batch 1 does not fit
    limit: int
    card: Card
    plans: dict[int, Plan]

    def __str__(self) -> str:
        if self.largest is None:
            return f"on {self.card.name} not even batch 1 fits"
        capped = " (the search's limit: larger batches were not tried)" if self.largest == self.limit else ""
        return f"largest batch that fits {self.card.name}: {self.largest}{capped}, in {len(self.plans)} estimates"


def batch_search(model: Any, *, card: Card, limit: int | None = None, **settings: Any) -> BatchSearch:
    """The largest batch for which `estimate(model, **settings)` fits `card` on CUDA: the planner's bisection
    (doubling from 1 while it fits, then halving the interval), each plan kept."""
    limit = LIMITS["batch"] if limit is None else check_int("limit", limit, maximum=LIMITS["batch"],
                                                            hint="the largest batch to try")
    plans: dict[int, Plan] = {}

    def fits_at(batch: int) -> Plan | None:
        plans[batch] = estimate(model, **{**settings, "batch": batch}, device="cuda", card=card)
        return plans[batch] if plans[batch].fits else None

    value, _, _ = bisect_largest(fits_at, 1, 1, limit)
    return BatchSearch(value, limit, card, dict(sorted(plans.items())))


def search_reading(search: BatchSearch) -> str:
    """What the search found, against the naive answer (the card's memory divided by the batch-1 call's)."""
    one = search.plans.get(1)
    if one is None or search.largest is None:
        return str(search) + "."
    naive = search.card.usable_bytes / one.reserved_peak_bytes
    text = (f"The card holds {naive:.1f} times the batch-1 call's reserved peak; the largest batch that fits is "
            f"{search.largest}, {'more' if search.largest > naive else 'fewer' if search.largest < naive else 'as many'}"
            f" than that.")
    if search.largest > 1:
        step = (search.plans[search.largest].reserved_peak_bytes - one.reserved_peak_bytes) / (search.largest - 1)
        text += (f" Each prompt added to the batch costs {fmt_bytes(step)} of reserved memory on average, "
                 f"{step / one.reserved_peak_bytes:.0%} of the batch-1 call's: what grows with the batch is the "
                 f"KV cache, the activations and the logits (and the segments the allocator takes for them), not "
                 f"the weights.")
    return text


def _figure(width: float, height: float, columns: int = 1) -> tuple[Figure, Any]:
    """A pyplot figure closed to pyplot: the notebook displays the returned figure once."""
    fig, axes = plt.subplots(1, columns, figsize=(width, height))
    plt.close(fig)
    return fig, axes


def _unit(largest_bytes: float) -> tuple[float, str]:
    """MiB where everything drawn is below 1 GiB, else GiB."""
    return (MIB, "MiB") if largest_bytes < GIB else (GIB, "GiB")


def search_chart(search: BatchSearch, title: str = "") -> Figure:
    """Predicted allocated and reserved peak against batch, the card's usable memory as a line."""
    batches = list(search.plans)
    allocated = [search.plans[b].peak_bytes for b in batches]
    reserved = [search.plans[b].reserved_peak_bytes for b in batches]
    scale, unit = _unit(max(reserved + [search.card.usable_bytes]))
    fig, ax = _figure(7, 3.6)
    ax.plot(batches, [v / scale for v in reserved], "o-", label="max_memory_reserved (predicted)")
    ax.plot(batches, [v / scale for v in allocated], "s--", label="max_memory_allocated (predicted)")
    ax.axhline(search.card.usable_bytes / scale, color="red", linewidth=1, label=f"usable on {search.card.name}")
    if search.largest is not None:
        ax.axvline(search.largest, color="grey", linestyle=":", label=f"largest batch that fits: {search.largest}")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="batch (prompts generated together)", ylabel=unit, title=title or "Peak of one generate call")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------ the measured validation

def read_matrix(folder: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """(compare.jsonl rows, records.jsonl records, env.json) of a `tools.plan_matrix` results folder."""
    folder = Path(folder)
    missing = [name for name in ("compare.jsonl", "records.jsonl", "env.json") if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {missing}; it is written by `python -m xcomp_lab.tools.plan_matrix "
                                f"--device cuda --out {folder}` then `--compare --out {folder}`.")

    def lines(name: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (folder / name).read_text().splitlines() if line.strip()]

    return lines("compare.jsonl"), lines("records.jsonl"), json.loads((folder / "env.json").read_text())


def matrix_reading(summary: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> str:
    """One sentence per finding, every figure computed from the rows: coverage, the planner's largest errors
    against the issue's bars (median <= 1% and worst <= 2% allocated, <= 3% reserved, no under-prediction over 1%),
    and accelerate's."""
    predicted = [r for r in rows if r.get("error_allocated") is not None and r.get("error_reserved") is not None]
    if not predicted:
        return "No call of the matrix has a prediction yet: run `python -m xcomp_lab.tools.plan_matrix --compare`."
    alloc = max(predicted, key=lambda r: abs(r["error_allocated"]))
    resv = max(predicted, key=lambda r: abs(r["error_reserved"]))
    worst_median = max((s for s in summary if s["median_allocated"] is not None),
                       key=lambda s: abs(s["median_allocated"]))
    under = sum(s["under_1pct"] for s in summary)
    holds = bars(predicted)
    anchors = [r["accelerate_error_allocated"] for r in rows if r.get("accelerate_error_allocated") is not None]
    missed = [name for name, ok in holds.items() if not ok]

    def call(r: dict[str, Any]) -> str:
        return (f"{r['preset']} {r['quantization']} {r['attn']} batch {r['batch']}, {r['prompt_tokens']} prompt "
                f"tokens")

    text = [f"{len(predicted)} of {len(rows)} compared calls have a prediction.",
            (f"The planner's largest error on the allocated peak is {alloc['error_allocated']:+.2%} ({call(alloc)}), "
            f"on the reserved peak {resv['error_reserved']:+.2%} ({call(resv)}); the largest median allocated error "
            f"of an architecture is {worst_median['median_allocated']:+.2%} ({worst_median['group']}); "
            f"{under} call(s) under-predicted by more than 1%."),
            "The issue's bars: " + ("all hold." if not missed else f"not met: {', '.join(missed)}; met: "
                                    f"{', '.join(n for n in holds if n not in missed) or 'none'}.")]
    if anchors:
        text.append(f"accelerate's weights-only figure is below the measured allocated peak on "
                    f"{sum(a < 0 for a in anchors)} of {len(anchors)} calls, by {-statistics.median(anchors):.1%} "
                    f"at the median and up to {-min(anchors):.1%}.")
    return "\n".join(text)


def reserved_repeats(folder: str | Path, rows: Sequence[dict[str, Any]]) -> str:
    """The calls measured again in fresh processes (`<folder>/repeats/*/records.jsonl`) beside the matrix's own
    measurement and the plan of each (`rows`, compare.jsonl): how many runs reproduced their reserved peak to the
    byte, then one line for each call whose runs differ or whose plan is more than 1% off: every run's reserved
    peak, how far apart, and the planned one."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for path in [Path(folder) / "records.jsonl", *sorted(Path(folder).glob("repeats/*/records.jsonl"))]:
        for r in read_jsonl(path):
            if r.get("reserved_peak") is not None:
                runs.setdefault(settings_key(r), []).append(r)
    planned = {r["settings"]: r for r in rows if r.get("predicted_reserved") is not None}
    repeated = {k: [r["reserved_peak"] for r in measured] for k, measured in runs.items()
                if len(measured) > 1 and k in planned}
    if not repeated:
        return f"No call in {folder} was measured more than once."
    same = sum(len(set(reserved)) == 1 for reserved in repeated.values())
    runs_per_call = sorted({len(reserved) for reserved in repeated.values()})
    span = " to ".join(str(n) for n in dict.fromkeys((runs_per_call[0], runs_per_call[-1])))
    lines = [f"{len(repeated)} calls measured {span} times: {same} reserved the same "
             f"bytes every time, {len(repeated) - same} did not; the allocated peak was the same to the byte in "
             f"{sum(len({r['allocated_peak'] for r in runs[k]}) == 1 for k in repeated)}."]
    for k, reserved in repeated.items():
        plan, r = planned[k]["predicted_reserved"], runs[k][0]
        off = [plan / b - 1 for b in reserved]
        if len(set(reserved)) == 1 and abs(off[0]) <= 0.01:
            continue
        lines.append(f"- {_call(r)}: reserved {' / '.join(fmt_bytes(b) for b in reserved)} "
                     f"({max(reserved) / min(reserved) - 1:.1%} apart); planned {fmt_bytes(plan)} "
                     f"({', '.join(f'{e:+.2%}' for e in off)})")
    return "\n".join(lines)


def reserved_alone(matrix_rows: Sequence[dict[str, Any]], alone_rows: Sequence[dict[str, Any]]) -> str:
    """The calls measured again alone (`alone_rows`: each in a fresh process that loads the model and makes that call,
    the call a plan predicts; a folder's env.json gives each process's command) beside the same calls in the matrix
    (`matrix_rows`: each build's calls made one after the other in one process, `empty_cache()` between them): the
    plan's reserved error against each, how many are within 3% and under-predicted by more than 1%, one line per call
    the matrix under-predicts by more than 1%, and issue 17's bars over the matrix with these calls as measured
    alone (`merge_alone`)."""
    in_matrix = {r["settings"]: r for r in matrix_rows if r.get("error_reserved") is not None}
    pairs = [(in_matrix[r["settings"]], r) for r in alone_rows
             if r.get("error_reserved") is not None and r["settings"] in in_matrix]
    if not pairs:
        return "No call measured alone has a prediction and a matrix measurement to set it beside."
    n = len(pairs)
    furthest = sorted(in_matrix.values(), key=lambda r: -abs(r["error_reserved"]))[:n]
    if {r["settings"] for r in furthest} == {m["settings"] for m, _ in pairs}:
        smallest = min(abs(m["error_reserved"]) for m, _ in pairs)
        chosen = (f"The {n} calls the matrix put furthest from the plan on the reserved peak (|error| {smallest:.2%} "
                  "and more)")
    else:
        chosen = f"{n} calls of the matrix"

    def tally(rows: list[dict[str, Any]]) -> str:
        within = sum(abs(r["error_reserved"]) <= BARS["worst reserved <= 3%"] for r in rows)
        under = sum(r["error_reserved"] < -UNDER_TOLERANCE for r in rows)
        worst = max(rows, key=lambda r: abs(r["error_reserved"]))
        return (f"within 3% on {within}, under-predicted by more than 1% on {under}, largest error "
                f"{worst['error_reserved']:+.2%} ({_call(worst)})")

    allocated_apart = max(abs(a["measured_allocated"] / m["measured_allocated"] - 1) for m, a in pairs)
    lines = [f"{chosen}, each measured again alone. The plan's reserved peak:",
             f"- against the matrix's run: {tally([m for m, _ in pairs])}",
             f"- against the call alone:   {tally([a for _, a in pairs])}",
             f"The allocated peaks of the two runs are at most {allocated_apart:.3%} apart. The calls the matrix "
             f"under-predicts by more than 1%:"]
    for m, a in sorted(pairs, key=lambda p: p[0]["error_reserved"]):
        if m["error_reserved"] < -UNDER_TOLERANCE:
            lines.append(f"- {_call(m)}: reserved {fmt_bytes(m['measured_reserved'])} in the matrix (plan "
                         f"{m['error_reserved']:+.2%}), {fmt_bytes(a['measured_reserved'])} alone "
                         f"({a['error_reserved']:+.2%})")
    merged = merge_alone(list(in_matrix.values()), [a for _, a in pairs])
    verdicts = "; ".join(f"{bar}: {'holds' if held else 'does not hold'}" for bar, held in bars(merged).items())
    lines.append(f"The matrix's {len(merged)} calls with these {n} as measured alone, against issue 17's bars: "
                 f"{verdicts}.")
    return "\n".join(lines)


def merge_alone(matrix_rows: Sequence[dict[str, Any]], alone_rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The matrix's rows with each call measured alone (`alone_rows`, the same settings) in place of its own row."""
    alone = {r["settings"]: r for r in alone_rows}
    return [alone.get(r["settings"], r) for r in matrix_rows]


def _call(row: dict[str, Any]) -> str:
    return f"{row['preset']} {row['quantization']} {row['attn']} batch {row['batch']}, {row['prompt_tokens']} tokens"


def matrix_chart(rows: Sequence[dict[str, Any]]) -> Figure:
    """Measured against predicted peaks (GiB), allocated and reserved, one colour per architecture; accelerate's
    weights-only figure as grey crosses on the allocated side; the diagonal is a perfect prediction."""
    fig, axes = _figure(11, 4.6, columns=2)
    predicted = [r for r in rows if r.get("predicted_allocated") is not None]
    top = max([r["measured_allocated"] for r in rows] + [r["measured_reserved"] for r in rows]) / GIB * 1.05
    for ax, key in zip(axes, ("allocated", "reserved")):
        for arch in sorted({r["architecture"] for r in predicted}):
            points = [(r[f"measured_{key}"] / GIB, r[f"predicted_{key}"] / GIB) for r in predicted
                      if r["architecture"] == arch and r.get(f"predicted_{key}") is not None]
            ax.scatter(*zip(*points), s=14, label=arch)
        if key == "allocated":
            anchors = [(r["measured_allocated"] / GIB, r["accelerate_bytes"] / GIB) for r in rows
                       if r.get("accelerate_bytes")]
            if anchors:
                ax.scatter(*zip(*anchors), marker="x", s=12, color="grey", label="accelerate estimate-memory")
        ax.plot([0, top], [0, top], color="black", linewidth=0.6)
        ax.set(xlabel=f"measured max_memory_{key} (GiB)", ylabel="predicted (GiB)", title=f"{key} peak per call")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------ one plan, a widget

def plan_chart(plan: Plan) -> Figure:
    """The plan's phases: allocated and reserved peak as bars, the card's usable memory as a line (named in the
    title instead where it would flatten the bars)."""
    names = [p for p in PHASES if p in plan.phases]
    allocated = [plan.phases[p].allocated for p in names]
    reserved = [plan.phases[p].reserved or 0 for p in names]
    tallest = max(allocated + reserved)
    usable = plan.card.usable_bytes if plan.card is not None else None
    on_chart = usable is not None and usable <= OFF_CHART * tallest
    scale, unit = _unit(max([tallest] + ([usable] if on_chart else [])))
    fig, ax = _figure(6, 3.2)
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [v / scale for v in allocated], width=0.4, label="allocated")
    if any(reserved):
        ax.bar([x + 0.2 for x in xs], [v / scale for v in reserved], width=0.4, label="reserved")
    title = f"{plan.model}: peak per phase"
    if on_chart:
        ax.axhline(usable / scale, color="red", linewidth=1, label=f"usable on {plan.card.name}")
    elif usable is not None:
        title += f"\n({plan.card.name}: {fmt_bytes(usable)} usable, off the chart)"
    ax.set_xticks(list(xs), names)
    ax.set(ylabel=unit, title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def widget_models() -> list[str]:
    """The models the widget offers: every preset at full size, then its tiny variant."""
    return preset_names() + [f"{name}:tiny" for name in preset_names()]


def widget_cards() -> list[Card]:
    """This machine's GPU first (where there is one), then the catalogue by the memory PyTorch sees."""
    own = machine_card()
    return ([own] if own else []) + sorted(CARDS.values(), key=lambda c: (c.total_bytes, c.name))


def plan_widget(model: str = "llama-3-8b", card: str | Card = "L40S", *, initial: Plan | None = None,
                device: str = "cuda") -> Any:
    """The planner in ipywidgets: model, card, dtype, quantization, attention, batch, prompt and new tokens; press
    Predict for the plan's table and chart. `initial` is shown first (no estimate is made until Predict)."""
    import ipywidgets as widgets

    card = card if isinstance(card, Card) else card_named(card)
    check_choice("model", model, widget_models(), "a preset, ':tiny' for its tiny variant")
    settings = initial.settings if initial is not None else {}
    controls = {
        "model": widgets.Dropdown(options=widget_models(), value=model, description="model"),
        "card": widgets.Dropdown(options=[(c.name, c) for c in widget_cards()], value=card, description="card"),
        "dtype": widgets.Dropdown(options=list(DTYPES), value=settings.get("dtype", "bf16"), description="dtype"),
        "quantization": widgets.Dropdown(options=list(QUANTIZATIONS), value=settings.get("quantization", "none"),
                                      description="quantization"),
        "attn": widgets.Dropdown(options=list(ATTENTIONS), value=settings.get("attn", "sdpa"), description="attention"),
        "batch": widgets.BoundedIntText(value=settings.get("batch", 1), min=1, max=LIMITS["batch"],
                                     description="batch"),
        "prompt_tokens": widgets.BoundedIntText(value=settings.get("prompt_tokens", 512), min=1, max=131072,
                                             description="prompt tokens"),
        "new_tokens": widgets.BoundedIntText(value=settings.get("new_tokens", 32), min=1, max=LIMITS["new_tokens"],
                                          description="new tokens"),
    }
    button = widgets.Button(description="Predict", button_style="primary")
    output = widgets.Output()

    def show(plan: Plan) -> None:
        output.outputs = ()
        output.append_stdout(plan.table() + "\n")
        output.append_display_data(plan_chart(plan))

    def predict(_: Any = None) -> None:
        # Filled through `outputs` rather than `with output:`, which can stall a headless client (papermill, nbval).
        values = {name: w.value for name, w in controls.items()}
        try:
            plan = estimate(values.pop("model"), **values, device=device)
        except (ValueError, TypeError) as exc:
            output.outputs = ()
            output.append_stdout(f"error: {exc}\n")
            return
        show(plan)

    button.on_click(predict)
    rows = list(controls.values())
    box = widgets.VBox([widgets.HBox(rows[:2]), widgets.HBox(rows[2:5]), widgets.HBox([*rows[5:], button]), output])
    if initial is not None:
        show(initial)
    return box
