"""Run the whole course: every notebook in order with papermill, then an HTML summary.

    python -m xcomp_lab.tools.course                      # tiny scale on this machine's CPU
    SCALE=full DEVICE=cuda python -m xcomp_lab.tools.course   # the GPU edition (make course SCALE=full DEVICE=cuda)

Executed notebooks, the results file, the charts, per-notebook timings and `summary.html` all land in one
output folder (default `course-output/<scale>-<device>`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import papermill
from nbconvert import HTMLExporter
from tqdm.auto import tqdm

from xcomp_lab.core.resources import repository_root
from xcomp_lab.course.params import check_params

# A cell running longer than this fails the run instead of hanging it; at full scale on an H100 no notebook
# took over 2 minutes in all.
CELL_TIMEOUT_S = 900


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


class CourseFailed(RuntimeError):
    """One or more notebooks failed; the others ran, and the summary shows everything that ran."""

    def __init__(self, failures: list[NotebookFailure], output_dir: Path) -> None:
        self.failures = failures
        self.output_dir = output_dir
        lines = "\n".join(f"- {failure}" for failure in failures)
        super().__init__(f"{len(failures)} notebook(s) failed; summary of what ran: "
                         f"{output_dir / 'summary.html'}\n{lines}")


def run_course(
    output_dir: str | os.PathLike | None = None,
    *,
    only: list[str] | None = None,
    progress: bool = True,
    notebook_dir: str | os.PathLike | None = None,
    **parameters: Any,
) -> Path:
    """Execute the notebooks (all, or those whose names start with one of `only`) and render the summary.

    A notebook that fails does not stop the others: its executed copy (with the error in the failing cell)
    is kept, the summary shows every notebook that ran, and `CourseFailed` is raised at the end.
    """
    params = check_params(**{k: v for k, v in parameters.items() if k != "results_path"})
    out = Path(output_dir or Path("course-output") / f"{params.scale}-{params.device}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    if results_path.exists():
        results_path.unlink()
    selected = [nb for nb in notebooks(notebook_dir) if not only or any(nb.name.startswith(prefix) for prefix in only)]
    timings: dict[str, float] = {}
    failures: list[NotebookFailure] = []
    bar = tqdm(selected, desc="course", unit="notebook", disable=not progress)
    for notebook in bar:
        bar.set_postfix_str(notebook.stem)
        start = time.perf_counter()
        try:
            papermill.execute_notebook(
                str(notebook),
                str(out / notebook.name),
                parameters={**parameters, "results_path": str(results_path)},
                cwd=str(notebook.parent),
                kernel_name="python3",
                progress_bar=False,
                execution_timeout=CELL_TIMEOUT_S,
            )
        except papermill.PapermillExecutionError as error:
            failures.append(NotebookFailure(notebook.name, error.exec_count, f"{error.ename}: {error.evalue}",
                                            out / notebook.name))
            tqdm.write(f"{failures[-1]}", file=sys.stderr)
        timings[notebook.name] = round(time.perf_counter() - start, 1)
    status = {failure.notebook: failure.error for failure in failures}
    (out / "timings.json").write_text(json.dumps(
        {"parameters": params.as_dict(), "seconds": timings, "failed": status}, indent=2))
    render_summary(out, [out / nb.name for nb in selected if (out / nb.name).is_file()])
    if failures:
        raise CourseFailed(failures, out)
    return out


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
    parser.add_argument("--scale", default=env.get("SCALE", "tiny"))
    parser.add_argument("--device", default=env.get("DEVICE", "auto"))
    parser.add_argument("--budget-gb", type=float, default=float(env.get("BUDGET_GB", 48)))
    parser.add_argument("--model", default=env.get("MODEL") or None, help="real weights: a directory or hub id")
    parser.add_argument("--output", default=env.get("OUTPUT") or None)
    parser.add_argument("--notebooks", default=None, help="the folder of numbered notebooks (default: notebooks/)")
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
    except CourseFailed as failed:
        print(f"course FAILED: {failed}", file=sys.stderr)
        return 1
    print(f"course written to {out} (summary: {out / 'summary.html'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
