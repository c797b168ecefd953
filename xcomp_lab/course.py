"""Run the whole course: every notebook in order with papermill, then an HTML summary.

    python -m xcomp_lab.course                      # tiny scale on this machine's CPU
    SCALE=full DEVICE=cuda python -m xcomp_lab.course   # the GPU edition (make course SCALE=full DEVICE=cuda)

Executed notebooks, the results file, the charts, per-notebook timings and `summary.html` all land in one
output folder (default `course-output/<scale>-<device>`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import nbformat
import papermill
from nbconvert import HTMLExporter
from tqdm.auto import tqdm

from .params import check_params

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"

# A cell running longer than this fails the run instead of hanging it; at full scale on an H100 no notebook
# took over 2 minutes in all.
CELL_TIMEOUT_S = 900


def notebooks(directory: Path = NOTEBOOKS) -> list[Path]:
    """The numbered notebooks, in course order."""
    found = sorted(p for p in directory.glob("[0-9][0-9]-*.ipynb"))
    if not found:
        raise FileNotFoundError(f"No numbered notebooks in {directory}; run from a checkout of xcomp-lab.")
    return found


def run_course(
    output_dir: str | os.PathLike | None = None,
    *,
    only: list[str] | None = None,
    progress: bool = True,
    **parameters: Any,
) -> Path:
    """Execute the notebooks (all, or those whose names start with one of `only`) and render the summary."""
    params = check_params(**{k: v for k, v in parameters.items() if k != "results_path"})
    out = Path(output_dir or Path("course-output") / f"{params.scale}-{params.device}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    if results_path.exists():
        results_path.unlink()
    selected = [nb for nb in notebooks() if not only or any(nb.name.startswith(prefix) for prefix in only)]
    timings: dict[str, float] = {}
    bar = tqdm(selected, desc="course", unit="notebook", disable=not progress)
    for notebook in bar:
        bar.set_postfix_str(notebook.stem)
        start = time.perf_counter()
        papermill.execute_notebook(
            str(notebook),
            str(out / notebook.name),
            parameters={**parameters, "results_path": str(results_path)},
            cwd=str(notebook.parent),
            kernel_name="python3",
            progress_bar=False,
            execution_timeout=CELL_TIMEOUT_S,
        )
        timings[notebook.name] = round(time.perf_counter() - start, 1)
    (out / "timings.json").write_text(json.dumps({"parameters": params.as_dict(), "seconds": timings}, indent=2))
    render_summary(out, [out / nb.name for nb in selected])
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
    parser.add_argument("--only", nargs="*", default=env.get("ONLY", "").split() or None, help="notebook prefixes, e.g. 00 01")
    args = parser.parse_args(argv)
    out = run_course(
        args.output,
        only=args.only,
        scale=args.scale,
        device=args.device,
        budget_gb=args.budget_gb,
        model_name_or_path=args.model,
    )
    print(f"course written to {out} (summary: {out / 'summary.html'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
