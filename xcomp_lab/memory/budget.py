"""The memory limit in force: a real allocator limit on CUDA, a scaled tensor-accounting limit on CPU.

On a GPU a smaller card is emulated with `torch.cuda.set_per_process_memory_fraction`, so the caching
allocator itself raises `torch.OutOfMemoryError`. On CPU there is no allocator limit to set: the budget is
enforced by `measure`'s tensor accounting, which raises `BudgetExceededError` (a `torch.OutOfMemoryError`)
with a message shaped like CUDA's.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from xcomp_lab.core.checks import check_choice, check_int, check_number
from xcomp_lab.core.units import fmt_bytes
from xcomp_lab.memory.cards import Card, card_of_size

# InternLM-XComposer2-VL-7B as the original remote code builds it: 8,666,840,064 parameters in FP32.
FULL_MODEL_PARAMS = 8_666_840_064
FULL_FP32_WEIGHT_BYTES = FULL_MODEL_PARAMS * 4
DEVICE_KINDS = ("cpu", "cuda")  # where a budget is enforced: tensor accounting, or the CUDA allocator

_DEVICE_RE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


def resolve_device(device: str | torch.device) -> str:
    """Normalise a device to "cpu" or "cuda:N" (a bare "cuda" means the current CUDA device)."""
    text = str(device)
    match = _DEVICE_RE.match(text)
    if match is None or (match.group(1) == "cpu" and match.group(2) not in (None, "0")):
        raise ValueError(
            f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N' (N a GPU index, e.g. 'cuda:0')"
        )
    if match.group(1) == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this machine has no CUDA GPU: use 'cpu' here")
    index = int(match.group(2)) if match.group(2) is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise ValueError(
            f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA GPU(s) exist: "
            f"use an index from 0 to {torch.cuda.device_count() - 1}"
        )
    return f"cuda:{index}"


class BudgetExceededError(torch.OutOfMemoryError):
    """Raised by the CPU tensor accounting when an op's outputs would exceed the budget."""

    def __init__(self, message: str, *, op: str, shape: tuple[int, ...], dtype: str,
                 requested_bytes: int, in_use_bytes: int, budget_bytes: int) -> None:
        super().__init__(message)
        self.op = op
        self.shape = shape
        self.dtype = dtype
        self.requested_bytes = requested_bytes
        self.in_use_bytes = in_use_bytes
        self.budget_bytes = budget_bytes


def card_bytes(gb: float) -> tuple[int, str]:
    """(bytes a model may allocate on the course's card of `gb` GB, a sentence naming that card).

    A size with a card in `memory.cards` (16, 24, 32, 40, 48, 80) gets that card's total as PyTorch reports it
    less the CUDA context; another size gets the smallest share of its GiB that a known card shows PyTorch
    (`MIN_VISIBLE_SHARE`), less the context: a cautious guess, said as such.
    """
    card = card_of_size(gb)
    return card.usable_bytes, card.describe()


