"""Run the whole course: every notebook in order with papermill, then an HTML summary.

    python -m xcomp_lab.tools.course                      # tiny scale on this machine's CPU
    SCALE=full DEVICE=cuda python -m xcomp_lab.tools.course   # the GPU edition (make course SCALE=full DEVICE=cuda)
    python -m xcomp_lab.tools.course --scale full --device cuda --edition results/full-h200
                                                          # ... and publish it as the repository's full-scale copies
    python -m xcomp_lab.tools.course --only 03 08 --output DIR   # rerun two notebooks of the course run in DIR
    python -m xcomp_lab.tools.course --model-name-or-path /path/to/internlm-xcomposer2-vl-7b --device cuda
                                                          # real weights (make course MODEL=... DEVICE=cuda)

A checkpoint whose remote code is the original model's own (`xcomp_lab.original.detect.uses_original_code`:
the downloaded InternLM-XComposer2-VL-7B, or a `build_original_checkpoint` build) runs its notebooks in a kernel
of the original's environment (`.venv-original`, `make venv-original`; `xcomp_lab.original.kernel`), at the
checkpoint's own scale unless one is given ("small" for a CPU build, "full" otherwise), into
`course-output/original-<scale>-<device>`; without that environment the command says how to create it.

Executed notebooks, the results file, the charts, per-notebook timings and `summary.html` all land in one
output folder (default `course-output/<scale>-<device>`). Every executed copy records the digest of its
source and its parameters (`course.editions`); `--edition` copies them, the results and the GPUs into a
repository folder, whose copies `tests/test_editions.py` holds to the current sources.

A run of every notebook starts the results file afresh. A rerun of some notebooks (`--only`) replaces only
their records, just before each runs: each record names the notebook that wrote it, and the file is rewritten
atomically and kept in course order, so the later notebooks read what a whole run would give them. A rerun
needs the parameters of the run already in the folder.

A notebook that fails, whose kernel dies or whose cell runs past CELL_TIMEOUT_S is kept with the error in the
cell that stopped, and the others still run. Ctrl-C (or a KeyboardInterrupt in a notebook) marks the running
notebook as interrupted, writes the timings and the summary of what ran, and stops the course.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import papermill
from nbclient.exceptions import CellTimeoutError, DeadKernelError
from nbconvert import HTMLExporter
from papermill.execute import raise_for_execution_errors
from tqdm.auto import tqdm

from xcomp_lab.core.jsonl import set_aside_torn_line
from xcomp_lab.core.machine import gpu_environment
from xcomp_lab.core.resources import repository_root
from xcomp_lab.course.editions import stamp
from xcomp_lab.course.params import CourseParams, check_params, resolve_course_device
from xcomp_lab.course.results import read_results, write_results
from xcomp_lab.original.detect import original_scale, uses_original_code
from xcomp_lab.original.kernel import (
    COURSE_KERNEL,
    Kernel,
    OriginalEnvironmentMissing,
    kernel_for,
)

# A cell running longer than this fails the run instead of hanging it; at full scale on an H100 no notebook
# took over 2 minutes in all.
CELL_TIMEOUT_S = 900
# The notebooks that run a checkpoint of the original model's own code (transformers 4.33.2, `.venv-original`);
# the others still call the replica's internals and are left out of such a run, with a line saying so.
ORIGINAL_NOTEBOOKS = ("00", "01", "02", "03", "04", "05", "06", "07", "08")
RESULTS_NAME = "results.jsonl"
TIMINGS_NAME = "timings.json"
INTERRUPTED = "the course was interrupted while this cell ran; this notebook did not finish and the course stopped"
KERNEL_DIED = ("the notebook's kernel died while this cell ran (killed, e.g. by the out-of-memory killer); "
               "this notebook did not finish")


def notebooks(directory: Path | None = None) -> list[Path]:
    """The numbered notebooks of `directory` (default: the checkout's notebooks/), in course order."""
    directory = repository_root() / "notebooks" if directory is None else Path(directory)
    found = sorted(p for p in directory.glob("[0-9][0-9]-*.ipynb"))
    if not found:
        raise FileNotFoundError(f"No numbered notebooks in {directory}; run from a checkout of xcomp-lab.")
    return found


@dataclass(frozen=True)
class NotebookFailure:
    """A notebook that stopped with an error: which cell, what error, and where its executed copy lies."""

    notebook: str
    cell: int  # execution count of the failing cell
    error: str  # "ExceptionName: message"
    executed_copy: Path

    def __str__(self) -> str:
        return f"{self.notebook} failed in cell [{self.cell}]: {self.error} (executed copy: {self.executed_copy})"


def _failures_message(headline: str, failures: list[NotebookFailure]) -> str:
    return headline + "".join(f"\n- {failure}" for failure in failures)


class CourseFailed(RuntimeError):
    """One or more notebooks failed; the others ran, and the summary shows everything that ran."""

    def __init__(self, failures: list[NotebookFailure], output_dir: Path) -> None:
        self.failures, self.output_dir = failures, output_dir
        super().__init__(_failures_message(f"{len(failures)} notebook(s) failed; summary of what ran: "
                                           f"{output_dir / 'summary.html'}", failures))


class CourseInterrupted(KeyboardInterrupt):
    """The course stopped on Ctrl-C or a KeyboardInterrupt in a notebook, after recording what ran."""

    def __init__(self, failures: list[NotebookFailure], output_dir: Path) -> None:
        self.failures, self.output_dir = failures, output_dir
        super().__init__(_failures_message(f"course interrupted; timings in {output_dir / TIMINGS_NAME}, summary of "
                                           f"what ran: {output_dir / 'summary.html'}", failures))


def select(course: Sequence[Path], only: Sequence[str] | None) -> list[Path]:
    """The notebooks of `course` whose names start with one of `only` (all of them when `only` is empty)."""
    if isinstance(only, str):
        raise ValueError(f"only={only!r}; pass a list of name prefixes, e.g. [{only!r}].")
    if not only:
        return list(course)
    chosen = [nb for nb in course if any(nb.name.startswith(prefix) for prefix in only)]
    if not chosen:
        raise ValueError(f"only={list(only)} matches no notebook; pass name prefixes of "
                         f"{[nb.name for nb in course]}, e.g. '03'.")
    return chosen


def mark_stopped(copy: Path, ename: str, evalue: str) -> None:
    """Record in an executed copy where its notebook stopped without a cell error, then raise papermill's error.

    papermill leaves such a copy looking finished (every cell "completed", no exception): the cell that was
    running gets the error (in the error output the kernel sent, if any), the cells after it go back to "pending",
    and `papermill.PapermillExecutionError` is raised as for a cell that failed, with papermill's markers.
    """
    nb = nbformat.read(copy, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    started = [cell for cell in code if cell.metadata.get("papermill", {}).get("start_time")]
    cell = started[-1] if started else code[0]
    if cell.execution_count is None:  # the count the kernel gives the next cell it runs
        cell.execution_count = 1 + max((c.execution_count or 0 for c in code[:code.index(cell)]), default=0)
    errors = [output for output in cell.outputs if output.output_type == "error"]
    if errors:  # the kernel's own KeyboardInterrupt, from being stopped: its traceback shows the line it was on
        errors[0].ename, errors[0].evalue = ename, evalue
    else:
        cell.outputs.append(nbformat.v4.new_output("error", ename=ename, evalue=evalue,
                                                   traceback=[f"{ename}: {evalue}"]))
    cell.metadata.setdefault("papermill", {}).update(status="failed", exception=True)
    for later in code[code.index(cell) + 1:]:
        later.metadata.setdefault("papermill", {})["status"] = "pending"
    nb.metadata.setdefault("papermill", {})["exception"] = True
    raise_for_execution_errors(nb, str(copy))


def execute(notebook: Path, copy: Path, parameters: dict[str, Any],
            kernel: Kernel | None = None) -> tuple[NotebookFailure | None, bool]:
    """Run one notebook into `copy` with papermill: (how it failed, or None; whether the course was interrupted).

    `kernel` (default: the course's own) names the kernel and the variables under which papermill finds it. An
    interruption before papermill wrote the copy leaves no copy and no failure: the notebook did not run.
    """
    kernel = kernel or Kernel(COURSE_KERNEL)
    saved = {name: os.environ.get(name) for name in kernel.environment}
    os.environ.update(kernel.environment)
    try:
        try:
            papermill.execute_notebook(str(notebook), str(copy), parameters=parameters, cwd=str(notebook.parent),
                                       kernel_name=kernel.name, progress_bar=False, execution_timeout=CELL_TIMEOUT_S)
        except KeyboardInterrupt:
            if not copy.is_file():
                return None, True
            mark_stopped(copy, "KeyboardInterrupt", INTERRUPTED)
        except DeadKernelError:
            mark_stopped(copy, "DeadKernelError", KERNEL_DIED)
        except CellTimeoutError:
            mark_stopped(copy, "CellTimeoutError", f"this cell ran past the course's {CELL_TIMEOUT_S} s limit "
                                                   f"(CELL_TIMEOUT_S); this notebook did not finish")
    except papermill.PapermillExecutionError as error:
        interrupted = error.ename == "KeyboardInterrupt"
        evalue = error.evalue or (INTERRUPTED if interrupted else "")
        return NotebookFailure(notebook.name, error.exec_count, f"{error.ename}: {evalue}", copy), interrupted
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return None, False


def _write_json(path: Path, value: Any) -> None:
    new = path.with_name(f".{path.name}.{os.getpid()}.new")
    new.write_text(json.dumps(value, indent=2), encoding="utf-8")
    os.replace(new, path)


def _settings(parameters: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in parameters.items() if k != "results_path"}


def _earlier_run(out: Path, params: CourseParams) -> tuple[dict[str, float], dict[str, str]]:
    """The seconds and failures a rerun of some notebooks keeps, once the folder's parameters are these."""
    path = out / TIMINGS_NAME
    if not path.is_file():
        return {}, {}
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON ({exc.msg}); run the whole course (without --only) to write it afresh, "
                         f"or pass another output folder.") from None
    before, now = _settings(earlier.get("parameters", {})), _settings(params.as_dict())
    changed = {k: (before.get(k), v) for k, v in now.items() if before.get(k) != v}
    if changed:
        listed = ", ".join(f"{k}={old!r} there, {new!r} here" for k, (old, new) in changed.items())
        raise ValueError(f"{out} holds a course run with other parameters ({listed}); keeping its other notebooks' "
                         f"records would mix the two. Rerun with its parameters, run the whole course (without "
                         f"--only), or pass another output folder.")
    return earlier.get("seconds", {}), earlier.get("failed", {})


def _claim_new_records(results: Path, notebook: str, first: int, order: Sequence[str]) -> None:
    """Name `notebook` in the records it appended (those from index `first` on) and put the file in course order."""
    set_aside_torn_line(results)  # a kernel killed while appending
    records = read_results(results)
    for record in records[first:]:
        record["notebook"] = notebook
    position = {name: index for index, name in enumerate(order)}
    keys, key = [], -1
    for record in records:  # a record naming no course notebook stays after the record before it
        key = position.get(record.get("notebook"), key)
        keys.append(key)
    write_results(results, [records[i] for i in sorted(range(len(records)), key=keys.__getitem__)])


def for_original_code(course: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """(the notebooks of `course` that run a checkpoint of the original's own code, the others): ORIGINAL_NOTEBOOKS."""
    ready = [nb for nb in course if nb.name[:2] in ORIGINAL_NOTEBOOKS]
    return ready, [nb for nb in course if nb not in ready]


def course_scale(scale: str | None, model_name_or_path: str | os.PathLike | None) -> str:
    """The scale to run at: the one given, else an original-code checkpoint's own ("small" or "full"), else tiny."""
    if scale is not None:
        return scale
    return original_scale(model_name_or_path) if uses_original_code(model_name_or_path) else "tiny"


def default_output(scale: str, device: str, model_name_or_path: str | os.PathLike | None) -> Path:
    """`course-output/<scale>-<device>`, `course-output/original-<scale>-<device>` for the original's code."""
    prefix = "original-" if uses_original_code(model_name_or_path) else ""
    return Path("course-output") / f"{prefix}{scale}-{resolve_course_device(device)}"


def run_course(
    output_dir: str | os.PathLike | None = None,
    *,
    only: list[str] | None = None,
    progress: bool = True,
    notebook_dir: str | os.PathLike | None = None,
    scale: str | None = None,
    device: str = "auto",
    **parameters: Any,
) -> Path:
    """Execute the notebooks (all, or those whose names start with one of `only`) and render the summary.

    The other notebooks' records, timings and executed copies in `output_dir` stay (see the module docstring).
    A notebook that fails does not stop the others: its executed copy (with the error in the failing cell)
    is kept, the summary shows every notebook that ran, and `CourseFailed` is raised at the end; an
    interruption raises `CourseInterrupted` (a KeyboardInterrupt) once the timings and summary are written.
    `scale=None` is the checkpoint's own for the original's code, else "tiny"; an original-code checkpoint runs in
    the original's environment's kernel (`original.kernel.kernel_for`), whose absence raises
    `OriginalEnvironmentMissing` saying how to create it.
    """
    if "results_path" in parameters:
        raise ValueError("results_path is chosen by run_course: the notebooks append to <output_dir>/results.jsonl; "
                         "pass output_dir instead.")
    model = parameters.get("model_name_or_path")
    scale = course_scale(scale, model)
    params = check_params(scale=scale, device=device, **parameters,
                          results_path=Path(output_dir or default_output(scale, device, model)).resolve() / RESULTS_NAME)
    out = params.results_path.parent
    results = params.results_path
    kernel = kernel_for(model)
    course = notebooks(notebook_dir)
    if params.original_code:
        course, skipped = for_original_code(course)
        if skipped:
            tqdm.write(f"not run with the original's code (they still use the replica's internals): "
                       f"{', '.join(nb.name for nb in skipped)}", file=sys.stderr)
    selected = select(course, only)
    order = [nb.name for nb in course]
    if len(selected) == len(course):
        seconds, failed = {}, {}
        write_results(results, [])
    else:
        seconds, failed = _earlier_run(out, params)
        set_aside_torn_line(results)
    failures: list[NotebookFailure] = []
    interrupted = False
    bar = tqdm(selected, desc="course", unit="notebook", disable=not progress)
    for notebook in bar:
        bar.set_postfix_str(notebook.stem)
        name, copy = notebook.name, out / notebook.name
        kept = [r for r in (read_results(results) if results.is_file() else []) if r.get("notebook") != name]
        write_results(results, kept)
        copy.unlink(missing_ok=True)
        seconds.pop(name, None)
        failed.pop(name, None)
        start = time.perf_counter()
        try:
            failure, interrupted = execute(notebook, copy, {**parameters, "scale": scale, "device": device,
                                                            "results_path": str(results)}, kernel)
        finally:
            _claim_new_records(results, name, len(kept), order)
        if failure:
            failures.append(failure)
            failed[name] = failure.error
            tqdm.write(f"{failure}", file=sys.stderr)
        if copy.is_file():
            seconds[name] = round(time.perf_counter() - start, 1)
            _stamp_copy(copy, notebook, params)
        _write_json(out / TIMINGS_NAME, {
            "parameters": {**params.as_dict(), "results_path": RESULTS_NAME},
            "seconds": {nb: seconds[nb] for nb in order if nb in seconds},
            "failed": {nb: failed[nb] for nb in order if nb in failed},
        })
        if interrupted:
            break
    bar.close()
    render_summary(out, [out / nb for nb in order if nb in seconds and (out / nb).is_file()])
    if interrupted:
        raise CourseInterrupted(failures, out)
    if failures:
        raise CourseFailed(failures, out)
    return out


def _stamp_copy(copy: Path, notebook: Path, params: CourseParams) -> None:
    """Record the executed copy's source digest and parameters (`course.editions`), when its source is known."""
    source = notebook.parent / "src" / f"{notebook.stem}.py"
    if source.is_file():
        nbformat.write(stamp(nbformat.read(copy, as_version=4), source, params.as_dict()), copy)


def kernel_versions(kernel: Kernel) -> dict[str, Any] | None:
    """The versions a kernel of another environment runs on (`original.environment.versions`), None for ours."""
    if kernel.python is None:
        return None
    probe = "import json; from xcomp_lab.original.environment import versions; print(json.dumps(versions()))"
    done = subprocess.run([os.fspath(kernel.python), "-c", probe], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def publish_edition(out: Path, edition: str | os.PathLike, kernel: Kernel | None = None) -> Path:
    """Copy a course run's executed notebooks, results and timings, with this machine's GPUs, into `edition`.

    `edition` is a folder of the repository such as `results/full-h200` or `results/original-small-cpu`: its
    `notebooks/` are what the static site shows and what `tests/test_editions.py` checks against the sources. A
    run in another environment's kernel records that environment's versions too (`env.json`'s "kernel").
    """
    target = Path(edition)
    (target / "notebooks").mkdir(parents=True, exist_ok=True)
    for old in (target / "notebooks").glob("[0-9][0-9]-*.ipynb"):
        old.unlink()
    for executed in sorted(out.glob("[0-9][0-9]-*.ipynb")):
        shutil.copyfile(executed, target / "notebooks" / executed.name)
    for name in (RESULTS_NAME, TIMINGS_NAME):
        shutil.copyfile(out / name, target / name)
    versions = kernel_versions(kernel or Kernel(COURSE_KERNEL))
    _write_json(target / "env.json", {**gpu_environment(), **({"kernel": versions} if versions else {})})
    return target


def render_summary(out: Path, executed: list[Path]) -> Path:
    """One HTML page with every executed notebook, in order, charts inline."""
    exporter = HTMLExporter()
    exporter.exclude_input_prompt = True
    exporter.exclude_output_prompt = True
    merged = nbformat.v4.new_notebook()
    for path in executed:
        merged.cells.extend(nbformat.read(path, as_version=4).cells)
    merged.metadata = nbformat.read(executed[0], as_version=4).metadata if executed else {}
    body, _ = exporter.from_notebook_node(merged)
    summary = out / "summary.html"
    summary.write_text(body, encoding="utf-8")
    return summary


def main(argv: list[str] | None = None) -> int:
    env = os.environ
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default=env.get("SCALE") or None,
                        help="tiny or full (the replica); small or full (an original-code checkpoint, default its own)")
    parser.add_argument("--device", default=env.get("DEVICE", "auto"))
    parser.add_argument("--budget-gb", type=float, default=float(env.get("BUDGET_GB", 48)))
    parser.add_argument("--model", "--model-name-or-path", dest="model", default=env.get("MODEL") or None,
                        help="real weights: a directory or hub id (the original's own code runs in .venv-original)")
    parser.add_argument("--output", default=env.get("OUTPUT") or None)
    parser.add_argument("--notebooks", default=None, help="the folder of numbered notebooks (default: notebooks/)")
    parser.add_argument("--edition", default=None,
                        help="also publish the executed notebooks, results and GPUs to this folder, e.g. "
                             "results/full-h200 (what the site shows and tests/test_editions.py checks)")
    parser.add_argument("--only", nargs="*", default=env.get("ONLY", "").split() or None, help="notebook prefixes, e.g. 00 01")
    args = parser.parse_args(argv)
    try:
        out = run_course(
            args.output,
            only=args.only,
            notebook_dir=args.notebooks,
            scale=args.scale,
            device=args.device,
            budget_gb=args.budget_gb,
            model_name_or_path=args.model,
        )
    except (ValueError, OriginalEnvironmentMissing) as error:
        print(f"course: {error}", file=sys.stderr)
        return 2
    except CourseFailed as failed:
        print(f"course FAILED: {failed}", file=sys.stderr)
        return 1
    except CourseInterrupted as interrupted:
        print(f"course INTERRUPTED: {interrupted}", file=sys.stderr)
        return 130
    print(f"course written to {out} (summary: {out / 'summary.html'})")
    if args.edition:
        print(f"edition published to {publish_edition(out, args.edition, kernel_for(args.model))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
