"""The planner (`xcomp_lab.plan`): its prediction of one generate call against the real call on the CPU, for the
tiny variant of every preset architecture; the caching allocator's simulation against cases worked by hand; the
inverse search; the errors a user meets."""

from __future__ import annotations

import pytest
import torch

from xcomp_lab.memory.measure import measure
from xcomp_lab.plan.allocator import (
    LARGE_BUFFER,
    SMALL_BUFFER,
    BothOrders,
    CachingAllocator,
    OutOfMemory,
    round_size,
)
from xcomp_lab.plan.estimate import call_inputs, check_call, estimate
from xcomp_lab.plan.inverse import bisect_largest
from xcomp_lab.plan.replay import greedy_generate

MIB = 1 << 20
NEW_TOKENS = 4
TEXT_TOKENS = 16
# One attention each, both kinds covered (Gemma 2 has eager only); every architecture of the matrix.
CASES = [("llama-3-8b", "sdpa"), ("qwen2.5-7b", "eager"), ("mistral-7b-v0.3", "sdpa"), ("gemma-2-9b", "eager"),
         ("phi-3-mini-4k", "sdpa"), ("qwen2-vl-7b", "sdpa"), ("llava-1.5-7b", "eager"), ("idefics3-8b", "sdpa")]


def prompt_tokens(name: str) -> int:
    """Text tokens plus, for a VLM, the tokens its processor makes of the tiny preset's default image."""
    from xcomp_lab.plan.build import image_inputs
    from xcomp_lab.plan.presets import get_preset

    preset = get_preset(name)
    image = image_inputs(preset, preset.default_image_size(True), tiny=True)["input_ids"].shape[1] if preset.is_vlm \
        else 0
    return TEXT_TOKENS + image


def measured_peak(name: str, *, dtype: str, quantization: str, attn: str, batch: int, prompt: int) -> int:
    """The real call on the CPU under the tensor accounting: the peak `measure` reports."""
    from xcomp_lab.plan.build import build_model

    call = check_call(f"{name}:tiny", dtype=dtype, quantization=quantization, attn=attn, batch=batch,
                      prompt_tokens=prompt, new_tokens=NEW_TOKENS, image_size=None, device="cpu", card=None)
    inputs = call_inputs(call)
    model = build_model(name, dtype=dtype, attn=attn, quantization=quantization, tiny=True)
    with measure("cpu", model=model) as m:
        greedy_generate(model, inputs, NEW_TOKENS)
    return m.result.peak_bytes


@pytest.mark.parametrize(("name", "attn"), CASES)
def test_cpu_prediction_is_the_cpu_run(name: str, attn: str) -> None:
    prompt = prompt_tokens(name)
    plan = estimate(f"{name}:tiny", dtype="fp32", attn=attn, batch=2, prompt_tokens=prompt, new_tokens=NEW_TOKENS,
                    device="cpu")
    measured = measured_peak(name, dtype="fp32", quantization="none", attn=attn, batch=2, prompt=prompt)
    assert plan.peak_bytes == measured, plan.table()
    assert set(plan.phases) >= {"load", "prefill", "decode"}
    assert plan.kv_cache_bytes > 0


def test_fast_forward_is_the_exact_decode() -> None:
    """Skipping the passing activations of the middle decode steps changes no peak (CPU, sliding-window cache)."""
    kwargs = {"dtype": "fp32", "attn": "eager", "batch": 1, "prompt_tokens": 30, "new_tokens": 5, "device": "cpu"}
    fast, exact = (estimate("phi-3-mini-4k:tiny", exact_decode=e, **kwargs) for e in (False, True))
    assert {k: v.allocated for k, v in fast.phases.items()} == {k: v.allocated for k, v in exact.phases.items()}
    assert fast.kv_cache_bytes == exact.kv_cache_bytes


def test_nf4_prediction_within_its_tolerance() -> None:
    """NF4: the prediction counts the bitsandbytes statistics the CPU accounting misses, nothing else differs."""
    prompt = prompt_tokens("llama-3-8b")
    plan = estimate("llama-3-8b:tiny", dtype="bf16", quantization="nf4", attn="sdpa", batch=2, prompt_tokens=prompt,
                    new_tokens=NEW_TOKENS, device="cpu")
    measured = measured_peak("llama-3-8b", dtype="bf16", quantization="nf4", attn="sdpa", batch=2, prompt=prompt)
    assert plan.quant_state_bytes > 0
    assert plan.peak_bytes == measured, plan.table()


