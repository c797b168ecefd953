"""The autocast weight-cache experiment under the current torch, against the recorded runs of other versions.

docs/autocast-cache.json holds the experiment (`python -m xcomp_lab.original.autocast_cache --out ...`) as run under
torch 2.9.1 (before PyTorch PR #165068), 2.13.0 (the course's) and 2.14.1 (.venv-original's) on this project's CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from xcomp_lab.original.autocast_cache import LAYERS, run_experiment

RECORDED = Path(__file__).resolve().parents[1] / "docs" / "autocast-cache.json"
FIXED_IN = (2, 10)  # PR #165068: no weight cache inside inference_mode


def version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


def test_this_torch_caches_as_its_version_says() -> None:
    copies = run_experiment()["cached_copies"]
    assert copies["no-autocast"] == 0
    assert copies["no_grad+autocast"] == LAYERS  # the quick start keeps every layer's copy
    expected = 1 if version(torch.__version__) >= FIXED_IN else LAYERS
    assert copies["inference_mode+autocast"] == expected
    # The fixes that hold on every version: only the copy in use is alive.
    assert copies["no_grad+autocast(cache_enabled=False)"] == 1
    assert copies["no_grad+autocast, requires_grad_(False)"] == 1


def test_the_recorded_runs_span_the_fix() -> None:
    runs = {run["torch"]: run["cached_copies"] for run in json.loads(RECORDED.read_text())}
    before = [copies for name, copies in runs.items() if version(name) < FIXED_IN]
    after = [copies for name, copies in runs.items() if version(name) >= FIXED_IN]
    assert before and after
    assert all(copies["inference_mode+autocast"] == LAYERS for copies in before)
    assert all(copies["inference_mode+autocast"] == 1 for copies in after)
    for copies in before + after:
        assert copies["no_grad+autocast(cache_enabled=False)"] == copies["no_grad+autocast, requires_grad_(False)"] == 1
