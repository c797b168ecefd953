"""Notebook 04's helpers on the original model's own code (small checkpoint, CPU, .venv-original): its shape and
prompts, its eager-only attention, a prompt of two images through `model.chat` and two prompts at once through its
`generate`, and the peak terms of its attention module.

One subprocess (tests/original_sequence_run.py) runs them; the tests read its report. Skips with a clear message
where ../shared (the original code, a test fixture) or .venv-original is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from xcomp_lab.lessons.sequence import ModelShape, eager_scores_bytes, kv_cache_formula, logits_peak_bytes

REPO = Path(__file__).resolve().parents[1]
FP32 = 4
IMAGE_TOKENS = 1225  # 490 px in 14 px patches: 35 x 35


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, original_code: tuple[Path, Path], scene_image) -> dict[str, Any]:
    code_dir, python = original_code
    out = tmp_path_factory.mktemp("original-sequence")
    image = out / "scene.png"
    scene_image.save(image)
    env = {**os.environ, "PYTHONPATH": os.fspath(REPO), "OMP_NUM_THREADS": "1"}
    command = [os.fspath(python), os.fspath(REPO / "tests" / "original_sequence_run.py"), os.fspath(code_dir),
               os.fspath(image), os.fspath(out / "report.json")]
    result = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=600, cwd=out)
    assert result.returncode == 0, f"original_sequence_run failed in .venv-original:\n{result.stderr[-4000:]}"
    return json.loads((out / "report.json").read_text())


def test_the_originals_shape_fixes_the_image_side_and_grows_prompts_by_images(report):
    shape = ModelShape(**report["shape"])
    assert (shape.head_dim, shape.image_size, shape.patch_size, shape.fixed_image_size) == (4096 // 32, 490, 14, True)
    assert shape.max_prompt_tokens == 4096  # its config's max_length, where interleav_wrap_chat cuts
    text = report["text_tokens"]
    most = (4096 - text) // IMAGE_TOKENS
    assert report["prompts"] == [[k, text + k * IMAGE_TOKENS] for k in range(1, most + 1)]
    assert report["scales"]["full"]["vocab_size"] == 92544 and report["scales"]["full"]["num_hidden_layers"] == 32
    assert report["scales"]["small"] == report["shape"]


def test_the_original_has_eager_attention_only_read_from_its_code(report):
    assert report["kind"] == "eager"
    assert "layer 0 runs InternLM2Attention" in report["code"]
    assert report["code"].endswith("never calls scaled_dot_product_attention")
    assert "eager attention only" in report["refusal"]


def test_two_images_in_one_chat_and_two_prompts_in_one_generate(report):
    shape = ModelShape(**report["shape"])
    text = report["text_tokens"]
    packed = (shape.num_attention_heads + 2 * shape.num_key_value_heads) * shape.head_dim  # wqkv's output width
    key = shape.num_key_value_heads * shape.head_dim
    for name, batch, images in (("two-images", 1, 2), ("two-prompts", 2, 1)):
        run = report["runs"][name]
        tokens = text + images * IMAGE_TOKENS
        assert run["ok"] and run["images_per_prompt"] == images and len(run["captions"]) == batch
        assert run["prompt_tokens"] == tokens and run["new_tokens"] == batch  # prefill only: one token per prompt
        assert run["kv_cache_bytes"] == kv_cache_formula(shape, batch, tokens, "float32")
        # the tuple cache keeps each layer's rotated keys and, through the values' view, its whole packed output
        assert run["kv_storage_bytes"] == batch * tokens * (key + packed) * FP32 * shape.num_hidden_layers


def test_the_peak_terms_of_the_originals_attention_module(report):
    shape, terms = ModelShape(**report["shape"]), report["terms"]
    assert terms["sdpa_bytes"] is None  # it has no sdpa
    assert terms["scores_bytes"] == eager_scores_bytes(shape, 1, 300, "float32")
    assert terms["logits_bytes"] == logits_peak_bytes(shape, 1, 300, "float32")  # FP32: .float() is the same tensor
    # the masked scores, their softmax, and the module's projections: more than three scores tensors, at 300 tokens
    assert 3 * terms["scores_bytes"] < terms["eager_bytes"] < 6 * terms["scores_bytes"]
