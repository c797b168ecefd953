"""The instructor guide: the committed file is what the generator makes of the committed inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from xcomp_lab.tools import guide
from xcomp_lab.tools.course import notebooks


def test_committed_guide_is_generated_from_committed_inputs():
    assert guide.GUIDE.read_text() == guide.render_guide(), (
        "docs/instructor-guide.md is stale: run `python -m xcomp_lab.tools.guide` and commit it")


def test_check_flag_agrees():
    assert guide.main(["--check"]) == 0


@pytest.mark.parametrize("notebook", notebooks(), ids=lambda p: p.stem)
def test_every_notebook_has_goals_and_a_measured_time(notebook: Path):
    assert len(guide.GOALS[notebook.name[:2]].goals) >= 2
    text = guide.GUIDE.read_text()
    assert f"### [`{notebook.stem}`](../notebooks/{notebook.name})" in text
    recorded = json.loads(guide.TIMINGS.read_text())
    assert recorded["seconds"][notebook.name] > 0, "run `make guide` to time the new notebook"


def test_recorded_run_names_its_machine():
    recorded = json.loads(guide.TIMINGS.read_text())
    machine = recorded["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and len(machine["load_average_1_5_15_min_at_recording"]) == 3
    assert recorded["software"]["torch"] and recorded["results"]["count"] == len(guide.read_records(guide.TINY_RESULTS))
    assert f"{machine['cores']}-core {machine['cpu']} CPU" in guide.GUIDE.read_text()


def _course_output(tmp_path: Path, seconds: dict[str, float]) -> Path:
    out = tmp_path / "course"
    out.mkdir()
    (out / "timings.json").write_text(json.dumps({"parameters": {"scale": "tiny", "device": "cpu"}, "seconds": seconds}))
    shutil.copyfile(guide.TINY_RESULTS, out / "results.jsonl")
    return out / "timings.json"


def test_record_run_copies_timings_and_results(tmp_path: Path):
    seconds = json.loads(guide.TIMINGS.read_text())["seconds"]
    written = guide.record_run(_course_output(tmp_path, seconds), docs=tmp_path / "docs", note="idle machine")
    recorded = json.loads(written.read_text())
    assert recorded["seconds"] == seconds and recorded["note"] == "idle machine"
    assert recorded["machine"]["cores"] >= 1
    assert (tmp_path / "docs" / guide.TINY_RESULTS.name).read_bytes() == guide.TINY_RESULTS.read_bytes()
    text = guide.render_guide(written, tmp_path / "docs" / guide.TINY_RESULTS.name)
    assert "idle machine" in text and "| **all** |" in text


def test_a_notebook_without_goals_is_refused(tmp_path: Path):
    seconds = {**json.loads(guide.TIMINGS.read_text())["seconds"], "09-new-notebook.ipynb": 1.0}
    written = guide.record_run(_course_output(tmp_path, seconds), docs=tmp_path / "docs")
    with pytest.raises(ValueError, match="No learning goals for \\['09-new-notebook.ipynb'\\]"):
        guide.render_guide(written, guide.TINY_RESULTS)


def test_missing_inputs_say_what_to_run(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="xcomp_lab.tools.course"):
        guide.record_run(tmp_path / "timings.json")
    with pytest.raises(FileNotFoundError, match="xcomp_lab.tools.gpu_run"):
        guide.render_guide(full=tmp_path)
    with pytest.raises(KeyError, match="no-such-step"):
        guide._find(guide.read_records(guide.TINY_RESULTS), "no-such-step")
