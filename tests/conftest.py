"""Shared fixtures: a random tiny checkpoint in FP32, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from xcomp_lab.model.checkpoint import build_checkpoint

    return build_checkpoint("tiny", "float32", seed=0, out_dir=tmp_path_factory.mktemp("tiny-fp32"), progress=False)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint: Path):
    from xcomp_lab.model.loading import load_model

    torch.manual_seed(0)
    return load_model(tiny_checkpoint, dtype="float32")


@pytest.fixture(scope="session")
def scene_image():
    from xcomp_lab.data.scenes import make_dataset

    image, _ = make_dataset(1, seed=1000, image_size=112)[0]
    return image
