"""GPUs by name, with the memory PyTorch really sees on them, and what a model may use of it.

A card sold as "48 GB" carries 48 GiB of memory chips (GPU memory comes in binary sizes), and PyTorch sees
less: `torch.cuda.get_device_properties(0).total_memory` reports what the driver leaves after its own
reservations and, on cards with ECC on GDDR memory, the ECC bits (the course's own "80GB" H100 reports
79.18 GiB, its H200 139.80 GiB of 141; an L40S, 44.42 GiB of its 48). Of that, the CUDA context
and the libraries' kernels take some hundreds of MiB before the first tensor, outside PyTorch's allocator
(notebook 07 measures it: `mem_get_info()` in use minus `memory_reserved()`). What a model may allocate is
therefore `total_memory - CONTEXT_BYTES`.

Each card's `total_bytes` is measured where this project could (the GPUs it ran on) and otherwise read from
the "total capacity" a public PyTorch out-of-memory message printed on that card, the source named: the figure
varies a little with driver and ECC settings, so treat it as that card's typical value.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from xcomp_lab.core.checks import check_choice, check_number
from xcomp_lab.core.units import GIB, MIB

# Memory in use outside PyTorch's allocator on a card once a captioning run has freed everything: 694.81 MiB
# measured by notebook 07 on an NVIDIA H100 80GB HBM3 (torch 2.11 + CUDA 13.0, 2026-11-25).
CONTEXT_BYTES = round(694.81 * MIB)


@dataclass(frozen=True)
class Card:
    """One GPU model: its marketed size, what PyTorch reports as its total memory, and where that comes from."""

    name: str
    marketed_gb: int
    total_bytes: int  # torch.cuda.get_device_properties(i).total_memory
    source: str

    @property
    def usable_bytes(self) -> int:
        """What a model may allocate: the total less the CUDA context and the libraries (CONTEXT_BYTES)."""
        return self.total_bytes - CONTEXT_BYTES

    def describe(self) -> str:
        return (f"{self.name} ({self.marketed_gb} GB): PyTorch sees {self.total_bytes / GIB:.2f} GiB, "
                f"{self.usable_bytes / GIB:.2f} GiB usable after the CUDA context")


def _gib(value: float) -> int:
    return round(value * GIB)


CARDS: dict[str, Card] = {card.name: card for card in (
    Card("RTX A4000", 16, _gib(15.61), "OOM message, DengKaiCQ/VGGT-Long issue #6"),
    Card("A10", 24, _gib(21.99), "OOM message, zai-org/CogVLM issue #236 (Lambda Labs A10)"),
    Card("L4", 24, _gib(22.03), "OOM message, ArcInstitute/evo2 issue #190"),
    Card("RTX 4090", 24, _gib(23.52), "OOM message, Soul-AILab/SoulX-FlashTalk issue #5"),
    Card("A30", 24, _gib(23.53), "OOM message, google/RB-Modulation issue #5"),
    Card("V100 32GB", 32, _gib(31.74), "OOM message, InternLM/InternLM-XComposer issue #205"),
    Card("A100 40GB", 40, _gib(39.59), "OOM message, raoyongming/DenseCLIP issue #52"),
    Card("L40", 48, _gib(44.40), "OOM message, QwenLM/Qwen3-VL issue #2097"),
    Card("L40S", 48, _gib(44.42), "OOM message, stepfun-ai/Step-Video-T2V issue #8"),
    Card("A800 80GB", 80, _gib(79.32), "OOM message, InternLM/InternLM-XComposer issue #436"),
    Card("H100 80GB HBM3", 80, 85_017_493_504, "measured by this project (results/full-h100/env.json)"),
    Card("H200", 141, 150_109_880_320, "measured by this project (results/full-h200/env.json)"),
)}

# The card the course emulates for a marketed size: the 48 GB class is represented by the L40S, the card family
# (L40, L40S, A40) whose ~44.4 GiB matches the original report, which ran out with 44.16 GB in use.
CLASS_CARDS: dict[int, str] = {16: "RTX A4000", 24: "RTX 4090", 32: "V100 32GB", 40: "A100 40GB", 48: "L40S",
                               80: "H100 80GB HBM3"}


# The smallest share of its marketed GiB that a known card shows PyTorch: assumed for a size with no known card.
MIN_VISIBLE_SHARE = min(card.total_bytes / (card.marketed_gb * GIB) for card in CARDS.values())


def card_named(name: str) -> Card:
    """The card of that name (see CARDS)."""
    return CARDS[check_choice("card", name, list(CARDS), "a GPU model this course knows the memory of")]


def card_for_gb(gb: float) -> Card | None:
    """The course's card for a marketed size in GB (48 -> L40S), or None for a size with no known card."""
    check_number("gb", gb, hint="a card's marketed size in GB, e.g. 48")
    name = CLASS_CARDS.get(int(gb)) if float(gb).is_integer() else None
    return CARDS[name] if name else None


def cards_of_class(gb: int) -> list[Card]:
    """Every known card sold with `gb` GB, smallest visible memory first."""
    return sorted((c for c in CARDS.values() if c.marketed_gb == gb), key=lambda c: c.total_bytes)


def card_of_size(gb: float) -> Card:
    """The card the course budgets for a marketed size: its class card (48 -> L40S), or, for a size with no known
    card, one that shows PyTorch the least share of its GiB any known card shows (`MIN_VISIBLE_SHARE`)."""
    known = card_for_gb(gb)
    if known is not None:
        return known
    return Card(f"{gb:g} GB card of no known model", math.ceil(gb), round(gb * GIB * MIN_VISIBLE_SHARE),
                f"assumed: {MIN_VISIBLE_SHARE:.1%} of {gb:g} GiB, the least share a known card shows PyTorch")


def machine_card(index: int = 0) -> Card | None:
    """The GPU in this machine as a card (`torch.cuda.get_device_properties(index).total_memory`, what PyTorch
    sees on it), or None without a CUDA GPU. Its marketed size is the catalogue's where a catalogue name is a
    whole word of its name ("NVIDIA L40S" is an L40S, not an L4), else the GiB PyTorch sees rounded up."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(index)
    known = [card for card in CARDS.values() if re.search(rf"(?<!\w){re.escape(card.name)}(?!\w)", props.name)]
    marketed = max(known, key=lambda c: len(c.name)).marketed_gb if known else math.ceil(props.total_memory / GIB)
    return Card(f"{props.name} (this machine)", marketed, props.total_memory,
                f"this machine: torch.cuda.get_device_properties({index}).total_memory")
