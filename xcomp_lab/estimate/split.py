"""Predict the peak on each GPU of a model split by a device map, as accelerate runs it, without allocating it.

`from_pretrained(..., device_map="auto", max_memory={0: ..., 1: ...})` puts every module on its card and
lets accelerate's hooks move the data: before a module runs, its inputs are copied to its card
(`AlignDevicesHook.pre_forward`); after the whole model runs, its outputs are copied back to the card its
inputs came from (the top-level hook, `io_same_device=True`): the prefill's logits come home to card 0.

How: the estimator's fake replica (`xcomp_lab.estimate.caption`) is placed on fake devices standing for the cards,
dispatched by accelerate's own `dispatch_model` (the hooks `from_pretrained` attaches, with the model's skip
keys), and the same captioning call is replayed. One accounting per card counts the storages on its device,
with the CUDA allocator's rounding: an allocation lands on the card where the tensor is, a hook's copy lands
on the receiving card, and a free is credited to the card that held the storage. Each card's weights are
the parameters and buffers dispatched to it.

The fake devices are `lazy:0`, `lazy:1`, ...: this CPU build of torch cannot index fake `cuda` tensors (it
has no CUDA device guard) and the lazy device type has one; fake tensors run no kernel, so only shapes,
dtypes and devices matter. `torch.tensor(data, device=card)` (which would run a real copy) is replaced by an
empty tensor of the same shape on that card. Not predicted here, each refused with a message: quantized
models and autocast (neither acts on the stand-in devices), maps that offload to cpu or disk, and maps
naming a device that is not a GPU index.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator, Mapping

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

from xcomp_lab.core.checks import check_int
from xcomp_lab.core.dtypes import dtype_name
from xcomp_lab.core.units import fmt_bytes, gb_to_bytes
from xcomp_lab.estimate.accounting import CudaSoftmax, SimulatedAccounting, stored_bytes
from xcomp_lab.estimate.call import CaptionCall, check_call
from xcomp_lab.estimate.caption import estimate_from, estimate_notes
from xcomp_lab.estimate.fake import build_fake_model
from xcomp_lab.estimate.placement import OFFLOAD_DEVICES, DevicePlan, plan_from_pretrained
from xcomp_lab.estimate.replay import course_tokenizer, replay
from xcomp_lab.estimate.result import Estimate
from xcomp_lab.model.tokenizer import CAPTION_QUERY

CARD_TYPE = "lazy"  # the fake device type that stands for a GPU (see the module's docstring)
_TO_COPY = torch.ops.aten._to_copy.default
# The course's planned two-card cases: card size in GB (each card) and the dtype loaded.
COURSE_SPLITS: dict[str, tuple[int, str]] = {
    "2x24GB-fp32": (24, "float32"),
    "2x24GB-fp16": (24, "float16"),
    "2x48GB-fp32": (48, "float32"),
}


def _fake_card(card: int) -> torch.device:
    return torch.device(CARD_TYPE, card)


def _card_of(device: torch.device) -> int | str:
    """The GPU index a fake device stands for, or the host ("cpu")."""
    return device.index if device.type == CARD_TYPE else device.type


# ----- the result ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Transfer:
    """Copies of one shape onto a card in one phase: what accelerate's hooks (or the model's `.to`) move."""

    phase: str  # "vision", "prefill", "decode step 15"
    source: int | str  # a GPU index, or "cpu" for host memory
    target: int
    shape: tuple[int, ...]
    dtype: str
    nbytes: int  # each copy, as the allocator rounds it
    count: int  # copies of this shape, from this source, in this phase

    def __str__(self) -> str:
        source = f"card {self.source}" if isinstance(self.source, int) else self.source
        times = f" x{self.count}" if self.count > 1 else ""
        return (f"{self.phase}: {source} -> card {self.target}: {tuple(self.shape)} {self.dtype}, "
                f"{fmt_bytes(self.nbytes)}{times}")


@dataclass(frozen=True)
class SplitEstimate:
    """A predicted captioning call on a model split over several GPUs: one `Estimate` per card.

    Each card's Estimate has that card's weights, the KV cache of its decoder layers, its activations and its
    peak, and its budget verdict. `oom_cards` lists the cards whose budget the call crosses, in the order it
    crosses them: on a real machine the first one raises and the call stops there.
    """

    label: str
    settings: dict[str, Any]
    device_map: dict[str, int]
    cards: dict[int, Estimate]
    layers: dict[int, tuple[int, ...]]  # decoder layer indices on each card
    parts: dict[int, tuple[str, ...]]  # the other top-level parts on each card ("vit", "output", ...)
    execution_order: tuple[tuple[str, int], ...]  # (part, card) in the order the parts first run
    transfers: tuple[Transfer, ...]
    oom_cards: tuple[int, ...]
    prompt_tokens: int
    new_tokens: int
    seconds: float
    notes: tuple[str, ...] = ()

    @property
    def oom_card(self) -> int | None:
        """The card that runs out of memory first, or None when every card fits (or no budget was given)."""
        return self.oom_cards[0] if self.oom_cards else None

    @property
    def weights_bytes(self) -> int:
        return sum(card.weights_bytes for card in self.cards.values())

    def where(self, card: int) -> str:
        """"model.layers.0-16 + model.tok_embeddings": what card `card` holds."""
        idx = self.layers.get(card, ())
        text = f"model.layers.{_ranges(idx)}" if idx else "no decoder layer"
        return text + "".join(f" + {part}" for part in self.parts.get(card, ()))

    def summary(self) -> str:
        """One line: `card 0: predicted peak X GiB of Y GiB budget | card 1: ...`."""
        lines = []
        for index, card in self.cards.items():
            text = f"card {index}: predicted peak {fmt_bytes(card.peak_bytes)}"
            if card.budget_bytes is not None:
                text += f" of {fmt_bytes(card.budget_bytes)} budget"
                text += (" (OOM first)" if index == self.oom_card else " (OOM)") if card.oom else " (fits)"
            lines.append(text)
        return " | ".join(lines)

    def table(self) -> str:
        """Per card: what it holds, weights, KV cache, activations, peak, the phase of the peak and the verdict."""
        name = f"[{self.label}] " if self.label else ""
        lines = [f"{name}{self.prompt_tokens} prompt tokens + {self.new_tokens} new, {self.settings['dtype']}",
                 f"{'card':<6}{'weights':>12}{'KV cache':>12}{'activations':>13}{'peak':>12}  holds; peak in; verdict"]
        for index, card in self.cards.items():
            lines.append(f"{index:<6}{fmt_bytes(card.weights_bytes):>12}{fmt_bytes(card.kv_cache_bytes):>12}"
                         f"{fmt_bytes(card.activations_bytes):>13}{fmt_bytes(card.peak_bytes):>12}  "
                         f"{self.where(index)}; {card.peak_phase}; {card.verdict()}")
        order = " -> ".join(f"{part}@{card}" for part, card in _runs(self.execution_order))
        lines.append(f"execution order: {order}")
        return "\n".join(lines)

    def transfer_table(self, min_bytes: int = 0) -> str:
        """The copies between devices, one line per phase, source, target and shape (at least `min_bytes` each)."""
        return "\n".join(str(t) for t in self.transfers if t.nbytes >= min_bytes)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict (cards as their Estimate dicts, transfers as dicts)."""
        return dict(label=self.label, settings=self.settings, device_map=self.device_map,
                    cards={str(i): card.as_dict() for i, card in self.cards.items()},
                    layers={str(i): list(v) for i, v in self.layers.items()},
                    parts={str(i): list(v) for i, v in self.parts.items()},
                    execution_order=[list(step) for step in self.execution_order],
                    transfers=[dict(t.__dict__, shape=list(t.shape)) for t in self.transfers],
                    oom_cards=list(self.oom_cards), prompt_tokens=self.prompt_tokens, new_tokens=self.new_tokens,
                    seconds=self.seconds, notes=list(self.notes))

    def __str__(self) -> str:
        name = f"[{self.label}] " if self.label else ""
        return name + self.summary()


