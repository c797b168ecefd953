"""The parameters every notebook accepts (papermill), checked in the notebook's first cell.

A wrong value fails at once with what was given, what is allowed and what to do, instead of deep inside
a model call minutes later. A checkpoint of the original model's own code (`xcomp_lab.original.detect`) takes the
original's scales ("small": a build for the CPU, "full") and its attention (eager only); checking never imports
transformers, so the original's environment can still prepare it first (`course.notebook.start`).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from xcomp_lab.core.checks import (
    BATCH_SIZE,
    IMAGE_SIZE,
    NEW_TOKENS,
    Limit,
    check_number,
)
from xcomp_lab.original.detect import (
    ORIGINAL_ATTENTION,
    is_build,
    original_scale,
    uses_original_code,
)

DEVICES = ("auto", "cpu", "cuda")
SEED = Limit(2**64 - 1, "torch.manual_seed takes 0 to 2**64 - 1")


@dataclass(frozen=True)
class CourseParams:
    """Checked notebook parameters; `device` is resolved ("auto" becomes "cuda" or "cpu")."""

    scale: str
    device: str
    budget_gb: float
    model_name_or_path: str | None
    batch_size: int
    image_size: int | None
    max_new_tokens: int
    attn_implementation: str
    seed: int
    results_path: Path

    def as_dict(self) -> dict:
        return {**asdict(self), "results_path": str(self.results_path)}

    @property
    def original_code(self) -> bool:
        """True where `model_name_or_path` runs the original model's own remote code (`original.detect`)."""
        return uses_original_code(self.model_name_or_path)

    @property
    def random_weights(self) -> bool:
        """True where these parameters load random weights, whose captions and top-1 agreements are noise: the
        course's own full-scale checkpoint and every original-code build (the tiny scale loads the trained
        captioner, a downloaded `model_name_or_path` real weights)."""
        if self.original_code:
            return is_build(self.model_name_or_path)
        return self.scale == "full" and self.model_name_or_path is None

    def __str__(self) -> str:
        model = self.model_name_or_path or f"synthetic replica ({self.scale})"
        image = f"{self.image_size} px" if self.image_size else "model default"
        return (
            f"scale={self.scale} | device={self.device} | budget {self.budget_gb:g} GB card | model: {model} | "
            f"batch {self.batch_size} | image {image} | {self.max_new_tokens} new tokens | "
            f"{self.attn_implementation} attention | seed {self.seed}"
        )


def resolve_course_device(device: str) -> str:
    """`device` checked ("auto", "cpu" or "cuda") and resolved: "auto" is "cuda" when a GPU is visible, else "cpu"."""
    if device not in DEVICES:
        raise ValueError(f"device={device!r}; choose one of {list(DEVICES)} ('auto' picks cuda when a GPU is visible).")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA GPU is visible; use device='cpu' (with scale='tiny') or 'auto'.")
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def check_results_path(results_path: str | os.PathLike) -> Path:
    """`results_path` as a Path once its folder exists and the file can be appended to; nothing in it is changed.

    A missing file is left to the first record to create: a probe file is created in its folder and removed.
    """
    text = os.fspath(results_path) if isinstance(results_path, (str, os.PathLike)) else None
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"results_path={results_path!r}; pass the JSON-lines file the notebooks append their "
                         f"records to, e.g. 'results/results.jsonl'.")
    path = Path(text)
    if path.is_dir():
        raise ValueError(f"results_path={text!r} is a folder; pass a file in it, e.g. {str(path / 'results.jsonl')!r}.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            with path.open("a", encoding="utf-8"):
                pass
        else:
            with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".results-probe-", suffix=".tmp"):
                pass
    except OSError as exc:
        raise ValueError(f"results_path={text!r} cannot be written ({exc.strerror or exc}); every measurement is "
                         f"appended there, so pass a file in a folder you can write to, e.g. "
                         f"'results/results.jsonl'.") from None
    return path


def check_scale_and_attention(scale: str, model_name_or_path: str | os.PathLike | None) -> tuple[str, ...]:
    """Check `scale` for the checkpoint's code and return the attention implementations that code supports.

    The replica: its scales ("tiny", "full") and eager or sdpa. The original's code: "small" or "full", the one
    a build was made at (a download is "full"), and eager only.
    """
    if not uses_original_code(model_name_or_path):
        from xcomp_lab.model.modeling_internlm_xcomposer2 import SUPPORTED_ATTENTION
        from xcomp_lab.model.scales import check_scale

        check_scale(scale)
        return SUPPORTED_ATTENTION
    from xcomp_lab.model.original import check_original_scale

    check_original_scale(scale)
    own = original_scale(model_name_or_path) if os.path.isdir(model_name_or_path) else "full"
    if scale != own:
        raise ValueError(f"scale={scale!r} but {os.fspath(model_name_or_path)!r} is an original-code checkpoint at "
                         f"scale {own!r}; pass scale={own!r} (the scale names the checkpoint's size).")
    return ORIGINAL_ATTENTION


def check_params(
    scale: str = "tiny",
    device: str = "auto",
    budget_gb: float = 48,
    model_name_or_path: str | None = None,
    batch_size: int = 1,
    image_size: int | None = None,
    max_new_tokens: int = 16,
    attn_implementation: str = "eager",
    seed: int = 0,
    results_path: str | os.PathLike = "results/results.jsonl",
) -> CourseParams:
    """Validate the notebook parameters and resolve the device."""
    if model_name_or_path is not None and not isinstance(model_name_or_path, (str, os.PathLike)):
        raise ValueError(f"model_name_or_path={model_name_or_path!r}; pass None, a directory or a hub id.")
    original = uses_original_code(model_name_or_path)
    attention = check_scale_and_attention(scale, model_name_or_path)
    resolved = resolve_course_device(device)
    check_number("budget_gb", budget_gb, maximum=1000, hint="the card size in GB (10**9 bytes), e.g. 24, 48 or 80")
    if scale == "full" and resolved == "cpu":
        smaller = "scale='small' (an original-code build)" if original else "scale='tiny'"
        raise ValueError(
            f"scale='full' needs a GPU (the FP32 model alone is 32 GiB); use {smaller} on a CPU or device='cuda'."
        )
    BATCH_SIZE.check("batch_size", batch_size, hint="images captioned together")
    if image_size is not None:
        IMAGE_SIZE.check("image_size", image_size, hint="pixels per side, a multiple of 14; None: the model's own")
        if image_size % 14:
            raise ValueError(f"image_size={image_size}; it must be a multiple of the 14 px patch size, e.g. {image_size // 14 * 14 or 14}.")
    if image_size is not None and original:
        raise ValueError(f"image_size={image_size}; the original's own code resizes every image to its 490 px "
                         f"(1225 image tokens): pass image_size=None with an original-code checkpoint.")
    NEW_TOKENS.check("max_new_tokens", max_new_tokens, hint="tokens generated per caption")
    if attn_implementation not in attention:
        why = " (the original's own code has eager attention only)" if original else ""
        raise ValueError(f"attn_implementation={attn_implementation!r}; choose one of {list(attention)}{why}.")
    SEED.check("seed", seed, minimum=0, hint="torch.manual_seed takes it")
    path = check_results_path(results_path)
    torch.manual_seed(seed)
    return CourseParams(
        scale=scale,
        device=resolved,
        budget_gb=float(budget_gb),
        model_name_or_path=None if model_name_or_path is None else os.fspath(model_name_or_path),
        batch_size=batch_size,
        image_size=image_size,
        max_new_tokens=max_new_tokens,
        attn_implementation=attn_implementation,
        seed=seed,
        results_path=path,
    )
