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
from xcomp_lab.core.units import fmt_bytes
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
    """A copy of the checkout's guide and its inputs (the notebooks' sources among them), which repository_root()
    accepts."""
    root = tmp_path / "checkout"
    shutil.copytree(PATHS.sources, root / "notebooks" / "src")
    (root / "pyproject.toml").write_text("")
    shutil.copytree(PATHS.docs, root / "docs")
    shutil.copytree(PATHS.full, root / "results" / PATHS.full.name)
    shutil.copytree(PATHS.edition, root / "results" / PATHS.edition.name)
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
    seconds = {**json.loads(PATHS.timings.read_text())["seconds"], "99-new-notebook.ipynb": 1.0}
    written = guide.record_run(_course_output(tmp_path, seconds), docs=tmp_path / "docs")
    with pytest.raises(ValueError, match="No learning goals for \\['99-new-notebook.ipynb'\\]"):
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


# ------------------------------------------------------------------------------ agenda, answer key, troubleshooting

# What the answer key's text may spell out in digits, none of it a figure of a run: notebook, step, exercise and
# question numbers, a data type's width, a GPU's index, versions and a pull request, a power of ten; code in
# backticks is not scanned.
ALLOWED_IN_ANSWERS = (
    r"\d+[- ]bits?",
    r"top-1",
    r"GPU \d",
    r"\b0[0-8]\b",
    r"Steps? \d+(-\d+)?",
    r"Exercise \d\.\d",
    r"\(\d\)",
    r"torch \d+\.\d+",
    r"PR #\d+",
    r"10\^9",
)


def _answer_figures(text: str) -> list[str]:
    text = re.sub(r"`[^`]*`", " ", text)
    for allowed in ALLOWED_IN_ANSWERS:
        text = re.sub(allowed, " ", re.sub(r"\{\{.*?\}\}|\{%.*?%\}", " ", text, flags=re.S))
    return re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?!\w)", text)


def test_no_figure_is_typed_into_the_answer_key():
    for prefix, answers in guide.ANSWERS.items():
        for answer in answers:
            for text in (answer.answer, answer.where):
                assert _answer_figures(text) == [], f"notebook {prefix}: compute the figure in guide.py: {text!r}"
    assert _answer_figures("peaked at 17.58 GiB ({{ x | bytes }}) in Step 6 of notebook 04, `x[:, -1:]`") == ["17.58"]


@pytest.mark.parametrize("notebook", notebooks(), ids=lambda p: p.stem)
def test_every_question_of_every_notebook_is_answered_in_the_guide(notebook: Path):
    asked = guide.notebook_questions(PATHS.sources / f"{notebook.stem}.py")
    assert len(asked) >= 2
    text = PATHS.guide.read_text()
    for number, question in enumerate(asked, start=1):
        assert f"{number}. *{question}*" in text


def test_a_question_the_key_does_not_answer_stops_the_guide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = _checkout(tmp_path)
    monkeypatch.setenv("XCOMP_LAB_ROOT", str(root))
    source = root / "notebooks" / "src" / "03-eval-and-no-grad.py"
    asked = guide.notebook_questions(source)
    source.write_text(source.read_text().rstrip("\n") + f" ({len(asked) + 1}) Why is the sky blue?\n")
    with pytest.raises(ValueError, match=r"03-eval-and-no-grad asks questions the answer key does not answer: "
                                         rf"\({len(asked) + 1}\) 'Why is the sky blue\?'. Add an Answer"):
        guide.render_guide(guide.guide_paths())
    source.write_text(source.read_text().replace("what would `.eval()` change there?", "what would `.eval()` do?"))
    with pytest.raises(ValueError, match="does not answer: \\(1\\) 'A model with batch normalization"):
        guide.render_guide(guide.guide_paths())


def test_an_answer_to_a_question_no_notebook_asks_stops_the_guide(monkeypatch: pytest.MonkeyPatch):
    extra = guide.Answer("What is the airspeed of an unladen swallow?", "Ask notebook 09.", "Nowhere.")
    monkeypatch.setitem(guide.ANSWERS, "07", (*guide.ANSWERS["07"], extra))
    with pytest.raises(ValueError, match=r"ANSWERS\['07'\] answers questions 07-memory-forensics no longer asks"):
        guide.guide_context()


