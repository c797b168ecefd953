"""`estimate`: predict one `generate` call of any transformers LLM or VLM from its configuration, no weights, no GPU.

The model's own code runs on fake tensors (`replay`), with the real inputs its processor would make
(`build.make_inputs`), under the CPU tensor accounting (`accounting`). On CPU the prediction is what
`memory.measure("cpu")` reports for the real call. For CUDA the same stream of allocations and frees goes
through a simulation of PyTorch's caching allocator (`allocator`), after the load of the weights and the
inputs, with CUDA's kernels where they differ from the CPU's (`accounting.CudaSdpa`, `accounting.aten_temporaries`,
`estimate.accounting.CudaSoftmax`): the peak is what `torch.cuda.max_memory_allocated` and `max_memory_reserved`
report for the call, measured as `memory.measure("cuda")` measures it (empty cache and peaks reset at its start,
weights and inputs on the card).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from xcomp_lab.core.checks import BATCH_SIZE, NEW_TOKENS, check_choice, check_int
from xcomp_lab.core.units import fmt_bytes
from xcomp_lab.estimate.accounting import CudaSoftmax
from xcomp_lab.estimate.fake import quant_state_tensors
from xcomp_lab.memory.cards import Card, card_named
from xcomp_lab.memory.footprint import statistics
from xcomp_lab.plan.accounting import CudaSdpa, Int8Outliers, PhasePeak, PlanAccounting, peak_of
from xcomp_lab.plan.allocator import BothOrders, CachingAllocator, round_size
from xcomp_lab.plan.devicemap import (
    DevicePeak,
    check_max_memory,
    device_map_of,
    device_peaks,
    first_gpu,
    follow_devices,
    weights_per_device,
)
from xcomp_lab.plan.families import Family, family_of
from xcomp_lab.plan.outliers import OutlierColumns, RunningInt8Linear, check_int8_outliers
from xcomp_lab.plan.realvalues import RealValues
from xcomp_lab.plan.replay import (
    build_fake_model,
    fast_forward,
    greedy_generate,
    phases,
)

DEVICES = ("cuda", "cpu")
ATTENTIONS = ("sdpa", "eager")
QUANTIZATIONS = ("none", "int8", "nf4")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PHASES = ("load", "vision", "prefill", "decode")
# cuBLAS's workspace, taken from the caching allocator at the first matrix product on a stream and kept
# (CublasHandlePool.cpp, getChosenWorkspaceSize): 4096 KiB x 8 on compute capability 9.0 (H100, H200), else
# 4096 KiB x 2 + 16 KiB x 8. cuBLASLt shares it (TORCH_CUBLASLT_UNIFIED_WORKSPACE, on by default).
CUBLAS_WORKSPACE_SM90 = 4096 * 1024 * 8
CUBLAS_WORKSPACE_OTHER = 4096 * 1024 * 2 + 16 * 1024 * 8
SM90_CARDS = ("H100", "H200", "H800", "H20")


@dataclass(frozen=True)
class ModelSource:
    """What `estimate` was given, resolved: the configuration, and the preset it is (or stands in for)."""

    config: Any
    preset: Any  # presets.Preset: gives the processor's settings and the inputs
    tiny: bool
    family: Family
    name: str


def resolve_model(model: Any) -> ModelSource:
    """A preset name ("llama-3-8b", "llama-3-8b:tiny"), a folder with config.json, or a config object."""
    from transformers import AutoConfig, PretrainedConfig

    from xcomp_lab.plan.presets import PRESETS, get_preset

    if isinstance(model, ModelSource):
        return model
    if isinstance(model, str) and not Path(model).is_dir():
        name, _, variant = model.partition(":")
        if variant not in ("", "tiny"):
            raise ValueError(f"model={model!r}: a preset is named alone or with ':tiny' (e.g. 'llama-3-8b:tiny').")
        preset = get_preset(name)
        config = preset.config(tiny=bool(variant))
        return ModelSource(config, preset, bool(variant), family_of(config), model)
    if isinstance(model, (str, Path)):
        if not (Path(model) / "config.json").is_file():
            raise ValueError(f"model={str(model)!r} is a folder without a config.json; pass a model folder, a "
                             "config object or a preset name.")
        config, name = AutoConfig.from_pretrained(model), str(model)
    elif isinstance(model, PretrainedConfig):
        config, name = model, type(model).__name__
    else:
        raise TypeError(f"model={model!r}; pass a preset name ({', '.join(PRESETS)}), a folder with a "
                         "config.json, or a transformers config object.")
    family = family_of(config)
    preset, tiny = stand_in_preset(config)
    return ModelSource(config, preset, tiny, family, name)


def stand_in_preset(config: Any) -> tuple[Any, bool]:
    """The preset of the same architecture whose processor settings a config's inputs use (tiny or full size,
    whichever has the same vision input size), and whether it is the tiny variant."""
    from xcomp_lab.plan.presets import PRESETS

    same = [p for p in PRESETS.values() if p.published["model_type"] == config.model_type]
    if not same:
        return None, False
    preset = same[0]
    tiny_width = preset.config(tiny=True).get_text_config().hidden_size
    return preset, config.get_text_config().hidden_size == tiny_width


@dataclass(frozen=True)
class Plan:
    """One predicted `generate` call. Bytes are the device's: on CUDA as the caching allocator counts them."""

    model: str
    device: str
    settings: dict[str, Any]
    weights_bytes: int  # parameters + buffers (+ bitsandbytes statistics on CUDA)
    quant_state_bytes: int  # bitsandbytes statistics (absmax, SCB): CPU accounting does not count them
    inputs_bytes: int  # the inputs on the device (CUDA), counted from the start
    workspace_bytes: int  # cuBLAS's workspace (CUDA)
    kv_cache_bytes: int  # the cache's keys and values at the last step
    prompt_tokens: int
    image_tokens: int
    new_tokens: int
    phases: dict[str, PhasePeak]  # "load", "vision" (VLMs), "prefill", "decode"
    peak_bytes: int  # max_memory_allocated of the call (CPU: the accounting's peak)
    reserved_peak_bytes: int | None  # max_memory_reserved of the call (CUDA)
    peak_where: str
    card: Card | None = None
    seconds: float = 0.0
    notes: tuple[str, ...] = field(default=(), repr=False)
    device_map: dict[str, int | str] | None = field(default=None, repr=False)  # with max_memory: module -> device
    devices: dict[str, DevicePeak] = field(default_factory=dict, repr=False)  # with max_memory: each device's peak

    @property
    def activations_bytes(self) -> int:
        """Peak - weights - KV cache - inputs - workspace: activations, logits and temporaries at the peak."""
        return max(self.peak_bytes - self.weights_bytes - self.kv_cache_bytes - self.inputs_bytes
                   - self.workspace_bytes, 0)

    @property
    def fits(self) -> bool | None:
        """Whether the call's reserved peak (allocated, on CPU) fits the card's usable memory; None without a card."""
        if self.card is None:
            return None
        return (self.reserved_peak_bytes or self.peak_bytes) <= self.card.usable_bytes

    def table(self) -> str:
        """Phases with allocated and reserved peaks, the breakdown and the verdict; print() it."""
        reserved = self.reserved_peak_bytes is not None
        lines = [f"{self.model} on {self.device}: {self.settings['dtype']}, {self.settings['quantization']}, "
                 f"{self.settings['attn']}, batch {self.settings['batch']}, {self.prompt_tokens} prompt tokens"
                 + (f" ({self.image_tokens} image tokens)" if self.image_tokens else "")
                 + f" + {self.new_tokens} new",
                 f"{'phase':<10}{'allocated':>12}{'reserved' if reserved else '':>12}  peak at"]
        for name in PHASES:
            if name in self.phases:
                p = self.phases[name]
                lines.append(f"{name:<10}{fmt_bytes(p.allocated):>12}"
                             f"{fmt_bytes(p.reserved) if p.reserved is not None else '':>12}  {p.where}")
        lines.append(f"{'part':<22}{'size':>12}{'share':>8}")
        for part, nbytes in (("weights", self.weights_bytes), ("inputs", self.inputs_bytes),
                             ("cuBLAS workspace", self.workspace_bytes),
                             ("KV cache", self.kv_cache_bytes), ("activations, logits", self.activations_bytes)):
            if nbytes or part not in ("inputs", "cuBLAS workspace"):
                lines.append(f"{part:<22}{fmt_bytes(nbytes):>12}{nbytes / self.peak_bytes:>8.1%}")
        peak = f"peak {fmt_bytes(self.peak_bytes)} allocated"
        if reserved:
            peak += f", {fmt_bytes(self.reserved_peak_bytes)} reserved"
        lines.append(f"{peak}, in {self.peak_where}")
        if self.devices:
            lines.append(f"{'device':<22}{'weights':>12}{'allocated peak':>16}")
            lines += [f"{d.device:<22}{fmt_bytes(d.weights):>12}{fmt_bytes(d.peak):>16}" for d in self.devices.values()]
        if self.card is not None:
            used = self.reserved_peak_bytes or self.peak_bytes
            spare = self.card.usable_bytes - used
            lines.append(f"{'fits' if self.fits else 'does not fit'} {self.card.name} "
                         f"({fmt_bytes(self.card.usable_bytes)} usable): "
                         + (f"{fmt_bytes(spare)} to spare" if spare >= 0 else f"{fmt_bytes(-spare)} short"))
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict."""
        out = {name: getattr(self, name) for name in self.__dataclass_fields__
               if name not in ("phases", "card", "devices")}
        out["devices"] = {k: {"weights": v.weights, "peak": v.peak} for k, v in self.devices.items()}
        out["phases"] = {k: {"allocated": v.allocated, "reserved": v.reserved, "where": v.where}
                         for k, v in self.phases.items()}
        out["card"] = self.card.name if self.card else None
        if self.settings.get("int8_outliers") is not None:
            out["settings"] = {**self.settings, "int8_outliers": str(self.settings["int8_outliers"])}
        out["notes"] = list(self.notes)
        return out

    def __str__(self) -> str:
        reserved = (f", reserved {fmt_bytes(self.reserved_peak_bytes)}" if self.reserved_peak_bytes is not None
                    else "")
        return (f"{self.model}: peak {fmt_bytes(self.peak_bytes)}{reserved} on {self.device} = weights "
                f"{fmt_bytes(self.weights_bytes)} + KV cache {fmt_bytes(self.kv_cache_bytes)} + activations "
                f"{fmt_bytes(self.activations_bytes)}")


@dataclass(frozen=True)
class Call:
    """The checked settings of one planned call."""

    source: ModelSource
    dtype: torch.dtype
    quantization: str
    attn: str
    batch: int
    prompt_tokens: int
    new_tokens: int
    image_size: int | None
    device: str
    card: Card | None
    max_memory: dict[int | str, int] | None = None
    int8_outliers: OutlierColumns | None = None  # None: every column an outlier (the bound)

    def settings(self) -> dict[str, Any]:
        return {"dtype": next(k for k, v in DTYPES.items() if v == self.dtype), "quantization": self.quantization,
                    "attn": self.attn, "batch": self.batch, "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
                    "image_size": self.image_size, "int8_outliers": self.int8_outliers}


def check_call(model: Any, *, dtype: Any, quantization: Any, attn: Any, batch: Any, prompt_tokens: Any,
               new_tokens: Any, image_size: Any, device: Any, card: Any, max_memory: Any = None,
               int8_outliers: Any = None) -> Call:
    source = resolve_model(model)
    if dtype is None:
        dtype = source.preset.dtype if source.preset is not None else torch.bfloat16
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        dtype = next(k for k, v in DTYPES.items() if v == dtype)
    check_choice("dtype", dtype, list(DTYPES), "the dtype of the weights that stay unquantized")
    check_choice("quantization", quantization, QUANTIZATIONS, "bitsandbytes LLM.int8(), NF4, or none")
    check_choice("attn", attn, ATTENTIONS, "the attention implementation")
    if attn == "sdpa" and not supports_sdpa(source.config):
        import transformers

        raise ValueError(f"attn='sdpa': {source.name} ({source.config.model_type}) has no sdpa attention in "
                         f"transformers {transformers.__version__}; use attn='eager'.")
    check_choice("device", device, DEVICES, "the device the call runs on")
    BATCH_SIZE.check("batch", batch, hint="sequences generated together")
    NEW_TOKENS.check("new_tokens", new_tokens, hint="tokens generated per sequence")
    check_int("prompt_tokens", prompt_tokens, hint="tokens in each prompt, image tokens included")
    if source.family.is_vlm:
        if image_size is None:
            image_size = source.preset.default_image_size(source.tiny)
        check_int("image_size", image_size, hint="the side in pixels of the square image each prompt holds")
    elif image_size is not None:
        raise ValueError(f"image_size={image_size} was given, but {source.name} is a language model "
                         f"({source.config.model_type}); leave it None.")
    if card is not None and not isinstance(card, Card):
        card = card_named(card)
    if max_memory is not None:
        if device != "cuda":
            raise ValueError(f"max_memory was given with device={device!r}; a device map places modules on GPUs: "
                             "use device='cuda'.")
        max_memory = check_max_memory(max_memory)
    outliers = check_int8_outliers(int8_outliers)
    if outliers is not None and quantization != "int8":
        raise ValueError(f"int8_outliers={int8_outliers!r} was given with quantization={quantization!r}; outlier "
                         "columns are LLM.int8()'s: use quantization='int8', or leave int8_outliers None.")
    if outliers is not None and device != "cuda":
        raise ValueError(f"int8_outliers={int8_outliers!r} was given with device={device!r}; the outlier path is "
                         "replayed as bitsandbytes' CUDA kernels run it: use device='cuda'.")
    return Call(source, DTYPES[dtype], quantization, attn, batch, prompt_tokens, new_tokens, image_size, device, card,
                max_memory, outliers)


def supports_sdpa(config: Any) -> bool:
    """Whether the model's class in this transformers runs sdpa attention."""
    from xcomp_lab.plan.build import model_class

    return bool(model_class(config)._model_mapping[type(config)]._supports_sdpa)


