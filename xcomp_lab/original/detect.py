"""Which checkpoints run the original model's own remote code, and what their process needs before transformers.

One rule, `uses_original_code(model_name_or_path)`: a local checkpoint whose config.json maps its classes to
remote code (`auto_map`) and was written by transformers 4 (`transformers_version`, 4.33.2 for the released
InternLM-XComposer2-VL-7B and for `xcomp_lab.model.original.build_original_checkpoint`'s builds), or the released
model's hub id. The course's replica checkpoints are written by transformers 5 and run in the course's own
environment. The rule reads config.json only and imports no transformers, so both environments apply it alike;
`is_original_model(model)` applies it to a loaded model's config.

`is_build(path)` tells the course's random-weight builds from a download, `original_scale(path)` says which size
such a checkpoint is (a build's own record; a download is the full model), `checkpoint_environment(path)` what a
build needs set before transformers is imported (its hub cache with CLIP).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ORIGINAL_HUB_ID = "internlm/internlm-xcomposer2-vl-7b"
# The attention the original's code has under transformers 4.33.2: eager (its flash-attention 2 path needs the
# flash_attn package and CUDA); passing attn_implementation at all is refused by its constructor.
ORIGINAL_ATTENTION = ("eager",)
FIRST_UNSUPPORTED_MAJOR = 5  # the replica's checkpoints are written by transformers 5; the original's code by 4


def _config(path: Path) -> dict | None:
    file = path / "config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def uses_original_code(model_name_or_path: str | os.PathLike | None) -> bool:
    """True where loading `model_name_or_path` runs remote code written for transformers 4 (the original's)."""
    if model_name_or_path is None:
        return False
    path = Path(model_name_or_path)
    config = _config(path) if path.is_dir() else None
    if config is None:
        return os.fspath(model_name_or_path).strip("/").lower() == ORIGINAL_HUB_ID
    return written_for_original(config)


def written_for_original(config: Mapping[str, Any]) -> bool:
    """The rule on a config's fields: remote code (`auto_map`) written by transformers 4 (`transformers_version`)."""
    written_by = str(config.get("transformers_version") or "")
    major = written_by.split(".")[0]
    return bool(config.get("auto_map")) and major.isdigit() and int(major) < FIRST_UNSUPPORTED_MAJOR


def is_original_model(model: Any) -> bool:
    """True for a model loaded from a checkpoint of the original's code (the same rule on its loaded config)."""
    config = getattr(model, "config", None)
    return config is not None and written_for_original(config.to_dict())


def _build_record(path: Path) -> dict | None:
    from xcomp_lab.model.original import DONE_MARKER

    record = path.parent / DONE_MARKER
    if not record.is_file():
        return None
    return json.loads(record.read_text(encoding="utf-8"))


def is_build(model_name_or_path: str | os.PathLike) -> bool:
    """True for a checkpoint `build_original_checkpoint` made (random weights), False for a download."""
    return _build_record(Path(model_name_or_path)) is not None


def original_scale(model_name_or_path: str | os.PathLike) -> str:
    """"small" or "full": a build's recorded scale; any other original-code checkpoint is the released model."""
    record = _build_record(Path(model_name_or_path))
    return record["scale"] if record else "full"


def checkpoint_environment(model_name_or_path: str | os.PathLike) -> dict[str, str]:
    """Variables to set before transformers 4.33.2 is imported for this checkpoint (none for a download).

    A build of `build_original_checkpoint` keeps CLIP in a hub cache beside it (its `OriginalCheckpoint`), which
    the original's constructor reads offline; a downloaded checkpoint uses the user's own Hugging Face cache.
    """
    path = Path(model_name_or_path)
    record = _build_record(path)
    if record is None:
        return {}
    from xcomp_lab.model.original import OriginalCheckpoint

    return OriginalCheckpoint(path.parent, record["scale"]).environment()
