"""What every notebook does in its first cells and around each measurement, kept out of the notebooks.

`start()` checks the papermill parameters, seeds, quiets progress bars and prints the environment;
`sample_images()` gives the course's captioning images with their true captions; `record()` appends a run
to the results file and prints the one line a learner reads.
"""

from __future__ import annotations

import gc
import json
import platform
import warnings
from typing import Any

import torch
import transformers
from PIL import Image

from xcomp_lab.core.resources import package_file
from xcomp_lab.core.units import fmt_bytes
from xcomp_lab.course.params import CourseParams, check_params
from xcomp_lab.course.results import append_result

SAMPLES = ("xcomp_lab.data", "samples")  # package data: the sample scenes and their true captions


def start(**parameters: Any) -> CourseParams:
    """Validate the notebook parameters, seed everything and print versions and the device."""
    params = check_params(**parameters)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*repetition_penalty.*")
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    params.results_path.parent.mkdir(parents=True, exist_ok=True)
    # Everything imported so far lives for the whole notebook: keep it out of the collections that every
    # measurement runs to release memory (they would otherwise rescan it each time).
    gc.collect()
    gc.freeze()
    device = torch.cuda.get_device_name(0) if params.device == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    print(f"torch {torch.__version__} | transformers {transformers.__version__} | python {platform.python_version()}")
    print(f"device: {device}")
    return params


def sample_images(n: int = 1) -> list[tuple[Image.Image, str]]:
    """The first `n` course images (xcomp_lab/data/samples/scene-*.png) with their true captions."""
    folder = package_file(*SAMPLES)
    examples = json.loads((folder / "scenes.json").read_text())["examples"]
    if not 1 <= n <= len(examples):
        raise ValueError(f"n={n}; the course ships {len(examples)} sample images, ask for 1 to {len(examples)}.")
    return [(Image.open((folder / e["file"]).open("rb")).convert("RGB"), e["caption"]) for e in examples[:n]]


def batch_of_images(params: CourseParams) -> list[Image.Image]:
    """`params.batch_size` images to caption together (the sample images, repeated if needed)."""
    images = [image for image, _ in sample_images(6)]
    return [images[i % len(images)] for i in range(params.batch_size)]


def record(params: CourseParams, record_: dict[str, Any]) -> dict[str, Any]:
    """Append a results record to the notebook's results file and print its one-line summary."""
    append_result(params.results_path, record_)
    print(summary_line(record_))
    return record_


def summary_line(r: dict[str, Any]) -> str:
    """`step: peak X of budget Y | weights W | KV K | activations A | OOM/fits` in binary units."""
    budget = f" of {fmt_bytes(r['budget_bytes'])} budget" if r.get("budget_bytes") else ""
    status = "OOM" if r["oom"] else "fits"
    return (
        f"{r['step']}: {status} | peak {fmt_bytes(r['peak_bytes'])}{budget} | weights {fmt_bytes(r['weights_bytes'])}"
        f" | KV cache {fmt_bytes(r['kv_cache_bytes'])} | activations {fmt_bytes(r['activations_bytes'])}"
    )
