"""Predict the memory of a captioning call without allocating it: weights, KV cache, activations, the peak.

How: the replica is built from its configuration under `FakeTensorMode` (tensors with shapes, dtypes and
storages but no data) in the dtype asked for, and quantized by the real bitsandbytes modules and functions,
whose ops have fake kernels. Then the computation `experiment.run_caption` makes is replayed on it: images
encoded and spliced into the chat prompt by `captioning.prompt_batch` (the text parts tokenized for real),
and `generate`'s greedy loop written out, because its stopping checks read data: a prefill forward with
full logits, then decode forwards on a DynamicCache, keeping alive what `generate` keeps (the prefill
logits until the last-token copy is taken, the previous step's scores, the prompt embeddings), under the
same gradient mode and autocast. Every allocation is counted by `memory.measure`'s own CPU accounting, so on
CPU the prediction is what `measure` reports, to a few bytes.

Decode steps only grow (the cache and the attention span get one token longer each step, the ops are the
same), so by default only the last decode step is simulated, after the cache is fast-forwarded to its
length: the same peak, several times faster. `exact_decode=True` simulates every step.

For device="cuda" the same simulation runs on CPU kernels' shapes with CUDA's rules applied: allocations
rounded up to 512 bytes as the caching allocator does (so the peak means `torch.cuda.max_memory_allocated`),
softmax from FP16 to FP32 in one kernel as CUDA does, and the temporaries bitsandbytes' CUDA kernels
allocate inside one op (the dequantized 4-bit weight when many rows are multiplied, the int32 product of
LLM.int8()). `Estimate.notes` says what is assumed and what is left out in each case.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections import Counter
import time
import traceback
import weakref
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

from .captioning import prompt_batch
from .dtypes import check_dtype, dtype_name
from .experiment import GRAD_MODES, autocast, cache_bytes_by_device, grad_mode
from .memory import Budget, MemoryResult
from .memory.measure import _CpuAccounting
from .memory.oom import model_frame
from .model.configuration_internlm_xcomposer2 import InternLMXcomposer2Config
from .model.loading import QUANTIZATIONS, quantization_config
from .model.modeling_internlm_xcomposer2 import (
    CLIP_MEAN,
    CLIP_STD,
    IM_END,
    SUPPORTED_ATTENTION,
    InternLMXComposer2ForCausalLM,
)
from .model.scales import SCALES, config_for_scale
from .model.tokenizer import CAPTION_QUERY
from .params import CourseParams
from .steps import Step, course_budget
from .units import fmt_bytes, gb_to_bytes

DEVICES = ("cpu", "cuda")
COURSE_BUDGET = "course"  # estimate_step's default: the budget the course puts in force for these params
CUDA_BLOCK = 512  # the CUDA caching allocator rounds every allocation up to a multiple of this
# bitsandbytes' CUDA gemm_4bit multiplies this many rows or fewer with its fused kernel; above 512 rows it
# always dequantizes the weight and calls F.linear (in between it decides per GPU: dequantizing is assumed).
BNB_FUSED_MAX_ROWS = 4
AUTOCAST_COPIES = "autocast weight copies"
_THIS_DIR = Path(__file__).resolve().parent
_SOFTMAXES = (torch.nn.functional.softmax, torch.softmax, torch.Tensor.softmax)


# ----- the result ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A predicted captioning call. Bytes are of the device predicted for (CUDA: as the allocator counts them).

    `activations_bytes` = peak - weights - KV cache, as `MemoryResult` defines it; it includes
    `autocast_copies_bytes`, the FP16 copies of weights autocast holds at the peak.
    """

    label: str
    device: str
    settings: dict[str, Any]
    weights_bytes: int  # parameters + buffers (rotary cos/sin tables) + bitsandbytes quantization statistics
    kv_cache_bytes: int  # analytic: 2 x layers x kv_heads x head_dim x batch x (prompt + new - 1) x bytes
    activations_bytes: int
    peak_bytes: int
    prompt_tokens: int
    new_tokens: int
    quant_state_bytes: int  # part of weights_bytes: absmax/SCB tensors, not parameters (CPU accounting misses them)
    autocast_copies_bytes: int
    peak_phase: str  # "prefill, decoder layer 4/4": the phase ("vision", "prefill", "decode step n") and the part
    simulated_kv_cache_bytes: int  # what the simulation's DynamicCache holds at the end: equals kv_cache_bytes
    phase_peaks: dict[str, int]  # the highest memory in each phase: "vision", "prefill", "decode"
    budget_bytes: int | None = None
    oom: bool | None = None  # None when no budget was given
    oom_op: str | None = None  # "aten.add.Tensor -> (1, 32, 1387, 1387) float32", as run_guarded reports it
    oom_location: str | None = None  # the model line: "file.py:185 in eager_attention: attn_weights = ..."
    oom_phase: str | None = None
    oom_in_use_bytes: int | None = None  # memory in use when the op that crosses the budget allocates
    seconds: float = 0.0  # how long the prediction took
    notes: tuple[str, ...] = field(default=(), repr=False)

    def breakdown(self) -> list[tuple[str, int, float]]:
        """(part, bytes, share of the peak) rows that add up to the peak: weights, KV cache, activations."""
        rows = [("weights", self.weights_bytes), ("KV cache", self.kv_cache_bytes)]
        # Activations are what the peak holds beyond the weights and the final cache; at a prefill peak the
        # cache is shorter than that, so the copies can exceed the residual: they are capped by it.
        copies = min(self.autocast_copies_bytes, self.activations_bytes)
        if copies:
            rows.append((AUTOCAST_COPIES, copies))
        rows.append(("activations and temporaries", self.activations_bytes - copies))
        return [(name, nbytes, nbytes / self.peak_bytes) for name, nbytes in rows]

    def table(self) -> str:
        """The breakdown as a name / size / % table with the peak and the budget verdict; print() it."""
        name = f"[{self.label}] " if self.label else ""
        lines = [f"{name}predicted for {self.device}: {self.prompt_tokens} prompt tokens + {self.new_tokens} new, "
                 f"peak in {self.peak_phase}",
                 f"{'part':<30}{'size':>12}{'share':>9}"]
        for part, nbytes, share in self.breakdown():
            lines.append(f"{part:<30}{fmt_bytes(nbytes):>12}{share:>8.1%}")
        lines.append(f"{'peak':<30}{fmt_bytes(self.peak_bytes):>12}{1:>8.1%}")
        if self.budget_bytes is not None:
            lines.append(self.verdict())
        return "\n".join(lines)

    def verdict(self) -> str:
        """One line: does the call fit the budget, and if not, where it would run out."""
        if self.budget_bytes is None:
            return "no budget given"
        budget = f"budget {fmt_bytes(self.budget_bytes)}"
        if not self.oom:
            return f"fits: {budget}, {fmt_bytes(self.budget_bytes - self.peak_bytes)} to spare"
        return (f"OOM: {budget}, crossed in {self.oom_phase} at {self.oom_op} with "
                f"{fmt_bytes(self.oom_in_use_bytes)} in use, {self.oom_location or 'no model frame'}")

    def compare(self, measured: MemoryResult) -> str:
        """`predicted 14.20 GiB | measured 14.61 GiB | x1.03` (measured / predicted), plus any OOM disagreement."""
        if not isinstance(measured, MemoryResult):
            raise TypeError(f"compare() needs a MemoryResult (run.memory, m.result), got {type(measured).__name__}")
        measured_device = "cpu" if measured.device == "cpu" else "cuda"
        if measured_device != self.device:
            raise ValueError(f"this estimate is for {self.device} but the measurement ran on {measured.device}: "
                             f"estimate with device={measured_device!r} to compare")
        line = (f"predicted {fmt_bytes(self.peak_bytes)} | measured {fmt_bytes(measured.peak_bytes)} | "
                f"x{measured.peak_bytes / self.peak_bytes:.2f}")
        if self.device == "cpu" and self.quant_state_bytes:
            line += f" | CPU accounting misses the {fmt_bytes(self.quant_state_bytes)} of bitsandbytes statistics"
        if self.oom is not None and bool(self.oom) != measured.oom:
            line += f" | OOM predicted: {'yes' if self.oom else 'no'}, measured: {'yes' if measured.oom else 'no'}"
        elif measured.oom:
            line += " | OOM predicted and measured (measured peak is where it stopped)"
        return line

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict."""
        return {name: (list(value) if name == "notes" else value)
                for name, value in ((n, getattr(self, n)) for n in self.__dataclass_fields__)}

    def __str__(self) -> str:
        name = f"[{self.label}] " if self.label else ""
        budget = f" | {self.verdict()}" if self.budget_bytes is not None else ""
        return (f"{name}predicted peak {fmt_bytes(self.peak_bytes)} on {self.device} = weights "
                f"{fmt_bytes(self.weights_bytes)} + KV cache {fmt_bytes(self.kv_cache_bytes)} + activations "
                f"{fmt_bytes(self.activations_bytes)}{budget}")


def fits(estimate: Estimate, budget_bytes: int | Budget) -> bool:
    """True when the predicted peak is within `budget_bytes` (or a Budget's limit)."""
    if not isinstance(estimate, Estimate):
        raise TypeError(f"fits() needs an Estimate, got {type(estimate).__name__}: call estimate_caption(...) first")
    limit = budget_bytes.limit_bytes if isinstance(budget_bytes, Budget) else budget_bytes
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise ValueError(f"budget_bytes={budget_bytes!r}; pass a positive number of bytes or a Budget, "
                         f"e.g. xcomp_lab.units.gb_to_bytes(48)")
    return estimate.peak_bytes <= limit


# ----- arguments ----------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}; it must be a positive integer ({hint}).")
    return value


def _check_choice(name: str, value: Any, allowed: Sequence[str], hint: str = "") -> str:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}; choose one of {list(allowed)}{hint}.")
    return value


