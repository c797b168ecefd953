"""Every hardware-dependent CPU kernel path the course can take, forced here so that CI on any CPU covers them.

- bitsandbytes 4-bit: the portable path (dequantize, then a product) and the packed path that CPUs with
  AVX512-BF16 take (weights repacked into 32-row tiles, BF16 products); the packed kernel is emulated in
  PyTorch where this CPU lacks the instructions, and checked against bitsandbytes' own layout.
- bitsandbytes INT8: `torch._int_mm` (registered by bitsandbytes on AVX-512 CPUs) or an FP32 product.
- torch's own FP16/BF16 CPU kernels, picked by `ATEN_CPU_CAPABILITY` (default, AVX2, AVX-512).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from xcomp_lab.data.scenes import held_out_dataset  # noqa: E402
from xcomp_lab.lessons.quantization import plora_effect  # noqa: E402
from xcomp_lab.model import bnb_cpu  # noqa: E402
from xcomp_lab.model.checkpoint import default_checkpoint  # noqa: E402
from xcomp_lab.model.loading import load_model, quantization_config  # noqa: E402
from xcomp_lab.model.modeling_internlm_xcomposer2 import InternLMXComposer2ForCausalLM  # noqa: E402
from xcomp_lab.model.scales import config_for_scale  # noqa: E402
from xcomp_lab.run.captioning import caption_images, prompt_batch, reference_logits  # noqa: E402

N_SCENES = 4


@pytest.fixture(scope="module")
def scenes():
    return held_out_dataset(N_SCENES, image_size=112)


def load_nf4(monkeypatch: pytest.MonkeyPatch, path: str):
    monkeypatch.setenv(bnb_cpu.ENV_VAR, path)
    return load_model(default_checkpoint("tiny"), dtype="float16", quantization_config=quantization_config("nf4"))


def linear4bit_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def test_packed_format_takes_every_full_scale_linear_and_all_but_the_tiny_plora_branches():
    for scale, expected_rejected in (("full", set()), ("tiny", {"Plora_A", "Plora_B"})):
        with torch.device("meta"):
            model = InternLMXComposer2ForCausalLM(config_for_scale(scale))
        linears = {name: m for name, m in model.named_modules()
                   if type(m) is torch.nn.Linear and m is not model.get_output_embeddings()}
        rejected = {name for name, m in linears.items()
                    if not bnb_cpu.packed_format_accepts(m.in_features, m.out_features)}
        assert {name.rsplit(".", 1)[-1] for name in rejected} == expected_rejected, scale
        if scale == "tiny":  # two branches on each of the 5 projections of each layer
            assert len(rejected) == 2 * 5 * model.config.num_hidden_layers


def test_unpacking_reads_bitsandbytes_packed_layout_exactly():
    torch.manual_seed(0)
    out_features, in_features = 96, 128
    weight = bnb.nn.Params4bit(torch.randn(out_features, in_features), requires_grad=False, quant_type="nf4")
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, quant_type="nf4").eval()
    layer.weight = weight
    layer = layer.to("cpu")
    stored = layer.weight.data.reshape(-1)  # two codes a byte, the first in the high nibble, row-major
    codes = torch.stack([stored >> 4, stored & 0xF], dim=1).reshape(out_features, in_features)
    bnb_cpu.apply_cpu_path(torch.nn.ModuleList([layer]), "packed")
    with torch.inference_mode():
        layer(torch.randn(1, in_features))  # the first call repacks
    assert layer.weight.quant_state.packing_format_for_cpu
    assert torch.equal(bnb_cpu.unpack_packed_codes(layer.weight.data, out_features, in_features), codes)


def test_bitsandbytes_alone_crashes_on_the_tiny_plora_branches_in_the_packed_path(monkeypatch):
    """What a CPU with AVX512-BF16 did before the shape rule: the reason `apply_cpu_path` exists."""
    model, tokenizer = load_nf4(monkeypatch, "portable")
    if not bnb_cpu.cpu_has_avx512bf16():
        bnb_cpu.register_packed_kernel_emulation()
    for layer in linear4bit_layers(model).values():
        layer.support_avx512bf16_for_cpu = True  # bitsandbytes' own choice on such a CPU, for every layer
    image = held_out_dataset(1, image_size=112)[0][0]
    with pytest.raises(AssertionError, match="N must be divisible by block_n"):
        caption_images(model, tokenizer, [image], max_new_tokens=2)


@pytest.fixture(scope="module")
def portable_run(scenes):
    with pytest.MonkeyPatch.context() as monkeypatch:
        model, tokenizer = load_nf4(monkeypatch, "portable")
    images = [image for image, _ in scenes]
    return caption_images(model, tokenizer, images), reference_logits(model, tokenizer, images)


@pytest.mark.parametrize("path", ["portable", "packed"])
def test_each_4bit_path_captions_keeps_plora_and_packs_what_it_says(monkeypatch, scenes, portable_run, path):
    model, tokenizer = load_nf4(monkeypatch, path)
    choice = bnb_cpu.apply_cpu_path(model)  # the same path again: harmless, and it reports the split
    layers = linear4bit_layers(model)
    assert len(choice.packed) + len(choice.portable) == len(layers)
    images = [image for image, _ in scenes]
    captions = caption_images(model, tokenizer, images)
    logits = reference_logits(model, tokenizer, images)
    with torch.inference_mode():
        embeds, im_mask = prompt_batch(model, tokenizer, images[:1])
    effect = plora_effect(model, embeds, im_mask)
    assert effect.acts_only_from_image_on, effect
    packed_now = {name for name, m in layers.items() if getattr(m.weight.quant_state, "packing_format_for_cpu", False)}
    assert packed_now == set(choice.packed)
    portable_captions, portable_logits = portable_run
    if path == "portable":
        assert not choice.packed
        assert captions == [truth for _, truth in scenes] == portable_captions
    else:
        assert set(choice.rejected_by_shape) == set(choice.portable)
        assert {name.rsplit(".", 1)[-1] for name in choice.portable} == {"Plora_A", "Plora_B"}
        assert choice.emulated == (not bnb_cpu.cpu_has_avx512bf16())
        assert captions == portable_captions  # BF16 products change the logits a little, not the captions
        top1 = (logits.argmax(-1) == portable_logits.argmax(-1)).float().mean().item()
        assert top1 >= 0.95, top1


def test_auto_follows_bitsandbytes_test_of_the_cpu(monkeypatch):
    model, _ = load_nf4(monkeypatch, "portable")
    for has_it in (False, True):
        monkeypatch.setattr(bnb_cpu, "cpu_has_avx512bf16", lambda: has_it)
        choice = bnb_cpu.apply_cpu_path(model, "auto")
        assert bool(choice.packed) == has_it and not choice.emulated
    bnb_cpu.apply_cpu_path(model, "portable")


def test_a_bad_path_is_refused_with_the_choices(monkeypatch):
    monkeypatch.setenv(bnb_cpu.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=r"'fast' is not one of \['portable', 'packed', 'auto'\]"):
        bnb_cpu.cpu_path_from_env()
    monkeypatch.setenv(bnb_cpu.ENV_VAR, "")
    assert bnb_cpu.cpu_path_from_env() == "portable"


@contextmanager
def int8_cpu_matmul(kind: str):
    """Serve bitsandbytes' int8 product on the CPU with torch._int_mm (as on AVX-512 CPUs) or in FP32."""
    def int_mm(A, B):
        return torch._int_mm(A.reshape(-1, A.shape[-1]), B.t()).reshape(*A.shape[:-1], B.shape[0])

    def fp32(A, B):
        return torch.matmul(A.float(), B.float().t()).to(torch.int32)

    library = torch.library.Library("bitsandbytes", "IMPL")
    try:
        torch.library.register_kernel("bitsandbytes::int8_linear_matmul", "cpu", {"int_mm": int_mm, "fp32": fp32}[kind],
                                      lib=library)
        yield
    finally:
        library._destroy()


