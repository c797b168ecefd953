"""The original model's own remote code, run on a small checkpoint laid out like the released one.

The reference copy of that code lies beside the checkout (../shared/reference/internlm-xcomposer2-vl-7b, a test
fixture that is never copied into the project) and runs only in its own environment (.venv-original, transformers
4.33.2, `make venv-original`). Where either is missing the tests that need them skip and say how to get them. One
subprocess in .venv-original runs tests/original_code_run.py, which builds or reuses the small checkpoint (in the
course's cache), captions the first sample scene through `model.chat` and loads it again in INT8; the tests read
its report. The builder's own figures are checked in the course's environment.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from xcomp_lab.model.original import (
    CHECKPOINT_NAME,
    CODE_FILES,
    check_code_dir,
    check_original_scale,
    original_config,
    original_parameter_count,
    original_parameter_shapes,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "original_code_run.py"
SAMPLE = REPO / "xcomp_lab" / "data" / "samples" / "scene-0.png"
FULL_PARAMETERS = 8_666_840_064
SMALL_PARAMETERS = 89_121_024


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, original_code: tuple[Path, Path]) -> dict[str, Any]:
    code_dir, python = original_code
    path = tmp_path_factory.mktemp("original-code") / "report.json"
    env = {**os.environ, "PYTHONPATH": os.fspath(REPO)}
    result = subprocess.run([python, SCRIPT, code_dir, SAMPLE, path], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, f"{SCRIPT.name} failed in .venv-original:\n{result.stderr[-4000:]}"
    return json.loads(path.read_text())


def test_runs_under_the_pinned_transformers(report: dict[str, Any]) -> None:
    assert report["versions"]["transformers"] == "4.33.2"


def test_chat_captions_the_sample_scene(report: dict[str, Any]) -> None:
    caption = report["caption"]
    assert isinstance(caption["response"], str) and caption["response"]
    assert caption["history"] == [["<ImageHere>Describe the image in one sentence.", caption["response"]]]


def test_checkpoint_is_laid_out_like_the_released_one(report: dict[str, Any], original_code: tuple[Path, Path]) -> None:
    files = set(report["files"])
    model_files = {"config.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "model.safetensors.index.json", *CODE_FILES}
    assert {f"{CHECKPOINT_NAME}/{name}" for name in model_files} <= files
    checkpoint = Path(report["checkpoint"]["path"])
    assert all((checkpoint / name).read_bytes() == (original_code[0] / name).read_bytes() for name in CODE_FILES)
    clip = "hf-home/hub/models--openai--clip-vit-large-patch14-336"
    snapshots = {name for name in files if name.startswith(f"{clip}/snapshots/")}
    revision = snapshots.pop().split("/")[-2] if snapshots else None
    assert {f"{clip}/refs/main", f"{clip}/snapshots/{revision}/config.json",
            f"{clip}/snapshots/{revision}/model.safetensors"} <= files
    assert report["tokenizer"] == {"class": "InternLMXComposer2Tokenizer", "pieces": 1024, "im_end": 148}


def test_full_size_matches_the_original_on_the_meta_device(report: dict[str, Any]) -> None:
    meta = {name: tuple(shape) for name, shape in report["full_meta"].items()}
    assert list(meta.items()) == list(original_parameter_shapes("full").items())
    assert len(meta) == 942
    assert original_parameter_count("full") == FULL_PARAMETERS


def test_small_checkpoint_loads_every_tensor(report: dict[str, Any]) -> None:
    expected = original_parameter_shapes("small")
    assert report["loading_info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [],
                                      "error_msgs": []}
    assert {name: tuple(shape) for name, shape in report["checkpoint"]["tensors"].items()} == expected
    assert {name: tuple(shape) for name, shape in report["loaded"].items()} == expected
    assert report["loaded_dtypes"] == ["torch.float32"]
    assert original_parameter_count("small") == SMALL_PARAMETERS


def test_int8_loses_plora_and_chat_raises_type_error(report: dict[str, Any]) -> None:
    int8 = report["int8"]
    assert int8["wqkv_class"] == "bitsandbytes.nn.modules.Linear8bitLt"
    assert int8["wqkv_children"] == []
    assert int8["error"] == "TypeError: Linear8bitLt.forward() takes 2 positional arguments but 3 were given"


def test_full_config_is_the_released_models() -> None:
    config = original_config("full")
    assert {key: config[key] for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                         "num_key_value_heads", "intermediate_size", "max_position_embeddings",
                                         "rope_theta", "rope_scaling", "bias", "max_length", "img_size",
                                         "torch_dtype")} == {
        "vocab_size": 92544, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "intermediate_size": 14336, "max_position_embeddings": 32768,
        "rope_theta": 1000000, "rope_scaling": {"factor": 1.0, "type": "dynamic"}, "bias": False,
        "max_length": 4096, "img_size": 490, "torch_dtype": "float16",
    }
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}


def test_refuses_unknown_scales_and_incomplete_code(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'tiny'.*small"):
        check_original_scale("tiny")
    (tmp_path / "build_mlp.py").write_text("")
    with pytest.raises(FileNotFoundError, match="configuration_internlm_xcomposer2.py.*downloaded"):
        check_code_dir(tmp_path)