def _ranges(indices: tuple[int, ...]) -> str:
    """(0, 1, 2, 5) -> "0-2,5"."""
    spans: list[list[int]] = []
    for i in indices:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans)


def _runs(order: tuple[tuple[str, int], ...]) -> list[tuple[str, int]]:
    """Consecutive decoder layers on one card folded into one step: ("model.layers.0-16", 0)."""
    out: list[tuple[str, int]] = []
    for part, card in order:
        if out and part.startswith("model.layers.") and out[-1][0].startswith("model.layers.") and out[-1][1] == card:
            first = out[-1][0].split(".")[2].split("-")[0]
            out[-1] = (f"model.layers.{first}-{part.split('.')[2]}", card)
        else:
            out.append((part, card))
    return out


# ----- arguments ----------------------------------------------------------------------------------------


def _check_map(device_map: Any) -> tuple[dict[str, int], str | None]:
    """(the map with GPU indices, the plan's dtype if a DevicePlan was given)."""
    plan_dtype = None
    if isinstance(device_map, DevicePlan):
        device_map, plan_dtype = device_map.device_map, device_map.dtype
    if not isinstance(device_map, Mapping) or not device_map:
        raise ValueError(f"device_map={device_map!r}; pass a DevicePlan (placement.plan_from_pretrained) or a "
                         "non-empty dict of module name -> GPU index, e.g. model.hf_device_map.")
    out = {}
    for name, device in device_map.items():
        if device in OFFLOAD_DEVICES:
            raise ValueError(f"device_map puts {name!r} on {device!r}; offloaded modules are not predicted per "
                             "card here. Plan for GPUs only (e.g. max_memory={0: '24GB', 1: '24GB'}), or measure "
                             "offloading as notebook 05 does.")
        out[str(name)] = _gpu_index(name, device)
    return out, plan_dtype


