"""Notebook 02's helpers on the original model's own code: the load keywords, the image a 16-bit model needs, the
speed on its own generate, the host-RAM loads (small checkpoint, CPU, .venv-original for the run).

One subprocess (tests/original_precision_run.py) runs the helpers; the tests read its report. Those skip with a clear
message where ../shared (the original code, a test fixture) or .venv-original is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from xcomp_lab.model.loading import pretrained_keywords
from xcomp_lab.run.speed import Speed

REPO = Path(__file__).resolve().parents[1]


def test_load_keywords_follow_the_checkpoints_code(tmp_path, tiny_checkpoint):
    original = tmp_path / "original"
    original.mkdir()
    (original / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "x.Y"}, "transformers_version": "4.33.2"}))
    assert pretrained_keywords(original, "float16", "eager") == {"torch_dtype": torch.float16}
    assert pretrained_keywords(original, torch.float32) == {"torch_dtype": torch.float32}
    with pytest.raises(ValueError, match="eager attention only"):
        pretrained_keywords(original, "float16", "sdpa")
    assert pretrained_keywords(tiny_checkpoint, "float16", "sdpa") == {"dtype": torch.float16,
                                                                        "attn_implementation": "sdpa"}
    assert pretrained_keywords(None, "auto") == {"dtype": "auto"}


def test_a_speed_with_emulated_products_says_so():
    speed = Speed(1.0, 4, 1, 2, prompt_tokens=10, prefill_seconds=0.5, cpu_threads=1, emulated_products=True)
    assert str(speed).endswith("16-bit products computed in FP32 (xcomp_lab.original.matmul): not this CPU's 16-bit "
                               "speed")
    assert "computed in FP32" not in str(Speed(1.0, 4, 1, 2))


def test_an_original_step_takes_the_image_as_a_file_or_a_tensor():
    from xcomp_lab.course.step_table import STEPS
    from xcomp_lab.original.steps import ORIGINAL_STEPS, OriginalStep, original_step_for

    assert original_step_for(STEPS["bf16"]).image == "tensor"  # no autocast: a file's FP32 features are refused
    assert {s.image for name, s in ORIGINAL_STEPS.items() if name != "bf16"} == {"file"}
    with pytest.raises(ValueError, match="image"):
        OriginalStep("x", STEPS["bf16"], image="pixels")


def test_hub_cached_dtypes_reads_a_cached_snapshot_and_nothing_else(tmp_path):
    from safetensors.torch import save_file

    from xcomp_lab.lessons.precision import hub_cached_dtypes

    repo = tmp_path / "models--someone--clip"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (snapshot / "config.json").write_text("{}")
    save_file({"w": torch.zeros(3, 4, dtype=torch.float16)}, snapshot / "model.safetensors")
    assert hub_cached_dtypes("someone/clip", cache_dir=tmp_path) == {"F16": 24}
    assert hub_cached_dtypes("someone/other", cache_dir=tmp_path) == {}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, original_code: tuple[Path, Path], scene_image) -> dict[str, Any]:
    code_dir, python = original_code
    out = tmp_path_factory.mktemp("original-precision")
    image = out / "scene.png"
    scene_image.save(image)
    env = {**os.environ, "PYTHONPATH": os.fspath(REPO), "OMP_NUM_THREADS": "1"}
    command = [os.fspath(python), os.fspath(REPO / "tests" / "original_precision_run.py"), os.fspath(code_dir),
               os.fspath(image), os.fspath(out / "report.json")]
    result = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, f"original_precision_run failed in .venv-original:\n{result.stderr[-4000:]}"
    return json.loads((out / "report.json").read_text())


def test_bf16_without_autocast_refuses_an_image_file_and_takes_a_bf16_tensor(report):
    assert report["dtype"] == "torch.bfloat16"
    assert "fails: RuntimeError: mat1 and mat2 must have the same dtype" in report["file_chat"]
    assert report["file_chat"].endswith("the image preprocessed, in torch.bfloat16")
    assert report["reference"] == {"captions": 1, "logits_shape": report["reference"]["logits_shape"], "finite": True}
    assert report["reference"]["logits_shape"][:2] == [1, report["speed"]["prompt_tokens"]]


def test_speed_runs_the_originals_generate_for_exactly_the_tokens_asked(report):
    assert report["speed"]["emulated"] and report["speed"]["new_tokens"] == 2
    assert report["speed"]["prompt_tokens"] > 1225  # the system prompt, 1225 image tokens, the query
    assert report["generated"] == [1, 2]


def test_host_memory_loads_the_original_with_torch_dtype(report):
    assert report["host"]["rise"] > 0 and report["host"]["held"] > 0
