"""The card catalogue: what PyTorch sees on each GPU, and the card the course emulates for a size."""

from __future__ import annotations

import pytest

from xcomp_lab.core.units import GB, GIB
from xcomp_lab.memory.budget import card_bytes
from xcomp_lab.memory.cards import (
    CARDS,
    CLASS_CARDS,
    CONTEXT_BYTES,
    MIN_VISIBLE_SHARE,
    card_for_gb,
    card_named,
    cards_of_class,
)


def test_every_card_shows_pytorch_less_than_it_is_sold_as_and_names_a_source():
    for card in CARDS.values():
        # Sold in binary sizes ("48 GB" is 48 GiB of chips), seen by PyTorch a little smaller.
        assert MIN_VISIBLE_SHARE * card.marketed_gb * GIB <= card.total_bytes < card.marketed_gb * GIB, card.name
        assert card.usable_bytes == card.total_bytes - CONTEXT_BYTES and card.source


def test_each_size_class_has_a_card_of_that_size():
    for gb, name in CLASS_CARDS.items():
        assert card_for_gb(gb) is CARDS[name] and CARDS[name].marketed_gb == gb
    assert card_for_gb(48).name == "L40S" and [c.name for c in cards_of_class(48)] == ["L40", "L40S"]
    assert card_for_gb(47.5) is None and card_for_gb(100) is None


def test_the_48_gb_card_allows_less_than_48_times_ten_to_the_nine_bytes():
    usable, text = card_bytes(48)
    assert usable < 48 * GB and abs(usable / GIB - 43.74) < 0.01
    assert text.startswith("L40S (48 GB): PyTorch sees 44.42 GiB")
    other, other_text = card_bytes(100)
    assert other == round(100 * GIB * MIN_VISIBLE_SHARE) - CONTEXT_BYTES and "no known model" in other_text
    assert 0.9 < MIN_VISIBLE_SHARE < 1


def test_unknown_cards_and_bad_sizes_are_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"card='H900'; choose one of \['RTX A4000'"):
        card_named("H900")
    with pytest.raises(ValueError, match=r"gb='48'; it must be a positive number"):
        card_for_gb("48")