def _gpu_index(name: str, device: Any) -> int:
    """0 for 0, "cuda:0" or torch.device("cuda", 0)."""
    match = re.fullmatch(r"cuda:(\d+)", str(device)) if isinstance(device, (str, torch.device)) else None
    if match:
        device = int(match.group(1))
    if isinstance(device, bool) or not isinstance(device, int) or device < 0:
        raise ValueError(f"device_map puts {name!r} on {device!r}; use GPU indices (0, 1, ...) or 'cuda:N'.")
    return device


def _check_budgets(budget: Any, cards: list[int]) -> dict[int, int | None]:
    """Bytes allowed on each card: one limit for all, a mapping card -> limit, or None."""
    def limit(value: Any, what: str) -> int:
        if isinstance(value, str):
            from accelerate.utils import convert_file_size_to_int

            try:
                value = convert_file_size_to_int(value)
            except ValueError:
                pass
        return check_int(what, value, hint="bytes, e.g. gb_to_bytes(24), or a size such as '24GB'")

    if budget is None:
        return dict.fromkeys(cards)
    if isinstance(budget, Mapping):
        missing = [card for card in cards if card not in budget]
        if missing:
            raise ValueError(f"budget={dict(budget)!r} gives no limit for card(s) {missing}; give every card of the "
                             f"map {cards} a limit, or one limit for all.")
        return {card: limit(budget[card], f"budget[{card}]") for card in cards}
    return dict.fromkeys(cards, limit(budget, "budget"))


# ----- the fake split model -----------------------------------------------------------------------------


class _FakeCards(TorchFunctionMode):
    """`torch.tensor(data, device=card)` as an empty tensor of its shape on the card: no real copy to run."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if func is torch.tensor and device is not None and torch.device(device).type == CARD_TYPE:
            host = torch.tensor(*args, **{k: v for k, v in kwargs.items() if k != "device"})
            return torch.empty(host.shape, dtype=host.dtype, device=device)
        return func(*args, **kwargs)


def _place(module: nn.Module, device: torch.device) -> None:
    """Move a fake module's parameters and buffers (`Module.to` cannot swap fake parameters)."""
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is not None:
                sub._parameters[name] = nn.Parameter(param.to(device), requires_grad=param.requires_grad)
        for name, buffer in sub._buffers.items():
            if buffer is not None:
                sub._buffers[name] = buffer.to(device)


def _dispatch(model: nn.Module, device_map: dict[str, int], fake_mode: FakeTensorMode) -> None:
    """Place each module on its fake card and attach accelerate's hooks as `from_pretrained` does."""
    from accelerate import dispatch_model

    with fake_mode, torch.no_grad():
        for name, card in device_map.items():
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"device_map names {name!r}, which the model does not have; use names from "
                                 "model.named_modules() (or model.hf_device_map).") from None
            _place(module, _fake_card(card))
        cards = set(device_map.values())
        if len(cards) > 1:  # from_pretrained dispatches only then; one card is a plain .to(card)
            # accelerate's main device: the first of the set of GPU indices, as it picks it from the real map.
            main = _fake_card(list(cards)[0])
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*data pointer of FakeTensor.*")
                dispatch_model(model, {n: _fake_card(c) for n, c in device_map.items()}, main_device=main,
                               skip_keys=model._skip_keys_device_placement)
    stray = sorted({str(t.device) for t in [*model.parameters(), *model.buffers()] if t.device.type != CARD_TYPE})
    if stray:
        raise ValueError(f"device_map leaves parameters on {stray}: give every module a card (e.g. {{'': 0}} for "
                         "all on one), or use the map from_pretrained made (model.hf_device_map).")


