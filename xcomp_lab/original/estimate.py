"""Predict the memory of the original remote code's `model.chat` without a GPU: the original's own code replayed on
fake tensors, every allocation counted, and on CUDA passed through the caching allocator's simulation.

Runs in the original's environment (transformers 4.33.2, `xcomp_lab.original.environment.prepare_transformers`
first). `estimate_original(step, files)` does what `xcomp_lab.original.steps` does on a GPU, on tensors that have
shapes and dtypes but no data (`FakeTensorMode`, so the full size needs no memory):

1. the model is built by `steps.direct_loader`, the remote code's own classes from the checkpoint's files, in the
   step's dtype, then given the step's cast (`.half()`, `cast_model`) or its PLoRA-aware INT8/NF4 recipe
   (`quantize_plora_fake`), while the accounting watches: on CUDA each parameter, buffer and temporary of the
   construction goes through the allocator simulation (`xcomp_lab.plan.allocator`) in the order the GPU allocates
   them, then the cache is emptied and the peaks reset, as `memory.measure` does at its start;
2. `model.chat(tokenizer, QUERY, image=..., history=[], do_sample=False, max_new_tokens=N)` runs exactly as
   `steps.chat_once` calls it (the step's gradient mode and autocast): the original's image preprocessing, prompt
   wrapping, decoder and transformers 4.33.2's own `generate` and greedy loop (its logits processors, its tuple
   cache, what it keeps alive between steps), counted by the planner's accounting (`plan.accounting`, which is
   `memory.measure`'s CPU accounting), with the phase ("vision", "prefill", "decode-1", ...) and the part of the
   model at each peak.

**Data-dependent code stays exact.** The inputs and what is computed from them alone stay real tensors
(`plan.realvalues.RealValues`: token ids, the attention mask, `im_mask`, the pixels), so every branch that reads
them goes as in the real call: PLoRA's `if torch.sum(im_mask) > 0`, generate's end-of-sequence and stopping
checks, `chat()`'s `.tolist()` of the output. PLoRA's image-token scatter indexes a fake activation with the real
boolean `im_mask` (`x[im_mask]`, `res[im_mask] += ...`), whose output size fake tensors cannot know: `RealMasks`
hands the indexing op the mask's true positions as real index vectors (`nonzero`, as ATen's kernel computes them
inside the op, unseen by the accounting either way), so the op allocates the same (1225 x width) output. The one
value the model produces and the code reads, the next token (`argmax` of fake logits), is a fixed ordinary token,
never end-of-sequence: every new token is generated, as on the GPU (16 of 16). One truth value is read from the
model's own data: generate's `pad_token_id in inputs_embeds` (transformers 4.33.2 asks it of any input); it cannot
change the path (the inputs are embeddings, not ids, so the answer is never used) and is answered False, as a
float embedding never equals the pad id; it still allocates its comparison, as on the GPU. `PromptLength` makes
the prompt as long as another tokenizer would (the real checkpoint's). LLM.int8() outlier columns depend on the
activations' values: none are assumed (`estimate.fake.quantize_fake_linear`).

**CUDA from a CPU.** The fake tensors are CPU tensors; what CUDA does differently for this model's ops is applied:
allocations through the caching allocator's rules (512-byte blocks, pools, segments, whole blocks handed out;
`max_memory_allocated` is its allocated peak), cuBLAS's workspace (`plan.estimate.cublas_workspace`), softmax of
FP16 into FP32 as one kernel (`estimate.accounting.CudaSoftmax`), and `torch.cuda.amp.autocast()` stood for by CPU
autocast at float16 (the same lower-precision list for the ops the original calls: linear, matmul, bmm, conv2d;
the same weight cache, kept for parameters that require grad, none inside `inference_mode` from torch 2.10), plus
`CudaAutocastPolicy`: CUDA's autocast runs a softmax called without a dtype in FP32 (its `fp32_set_opt_dtype`
list: CLIP's attention) and layer_norm of FP16 in FP32, which CPU autocast does not. Kernel workspaces other than
cuBLAS's (cuDNN's convolution) are not simulated. A budget is the allocator's limit: a segment that would exceed it
raises, as `set_per_process_memory_fraction` does, and the estimate names that allocation, the op, the model line
and the memory allocated then.

On CPU (`device="cpu"`) the prediction is `memory.measure("cpu")`'s figure for the real call, to the byte
(`tests/test_original_estimate.py` checks it on the small checkpoint).
"""

