"""The course's steps: each is one way of loading and calling the model, from the FP32 quick start to NF4.

Notebooks, the estimator's benchmark, the tests and the GPU run all take their settings from `STEPS`, so
a step means the same thing everywhere. `load_for_step()` loads the model the way the step says (dtype at
load, a cast afterwards, quantization, device placement); `run_step()` captions under the step's gradient
mode and autocast setting and returns the measured run and its results record.

For a checkpoint of the original model's own code (`params.original_code`, run in its environment) the same
three functions apply the original's rules from `xcomp_lab.original.steps`: its budget (`original_budget`), its
loading (`pretrained_loader`: `torch_dtype`, no `attn_implementation`; sdpa refused, the original has eager only)
and its call, `model.chat(tokenizer, query, image=<file>, history=[], do_sample=False)` as the quick start makes it
(`chat_once`), one image per call; several images (notebook 04's batch and longer prompts) as prompts of
`images_per_prompt` images through the original's `chat()` or, several prompts at once, its `generate`
(`prompts_once`).
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch

from xcomp_lab.core.dtypes import check_dtype
from xcomp_lab.course.params import CourseParams
from xcomp_lab.course.results import build_record
from xcomp_lab.course.step_table import STEPS, Step, get_step
from xcomp_lab.memory import Budget
from xcomp_lab.memory.budget import card_budget
from xcomp_lab.original.detect import ORIGINAL_ATTENTION
from xcomp_lab.run.call import CaptionRun, run_caption

__all__ = ["STEPS", "Step", "course_budget", "get_step", "load_for_step", "run_step"]


def course_budget(params: CourseParams, model_config: Any) -> Budget:
    """The budget in force for these notebook parameters (`memory.budget.card_budget`, the one rule).

    `model_config` is the model's config (so the budget is the same whatever dtype or quantization the model
    was loaded in), or FP32 parameter bytes directly.
    """
    if params.original_code:
        from xcomp_lab.original.steps import original_budget

        return original_budget(params.budget_gb, params.device, params.scale)
    from xcomp_lab.model.inventory import parameter_count

    fp32 = model_config if isinstance(model_config, int) else parameter_count(model_config) * 4
    return card_budget(params.budget_gb, params.device, fp32)


def check_original_attention(step: Step, params: CourseParams) -> None:
    """Refuse, before loading, an attention the original's code does not have (its constructor would raise)."""
    kind = step.attn_implementation or params.attn_implementation
    if kind not in ORIGINAL_ATTENTION:
        raise ValueError(f"attn_implementation={kind!r} ({step.name}): the original InternLM-XComposer2-VL-7B code has "
                         f"eager attention only ({list(ORIGINAL_ATTENTION)}); under transformers 4.33.2 its "
                         f"constructor refuses the argument. Use the replica for sdpa, or eager here.")


def load_for_step(step: Step, params: CourseParams) -> tuple[Any, Any]:
    """Load model and tokenizer as `step` says, placed on the course device."""
    if params.original_code:
        from xcomp_lab.model.loading import resolve_checkpoint
        from xcomp_lab.original.steps import original_step_for, pretrained_loader

        check_original_attention(step, params)
        path = resolve_checkpoint(params.model_name_or_path, params.scale)
        return pretrained_loader(path, params.device)(original_step_for(step))
    from xcomp_lab.model.loading import load_model, quantization_config

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
    images_per_prompt: int = 1,
) -> tuple[CaptionRun, dict[str, Any]]:
    """Caption `images` under the step's settings; returns the run and its results record.

    `images_per_prompt`: how many of `images` each prompt holds (the original's code only; the replica's prompt
    holds one image).
    """
    if params.original_code:
        run, extra = _original_chat(step, model, tokenizer, images, params, budget, extra, images_per_prompt)
    else:
        if images_per_prompt != 1:
            raise ValueError(f"images_per_prompt={images_per_prompt}: the replica's caption prompt holds one image; "
                             f"pass 1, or an original-code checkpoint, whose chat() takes several.")
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


def _original_chat(step: Step, model: Any, tokenizer: Any, images: Sequence[Any], params: CourseParams,
                   budget: Budget | None, extra: dict[str, Any] | None,
                   images_per_prompt: int) -> tuple[CaptionRun, dict[str, Any]]:
    """One quick-start `model.chat` of the original code on the image saved as a file, measured (`chat_once`).

    Several images: prompts of `images_per_prompt` images each (`prompts_once`): one prompt is one `model.chat` with
    its images at one placeholder each; several prompts run stacked through the `generate` call `chat()` makes. The
    record's extra holds the storage the KV cache keeps alive (`kv_storage_bytes`: its values are views of the
    packed wqkv outputs in the original's tuple cache).

    On a CPU, FP16/BF16 products are computed in FP32 as `original.steps.run_steps` does (`original.matmul`): the
    same tensors are measured, but their speed is not the hardware's, which the record's extra says.
    """
    from contextlib import nullcontext

    from xcomp_lab.original.matmul import FloatMatmul
    from xcomp_lab.original.steps import (
        CODE_NAME,
        chat_once,
        original_step_for,
        peak_phase,
        prompts_once,
    )

    cpu = params.device == "cpu"
    with tempfile.TemporaryDirectory(prefix="xcomp-lab-chat-") as folder, FloatMatmul() if cpu else nullcontext():
        if len(images) == 1 and images_per_prompt == 1:  # the quick start's call
            image = images[0] if isinstance(images[0], (str, Path)) else _saved(images[0], Path(folder) / "image.png")
            result, probe, seconds = chat_once(model, tokenizer, str(image), original_step_for(step), params.device,
                                               budget, params.max_new_tokens)
            captions = [result.value] if result.ok else None
        else:
            result, probe, seconds = prompts_once(model, tokenizer, images, original_step_for(step), params.device,
                                                  budget, params.max_new_tokens, images_per_prompt)
            captions = result.value if result.ok else None
    prompts = len(images) // images_per_prompt
    run = CaptionRun(captions=captions, prompt_tokens=probe.prompt_tokens, new_tokens=probe.decoder_calls * prompts,
                     seconds=seconds, memory=result.memory, oom_report=None if result.ok else result.report(),
                     after_release_bytes=result.after_release_bytes)
    matmul = "FP16/BF16 products computed in FP32 (xcomp_lab.original.matmul)" if cpu else "ATen's"
    return run, {"code": CODE_NAME, "peak_phase": peak_phase(result, probe), "matmul": matmul,
                 "kv_storage_bytes": probe.kv_storage_bytes, "images_per_prompt": images_per_prompt, **(extra or {})}


def _saved(image: Any, path: Path) -> Path:
    image.save(path)
    return path