def test_the_questions_are_read_in_order_and_their_numbers_checked(tmp_path: Path):
    source = tmp_path / "99-x.py"
    source.write_text("# %% [markdown]\n# **Questions.** (1) Why, with (parentheses) and (32 heads)?\n"
                      "# (2) And how?\n")
    assert guide.notebook_questions(source) == ["Why, with (parentheses) and (32 heads)?", "And how?"]
    source.write_text("# %% [markdown]\n# **Questions.** (1) Why? (3) How?\n")
    with pytest.raises(ValueError, match=r"numbered \[1, 3\]"):
        guide.notebook_questions(source)
    source.write_text("# %% [markdown]\n# The end.\n")
    with pytest.raises(ValueError, match="has no"):
        guide.notebook_questions(source)


def test_each_agenda_adds_up_covers_every_notebook_and_says_its_minutes_are_a_plan(monkeypatch: pytest.MonkeyPatch):
    context = guide.guide_context()
    names = {notebook["name"][:2] for notebook in context["tiny"]["notebooks"]}
    for agenda in guide.AGENDAS:
        assert sum(slot.minutes for slot in agenda.slots) == agenda.minutes
        # every timed notebook has a slot; a notebook newer than the recorded run keeps one, marked untimed
        slotted = {slot.what for slot in agenda.slots if guide.NOTEBOOK_PREFIX.fullmatch(slot.what)}
        assert names <= slotted
        assert {p.name[:2] for p in PATHS.sources.glob("[0-9][0-9]-*.py")} == slotted
        assert f"### {agenda.name}" in PATHS.guide.read_text()
    assert "a teaching plan, not a measurement" in PATHS.guide.read_text()
    short = guide.AGENDAS[0]
    monkeypatch.setattr(guide, "AGENDAS", (dataclasses.replace(short, minutes=short.minutes + 1),))
    with pytest.raises(ValueError, match=f"add up to {short.minutes} minutes, not {short.minutes + 1}"):
        guide.guide_context()
    kept = tuple(slot for slot in short.slots if slot.what != "08")
    monkeypatch.setattr(guide, "AGENDAS", (dataclasses.replace(short, slots=kept,
                                                               minutes=sum(slot.minutes for slot in kept)),))
    with pytest.raises(ValueError, match=r"leaves out notebooks \['08'\]"):
        guide.guide_context()


def _quoted(message: str) -> re.Pattern[str]:
    """A quoted message as a pattern: `…` stands for anything."""
    return re.compile(".*?".join(re.escape(part) for part in message.split("…")), re.S)


def _trouble(key: str) -> guide.Trouble:
    return next(t for t in guide.TROUBLES if t.key == key)


def test_quoted_course_messages_are_what_the_code_raises(tmp_path: Path):
    from xcomp_lab.core.jsonl import read_jsonl as read
    from xcomp_lab.course.params import check_params
    from xcomp_lab.model.bnb_cpu import check_cpu_path
    from xcomp_lab.model.checkpoint import trained_tiny_checkpoint
    from xcomp_lab.model.manifest import verify_checkpoint

    results = tmp_path / "results.jsonl"
    results.write_text('{"step": "fp16"}\n{"step": "fp')
    raised = {}
    for key, call in (("torn-results", lambda: read(results)),
                      ("bad-parameter", lambda: check_params(scale="tiny", device="cpu", batch_size=100_000)),
                      ("bnb-path-value", lambda: check_cpu_path("fast"))):
        with pytest.raises(ValueError) as error:
            call()
        raised[key] = f"ValueError: {error.value}"
    damaged = tmp_path / "checkpoint"
    shutil.copytree(trained_tiny_checkpoint(), damaged, ignore=shutil.ignore_patterns(".xcomp-lab-verified.json"))
    shard = damaged / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(OSError) as error:
        verify_checkpoint(damaged)
    raised["damaged-checkpoint"] = f"{type(error.value).__name__}: {error.value}"
    for key, message in raised.items():
        assert _quoted(_trouble(key).message).fullmatch(message), (key, message)


