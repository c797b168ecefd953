"""Shared fixtures: a random tiny checkpoint in FP32, built once per test session; the bitsandbytes CPU path; the
original model's remote code and its environment (`original_code`), skipped with a clear message where absent.

`XCOMP_LAB_BNB_CPU_PATH` (see `xcomp_lab.model.bnb_cpu`) set for `make test` applies to the course runs the
tests make (`course_cpu_path`), which then take that 4-bit kernel from start to end. The saved outputs nbval
compares were recorded on the portable path, so the notebooks' own kernels run with it whatever was asked;
`tests/test_cpu_kernel_paths.py` forces each path itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REQUESTED_CPU_PATH = os.environ.get("XCOMP_LAB_BNB_CPU_PATH") or "portable"
os.environ["XCOMP_LAB_BNB_CPU_PATH"] = "portable"
REPO = Path(__file__).resolve().parents[1]
ORIGINAL_CODE_DIR = REPO.parent / "shared" / "reference" / "internlm-xcomposer2-vl-7b"
ORIGINAL_VENV = REPO / ".venv-original"


# The longest test files, longest first. `make test` runs `-n 2 --dist loadfile`, which hands files to the workers
# in collection order: starting these first lets the short files fill the other worker around them, instead of one
# course run finishing alone at the end.
SLOW_FILES = ("test_course.py", "test_course_80gb.py", "test_cpu_kernel_paths.py", "test_original_steps.py",
              "test_original_memory.py", "test_original_estimate.py", "test_original_course.py",
              "test_original_lessons.py", "test_original_sequence.py", "test_browser.py", "test_estimate.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))


def pytest_report_header() -> str:
    return f"bitsandbytes CPU path for the course runs: {REQUESTED_CPU_PATH} (nbval kernels: portable)"


@pytest.fixture(scope="session")
def course_cpu_path() -> str:
    """The bitsandbytes CPU path `make test` was asked for: the course runs take it."""
    return REQUESTED_CPU_PATH


@pytest.fixture(scope="session")
def original_code() -> tuple[Path, Path]:
    """(the original's remote-code folder, the Python of its environment), or the test skips saying how to get them."""
    python = ORIGINAL_VENV / "bin" / "python"
    if not ORIGINAL_CODE_DIR.is_dir():
        pytest.skip(f"The original remote code is not at {ORIGINAL_CODE_DIR} (a test fixture beside the checkout, "
                    "absent from a user's clone): nothing of the original's code path to run.")
    if not python.is_file() or not any(ORIGINAL_VENV.glob(".xcomp-lab-*")):
        pytest.skip(f"The original's environment {ORIGINAL_VENV} is missing or unfinished: create it once with "
                    "`make venv-original` (transformers 4.33.2; `make test` creates it where the reference code lies).")
    return ORIGINAL_CODE_DIR, python


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
