"""The course's steps: each is one way of loading and calling the model, from the FP32 quick start to NF4.

Notebooks, the estimator's benchmark, the tests and the GPU run all take their settings from `STEPS`, so
a step means the same thing everywhere. `load_for_step()` loads the model the way the step says (dtype at
load, a cast afterwards, quantization, device placement); `run_step()` captions under the step's gradient
mode and autocast setting and returns the measured run and its results record.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from xcomp_lab.core.dtypes import check_dtype
from xcomp_lab.course.params import CourseParams
from xcomp_lab.course.results import build_record
from xcomp_lab.memory import Budget
from xcomp_lab.memory.budget import card_budget
from xcomp_lab.model.inventory import parameter_count
from xcomp_lab.model.loading import load_model, quantization_config
from xcomp_lab.run.call import CaptionRun, run_caption


@dataclass(frozen=True)
class Step:
    """How one step loads and calls the model."""

    name: str
    title: str
    dtype: str = "float32"  # dtype at load (`from_pretrained(dtype=...)`)
    cast: str | None = None  # dtype set after loading, as `.half()` does
    quantization: str = "none"  # "none" | "int8" | "nf4"
    grad: str = "no_grad"  # the quick start's torch.set_grad_enabled(False)
    use_autocast: bool = True  # the quick start's torch.cuda.amp.autocast()
    attn_implementation: str | None = None  # None: the step follows the notebook parameter

    def describe(self) -> str:
        load = f"dtype={self.dtype} at load" + (f", then .to({self.cast})" if self.cast else "")
        quant = f", {self.quantization} (bitsandbytes)" if self.quantization != "none" else ""
        grad = {"no_grad": "no_grad", "inference_mode": "inference_mode", "enabled": "gradients enabled"}[self.grad]
        amp = " + autocast" if self.use_autocast else ""
        return f"{self.title}: {load}{quant}; {grad}{amp}"


STEPS: dict[str, Step] = {
    s.name: s
    for s in (
        Step("fp32-quickstart", "FP32, the official quick start"),
        Step("fp32-no-autocast", "FP32 without autocast", use_autocast=False),
        Step("fp32-inference-mode", "FP32, autocast inside inference_mode", grad="inference_mode"),
        Step("fp32-grad-enabled", "FP32, no_grad forgotten", grad="enabled", use_autocast=False),
        Step("fp16-half", "FP32 load, then .half()", cast="float16"),
        Step("fp16", "FP16 at load", dtype="float16"),
        Step("bf16", "BF16 at load", dtype="bfloat16", use_autocast=False, grad="inference_mode"),
        Step("fp16-sdpa", "FP16, sdpa attention", dtype="float16", attn_implementation="sdpa"),
        Step("int8", "INT8 (LLM.int8())", dtype="float16", quantization="int8", use_autocast=False),
        Step("nf4", "NF4, double quantization", dtype="float16", quantization="nf4", use_autocast=False),
    )
}


def get_step(name: str) -> Step:
    if name not in STEPS:
        raise ValueError(f"Unknown step {name!r}; the course's steps are {list(STEPS)}.")
    return STEPS[name]


def course_budget(params: CourseParams, model_config: Any) -> Budget:
    """The budget in force for these notebook parameters (`memory.budget.card_budget`, the one rule).

    `model_config` is the model's config (so the budget is the same whatever dtype or quantization the model
    was loaded in), or FP32 parameter bytes directly.
    """
    fp32 = model_config if isinstance(model_config, int) else parameter_count(model_config) * 4
    return card_budget(params.budget_gb, params.device, fp32)


def load_for_step(step: Step, params: CourseParams) -> tuple[Any, Any]:
    """Load model and tokenizer as `step` says, placed on the course device."""
    compute = check_dtype(step.cast or step.dtype)
    quant = quantization_config(step.quantization, compute_dtype=compute if compute != torch.float32 else torch.float16)
    device_map = {"": params.device} if params.device == "cuda" and step.cast is None else None
    model, tokenizer = load_model(
        params.model_name_or_path,
        scale=params.scale,
        dtype=step.dtype,
        quantization_config=quant,
        device_map=device_map,
        attn_implementation=step.attn_implementation or params.attn_implementation,
    )
    if step.cast is not None:
        model = model.to(check_dtype(step.cast))
        if params.device == "cuda":
            model = model.cuda()
    return model, tokenizer


def run_step(
    step: Step,
    model: Any,
    tokenizer: Any,
    images: Sequence[Any],
    params: CourseParams,
    budget: Budget | None,
    *,
    predicted_peak_bytes: int | None = None,
    extra: dict[str, Any] | None = None,
) -> tuple[CaptionRun, dict[str, Any]]:
    """Caption `images` under the step's settings; returns the run and its results record."""
    run = run_caption(
        model,
        tokenizer,
        images,
        device=params.device,
        max_new_tokens=params.max_new_tokens,
        grad=step.grad,
        use_autocast=step.use_autocast,
        budget=budget,
        image_size=params.image_size,
        label=step.name,
    )
    record = build_record(
        step.name,
        {**params.as_dict(), "step": asdict(step)},
        run.memory,
        tokens_per_s=run.tokens_per_s,
        caption=run.captions[0] if run.ok else None,
        predicted_peak_bytes=predicted_peak_bytes,
        extra={"prompt_tokens": run.prompt_tokens, "new_tokens": run.new_tokens, **(extra or {})},
    )
    return run, record