# Quotes that a test cannot trigger here (no second Python, no full disk, no GPU, no busy port): the parts of each
# that its source spells out must appear in that source (a module, or every .py file of a package).
QUOTED_IN_SOURCE = {
    "python-version": ("pip._internal", ("No matching distribution found for",)),
    "no-space": ("pip._internal", ("Could not install packages due to an OSError",)),
    "bnb-packed": ("bitsandbytes", ("N must be divisible by block_n",)),
    "port-busy": ("jupyter_server.serverapp", ("is already in use, trying another port.",)),
    "small-gpu": ("xcomp_lab.memory.budget", ("usable) is larger than", "choose a smaller budget_gb, at most the card "
                                                                        "you have")),
}


def _source_text(module: str) -> str:
    import importlib.util

    spec = importlib.util.find_spec(module)
    folders = spec.submodule_search_locations
    files = [Path(spec.origin)] if not folders else [p for folder in folders for p in Path(folder).rglob("*.py")]
    return "\n".join(p.read_text(errors="replace") for p in files)


@pytest.mark.parametrize("key", sorted(QUOTED_IN_SOURCE))
def test_quoted_messages_appear_in_their_source(key: str):
    module, fragments = QUOTED_IN_SOURCE[key]
    text, message = _source_text(module), _trouble(key).message
    for fragment in fragments:
        assert fragment in message and fragment in text, (key, fragment)


def test_the_figures_inside_quoted_messages_are_what_the_code_would_print():
    import errno
    import os

    from xcomp_lab.memory.budget import card_bytes

    assert f"[Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}" in _trouble("no-space").message
    assert _trouble("small-gpu").message.startswith(f"ValueError: a 48 GB card ({fmt_bytes(card_bytes(48)[0])} usable)")
    requirements = (PATHS.docs.parent / "requirements.txt").read_text()
    pinned = re.search(r"found for (\S+)", _trouble("python-version").message).group(1)
    assert f"\n{pinned}\n" in requirements


def test_the_missing_module_message_is_pythons(tmp_path: Path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-I", "-S", "-c", "import xcomp_lab"], cwd=tmp_path, capture_output=True,
                          text=True)
    assert done.stderr.strip().splitlines()[-1] == _trouble("no-module").message


def test_the_kernel_died_messages_are_jupyterlabs_and_the_courses():
    import sys

    from xcomp_lab.tools.course import KERNEL_DIED

    static = Path(sys.prefix) / "share" / "jupyter" / "lab" / "static"
    text = "".join(p.read_text(errors="replace") for p in static.rglob("*.js"))
    assert "The kernel for %1 appears to have died. It will restart automatically." in text
    trouble = _trouble("kernel-died")
    assert trouble.message.replace("notebooks/…", "%1") in text and KERNEL_DIED in trouble.source


def test_the_manual_setup_is_the_makefiles():
    makefile = (PATHS.docs.parent / "Makefile").read_text().replace("$(BIN)", ".venv/bin")
    for command in re.findall(r"`(\.venv/bin/python -m pip install [^`]*)`", _trouble("make-missing").fix):
        assert command.replace(".venv/bin/python -m pip install", "") in makefile.replace(
            ".venv/bin/python -m pip install", ""), command


def test_the_widgets_message_is_the_jupyterlab_extensions():
    import sys

    shipped = Path(sys.prefix) / "share" / "jupyter" / "labextensions" / "@jupyter-widgets" / "jupyterlab-manager"
    text = "".join(p.read_text(errors="replace") for p in shipped.rglob("*.js"))
    assert _trouble("widgets").message in text


def test_every_trouble_is_in_the_guide_with_its_fix():
    text = PATHS.guide.read_text()
    for trouble in guide.TROUBLES:
        assert f"**{trouble.symptom}**" in text and trouble.message in text