def _parts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Top-level parts and each decoder layer, by name."""
    out = [(f"model.{name}", child) for name, child in model.model.named_children() if name != "layers"]
    out += [(f"model.layers.{i}", layer) for i, layer in enumerate(model.model.layers)]
    return out + [(name, child) for name, child in model.named_children() if name != "model"]


def _card_of_module(module: nn.Module) -> int:
    return _card_of(next(module.parameters()).device)


@contextlib.contextmanager
def _execution_order(model: nn.Module, order: list[tuple[str, int]]) -> Iterator[None]:
    """Append (part, card) to `order` the first time each part runs."""
    seen: set[str] = set()

    def ran(name: str, card: int, *_: Any) -> None:
        if name not in seen:
            seen.add(name)
            order.append((name, card))

    handles = [module.register_forward_pre_hook(partial(ran, name, _card_of_module(module)))
               for name, module in _parts(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# ----- the accounting -----------------------------------------------------------------------------------


class _CardAccounting(SimulatedAccounting):
    """The estimator's accounting for one card: it counts the storages on that card's fake device.

    Shared with the other cards: a clock (which card crosses its budget first) and the tally of copies onto
    each card from another device.
    """

    def __init__(self, card: int, weights: int, limit: int | None, clock: Iterator[int], transfers: Counter) -> None:
        super().__init__(weights, limit, cuda=True, autocast_on=False, device=_fake_card(card))
        self.card = card
        self.clock = clock
        self.crossed_at: int | None = None
        self.transfers = transfers  # (phase, source, target, shape, dtype, bytes) -> copies

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if func is _TO_COPY and out.device == self.counted_device and args[0].device != self.counted_device:
            nbytes = self.storage_bytes(out.untyped_storage())
            self.transfers[(self.phase, _card_of(args[0].device), self.card, tuple(out.shape), dtype_name(out.dtype),
                         nbytes)] += 1
        return out

    def _check_budget(self, nbytes: int) -> None:
        crossed = self.crossing is not None
        super()._check_budget(nbytes)
        if not crossed and self.crossing is not None:
            self.crossed_at = next(self.clock)


class _AllCards:
    """What the replay tells an accounting (the phase, the part running), told to every card's."""

    def __init__(self, accounts: list[_CardAccounting]) -> None:
        self.accounts = accounts

    def mark(self, phase: str) -> None:
        for acc in self.accounts:
            acc.mark(phase)

    def at(self, where: str, *args: Any) -> None:
        for acc in self.accounts:
            acc.at(where, *args)


# ----- the API ------------------------------------------------------------------------------------------


def _check_supported(call: CaptionCall) -> None:
    if call.quantization != "none":
        raise ValueError(f"quantization={call.quantization!r}: a split quantized model is not predicted per card; "
                         "predict it on one card with estimate_caption, or split the unquantized model.")


