"""Predict the memory of a captioning call without allocating it: weights, KV cache, activations, the peak.

How: the replica is built from its configuration under `FakeTensorMode` (tensors with shapes, dtypes and
storages but no data) in the dtype asked for, and quantized by the real bitsandbytes modules and functions,
whose ops have fake kernels. Then the computation `experiment.run_caption` makes is replayed on it: images
encoded and spliced into the chat prompt by `captioning.prompt_batch` (the text parts tokenized for real),
and the course's greedy loop written out, because its stopping checks read data: a prefill forward with
full logits, then decode forwards on the model's own cache, keeping alive what the loop keeps. With the
replica's `config.original_memory` (the default) that is `run.generate.legacy_greedy_search`, transformers
4.33.2's loop: each step's outputs (the prefill's logits in decode step 1) and the cache's tensors as the step
began, through the next forward; otherwise transformers 5's (the prefill logits until the last-token copy is
taken, the previous step's scores). The prompt embeddings stay alive in both, under the same gradient mode and
autocast. Every allocation is counted by `memory.measure`'s own CPU accounting, so on CPU the prediction is
what `measure` reports, to a few bytes.

Decode steps from the second on only grow (the cache and the attention span get one token longer each step,
the ops are the same), so by default decode step 1 (which also holds what the prefill left) and the last decode
step are simulated, the cache fast-forwarded to its length between them: the same peaks, several times faster.
`exact_decode=True` simulates every step.

For device="cuda" the same simulation runs on CPU kernels' shapes with CUDA's rules applied: allocations
rounded up to 512 bytes as the caching allocator does (so the peak means `torch.cuda.max_memory_allocated`),
softmax from FP16 to FP32 in one kernel as CUDA does, and the temporaries bitsandbytes' CUDA kernels
allocate inside one op (the dequantized 4-bit weight when many rows are multiplied, the int32 product of
LLM.int8()). `Estimate.notes` says what is assumed and what is left out in each case.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from xcomp_lab.core.checks import check_choice
from xcomp_lab.core.units import fmt_bytes
from xcomp_lab.course.params import CourseParams
from xcomp_lab.course.steps import Step
from xcomp_lab.estimate.accounting import BNB_FUSED_MAX_ROWS, CudaSoftmax, SimulatedAccounting, stored_bytes
from xcomp_lab.estimate.call import CaptionCall, check_call, resolve_budget
from xcomp_lab.estimate.fake import build_fake_model, quant_state_tensors
from xcomp_lab.estimate.replay import course_tokenizer, replay
from xcomp_lab.estimate.result import Estimate
from xcomp_lab.memory import Budget
from xcomp_lab.memory.budget import card_limit_bytes
from xcomp_lab.model.configuration_internlm_xcomposer2 import InternLMXcomposer2Config
from xcomp_lab.model.inventory import parameter_count
from xcomp_lab.model.scales import config_for_scale
from xcomp_lab.model.tokenizer import CAPTION_QUERY

COURSE_BUDGET = "course"  # estimate_step's default: the budget the course puts in force for these params


def estimate_notes(device: str, quantization: str, use_autocast: bool, exact_decode: bool, quant_bytes: int,
           new_tokens: int) -> tuple[str, ...]:
    notes = ["Assumes all new tokens are generated (no early end-of-turn)."]
    if not exact_decode and new_tokens > 3:
        notes.append(f"Decode steps 2 to {new_tokens - 2} fast-forwarded (the cache grown in place): each decode "
                     "step repeats the last one's ops on fewer tokens, so its peak is below the last step's (decode "
                     "step 1, which also holds what the prefill left, is simulated); exact_decode=True simulates "
                     "every step.")
    if quantization == "int8":
        notes.append("LLM.int8() outlier columns depend on the activations' values: assumed none (a few bytes "
                     "per outlier column and token).")
    if quant_bytes:
        notes.append(f"Weights include {fmt_bytes(quant_bytes)} of bitsandbytes statistics (absmax/SCB), which "
                     "are not parameters: CPU accounting does not count them, CUDA does.")
    if device == "cuda":
        notes.append("CUDA simulated on this host's CPU kernels' shapes: allocations rounded up to 512 bytes, "
                     "softmax FP16->FP32 fused as CUDA does, bitsandbytes CUDA temporaries added (4-bit: weight "
                     f"dequantized above {BNB_FUSED_MAX_ROWS} rows; int8: the int32 product); sdpa's kernel "
                     "picked as on CPU.")
        notes.append("Not included: cuBLAS/cuBLASLt workspaces (a few MiB to 32 MiB), other kernels' internal "
                     "scratch, and fragmentation (reserved memory above the allocated peak).")
        if use_autocast:
            notes.append("torch.cuda.amp.autocast() simulated by CPU autocast at float16: the same FP16 copies "
                         "of weights, but CUDA's op lists differ in places (CUDA runs layer_norm in FP32).")
    return tuple(notes)


def estimate_from(acc: SimulatedAccounting, call: CaptionCall, *, label: str, device: str, weights: int, kv: int,
                   simulated_kv: int, prompt_tokens: int, quant_bytes: int, seconds: float,
                   notes: tuple[str, ...]) -> Estimate:
    """The Estimate an accounting's replay gives (one device's weights, cache and peak)."""
    crossing = acc.crossing
    return Estimate(
        label=label, device=device, settings=call.settings(),
        weights_bytes=weights, kv_cache_bytes=kv, activations_bytes=max(acc.peak - weights - kv, 0),
        peak_bytes=acc.peak, prompt_tokens=prompt_tokens, new_tokens=call.new_tokens,
        quant_state_bytes=quant_bytes, autocast_copies_bytes=acc.copies_at_peak, peak_phase=acc.peak_phase,
        simulated_kv_cache_bytes=simulated_kv, phase_peaks=dict(acc.phase_peaks),
        budget_bytes=acc.budget_limit, oom=None if acc.budget_limit is None else crossing is not None,
        oom_op=crossing and crossing.op, oom_location=crossing and crossing.location,
        oom_phase=crossing and crossing.phase, oom_in_use_bytes=crossing and crossing.in_use,
        seconds=seconds, notes=notes,
    )


def estimate_caption(
    model_or_config_or_scale: Any,
    *,
    dtype: str | torch.dtype | None = None,
    quantization: str | None = None,
    grad: str = "inference_mode",
    use_autocast: bool = False,
    attn_implementation: str | None = None,
    batch_size: int = 1,
    image_size: int | None = None,
    new_tokens: int = 16,
    device: str = "cpu",
    budget: Budget | int | None = None,
    tokenizer: Any = None,
    query: str = CAPTION_QUERY,
    label: str = "",
    exact_decode: bool = False,
) -> Estimate:
    """Predict one captioning call (`run_caption` with these settings) without allocating its memory.

    `model_or_config_or_scale`: "tiny" / "full", an `InternLMXcomposer2Config`, or a loaded replica (whose
    dtype, quantization and attention kind are taken when not given). Otherwise `dtype` defaults to
    float32, `quantization` to "none", `attn_implementation` to "eager". `budget` (a Budget or bytes):
    also predict whether, and at which op, the call would cross it. `tokenizer`: the course's by default.
    For a model split over several GPUs by a device map, see `xcomp_lab.estimate.split`.
    """
    start = time.perf_counter()
    call = check_call(model_or_config_or_scale, dtype=dtype, quantization=quantization, grad=grad,
                       use_autocast=use_autocast, attn_implementation=attn_implementation, batch_size=batch_size,
                       image_size=image_size, new_tokens=new_tokens, device=device)
    cuda = call.device == "cuda"
    limit = resolve_budget(budget, call.device)

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True, static_shapes=True)
    fake = build_fake_model(call.config, call.dtype, call.quantization, fake_mode)
    statistics = quant_state_tensors(fake)
    (stored,) = stored_bytes([*fake.parameters(), *fake.buffers(), *statistics], cuda).values()
    weights = sum(stored.values())
    quant_bytes = sum(stored[key] for key in {t.untyped_storage()._cdata for t in statistics})

    acc = SimulatedAccounting(weights, limit, cuda=cuda, autocast_on=use_autocast)
    with fake_mode:
        # The decoded images: not counted.
        pixels = [torch.empty(3, call.image_size, call.image_size) for _ in range(batch_size)]
        with acc, (CudaSoftmax() if cuda else contextlib.nullcontext()):
            replayed = replay(fake, tokenizer or course_tokenizer(), pixels, query=query, image_size=call.image_size,
                               new_tokens=new_tokens, grad=grad, use_autocast=use_autocast,
                               exact_decode=exact_decode, acc=acc)

    kv = call.kv_cache_bytes(replayed.prompt_tokens)
    notes = estimate_notes(call.device, call.quantization, use_autocast, exact_decode, quant_bytes, new_tokens)
    if replayed.cache_bytes != kv:
        notes += (f"The simulated cache holds {replayed.cache_bytes:,} bytes, the formula gives {kv:,}.",)
    return estimate_from(acc, call, label=label, device=call.device, weights=weights, kv=kv,
                          simulated_kv=replayed.cache_bytes, prompt_tokens=replayed.prompt_tokens,
                          quant_bytes=quant_bytes, seconds=time.perf_counter() - start, notes=notes)


def course_budget_bytes(params: CourseParams, config: InternLMXcomposer2Config | None = None) -> int:
    """The limit `steps.course_budget` enforces for `params`, worked out without a GPU (`card_limit_bytes`)."""
    return card_limit_bytes(params.budget_gb, params.device, parameter_count(config or params.scale) * 4)


def estimate_step(step: Step, params: CourseParams, *, budget: Budget | int | str | None = COURSE_BUDGET,
                  tokenizer: Any = None, exact_decode: bool = False) -> Estimate:
    """Predict a course step as `run_step` runs it with these notebook parameters.

    The step gives dtype (its cast, if any), quantization, gradient mode, autocast and possibly the attention
    kind; `params` give scale (or the checkpoint's configuration), device, batch size, image size, new tokens
    and attention. `budget="course"` uses the budget the course enforces for `params`.
    """
    if not isinstance(step, Step):
        raise TypeError(f"step must be a Step (e.g. xcomp_lab.course.steps.STEPS['fp16']), got {type(step).__name__}")
    if not isinstance(params, CourseParams):
        raise TypeError(f"params must be CourseParams from check_params(...), got {type(params).__name__}")
    if params.model_name_or_path is None:
        config = config_for_scale(params.scale)
    else:
        from transformers import AutoTokenizer

        config = InternLMXcomposer2Config.from_pretrained(params.model_name_or_path)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(params.model_name_or_path, trust_remote_code=True)
    if isinstance(budget, str):
        check_choice("budget", budget, [COURSE_BUDGET], "or a Budget, a limit in bytes or None")
        budget = course_budget_bytes(params, config)
    return estimate_caption(
        config, dtype=step.cast or step.dtype, quantization=step.quantization, grad=step.grad,
        use_autocast=step.use_autocast, attn_implementation=step.attn_implementation or params.attn_implementation,
        batch_size=params.batch_size, image_size=params.image_size, new_tokens=params.max_new_tokens,
        device=params.device, budget=budget, tokenizer=tokenizer, label=step.name, exact_decode=exact_decode,
    )
