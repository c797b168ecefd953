"""The per-card estimator on a split model: consistent with the one-card estimator, the plan and accelerate's hooks."""

from __future__ import annotations

import re
import time

import pytest

from xcomp_lab.core.units import GB, GIB
from xcomp_lab.estimate import estimate_caption, weights_only
from xcomp_lab.estimate.placement import LAYER_PREFIX, meta_model, plan_from_pretrained
from xcomp_lab.estimate.split import (
    COURSE_SPLITS,
    SplitEstimate,
    course_split_estimates,
    estimate_split_caption,
)
from xcomp_lab.model.scales import config_for_scale

TINY = config_for_scale("tiny")  # 4 decoder layers, hidden 256, 1 KV head of 64, vocabulary 1024
CUDA_BLOCK = 512
SETTINGS = dict(grad="no_grad", new_tokens=4)


def _map(layer_cards: list[int], *, embeddings: int = 0, norm: int = 1, output: int = 1, vision: int = 1) -> dict:
    """A hand-written map of the tiny model: decoder layer i on layer_cards[i]."""
    device_map = {"model.tok_embeddings": embeddings}
    device_map.update({f"{LAYER_PREFIX}{i}": card for i, card in enumerate(layer_cards)})
    return device_map | {"model.norm": norm, "output": output, "vit": vision, "vision_proj": vision}


@pytest.fixture(scope="module")
def tiny_plan():
    """accelerate's map of the tiny FP32 model for two cards of 0.7 x its size: 2 + 2 decoder layers."""
    per_card = int(0.7 * weights_only("tiny", "float32"))
    return plan_from_pretrained("tiny", {0: per_card, 1: per_card}, dtype="float32")


@pytest.fixture(scope="module")
def split(tiny_plan):
    return estimate_split_caption("tiny", tiny_plan, **SETTINGS)


@pytest.fixture(scope="module")
def single():
    return estimate_caption("tiny", dtype="float32", device="cuda", **SETTINGS)


def test_the_plan_splits_the_tiny_model_over_two_cards(tiny_plan, split):
    assert tiny_plan.layers_per_device() == {0: [0, 1], 1: [2, 3]}
    assert split.layers == {0: (0, 1), 1: (2, 3)}
    assert split.parts == {0: ("model.tok_embeddings",), 1: ("model.norm", "output", "vit", "vision_proj")}
    assert isinstance(split, SplitEstimate) and split.settings["dtype"] == "float32"  # the plan's dtype


def _card_of(name: str, device_map: dict) -> int:
    around = [(key, card) for key, card in device_map.items() if name.startswith(key + ".")]
    return max(around, key=lambda kc: len(kc[0]))[1]  # the longest key that contains the tensor


