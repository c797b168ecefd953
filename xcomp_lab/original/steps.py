"""Every course step through the original remote code's `model.chat`, measured and recorded as the course does.

Runs in the original's environment (`xcomp_lab.original.environment.prepare_transformers` first). Each
`OriginalStep` follows one of the course's steps (`xcomp_lab.course.step_table.STEPS`: dtype at load, a cast
after it, gradient mode, autocast) or adds what only the original needs shown (bitsandbytes through transformers
and the two recipes of `xcomp_lab.original.quantize`, `device_map="auto"`, `.half()` without autocast).
`run_steps()` loads the model as each step says, captions one image with `model.chat(tokenizer, query,
image=..., history=[], do_sample=False)` exactly as the quick start calls it, under `xcomp_lab.memory`'s
measurement and the course's budget (`memory.budget.card_budget`, the one rule; on CUDA also the 48 x 10^9-byte
rule DESIGN.md's section 6 figures were measured under), and writes one `xcomp_lab.course.results` record per
step: the same fields as the course's records, with the code, its files' digest, the versions and the checkpoint
in `extra`. A step that runs out of memory under its budget is run once more without one (`extra.unbudgeted`),
so its full peak is known too. A step whose load or call fails otherwise (the bitsandbytes TypeError) is recorded
with that error, as it happened.

Where the peak falls is recorded as the phase it happened in: "vision", "prefill", "decode-1" (the first new
token after the prefill), "decode-2", ...
"""

from __future__ import annotations

import gc
import hashlib
import traceback
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from time import perf_counter
from typing import Any

import torch

from xcomp_lab.core.checks import check_choice, check_int
from xcomp_lab.core.dtypes import check_dtype
from xcomp_lab.core.units import fmt_bytes
from xcomp_lab.course.results import append_result, build_record
from xcomp_lab.course.step_table import STEPS, Step
from xcomp_lab.memory.budget import Budget, card_budget, card_bytes, resolve_device
from xcomp_lab.memory.measure import Measurement
from xcomp_lab.memory.oom import GuardedResult, model_frame, run_guarded
from xcomp_lab.model.original import CODE_FILES, original_parameter_count
from xcomp_lab.original.environment import versions
from xcomp_lab.original.matmul import FloatMatmul
from xcomp_lab.original.multi_image import answer_prompts, prompt_images
from xcomp_lab.original.prompts import IMAGE_PLACEHOLDER, model_image
from xcomp_lab.original.quantize import quantize_plora, skip_plora_config
from xcomp_lab.run.modes import autocast, grad_mode

QUERY = "<ImageHere>Please describe this image in detail."  # the model card's quick start query
RECIPES = ("load", "transformers", "plora", "skip")
DESIGN_RULE = "design-48e9"  # DESIGN.md section 6's budget: a 48 GB card as 48 x 10^9 bytes (44.70 GiB)
# What a step's load or call may raise that is its result, recorded as it happened: the bitsandbytes layers'
# TypeError, the original's dtype mismatch without autocast, an argument transformers 4.33.2 passes on to the model.
STEP_FAILURES = (TypeError, RuntimeError, ValueError)
# Why the original's quantized recipes run under autocast: chat() preprocesses the image with torchvision's
# ToTensor, which makes it in torch's default dtype (FP32), and the vision tower casts its features back to the
# image's dtype, so an FP16 projector receives FP32 features and F.linear refuses them ("mat1 and mat2 must have
# the same dtype") unless autocast casts them, as the quick start's autocast does.
NEEDS_AUTOCAST = "FP16 weights need autocast in the original's chat(): its image features come back in FP32"
# The same without autocast, where the step has none (BF16 at load): the image is given as chat() also takes it, a
# preprocessed tensor, in the dtype the tower casts it to anyway, so its features come back in the projector's.
IMAGE_AS_TENSOR = ("without autocast chat() refuses a file's FP32 image features in a 16-bit projector: the image is "
                   "passed preprocessed, in the vision tower's dtype (original.prompts.model_image)")
IMAGE_INPUTS = ("file", "tensor")
CODE_NAME = "original remote code (InternLM-XComposer2-VL-7B, transformers 4.33.2)"


