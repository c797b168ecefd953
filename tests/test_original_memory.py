"""The replica holds in memory what the original remote code holds (issue #15, item 4), measured on this CPU.

Two parts:
- The three things the original code (under transformers 4.33.2) holds in its first decode step, each checked on a
  tiny replica with `config.original_memory` on and off: the prefill cache's values are views into each layer's
  packed `wqkv` output; the greedy loop (`run.generate.legacy_greedy_search`) still holds the prefill's logits
  while decode step 1 runs; the previous step's cache is still referenced while the new keys and values are built.
- The measured proof: the original small checkpoint through `model.chat` in .venv-original
  (tests/original_memory_run.py, FP32 without autocast, then `.half()` with autocast), and the replica built with
  the same dimensions (`model.original.original_config("small")`: real widths, one decoder layer), captioning the
  same image from the same prompt (the original tokenizer's ids for its text parts, 1225 image tokens) through the
  course's greedy call, by the same CPU tensor accounting. The replica builds its prompt as its own `chat()` does,
  which, like the original's, keeps the image embeddings referenced while `generate` runs; the course's
  `run.captioning.prompt_batch` lets them go first, which is 1225 x 4096 values less (about 2% at this scale,
  0.05% at full scale). Skips with a clear message where ../shared or .venv-original is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import BatchEncoding

from xcomp_lab.core.resources import package_file
from xcomp_lab.estimate import estimate_caption
from xcomp_lab.memory.measure import measure
from xcomp_lab.model.checkpoint import course_tokenizer
from xcomp_lab.model.configuration_internlm_xcomposer2 import InternLMXcomposer2Config
from xcomp_lab.model.modeling_internlm_xcomposer2 import (
    IMAGE_PLACEHOLDER,
    InternLMXComposer2ForCausalLM,
    TupleCacheLayer,
)
from xcomp_lab.model.original import clip_config, original_config
from xcomp_lab.model.scales import config_for_scale
from xcomp_lab.original.matmul import FloatMatmul
from xcomp_lab.run.call import phase_marks, run_caption
from xcomp_lab.run.generate import greedy_generate
from xcomp_lab.run.modes import autocast, grad_mode

REPO = Path(__file__).resolve().parents[1]
IMAGE = package_file("xcomp_lab.data", "samples", "scene-0.png")
QUERY = "Please describe this image in detail."  # xcomp_lab.original.steps.QUERY after its placeholder
STEPS = {"fp32-no-autocast": (None, False), "fp16-half": (torch.float16, True)}  # cast after loading, autocast
TOLERANCE = 0.01


# ----- the three causes, on a tiny replica --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> tuple[InternLMXComposer2ForCausalLM, Any]:
    torch.manual_seed(0)
    return InternLMXComposer2ForCausalLM(config_for_scale("tiny")).eval(), course_tokenizer()


def watch_first_decode_step(model: InternLMXComposer2ForCausalLM, tokenizer: Any,
                            original_memory: bool) -> dict[str, Any]:
    """Generate two tokens; report what was alive when decode step 1 ended, and the prefill cache of layer 0."""
    model.config.original_memory = original_memory
    seen: dict[str, Any] = {"calls": 0}

    def after_forward(_module: Any, _args: Any, output: Any) -> None:
        if seen["calls"] == 0:
            layer = output.cache.layers[0]
            packed = model.model.layers[0].attention.wqkv.out_features
            seen.update(logits=weakref.ref(output.logits), keys=weakref.ref(layer.keys),
                        values=weakref.ref(layer.values), cache_class=type(layer),
                        values_storage=layer.values.untyped_storage().nbytes(),
                        values_own_bytes=layer.values.numel() * layer.values.element_size(),
                        qkv_bytes=layer.values.shape[-2] * packed * layer.values.element_size())
        seen["calls"] += 1

    def end_of_decoder(*_: Any) -> None:
        if seen["calls"] == 1:  # the decoder of decode step 1 is done, its forward not yet returned
            seen.update(logits_alive=seen["logits"]() is not None, keys_alive=seen["keys"]() is not None,
                        values_alive=seen["values"]() is not None)

    torch.manual_seed(1)
    embeds = torch.randn(1, 40, model.config.hidden_size)
    im_mask = torch.zeros(1, 40, dtype=torch.bool)
    im_mask[:, 4:30] = True
    handles = [model.register_forward_hook(after_forward), model.model.register_forward_hook(end_of_decoder)]
    try:
        with torch.inference_mode():
            greedy_generate(model, tokenizer, embeds, im_mask, max_new_tokens=2, stop_at_end_of_turn=False)
    finally:
        for handle in handles:
            handle.remove()
        model.config.original_memory = True
    return seen


def test_prefill_cache_values_are_views_of_the_packed_projection(tiny) -> None:
    legacy = watch_first_decode_step(*tiny, original_memory=True)
    assert legacy["cache_class"] is TupleCacheLayer
    assert legacy["values_storage"] == legacy["qkv_bytes"]  # the whole wqkv output, queries and keys included
    assert legacy["values_storage"] == 6 * legacy["values_own_bytes"]  # tiny: 4 query heads + K + V per KV head
    modern = watch_first_decode_step(*tiny, original_memory=False)
    assert modern["cache_class"] is not TupleCacheLayer
    assert modern["values_storage"] == modern["values_own_bytes"]  # transformers 5 copies the values out


def test_decode_step_1_runs_with_the_prefill_logits_and_the_old_cache(tiny) -> None:
    legacy = watch_first_decode_step(*tiny, original_memory=True)
    assert legacy["logits_alive"], "legacy_greedy_search let the prefill's logits go before decode step 1 ended"
    assert legacy["keys_alive"] and legacy["values_alive"], "the prefill's cache was freed as the new one was built"
    modern = watch_first_decode_step(*tiny, original_memory=False)
    assert not modern["logits_alive"] and not modern["keys_alive"] and not modern["values_alive"]


def test_estimator_replays_decode_step_1_as_measured(tiny_model, scene_image) -> None:
    """The estimator replays the same loop: its prefill and decode peaks are the measured ones, to a few bytes."""
    model, tokenizer = tiny_model
    run = run_caption(model, tokenizer, [scene_image], device="cpu", max_new_tokens=4, grad="inference_mode",
                      sample_every=1)
    measured = phase_peaks(run.memory.timeline)
    predicted = estimate_caption(model, grad="inference_mode", new_tokens=run.new_tokens)
    assert run.new_tokens >= 3  # decode step 1 ran, and one more: the estimate skips steps between 1 and the last
    # phase_marks marks "decode" once (here "decode-1"): the measured decode peak is that of every decode step.
    for phase, group in (("prefill", "prefill"), ("decode-1", "decode")):
        assert abs(predicted.phase_peaks[group] - measured[phase]) <= 64, (phase, predicted.phase_peaks, measured)


def test_fast_forwarded_estimate_keeps_decode_step_1() -> None:
    """Under original_memory decode step 1 holds the prefill's logits: skipping it would lower the decode peak."""
    exact = estimate_caption("tiny", new_tokens=6, exact_decode=True)
    fast = estimate_caption("tiny", new_tokens=6)
    assert fast.phase_peaks == exact.phase_peaks and fast.peak_bytes == exact.peak_bytes
    assert exact.kv_cache_bytes == fast.kv_cache_bytes