def test_cuda_plan_counts_blocks_and_segments() -> None:
    plan = estimate("llama-3-8b:tiny", attn="sdpa", batch=2, prompt_tokens=40, new_tokens=NEW_TOKENS, card="L4")
    assert plan.reserved_peak_bytes >= plan.peak_bytes >= plan.weights_bytes + plan.inputs_bytes
    assert plan.reserved_peak_bytes % SMALL_BUFFER == 0  # whole segments
    assert plan.fits is True and "fits L4" in plan.table()
    nf4 = estimate("llama-3-8b:tiny", quantization="nf4", batch=2, prompt_tokens=40, new_tokens=NEW_TOKENS)
    assert nf4.weights_bytes < plan.weights_bytes and nf4.quant_state_bytes > 0
    assert nf4.phases["load"].allocated >= nf4.weights_bytes


# ----- the caching allocator, by hand -----

def test_rounding_and_small_pool() -> None:
    alloc = CachingAllocator()
    assert round_size(1) == 512 and round_size(513) == 1024
    a = alloc.malloc(100)
    b = alloc.malloc(1000)
    assert (a.size, b.size) == (512, 1024) and b.address == a.address + 512  # split from one 2 MiB segment
    assert alloc.reserved == SMALL_BUFFER and alloc.allocated == 1536


def test_mid_size_requests_share_a_20_mib_segment() -> None:
    alloc = CachingAllocator()
    a, b = alloc.malloc(3 * MIB), alloc.malloc(5 * MIB)
    assert alloc.reserved == LARGE_BUFFER and b.address == a.address + 3 * MIB
    c = alloc.malloc(11 * MIB + 1)  # the segment's free 12 MiB serve it; what is left is under 1 MiB: not split
    assert alloc.reserved == LARGE_BUFFER and c.address == b.address + 5 * MIB and c.size == 12 * MIB
    d = alloc.malloc(13 * MIB + 1)  # >= 10 MiB and no free block: its own segment, rounded up to 2 MiB
    assert alloc.reserved == LARGE_BUFFER + 14 * MIB and d.size == 14 * MIB


def test_unsplit_remainder_is_counted_allocated() -> None:
    alloc = CachingAllocator()
    alloc.malloc(12 * MIB)  # a 12 MiB segment, exactly used
    big = alloc.malloc(11 * MIB)  # a 12 MiB segment: 1 MiB left over, not more than kSmallSize: not split
    assert big.size == 12 * MIB and alloc.allocated == 24 * MIB


def test_free_merges_and_best_fit_reuses() -> None:
    alloc = CachingAllocator()
    a, b, c = alloc.malloc(4 * MIB), alloc.malloc(4 * MIB), alloc.malloc(4 * MIB)
    alloc.free(a)
    alloc.free(b)  # merges with a: one free 8 MiB block at the segment's start
    d = alloc.malloc(6 * MIB)  # served from it, the 2 MiB rest split off (more than 1 MiB)
    assert d.address == a.address and d.size == 6 * MIB and alloc.reserved == LARGE_BUFFER
    alloc.free(c)
    alloc.free(d)
    alloc.empty_cache()
    assert alloc.reserved == 0 and alloc.peak_reserved == LARGE_BUFFER and alloc.peak_allocated == 12 * MIB


def run_ties(allocator: CachingAllocator | BothOrders) -> int:
    """Two free 20 MiB blocks, one a segment of its own, one the tail of a 40 MiB segment: which one a 20 MiB
    request takes decides whether a later 40 MiB request finds its segment whole again."""
    a = allocator.malloc(40 * MIB)
    b = allocator.malloc(20 * MIB)
    allocator.free(a)
    c = allocator.malloc(20 * MIB)  # the 40 MiB segment's head
    allocator.free(b)
    allocator.malloc(20 * MIB)  # a tie: the lower address wins
    allocator.free(c)
    allocator.malloc(40 * MIB)
    return allocator.peak_reserved


def test_ties_go_to_the_lower_address_and_both_orders_take_the_larger() -> None:
    assert run_ties(CachingAllocator(downward=True)) == 60 * MIB  # the own segment lies lower: it is taken
    assert run_ties(CachingAllocator(downward=False)) == 100 * MIB  # the tail lies lower: a new segment
    assert run_ties(BothOrders()) == 100 * MIB


def test_limit_releases_the_cache_first() -> None:
    alloc = CachingAllocator(limit=40 * MIB)
    alloc.free(alloc.malloc(30 * MIB))  # 30 MiB cached
    alloc.malloc(35 * MIB)  # no cached block fits and 30 + 36 MiB would cross the limit: the cache is released
    assert alloc.reserved == 36 * MIB