@dataclass(frozen=True)
class Budget:
    """A memory limit on one device, stated as the card it emulates.

    `limit_bytes` is what may be allocated. `reference_fp32_weight_bytes` is set when the limit was scaled
    from a full-size card to a small model (`scaled_to`), and None for a card's own size (`for_card`).
    """

    device: str
    limit_bytes: int
    card_gb: float
    card: str  # which card the limit stands for, e.g. "L40S (48 GB): PyTorch sees 44.42 GiB, ..."
    reference_fp32_weight_bytes: int | None = None
    full_fp32_weight_bytes: int | None = None

    @classmethod
    def for_card(cls, gb: float = 48.0, device: str | torch.device = "cuda") -> Budget:
        """What a model may allocate on the course's card of `gb` GB (`card_bytes`): 43.74 GiB for 48 GB.

        On CUDA this becomes a real allocator limit; on CPU it is enforced by tensor accounting, unscaled.
        """
        check_number("gb", gb, hint="the card's size in GB, e.g. 48")
        dev = resolve_device(device)
        limit, card = card_bytes(gb)
        if dev != "cpu":
            total = torch.cuda.get_device_properties(dev).total_memory
            if limit > total:
                raise ValueError(
                    f"a {gb:g} GB card ({fmt_bytes(limit)} usable) is larger than {dev}'s {fmt_bytes(total)}: "
                    f"choose a smaller budget_gb, at most the card you have"
                )
        return cls(device=dev, limit_bytes=limit, card_gb=float(gb), card=card)

    @classmethod
    def scaled_to(cls, fp32_weight_bytes: int, gb: float = 48.0,
                  full_fp32_weight_bytes: int = FULL_FP32_WEIGHT_BYTES,
                  device: str | torch.device = "cpu") -> Budget:
        """A `gb` GB card scaled to a small model: same ratio of budget to FP32 weights as for the full model.

        `fp32_weight_bytes` is the small model's parameters+buffers in FP32; `full_fp32_weight_bytes` defaults
        to the full InternLM-XComposer2-VL-7B (8,666,840,064 parameters x 4 bytes).
        """
        check_number("gb", gb, hint="the card's size in GB, e.g. 48")
        for name, value in (("fp32_weight_bytes", fp32_weight_bytes),
                            ("full_fp32_weight_bytes", full_fp32_weight_bytes)):
            check_int(name, value, hint="bytes: sum p.numel() * 4 over the model's parameters and buffers")
        usable, card = card_bytes(gb)
        limit = round(usable * fp32_weight_bytes / full_fp32_weight_bytes)
        return cls(device=resolve_device(device), limit_bytes=limit, card_gb=float(gb), card=card,
                   reference_fp32_weight_bytes=fp32_weight_bytes,
                   full_fp32_weight_bytes=full_fp32_weight_bytes)

    @property
    def is_allocator_limit(self) -> bool:
        """True on CUDA (the allocator enforces it), False on CPU (tensor accounting enforces it)."""
        return self.device != "cpu"

    def fraction(self) -> float:
        """The share of the CUDA card's total memory that this budget allows."""
        self._require_cuda("fraction()")
        return self.limit_bytes / torch.cuda.get_device_properties(self.device).total_memory

    def apply(self) -> None:
        """Set the CUDA allocator limit; undo with `restore()` (or use `applied()`)."""
        self._require_cuda("apply()")
        torch.cuda.set_per_process_memory_fraction(self.fraction(), self.device)

    def restore(self) -> None:
        """Give the CUDA allocator the whole card back (fraction 1.0)."""
        self._require_cuda("restore()")
        torch.cuda.set_per_process_memory_fraction(1.0, self.device)

    @contextmanager
    def applied(self) -> Iterator[Budget]:
        """Apply the CUDA allocator limit for the block, and restore the whole card afterwards."""
        self.apply()
        try:
            yield self
        finally:
            self.restore()

    def describe(self) -> str:
        """One sentence saying which kind of budget is in force, with its numbers."""
        card = f"the {self.card_gb:g} GB class: {self.card}"
        if self.reference_fp32_weight_bytes is not None:
            full_limit = round(self.limit_bytes * self.full_fp32_weight_bytes / self.reference_fp32_weight_bytes)
            scale = (f"; scaled to this model's {fmt_bytes(self.reference_fp32_weight_bytes)} of FP32 weights "
                     f"(budget = {self.limit_bytes / self.reference_fp32_weight_bytes:.3f} x FP32 weights, as "
                     f"{fmt_bytes(full_limit)} is to the full model's {fmt_bytes(self.full_fp32_weight_bytes)})")
        else:
            scale = ""
        if self.is_allocator_limit:
            total = torch.cuda.get_device_properties(self.device).total_memory
            return (f"Real allocator limit on {self.device}: emulating {card}{scale}. {fmt_bytes(self.limit_bytes)} "
                    f"allowed = fraction {self.limit_bytes / total:.4f} of this card's {fmt_bytes(total)}; the CUDA "
                    f"caching allocator raises torch.OutOfMemoryError beyond it.")
        return (f"Tensor accounting on CPU: emulating {card}{scale}. {fmt_bytes(self.limit_bytes)} allowed; every "
                f"tensor allocation is counted and torch.OutOfMemoryError is raised beyond it.")

    def _require_cuda(self, what: str) -> None:
        if not self.is_allocator_limit:
            raise ValueError(
                f"{what} sets the CUDA allocator limit, but this budget is for {self.device!r}: a CPU budget is "
                f"enforced by tensor accounting, so pass it to measure(..., budget=...) or run_guarded(...)"
            )


def card_budget_bytes(card: Card, device: str, fp32_parameter_bytes: int) -> int:
    """The course's one budget rule, worked out without a GPU: the bytes `card` allows a model.

    On CUDA what PyTorch sees on the card less the CUDA context (`card.usable_bytes`). On a CPU that figure scaled
    to the model: the same ratio of budget to FP32 parameter bytes as the card has to the full model's
    (8,666,840,064 x 4), so that a tiny model meets the same limits the full one meets on the real card.
    """
    check_int("fp32_parameter_bytes", fp32_parameter_bytes, hint="parameters x 4")
    kind = check_choice("device", str(device).split(":")[0], DEVICE_KINDS)
    if kind == "cuda":
        return card.usable_bytes
    return round(card.usable_bytes * fp32_parameter_bytes / FULL_FP32_WEIGHT_BYTES)


def card_limit_bytes(card_gb: float, device: str, fp32_parameter_bytes: int) -> int:
    """`card_budget_bytes` for the course's card of a marketed size (`memory.cards.card_of_size`)."""
    check_number("card_gb", card_gb, hint="the card's size in GB, e.g. 48")
    return card_budget_bytes(card_of_size(card_gb), device, fp32_parameter_bytes)


def card_budget(card_gb: float, device: str, fp32_parameter_bytes: int) -> Budget:
    """The Budget the course puts in force for a model of `fp32_parameter_bytes` (see `card_limit_bytes`)."""
    if resolve_device(device) == "cpu":
        return Budget.scaled_to(fp32_parameter_bytes, gb=card_gb)
    return Budget.for_card(card_gb, device=device)