def test_original_memory_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match=r"original_memory='yes'.*pass True"):
        InternLMXcomposer2Config(original_memory="yes")


# ----- the measured proof against the original code -----------------------------------------------------------


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory, original_code: tuple[Path, Path]) -> dict[str, Any]:
    """The original small checkpoint's two chats, measured in .venv-original (about 40 s on this 2-core CPU)."""
    code_dir, python = original_code
    report = tmp_path_factory.mktemp("original-memory") / "report.json"
    env = {**os.environ, "PYTHONPATH": os.fspath(REPO), "OMP_NUM_THREADS": "1"}
    command = [os.fspath(python), os.fspath(REPO / "tests" / "original_memory_run.py"), os.fspath(code_dir),
               os.fspath(IMAGE), os.fspath(report)]
    result = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, f"original_memory_run failed in .venv-original:\n{result.stderr[-4000:]}"
    return json.loads(report.read_text())


def small_replica_config() -> InternLMXcomposer2Config:
    """The replica at the original-code checkpoint's small scale: its config.json's fields, its CLIP's."""
    config, vision = original_config("small"), clip_config("small")["vision_config"]
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "rope_theta", "rms_norm_eps", "pad_token_id")
    return InternLMXcomposer2Config(**{name: config[name] for name in fields}, vision_config={
        name: vision[name] for name in ("num_hidden_layers", "intermediate_size")})


