"""Results records read for a chart: each step's stacked parts, budget, prediction and quality, checked."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from xcomp_lab.course.charts.base import (
    check_budget,
    is_number,
)


@dataclass(frozen=True)
class StepBar:
    """One results record, checked, with the fields the charts use (bytes as ints, None if not measured)."""

    name: str
    weights_bytes: int
    kv_cache_bytes: int
    activations_bytes: int
    peak_bytes: int | None
    budget_bytes: int | None
    oom: bool
    predicted_peak_bytes: int | None
    tokens_per_s: float | None
    quality: float | None

    @property
    def top_bytes(self) -> int | None:
        """The measured peak, else the sum of the parts, else None (nothing measured)."""
        if self.peak_bytes is not None:
            return self.peak_bytes
        parts = self.weights_bytes + self.kv_cache_bytes + self.activations_bytes
        return parts or None

    @property
    def other_bytes(self) -> int:
        """What the peak holds beyond weights, KV cache and activations (memory resident before the step)."""
        if self.peak_bytes is None:
            return 0
        return max(self.peak_bytes - self.weights_bytes - self.kv_cache_bytes - self.activations_bytes, 0)


def record_number(record: Mapping[str, Any], key: str, where: str) -> float | None:
    value = record.get(key)
    if value is None:
        return None
    if not is_number(value) or value < 0:
        raise ValueError(f"{where}: {key} must be a non-negative number or None, got {value!r}: "
                         f"records come from xcomp_lab.course.results.build_record")
    return value


def _quality(record: Mapping[str, Any], key: str, where: str) -> float | None:
    extra = record.get("extra")
    if extra is None:
        return None
    if not isinstance(extra, Mapping):
        raise ValueError(f"{where}: extra must be a dict or None, got {type(extra).__name__}")
    value = extra.get(key)
    if value is None:
        return None
    if not is_number(value) or not 0 <= value <= 1:
        raise ValueError(f"{where}: extra[{key!r}] must be a fraction in [0, 1] (as xcomp_lab.data.quality returns it), "
                         f"got {value!r}")
    return float(value)


def _read_step(record: Any, index: int, quality_key: str | None) -> StepBar:
    if not isinstance(record, Mapping):
        raise ValueError(f"record {index} must be a dict (one results line), got {type(record).__name__}: "
                         f"read records with xcomp_lab.course.results.read_results")
    name = record.get("step")
    if not isinstance(name, str) or not name:
        raise ValueError(f"record {index} needs a non-empty string 'step', got {name!r}")
    where = f"record {index} ({name!r})"
    oom = record.get("oom", False)
    if not isinstance(oom, (bool, np.bool_)):
        raise ValueError(f"{where}: oom must be True or False, got {oom!r}")

    def as_int(key: str) -> int | None:
        value = record_number(record, key, where)
        return None if value is None else int(value)

    return StepBar(
        name=name,
        weights_bytes=as_int("weights_bytes") or 0,
        kv_cache_bytes=as_int("kv_cache_bytes") or 0,
        activations_bytes=as_int("activations_bytes") or 0,
        peak_bytes=as_int("peak_bytes"),
        budget_bytes=as_int("budget_bytes") or None,
        oom=bool(oom),
        predicted_peak_bytes=as_int("predicted_peak_bytes"),
        tokens_per_s=record_number(record, "tokens_per_s", where),
        quality=_quality(record, quality_key, where) if quality_key else None,
    )


def read_step_records(records: Any, quality_key: str | None) -> list[StepBar]:
    if isinstance(records, Mapping) or not isinstance(records, Sequence) or isinstance(records, str):
        raise ValueError(f"records must be a list of result dicts, got {type(records).__name__}: "
                         f"pass read_results(path) or list(latest_by_step(records).values())")
    if not records:
        raise ValueError("records is empty: there is nothing to chart; run a notebook that appends results first")
    return [_read_step(record, index, quality_key) for index, record in enumerate(records)]


def common_budget(steps: list[StepBar], budget_bytes: Any) -> int | None:
    """The explicit budget, else the one budget all records that have one share, else None."""
    explicit = check_budget(budget_bytes)
    if explicit is not None:
        return explicit
    budgets = {s.budget_bytes for s in steps if s.budget_bytes is not None}
    return budgets.pop() if len(budgets) == 1 else None
