"""Notebook 05's report of the two-GPU run: measured per-card peaks against the prediction."""

from __future__ import annotations

from pathlib import Path

import pytest

from xcomp_lab.core.jsonl import read_jsonl
from xcomp_lab.lessons.device_map import split_report


def test_split_report_reads_the_committed_two_gpu_run():
    path = Path(__file__).resolve().parent.parent / "results" / "full-h100x2" / "split.jsonl"
    records = read_jsonl(path)
    lines = split_report(path).splitlines()
    splits = [r for r in records if r["kind"] == "split"]
    assert [line.split(":")[0] for line in lines] == [r["case"] for r in splits]
    for line, r in zip(lines, splits):
        for c in r["cards"].values():
            assert f"x{c['measured_over_predicted']:.3f}" in line
            assert abs(c["measured_over_predicted"] - 1) < 0.03  # the goal, per card
        assert "one card:" in line


def test_split_report_says_how_to_make_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="gpu_split_run --out"):
        split_report(tmp_path / "split.jsonl")
