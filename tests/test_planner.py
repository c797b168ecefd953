"""The planner's search for the largest batch that fits, its budget rule and its cards."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from xcomp_lab.course.params import check_params
from xcomp_lab.lessons.planner import card_choices, card_label, largest_batch, plan, planner, search_largest
from xcomp_lab.memory.budget import card_budget_bytes, card_limit_bytes
from xcomp_lab.memory.cards import CARDS, CLASS_CARDS, CONTEXT_BYTES, card_of_size, machine_card
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


# ------------------------------------------------------------------------------------------------ cards by name

@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("gb", [16, 24, 32, 40, 48, 80, 30, 12.5])
def test_a_named_card_is_budgeted_by_the_one_rule(gb, device):
    fp32 = parameter_count("tiny") * 4
    card = card_of_size(gb)
    assert card_budget_bytes(card, device, fp32) == card_limit_bytes(gb, device, fp32)
    if gb in CLASS_CARDS:
        assert card.name == CLASS_CARDS[gb]


def test_plan_takes_a_card_by_name_or_by_size():
    by_name = plan(card="RTX 4090", scale="tiny", device="cpu", new_tokens=2)
    by_size = plan(24, scale="tiny", device="cpu", new_tokens=2)
    assert by_name.card == by_size.card == CARDS["RTX 4090"] and by_name.card_gb == by_size.card_gb == 24
    assert by_name.estimate.table() == by_size.estimate.table()
    l4 = plan(card=CARDS["L4"], scale="tiny", device="cuda", new_tokens=2)
    assert l4.budget_bytes == CARDS["L4"].total_bytes - CONTEXT_BYTES and l4.line().startswith("L4, float16, batch 1")
    assert plan(30, scale="tiny", device="cpu", new_tokens=2).card.name == "30 GB card of no known model"


def test_a_card_the_catalogue_lacks_or_a_size_that_disagrees_is_refused():
    with pytest.raises(ValueError, match=r"card='RTX 9090'; choose one of \['RTX A4000'"):
        plan(card="RTX 9090", scale="tiny", device="cpu", new_tokens=2)
    with pytest.raises(ValueError, match=r"card_gb=24 and card='L40S' \(48 GB\) disagree"):
        plan(24, card="L40S", scale="tiny", device="cpu", new_tokens=2)


def test_the_machine_card_is_what_pytorch_sees_on_the_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert machine_card() is None and len(card_choices()) == len(CARDS)
    props = SimpleNamespace(name="NVIDIA L40S", total_memory=CARDS["L40S"].total_bytes + 2**20)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    own = machine_card()
    assert own.name == "NVIDIA L40S (this machine)" and own.marketed_gb == 48
    assert own.usable_bytes == props.total_memory - CONTEXT_BYTES
    assert card_choices()[0] == own and len(card_choices()) == len(CARDS) + 1
    props.name = "NVIDIA H200"
    props.total_memory = round(139.8 * 2**30)
    assert machine_card().marketed_gb == 141  # a catalogue name: its marketed size
    props.name = "NVIDIA B200"
    props.total_memory = round(178.4 * 2**30)
    assert machine_card().marketed_gb == 179  # no catalogue name: the GiB PyTorch sees, rounded up
    props.name = "NVIDIA GeForce RTX 4090"
    assert machine_card().marketed_gb == 24


def test_the_planner_widget_lists_cards_by_name_and_starts_on_the_course_card():
    pytest.importorskip("ipywidgets")
    box = planner(scale="tiny", device="cpu", card_gb=24)
    card = box.children[0].children[0]
    assert card.description == "card" and card.value == CARDS["RTX 4090"]
    labels = [label for label, _ in card.options]
    assert card_label(CARDS["L40S"]) in labels and len(labels) == len(CARDS)
    output = box.children[-1]
    assert output.outputs[0]["text"] == plan(24, scale="tiny", device="cpu").estimate.table() + "\n"
    assert len(planner(scale="tiny", device="cpu", card_gb=30).children[0].children[0].options) == len(CARDS) + 1


def test_original_predictions_say_why_a_step_has_none():
    from xcomp_lab.lessons.planner import predict_original_steps

    measured = {"int8": {"budget_bytes": 1}, "fp32-device-map": {"budget_bytes": 1}, "05-fp16-offload-disk": {}}
    out = predict_original_steps(measured, "unused", scale="small", device="cpu", image="unused.png", max_new_tokens=2)
    assert sorted(out) == ["fp32-device-map", "int8"]  # a step the original's code does not have is left out
    assert out["int8"].peak_bytes is None and "transformers" in out["int8"].reason
    assert "device_map=auto" in out["fp32-device-map"].reason
    chosen = predict_original_steps(measured, "unused", scale="small", device="cpu", image="unused.png",
                                    max_new_tokens=2, names=["fp16"])
    assert chosen["int8"].reason == "not among the steps predicted here (fp16)"
    assert predict_original_steps(measured, "unused", scale="full", device="cuda", image="unused.png",
                                  max_new_tokens=2)["int8"].peak_bytes is None  # nothing to replay: no process
    with pytest.raises(ValueError, match="workers"):
        predict_original_steps(measured, "unused", scale="full", device="cuda", image="unused.png", max_new_tokens=2,
                               workers=0)
