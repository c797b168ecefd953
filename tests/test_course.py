"""The course run end to end with papermill, twice with different parameters, asserting on the recorded results."""

from __future__ import annotations

from pathlib import Path

import papermill
import pytest

from xcomp_lab.course.results import latest_by_step, read_results
from xcomp_lab.tools.course import notebooks, run_course

FIXES = ("fp32-no-autocast", "fp32-inference-mode", "fp16-half", "fp16", "bf16", "int8", "nf4")


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory, course_cpu_path: str) -> tuple[Path, dict[str, dict]]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("XCOMP_LAB_BNB_CPU_PATH", course_cpu_path)  # the notebooks' kernels inherit it
        out = run_course(tmp_path_factory.mktemp("course-default"), scale="tiny", device="cpu", progress=False)
    return out, latest_by_step(read_results(out / "results.jsonl"))


def test_the_course_ran_on_the_bitsandbytes_cpu_path_asked_for(default_run, course_cpu_path):
    import nbformat

    out, _ = default_run
    text = "".join(output.get("text", "") for cell in nbformat.read(out / "06-int8-and-4bit.ipynb", as_version=4).cells
                   if cell.cell_type == "code" for output in cell.get("outputs", []))
    assert f"bitsandbytes CPU path '{course_cpu_path}'" in text


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
        (dict(results_path="/proc/x.jsonl"), r"results_path='/proc/x.jsonl' cannot be written"),
    ],
)
def test_bad_parameters_fail_in_start_with_a_clear_message(parameters, words):
    """Every notebook's first cell passes its parameters to `start()`, which checks them before anything runs."""
    from xcomp_lab.course.notebook import start

    with pytest.raises(ValueError, match=words):
        start(**parameters)


def test_a_bad_parameter_fails_the_notebooks_first_cell(tmp_path: Path):
    """The same check seen through papermill: the run stops in the first cell with `start()`'s message (one case;
    the others are checked on `start()` itself above, without a kernel each)."""
    first = notebooks()[0]
    with pytest.raises(papermill.PapermillExecutionError, match="Unknown scale 'huge'") as failure:
        papermill.execute_notebook(str(first), str(tmp_path / first.name), parameters=dict(scale="huge"),
                                   cwd=str(first.parent), progress_bar=False)
    # executed third, after the parameters and papermill's injected parameters: the first cell of the lesson
    assert failure.value.exec_count == 3 and "params = start(" in failure.value.source


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


def course_notebook(path: Path, *sources: str) -> None:
    """A numbered notebook with the course's parameters cell (scale, results_path) and `sources` as code cells."""
    import nbformat

    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell("scale = 'tiny'\nresults_path = 'results.jsonl'",
                                                metadata={"tags": ["parameters"]}),
                      *(nbformat.v4.new_code_cell(source) for source in sources)]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)


def appends(*steps: str) -> str:
    return ("from xcomp_lab.core.jsonl import append_jsonl\n"
            + "".join(f"append_jsonl(results_path, {{'step': {step!r}}})\n" for step in steps))


READS = ("from xcomp_lab.core.jsonl import read_jsonl\n"
         "print('steps read:', ' '.join(r['step'] for r in read_jsonl(results_path)))")


def steps_and_notebooks(out: Path) -> list[tuple[str, str]]:
    return [(r["step"], r.get("notebook")) for r in read_results(out / "results.jsonl")]


def test_rerunning_some_notebooks_replaces_only_their_records_in_course_order(tmp_path: Path, capsys):
    import json

    from xcomp_lab.tools.course import main

    source, out = tmp_path / "notebooks", tmp_path / "out"
    source.mkdir()
    course_notebook(source / "00-a.ipynb", appends("a"))
    course_notebook(source / "01-b.ipynb", appends("b1", "b2"))
    course_notebook(source / "02-c.ipynb", READS, appends("c"))
    settings = dict(notebook_dir=source, scale="tiny", device="cpu", progress=False)
    run_course(out, **settings)
    assert steps_and_notebooks(out) == [("a", "00-a.ipynb"), ("b1", "01-b.ipynb"), ("b2", "01-b.ipynb"),
                                        ("c", "02-c.ipynb")]
    course_notebook(source / "01-b.ipynb", appends("b-new"))
    run_course(out, only=["01"], **settings)
    assert steps_and_notebooks(out) == [("a", "00-a.ipynb"), ("b-new", "01-b.ipynb"), ("c", "02-c.ipynb")]
    assert main(["--only", "02", "--output", str(out), "--notebooks", str(source), "--scale", "tiny",
                 "--device", "cpu"]) == 0
    assert "steps read: a b-new" in (out / "02-c.ipynb").read_text()  # 02 read the others' records, not its own
    assert steps_and_notebooks(out)[-1] == ("c", "02-c.ipynb") and len(steps_and_notebooks(out)) == 3
    timings = json.loads((out / "timings.json").read_text())
    assert list(timings["seconds"]) == ["00-a.ipynb", "01-b.ipynb", "02-c.ipynb"] and timings["failed"] == {}
    summary = (out / "summary.html").read_text()
    assert "b-new" in summary and "steps read: a b-new" in summary
    assert main(["--only", "02", "--output", str(out), "--notebooks", str(source), "--scale", "tiny",
                 "--device", "cpu", "--budget-gb", "24"]) == 2
    assert "budget_gb=48.0 there, 24.0 here" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"only=\['99'\] matches no notebook"):
        run_course(out, only=["99"], **settings)