@dataclass(frozen=True)
class OriginalStep:
    """One measured chat of the original code: a course step, and how the original must be loaded for it.

    `recipe`: "load" (as the course step loads: dtype, cast), "transformers" (bitsandbytes through transformers'
    own `quantization_config`, as the usual advice says), "plora" (`quantize_plora` after an FP16 load), "skip"
    (`skip_plora_config`). `budget_rule`: "course" or DESIGN_RULE (CUDA only). `image`: how `chat()` gets the
    image, "file" (the quick start's path) or "tensor" (`original.prompts.model_image`, see IMAGE_AS_TENSOR).
    """

    name: str
    step: Step
    recipe: str = "load"
    device_map: str | None = None
    budget_rule: str = "course"
    note: str = ""
    image: str = "file"

    def __post_init__(self) -> None:
        check_choice("image", self.image, IMAGE_INPUTS, "how chat() gets the image: the file, or a tensor")

    @property
    def load_key(self) -> tuple[Any, ...]:
        """Steps with the same key can share one loaded model (before any cast)."""
        return (self.step.dtype, self.step.quantization, self.recipe, self.device_map, self.step.attn_implementation)


def _variant(name: str, step: str, **changes: Any) -> Step:
    return replace(STEPS[step], name=name, **changes)


ORIGINAL_STEPS: dict[str, OriginalStep] = {s.name: s for s in (
    OriginalStep("fp32-quickstart", STEPS["fp32-quickstart"]),
    OriginalStep("fp32-quickstart-48e9", STEPS["fp32-quickstart"], budget_rule=DESIGN_RULE,
                 note="the quick start under DESIGN.md section 6's 48 x 10^9-byte budget (44.70 GiB)"),
    OriginalStep("fp32-no-autocast", STEPS["fp32-no-autocast"]),
    OriginalStep("fp32-inference-mode", STEPS["fp32-inference-mode"]),
    OriginalStep("fp32-grad-enabled", STEPS["fp32-grad-enabled"],
                 note="chat() is decorated with @torch.no_grad(): forgetting no_grad outside changes nothing"),
    OriginalStep("fp32-device-map", _variant("fp32-device-map", "fp32-no-autocast", title="FP32, device_map='auto'"),
                 device_map="auto"),
    OriginalStep("fp16-half", STEPS["fp16-half"]),
    OriginalStep("fp16-half-no-autocast", _variant("fp16-half-no-autocast", "fp16-half",
                                                   title="FP32 load, then .half(), without autocast",
                                                   use_autocast=False)),
    OriginalStep("fp16", STEPS["fp16"]),
    OriginalStep("bf16", STEPS["bf16"], image="tensor", note=IMAGE_AS_TENSOR),
    OriginalStep("fp16-sdpa", STEPS["fp16-sdpa"],
                 note="the original has eager attention and (on CUDA, transformers >= 4.34) flash-attention 2 only"),
    OriginalStep("int8", STEPS["int8"], recipe="transformers", note="load_in_8bit as the usual advice says"),
    OriginalStep("int8-plora", _variant("int8-plora", "int8", title="INT8, PLoRA-aware (quantize_plora), autocast",
                                       use_autocast=True), recipe="plora", note=NEEDS_AUTOCAST),
    OriginalStep("int8-skip", _variant("int8-skip", "int8", title="INT8, PLoRA layers skipped, autocast",
                                      use_autocast=True), recipe="skip", note=NEEDS_AUTOCAST),
    OriginalStep("nf4", STEPS["nf4"], recipe="transformers", note="load_in_4bit as the usual advice says"),
    OriginalStep("nf4-plora", _variant("nf4-plora", "nf4", title="NF4, PLoRA-aware (quantize_plora), autocast",
                                       use_autocast=True), recipe="plora", note=NEEDS_AUTOCAST),
    OriginalStep("nf4-skip", _variant("nf4-skip", "nf4", title="NF4, PLoRA layers skipped, autocast",
                                      use_autocast=True), recipe="skip", note=NEEDS_AUTOCAST),
)}


def get_original_step(name: str) -> OriginalStep:
    """The original-code step of that name (see ORIGINAL_STEPS)."""
    return ORIGINAL_STEPS[check_choice("step", name, list(ORIGINAL_STEPS), "an original-code step")]


Loader = Callable[[OriginalStep], tuple[Any, Any]]  # step -> (model, tokenizer), placed on the device, not yet cast


