"""Notebooks 05, 06 and 07's lesson helpers on the original model's own code (small checkpoint, CPU, .venv-original).

One subprocess (tests/original_lessons_run.py) runs them; the tests read its report. Skips with a clear message
where ../shared (the original code, a test fixture) or .venv-original is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
FP32 = 4


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, original_code: tuple[Path, Path], scene_image) -> dict[str, Any]:
    code_dir, python = original_code
    out = tmp_path_factory.mktemp("original-lessons")
    image = out / "scene.png"
    scene_image.save(image)
    env = {**os.environ, "PYTHONPATH": os.fspath(REPO), "OMP_NUM_THREADS": "1"}
    command = [os.fspath(python), os.fspath(REPO / "tests" / "original_lessons_run.py"), os.fspath(code_dir),
               os.fspath(image), os.fspath(out / "report.json")]
    result = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, f"original_lessons_run failed in .venv-original:\n{result.stderr[-4000:]}"
    return json.loads((out / "report.json").read_text())


def test_first_decode_step_holds_the_packed_wqkv_and_the_prefill_logits(report):
    f, c = report["forensics"], report["forensics"]["config"]
    first, tokens = f["first"], f["prompt_tokens"]
    head = c["hidden_size"] // c["num_attention_heads"]
    kv = tokens * c["num_key_value_heads"] * head * FP32  # one layer's K (or V) over the prompt, FP32
    packed = tokens * (c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * head * FP32  # wqkv's output
    assert first["layers"] == c["num_hidden_layers"]
    assert first["cache_view_bytes"] == 2 * kv * first["layers"]
    assert first["cache_storage_bytes"] == (kv + packed) * first["layers"]  # V is a view into the packed output
    assert first["prefill_logits_bytes"] == tokens * c["vocab_size"] * FP32  # still referenced by 4.33.2's loop
    assert first["new_kv_bytes"] == 2 * (tokens + 1) * c["num_key_value_heads"] * head * FP32
    assert f["image_tokens"] == 1225 and f["new_tokens"] == 3
    assert f["phases"][:4] == ["start", "vision", "prefill", "decode-1"]
    assert f["lines"].splitlines()[2].startswith("2. the prefill's logits are still alive")


def test_the_original_declares_only_its_decoder_layer_and_accelerate_cuts_a_clip_layer(report):
    d = report["device_map"]
    assert d["no_split"] == ["InternLM2DecoderLayer"]
    assert d["cut_declared"] == []
    assert len(d["cut_clip"]) == 1 and d["cut_clip"][0].startswith("vit.vision_tower.vision_model.encoder.layers.")
    assert d["describe"].splitlines()[0].startswith("GPU 0:")



def test_plora_acts_from_the_first_image_token_on_the_originals_own_prompt(report):
    p = report["plora"]
    assert p["quantization"] == "none" and p["image_tokens"] == 1225
    assert p["first_difference"] == p["first_image_position"] > 0  # the system prompt comes first
    assert p["positions"] == report["forensics"]["prompt_tokens"]
    assert p["acts"] and p["verdict"].startswith("PLoRA acts from the first image token on")
