"""One JSON line per measured run, appended to a results file that later notebooks read back.

Fields of a record (`build_record`); byte counts are ints, None where not measured:

- `step`: which experiment this is, e.g. "01-fp32-autocast" (notebooks compare records by step).
- `timestamp`: when the record was built, UTC, ISO 8601.
- `params`: the knobs of the run (dtype, attention, tokens, ...), JSON-serialisable.
- `device`: "cpu" or "cuda:N", from the measurement; `device_name`: the GPU's name, or the CPU's.
- `torch_version`, `transformers_version`: the library versions that ran (transformers None if absent).
- `memory_kind`: "cuda-allocator" (the allocator's own statistics) or "cpu-accounting" (tensor accounting).
- `weights_bytes`, `kv_cache_bytes`, `activations_bytes`, `peak_bytes`: as in `MemoryResult`.
- `budget_bytes`: the budget in force during the measurement, None if none.
- `oom`: whether the run hit the budget or the card; `error`: the error text, None if none.
- `tokens_per_s`: generation speed, None if not timed.
- `caption`: the generated text, None if none.
- `predicted_peak_bytes`: the estimator's prediction for this run, None if not predicted.
- `extra`: anything else worth keeping, a JSON-serialisable dict.

The course command (`python -m xcomp_lab.tools.course`) adds one more field once a notebook has run:
`notebook`, the file name of the notebook that appended the record. A rerun of some notebooks replaces only
their records (`write_results` rewrites the file atomically); records without it are kept.
"""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from xcomp_lab.core.jsonl import append_jsonl, read_jsonl, write_jsonl
from xcomp_lab.memory.measure import MemoryResult

FIELDS = ("step", "timestamp", "params", "device", "device_name", "torch_version", "transformers_version",
          "memory_kind", "weights_bytes", "kv_cache_bytes", "activations_bytes", "peak_bytes", "budget_bytes",
          "oom", "error", "tokens_per_s", "caption", "predicted_peak_bytes", "extra")


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _transformers_version() -> str | None:
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return None


def _check_json(name: str, value: Any) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be JSON-serialisable ({exc}); got {value!r}: "
                         f"convert tensors and dtypes to numbers and strings first") from None


def build_record(step: str, params: dict[str, Any], memory: MemoryResult | None, *,
                 tokens_per_s: float | None = None, caption: str | None = None,
                 predicted_peak_bytes: int | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A results record for one run; see the module docstring for its fields."""
    if not isinstance(step, str) or not step:
        raise ValueError(f"step must be a non-empty string naming the experiment, got {step!r}")
    if not isinstance(params, dict):
        raise ValueError(f"params must be a dict of the run's settings, got {type(params).__name__}")
    if memory is not None and not isinstance(memory, MemoryResult):
        raise ValueError(f"memory must be a MemoryResult (m.result after `with measure(...)`) or None, "
                         f"got {type(memory).__name__}")
    if extra is not None and not isinstance(extra, dict):
        raise ValueError(f"extra must be a dict or None, got {type(extra).__name__}")
    _check_json("params", params)
    _check_json("extra", extra)
    record = {
        "step": step,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "params": params,
        "device": memory.device if memory else None,
        "device_name": _device_name(memory.device) if memory else None,
        "torch_version": torch.__version__,
        "transformers_version": _transformers_version(),
        "memory_kind": memory.kind if memory else None,
        "weights_bytes": memory.weights_bytes if memory else None,
        "kv_cache_bytes": memory.kv_cache_bytes if memory else None,
        "activations_bytes": memory.activations_bytes if memory else None,
        "peak_bytes": memory.peak_bytes if memory else None,
        "budget_bytes": memory.budget_bytes if memory else None,
        "oom": memory.oom if memory else False,
        "error": memory.error if memory else None,
        "tokens_per_s": None if tokens_per_s is None else float(tokens_per_s),
        "caption": caption,
        "predicted_peak_bytes": None if predicted_peak_bytes is None else int(predicted_peak_bytes),
        "extra": extra or {},
    }
    return record


def _check_record(record: Any) -> None:
    if not isinstance(record, dict) or not isinstance(record.get("step"), str):
        raise ValueError(f"record must be a dict with a string 'step' (use build_record), got {record!r:.200}")
    _check_json("record", record)


def append_result(path: str | Path, record: dict[str, Any]) -> None:
    """Append one record as a JSON line, creating the file and its folder if needed.

    A torn last line left by an interrupted write is first moved to `<path>.torn` (see `core.jsonl`).
    """
    _check_record(record)
    append_jsonl(path, record)


def write_results(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Replace the results file with `records`, atomically: readers see the old file or the new one, never half."""
    for record in records:
        _check_record(record)
    write_jsonl(path, records)


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """All records in a results file, in the order they were appended."""
    return read_jsonl(path, what="course results", hint="run the notebooks that append to it first")


def latest_by_step(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last record of each step, keyed by step, in order of first appearance."""
    latest: dict[str, dict[str, Any]] = {}
    for record in records:
        latest[record["step"]] = record
    return latest