def _check_device(device: Any) -> str:
    text = str(device) if isinstance(device, (str, torch.device)) else None
    kind = text.split(":")[0] if text else None
    if kind not in DEVICES or (kind == "cpu" and text != "cpu"):
        raise ValueError(f"device={device!r}; predict for 'cpu' or 'cuda' (any CUDA index counts the same).")
    return kind


def _config_of(target: Any) -> tuple[InternLMXcomposer2Config, nn.Module | None]:
    """(a private copy of the configuration, the model if one was given)."""
    if isinstance(target, str):
        if target not in SCALES:
            raise ValueError(f"Unknown scale {target!r}; pass one of {sorted(SCALES)}, a configuration or a model.")
        return config_for_scale(target), None
    if isinstance(target, InternLMXcomposer2Config):
        return copy.deepcopy(target), None
    config = getattr(target, "config", None)
    if isinstance(target, nn.Module) and getattr(config, "model_type", None) == InternLMXcomposer2Config.model_type:
        # A model loaded with trust_remote_code has its own copy of the configuration class.
        return InternLMXcomposer2Config.from_dict(config.to_dict()), target
    raise TypeError(f"Cannot predict for a {type(target).__name__}; pass a scale ({sorted(SCALES)}), an "
                    "InternLMXcomposer2Config or a loaded replica model.")


