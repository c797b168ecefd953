"""The planner's search for the largest batch that fits, and its budget rule."""

from __future__ import annotations

import pytest

from xcomp_lab.course.params import check_params
from xcomp_lab.lessons.planner import largest_batch, plan, search_largest
from xcomp_lab.memory.budget import card_limit_bytes
from xcomp_lab.memory.cards import CARDS, CONTEXT_BYTES
from xcomp_lab.model.inventory import parameter_count


def linear_card(weights: int, per_image: int, budget: int):
    tried = []

    def try_batch(batch: int) -> tuple[int, bool]:
        tried.append(batch)
        peak = weights + batch * per_image
        return min(peak, budget + 1), peak <= budget  # an OOM replay stops just past the budget

    return try_batch, tried


@pytest.mark.parametrize("budget", [100, 109, 110, 111, 150, 1000, 1009])
def test_search_finds_the_largest_batch_that_fits(budget):
    try_batch, tried = linear_card(100, 10, budget)
    largest, peaks, capped = search_largest(try_batch, limit=256)
    expected = max(0, (budget - 100) // 10)
    assert largest == expected and not capped
    assert set(peaks) == set(tried) and len(tried) <= 2 * 8 + 2
    if largest:
        assert peaks[largest] <= budget
    assert (largest + 1) in peaks or largest == 0


def test_search_stops_at_its_limit_and_says_so():
    try_batch, _ = linear_card(100, 1, 10**9)
    assert search_largest(try_batch, limit=20)[0::2] == (20, True)
    with pytest.raises(ValueError, match="limit=1"):
        search_largest(try_batch, limit=1)


@pytest.mark.slow
def test_largest_batch_asks_the_planner_at_tiny_scale():
    search = largest_batch(check_params(scale="tiny", device="cpu"))
    assert search.largest >= 2 and not search.capped
    assert search.peaks[search.largest] <= search.budget_bytes < search.peaks[search.largest + 1]


def test_plan_budgets_a_card_by_the_course_rule_on_either_device():
    tiny_fp32 = parameter_count("tiny") * 4
    on_cpu = plan(48, scale="tiny", device="cpu", new_tokens=2)
    assert on_cpu.budget_bytes == card_limit_bytes(48, "cpu", tiny_fp32) < 10**8  # scaled to the tiny model
    on_card = plan(48, scale="tiny", device="cuda", new_tokens=2).budget_bytes
    assert on_card == CARDS["L40S"].total_bytes - CONTEXT_BYTES  # the card itself, as PyTorch sees it


@pytest.mark.parametrize("card_gb", ["48", None, True, 0, -24, float("nan"), 10_000])
def test_a_card_that_is_not_a_size_in_gb_is_refused(card_gb):
    with pytest.raises(ValueError, match=rf"card_gb={card_gb!r}; it must be a number above 0 to 1000 \(a card size "
                                         rf"in GB such as"):
        plan(card_gb, scale="tiny", device="cpu", new_tokens=2)


@pytest.mark.parametrize("kwargs, words", [
    (dict(batch_size=100_000), r"batch_size=100000; it must be at most 256 \(exercise 8.1's largest-batch search"),
    (dict(image_size=14_000), r"image_size=14000; it must be at most 980 \(twice the full model's 490 px"),
    (dict(new_tokens=100_000), r"new_tokens=100000; it must be at most 1024 \(chat\(\)'s own default"),
])
def test_the_estimator_refuses_sizes_past_the_course_limits_at_once(kwargs, words):
    import time

    from xcomp_lab.estimate import estimate_caption

    start = time.perf_counter()
    with pytest.raises(ValueError, match=words):
        estimate_caption("full", dtype="float16", device="cuda", **kwargs)
    with pytest.raises(ValueError, match=words):
        plan(48, **kwargs)
    assert time.perf_counter() - start < 5


def test_the_batch_search_limit_is_the_course_batch_limit():
    with pytest.raises(ValueError, match=r"limit=1000; it must be at most 256"):
        largest_batch(check_params(scale="tiny", device="cpu"), limit=1000)