def call_inputs(call: Call) -> dict[str, torch.Tensor]:
    """The real inputs of the call, as the measurement makes them (`build.make_inputs`)."""
    from xcomp_lab.plan.build import make_inputs

    source = call.source
    inputs = make_inputs(source.preset, batch_size=call.batch, prompt_tokens=call.prompt_tokens,
                         image_size=call.image_size, tiny=source.tiny)
    if source.config.model_type == "qwen2_vl" and "mm_token_type_ids" not in inputs:
        # Qwen2VLProcessor returns it (1 at image tokens); the model refuses pixels without it.
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == source.config.image_token_id).long()
    return inputs


def weight_tensors(model: torch.nn.Module, buffers: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(parameters and buffers, bitsandbytes statistics) of a model, each storage once."""
    seen: dict[int, torch.Tensor] = {}
    for t in [*model.parameters(), *(model.buffers() if buffers else ())]:
        seen.setdefault(t.untyped_storage()._cdata, t)
    stats = {t.untyped_storage()._cdata: t for t in quant_state_tensors(model)}
    return list(seen.values()), [t for k, t in stats.items() if k not in seen]


def simulate_load(allocator: CachingAllocator | BothOrders, model: torch.nn.Module, dtype: torch.dtype,
                  acc: PlanAccounting) -> None:
    """The weights arriving on the card as `from_pretrained(device_map=...)` puts them there (transformers 5.24,
    bitsandbytes 0.50.2), in a fresh process.

    First transformers' `caching_allocator_warmup`: one empty tensor of the parameters' total size (quantized ones at
    their quantized size) is allocated and freed, so the caching allocator holds one segment that the weights are
    then carved from. Then the checkpoint's tensors in the loader's order (`convert_and_load_state_dict_in_model`:
    names in natural order, one at a time when quantizing on the fly), each copied to the card in `dtype`
    (`load_tensor`), and the 1-D ones and the buffers last (the matrix's random checkpoint holds only the tensors of
    two or more dimensions; the others are initialised as missing keys; all are small-pool sized).
    """
    from transformers.core_model_loading import dot_natural_key

    acc.mark("load")
    warmup = sum(t.untyped_storage().nbytes() for t in weight_tensors(model, buffers=False)[0])
    allocator.free(allocator.malloc(warmup // 2 * 2))  # torch.empty(byte_count // 2, dtype=float16)
    owners = {id(p): module for module in model.modules() for p in module.parameters(recurse=False)}
    placed: set[int] = set()
    named = sorted(model.named_parameters(), key=lambda kv: dot_natural_key(kv[0]))
    for _, param in [kv for kv in named if kv[1].dim() >= 2] + [kv for kv in named if kv[1].dim() < 2]:
        placed.add(param.untyped_storage()._cdata)
        load_tensor(allocator, param, owners[id(param)], dtype)
        acc.record()
    for t in model.buffers():
        if t.untyped_storage()._cdata not in placed:
            placed.add(t.untyped_storage()._cdata)
            allocator.malloc(t.untyped_storage().nbytes())
    acc.record()


def load_tensor(allocator: CachingAllocator | BothOrders, param: torch.Tensor, module: torch.nn.Module,
                dtype: torch.dtype) -> None:
    """One checkpoint tensor loaded onto the card, with what quantizing it on the fly allocates and frees.

    Unquantized: the tensor itself. LLM.int8() (`Bnb8bitQuantize`, `Int8Params._quantize`): the tensor in `dtype`,
    an FP16 copy, the row statistics (SCB) and the int8 weight; the two copies freed. NF4 with nested statistics
    (`Bnb4bitQuantize`, `functional.quantize_4bit`): the tensor in `dtype`, the FP32 absmax and the packed weight,
    the code and the mean (offset), the absmax less its mean, then the second level's absmax, the 8-bit absmax and
    a copy of the dynamic map; the temporaries freed, then the tensor in `dtype`.
    """
    stats = statistics(module) if param is getattr(module, "weight", None) else []
    if not stats:
        allocator.malloc(param.untyped_storage().nbytes())
        return
    n = module.in_features * module.out_features
    staged = allocator.malloc(n * dtype_size(dtype))
    if hasattr(param, "SCB"):
        fp16 = allocator.malloc(n * 2)
        allocator.malloc(param.SCB.untyped_storage().nbytes())
        allocator.malloc(param.untyped_storage().nbytes())
        allocator.free(fp16)
    else:
        state = param.quant_state
        absmax = allocator.malloc(state.absmax.numel() * 4)
        allocator.malloc(param.untyped_storage().nbytes())
        allocator.malloc(state.code.untyped_storage().nbytes())
        allocator.malloc(state.offset.untyped_storage().nbytes())
        centred = allocator.malloc(state.absmax.numel() * 4)
        allocator.malloc(state.state2.absmax.untyped_storage().nbytes())
        allocator.malloc(state.absmax.untyped_storage().nbytes())
        allocator.malloc(state.state2.code.untyped_storage().nbytes())  # the dynamic map, copied per weight
        allocator.free(centred)
        allocator.free(absmax)
    allocator.free(staged)


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def estimate(model: Any, *, dtype: str | torch.dtype | None = None, quantization: str = "none", attn: str = "sdpa",
             batch: int = 1, prompt_tokens: int = 512, new_tokens: int = 32, image_size: int | None = None,
             device: str = "cuda", card: str | Card | None = None, exact_decode: bool = False,
             max_memory: dict[int | str, int | str] | None = None, int8_outliers: Any = None) -> Plan:
    """Predict one `model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)`.

    `model`: a preset name (`presets.preset_names()`, ':tiny' for its tiny variant), a folder with a config.json,
    or a transformers config. `dtype` ("bf16", "fp16", "fp32"; default the preset's published one, else bf16), `quantization` ("none", "int8", "nf4" as
    `build.quantization_config` makes them), `attn` ("sdpa", "eager"): the model as `from_pretrained` loads it.
    `batch` prompts of `prompt_tokens` tokens each (image tokens included), one `image_size` px image each for a
    VLM (default: the preset's). `device`: "cuda" (allocated and reserved as the caching allocator counts them) or
    "cpu" (the CPU tensor accounting). `card`: a name in `memory.cards.CARDS`, to say whether the call fits.
    `exact_decode`: run every decode step in full (by default the steps between the first and the last skip the
    layers' passing activations: `replay.fast_forward`). `max_memory` ({0: "20GiB", 1: "20GiB", "cpu": ...}): the
    model placed as `from_pretrained(device_map=..., max_memory=...)` places it (`devicemap`); the plan then says
    where each module went (`device_map`) and each device's weights and allocated peak (`devices`).
    `int8_outliers` (INT8 on CUDA): the LLM.int8() outlier columns of each quantized linear's input, which depend on
    the activations' values: None takes every column (an upper bound); a fraction from 0 to 1 of each input's
    columns, or the counts `outliers.calibrate_int8_outliers` measures on the real model (or a JSON file of them),
    replay that many (`outliers.OutlierColumns`).
    """
    start = time.perf_counter()
    call = check_call(model, dtype=dtype, quantization=quantization, attn=attn, batch=batch,
                      prompt_tokens=prompt_tokens, new_tokens=new_tokens, image_size=image_size, device=device,
                      card=card, max_memory=max_memory, int8_outliers=int8_outliers)
    if not isinstance(exact_decode, bool):
        raise TypeError(f"exact_decode={exact_decode!r}; pass True or False.")
    return run_plan(call, start, exact_decode)


@dataclass
class Session:
    """One process that loads a model once and runs several CUDA calls on it, one after the other, as the validation
    matrix measured each build (`run_plan(..., session=)`): what the calls share. A later call starts from what the
    earlier ones left: its inputs are placed on the card before its `empty_cache` (in blocks the previous call left
    cached, whose segments then stay), cuBLAS's workspace and the tensors kept on the model (LLM.int8()'s
    `state.idx`) are there already."""

    fake: torch.nn.Module | None = None
    fake_mode: FakeTensorMode | None = None
    allocator: CachingAllocator | None = None
    acc: PlanAccounting | None = None
    params_bytes: int = 0
    stats: list[torch.Tensor] = field(default_factory=list)
    load: PhasePeak | None = None
    inputs: list[Any] = field(default_factory=list)  # the allocator's blocks of the current call's inputs
    build: tuple[str, str, str] | None = None  # (model, dtype, quantization) of the session's calls


def run_plan(call: Call, began: float, exact_decode: bool = False, events: list[list] | None = None,
             session: Session | None = None,
             at_start: Callable[[CachingAllocator], None] | None = None) -> Plan:
    """The plan of a checked call; on CUDA, `events` (a list) receives the simulated allocator's actions from the
    call's start (the inputs on the card), as a CUDA allocator trace names them (`CachingAllocator.log`).
    `session` (CUDA, same model and quantization): the call follows the session's earlier calls in one process.
    `at_start` (CUDA): called with the simulated allocator at the call's start, the inputs placed and the cache
    emptied (`plan.trace` puts the segments where a CUDA trace saw them)."""
    from xcomp_lab.plan.build import quantization_config

    source, cuda = call.source, call.device == "cuda"
    build = (source.name, str(call.dtype), call.quantization)
    if session is not None and (not cuda or call.max_memory is not None or session.build not in (None, build)):
        raise ValueError(f"a session runs the CUDA calls of one model on one card: {build} on {call.device} was "
                         f"given to a session of {session.build}; start a new Session for another model.")
    inputs = call_inputs(call)
    bnb = quantization_config(call.quantization, call.dtype)
    later = session is not None and session.fake is not None
    if later:
        fake, fake_mode, allocator, acc = session.fake, session.fake_mode, session.allocator, session.acc
        params_bytes, stats, load = session.params_bytes, session.stats, session.load
        if fake.config._attn_implementation != call.attn:
            fake.set_attn_implementation(call.attn)
    else:
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True, static_shapes=True)
        fake = build_fake_model(source.config, dtype=call.dtype, attn=call.attn, bnb_config=bnb, fake_mode=fake_mode)
        weights, stats = weight_tensors(fake)
        params_bytes = sum(t.untyped_storage().nbytes() for t in weights)
        allocator = CachingAllocator() if cuda else None
        acc = PlanAccounting(params_bytes, allocator)
    stats_bytes = sum(t.untyped_storage().nbytes() for t in stats)
    inputs_bytes = 0
    if cuda:
        workspace = cublas_workspace(call.card)
        if later:  # the earlier call's inputs and outputs freed, this call's inputs placed, then the cache emptied
            for block in session.inputs:
                allocator.free(block)
            gc.collect()
            session.inputs = [allocator.malloc(t.untyped_storage().nbytes()) for t in inputs.values()]
            allocator.empty_cache()
            acc.peaks = {}
        else:
            simulate_load(allocator, fake, call.dtype, acc)
            load = acc.peaks.pop("load")
            allocator.empty_cache()
            placed = [allocator.malloc(t.untyped_storage().nbytes()) for t in inputs.values()]
        inputs_bytes = sum(round_size(t.untyped_storage().nbytes()) for t in inputs.values())
        if at_start is not None:
            at_start(allocator)
        allocator.reset_peaks()
        allocator.events = events
        if not later:
            allocator.malloc(workspace)  # made at the prefill's first product and kept: present at every peak
            if session is not None:
                session.fake, session.fake_mode, session.allocator, session.acc = fake, fake_mode, allocator, acc
                session.params_bytes, session.stats, session.load, session.inputs = params_bytes, stats, load, placed
                session.build = build
    else:
        load, workspace = PhasePeak(params_bytes, None, "load"), 0
    cache: list[int] = []
    token = int(inputs["input_ids"][0, 0])
    kernels = CudaSoftmax() if cuda else contextlib.nullcontext()
    sdpa = CudaSdpa() if cuda else contextlib.nullcontext()
    int8 = bnb is not None and bnb.load_in_8bit
    outliers, naming = contextlib.nullcontext(), contextlib.nullcontext()
    if cuda and int8:
        naming = RunningInt8Linear(fake)
        outliers = Int8Outliers(call.int8_outliers, lambda: acc.phase, naming)
        for module in (() if later else fake.modules()):
            if hasattr(module, "state") and hasattr(module.state, "threshold"):
                module.state.threshold = bnb.llm_int8_threshold  # as from_pretrained sets it (the replay set 0)
    skipping = contextlib.nullcontext() if exact_decode else fast_forward(fake, call.new_tokens)
    quiet = quiet_int8_cast() if int8 else contextlib.nullcontext()
    marks = phases(fake, source.family, acc, call.new_tokens, cache)
    dmap, placing, weights_on = None, contextlib.nullcontext(), {}
    if call.max_memory is not None:
        dmap = device_map_of(fake, call.max_memory)
        weights_on = weights_per_device(fake, dmap)
        start = {first_gpu(dmap): 0, **weights_on}
        start[first_gpu(dmap)] += inputs_bytes
        for name in start:  # cuBLAS takes its workspace on each GPU that multiplies
            start[name] += workspace if name.startswith("cuda") else 0
        placing = follow_devices(fake, dmap, acc, start)
    with quiet, fake_mode, RealValues(token), acc, kernels, sdpa, naming, outliers, skipping, marks, placing:
        acc.mark("generate")
        greedy_generate(fake, inputs, call.new_tokens)
    peaks = {"load": load, **{k: v for k, v in acc.peaks.items() if k in PHASES}}
    top = peak_of(acc.peaks)
    return Plan(
        model=source.name, device=call.device, settings=call.settings(),
        weights_bytes=(allocator_weights(fake, stats) if cuda else params_bytes), quant_state_bytes=stats_bytes,
        inputs_bytes=inputs_bytes, workspace_bytes=workspace, kv_cache_bytes=cache[0] if cache else 0,
        prompt_tokens=call.prompt_tokens, image_tokens=image_tokens(source, inputs), new_tokens=call.new_tokens,
        phases=peaks, peak_bytes=top.allocated, reserved_peak_bytes=top.reserved, peak_where=top.where,
        card=call.card, seconds=time.perf_counter() - began, notes=plan_notes(call, exact_decode), device_map=dmap,
        devices=device_peaks(acc, weights_on) if dmap is not None else {})


@contextlib.contextmanager
def quiet_int8_cast() -> Any:
    """bitsandbytes' warning that BF16 inputs are cast to FP16 (one per INT8 linear and step) silenced."""
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    level = bnb_logger.level
    bnb_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        bnb_logger.setLevel(level)


def plan_notes(call: Call, exact_decode: bool) -> tuple[str, ...]:
    """What a plan assumes, where it matters."""
    notes = ["Every new token is generated (min_new_tokens = max_new_tokens, greedy)."]
    if not exact_decode and call.new_tokens > 3:
        notes.append(f"Decode steps 2 to {call.new_tokens - 2} fast-forwarded: the cache grown token by token, the "
                     "layers' passing activations skipped (exact_decode=True runs them).")
    if call.quantization == "int8" and call.int8_outliers is None:
        notes.append("LLM.int8() outlier columns (inputs reaching 6.0) depend on the values: every column is taken "
                     "as one, so the allocated peak is an upper bound (exact when the inputs hold that many).")
    elif call.quantization == "int8":
        notes.append(f"LLM.int8() outlier columns (inputs reaching 6.0): {call.int8_outliers}; the allocated peak "
                     "holds for inputs with that many.")
    if call.max_memory is not None:
        notes.append("Device map: allocated memory per device, with the copies of tensors that cross devices; "
                     "offloaded weights brought to a GPU are not counted, reserved is the call on one card.")
    if call.device == "cuda":
        notes.append("Reserved: the model loaded by from_pretrained in a fresh process, the cache emptied before the "
                     "call (earlier calls and models in the same process leave other segments behind).")
    return tuple(notes)


def cublas_workspace(card: Card | None) -> int:
    """cuBLAS's workspace on the card (no card: the H200 the planner is validated on)."""
    if card is None or any(name in card.name for name in SM90_CARDS):
        return CUBLAS_WORKSPACE_SM90
    return CUBLAS_WORKSPACE_OTHER


def allocator_weights(model: torch.nn.Module, stats: list[torch.Tensor]) -> int:
    """The weights as the allocator counts them: each storage in its 512-byte blocks."""
    weights, _ = weight_tensors(model)
    return sum(round_size(t.untyped_storage().nbytes()) for t in [*weights, *stats])


def image_tokens(source: ModelSource, inputs: dict[str, torch.Tensor]) -> int:
    """Image tokens in each prompt (0 for an LLM)."""
    if not source.family.is_vlm:
        return 0
    ids = inputs["input_ids"]
    return int((ids == source.config.image_token_id).sum()) // ids.shape[0]
