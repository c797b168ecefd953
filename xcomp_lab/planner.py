"""The planner: pick a card, a dtype, a quantization, batch, image size and new tokens; see the predicted peak.

`plan()` is a plain function (it works in papermill and scripts); `planner()` wraps it in ipywidgets with
a chart that updates when "Predict" is pressed. Predictions come from `estimate.estimate_caption`, which
replays the captioning call on fake tensors, so nothing is allocated. At `scale="tiny"` the card's size is
scaled to the tiny model as the course's CPU budget is (same ratio to the FP32 weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from matplotlib.figure import Figure

from .charts import steps_chart
from .estimate import Estimate, estimate_caption
from .memory import Budget
from .model.scales import check_scale
from .steps import FULL_FP32_WEIGHT_BYTES
from .units import gb_to_bytes

GPU_PRESETS_GB = (16, 24, 40, 48, 80)
DTYPES = ("float32", "float16", "bfloat16")
QUANTIZATIONS = ("none", "int8", "nf4")
ATTENTION = ("eager", "sdpa")


@dataclass(frozen=True)
class Plan:
    """A prediction for one configuration on one card."""

    card_gb: float
    budget_bytes: int
    estimate: Estimate

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


def card_budget_bytes(card_gb: float, scale: str) -> int:
    """A card's bytes at full scale; at tiny scale the same ratio to the FP32 weights, as the course's CPU budget."""
    if check_scale(scale) == "full":
        return gb_to_bytes(card_gb)
    from .estimate import parameter_count

    tiny_fp32 = parameter_count("tiny") * 4
    return Budget.scaled_to(tiny_fp32, gb=card_gb, full_fp32_weight_bytes=FULL_FP32_WEIGHT_BYTES).limit_bytes


def plan(
    card_gb: float = 48,
    dtype: str = "float16",
    quantization: str = "none",
    batch_size: int = 1,
    image_size: int | None = None,
    new_tokens: int = 16,
    attn_implementation: str = "eager",
    scale: str = "full",
    device: str = "cuda",
) -> Plan:
    """Predict a captioning call (inference_mode, no autocast) on a `card_gb` card."""
    if card_gb not in GPU_PRESETS_GB and not 0 < card_gb <= 1000:
        raise ValueError(f"card_gb={card_gb!r}; give a card size in GB such as {GPU_PRESETS_GB}.")
    budget = card_budget_bytes(card_gb, scale)
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
    return Plan(card_gb, budget, estimate)


def plan_chart(result: Plan) -> Figure:
    """The predicted peak as a stacked bar against the card's budget."""
    verdict = "fits" if result.fits else "does not fit"
    return steps_chart([result.record()], budget_bytes=result.budget_bytes,
                       title=f"{result.card_gb:g} GB card: {verdict}")


def planner(scale: str = "full", device: str = "cuda") -> Any:
    """An ipywidgets planner: controls, a Predict button, the verdict table and the chart."""
    import ipywidgets as widgets

    controls = dict(
        card_gb=widgets.Dropdown(options=GPU_PRESETS_GB, value=48, description="card (GB)"),
        dtype=widgets.Dropdown(options=DTYPES, value="float16", description="dtype"),
        quantization=widgets.Dropdown(options=QUANTIZATIONS, value="none", description="quantization"),
        batch_size=widgets.IntSlider(value=1, min=1, max=8, description="batch"),
        image_size=widgets.IntSlider(value=490 if scale == "full" else 112, min=112, max=980, step=14, description="image px"),
        new_tokens=widgets.IntSlider(value=16, min=1, max=512, description="new tokens"),
        attn_implementation=widgets.Dropdown(options=ATTENTION, value="eager", description="attention"),
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
    box = widgets.VBox([widgets.HBox(list(controls.values())[:4]), widgets.HBox([*list(controls.values())[4:], button]), output])
    predict()
    return box
