"""Turn notebooks/src/NN-name.py (jupytext percent format) into notebooks/NN-name.ipynb and execute them.

    python scripts/build_notebooks.py            # every notebook
    python scripts/build_notebooks.py 01 02      # only those prefixes

The executed .ipynb files are what learners open and what nbval compares, so rebuild them after any
change to the package that shows in an output. They run with their default parameters (tiny scale, CPU).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

from xcomp_lab.course.editions import stamp

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def build(source: Path) -> Path:
    notebook = jupytext.read(source, fmt="py:percent")
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.metadata.pop("jupytext", None)
    target = NOTEBOOKS / f"{source.stem}.ipynb"
    start = time.perf_counter()
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    nbformat.write(stamp(notebook, source, {"scale": "tiny", "device": "cpu"}), target)
    print(f"{target.name}: executed in {time.perf_counter() - start:.1f} s")
    return target


def main(prefixes: list[str]) -> None:
    sources = sorted((NOTEBOOKS / "src").glob("[0-9][0-9]-*.py"))
    for source in sources:
        if not prefixes or any(source.name.startswith(p) for p in prefixes):
            build(source)


if __name__ == "__main__":
    main(sys.argv[1:])
