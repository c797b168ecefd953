"""The course run end to end with papermill, twice with different parameters, asserting on the recorded results."""

from __future__ import annotations

from pathlib import Path

import papermill
import pytest

from xcomp_lab.course.results import latest_by_step, read_results
from xcomp_lab.tools.course import notebooks, run_course

FIXES = ("fp32-no-autocast", "fp32-inference-mode", "fp16-half", "fp16", "bf16", "int8", "nf4")


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    out = run_course(tmp_path_factory.mktemp("course-default"), scale="tiny", device="cpu", progress=False)
    return out, latest_by_step(read_results(out / "results.jsonl"))


def test_course_writes_every_executed_notebook_and_a_summary(default_run):
    out, _ = default_run
    for notebook in notebooks():
        assert (out / notebook.name).is_file(), notebook.name
    assert (out / "summary.html").stat().st_size > 10_000
    assert (out / "timings.json").is_file()


def test_fp32_quickstart_runs_out_of_memory_and_every_fix_fits(default_run):
    _, steps = default_run
    assert steps["fp32-quickstart"]["oom"] is True
    for name in FIXES:
        assert steps[name]["oom"] is False, name
        assert steps[name]["peak_bytes"] <= steps[name]["budget_bytes"], name


def test_weight_footprints_order_as_the_dtypes_predict(default_run):
    _, steps = default_run
    weights = {name: steps[name]["weights_bytes"] for name in ("fp32-no-autocast", "fp16", "bf16", "int8", "nf4")}
    assert weights["fp16"] == weights["bf16"]
    assert weights["fp16"] / weights["fp32-no-autocast"] == pytest.approx(0.5, rel=0.05)
    assert weights["fp32-no-autocast"] > weights["fp16"] > weights["int8"] > weights["nf4"]


@pytest.mark.parametrize(
    "parameters, words",
    [
        (dict(scale="huge"), "Unknown scale 'huge'"),
        (dict(device="tpu"), "device='tpu'"),
        (dict(batch_size=0), "batch_size=0"),
        (dict(image_size=100), "multiple of the 14 px patch size"),
    ],
)
def test_bad_parameters_fail_in_the_first_cell_with_a_clear_message(tmp_path: Path, parameters, words):
    first = notebooks()[0]
    with pytest.raises(papermill.PapermillExecutionError, match=words):
        papermill.execute_notebook(
            str(first), str(tmp_path / first.name), parameters=parameters, cwd=str(first.parent), progress_bar=False
        )


def test_quantized_footprints_match_the_analytic_bytes(default_run):
    from xcomp_lab.estimate import weights_only

    _, steps = default_run
    for name, quantization in (("int8", "int8"), ("nf4", "nf4")):
        expected = weights_only("tiny", "float16", quantization)
        assert steps[name]["weights_bytes"] == pytest.approx(expected, rel=0.05), name


def test_eval_alone_saves_nothing_and_no_grad_saves_activations(default_run):
    _, steps = default_run
    train_mode = steps["03-prefill-train-mode"]["peak_bytes"]
    eval_mode = steps["03-prefill-no-grad"]["peak_bytes"]
    assert abs(train_mode - eval_mode) / eval_mode < 0.02  # dropout's own masks, nothing more
    with_grads = steps["03-prefill-grad-enabled"]  # out of memory under the budget, then measured without one
    needed = with_grads["extra"]["unbudgeted_peak_bytes"] - with_grads["weights_bytes"]
    assert with_grads["oom"] is True
    assert needed > 2 * steps["03-prefill-no-grad"]["activations_bytes"]


def write_notebook(path: Path, source: str) -> None:
    import nbformat

    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell("scale = 'tiny'", metadata={"tags": ["parameters"]}),
                      nbformat.v4.new_code_cell(source)]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)


def test_a_failing_notebook_is_named_kept_and_summarised_and_the_rest_still_run(tmp_path: Path, capsys):
    from xcomp_lab.tools.course import CourseFailed, main

    source = tmp_path / "notebooks"
    source.mkdir()
    write_notebook(source / "00-fine.ipynb", "print('first ran')")
    write_notebook(source / "01-broken.ipynb", "raise ValueError('N must be divisible by block_n')")
    write_notebook(source / "02-after.ipynb", "print('third ran')")
    out = tmp_path / "out"
    with pytest.raises(CourseFailed) as failed:
        run_course(out, notebook_dir=source, scale="tiny", device="cpu", progress=False)
    (failure,) = failed.value.failures
    assert failure.notebook == "01-broken.ipynb" and failure.error == "ValueError: N must be divisible by block_n"
    assert "01-broken.ipynb failed in cell [3]" in str(failed.value)  # 1: parameters, 2: papermill's injected ones
    assert "N must be divisible by block_n" in failure.executed_copy.read_text()
    summary = (out / "summary.html").read_text()
    assert "first ran" in summary and "third ran" in summary and "N must be divisible" in summary
    import json

    assert json.loads((out / "timings.json").read_text())["failed"] == {"01-broken.ipynb": failure.error}
    assert main(["--notebooks", str(source), "--output", str(tmp_path / "again"), "--scale", "tiny",
                 "--device", "cpu"]) == 1
    assert "course FAILED" in capsys.readouterr().err
