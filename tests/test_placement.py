"""Device maps at full scale on the meta device (no weights), and a tiny model really offloaded to disk."""

from __future__ import annotations

import pytest
import torch

from xcomp_lab.core.units import GB, GIB
from xcomp_lab.estimate.placement import (
    LAYER_PREFIX,
    meta_model,
    offload_layers_map,
    plan_device_map,
    plan_from_pretrained,
    quiet_accelerate,
    summarize_map,
)
from xcomp_lab.model.scales import config_for_scale

FULL_PARAMS = 8_666_840_064
ROTARY_FP32 = 32 * 2 * 32768 * 128 * 4  # every layer's cos and sin tables: 1 GiB


@pytest.fixture(scope="module")
def full():
    return meta_model(config_for_scale("full"))


def _assert_whole_layers(plan, n_layers=32):
    assert plan.split_modules == ()
    per_device = plan.layers_per_device()
    placed = sorted(i for layers in per_device.values() for i in layers)
    assert placed == list(range(n_layers))  # each layer once: none cut across devices
    assert not any(key.startswith(LAYER_PREFIX) and key.count(".") > 2 for key in plan.device_map)


def test_full_fp32_size_counts_the_rotary_tables(full):
    plan = plan_device_map(full, {0: 80 * GB}, dtype="float32")
    assert FULL_PARAMS * 4 + ROTARY_FP32 <= plan.total_bytes < FULL_PARAMS * 4 + ROTARY_FP32 + 2**20
    assert f"{plan.total_bytes / GIB:.1f}" == "33.3"


@pytest.mark.parametrize("balanced", [False, True])
def test_two_24gb_cards_hold_fp32_with_whole_layers_and_nothing_offloaded(full, balanced):
    plan = plan_device_map(full, {0: "24GB", 1: "24GB"}, dtype="float32", balanced=balanced)
    per_device = plan.bytes_per_device()
    assert set(per_device) == {0, 1}  # nothing on cpu or disk
    assert plan.offloaded_bytes == 0 and plan.offloaded_buffer_bytes == 0
    assert sum(per_device.values()) == plan.total_bytes
    assert all(per_device[d] <= 24 * GB for d in (0, 1))
    _assert_whole_layers(plan)


def test_one_24gb_card_offloads_the_rest_to_cpu(full):
    plan = plan_device_map(full, {0: "24GB", "cpu": "64GiB"}, dtype="float32")
    per_device = plan.bytes_per_device()
    assert list(per_device) == [0, "cpu"]
    assert per_device[0] <= 24 * GB
    assert plan.offloaded_bytes == per_device["cpu"] == plan.total_bytes - per_device[0] > 8 * GIB
    _assert_whole_layers(plan)
    # The buffers of the offloaded layers stay on the GPU; accelerate warns with the same number.
    assert plan.offloaded_buffer_bytes > 0
    assert any(str(plan.offloaded_buffer_bytes) in note for note in plan.notes)


def test_fp16_fits_one_24gb_card(full):
    plan = plan_device_map(full, {0: "24GB", "cpu": "64GiB"}, dtype="float16")
    assert plan.bytes_per_device() == {0: plan.total_bytes}
    assert plan.layers_per_device() == {0: list(range(32))}


def test_plan_rejects_bad_arguments(full):
    with pytest.raises(ValueError, match="max_memory is empty"):
        plan_device_map(full, {})
    with pytest.raises(ValueError, match="auto"):
        plan_device_map(full, {0: "24GB"}, dtype="auto")


def test_offload_layers_map_and_its_summary():
    tiny = config_for_scale("tiny")
    device_map = offload_layers_map(tiny, 2, "cpu", "disk")
    assert [device_map[f"{LAYER_PREFIX}{i}"] for i in range(4)] == ["cpu", "cpu", "disk", "disk"]
    summary = summarize_map(tiny, device_map, dtype="float16")
    assert summary.layers_per_device() == {"cpu": [0, 1], "disk": [2, 3]}
    assert summary.execution_device == "cpu"
    assert summary.offloaded_bytes == summary.bytes_per_device()["disk"]
    # Each offloaded layer keeps its rotary tables (512 positions x head dim 64, cos and sin, FP16) in memory.
    assert summary.offloaded_buffer_bytes == 2 * 2 * 512 * 64 * 2
    on_gpu = summarize_map(tiny, offload_layers_map(tiny, 1, 0, "cpu"))
    assert on_gpu.execution_device == 0 and on_gpu.offloaded_bytes == on_gpu.bytes_per_device()["cpu"]
    with pytest.raises(ValueError, match="n_offloaded=5; it must be an integer from 1 to 4"):
        offload_layers_map(tiny, 5, "cpu", "disk")
    with pytest.raises(ValueError, match="offload to one of"):
        offload_layers_map(tiny, 1, "cpu", "cuda")
    with pytest.raises(ValueError, match="does not have"):
        summarize_map(tiny, {"model.layers.9": "cpu"})


def test_disk_offload_on_cpu_gives_the_same_logits(tiny_checkpoint, tiny_model, tmp_path):
    from xcomp_lab.model.loading import load_model

    reference, _ = tiny_model
    device_map = offload_layers_map(reference.config, 2, "cpu", "disk")
    offloaded, _ = load_model(tiny_checkpoint, dtype="float32", device_map=device_map, offload_folder=str(tmp_path))
    assert offloaded.model.layers[3].attention.wqkv.base_layer.weight.device.type == "meta"
    embeds = torch.randn(1, 6, reference.config.hidden_size)
    with torch.inference_mode():
        expected = reference(inputs_embeds=embeds, use_cache=False).logits
        got = offloaded(inputs_embeds=embeds, use_cache=False).logits
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_plan_from_pretrained_is_the_map_from_pretrained_computes(dtype):
    from transformers.integrations.accelerate import _get_device_map


    max_memory = {0: "24GB", 1: "24GB"}
    plan = plan_from_pretrained("full", max_memory, dtype=dtype)
    with quiet_accelerate():  # the very function from_pretrained(device_map="auto", max_memory=...) calls
        expected = _get_device_map(meta_model("full", dtype), "auto", dict(max_memory), None)
    assert plan.device_map == expected and plan.dtype == dtype
    _assert_whole_layers(plan)
    # transformers balances with a margin of 1.25 x the largest leaf (the output head): 17 + 15 layers where
    # accelerate's own get_balanced_memory (plan_device_map(balanced=True)) gives 16 + 16.
    assert {d: len(v) for d, v in plan.layers_per_device().items()} == {0: 17, 1: 15}
    accelerate_plan = plan_device_map(config_for_scale("full"), max_memory, dtype=dtype, balanced=True)
    assert {d: len(v) for d, v in accelerate_plan.layers_per_device().items()} == {0: 16, 1: 16}
    assert plan.placement["output"] == plan.placement["vit"] == (1,) and plan.placement["model.tok_embeddings"] == (0,)


def test_plan_from_pretrained_rejects_bad_arguments():

    with pytest.raises(ValueError, match="max_memory is empty"):
        plan_from_pretrained("tiny", {})
    with pytest.raises(ValueError, match="dtype='auto' has no size"):
        plan_from_pretrained("tiny", {0: "1GB"}, dtype="auto")
