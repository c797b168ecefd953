"""The instructor guide: the committed file is what the template makes of the committed inputs."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import shutil
from importlib import resources
from pathlib import Path

import jinja2
import pytest

from xcomp_lab.core.jsonl import read_jsonl
from xcomp_lab.tools import guide
from xcomp_lab.tools.course import notebooks

PATHS = guide.guide_paths()

# What the template may spell out in digits, none of it a measurement: notebook numbers, the figures of the
# original issue report (quoted), what a GB is, a data type's width, the windows of a load average, environment
# settings (HF_HUB_OFFLINE=1) and the versions the text names. Digits glued to letters (FP16, INT8, H100) are
# names and not scanned.
ALLOWED_IN_TEMPLATE = (
    r"\b0[0-8]\b",
    r"44(\.16)? GB",
    r"10\^9",
    r"16-bit",
    r"1, 5, 15 min",
    r"\b[A-Z_]+=1\b",
    r"Python 3\.11",
    r"since 2\.6",
)


def _figures(template: str) -> list[str]:
    """The numbers in a template's text, outside its expressions, tags, comments and the allowed phrases."""
    text = re.sub(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", " ", template, flags=re.S)
    for allowed in ALLOWED_IN_TEMPLATE:
        text = re.sub(allowed, " ", text)
    return re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?!\w)", text)


def test_committed_guide_is_generated_from_committed_inputs():
    assert PATHS.guide.read_text() == guide.render_guide(), (
        "docs/instructor-guide.md is stale: run `python -m xcomp_lab.tools.guide` and commit it")


def test_check_flag_agrees():
    assert guide.main(["--check"]) == 0


@pytest.mark.parametrize("notebook", notebooks(), ids=lambda p: p.stem)
def test_every_notebook_has_goals_and_a_measured_time(notebook: Path):
    assert len(guide.GOALS[notebook.name[:2]].goals) >= 2
    text = PATHS.guide.read_text()
    assert f"### [`{notebook.stem}`](../notebooks/{notebook.name})" in text
    recorded = json.loads(PATHS.timings.read_text())
    assert recorded["seconds"][notebook.name] > 0, "run `make guide` to time the new notebook"


def test_recorded_run_names_its_machine():
    recorded = json.loads(PATHS.timings.read_text())
    machine = recorded["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and len(machine["load_average_1_5_15_min_at_recording"]) == 3
    assert recorded["software"]["torch"] and recorded["results"]["count"] == len(read_jsonl(PATHS.tiny_results))
    assert f"{machine['cores']}-core {machine['cpu']} CPU" in PATHS.guide.read_text()


def test_template_is_package_data_found_through_importlib_resources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    shipped = resources.files("xcomp_lab.tools") / "templates" / guide.TEMPLATE
    assert shipped.is_file()
    monkeypatch.chdir(tmp_path)  # outside any checkout: the template does not depend on it
    assert guide.guide_template().filename == str(shipped)
    assert "__file__" not in inspect.getsource(guide), "paths come from repository_root() and importlib.resources"


def test_a_value_missing_from_the_context_fails_loudly():
    lacking_a_figure = guide.guide_context()
    del lacking_a_figure["quick_start"]["allocated"]
    with pytest.raises(jinja2.UndefinedError, match="allocated"):
        guide.guide_template().render(lacking_a_figure)
    lacking_a_section = guide.guide_context()
    del lacking_a_section["estimator"]
    with pytest.raises(jinja2.UndefinedError, match="estimator"):
        guide.guide_template().render(lacking_a_section)


def test_no_figure_is_typed_into_the_template():
    template = (resources.files("xcomp_lab.tools") / "templates" / guide.TEMPLATE).read_text(encoding="utf-8")
    assert _figures(template) == [], "compute the figure in xcomp_lab/tools/guide.py and pass it to the template"
    assert _figures("with one image (1357 prompt tokens), {{ x | fmt('.1f') }} on FP16 (notebook 04)") == ["1357"]


def _checkout(tmp_path: Path) -> Path:
    """A copy of the checkout's guide and its inputs, which repository_root() accepts."""
    root = tmp_path / "checkout"
    (root / "notebooks").mkdir(parents=True)
    (root / "pyproject.toml").write_text("")
    shutil.copytree(PATHS.docs, root / "docs")
    shutil.copytree(PATHS.full, root / "results" / PATHS.full.name)
    shutil.copytree(PATHS.split.parent, root / "results" / PATHS.split.parent.name)
    return root


def test_check_fails_when_the_inputs_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]):
    root = _checkout(tmp_path)
    monkeypatch.setenv("XCOMP_LAB_ROOT", str(root))
    copy = guide.guide_paths()
    assert copy.guide == root / "docs" / "instructor-guide.md"
    assert guide.main(["--check"]) == 0
    recorded = json.loads(copy.timings.read_text())
    recorded["seconds"][sorted(recorded["seconds"])[0]] += 1.0
    copy.timings.write_text(json.dumps(recorded))
    assert guide.main(["--check"]) == 1
    assert "stale" in capsys.readouterr().out
    assert guide.main([]) == 0 and guide.main(["--check"]) == 0
    assert copy.guide.read_text() != PATHS.guide.read_text()


def _course_output(tmp_path: Path, seconds: dict[str, float]) -> Path:
    out = tmp_path / "course"
    out.mkdir()
    run = {"parameters": {"scale": "tiny", "device": "cpu"}, "seconds": seconds}
    (out / "timings.json").write_text(json.dumps(run))
    shutil.copyfile(PATHS.tiny_results, out / "results.jsonl")
    return out / "timings.json"


def test_record_run_copies_timings_and_results(tmp_path: Path):
    seconds = json.loads(PATHS.timings.read_text())["seconds"]
    written = guide.record_run(_course_output(tmp_path, seconds), docs=tmp_path / "docs", note="idle machine")
    recorded = json.loads(written.read_text())
    assert recorded["seconds"] == seconds and recorded["note"] == "idle machine"
    assert recorded["machine"]["cores"] >= 1 and recorded["machine"]["commit"]
    copied = tmp_path / "docs" / PATHS.tiny_results.name
    assert copied.read_bytes() == PATHS.tiny_results.read_bytes()
    text = guide.render_guide(dataclasses.replace(PATHS, timings=written, tiny_results=copied))
    assert "idle machine" in text and "| **all** |" in text


def test_a_notebook_without_goals_is_refused(tmp_path: Path):
    seconds = {**json.loads(PATHS.timings.read_text())["seconds"], "09-new-notebook.ipynb": 1.0}
    written = guide.record_run(_course_output(tmp_path, seconds), docs=tmp_path / "docs")
    with pytest.raises(ValueError, match="No learning goals for \\['09-new-notebook.ipynb'\\]"):
        guide.render_guide(dataclasses.replace(PATHS, timings=written))


def test_missing_inputs_say_what_to_run(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="xcomp_lab.tools.course"):
        guide.record_run(tmp_path / "timings.json")
    with pytest.raises(FileNotFoundError, match="xcomp_lab.tools.gpu_run"):
        guide.render_guide(dataclasses.replace(PATHS, full=tmp_path))
    empty = _course_output(tmp_path, {"00-setup-and-tour.ipynb": 1.0})
    (empty.parent / "results.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no records"):
        guide.record_run(empty, docs=tmp_path / "docs")
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(line + "\n" for line in PATHS.tiny_results.read_text().splitlines()
                             if '"step": "03-prefill-no-grad"' not in line))
    with pytest.raises(KeyError, match="03-prefill-no-grad"):
        guide.render_guide(dataclasses.replace(PATHS, tiny_results=fewer))