def test_out_of_memory() -> None:
    alloc = CachingAllocator(limit=30 * MIB)
    alloc.malloc(20 * MIB)
    with pytest.raises(OutOfMemory):
        alloc.malloc(20 * MIB)


# ----- the inverse search -----

@pytest.mark.parametrize(("threshold", "start", "step"), [(37, 1, 1), (1, 5, 1), (300, 8, 1), (0, 3, 1),
                                                          (1000, 14, 14), (2048, 4, 1)])
def test_bisection_finds_the_largest_fitting_value(threshold: int, start: int, step: int) -> None:
    limit = 1024
    seen: list[int] = []

    def fits_at(value: int) -> object | None:
        seen.append(value)
        return value if value <= threshold else None

    value, plan, calls = bisect_largest(fits_at, start, step, limit, step)
    expected = min(threshold, limit) // step * step
    assert value == (expected if expected >= step else None) and plan == value
    assert calls == len(seen) <= 2 * (limit.bit_length() + 1)
    assert all(v % step == 0 for v in seen)


# ----- errors -----

def test_errors_name_what_was_given_and_what_to_do(tmp_path) -> None:
    from transformers import BertConfig

    with pytest.raises(ValueError, match="model_type='bert'.*planner replays"):
        estimate(BertConfig())
    with pytest.raises(ValueError, match="no sdpa attention.*attn='eager'"):
        estimate("gemma-2-9b:tiny", attn="sdpa")
    with pytest.raises(ValueError, match="dtype='int4'"):
        estimate("llama-3-8b:tiny", dtype="int4")
    with pytest.raises(ValueError, match="image_size=224.*language model"):
        estimate("llama-3-8b:tiny", image_size=224)
    with pytest.raises(ValueError, match="without a config.json"):
        estimate(str(tmp_path))
    with pytest.raises(ValueError, match="not a known model"):
        estimate("llama-9")
    with pytest.raises(ValueError, match="card="):
        estimate("llama-3-8b:tiny", card="GTX 1"),
    with pytest.raises(ValueError, match="batch=0"):
        estimate("llama-3-8b:tiny", batch=0)


def test_command_prints_an_error_line(capsys) -> None:
    from xcomp_lab.plan.__main__ import main

    assert main(["--model", "llama-9", "--no-inverse"]) == 2
    assert "error: preset='llama-9' is not a known model" in capsys.readouterr().err


def test_command_prints_the_table(capsys) -> None:
    from xcomp_lab.plan.__main__ import main

    assert main(["--model", "qwen2-vl-7b:tiny", "--card", "L4", "--prompt-tokens", "40", "--new-tokens", "3",
                 "--no-inverse"]) == 0
    out = capsys.readouterr().out
    assert "vision" in out and "reserved" in out and "fits L4" in out
    assert torch.is_grad_enabled()


# ----- a device map -----

def test_device_map_places_as_accelerate_and_counts_each_device() -> None:
    from accelerate import infer_auto_device_map

    from xcomp_lab.plan.build import meta_model
    from xcomp_lab.plan.presets import get_preset

    whole = estimate("llama-3-8b:tiny", batch=2, prompt_tokens=40, new_tokens=NEW_TOKENS)
    meta = meta_model(get_preset("llama-3-8b").config(tiny=True), torch.bfloat16)  # from_pretrained's own skeleton
    # Half the weights on GPU 0: the embeddings there, the layers (as one ModuleList) and the head on GPU 1; at 0.8
    # the layers are split between the two, the hidden state copied across.
    for share, layers_on in ((0.5, {"model.layers": 1}), (0.8, {"model.layers.0": 0, "model.layers.1": 1})):
        max_memory = {0: int(whole.weights_bytes * share), 1: whole.weights_bytes}
        split = estimate("llama-3-8b:tiny", batch=2, prompt_tokens=40, new_tokens=NEW_TOKENS, max_memory=max_memory)
        assert split.device_map == infer_auto_device_map(meta, max_memory=max_memory,
                                                         no_split_module_classes=meta._no_split_modules)
        assert layers_on.items() <= split.device_map.items() and list(split.devices) == ["cuda:0", "cuda:1"]
        assert sum(d.weights for d in split.devices.values()) == split.weights_bytes == whole.weights_bytes
        assert split.peak_bytes >= whole.peak_bytes and "cuda:1" in split.table()
        if share == 0.5:  # the KV cache is where its layers are, with cuBLAS's workspace
            gpu1 = split.devices["cuda:1"]
            assert gpu1.peak - gpu1.weights - split.workspace_bytes > split.kv_cache_bytes
    with pytest.raises(ValueError, match="'gpu0'"):
        check_call("llama-3-8b:tiny", dtype=None, quantization="none", attn="sdpa", batch=1, prompt_tokens=8,
                   new_tokens=2, image_size=None, device="cuda", card=None, max_memory={"gpu0": "1GB"})
    with pytest.raises(ValueError, match="not a size"):
        check_call("llama-3-8b:tiny", dtype=None, quantization="none", attn="sdpa", batch=1, prompt_tokens=8,
                   new_tokens=2, image_size=None, device="cuda", card=None, max_memory={0: "lots"})
    with pytest.raises(ValueError, match="device='cuda'"):
        check_call("llama-3-8b:tiny", dtype=None, quantization="none", attn="sdpa", batch=1, prompt_tokens=8,
                   new_tokens=2, image_size=None, device="cpu", card=None, max_memory={0: "1GB"})