class OriginalIds:
    """The course tokenizer, except that the prompt's text parts get the ids the original tokenizer gave them."""

    def __init__(self, tokenizer: Any, text_ids: list[list[int]]) -> None:
        self.tokenizer = tokenizer
        self.text_ids = list(text_ids)

    def __call__(self, text: str, return_tensors: str | None = None) -> BatchEncoding:
        return BatchEncoding({"input_ids": torch.tensor([self.text_ids.pop(0)])})

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


def phase_peaks(timeline: Any) -> dict[str, int]:
    peaks: dict[str, int] = {}
    phase = "start"
    for _, allocated, label in timeline:
        if label and label not in ("start", "end"):
            phase = {"decode": "decode-1"}.get(label, label)  # two new tokens: the one decode step
        peaks[phase] = max(peaks.get(phase, 0), allocated)
    return peaks


@pytest.fixture(scope="module")
def replica(original: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The small replica's two calls, as the original's: FP32 without autocast, then `.half()` with autocast."""
    from PIL import Image

    torch.manual_seed(0)
    model = InternLMXComposer2ForCausalLM(small_replica_config()).eval()
    tokenizer = course_tokenizer()
    image = Image.open(IMAGE)
    runs = {}
    for name, (cast, use_autocast) in STEPS.items():
        if cast is not None:
            model = model.to(cast)
        ids = OriginalIds(tokenizer, original[name]["text_ids"])
        with FloatMatmul(), measure("cpu", model=model, sample_every=1, max_samples=10**8) as meter, \
                grad_mode("no_grad"), autocast("cpu", use_autocast), phase_marks(model, meter):
            image_embeds = model.encode_img([image])  # kept referenced, as chat() keeps it
            embeds, im_mask = model.interleav_wrap_chat(ids, IMAGE_PLACEHOLDER + QUERY, image_embeds)
            greedy_generate(model, tokenizer, embeds, im_mask, max_new_tokens=2, stop_at_end_of_turn=False)
            del image_embeds
        peaks = phase_peaks(meter.result.timeline)
        runs[name] = {"peak_bytes": meter.result.peak_bytes, "weights_bytes": meter.result.weights_bytes,
                      "phase_peaks": peaks, "peak_phase": max(peaks, key=peaks.get),
                      "prompt_tokens": int(embeds.shape[1])}
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("step", list(STEPS))
def test_replica_peaks_as_the_original_in_the_same_phase(step: str, original, replica) -> None:
    mine, theirs = replica[step], original[step]
    assert theirs["decoder_calls"] == 2, theirs  # the prefill and decode step 1 ran in the original
    assert mine["prompt_tokens"] == theirs["prompt_tokens"] == 1225 + sum(map(len, theirs["text_ids"]))
    assert abs(mine["weights_bytes"] / theirs["weights_bytes"] - 1) < 1e-5  # same parameters and rotary tables
    error = mine["peak_bytes"] / theirs["peak_bytes"] - 1
    assert abs(error) < TOLERANCE, f"{step}: replica {mine['peak_bytes']:,} vs original {theirs['peak_bytes']:,} B"
    assert mine["peak_phase"] == theirs["peak_phase"]
    for phase in ("prefill", "decode-1"):  # decode step 1 is where the three causes hold their memory
        error = mine["phase_peaks"][phase] / theirs["phase_peaks"][phase] - 1
        assert abs(error) < TOLERANCE, f"{step}, {phase}: {error:+.2%}"