def pretrained_loader(path: str | Path, device: str) -> Loader:
    """Load as a user of the released checkpoint does: `AutoModel.from_pretrained(path, trust_remote_code=True)`.

    FP32 steps pass no dtype (transformers 4.33.2 loads FP32 by default, as the quick start relies on); the others
    pass `torch_dtype`; quantized ones a `device_map` as transformers requires. The model is moved to `device`.
    """
    from transformers import AutoModel, AutoTokenizer, BitsAndBytesConfig

    from xcomp_lab.model.bnb_cpu import apply_cpu_path

    def load(step: OriginalStep) -> tuple[Any, Any]:
        options: dict[str, Any] = {"trust_remote_code": True}
        dtype = check_dtype(step.step.dtype)
        if dtype != torch.float32:
            options["torch_dtype"] = dtype
        if step.step.attn_implementation is not None:
            options["attn_implementation"] = step.step.attn_implementation
        quantized = step.step.quantization != "none" and step.recipe in ("transformers", "skip")
        if step.device_map is not None:
            options["device_map"] = step.device_map
        elif quantized:  # "cuda:0", not "cuda": accelerate 0.23 re-wraps a parameter whose device differs from
            # the map's by name, which re-quantizes a Params4bit already quantized (ValueError: ... got torch.uint8)
            options["device_map"] = {"": resolve_device(device)}
        if quantized and step.recipe == "skip":
            options["quantization_config"] = skip_plora_config(step.step.quantization, dtype)
        elif quantized and step.step.quantization == "int8":
            options["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        elif quantized:
            options["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype)
        default = torch.get_default_dtype()
        try:
            model = AutoModel.from_pretrained(path, **options)
        finally:
            torch.set_default_dtype(default)  # 4.33.2 can leave a quantized load's dtype as the default
        if "device_map" not in options:
            model = model.to(device)
        if step.recipe == "plora":
            quantize_plora(model, step.step.quantization, compute_dtype=dtype)
        if step.step.quantization == "nf4" and device == "cpu":
            apply_cpu_path(model)  # the course's portable 4-bit CPU kernel, the same on every processor
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        return model.eval(), tokenizer

    return load


def direct_loader(files_dir: str | Path, device: str, scale: str) -> Loader:
    """Build the original model with random weights straight on `device`, as `from_pretrained` would leave it.

    `files_dir` holds a checkpoint's files but no weights (`xcomp_lab.model.original.write_model_files`). The
    remote code's classes are imported from it as transformers imports them for a checkpoint, and the model is
    constructed under `torch.device(device)` and the step's dtype as the default dtype, which is what
    `from_pretrained(torch_dtype=...)` does too: the same parameters and buffers (rotary tables in the load dtype),
    without writing and reading 17 GB of shards. CLIP's `from_pretrained` inside the constructor builds the tower
    from its configuration instead (random weights either way). Only the "load" and "plora" recipes can be built so.
    """
    from unittest import mock

    from transformers import AutoTokenizer, CLIPVisionConfig, CLIPVisionModel
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from xcomp_lab.model.original import AUTO_MAP, MODEL_CLASS, clip_config

    folder = Path(files_dir)
    config_class = get_class_from_dynamic_module(AUTO_MAP["AutoConfig"], folder)
    model_class = get_class_from_dynamic_module(MODEL_CLASS, folder)
    config = config_class.from_pretrained(folder)
    vision = CLIPVisionConfig(**clip_config(scale)["vision_config"])
    expected = original_parameter_count(scale)

    def load(step: OriginalStep) -> tuple[Any, Any]:
        if step.recipe not in ("load", "plora") or step.device_map is not None:
            raise ValueError(f"{step.name} loads through from_pretrained ({step.recipe}, device_map="
                             f"{step.device_map}); a model built directly cannot show it: use pretrained_loader.")
        dtype = check_dtype(step.step.dtype)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with mock.patch.object(CLIPVisionModel, "from_pretrained", lambda *_, **__: CLIPVisionModel(vision)), \
                    torch.device(device):
                model = model_class(config)
        finally:
            torch.set_default_dtype(previous)
        count = sum(p.numel() for p in model.parameters())
        if count != expected:
            raise RuntimeError(f"built {count:,} parameters, not the {expected:,} of the original at scale {scale!r}")
        if step.recipe == "plora":
            quantize_plora(model, step.step.quantization, compute_dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        return model.eval(), tokenizer

    return load


def code_digest(code_dir: str | Path) -> str:
    """A sha256 over the five remote-code files, naming exactly the code that ran."""
    digest = hashlib.sha256()
    for name in CODE_FILES:
        digest.update((Path(code_dir) / name).read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class _Probe:
    """What hooks on the model see during one chat: prompt length, decoder calls, the peak so far at each phase."""

    meter: Measurement | None = None
    prompt_tokens: int = 0
    decoder_calls: int = 0
    marks: list[tuple[str, int]] = field(default_factory=list)  # (phase, peak so far when it began), CUDA only
    kv_bytes: int = 0  # the cache's keys and values, as tensors
    kv_storage_bytes: int = 0  # the storages they keep alive (the values are views of the packed wqkv outputs)


@contextmanager
def _probe(model: Any, probe: _Probe) -> Iterator[None]:
    def mark(label: str) -> None:
        if probe.meter is None:
            return
        probe.meter.mark(label)
        if probe.meter.is_cuda:
            probe.marks.append((label, torch.cuda.max_memory_allocated(probe.meter.device)))

    def on_vision(*_: Any) -> None:
        mark("vision")

    def on_decoder(_module: Any, args: tuple, kwargs: dict) -> None:
        probe.decoder_calls += 1
        embeds = kwargs.get("inputs_embeds")
        if probe.decoder_calls == 1 and embeds is not None:
            probe.prompt_tokens = int(embeds.shape[1])
        mark("prefill" if probe.decoder_calls == 1 else f"decode-{probe.decoder_calls - 1}")

    def after_decoder(_module: Any, _args: Any, output: Any) -> None:
        cache = getattr(output, "past_key_values", None) or ()
        tensors = [t for layer in cache for t in layer]
        probe.kv_bytes = sum(t.numel() * t.element_size() for t in tensors)
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        probe.kv_storage_bytes = sum(storages.values())

    handles = [model.vit.register_forward_pre_hook(on_vision),
               model.model.register_forward_pre_hook(on_decoder, with_kwargs=True),
               model.model.register_forward_hook(after_decoder)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def peak_phase(result: GuardedResult, probe: _Probe) -> str | None:
    """The phase during which the measured peak was reached ("prefill", "decode-1", ...), None if unknown."""
    memory = result.memory
    if memory.kind == "cuda-allocator":
        before = [label for label, peak in probe.marks if peak < memory.peak_bytes]
        return before[-1] if before else None
    phase, best, current = None, -1, None
    for _, allocated, label in memory.timeline:
        if label and label not in ("start", "end"):
            current = label
        if allocated > best:
            best, phase = allocated, current
    return phase


def step_budget(step: OriginalStep, device: str, budget_gb: float, scale: str) -> Budget:
    """The budget a step runs under: the course's rule for `budget_gb`, or DESIGN.md's 48 x 10^9 bytes on CUDA."""
    if step.budget_rule == DESIGN_RULE:
        if device == "cpu":
            raise ValueError(f"{step.name} uses DESIGN.md's 48 x 10^9-byte rule, which is a CUDA card's: run it on "
                             "a GPU, or choose the course's steps on a CPU.")
        return Budget(device=device, limit_bytes=48 * 10**9, card_gb=48.0,
                      card="48 x 10^9 bytes, the rule DESIGN.md section 6's figures were measured under")
    return card_budget(budget_gb, device, original_parameter_count(scale) * 4)


def original_budget(budget_gb: float, device: str, scale: str) -> Budget:
    """The course's card for an original-code checkpoint at `scale`: the card itself on CUDA; on a CPU the card
    less the FP32 weights the scale lacks against the full model.

    Why not the replica's rule (the card scaled by the FP32 weights, `card_budget`): the original hard-codes its
    widths, so its small build keeps the full model's activations (4096-wide decoder, 1024-wide CLIP, 1225 image
    tokens) while its weights are about 1% of the full model's; scaled by the weights, even the fixes' activations
    exceed the card. Here the activations get the room the real card leaves them, and what the build does not hold
    (31 of 32 decoder layers, most of the vocabulary) is taken off the card as the FP32 bytes those weights would
    take. What the small build then cannot show: the quick start's FP16 autocast copies grow with the layers run
    before the peak, so with one layer they are far too few to run out of memory; the notebooks print that extra.
    """
    if device.startswith("cuda"):
        return card_budget(budget_gb, device, original_parameter_count(scale) * 4)
    usable, card = card_bytes(budget_gb)
    lacking = (original_parameter_count("full") - original_parameter_count(scale)) * 4
    if lacking >= usable:
        raise ValueError(f"budget_gb={budget_gb:g} leaves {fmt_bytes(usable)}, less than the {fmt_bytes(lacking)} of "
                         f"FP32 weights the {scale!r} build lacks; choose a card of at least 40 GB.")
    return Budget(device="cpu", limit_bytes=usable - lacking, card_gb=float(budget_gb),
                  card=f"{card}, less the {fmt_bytes(lacking)} of FP32 weights the {scale} build does not hold")


def original_step_for(step: Step) -> OriginalStep:
    """The original-code step for a course step: the one of that name in ORIGINAL_STEPS, or the step loaded as is."""
    known = ORIGINAL_STEPS.get(step.name)
    return known if known is not None and known.step == step else OriginalStep(step.name, step)


def chat_once(model: Any, tokenizer: Any, image: str, step: OriginalStep, device: str, budget: Budget | None,
              max_new_tokens: int) -> tuple[GuardedResult, _Probe, float]:
    """One `model.chat` under the step's gradient mode and autocast, measured; returns (result, probe, seconds).

    The timeline is sampled at every allocation on a CPU, so the phase of the peak is exact there; on CUDA at every
    256th (the peak itself is the allocator's counter). `image` is a file; the chat gets it as the step says
    (`OriginalStep.image`), preprocessed inside the measurement where it is a tensor.
    """
    def chat() -> str:
        given = model_image(model, image) if step.image == "tensor" else image
        response, _ = model.chat(tokenizer, QUERY, image=given, history=[], do_sample=False,
                                 max_new_tokens=max_new_tokens)
        return response

    return _measured(chat, model, step, device, budget)


def prompts_once(model: Any, tokenizer: Any, images: Sequence[Any], step: OriginalStep, device: str,
                 budget: Budget | None, max_new_tokens: int, images_per_prompt: int = 1
                 ) -> tuple[GuardedResult, _Probe, float]:
    """Answer the quick start's query on prompts of `images_per_prompt` images each (PIL images), measured as
    `chat_once`; the value is the list of answers. One prompt is one `model.chat`; several run stacked through
    the `generate` call `chat()` makes (`original.multi_image.answer_prompts`)."""
    prompt_images(images, images_per_prompt)  # refuse a batch the prompts cannot hold before measuring
    query = QUERY.removeprefix(IMAGE_PLACEHOLDER)
    return _measured(lambda: answer_prompts(model, tokenizer, images, query, max_new_tokens, images_per_prompt),
                     model, step, device, budget)


def _measured(call: Callable[[], Any], model: Any, step: OriginalStep, device: str,
              budget: Budget | None) -> tuple[GuardedResult, _Probe, float]:
    probe = _Probe()
    sample_every = 1 if device == "cpu" else 256

    def guarded() -> Any:
        with grad_mode(step.step.grad), autocast(device, step.step.use_autocast), _probe(model, probe):
            value = call()
        probe.meter.set_kv_cache_bytes(probe.kv_bytes)
        return value

    def keep(meter: Measurement) -> None:
        probe.meter = meter

    start = perf_counter()
    result = run_guarded(guarded, device, model=model, budget=budget, label=step.name, on_start=keep,
                         sample_every=sample_every)
    probe.meter = None  # the measurement holds the model: let it go with the step
    return result, probe, perf_counter() - start


def _cast(model: Any, step: OriginalStep, device: str) -> Any:
    if step.step.cast is None:
        return model
    return model.to(check_dtype(step.step.cast)).to(device)


def run_steps(names: Sequence[str], loader: Loader, *, image: str, device: str, scale: str, code_dir: str | Path,
              checkpoint: str, results_path: str | Path | None = None, budget_gb: float = 48,
              max_new_tokens: int = 16, rerun_unbudgeted: bool = True, float_matmul: bool | None = None,
              environment_notes: Sequence[str] = (), progress: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run the original-code steps `names` in order and return (and append to `results_path`) their records.

    Consecutive steps with the same `load_key` share one loaded model; a step with a cast (`.half()`) casts it in
    place, so put the uncast steps of a load first (ORIGINAL_STEPS' order does). `float_matmul` (default: on a
    CPU) computes FP16/BF16 products in FP32 (`xcomp_lab.original.matmul`), which changes their speed, not the
    tensors measured: tokens/s are then not recorded. On a CPU the peak's phase is exact (`chat_once`).
    """
    steps = [get_original_step(name) for name in names]
    check_int("max_new_tokens", max_new_tokens)
    float_matmul = device == "cpu" if float_matmul is None else float_matmul
    common = {"code": CODE_NAME, "code_sha256": code_digest(code_dir), "versions": versions(),
              "checkpoint": checkpoint, "scale": scale, "environment": list(environment_notes),
              "matmul": "FP16/BF16 products computed in FP32 (xcomp_lab.original.matmul)" if float_matmul else "ATen's"}
    params = {"scale": scale, "device": device, "budget_gb": float(budget_gb), "model_name_or_path": checkpoint,
              "batch_size": 1, "image_size": None, "max_new_tokens": max_new_tokens, "attn_implementation": "eager",
              "seed": 0, "results_path": None if results_path is None else str(results_path)}
    records: list[dict[str, Any]] = []
    model = tokenizer = None
    loaded: tuple[Any, ...] | None = None
    cast: str | None = None
    for step in steps:
        progress(f"[{step.name}] {step.step.describe()}")
        extra: dict[str, Any] = {**common, "recipe": step.recipe, "device_map": step.device_map, "note": step.note}
        if loaded != step.load_key or (cast is not None and cast != step.step.cast):
            previous = None if model is None else weakref.ref(model)
            model = tokenizer = None
            gc.collect()
            # A previous model still referenced would count in this step's start (on CUDA): recorded, to be seen.
            extra["previous_model_freed"] = previous is None or previous() is None
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            start = perf_counter()
            try:
                model, tokenizer = loader(step)
            except STEP_FAILURES as error:  # the failure is the step's result, recorded as it happened
                extra.update(load_error=f"{type(error).__name__}: {error}", load_location=_location(error))
                records.append(_record(step, params, None, extra, results_path))
                progress(f"  load failed: {extra['load_error']}")
                loaded = None
                continue
            extra["load_seconds"] = round(perf_counter() - start, 2)
            loaded, cast = step.load_key, None
        if step.step.cast is not None and cast is None:
            model = _cast(model, step, device)
            cast = step.step.cast
        extra["attention_class"] = type(model.model.layers[0].attention).__name__
        extra["wqkv_class"] = f"{type(model.model.layers[0].attention.wqkv).__module__}." \
                              f"{type(model.model.layers[0].attention.wqkv).__name__}"
        budget = step_budget(step, device, budget_gb, scale)
        extra["budget"] = budget.describe()
        speed = FloatMatmul() if float_matmul else nullcontext()
        try:
            with speed:
                result, probe, seconds = chat_once(model, tokenizer, image, step, device, budget, max_new_tokens)
                if not result.ok and rerun_unbudgeted:
                    again, again_probe, _ = chat_once(model, tokenizer, image, step, device, None, max_new_tokens)
                    extra["unbudgeted"] = {"ok": again.ok, "peak_bytes": again.memory.peak_bytes,
                                           "activations_bytes": again.memory.activations_bytes,
                                           "kv_cache_bytes": again.memory.kv_cache_bytes,
                                           "peak_phase": peak_phase(again, again_probe),
                                           "error": again.memory.error}
        except STEP_FAILURES as error:  # e.g. transformers' bitsandbytes layers: the TypeError, as it happens
            extra.update(call_error=f"{type(error).__name__}: {error}", call_location=_location(error))
            records.append(_record(step, params, None, extra, results_path))
            progress(f"  chat failed: {extra['call_error']}")
            continue
        extra.update(prompt_tokens=probe.prompt_tokens, new_tokens=probe.decoder_calls,
                     peak_phase=peak_phase(result, probe), seconds=round(seconds, 2))
        if not result.ok:
            extra.update(oom_report=result.report(), oom_location=result.location, oom_failed_op=result.failed_op,
                         oom_in_use_bytes=result.in_use_at_failure_bytes)
        tokens_per_s = None if float_matmul or not result.ok else probe.decoder_calls / seconds
        records.append(_record(step, params, result, extra, results_path, tokens_per_s))
        progress(f"  {result.memory}")
    return records


def _location(error: BaseException) -> str | None:
    """The innermost line of model code (not torch, bitsandbytes or this package) where `error` was raised."""
    frames = [frame for frame in traceback.extract_tb(error.__traceback__)
              if "xcomp_lab" not in Path(frame.filename).parts]
    frame = model_frame(traceback.StackSummary.from_list(frames))
    return f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}: {frame.line}" if frame else None


def _record(step: OriginalStep, params: dict[str, Any], result: GuardedResult | None, extra: dict[str, Any],
            results_path: str | Path | None, tokens_per_s: float | None = None) -> dict[str, Any]:
    record = build_record(
        step.name, {**params, "step": asdict(step.step), "original_step": step.name},
        None if result is None else result.memory, tokens_per_s=tokens_per_s,
        caption=result.value if result is not None and result.ok else None, extra=extra,
    )
    if result is None:
        record["error"] = extra.get("call_error") or extra.get("load_error")
    if results_path is not None:
        append_result(results_path, record)
    return record