from __future__ import annotations

import contextlib
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from xcomp_lab.core.checks import check_choice, check_int
from xcomp_lab.core.dtypes import check_dtype
from xcomp_lab.estimate.accounting import CudaSoftmax
from xcomp_lab.estimate.fake import double_quant_map, quantize_fake_linear
from xcomp_lab.memory.footprint import resident_bytes
from xcomp_lab.memory.oom import model_frame
from xcomp_lab.model.original import IMAGE_GRID
from xcomp_lab.original.prompts import model_image
from xcomp_lab.original.quantize import QuantizedPLoRA, is_plora, plora_base_layer
from xcomp_lab.original.steps import (
    QUERY,
    OriginalStep,
    direct_loader,
    get_original_step,
)
from xcomp_lab.plan.accounting import PlanAccounting
from xcomp_lab.plan.allocator import BothOrders, OutOfMemory, segment_size
from xcomp_lab.plan.realvalues import RealValues
from xcomp_lab.run.modes import autocast, grad_mode

DEVICES = ("cuda", "cpu")
PACKAGE_DIR = Path(__file__).resolve().parents[1]
_aten = torch.ops.aten
_INDEXING = frozenset({_aten.index.Tensor, _aten.index_put_.default, _aten.index_put.default,
                       _aten._unsafe_index_put.default})
_SOFTMAXES = (torch.nn.functional.softmax, torch.softmax, torch.Tensor.softmax)