def _model_settings(model: nn.Module) -> tuple[str, str]:
    """(dtype, quantization) of a loaded model: what it stores in floating point, and its bitsandbytes layers."""
    import bitsandbytes as bnb

    quantization = "none"
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear8bitLt):
            quantization = "int8"
        elif isinstance(module, bnb.nn.Linear4bit):
            quantization = module.weight.quant_type
    floating = Counter(p.dtype for p in model.parameters() if p.is_floating_point())
    return dtype_name(floating.most_common(1)[0][0]), quantization


def _resolve_budget(budget: Any, device: str) -> int | None:
    if budget is None:
        return None
    if isinstance(budget, Budget):
        if ("cpu" if budget.device == "cpu" else "cuda") != device:
            raise ValueError(f"the budget is for {budget.device!r} but the prediction is for {device!r}: "
                             f"make the budget for {device!r}, or pass its limit in bytes")
        return budget.limit_bytes
    if isinstance(budget, int) and not isinstance(budget, bool) and budget > 0:
        return budget
    raise ValueError(f"budget={budget!r}; pass a Budget, a limit in bytes (e.g. gb_to_bytes(48)) or None.")


# ----- weights, analytically ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Inventory:
    """What the replica stores, by kind: numbers of values, and the linears bitsandbytes would convert."""

    params: int  # all parameter values
    linear_weights: tuple[tuple[int, int], ...]  # (out_features, in_features) of each convertible linear
    float_buffers: int  # floating buffer values (the rotary tables), created in the default dtype
    other_buffer_bytes: int  # integer buffers keep their own dtype (CLIP's position ids)


@lru_cache(maxsize=8)
def _inventory(config_json: str) -> _Inventory:
    from transformers.quantizers.base import get_keys_to_not_convert

    config = InternLMXcomposer2Config.from_dict(json.loads(config_json))
    with torch.device("meta"):
        model = InternLMXComposer2ForCausalLM(config)
    skip = set(get_keys_to_not_convert(model))
    linears = [m for n, m in model.named_modules() if type(m) is nn.Linear and n not in skip]
    return _Inventory(
        params=sum(p.numel() for p in model.parameters()),
        linear_weights=tuple((m.out_features, m.in_features) for m in linears),
        float_buffers=sum(b.numel() for b in model.buffers() if b.is_floating_point()),
        other_buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers() if not b.is_floating_point()),
    )


def _config_key(config: InternLMXcomposer2Config) -> str:
    return json.dumps(config.to_dict(), sort_keys=True, default=str)


