"""The predict-then-measure exercises: comparison maths, the skip path, bad inputs, hidden solutions, and their
place in every notebook."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import jupytext
import nbformat
import pytest

from xcomp_lab.core.units import GIB, MIB
from xcomp_lab.course.exercises import EXERCISES, UNITS, Exercise, check, parse_prediction
from xcomp_lab.memory import MemoryResult

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
SOURCES = sorted((NOTEBOOKS / "src").glob("[0-9][0-9]-*.py"))
FULL_PARAMS = 8_666_840_064
FULL_FP32 = 35_744_350_208  # parameters x 4 + 1 GiB of rotary tables, as notebook 00 counts them


def memory(weights: int, kv: int, activations: int, *, start: int | None = None, oom: bool = False) -> MemoryResult:
    """A MemoryResult with the fields the worked solutions read."""
    start = weights if start is None else start
    return MemoryResult(device="cpu", kind="cpu-accounting", label="test", start_bytes=start,
                        peak_bytes=weights + kv + activations, end_bytes=start, reserved_peak_bytes=None,
                        weights_bytes=weights, kv_cache_bytes=kv, activations_bytes=activations, budget_bytes=None,
                        wall_s=0.0, oom=oom, error="OOM" if oom else None)


# Figures in the shape each notebook passes them, with the tiny run's values.
FIGURES = {
    "0.1": (FULL_FP32, dict(n_params=FULL_PARAMS)),
    "1.1": (7.71 / 18.34, dict(extra_bytes=int(7.71 * MIB), copies_bytes=int(8.65 * MIB), weights_bytes=int(18.34 * MIB))),
    "2.1": (12.03 / 22.86, dict(fp32=memory(int(19.35 * MIB), 432_128, int(3.10 * MIB)),
                                fp16=memory(int(9.67 * MIB), 216_064, int(2.15 * MIB)))),
    "3.1": (41.67 / 22.09, dict(enabled=memory(int(19.35 * MIB), 0, int(22.32 * MIB)),
                                no_grad=memory(int(19.35 * MIB), 0, int(2.74 * MIB)))),
    "3.2": (24.46 / 22.86, dict(graph_bytes=int(1.61 * MIB), no_grad_peak_bytes=int(22.86 * MIB))),
    "4.1": (18.87 / 12.03, dict(one=memory(int(9.67 * MIB), 200_704, int(2.16 * MIB)),
                                four=memory(int(9.67 * MIB), 802_816, int(8.43 * MIB)))),
    "4.2": (11.0, dict(short_tokens=196, long_tokens=708)),
    "5.1": (6.14 / 9.67, dict(reference_bytes=int(9.67 * MIB), offloaded_bytes=int(3.78 * MIB),
                              kept_buffer_bytes=256 * 1024, layers=2, of_layers=4)),
    "6.1": (5.77 / 9.67, dict(fp16_bytes=int(9.67 * MIB), predicted_bytes=int(5.77 * MIB), stats_bytes=98_509)),
    "7.1": (1_204_224, dict(batch=1, tokens=196, vocab=1024)),
    "8.1": (6, dict(peaks={1: int(12.03 * MIB), 2: int(14.31 * MIB), 6: int(23.43 * MIB), 7: int(25.71 * MIB)},
                    budget_bytes=int(25.40 * MIB))),
    "9.1": (3, dict(peaks={1: 22 * MIB, 2: 42 * MIB, 3: 62 * MIB, 4: 82 * MIB}, budget_bytes=66 * MIB, card="L40S")),
}


# ----------------------------------------------------------------------------------------- the comparison maths

def test_the_brief_example_reads_as_promised(capsys):
    answer = check("0.1", 14.0, measured=13.4 * GIB, n_params=FULL_PARAMS)
    expected = ("Exercise 0.1, the full model's FP32 footprint: your prediction 14.00 GiB | measured 13.40 GiB | "
                "x1.04: within 10%, well done.")
    assert capsys.readouterr().out == expected + "\n"
    assert answer.line() == expected
    assert answer.factor == pytest.approx(14.0 / 13.4)


@pytest.mark.parametrize("prediction, verdict", [
    (0.5, "x1.00: within 10%, well done."),
    (0.55, "x1.10: within 10%, well done."),  # the edge counts as inside
    (0.45, "x0.90: within 10%, well done."),
    (0.6, "x1.20: within 25%, close"),
    (0.4, "x0.80: within 25%, close"),
    (0.75, "x1.50: too high. Hint: the weights are most of the peak"),
    (0.2, "x0.40: too low. Hint: the weights halve, but not everything"),
    (0, "x0.00: too low."),
])
def test_verdict_bands_follow_the_factor(capsys, prediction, verdict):
    measured, figures = FIGURES["2.1"]
    answer = check("2.1", prediction, measured=0.5, **figures)
    assert answer.verdict().startswith(verdict)
    assert f"your prediction {prediction:.3g} | measured 0.5 | {verdict}" in capsys.readouterr().out


def test_a_lower_bound_accepts_any_prediction_at_or_above_it(capsys):
    _, figures = FIGURES["3.1"]
    above = check("3.1", 3.0, measured=1.9, lower_bound=True, **figures)
    below = check("3.1", 1.2, measured=1.9, lower_bound=True, **figures)
    assert "measured at least 1.9" in above.line() and "consistent" in above.verdict()
    assert "too low" in below.verdict()


def test_a_measured_zero_is_matched_only_by_zero(capsys):
    _, figures = FIGURES["2.1"]
    assert check("2.1", 0, measured=0, **figures).verdict() == "exactly right, well done."
    assert check("2.1", 0.1, measured=0, **figures).verdict().startswith("too high")


def test_sizes_convert_between_units(capsys):
    assert parse_prediction("9 MiB", "GiB") == pytest.approx(9 / 1024)
    assert parse_prediction("2048 KiB", "MiB") == pytest.approx(2.0)
    assert parse_prediction(1.5, "MiB") == 1.5
    answer = check("7.1", "1.2 MiB", measured=1_204_224, batch=1, tokens=196, vocab=1024)
    assert answer.prediction == pytest.approx(1.2)
    assert "your prediction 1.20 MiB | measured 1.15 MiB | x1.04" in answer.line()
    small = check("7.1", "20 KiB", measured=1_204_224, batch=1, tokens=196, vocab=1024)
    assert "your prediction 0.0195 MiB | measured 1.15 MiB" in small.line()  # shown in the unit asked for


def test_a_count_prints_whole_images_and_the_planner_as_its_source(capsys):
    measured, figures = FIGURES["8.1"]
    answer = check("8.1", 5, measured=measured, source="planner", **figures)
    assert "your prediction 5 images | planner 6 images | x0.83: within 25%" in answer.line()


# ------------------------------------------------------------------------------------------------ the skip path

@pytest.mark.parametrize("key", list(EXERCISES))
def test_no_prediction_prints_one_fixed_line(capsys, key):
    measured, figures = FIGURES[key]
    for value in (measured, measured * 3.7):
        answer = check(key, None, measured=value, **figures)
        assert answer.skipped and answer.factor is None
    ex = EXERCISES[key]
    line = f"Exercise {key} skipped: set {ex.variable} above and rerun this cell.\n"
    assert capsys.readouterr().out == line * 2  # the same whatever was measured: nbval compares it
    assert not re.search(r"\d", line.replace(key, "").replace(ex.variable, ""))


# ------------------------------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("key, prediction, error, words", [
    ("2.1", "0.5", TypeError, ["'0.5' is text", "plain number"]),
    ("2.1", True, TypeError, ["True is a bool, not a number", "0.5"]),
    ("2.1", [0.5], TypeError, ["is a list"]),
    ("2.1", -0.5, ValueError, ["-0.5 is negative"]),
    ("2.1", float("nan"), ValueError, ["not a finite number"]),
    ("0.1", "14 GB", ValueError, ["decimal unit", "GiB", "13"]),
    ("0.1", "14 parsecs", ValueError, ["unknown unit 'parsecs'", "'GiB'"]),
    ("0.1", "fourteen", ValueError, ["number and a unit", "'9.5 MiB'"]),
    ("0.1", "-3 GiB", ValueError, ["negative"]),
    ("8.1", 5.5, ValueError, ["whole number of images", "5"]),
    ("8.1", "5", TypeError, ["whole number of images"]),
    ("9.1", 2.5, ValueError, ["whole number of prompts", "2"]),
])
def test_bad_predictions_say_what_was_given_and_what_to_do(capsys, key, prediction, error, words):
    measured, figures = FIGURES[key]
    with pytest.raises(error) as raised:
        check(key, prediction, measured=measured, **figures)
    message = str(raised.value)
    assert EXERCISES[key].variable in message
    for word in words:
        assert word in message
    assert capsys.readouterr().out == ""


def test_bad_calls_say_what_is_allowed():
    measured, figures = FIGURES["2.1"]
    with pytest.raises(KeyError, match=r"'9\.9' does not exist.*'0\.1'"):
        check("9.9", 0.5, measured=measured)
    with pytest.raises(ValueError, match="measured=-1 is negative"):
        check("2.1", 0.5, measured=-1, **figures)
    with pytest.raises(TypeError, match="measured='big'"):
        check("2.1", 0.5, measured="big", **figures)
    with pytest.raises(TypeError, match=r"needs the figures \['fp32', 'fp16'\] of this run; got \['fp32'\]"):
        check("2.1", 0.5, measured=measured, fp32=figures["fp32"])
    with pytest.raises(TypeError, match="lower_bound='yes'"):
        check("2.1", 0.5, measured=measured, lower_bound="yes", **figures)
    with pytest.raises(ValueError, match="unit='GB'"):
        parse_prediction(1, "GB")
    with pytest.raises(ValueError, match="unit='percent' for exercise 9.1"):
        Exercise("9.1", "my_x", "x", "percent", "low", "high", lambda measured: "")


# ------------------------------------------------------------------------------------ solutions, hidden until asked

def test_the_solution_is_hidden_until_asked(capsys):
    answer = check("0.1", 32.0, measured=FULL_FP32, n_params=FULL_PARAMS)
    shown = capsys.readouterr().out
    assert "rotary" not in shown and "rotary" not in repr(answer)
    answer.solution()
    solution = capsys.readouterr().out
    assert "8,666,840,064 parameters x 4 bytes (FP32) = 32.29 GiB" in solution
    assert "rotary cos/sin tables every decoder layer keeps, 1.00 GiB" in solution  # computed from the figures
    assert solution.rstrip().endswith("Your prediction: 32.00 GiB.")


def test_a_skipped_exercise_still_shows_its_solution_when_asked(capsys):
    answer = check("0.1", None, measured=FULL_FP32, n_params=FULL_PARAMS)
    answer.solution()
    out = capsys.readouterr().out
    assert "Parameters + buffers = 33.29 GiB" in out and "Your prediction" not in out


@pytest.mark.parametrize("key", list(EXERCISES))
def test_every_solution_is_worked_from_the_run_figures(capsys, key):
    measured, figures = FIGURES[key]
    answer = check(key, None, measured=measured, **figures)
    capsys.readouterr()
    answer.solution()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"Exercise {key}, ") and lines[0].endswith("worked solution with this run's figures")
    assert len(lines) >= 3 and all(line.startswith("- ") for line in lines[1:])


@pytest.mark.parametrize("key, figure", [
    ("2.1", "x0.50 (9.67 MiB)"),  # the weights halve
    ("4.1", "far from x4"),
    ("4.2", "x3.61"),  # 708 / 196 tokens
    ("5.1", "= 6.14 MiB = x0.63 the reference"),  # 9.67 - 3.78 + 0.25
    ("6.1", "= 5.77 MiB = x0.60 FP16's weights"),
    ("7.1", "Together 6 bytes per logit: 1.15 MiB; measured 1.15 MiB (x1.00)"),
    ("8.1", "= 5.9 more images: about 6 in all"),  # (25.40 - 12.03) / (14.31 - 12.03)
    ("9.1", "= 2.2 more prompts: about 3 in all"),  # (66 - 22) / (42 - 22)
])
def test_solutions_compute_the_right_figures(capsys, key, figure):
    measured, figures = FIGURES[key]
    check(key, None, measured=measured, **figures).solution()
    assert figure in capsys.readouterr().out


def test_int8_solution_splits_the_bytes_as_the_prediction_does(capsys):
    # 1 MiB of linears (FP16) becomes 512 KiB + 4 KiB of scales; 3 MiB of other tensors stay.
    fp16, stats = 4 * MIB, 4096
    check("6.1", None, measured=0.0, fp16_bytes=fp16, predicted_bytes=3 * MIB + MIB // 2 + stats,
          stats_bytes=stats).solution()
    out = capsys.readouterr().out
    assert "Their weights hold 1.00 MiB in FP16, 25% of FP16's 4.00 MiB" in out
    assert "Everything else keeps its 16 bits, 3.00 MiB" in out


# ----------------------------------------------------------------------------------------------- the batch search

# ------------------------------------------------------------------------------------------- in every notebook

def test_the_registry_is_consistent():
    assert list(EXERCISES) == sorted(EXERCISES, key=lambda k: tuple(map(int, k.split("."))))
    prefixes = {source.name[:2] for source in SOURCES}
    for key, ex in EXERCISES.items():
        assert ex.key == key and ex.unit in UNITS and ex.notebook in prefixes
        assert ex.variable.startswith("my_") and ex.variable.isidentifier()
    assert len({ex.variable for ex in EXERCISES.values()}) == len(EXERCISES)


def _cells(source: Path) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in jupytext.read(source, fmt="py:percent").cells]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name[:2])
def test_every_notebook_asks_before_it_measures_and_answers_after(source):
    mine = [ex for ex in EXERCISES.values() if ex.notebook == source.name[:2]]
    assert mine, f"{source.name} has no exercise"
    cells = _cells(source)
    for ex in mine:
        setup = [i for i, (kind, text) in enumerate(cells) if kind == "markdown" and f"**Exercise {ex.key}:" in text]
        ask = [i for i, (kind, text) in enumerate(cells) if kind == "code" and re.match(rf"{ex.variable} = None\b", text)]
        answer = [i for i, (kind, text) in enumerate(cells) if kind == "code" and f'check("{ex.key}", {ex.variable},' in text]
        assert len(setup) == len(ask) == len(answer) == 1, (ex.key, setup, ask, answer)
        assert setup[0] + 1 == ask[0] < answer[0] - 1, f"exercise {ex.key}: a measurement must sit between ask and answer"
        assert ex.variable in cells[setup[0]][1] and f"answer_{ex.key.replace('.', '_')}.solution()" in cells[setup[0]][1]
        ask_code = ast.parse(cells[ask[0]][1]).body
        assert len(ask_code) == 1, f"the prediction cell of {ex.key} holds only the assignment"
        calls = [n for n in ast.parse(cells[answer[0]][1]).body if not isinstance(n, ast.ImportFrom)]
        assert len(calls) == 1, f"the answer cell of {ex.key} makes one call"


def test_every_check_in_the_notebooks_is_a_registered_exercise():
    used = {key for source in SOURCES for key in re.findall(r'check\("([0-9.]+)"', source.read_text())}
    assert used == set(EXERCISES)


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name[:2])
def test_executed_notebooks_show_each_skip_line(source):
    executed = NOTEBOOKS / f"{source.stem}.ipynb"
    outputs = "".join(output.get("text", "") for cell in nbformat.read(executed, as_version=4).cells
                      for output in cell.get("outputs", []))
    for ex in EXERCISES.values():
        if ex.notebook == source.name[:2]:
            assert ex.skip_line in outputs, f"rebuild {executed.name}: python scripts/build_notebooks.py {ex.notebook}"