@dataclass(frozen=True)
class OriginalEstimate:
    """One predicted `model.chat` of the original code. Bytes as the device counts them (CUDA: its allocator)."""

    step: str
    device: str
    prompt_tokens: int
    new_tokens: int
    weights_bytes: int  # parameters and buffers, each storage once (as `memory.measure` reports them)
    start_bytes: int  # allocated when the chat starts: the weights in their blocks (+ cuBLAS's workspace on CUDA)
    kv_cache_bytes: int  # the tuple cache's tensors at the last step, as `steps` counts them (views at their size)
    peak_bytes: int  # max_memory_allocated (CPU: the accounting's peak); at the failure where the budget is crossed
    reserved_peak_bytes: int | None  # max_memory_reserved (CUDA)
    peak_phase: str  # "vision", "prefill", "decode-1", ...
    peak_where: str  # the part of the model running at the peak
    phase_peaks: dict[str, int]
    autocast_copies_bytes: int  # FP16 copies of weights autocast holds at the peak
    budget_bytes: int | None
    oom: bool | None  # None without a budget
    oom_op: str | None = None  # the op whose allocation fails, with its output's shape and dtype
    oom_location: str | None = None  # "modeling_internlm2.py:442 in forward: <line>"
    oom_phase: str | None = None
    oom_requested_bytes: int | None = None  # the segment the allocator asks for ("Tried to allocate ...")
    oom_allocated_bytes: int | None = None  # memory allocated when it fails
    seconds: float = 0.0
    notes: tuple[str, ...] = field(default=(), repr=False)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict."""
        out = asdict(self)
        out["notes"] = list(self.notes)
        return out


class RealMasks(TorchDispatchMode):
    """Indexing with a real boolean mask (`x[mask]`, `x[mask] = y`) on a fake tensor: the mask's true positions as
    real index vectors, so that fake tensors know the output's size; a truth value read from fake data is False
    (see the module's docstring); and a real tensor's in-place detach runs for real."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _INDEXING and any(is_real_mask(index) for index in args[1]):
            indices: list[torch.Tensor | None] = []
            with _disable_current_modes():
                for index in args[1]:
                    indices.extend(index.nonzero().unbind(1) if is_real_mask(index) else (index,))
            args = (args[0], indices, *args[2:])
        elif func is _aten._local_scalar_dense.default and isinstance(args[0], FakeTensor) \
                and args[0].dtype == torch.bool:
            return False
        elif func is _aten.detach_.default and not isinstance(args[0], FakeTensor):
            # Inside inference_mode, torch.tensor(data) detaches its new (real) tensor in place, a metadata change
            # fake tensors refuse to make on a real one: made for real (it allocates nothing).
            with _disable_current_modes():
                return func(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def is_real_mask(index: Any) -> bool:
    return isinstance(index, torch.Tensor) and not isinstance(index, FakeTensor) and index.dtype == torch.bool


class CudaAutocastPolicy(TorchFunctionMode):
    """CUDA autocast's rules that CPU autocast lacks, for the ops the original calls: a softmax called without a
    dtype runs in FP32 (`fp32_set_opt_dtype`), and layer_norm casts its FP16 arguments to FP32 (`fp32`: CLIP's
    norms once the weights are FP16). The other ops the original runs under autocast are in neither list, or in
    the same list on both devices (checked on the small checkpoint: linear, matmul, bmm, conv2d lower precision;
    cat promotes as eager does)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_autocast_enabled("cpu"):
            return func(*args, **kwargs)
        if func in _SOFTMAXES and kwargs.get("dtype") is None and len(args) < 4 and args[0].is_floating_point():
            kwargs = {**kwargs, "dtype": torch.float32}
        elif func is torch.nn.functional.layer_norm and args[0].dtype == torch.float16:
            args = tuple(a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.float16 else a for a in args)
            kwargs = {k: v.float() if isinstance(v, torch.Tensor) and v.dtype == torch.float16 else v
                      for k, v in kwargs.items()}
        return func(*args, **kwargs)


class ChatAccounting(PlanAccounting):
    """The planner's accounting, which also notes the allocation the budget refuses and the autocast copies."""

    def __init__(self, allocator: BothOrders | None, cast_copies: bool) -> None:
        super().__init__(0, allocator)
        self.cast_copies = cast_copies
        self.copies: dict[int, int] = {}  # storage key -> bytes of autocast's copies of parameters
        self.copies_at_peak = 0
        self.top = -1
        self.failure: dict[str, Any] | None = None
        self._op = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._op = str(func)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.cast_copies and func is _aten._to_copy.default and isinstance(args[0], nn.Parameter):
            key = out.untyped_storage()._cdata
            if key in self.live:
                self.copies[key] = out.untyped_storage().nbytes()
        return out

    def allocated(self, nbytes: int) -> None:
        try:
            super().allocated(nbytes)
        except OutOfMemory as error:
            stack = [frame for frame in traceback.extract_stack() if PACKAGE_DIR not in Path(frame.filename).parents]
            frame = model_frame(traceback.StackSummary.from_list(stack))
            self.failure = {"op": self._op, "phase": self.phase, "where": self.where,
                            "location": f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}: {frame.line}"
                            if frame else None,
                            "requested": segment_size(error.requested), "allocated": error.allocated}
            raise

    def freed(self, key: int, nbytes: int, ref: Any) -> None:
        if self.live.get(key) is ref:
            self.copies.pop(key, None)
        super().freed(key, nbytes, ref)

    def record(self) -> None:
        super().record()
        if self.level > self.top:
            self.top = self.level
            self.copies_at_peak = sum(self.copies.values())


@contextlib.contextmanager
def chat_phases(model: nn.Module, acc: ChatAccounting, cache: dict[str, int]) -> Iterator[None]:
    """Mark the phases as `steps` names them ("vision", "prefill", "decode-n") and the part of the model running;
    put the final tuple cache's bytes in `cache["bytes"]` and the prompt's length in `cache["prompt"]`."""
    calls = {"n": 0}

    def on_decoder(_module: Any, _args: Any, kwargs: dict) -> None:
        calls["n"] += 1
        if calls["n"] == 1 and kwargs.get("inputs_embeds") is not None:
            cache["prompt"] = int(kwargs["inputs_embeds"].shape[1])
        acc.mark("prefill" if calls["n"] == 1 else f"decode-{calls['n'] - 1}")

    def after_decoder(_module: Any, _args: Any, output: Any) -> None:
        layers = getattr(output, "past_key_values", None) or ()
        cache["bytes"] = sum(t.numel() * t.element_size() for layer in layers for t in layer)
        cache["calls"] = calls["n"]

    layers = model.model.layers
    parts = [(model.vit, "vision tower"), (model.vision_proj, "projector"), (model.output, "output head")]
    parts += [(layer, f"decoder layer {i + 1}/{len(layers)}") for i, layer in enumerate(layers)]
    handles = [model.vit.register_forward_pre_hook(lambda *_: acc.mark("vision")),
               model.model.register_forward_pre_hook(on_decoder, with_kwargs=True),
               model.model.register_forward_hook(after_decoder)]
    handles += [module.register_forward_pre_hook(partial(lambda where, *_: acc.at(where), where))
                for module, where in parts]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class PromptLength:
    """The chat's tokenizer, making the prompt `tokens` long: the text after the image (the second text part of a
    one-image chat) padded with its own last token, or cut, so that text before + image + text after = `tokens`.

    The memory of a chat depends on its prompt's length, not on which tokens it holds: this gives the figures of a
    prompt as another tokenizer splits the same text (the real checkpoint's: 1387 tokens, DESIGN.md section 6).
    """

    def __init__(self, tokenizer: Any, tokens: int) -> None:
        self.tokenizer = tokenizer
        self.tokens = tokens
        self.lengths: list[int] = []

    def __call__(self, text: Any, *args: Any, **kwargs: Any) -> Any:
        out = self.tokenizer(text, *args, **kwargs)
        if kwargs.get("return_tensors") != "pt":
            return out
        self.lengths.append(out["input_ids"].shape[1])
        if len(self.lengths) == 2:
            ids, want = out["input_ids"], self.tokens - self.lengths[0] - IMAGE_GRID ** 2
            if want < 1:
                raise ValueError(f"prompt_tokens={self.tokens} is shorter than the text before the image and the "
                                 f"image ({self.lengths[0]} + {IMAGE_GRID ** 2} tokens).")
            ids = ids[:, :want] if want <= ids.shape[1] else torch.cat(
                [ids, ids[:, -1:].expand(-1, want - ids.shape[1])], dim=1)
            out["input_ids"], out["attention_mask"] = ids, torch.ones_like(ids)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


def cast_model(module: nn.Module, dtype: torch.dtype) -> None:
    """`module.to(dtype)` as `nn.Module._apply` does it for a real model: children first, then each floating
    parameter and buffer cast and put in place of the old one, which is freed at once. (`_apply` swaps fake
    tensors in place instead, which their parameters refuse; the memory is the same either way.)"""
    for child in module.children():
        cast_model(child, dtype)
    for key, param in module._parameters.items():
        if param is not None and param.is_floating_point():
            module._parameters[key] = nn.Parameter(param.to(dtype), requires_grad=param.requires_grad)
    for key, buffer in module._buffers.items():
        if buffer is not None and buffer.is_floating_point():
            module._buffers[key] = buffer.to(dtype)


def quantize_plora_fake(model: nn.Module, quantization: str, compute_dtype: torch.dtype) -> None:
    """`quantize.quantize_plora` on a fake model (whose tensors bitsandbytes' parameter classes cannot wrap), with
    the same memory, layer by layer: the FP16 copy of the base weight that bitsandbytes quantizes on the device
    (allocated, then freed), the quantized weight and its statistics, and the layer's FP16 weight freed as the
    `QuantizedPLoRA` replaces it. Call it inside the fake mode."""
    for name in [name for name, module in model.named_modules() if is_plora(module)]:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        plora = getattr(parent, child)
        with _disable_current_modes():  # a bitsandbytes layer on the meta device, as quantize_plora makes it
            layer = plora_base_layer(plora, quantization, compute_dtype)
        staged = plora.weight.detach().to(torch.float16, copy=True)  # what `.to(device)` copies and quantizes
        quantize_fake_linear(layer, staged, plora.bias)
        del staged
        setattr(parent, child, QuantizedPLoRA(layer, plora))
        del plora


def ordinary_token(tokenizer: Any) -> int:
    """A token id the fake argmax answers: the query's first, never an end of sequence (as min tokens ensure)."""
    stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("[UNUSED_TOKEN_145]")}
    return next(i for i in tokenizer(QUERY.split(">")[-1]).input_ids if i not in stops and i != tokenizer.bos_token_id)