def _quantized_linear_bytes(out_features: int, in_features: int, quantization: str) -> tuple[int, int]:
    """(stored weight bytes, quantization statistics bytes) of one linear as bitsandbytes 0.50 keeps it."""
    values = out_features * in_features
    if quantization == "int8":
        return values, out_features * 4  # int8 weight, one FP32 scale (SCB) per output row
    blocks = -(-values // 64)  # absmax per 64 values
    # Double quantization: absmax stored in uint8 with an FP32 absmax per 256 blocks, a 256-entry FP32 code
    # and an FP32 offset; plus the 16-entry FP32 NF4/FP4 code each quantization state keeps.
    stats = blocks + -(-blocks // 256) * 4 + 256 * 4 + 4 + 16 * 4
    return -(-values // 2), stats


def _weight_bytes(config: InternLMXcomposer2Config, dtype: torch.dtype, quantization: str) -> tuple[int, int]:
    """(weights bytes incl. buffers and quantization statistics, of which statistics), analytically."""
    inv = _inventory(_config_key(config))
    size = torch.empty((), dtype=dtype).element_size()
    if quantization == "none":
        return (inv.params + inv.float_buffers) * size + inv.other_buffer_bytes, 0
    converted = sum(o * i for o, i in inv.linear_weights)
    stored = stats = 0
    for out_features, in_features in inv.linear_weights:
        weight, extra = _quantized_linear_bytes(out_features, in_features, quantization)
        stored += weight
        stats += extra
    unconverted = (inv.params - converted + inv.float_buffers) * size + inv.other_buffer_bytes
    return unconverted + stored + stats, stats


def parameter_count(scale_or_config: str | InternLMXcomposer2Config) -> int:
    """Parameters of the replica, counted on the meta device: 8,666,840,064 at full scale."""
    config, _ = _config_of(scale_or_config)
    return _inventory(_config_key(config)).params


def weights_only(scale_or_config: str | InternLMXcomposer2Config, dtype: str | torch.dtype = "float32",
                 quantization: str = "none") -> int:
    """Bytes of parameters + buffers (+ bitsandbytes statistics), from the parameter count: no simulation.

    E.g. weights_only("full") is 8,666,840,064 parameters x 4 bytes + 1 GiB of rotary tables = 33.29 GiB.
    """
    config, _ = _config_of(scale_or_config)
    torch_dtype = check_dtype(dtype)
    if torch_dtype is None:
        raise ValueError("dtype='auto' has no size; pass 'float32', 'float16' or 'bfloat16'.")
    _check_choice("quantization", quantization, QUANTIZATIONS)
    return _weight_bytes(config, torch_dtype, quantization)[0]


# ----- the fake model -----------------------------------------------------------------------------------


def _fake_param(data: torch.Tensor, **attributes: Any) -> nn.Parameter:
    # bitsandbytes' parameter classes cannot wrap a FakeTensor, so the weight is a plain (fake) parameter
    # carrying the attributes their modules read: CB/SCB for int8, quant_state for 4-bit.
    param = nn.Parameter(data, requires_grad=False)
    for name, value in attributes.items():
        setattr(param, name, value)
    return param


def _quantize(model: nn.Module, quantization: str, compute: torch.dtype, fake_mode: FakeTensorMode) -> None:
    """Convert the linears as `from_pretrained(quantization_config=...)` does, quantizing the fake weights."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_f
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.base import get_keys_to_not_convert

    # Double quantization reads this global map; made here so that it is a real tensor, not a fake one.
    if "dynamic" not in bnb_f.name2qmap:
        bnb_f.name2qmap["dynamic"] = bnb_f.create_dynamic_map()
    originals = {name: module for name, module in model.named_modules() if type(module) is nn.Linear}
    # Outside the fake mode: the new modules make bitsandbytes parameters on the meta device.
    replace_with_bnb_linear(model, get_keys_to_not_convert(model), quantization_config(quantization, compute))
    with fake_mode:
        for name, module in model.named_modules():
            if not isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)):
                continue
            weight = originals[name].weight.detach().contiguous()
            if isinstance(module, bnb.nn.Linear8bitLt):
                cb, scb, _ = bnb_f.int8_vectorwise_quant(weight.to(torch.float16))
                module.weight = _fake_param(cb, CB=cb, SCB=scb, has_fp16_weights=False)
                # Outlier columns depend on the activations' values: the simulation assumes none.
                module.state.threshold = 0.0
            else:
                packed, state = bnb_f.quantize_4bit(
                    weight, blocksize=module.weight.blocksize, compress_statistics=module.weight.compress_statistics,
                    quant_type=module.weight.quant_type, quant_storage=module.weight.quant_storage)
                module.weight = _fake_param(packed, quant_state=state)
                module.quant_state = state
                # CPUs with AVX512-BF16 repack 4-bit weights on the first call; that path is not simulated.
                module.support_avx512bf16_for_cpu = False
            module.bias = originals[name].bias


def _build(config: InternLMXcomposer2Config, dtype: torch.dtype, quantization: str,
           fake_mode: FakeTensorMode) -> nn.Module:
    """The replica with fake tensors, as `load_for_step` leaves it (eval mode, dtype set at construction)."""
    previous = torch.get_default_dtype()
    try:
        with fake_mode:
            # from_pretrained(dtype=...) builds under this default dtype: the rotary tables follow it.
            torch.set_default_dtype(dtype)
            model = InternLMXComposer2ForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    if quantization != "none":
        compute = dtype if dtype != torch.float32 else torch.float16
        _quantize(model, quantization, compute, fake_mode)
    return model


def _quant_state_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The statistics bitsandbytes keeps beside the weights (not parameters or buffers)."""
    tensors = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if getattr(weight, "SCB", None) is not None:
            tensors.append(weight.SCB)
        state = getattr(weight, "quant_state", None)
        while state is not None:
            tensors += [t for t in (state.absmax, state.code, state.offset) if isinstance(t, torch.Tensor)]
            state = state.state2
    return tensors


# ----- the accounting -----------------------------------------------------------------------------------


def _round_cuda(nbytes: int) -> int:
    return -(-nbytes // CUDA_BLOCK) * CUDA_BLOCK


@dataclass
class _Crossing:
    op: str
    phase: str
    in_use: int
    location: str | None
    described: bool = False


class _SimulatedAccounting(_CpuAccounting):
    """`measure`'s CPU accounting over fake tensors, plus what a prediction needs to report.

    It keeps the phase and the autocast weight copies alive at the peak, notes the first op whose
    allocation crosses the budget (and goes on, to find the whole peak), and for CUDA rounds allocations
    and adds the temporaries bitsandbytes' CUDA kernels allocate inside one op.
    """

    counts_fake = True

    def __init__(self, start_bytes: int, limit: int | None, cuda: bool, autocast_on: bool,
                 device: str | torch.device = "cpu") -> None:
        # No budget for the base class, which would raise at the crossing: it is checked here, to go on to the
        # whole peak. No timeline either: a prediction keeps peaks, not samples.
        super().__init__(start_bytes, None, sample_every=1 << 30, max_samples=64)
        self.counted_device = torch.device(device)  # the fake device this accounting stands for
        self.cuda = cuda
        self.autocast_on = autocast_on
        self.budget_limit = limit
        self.phase = "start"
        self.where = ""  # the part of the model running: "vision tower", "decoder layer 3/32", "output head"
        self.peak_phase = "start"
        self.phase_peaks: dict[str, int] = {}
        self.copies = 0  # live bytes of autocast's copies of weights
        self.copies_at_peak = 0
        self.crossing: _Crossing | None = None
        self._func: Any = None

    def storage_bytes(self, storage: torch.UntypedStorage) -> int:
        nbytes = storage.nbytes()
        return _round_cuda(nbytes) if self.cuda and nbytes else nbytes

    def mark(self, phase: str) -> None:
        self.phase, self.where = phase, ""

    def at(self, where: str, *_: Any) -> None:
        self.where = where

    def position(self) -> str:
        return f"{self.phase}, {self.where}" if self.where else self.phase

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._func = func
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.cuda and func.namespace == "bitsandbytes":
            self._transient(_bnb_cuda_scratch(func, args, kwargs or {}))
        if self.crossing is not None and not self.crossing.described:
            self._describe_crossing(out)
        if self.autocast_on and func is torch.ops.aten._to_copy.default and _is_param(args[0]):
            self._tag_copy(out)
        return out

    def _tag_copy(self, out: torch.Tensor) -> None:
        storage = out.untyped_storage()
        if storage._cdata not in self._live:
            return
        nbytes = self.storage_bytes(storage)
        self.copies += nbytes
        weakref.finalize(storage, partial(self._untag, nbytes))
        if self.current == self.peak:
            self.copies_at_peak = self.copies

    def _untag(self, nbytes: int) -> None:
        self.copies -= nbytes

    def _count(self, nbytes: int) -> None:
        self._check_budget(nbytes)
        super()._count(nbytes)
        self._record(self.current)

    def _record(self, level: int) -> None:
        group = self.phase.split()[0]  # "decode step 3" counts as "decode"
        if level > self.phase_peaks.get(group, 0):
            self.phase_peaks[group] = level
        if level >= self.peak:
            self.peak = level
            self.peak_phase = self.position()
            self.copies_at_peak = self.copies

    def _transient(self, nbytes: int) -> None:
        """Memory an op allocates and frees inside itself, on top of its outputs."""
        if not nbytes:
            return
        self._check_budget(nbytes)
        self._record(self.current + nbytes)

    def _check_budget(self, nbytes: int) -> None:
        if self.crossing is None and self.budget_limit is not None and self.current + nbytes > self.budget_limit:
            stack = [f for f in traceback.extract_stack() if not _is_estimator(Path(f.filename))]
            frame = model_frame(traceback.StackSummary.from_list(stack))
            location = f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}: {frame.line}" if frame else None
            self.crossing = _Crossing(op=str(self._func), phase=self.position(), in_use=self.current,
                                      location=location)

    def _describe_crossing(self, out: Any) -> None:
        """Add the largest output's shape and dtype to the op that crossed, as `run_guarded` reports a failed op."""
        items = out if isinstance(out, (list, tuple)) else (out,)
        tensors = [t for t in items if isinstance(t, torch.Tensor)]
        if tensors:
            largest = max(tensors, key=lambda t: t.numel() * t.element_size())
            self.crossing.op += f" -> {tuple(largest.shape)} {dtype_name(largest.dtype)}"
        self.crossing.described = True


def _is_estimator(path: Path) -> bool:
    """A frame of the estimator itself (this module or `estimate_split`), never the model line to report."""
    return path.name.startswith("estimate") and path.resolve().parent == _THIS_DIR


def _is_param(tensor: Any) -> bool:
    return isinstance(tensor, nn.Parameter) or getattr(tensor, "_is_param", False)


def _bnb_cuda_scratch(func: Any, args: tuple, kwargs: dict) -> int:
    """Bytes a bitsandbytes op allocates and frees inside its CUDA kernel (CPU accounting cannot see them)."""
    named = dict(zip((a.name for a in func._schema.arguments), args)) | kwargs
    name = func._schema.name
    if name == "bitsandbytes::gemm_4bit":
        a, (n, k) = named["A"], named["shapeB"]
        if a.numel() // a.shape[-1] <= BNB_FUSED_MAX_ROWS:
            return 0
        scratch = _round_cuda(n * k * a.element_size())  # the weight dequantized to the input's dtype
        nested = named.get("absmax_8bit")
        if nested is not None:
            scratch += 2 * _round_cuda(nested.numel() * 4)  # the nested absmax decoded to FP32, plus its offset sum
        return scratch
    if name == "bitsandbytes::int8_scaled_mm":
        a, b = named["A"], named["B"]
        return _round_cuda(a.numel() // a.shape[-1] * b.shape[0] * 4)  # the int32 product before dequantizing
    if name == "bitsandbytes::int8_vectorwise_quant":
        a = named["A"]
        # With transformers' outlier threshold (6.0) the kernel builds |A| and the outlier mask.
        return _round_cuda(a.numel() * a.element_size()) + _round_cuda(a.numel())
    return 0


class _CudaSoftmax(TorchFunctionMode):
    """softmax(FP16 -> FP32) as CUDA runs it, in one kernel; on CPU it first copies the input to FP32."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SOFTMAXES and kwargs.get("dtype") == torch.float32 and args[0].dtype == torch.float16:
            dim = args[1] if len(args) > 1 else kwargs["dim"]
            return torch._softmax(args[0], dim, True)
        return func(*args, **kwargs)


# ----- the replay ---------------------------------------------------------------------------------------


@dataclass
class _Replayed:
    prompt_tokens: int
    cache_bytes_by_device: dict[torch.device, int]  # where each layer's keys and values live

    @property
    def cache_bytes(self) -> int:
        return sum(self.cache_bytes_by_device.values())


def _fast_forward(cache: Any, length: int) -> None:
    """Grow every cache layer to `length` tokens, as the skipped decode steps would have."""
    for layer in cache.layers:
        for name in ("keys", "values"):
            old = getattr(layer, name)
            shape, dtype, device = (*old.shape[:-2], length, old.shape[-1]), old.dtype, old.device
            setattr(layer, name, None)  # freed first: the skipped steps never held two copies at once
            del old
            setattr(layer, name, torch.empty(shape, dtype=dtype, device=device))


@contextlib.contextmanager
def _positions(model: nn.Module, acc: _SimulatedAccounting) -> Iterator[None]:
    """Tell the accounting which part of the model runs, for the peak's and the budget crossing's position."""
    layers = model.model.layers
    parts = [(model.vit, "vision tower"), (model.vision_proj, "projector"), (model.output, "output head")]
    parts += [(layer, f"decoder layer {i + 1}/{len(layers)}") for i, layer in enumerate(layers)]
    handles = [module.register_forward_pre_hook(partial(acc.at, where)) for module, where in parts]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _replay(model: nn.Module, tokenizer: Any, pixels: list[torch.Tensor], *, query: str, image_size: int,
            new_tokens: int, grad: str, use_autocast: bool, exact_decode: bool,
            acc: _SimulatedAccounting) -> _Replayed:
    """What `run_caption` computes, with `generate`'s greedy loop written out (its stopping checks read data)."""
    with grad_mode(grad), autocast("cpu", use_autocast), _positions(model, acc):
        acc.mark("vision")
        # As vis_processor normalises a decoded image (the decoded pixels themselves are not counted).
        mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
        images = [(p - mean) / std for p in pixels]  # (3, S, S) each
        del mean, std
        embeds, im_mask = prompt_batch(model, tokenizer, images, query, image_size)  # (B, T, C), (B, T)
        del images
        with torch.no_grad():  # generate() is decorated with it
            batch, prompt = embeds.shape[:2]
            # generate's special-token tensors (bos, the two stops, pad) and its position ids, grown each step,
            # on the inputs' device; its input ids on the model's (the first parameter's) device.
            at, ids_at = embeds.device, next(model.parameters()).device
            stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)]
            specials = [torch.tensor(token, device=at) for token in (tokenizer.bos_token_id, stops,
                                                                     tokenizer.pad_token_id)]
            mask = torch.ones((batch, prompt), dtype=torch.long, device=at)
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # (B, T)
            del mask
            input_ids = torch.ones((batch, 0), dtype=torch.long, device=ids_at)
            unfinished = torch.ones(batch, dtype=torch.long, device=ids_at)
            cache = None
            steps = range(new_tokens) if exact_decode else sorted({0, new_tokens - 1})
            done = 0
            for step in steps:
                if step > done + 1:
                    _fast_forward(cache, prompt + step - 1)
                    input_ids = torch.empty((batch, step), dtype=torch.long, device=ids_at)
                    positions = torch.empty((batch, prompt + step), dtype=torch.long, device=at)
                acc.mark("prefill" if step == 0 else f"decode step {step}")
                model_inputs = model.prepare_inputs_for_generation(
                    input_ids, cache=cache, inputs_embeds=embeds, im_mask=im_mask, use_cache=True)
                outputs = model(**model_inputs, return_dict=True)
                if step == 0:
                    del model_inputs  # _prefill's own local: gone when it returns
                cache = outputs.cache
                # Kept until the next step reassigns them, as in generate's loop.
                next_token_logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32,
                                                              device=input_ids.device)  # (B, vocab)
                next_tokens = torch.argmax(next_token_logits, dim=-1)
                next_tokens = next_tokens * unfinished + specials[2] * (1 - unfinished)
                input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
                positions = torch.cat([positions, positions[..., -1:] + 1], dim=-1)
                del outputs  # the prefill logits go here, as generate deletes them
                done = step
        return _Replayed(prompt_tokens=prompt, cache_bytes_by_device=cache_bytes_by_device(cache))


# ----- the API ------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _course_tokenizer() -> Any:
    from .model.checkpoint import course_tokenizer

    return course_tokenizer()


def _notes(device: str, quantization: str, use_autocast: bool, exact_decode: bool, quant_bytes: int,
           new_tokens: int) -> tuple[str, ...]:
    notes = ["Assumes all new tokens are generated (no early end-of-turn)."]
    if not exact_decode and new_tokens > 2:
        notes.append(f"Decode steps 1 to {new_tokens - 2} fast-forwarded (the cache grown in place): each decode "
                     "step repeats the last one's ops on fewer tokens, so the decode peak is the last step's; "
                     "exact_decode=True simulates every step.")
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


@dataclass(frozen=True)
class _Call:
    """The checked settings of one predicted captioning call."""

    config: InternLMXcomposer2Config  # a private copy, with the attention kind set
    dtype: torch.dtype
    quantization: str
    attn: str
    grad: str
    use_autocast: bool
    batch_size: int
    image_size: int
    new_tokens: int
    device: str  # "cpu" or "cuda"

    def settings(self) -> dict[str, Any]:
        """What `Estimate.settings` reports."""
        return dict(dtype=dtype_name(self.dtype), quantization=self.quantization, grad=self.grad,
                    use_autocast=self.use_autocast, attn_implementation=self.attn, batch_size=self.batch_size,
                    image_size=self.image_size, new_tokens=self.new_tokens)

    def kv_cache_bytes(self, prompt_tokens: int, layers: int | None = None) -> int:
        """2 x layers x kv_heads x head_dim x batch x (prompt + new - 1) x bytes (all layers by default)."""
        config = self.config
        kv_dtype = torch.float16 if self.use_autocast else self.dtype
        return (2 * (config.num_hidden_layers if layers is None else layers) * config.num_key_value_heads
                * config.head_dim * self.batch_size * (prompt_tokens + self.new_tokens - 1)
                * torch.empty((), dtype=kv_dtype).element_size())


def _check_call(target: Any, *, dtype: Any, quantization: Any, grad: Any, use_autocast: Any,
                attn_implementation: Any, batch_size: Any, image_size: Any, new_tokens: Any, device: Any) -> _Call:
    """The settings of `estimate_caption`, checked, with a loaded model's own dtype, quantization and attention."""
    config, model = _config_of(target)
    model_dtype, model_quant = _model_settings(model) if model is not None else ("float32", "none")
    torch_dtype = check_dtype(dtype if dtype is not None else model_dtype)
    if torch_dtype is None:
        raise ValueError("dtype='auto' has no size to predict with; pass 'float32', 'float16' or 'bfloat16'.")
    quant = _check_choice("quantization", quantization if quantization is not None else model_quant, QUANTIZATIONS)
    attn = attn_implementation or (config._attn_implementation if model is not None else None) or "eager"
    _check_choice("attn_implementation", attn, SUPPORTED_ATTENTION, " (eager materialises the scores)")
    _check_choice("grad", grad, GRAD_MODES, " (the quick start's torch.set_grad_enabled(False) is 'no_grad')")
    if not isinstance(use_autocast, bool):
        raise ValueError(f"use_autocast={use_autocast!r}; pass True (the quick start's autocast) or False.")
    _check_int("batch_size", batch_size, "images captioned together")
    _check_int("new_tokens", new_tokens, "tokens generated per caption")
    patch = config.vision_config.patch_size
    size = config.image_size if image_size is None else _check_int("image_size", image_size, "pixels per side")
    if size % patch:
        raise ValueError(f"image_size={size}; it must be a multiple of the {patch} px patch size, "
                         f"e.g. {max(patch, size // patch * patch)}.")
    kind = _check_device(device)
    config._attn_implementation = attn
    return _Call(config=config, dtype=torch_dtype, quantization=quant, attn=attn, grad=grad,
                 use_autocast=use_autocast, batch_size=batch_size, image_size=size, new_tokens=new_tokens, device=kind)


def _stored_bytes(tensors: Sequence[torch.Tensor], cuda: bool) -> dict[torch.device, dict[int, int]]:
    """Each storage once, by device, in the bytes the device's allocator gives it: {device: {storage: bytes}}."""
    stored: dict[torch.device, dict[int, int]] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        stored.setdefault(tensor.device, {})[storage._cdata] = (
            _round_cuda(storage.nbytes()) if cuda else storage.nbytes())
    return stored


def _estimate_from(acc: _SimulatedAccounting, call: _Call, *, label: str, device: str, weights: int, kv: int,
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
    For a model split over several GPUs by a device map, see `xcomp_lab.estimate_split`.
    """
    start = time.perf_counter()
    call = _check_call(model_or_config_or_scale, dtype=dtype, quantization=quantization, grad=grad,
                       use_autocast=use_autocast, attn_implementation=attn_implementation, batch_size=batch_size,
                       image_size=image_size, new_tokens=new_tokens, device=device)
    cuda = call.device == "cuda"
    limit = _resolve_budget(budget, call.device)

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True, static_shapes=True)
    fake = _build(call.config, call.dtype, call.quantization, fake_mode)
    statistics = _quant_state_tensors(fake)
    (stored,) = _stored_bytes([*fake.parameters(), *fake.buffers(), *statistics], cuda).values()
    weights = sum(stored.values())
    quant_bytes = sum(stored[key] for key in {t.untyped_storage()._cdata for t in statistics})

    acc = _SimulatedAccounting(weights, limit, cuda=cuda, autocast_on=use_autocast)
    with fake_mode:
        # The decoded images: not counted.
        pixels = [torch.empty(3, call.image_size, call.image_size) for _ in range(batch_size)]
        with acc, (_CudaSoftmax() if cuda else contextlib.nullcontext()):
            replayed = _replay(fake, tokenizer or _course_tokenizer(), pixels, query=query, image_size=call.image_size,
                               new_tokens=new_tokens, grad=grad, use_autocast=use_autocast,
                               exact_decode=exact_decode, acc=acc)

    kv = call.kv_cache_bytes(replayed.prompt_tokens)
    notes = _notes(call.device, call.quantization, use_autocast, exact_decode, quant_bytes, new_tokens)
    if replayed.cache_bytes != kv:
        notes += (f"The simulated cache holds {replayed.cache_bytes:,} bytes, the formula gives {kv:,}.",)
    return _estimate_from(acc, call, label=label, device=call.device, weights=weights, kv=kv,
                          simulated_kv=replayed.cache_bytes, prompt_tokens=replayed.prompt_tokens,
                          quant_bytes=quant_bytes, seconds=time.perf_counter() - start, notes=notes)


def course_budget_bytes(params: CourseParams, config: InternLMXcomposer2Config | None = None) -> int:
    """The limit `steps.course_budget` enforces for `params`, worked out without a GPU.

    CUDA: the card's own bytes. CPU: the card scaled by this model's FP32 parameter bytes against the full
    model's (8,666,840,064 x 4: parameters only, so buffers count on neither side).
    """
    if params.device == "cuda":
        return gb_to_bytes(params.budget_gb)
    return course_budget(params, parameter_count(config or params.scale) * 4).limit_bytes


def estimate_step(step: Step, params: CourseParams, *, budget: Budget | int | str | None = COURSE_BUDGET,
                  tokenizer: Any = None, exact_decode: bool = False) -> Estimate:
    """Predict a course step as `run_step` runs it with these notebook parameters.

    The step gives dtype (its cast, if any), quantization, gradient mode, autocast and possibly the attention
    kind; `params` give scale (or the checkpoint's configuration), device, batch size, image size, new tokens
    and attention. `budget="course"` uses the budget the course enforces for `params`.
    """
    if not isinstance(step, Step):
        raise TypeError(f"step must be a Step (e.g. xcomp_lab.steps.STEPS['fp16']), got {type(step).__name__}")
    if not isinstance(params, CourseParams):
        raise TypeError(f"params must be CourseParams from check_params(...), got {type(params).__name__}")
    if params.model_name_or_path is None:
        config = config_for_scale(params.scale)
    else:
        from transformers import AutoTokenizer

        config = InternLMXcomposer2Config.from_pretrained(params.model_name_or_path)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(params.model_name_or_path, trust_remote_code=True)
    if isinstance(budget, str):
        _check_choice("budget", budget, [COURSE_BUDGET], ", a Budget, a limit in bytes or None")
        budget = course_budget_bytes(params, config)
    return estimate_caption(
        config, dtype=step.cast or step.dtype, quantization=step.quantization, grad=step.grad,
        use_autocast=step.use_autocast, attn_implementation=step.attn_implementation or params.attn_implementation,
        batch_size=params.batch_size, image_size=params.image_size, new_tokens=params.max_new_tokens,
        device=params.device, budget=budget, tokenizer=tokenizer, label=step.name, exact_decode=exact_decode,
    )