def test_int8_logits_are_identical_with_either_cpu_matmul_kernel(scenes):
    model, tokenizer = load_model(default_checkpoint("tiny"), dtype="float16", quantization_config=quantization_config("int8"))
    images = [image for image, _ in scenes]
    logits = {}
    for kind in ("fp32", "int_mm"):
        with int8_cpu_matmul(kind):
            logits[kind] = reference_logits(model, tokenizer, images)
    # Integer products are exact either way while the sums stay below 2**24, as they do at tiny scale.
    assert torch.equal(logits["fp32"], logits["int_mm"])


CAPABILITY_PROBE = r"""
import json, torch
from xcomp_lab.run.captioning import caption_images, reference_logits
from xcomp_lab.run.call import run_caption
from xcomp_lab.model.checkpoint import default_checkpoint
from xcomp_lab.model.loading import load_model
from xcomp_lab.data.scenes import held_out_dataset
torch.manual_seed(0)
images = [image for image, _ in held_out_dataset(2, image_size=112)]
out = {"capability": torch.backends.cpu.get_cpu_capability()}
for dtype in ("float16", "bfloat16"):
    model, tokenizer = load_model(default_checkpoint("tiny"), dtype=dtype)
    run = run_caption(model, tokenizer, images[:1], device="cpu", max_new_tokens=16, grad="inference_mode",
                      use_autocast=False)
    out[dtype] = {"captions": caption_images(model, tokenizer, images), "peak_bytes": run.memory.peak_bytes,
                  "logits": reference_logits(model, tokenizer, images[:1])[0, -8:].tolist()}
print(json.dumps(out))
"""


def cpu_capabilities() -> list[str]:
    """The ATEN_CPU_CAPABILITY levels this CPU can run: torch trusts the variable, and a level above the CPU's
    own dies of an illegal instruction, so the levels come from the CPU's flags."""
    try:
        flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return ["default", torch.backends.cpu.get_cpu_capability().lower()]
    levels = ["default"]
    if {"avx2", "fma"} <= flags:
        levels.append("avx2")
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        levels.append("avx512")
    return levels


@pytest.mark.slow
def test_fp16_and_bf16_captions_and_memory_do_not_depend_on_torch_cpu_kernels():
    runs = {}
    for level in cpu_capabilities():
        env = {**os.environ, "ATEN_CPU_CAPABILITY": level, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-c", CAPABILITY_PROBE], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        runs[level] = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(runs) >= 2, f"only {list(runs)} can run here"
    first, *others = runs.values()
    for other in others:
        for dtype in ("float16", "bfloat16"):
            assert other[dtype]["captions"] == first[dtype]["captions"], (other["capability"], dtype)
            assert other[dtype]["peak_bytes"] == first[dtype]["peak_bytes"], (other["capability"], dtype)
            # Kernels may sum in another order: a few units in the last place of the dtype, at the logits' scale.
            got, want = torch.tensor(other[dtype]["logits"]), torch.tensor(first[dtype]["logits"])
            tolerance = 4 * torch.finfo(getattr(torch, dtype)).eps * want.abs().max().item()
            assert (got - want).abs().max().item() <= tolerance, (other["capability"], dtype)
            assert torch.equal(got.argmax(-1), want.argmax(-1)), (other["capability"], dtype)