# ----- quantized loads and LLM.int8()'s outliers, against the H200 matrix -----

@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_load_simulation_leaves_the_measured_segments(quantization) -> None:
    """Llama 3 8B quantized on the fly: the simulated load's allocated bytes and free space in the weights' segments
    against the H200's (`load_segments`, the large pool; the small pool's 2 MiB segments make the rest)."""
    import json

    from torch._subclasses.fake_tensor import FakeTensorMode

    from xcomp_lab.core.resources import repository_root
    from xcomp_lab.plan.accounting import PlanAccounting
    from xcomp_lab.plan.build import quantization_config
    from xcomp_lab.plan.estimate import simulate_load
    from xcomp_lab.plan.presets import get_preset
    from xcomp_lab.plan.replay import build_fake_model

    lines = (repository_root() / "results" / "plan-matrix-h200" / "records.jsonl").read_text().splitlines()
    record = next(r for r in map(json.loads, lines)
                  if r["preset"] == "llama-3-8b" and r["quantization"] == quantization and "skipped" not in r)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True, static_shapes=True)
    fake = build_fake_model(get_preset("llama-3-8b").config(), dtype=torch.bfloat16, attn="sdpa",
                            bnb_config=quantization_config(quantization, torch.bfloat16), fake_mode=fake_mode)
    allocator = CachingAllocator()
    simulate_load(allocator, fake, torch.bfloat16, PlanAccounting(0, allocator))
    allocator.empty_cache()
    assert abs(allocator.allocated - record["weights_bytes"]) <= 1024  # NF4: bitsandbytes' one shared 1 KiB map
    measured_slack = sum(size - used for size, used in record["load_segments"])
    assert abs((allocator.reserved - allocator.allocated) - measured_slack) <= 2 * MIB


def test_int8_plan_runs_the_outlier_path_for_every_column() -> None:
    """On CUDA an INT8 linear's input columns are all taken as outliers: bitsandbytes' composite kernels run, so
    the columns gathered, dequantized (two FP32 temporaries) and cast, and `addmm`'s second output, are made."""
    import bitsandbytes as bnb
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from xcomp_lab.plan.accounting import Int8Outliers
    from xcomp_lab.plan.build import quantization_config
    from xcomp_lab.plan.presets import get_preset
    from xcomp_lab.plan.replay import build_fake_model

    made: list[tuple[tuple[int, ...], torch.dtype]] = []

    class Made(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            made.extend((tuple(o.shape), o.dtype) for o in (out if isinstance(out, tuple) else (out,))
                        if isinstance(o, torch.Tensor))
            return out

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True, static_shapes=True)
    model = build_fake_model(get_preset("llama-3-8b").config(tiny=True), dtype=torch.bfloat16, attn="sdpa",
                             bnb_config=quantization_config("int8", torch.bfloat16), fake_mode=fake_mode)
    linear = model.get_submodule("model.layers.0.mlp.down_proj")  # in eval mode: the CUDA path, MatMul8bitLt
    assert isinstance(linear, bnb.nn.Linear8bitLt) and not linear.training
    linear.state.threshold = 6.0
    cols, outs = linear.in_features, linear.out_features
    with fake_mode:
        x = torch.empty(8, cols, dtype=torch.bfloat16)
    with fake_mode, Made(), Int8Outliers():
        out = linear(x)
    assert out.shape == (8, outs) and linear.state.idx.shape == (cols,)  # every column, kept on the module
    for shape, dtype in [((8, cols), torch.bfloat16), ((outs, cols), torch.int8), ((outs, cols), torch.float32),
                         ((outs, cols), torch.bfloat16), ((8, outs), torch.int32)]:
        assert (shape, dtype) in made, (shape, dtype)
    assert made.count(((outs, cols), torch.float32)) == 2 and made.count(((8, outs), torch.bfloat16)) >= 2
