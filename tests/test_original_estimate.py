"""The estimator on the original code (`xcomp_lab.original.estimate`) against the real call, on the CPU, exactly.

One subprocess in .venv-original (transformers 4.33.2) runs `python -m xcomp_lab.tools.original_estimate --check-cpu`
on the small original-code checkpoint: each step is predicted on fake tensors, then run for real with random
weights and measured by `memory.measure`'s CPU accounting. The prediction must be that figure to the byte, with the
same phase. Skips with a clear message where ../shared (the original code) or .venv-original is absent.

The full-size prediction against the H200's records is `results/original-h200/estimate.jsonl` (CPU work of some
minutes, not a test).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
# The quick start (autocast's FP16 weight copies, PLoRA's image-token scatter), autocast inside inference_mode,
# `.half()` after an FP32 load, and BF16 at load (no autocast: chat() gets the image as a BF16 tensor).
STEPS = ("fp32-quickstart", "fp32-inference-mode", "fp16-half", "bf16")
NEW_TOKENS = 2  # the prefill and the first decode step, where the original's peaks fall


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory, original_code: tuple[Path, Path]) -> dict[str, dict[str, Any]]:
    code_dir, python = original_code
    out = tmp_path_factory.mktemp("original-estimate") / "check.jsonl"
    command = [os.fspath(python), "-m", "xcomp_lab.tools.original_estimate", "--check-cpu", "--code-dir",
               os.fspath(code_dir), "--steps", ",".join(STEPS), "--max-new-tokens", str(NEW_TOKENS), "--out",
               os.fspath(out)]
    result = subprocess.run(command, check=False, env={**os.environ, "PYTHONPATH": os.fspath(REPO)},
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, f"original_estimate --check-cpu failed in .venv-original:\n{result.stderr[-4000:]}"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["step"] for row in rows] == list(STEPS)
    return {row["step"]: row for row in rows}


@pytest.mark.parametrize("step", STEPS)
def test_prediction_is_the_cpu_accounting(checked: dict[str, dict[str, Any]], step: str) -> None:
    predicted, measured = checked[step]["predicted"], checked[step]["measured"]
    assert measured["error"] is None
    assert predicted["peak_bytes"] == measured["peak_bytes"]
    assert predicted["start_bytes"] == predicted["weights_bytes"] == measured["start_bytes"]
    assert predicted["peak_phase"] == measured["peak_phase"]
    assert predicted["kv_cache_bytes"] == measured["kv_cache_bytes"] > 0
    assert (predicted["prompt_tokens"], predicted["new_tokens"]) == (measured["prompt_tokens"], NEW_TOKENS)


def test_quick_start_holds_autocast_copies(checked: dict[str, dict[str, Any]]) -> None:
    """FP32 weights under autocast: FP16 copies held at the peak, fewer inside inference_mode (torch >= 2.10 keeps
    only the one in use); FP16 weights need none."""
    copies = {step: row["predicted"]["autocast_copies_bytes"] for step, row in checked.items()}
    assert copies["fp32-quickstart"] > copies["fp32-inference-mode"]
    assert copies["fp16-half"] == 0