def test_card_weights_are_the_plans_bytes_per_device_rounded_as_cuda(tiny_plan, split):
    model = meta_model(TINY)
    exact, rounded = {0: 0, 1: 0}, {0: 0, 1: 0}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        card, nbytes = _card_of(name, tiny_plan.device_map), tensor.numel() * tensor.element_size()
        exact[card] += nbytes
        rounded[card] += -(-nbytes // CUDA_BLOCK) * CUDA_BLOCK
    assert exact == tiny_plan.bytes_per_device()  # the plan counts parameters and buffers, unrounded
    assert {card: e.weights_bytes for card, e in split.cards.items()} == rounded  # each storage rounded to 512


def test_everything_on_card_0_is_the_one_card_estimate_to_the_byte(single):
    budget = single.peak_bytes - 100_000  # crossed during the prefill
    one = estimate_caption("tiny", dtype="float32", device="cuda", budget=budget, **SETTINGS)
    all_on_0 = estimate_split_caption("tiny", {"": 0}, dtype="float32", budget=budget, **SETTINGS)
    card = all_on_0.cards[0]
    for name in ("weights_bytes", "kv_cache_bytes", "activations_bytes", "peak_bytes", "peak_phase",
                 "simulated_kv_cache_bytes", "oom", "oom_op", "oom_location", "oom_phase", "oom_in_use_bytes"):
        assert getattr(card, name) == getattr(one, name), name
    # Only the vision phase differs: the image is normalised on the host, which the one-card estimate counts.
    assert {k: v for k, v in card.phase_peaks.items() if k != "vision"} == \
           {k: v for k, v in one.phase_peaks.items() if k != "vision"}
    assert card.phase_peaks["vision"] < one.phase_peaks["vision"]
    assert all_on_0.oom_card == 0 and all_on_0.transfers and all(t.source == "cpu" for t in all_on_0.transfers)


def test_split_peaks_together_hold_at_least_the_one_card_peak(split, single):
    assert split.weights_bytes == single.weights_bytes  # the same storages, rounded alike
    assert sum(card.peak_bytes for card in split.cards.values()) >= single.peak_bytes
    for card in split.cards.values():
        assert card.weights_bytes < card.peak_bytes < single.peak_bytes


def test_kv_cache_per_card_is_proportional_to_its_layers(single):
    lopsided = estimate_split_caption("tiny", _map([0, 1, 1, 1]), dtype="float32", **SETTINGS)
    per_layer = single.kv_cache_bytes // TINY.num_hidden_layers
    assert {c: e.kv_cache_bytes for c, e in lopsided.cards.items()} == {0: per_layer, 1: 3 * per_layer}
    assert all(e.kv_cache_bytes == e.simulated_kv_cache_bytes for e in lopsided.cards.values())
    assert lopsided.layers == {0: (0,), 1: (1, 2, 3)}


def _logits(split: SplitEstimate, vocab: int = TINY.vocab_size):
    return [t for t in split.transfers if t.phase == "prefill" and t.shape[-1] == vocab]


def test_logits_are_made_on_the_output_card_and_come_back_to_the_inputs_card(split):
    prompt = split.prompt_tokens
    # The top-level hook (io_same_device) sends the model's outputs back where its inputs were: card 0.
    (back,) = _logits(split)
    assert (back.source, back.target, back.shape, back.dtype) == (1, 0, (1, prompt, TINY.vocab_size), "float32")
    assert split.cards[1].peak_phase.startswith("prefill")
    # With the head on card 0 the logits never move; the normalised hidden state comes over instead.
    head_home = estimate_split_caption("tiny", _map([1, 1, 1, 1], norm=1, output=0), dtype="float32", **SETTINGS)
    assert not _logits(head_home)
    hidden = [t for t in head_home.transfers if t.phase == "prefill" and (t.source, t.target) == (1, 0)]
    assert [t.shape for t in hidden] == [(1, prompt, TINY.hidden_size)]


def test_hooks_copy_the_hidden_state_once_and_the_mask_for_every_layer_of_the_next_card(split):
    prompt = split.prompt_tokens
    to_1 = {t.shape: t for t in split.transfers if t.phase == "prefill" and (t.source, t.target) == (0, 1)}
    assert to_1[(1, prompt, TINY.hidden_size)].count == 1  # the hidden state, before decoder layer 2
    assert to_1[(1, 1, prompt, prompt)].count == 2  # the eager attention mask, for each of layers 2 and 3
    assert to_1[(1, 1, prompt, prompt)].nbytes == -(-prompt * prompt * 4 // CUDA_BLOCK) * CUDA_BLOCK


def test_execution_order_names_each_part_and_its_card(split):
    assert split.execution_order == (
        ("vit", 1), ("vision_proj", 1), ("model.tok_embeddings", 0), ("model.layers.0", 0), ("model.layers.1", 0),
        ("model.layers.2", 1), ("model.layers.3", 1), ("model.norm", 1), ("output", 1))
    order = "vit@1 -> vision_proj@1 -> model.tok_embeddings@0 -> model.layers.0-1@0 -> model.layers.2-3@1"
    assert order in split.table()


def test_three_cards_and_a_card_holding_no_decoder_layer():
    device_map = _map([0, 1, 1, 2], norm=2, output=2, vision=0)
    three = estimate_split_caption("tiny", device_map, dtype="float16", **SETTINGS)
    assert sorted(three.cards) == [0, 1, 2] and three.layers == {0: (0,), 1: (1, 2), 2: (3,)}
    assert three.where(1) == "model.layers.1-2"
    assert three.where(0) == "model.layers.0 + model.tok_embeddings + vit + vision_proj"
    hops = {(t.source, t.target) for t in three.transfers if t.phase == "prefill"}
    assert {(0, 1), (1, 2), (2, 0)} <= hops


def test_the_card_that_runs_out_first_is_named(split):
    peaks = {card: e.peak_bytes for card, e in split.cards.items()}
    weights = {card: e.weights_bytes for card, e in split.cards.items()}
    # Card 1 alone over budget.
    one_short = estimate_split_caption("tiny", split.device_map, dtype="float32",
                                       budget={0: peaks[0], 1: peaks[1] - 1}, **SETTINGS)
    assert one_short.oom_cards == (1,) and one_short.oom_card == 1
    assert not one_short.cards[0].oom and one_short.cards[1].oom
    assert one_short.cards[1].oom_phase.startswith("prefill")
    line = (r"card 0: predicted peak \d+\.\d\d MiB of \d+\.\d\d MiB budget \(fits\) \| "
            r"card 1: predicted peak \d+\.\d\d MiB of \d+\.\d\d MiB budget \(OOM first\)")
    assert re.fullmatch(line, one_short.summary())
    # Both over: the one whose budget leaves no room at all crosses first, at its first allocation.
    for tight, late in ((0, 1), (1, 0)):
        both = estimate_split_caption("tiny", split.device_map, dtype="float32",
                                      budget={tight: weights[tight] + 1, late: peaks[late] - 1}, **SETTINGS)
        assert both.oom_cards == (tight, late), (tight, both.oom_cards)
        assert both.cards[tight].oom_phase.startswith("vision") and both.cards[late].oom_phase.startswith("prefill")
        assert f"card {tight}: " in both.summary().split("(OOM first)")[0]
    # Every card fits: no OOM card.
    roomy = estimate_split_caption("tiny", split.device_map, dtype="float32", budget="1GB", **SETTINGS)
    assert roomy.oom_card is None and roomy.oom_cards == () and roomy.summary().count("(fits)") == 2


def test_full_scale_two_24gb_cards_fp32_in_well_under_a_minute():
    start = time.perf_counter()
    (split,) = course_split_estimates("full", ("2x24GB-fp32",)).values()
    seconds = time.perf_counter() - start
    assert seconds < 60, f"{seconds:.0f} s"
    plan = plan_from_pretrained("full", {0: "24GB", 1: "24GB"}, dtype="float32")
    assert {card: len(layers) for card, layers in split.layers.items()} == {0: 17, 1: 15}
    for card, planned in plan.bytes_per_device().items():
        assert 0 <= split.cards[card].weights_bytes - planned < 2**20
    assert split.prompt_tokens == 1357 and split.oom_card is None
    for card in split.cards.values():
        assert card.budget_bytes == 24 * GB and 16 * GIB < card.peak_bytes < 19 * GIB
    (back,) = _logits(split, vocab=92544)
    assert back.nbytes == 1357 * 92544 * 4 and (back.source, back.target) == (1, 0)


@pytest.mark.parametrize("device_map, kwargs, message", [
    ({"": "cpu"}, {}, r"puts '' on 'cpu'; offloaded modules are not predicted per card"),
    (_map([0, 0, 1, "disk"]), {}, r"puts 'model.layers.3' on 'disk'"),
    ({"": "mps"}, {}, r"puts '' on 'mps'; use GPU indices \(0, 1, \.\.\.\) or 'cuda:N'"),
    ({}, {}, r"device_map=\{\}; pass a DevicePlan"),
    ({"model.layers.9": 0}, {}, r"names 'model.layers.9', which the model does not have"),
    ({"model": 0}, {}, r"leaves parameters on \['cpu'\]: give every module a card"),
    ({"model": 0, "vit": 1}, {}, r"does not give any device for the following parameters: output.weight"),
    (_map([0, 0, 1, 1]), dict(budget={0: "24GB"}), r"gives no limit for card\(s\) \[1\]"),
    (_map([0, 0, 1, 1]), dict(budget=-5), r"budget=-5; it must be a positive integer \(bytes"),
    (_map([0, 0, 1, 1]), dict(budget="lots"), r"budget='lots'; it must be a positive integer \(bytes"),
    (_map([0, 0, 1, 1]), dict(dtype="float64"), r"Unsupported dtype 'float64'"),
    (_map([0, 0, 1, 1]), dict(grad="off"), r"grad='off'; choose one of"),
])
def test_bad_maps_and_arguments_say_what_was_given_and_what_to_do(device_map, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        estimate_split_caption("tiny", device_map, **kwargs)


def test_a_quantized_model_is_refused_and_a_loaded_model_is_read(tiny_model, tiny_checkpoint):
    from xcomp_lab.model.loading import load_model, quantization_config

    quantized, _ = load_model(tiny_checkpoint, dtype="float16", quantization_config=quantization_config("nf4"))
    with pytest.raises(ValueError, match=r"quantization='nf4': a split quantized model is not predicted"):
        estimate_split_caption(quantized, {"": 0}, new_tokens=1)
    model, _ = tiny_model
    assert estimate_split_caption(model, {"": 0}, new_tokens=1).settings["dtype"] == "float32"


def test_course_cases_are_the_planned_ones():
    assert COURSE_SPLITS == {"2x24GB-fp32": (24, "float32"), "2x24GB-fp16": (24, "float16"),
                             "2x48GB-fp32": (48, "float32")}
    with pytest.raises(ValueError, match=r"cases \['1x8GB'\] are not planned; choose from"):
        course_split_estimates("tiny", ("1x8GB",))
