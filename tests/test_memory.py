"""Memory measurement, budgets and OOM handling, checked against analytic byte counts."""

import json
import math

import pytest
import torch
from torch import nn

from xcomp_lab.core.units import GB, GIB, MIB
from xcomp_lab.memory import Budget, MemoryResult, measure, run_guarded
from xcomp_lab.memory.budget import FULL_FP32_WEIGHT_BYTES
from xcomp_lab.memory.cards import CARDS, CONTEXT_BYTES

FP32 = 4
GRAD_MODES = [torch.no_grad, torch.inference_mode]
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def eight_layers() -> nn.Sequential:
    return nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(8)])


# --- CPU accounting -------------------------------------------------------------------------------------


def test_weights_are_parameters_plus_buffers():
    model = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.Embedding(10, 8).to(torch.float16))
    expected = tensor_bytes(model.parameters()) + tensor_bytes(model.buffers())
    with measure("cpu", model=model) as m:
        pass
    r = m.result
    assert r.weights_bytes == expected
    assert r.start_bytes == r.peak_bytes == r.end_bytes == expected
    assert r.activations_bytes == 0 and r.kind == "cpu-accounting" and r.reserved_peak_bytes is None


@pytest.mark.parametrize("grad_mode", GRAD_MODES)
def test_matmul_peak_is_analytic(grad_mode):
    with grad_mode(), measure("cpu") as m:
        a = torch.randn(512, 1024)  # (M, K)
        b = torch.randn(1024, 2048)  # (K, N)
        c = a @ b  # (M, N)
    assert m.result.peak_bytes == (512 * 1024 + 1024 * 2048 + 512 * 2048) * FP32
    assert m.result.end_bytes == m.result.peak_bytes
    del a, b, c


@pytest.mark.parametrize("grad_mode", GRAD_MODES)
def test_softmax_attention_peak_is_analytic(grad_mode):
    B, H, T, D = 1, 8, 300, 64
    x = B * H * T * D * FP32  # one of q, k, v or the output
    s = B * H * T * T * FP32  # one (B, H, T, T) score matrix
    with grad_mode(), measure("cpu") as m:
        q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
        scores = q @ k.transpose(-2, -1)  # (B, H, T, T)
        scores = scores / math.sqrt(D)  # the old and new scores coexist here: peak
        probs = scores.softmax(-1)  # and here
        del scores
        out = probs @ v  # (B, H, T, D)
    assert m.result.peak_bytes == 3 * x + 2 * s
    assert m.result.end_bytes == 4 * x + s
    del q, k, v, probs, out


def test_views_and_in_place_ops_allocate_nothing():
    outside = torch.zeros(1000)
    with measure("cpu") as m:
        grid = outside.view(10, 100)
        grid.t().add_(1)
        every_other = outside[::2]
        every_other.mul_(2)
        inside = torch.zeros(1000)  # counted once, however many views are taken of it
        views = [inside.view(10, 100), inside[1:], inside.reshape(20, 50), inside.expand(3, 1000)]
    assert m.result.peak_bytes == 1000 * FP32
    del grid, every_other, inside, views


def test_freed_tensors_are_subtracted():
    n = MIB // FP32
    with measure("cpu") as m:
        for _ in range(50):
            x = torch.empty(n)  # the new tensor exists before the old one is released
        del x
    assert m.result.peak_bytes == 2 * MIB
    assert m.result.end_bytes == 0


def test_tensors_from_python_data_are_counted():
    with measure("cpu") as m:
        t = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert m.result.peak_bytes == 4 * FP32
    del t


def test_autocast_caches_weight_copies_only_while_grad_is_tracked():
    model = eight_layers()
    x = torch.randn(4, 1024)
    peaks = {}
    for grad_mode in GRAD_MODES:
        with measure("cpu", model=model) as m, grad_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        peaks[grad_mode.__name__] = m.result.peak_bytes
        # The cache lives as long as the autocast block: afterwards only the output remains.
        assert m.result.end_bytes == m.result.weights_bytes + y.numel() * y.element_size()
    bf16_copy = (1024 * 1024 + 1024) * 2  # one layer's weight and bias cast to bfloat16
    # no_grad keeps all eight copies at the last layer; inference_mode keeps one at a time.
    assert peaks["no_grad"] - peaks["inference_mode"] == 7 * bf16_copy


