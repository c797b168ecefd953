"""The course's steps: each is one way of loading and calling the model, from the FP32 quick start to NF4.

Notebooks, the estimator's benchmark, the tests and the GPU run all take their settings from `STEPS`, so
a step means the same thing everywhere. `load_for_step()` loads the model the way the step says (dtype at
load, a cast afterwards, quantization, device placement); `run_step()` captions under the step's gradient
mode and autocast setting and returns the measured run and its results record.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Sequence

import torch

from xcomp_lab.core.dtypes import check_dtype
from xcomp_lab.course.params import CourseParams
from xcomp_lab.course.results import build_record
from xcomp_lab.course.step_table import STEPS, Step, get_step
from xcomp_lab.memory import Budget
from xcomp_lab.memory.budget import card_budget
from xcomp_lab.model.inventory import parameter_count
from xcomp_lab.model.loading import load_model, quantization_config
from xcomp_lab.run.call import CaptionRun, run_caption

__all__ = ["STEPS", "Step", "course_budget", "get_step", "load_for_step", "run_step"]


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
