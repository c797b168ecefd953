"""The trained tiny captioner the course ships: it is the tiny default, and it captions held-out scenes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from xcomp_lab.core.resources import package_file
from xcomp_lab.model.checkpoint import (
    DONE_MARKER,
    TRAINED_RECIPE_NAME,
    TRAINED_TINY,
    TRAINED_WEIGHTS_NAME,
    default_checkpoint,
    trained_tiny_checkpoint,
)
from xcomp_lab.model.loading import load_model
from xcomp_lab.run.captioning import evaluate_captioner


def test_tiny_default_is_the_trained_captioner_assembled_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("XCOMP_LAB_CACHE", str(tmp_path))
    directory = default_checkpoint("tiny")
    assert directory == trained_tiny_checkpoint() and directory.parent == tmp_path / "checkpoints"
    assert (directory / "model.safetensors").read_bytes() == package_file(*TRAINED_TINY, TRAINED_WEIGHTS_NAME).read_bytes()
    record = json.loads((directory / DONE_MARKER).read_text())
    assert record["settings"]["steps"] == 4000


def test_shipped_record_names_its_recipe():
    record = json.loads(package_file(*TRAINED_TINY, TRAINED_RECIPE_NAME).read_text())
    assert set(record["settings"]) >= {"steps", "batch_size", "learning_rate", "seed"}
    assert "--device cuda" in record["command"] and record["trained_on"]


def test_trained_captioner_gets_at_least_95_percent_exact_match_at_fp32():
    model, tokenizer = load_model(dtype="float32")
    assert next(model.parameters()).dtype == torch.float32
    report = evaluate_captioner(model, tokenizer, n=200, batch_size=50)
    assert report.n == 200
    assert report.exact_match >= 0.95, report