def test_an_interrupted_course_records_the_notebook_writes_the_summary_and_reraises(tmp_path: Path):
    import json
    import signal

    source, out = tmp_path / "notebooks", tmp_path / "out"
    source.mkdir()
    course_notebook(source / "00-fine.ipynb", appends("fine"))
    ctrl_c = ("import os, signal, time\n"  # what Ctrl-C in the terminal does: SIGINT to the course, not the kernel
              "os.kill(int(os.environ['JPY_PARENT_PID']), signal.SIGINT)\n"
              "time.sleep(60)")
    course_notebook(source / "01-stopped.ipynb", appends("half"), ctrl_c, appends("never"))
    course_notebook(source / "02-not-reached.ipynb", appends("not reached"))
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt) as stopped:
            run_course(out, notebook_dir=source, scale="tiny", device="cpu", progress=False)
    finally:
        signal.signal(signal.SIGINT, handler)
    (failure,) = stopped.value.failures
    assert failure.notebook == "01-stopped.ipynb" and failure.cell == 4  # 1 parameters, 2 injected, 3 appends
    assert failure.error.startswith("KeyboardInterrupt: the course was interrupted while this cell ran")
    timings = json.loads((out / "timings.json").read_text())
    assert timings["failed"] == {"01-stopped.ipynb": failure.error}
    assert list(timings["seconds"]) == ["00-fine.ipynb", "01-stopped.ipynb"]
    import nbformat

    copy = nbformat.read(out / "01-stopped.ipynb", as_version=4)
    assert copy.metadata.papermill.exception is True
    stopped_cell = next(c for c in copy.cells if "SIGINT" in c.source)
    assert stopped_cell.metadata.papermill.status == "failed" and stopped_cell.outputs[-1].ename == "KeyboardInterrupt"
    assert "interrupted" in (out / "summary.html").read_text()
    assert not (out / "02-not-reached.ipynb").exists()
    assert steps_and_notebooks(out) == [("fine", "00-fine.ipynb"), ("half", "01-stopped.ipynb")]


def test_a_keyboard_interrupt_in_a_notebook_stops_the_course(tmp_path: Path, capsys):
    import json

    from xcomp_lab.tools.course import main

    source, out = tmp_path / "notebooks", tmp_path / "out"
    source.mkdir()
    course_notebook(source / "00-stopped.ipynb", "raise KeyboardInterrupt")
    course_notebook(source / "01-not-reached.ipynb", "print('ran')")
    with pytest.raises(KeyboardInterrupt):
        run_course(out, notebook_dir=source, scale="tiny", device="cpu", progress=False)
    failed = json.loads((out / "timings.json").read_text())["failed"]
    assert failed["00-stopped.ipynb"].startswith("KeyboardInterrupt: the course was interrupted")
    assert not (out / "01-not-reached.ipynb").exists() and (out / "summary.html").is_file()
    assert main(["--notebooks", str(source), "--output", str(tmp_path / "again"), "--scale", "tiny",
                 "--device", "cpu"]) == 130
    assert "course INTERRUPTED: course interrupted; timings in" in capsys.readouterr().err


def test_a_killed_kernel_or_a_cell_past_the_timeout_fails_its_notebook_and_the_rest_run(tmp_path: Path, monkeypatch):
    import json

    import nbformat

    from xcomp_lab.tools import course
    from xcomp_lab.tools.course import CourseFailed

    monkeypatch.setattr(course, "CELL_TIMEOUT_S", 3)
    source, out = tmp_path / "notebooks", tmp_path / "out"
    source.mkdir()
    course_notebook(source / "00-killed.ipynb", appends("before the kill"),
                    "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    course_notebook(source / "01-slow.ipynb", "import time\ntime.sleep(60)")
    course_notebook(source / "02-after.ipynb", appends("after"))
    with pytest.raises(CourseFailed) as failed:
        run_course(out, notebook_dir=source, scale="tiny", device="cpu", progress=False)
    killed, slow = failed.value.failures
    assert (killed.notebook, killed.cell) == ("00-killed.ipynb", 4)
    assert killed.error.startswith("DeadKernelError: the notebook's kernel died while this cell ran")
    assert slow.notebook == "01-slow.ipynb" and slow.error.startswith("CellTimeoutError: this cell ran past the "
                                                                      "course's 3 s limit")
    assert json.loads((out / "timings.json").read_text())["failed"] == {killed.notebook: killed.error,
                                                                        slow.notebook: slow.error}
    for failure in (killed, slow):
        assert nbformat.read(failure.executed_copy, as_version=4).metadata.papermill.exception is True
    assert steps_and_notebooks(out) == [("before the kill", "00-killed.ipynb"), ("after", "02-after.ipynb")]


def test_executed_copies_record_their_source_and_an_edition_publishes_them(tmp_path: Path):
    import nbformat

    from xcomp_lab.course.editions import METADATA_KEY, source_digest, stale_copies
    from xcomp_lab.tools.course import publish_edition

    source = tmp_path / "notebooks"
    (source / "src").mkdir(parents=True)
    write_notebook(source / "00-fine.ipynb", "print('ran')")
    (source / "src" / "00-fine.py").write_text("# %%\nprint('ran')\n")
    out = run_course(tmp_path / "out", notebook_dir=source, scale="tiny", device="cpu", progress=False)
    recorded = nbformat.read(out / "00-fine.ipynb", as_version=4).metadata[METADATA_KEY]
    assert recorded["source_sha256"] == source_digest(source / "src" / "00-fine.py")
    assert recorded["parameters"]["scale"] == "tiny" and "results_path" not in recorded["parameters"]
    edition = publish_edition(out, tmp_path / "results" / "full-demo")
    assert stale_copies(edition / "notebooks", source / "src") == []
    assert (edition / "results.jsonl").is_file() and (edition / "env.json").is_file()
    (source / "src" / "00-fine.py").write_text("# %%\nprint('changed')\n")
    assert len(stale_copies(edition / "notebooks", source / "src")) == 1