def estimate_split_caption(
    model_or_config_or_scale: Any,
    device_map: DevicePlan | Mapping[str, int | str],
    *,
    dtype: str | torch.dtype | None = None,
    grad: str = "no_grad",
    attn_implementation: str | None = None,
    batch_size: int = 1,
    image_size: int | None = None,
    new_tokens: int = 16,
    budget: int | str | Mapping[int, int | str] | None = None,
    tokenizer: Any = None,
    query: str = CAPTION_QUERY,
    label: str = "",
    exact_decode: bool = False,
) -> SplitEstimate:
    """Predict one captioning call on a model split over GPUs by `device_map`: one Estimate per card.

    `device_map`: a `DevicePlan` (its dtype is the default `dtype`) or a map of module name -> GPU index, such as
    `model.hf_device_map`. `budget`: bytes (or "24GB") for every card, or a mapping card -> limit; each card's
    Estimate then says whether it fits, and `oom_card` which card runs out first. The other arguments are
    `estimate_caption`'s; CUDA's allocator rules apply (allocations rounded to 512 bytes, fused softmax).
    """
    start = time.perf_counter()
    cards_map, plan_dtype = _check_map(device_map)
    call = check_call(model_or_config_or_scale, dtype=dtype or plan_dtype, quantization=None, grad=grad,
                       use_autocast=False, attn_implementation=attn_implementation, batch_size=batch_size,
                       image_size=image_size, new_tokens=new_tokens, device="cuda")
    _check_supported(call)
    cards = sorted(set(cards_map.values()))
    limits = _check_budgets(budget, cards)

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True, static_shapes=True)
    fake = build_fake_model(call.config, call.dtype, call.quantization, fake_mode)
    _dispatch(fake, cards_map, fake_mode)
    stored = stored_bytes([*fake.parameters(), *fake.buffers()], cuda=True)
    weights = {card: sum(stored[_fake_card(card)].values()) for card in cards}

    clock, copies, order = itertools.count(), Counter(), []
    accounts = {card: _CardAccounting(card, weights[card], limits[card], clock, copies) for card in cards}
    with fake_mode:
        pixels = [torch.empty(3, call.image_size, call.image_size) for _ in range(batch_size)]  # on the host
        with contextlib.ExitStack() as stack:
            for acc in accounts.values():
                stack.enter_context(acc)
            stack.enter_context(_FakeCards())
            stack.enter_context(CudaSoftmax())
            stack.enter_context(_execution_order(fake, order))
            replayed = replay(fake, tokenizer or course_tokenizer(), pixels, query=query,
                               image_size=call.image_size, new_tokens=new_tokens, grad=grad, use_autocast=False,
                               exact_decode=exact_decode, acc=_AllCards(list(accounts.values())))

    layers = {card: tuple(i for i, layer in enumerate(fake.model.layers) if _card_of_module(layer) == card)
              for card in cards}
    parts = {card: tuple(name for name, module in _parts(fake)
                         if not name.startswith("model.layers.") and _card_of_module(module) == card) for card in cards}
    notes = estimate_notes("cuda", "none", False, exact_decode, 0, new_tokens) + _split_notes()
    seconds = time.perf_counter() - start
    estimates = {
        card: estimate_from(acc, call, label=f"{label} card {card}".strip(), device="cuda", weights=weights[card],
                             kv=call.kv_cache_bytes(replayed.prompt_tokens, layers=len(layers[card])),
                             simulated_kv=replayed.cache_bytes_by_device.get(_fake_card(card), 0),
                             prompt_tokens=replayed.prompt_tokens, quant_bytes=0, seconds=seconds, notes=notes)
        for card, acc in accounts.items()
    }
    crossed = sorted((acc.crossed_at, card) for card, acc in accounts.items() if acc.crossed_at is not None)
    transfers = tuple(Transfer(phase, source, target, shape, dtype_, nbytes, count)
                      for (phase, source, target, shape, dtype_, nbytes), count in copies.items())
    return SplitEstimate(
        label=label, settings=call.settings(), device_map=cards_map, cards=estimates, layers=layers, parts=parts,
        execution_order=tuple(order), transfers=transfers, oom_cards=tuple(card for _, card in crossed),
        prompt_tokens=replayed.prompt_tokens, new_tokens=new_tokens, seconds=seconds, notes=notes,
    )


def _split_notes() -> tuple[str, ...]:
    return ("Split as accelerate's dispatch_model runs it: each module's inputs copied to its card before it runs, "
            "the model's outputs (the logits) copied back to the card of its inputs.",
            "Each card's figures are what torch.cuda.max_memory_allocated(card) reports; the CUDA context of each "
            "card (a few hundred MiB, outside the allocator) comes on top.")


def course_split_estimates(scale: str = "full", cases: tuple[str, ...] = tuple(COURSE_SPLITS), *,
                           new_tokens: int = 16, tokenizer: Any = None) -> dict[str, SplitEstimate]:
    """The course's two-card cases: the map `from_pretrained(device_map="auto", max_memory=...)` computes for two
    cards of that size, and the call predicted on each card under the card's size as its budget.

    The call is the course's caption (one image, eager attention, greedy) under `no_grad` without autocast.
    About 10 s per case at full scale on a CPU.
    """
    unknown = [case for case in cases if case not in COURSE_SPLITS]
    if unknown:
        raise ValueError(f"cases {unknown} are not planned; choose from {list(COURSE_SPLITS)}.")
    out = {}
    for case in cases:
        card_gb, dtype = COURSE_SPLITS[case]
        plan = plan_from_pretrained(scale, {0: f"{card_gb}GB", 1: f"{card_gb}GB"}, dtype=dtype)
        out[case] = estimate_split_caption(scale, plan, new_tokens=new_tokens, budget=gb_to_bytes(card_gb),
                                           tokenizer=tokenizer, label=case)
    return out