def test_marks_and_kv_cache():
    model = nn.Linear(256, 256)
    weights = tensor_bytes(model.parameters())
    with measure("cpu", model=model, label="phases") as m:
        kv = torch.zeros(MIB // FP32)
        m.mark("prefill")
        act = torch.zeros(2 * MIB // FP32)
        m.mark("decode")
        m.set_kv_cache_bytes(kv.numel() * FP32)
        del act
    r = m.result
    assert [(label, nbytes - weights) for _, nbytes, label in r.timeline if label] == [
        ("start", 0), ("prefill", MIB), ("decode", 3 * MIB), ("end", MIB)]
    assert r.kv_cache_bytes == MIB and r.activations_bytes == 2 * MIB
    m.set_kv_cache_bytes(0)  # may be set after the block too
    assert m.result.activations_bytes == 3 * MIB
    del kv


def test_timeline_is_bounded():
    with measure("cpu", sample_every=1, max_samples=64) as m:
        for _ in range(1000):
            torch.empty(16)
    assert 16 <= len(m.result.timeline) <= 65


def test_result_is_json_friendly_and_prints_in_binary_units():
    with measure("cpu", label="json") as m:
        x = torch.empty(3 * MIB // FP32)
        m.mark("made")
    d = m.result.as_dict()
    assert json.loads(json.dumps(d))["peak_bytes"] == 3 * MIB
    assert d["timeline"][1][2] == "made"
    assert "peak 3.00 MiB" in str(m.result) and "\n" not in str(m.result)
    del x


# --- budgets and OOM on CPU -----------------------------------------------------------------------------


def test_scaled_budget_keeps_the_full_models_ratio():
    budget = Budget.scaled_to(10 * MIB)
    l40s = CARDS["L40S"]  # the course's 48 GB card: 44.42 GiB as PyTorch reports it, less the CUDA context
    assert budget.limit_bytes == round((l40s.total_bytes - CONTEXT_BYTES) * 10 * MIB / (8_666_840_064 * 4))
    assert FULL_FP32_WEIGHT_BYTES == 34_667_360_256
    text = budget.describe()
    assert "Tensor accounting on CPU" in text and "L40S (48 GB): PyTorch sees 44.42 GiB" in text
    assert "43.74 GiB usable" in text and "13.55 MiB allowed" in text


def test_budget_raises_out_of_memory_like_cuda():
    budget = Budget.scaled_to(4 * MIB)  # about 5.4 MiB allowed
    with pytest.raises(torch.OutOfMemoryError) as info, measure("cpu", budget=budget) as m:
        [torch.empty(MIB // FP32) for _ in range(10)]  # the list holds each until the budget is exceeded
    message = str(info.value)
    assert message.startswith("CPU budget exceeded (emulating a 48 GB card): Tried to allocate 1.00 MiB in ")
    assert "aten.empty.memory_format -> shape (262144,) float32" in message
    assert "5.00 MiB in use of a budget of 5.42 MiB" in message
    r = m.result
    assert r.oom and r.error.startswith("BudgetExceededError: CPU budget exceeded")
    assert r.peak_bytes == 5 * MIB <= r.budget_bytes


def test_raise_oom_false_swallows_it():
    with measure("cpu", budget=Budget.scaled_to(MIB), raise_oom=False) as m:
        torch.empty(2 * MIB // FP32)
    assert m.result.oom and m.failure.op == "aten.empty.memory_format"


def test_run_guarded_names_the_op_and_releases_memory():
    model = eight_layers()
    x = torch.randn(4, 1024)
    budget = Budget.scaled_to(tensor_bytes(model.parameters()))  # 1.38x the FP32 weights

    def caption():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x)  # the autocast cache needs 1.5x the FP32 weights

    g = run_guarded(caption, "cpu", model=model, budget=budget, label="caption")
    assert not g.ok and g.value is None and g.memory.oom
    assert g.failed_op == "aten._to_copy.default -> (1024, 1024) bfloat16"
    assert g.requested_bytes == 1024 * 1024 * 2
    assert g.location.startswith("test_memory.py:") and "return model(x)" in g.location
    assert g.in_use_at_failure_bytes + g.requested_bytes > budget.limit_bytes
    assert g.after_release_bytes == g.memory.start_bytes == tensor_bytes(model.parameters())
    assert g.released and "back at its value before the step" in g.report()

    def caption_without_grad_tracking():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x)

    g = run_guarded(caption_without_grad_tracking, "cpu", model=model, budget=budget)
    assert g.ok and g.value.shape == (4, 1024) and g.failed_op is None
    assert g.memory.peak_bytes < budget.limit_bytes


# --- validation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cpu:1", "tpu"])
def test_unknown_device_is_refused(device):
    with pytest.raises(ValueError, match="unknown device"):
        measure(device)


@pytest.mark.parametrize("gb", [-48, 0, "48"])
def test_bad_card_size_is_refused(gb):
    with pytest.raises(ValueError, match=rf"gb={gb!r}; it must be a positive number \(the card's size in GB"):
        Budget.scaled_to(MIB, gb=gb)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="fp32_weight_bytes=-5; it must be a positive integer"):
        Budget.scaled_to(-5)
    with pytest.raises(ValueError, match="pass it to measure"):
        Budget.scaled_to(MIB).apply()
    with pytest.raises(ValueError, match=r"nbytes=-1; it must be an integer from 0 up \(KV cache bytes"):
        measure("cpu").set_kv_cache_bytes(-1)
    with pytest.raises(ValueError, match="model must be a torch.nn.Module"):
        measure("cpu", model="llama")
    with pytest.raises(ValueError, match="step must be a callable"):
        run_guarded(42, "cpu")
    with pytest.raises(RuntimeError, match="after the with block"):
        _ = measure("cpu").result


# --- CUDA (skipped without a GPU) -----------------------------------------------------------------------


@cuda_only
def test_cuda_matmul_peak_is_analytic():
    warm = torch.randn(64, 64, device="cuda") @ torch.randn(64, 64, device="cuda")  # cuBLAS workspace
    model = nn.Linear(1024, 1024, device="cuda")
    with measure("cuda", model=model) as m:
        a = torch.randn(512, 1024, device="cuda")
        m.mark("inputs")
        b = a @ model.weight  # (512, 1024)
    r = m.result
    assert isinstance(r, MemoryResult) and r.kind == "cuda-allocator" and r.device.startswith("cuda:")
    assert r.weights_bytes == tensor_bytes(model.parameters())
    assert r.peak_bytes - r.start_bytes == 2 * 512 * 1024 * FP32
    assert r.activations_bytes == r.peak_bytes - r.start_bytes
    assert [label for _, _, label in r.timeline] == ["start", "inputs", "end"]
    assert r.reserved_peak_bytes >= r.peak_bytes
    del warm, a, b


@cuda_only
def test_cuda_budget_is_a_real_allocator_limit_and_is_removed():
    budget = Budget.for_card(gb=3, device="cuda")
    assert budget.limit_bytes == 3 * GB and "Real allocator limit" in budget.describe()
    assert "2.79 GiB" in budget.describe()

    def too_big():
        keep = torch.empty(GIB // FP32, device="cuda")
        plus = keep + 1
        return plus, keep * 2  # a third GiB does not fit in 2.79 GiB

    g = run_guarded(too_big, "cuda", budget=budget)
    assert not g.ok and g.memory.oom and "Tried to allocate" in g.memory.error
    assert g.requested_bytes == GIB
    assert "keep * 2" in g.failed_op and "too_big" in g.location
    assert g.after_release_bytes == g.memory.start_bytes
    big = torch.empty(3 * GIB // FP32, device="cuda")  # the limit is gone again
    del big