def estimate_original(step: str | OriginalStep, files: str | Path, *, scale: str, image: str | Path,
                      device: str = "cuda", budget_bytes: int | None = None, max_new_tokens: int = 16,
                      workspace_bytes: int | None = None, prompt_tokens: int | None = None) -> OriginalEstimate:
    """Predict `model.chat` of the original code as `xcomp_lab.original.steps` runs `step` (a name of `ORIGINAL_STEPS`
    whose model `steps.direct_loader` builds: not those loaded by transformers' bitsandbytes path or a device map,
    nor sdpa, which the original refuses) on `device` ("cuda": `max_memory_allocated` by the allocator's simulation;
    "cpu": `memory.measure`'s accounting). `files`: the checkpoint's files without weights (`model.original.
    write_model_files`) at `scale`; `image`: the image captioned. `budget_bytes` (CUDA): the allocator's limit, to
    predict whether and where the call runs out of memory. `workspace_bytes`: cuBLAS's (CUDA; default the
    H100/H200's, `plan.estimate.cublas_workspace`). `prompt_tokens`: make the prompt this long (`PromptLength`;
    default: as the checkpoint's tokenizer splits it).
    """
    from xcomp_lab.plan.estimate import cublas_workspace

    start = time.perf_counter()
    step = step if isinstance(step, OriginalStep) else get_original_step(step)
    if step.step.attn_implementation is not None:
        raise ValueError(f"step {step.name!r} asks for attn_implementation={step.step.attn_implementation!r}, which "
                         "the original's constructor refuses (TypeError at the load): there is no call to predict; "
                         "choose a step of the original's eager attention.")
    check_choice("device", device, DEVICES, "the device whose memory is predicted")
    check_int("max_new_tokens", max_new_tokens, hint="new tokens per caption, as chat(max_new_tokens=...)")
    if budget_bytes is not None:
        if device != "cuda":
            raise ValueError(f"budget_bytes={budget_bytes} with device={device!r}: a budget is the CUDA allocator's "
                             "limit here; predict on 'cuda', or leave it None for the CPU accounting's peak.")
        check_int("budget_bytes", budget_bytes, hint="the allocator's limit in bytes, e.g. 48 * 10**9")
    if prompt_tokens is not None:
        check_int("prompt_tokens", prompt_tokens, hint="the prompt's length in tokens, its image's 1225 included")
    if not Path(image).is_file():
        raise FileNotFoundError(f"image={str(image)!r} is not a file: pass the image the chat captions.")
    cuda = device == "cuda"
    if cuda:
        workspace_bytes = cublas_workspace(None) if workspace_bytes is None else workspace_bytes
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True, static_shapes=True)
    allocator = BothOrders(budget_bytes) if cuda else None
    acc = ChatAccounting(allocator, cast_copies=step.step.use_autocast)
    load = direct_loader(files, "cpu", scale)
    if step.step.quantization != "none":
        double_quant_map()
    with torch.no_grad(), fake_mode, (acc if cuda else contextlib.nullcontext()):
        # On CUDA the allocator sees the construction, in its order.
        model, tokenizer = load(replace(step, recipe="load") if step.recipe == "plora" else step)
        if step.recipe == "plora":  # direct_loader quantizes before its .eval(): the new layers run in eval mode
            quantize_plora_fake(model, step.step.quantization, check_dtype(step.step.dtype))
            model.eval()
        if step.step.cast is not None:
            cast_model(model, check_dtype(step.step.cast))
    weights = resident_bytes(model, "cpu")
    if cuda:
        allocator.empty_cache()  # measure()'s start: cache emptied, peaks reset
        allocator.reset_peaks()
        allocator.malloc(workspace_bytes)  # made at the first product and kept
        begin = allocator.allocated
    else:
        begin = acc.current = acc.peak = weights
    acc.peaks.clear()
    acc.top = -1
    acc.mark("start")
    acc.record()
    cache: dict[str, int] = {"bytes": 0, "prompt": 0, "calls": 0}
    cuda_rules = (CudaSoftmax(), CudaAutocastPolicy()) if cuda else ()
    token = ordinary_token(tokenizer)
    if prompt_tokens is not None:
        tokenizer = PromptLength(tokenizer, prompt_tokens)
    with contextlib.ExitStack() as stack:
        for context in (torch.no_grad(), fake_mode, RealValues(token), RealMasks(), acc, *cuda_rules,
                        grad_mode(step.step.grad), autocast("cpu", step.step.use_autocast),
                        chat_phases(model, acc, cache)):
            stack.enter_context(context)
        try:  # the image as `steps.chat_once` gives it: the file, or preprocessed inside the call (BF16 at load)
            given = model_image(model, str(image)) if step.image == "tensor" else str(image)
            model.chat(tokenizer, QUERY, image=given, history=[], do_sample=False, max_new_tokens=max_new_tokens)
        except OutOfMemory:
            if acc.failure is None:
                raise
    phase, top = max(acc.peaks.items(), key=lambda item: item[1].allocated)
    failure = acc.failure
    return OriginalEstimate(
        step=step.name, device=device, prompt_tokens=cache["prompt"], new_tokens=cache["calls"],
        weights_bytes=weights, start_bytes=begin, kv_cache_bytes=cache["bytes"], peak_bytes=top.allocated,
        reserved_peak_bytes=allocator.peak_reserved if cuda else None, peak_phase=phase,
        peak_where=top.where, phase_peaks={name: p.allocated for name, p in acc.peaks.items()},
        autocast_copies_bytes=acc.copies_at_peak, budget_bytes=budget_bytes,
        oom=None if budget_bytes is None else failure is not None,
        oom_op=failure and failure["op"], oom_location=failure and failure["location"],
        oom_phase=failure and failure["phase"], oom_requested_bytes=failure and failure["requested"],
        oom_allocated_bytes=failure and failure["allocated"], seconds=time.perf_counter() - start,
        notes=estimate_notes(cuda, step))


def estimate_notes(cuda: bool, step: OriginalStep) -> tuple[str, ...]:
    """What an estimate assumes."""
    notes = ["Every new token is generated (the fake argmax never answers end of sequence)."]
    if cuda:
        notes.append("The model built alone in a fresh allocator (a process's earlier steps leave cached segments "
                     "that can change how a later cast or load is carved: a few MiB).")
        notes.append("Reserved: the larger of the allocator simulated with segments placed downwards and upwards.")
        if step.step.use_autocast:
            notes.append("torch.cuda.amp.autocast() stood for by CPU autocast at float16 plus CUDA's FP32 softmax.")
    return tuple(notes)
