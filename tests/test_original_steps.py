"""The course's steps through the original remote code's `model.chat`, on the small original-code checkpoint on CPU.

One subprocess in .venv-original (transformers 4.33.2) runs `python -m xcomp_lab.tools.original_steps` on a subset
of the steps; the tests read its report. Skips with a clear message where ../shared (the original code, a test
fixture) or .venv-original is absent.

What the small scale can and cannot show: the original hard-codes its widths (4096-wide decoder, 1024-wide CLIP,
1225 image tokens, 32 attention heads), so a caption's activations are as large as at full size while the weights
are 1% of them. Under the course's budget, scaled to the weights, every FP32 step therefore runs out of memory at
small scale (the full-scale run on a GPU, results/original-h200/, shows the fixes fitting). The tests check what
holds at any scale: the quick start's OOM under the course's budget, where autocast's extra memory comes from (its
FP16 weight copies, byte for byte), that forgetting no_grad changes nothing in the original (its chat() is
@torch.no_grad()), the failures the original meets as they happen, and the quantized recipe's footprint.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from xcomp_lab.memory.budget import card_budget
from xcomp_lab.model.original import original_parameter_count, original_parameter_shapes

REPO = Path(__file__).resolve().parents[1]
STEPS = ("fp32-quickstart", "fp32-no-autocast", "fp32-inference-mode", "fp32-grad-enabled", "fp16-half",
         "fp16-half-no-autocast", "fp16-sdpa", "int8-plora")
FP16 = 2


@pytest.fixture(scope="module")
def steps(tmp_path_factory: pytest.TempPathFactory, original_code: tuple[Path, Path]) -> dict[str, dict[str, Any]]:
    code_dir, python = original_code
    out = tmp_path_factory.mktemp("original-steps")
    env = {**os.environ, "PYTHONPATH": os.fspath(REPO)}
    command = [os.fspath(python), "-m", "xcomp_lab.tools.original_steps", "--code-dir", os.fspath(code_dir),
               "--steps", ",".join(STEPS), "--results", os.fspath(out / "results.jsonl"),
               "--report", os.fspath(out / "report.json")]
    result = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, f"original_steps failed in .venv-original:\n{result.stderr[-4000:]}"
    records = json.loads((out / "report.json").read_text())["records"]
    assert [record["step"] for record in records] == list(STEPS)
    assert len((out / "results.jsonl").read_text().splitlines()) == len(STEPS)
    return {record["step"]: record for record in records}


def peak(record: dict[str, Any]) -> int:
    """The step's full peak: measured under no budget where the budgeted run stopped at the OOM."""
    return record["extra"]["unbudgeted"]["peak_bytes"] if record["oom"] else record["peak_bytes"]


def fp16_bytes(*names: str) -> int:
    shapes = original_parameter_shapes("small")
    return FP16 * sum(math.prod(shapes[name]) for name in names)


def test_records_name_the_original_code_and_its_versions(steps: dict[str, dict[str, Any]]) -> None:
    for record in steps.values():
        assert record["transformers_version"] == "4.33.2"
        assert record["extra"]["versions"]["transformers"] == "4.33.2"
        assert record["extra"]["code"].startswith("original remote code")
        assert len(record["extra"]["code_sha256"]) == 16
        assert record["memory_kind"] in ("cpu-accounting", None)


def test_quick_start_runs_out_of_memory_under_the_course_budget(steps: dict[str, dict[str, Any]]) -> None:
    quick = steps["fp32-quickstart"]
    assert quick["oom"] is True and quick["error"].startswith("BudgetExceededError")
    assert quick["budget_bytes"] == card_budget(48, "cpu", original_parameter_count("small") * 4).limit_bytes
    assert quick["extra"]["oom_location"].split(":")[0].startswith("modeling_")  # a line of model code
    assert peak(quick) > quick["budget_bytes"]


def test_autocast_costs_its_fp16_weight_copies_and_inference_mode_drops_them(
        steps: dict[str, dict[str, Any]]) -> None:
    quick, infer = steps["fp32-quickstart"], steps["fp32-inference-mode"]
    assert quick["extra"]["unbudgeted"]["peak_phase"] == infer["extra"]["unbudgeted"]["peak_phase"] == "prefill"
    # By the peak (layer 0's attention in the prefill) autocast has cast the projector and layer 0's wqkv with its
    # PLoRA branch; the vision tower's weights do not require grad, so their copies are not kept.
    cached = fp16_bytes("vision_proj.0.weight", "vision_proj.0.bias", "vision_proj.2.weight", "vision_proj.2.bias",
                        "model.layers.0.attention.wqkv.weight", "model.layers.0.attention.wqkv.Plora_A.weight",
                        "model.layers.0.attention.wqkv.Plora_B.weight")
    if tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 10):
        assert peak(quick) - peak(infer) == pytest.approx(cached, rel=0.02)
    assert peak(steps["fp32-no-autocast"]) < peak(quick)


def test_forgetting_no_grad_changes_nothing_because_chat_is_no_grad(steps: dict[str, dict[str, Any]]) -> None:
    assert peak(steps["fp32-grad-enabled"]) == peak(steps["fp32-no-autocast"])


def test_half_weights_halve_the_footprint(steps: dict[str, dict[str, Any]]) -> None:
    half, full = steps["fp16-half"]["weights_bytes"], steps["fp32-no-autocast"]["weights_bytes"]
    assert 2 * half - full == 1226 * 8  # all halved but CLIP's int64 position ids (1226 patches and the class token)
    assert peak(steps["fp16-half"]) < peak(steps["fp32-quickstart"])


def test_half_weights_without_autocast_fail_in_the_projector(steps: dict[str, dict[str, Any]]) -> None:
    failed = steps["fp16-half-no-autocast"]
    assert failed["error"] == "RuntimeError: mat1 and mat2 must have the same dtype, but got Float and Half"
    assert "in img2emb: img_embeds = self.vision_proj(self.vit(" in failed["extra"]["call_location"]


def test_sdpa_is_not_an_option_of_the_original(steps: dict[str, dict[str, Any]]) -> None:
    assert steps["fp16-sdpa"]["error"] == ("TypeError: InternLMXComposer2ForCausalLM.__init__() got an unexpected "
                                           "keyword argument 'attn_implementation'")


def test_plora_aware_int8_keeps_the_branch_and_stores_the_bases_in_one_byte(steps: dict[str, dict[str, Any]]) -> None:
    int8 = steps["int8-plora"]
    assert int8["extra"]["wqkv_class"] == "xcomp_lab.original.quantize.QuantizedPLoRA"
    assert int8["caption"] is not None or int8["oom"]
    shapes = original_parameter_shapes("small")
    bases = sum(math.prod(shape) for name, shape in shapes.items()
                if name.rsplit(".", 2)[-2] in ("wqkv", "wo", "w1", "w2", "w3") and name.endswith(".weight"))
    # FP16 at load, then each base weight from two bytes a value to one; buffers (rotary tables) as at load.
    assert steps["fp16-half"]["weights_bytes"] - int8["weights_bytes"] == pytest.approx(bases, abs=64 * 1024)
