"""Which source an executed notebook came from, so that a stale copy is caught instead of read.

Every executed notebook (the tiny copies in `notebooks/`, the full-scale GPU copies under `results/full-*/`)
carries in its metadata the SHA-256 of the jupytext source it was built from (`notebooks/src/NN-name.py`) and
the parameters it ran with. `stale_copies()` lists the copies whose source has changed since; the test suite
fails on any, naming the command that regenerates them (`rerun_command`); a change to the prose alone is carried into
a copy by `refresh_prose` (`python -m xcomp_lab.tools.refresh_prose`), which keeps its code and outputs and records
the digest it was executed from. `editions()` lists the repository's
executed editions: `results/full-*` (the replica at full scale on a GPU) and `results/original-*` (the original
model's own code: `original-small-cpu` on a CPU, `original-full-h200` on a GPU).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat

METADATA_KEY = "xcomp_lab"
EDITION_PATTERNS = ("full-*", "original-*")  # folders under results/ whose notebooks/ hold an executed edition


def source_digest(source: Path) -> str:
    """SHA-256 of a notebook source file's bytes."""
    return hashlib.sha256(Path(source).read_bytes()).hexdigest()


def stamp(notebook: nbformat.NotebookNode, source: Path, parameters: dict[str, Any]) -> nbformat.NotebookNode:
    """Record in `notebook`'s metadata the digest of `source` and the parameters it ran with; returns it."""
    notebook.metadata[METADATA_KEY] = {"source": f"notebooks/src/{Path(source).name}",
                                       "source_sha256": source_digest(source),
                                       "parameters": {k: v for k, v in parameters.items() if k != "results_path"}}
    return notebook


@dataclass(frozen=True)
class StaleCopy:
    """An executed notebook whose source changed after it ran (or that records no source at all)."""

    notebook: Path
    source: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.notebook}: {self.reason}"


def stale_copies(folder: Path, sources: Path) -> list[StaleCopy]:
    """The executed numbered notebooks in `folder` that were not built from the current files in `sources`."""
    stale = []
    for notebook in sorted(Path(folder).glob("[0-9][0-9]-*.ipynb")):
        source = Path(sources) / f"{notebook.stem}.py"
        recorded = nbformat.read(notebook, as_version=4).metadata.get(METADATA_KEY, {}).get("source_sha256")
        if not source.is_file():
            stale.append(StaleCopy(notebook, source, f"its source {source} no longer exists"))
        elif recorded is None:
            stale.append(StaleCopy(notebook, source, "it records no source digest (run before stamping began)"))
        elif recorded != source_digest(source):
            stale.append(StaleCopy(notebook, source, f"{source.name} changed after it was executed"))
    return stale


def refresh_prose(notebook_path: Path, source: Path) -> bool:
    """Carry a prose-only change of `source` into the executed copy at `notebook_path`: its markdown cells become
    the source's and its digest the source's; its code cells, outputs and parameters stay, and the digest it was
    executed from is kept as `executed_source_sha256`. Returns whether anything changed. Raises ValueError where the
    code cells differ or the cells do not pair one for one (papermill's injected-parameters cell aside): re-execute
    that copy instead (`rerun_command`)."""
    import jupytext

    notebook = nbformat.read(notebook_path, as_version=4)
    recorded = notebook.metadata.get(METADATA_KEY, {})
    if recorded.get("source_sha256") is None:
        raise ValueError(f"{notebook_path} records no source digest, so what it ran from is unknown: re-execute it "
                         f"with `{rerun_command(Path(notebook_path).parent)}`.")
    if recorded["source_sha256"] == source_digest(source):
        return False
    executed = [c for c in notebook.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    current = jupytext.read(source, fmt="py:percent").cells
    kinds = ([c.cell_type for c in executed], [c.cell_type for c in current])
    if kinds[0] != kinds[1]:
        raise ValueError(f"{notebook_path}: its {len(executed)} cells do not pair with the {len(current)} of {source} "
                         f"(a cell was added, removed or changed kind): re-execute it with "
                         f"`{rerun_command(Path(notebook_path).parent)}`.")
    changed_code = [i for i, (a, b) in enumerate(zip(executed, current)) if a.cell_type == "code" and a.source != b.source]
    if changed_code:
        raise ValueError(f"{notebook_path}: code cells {changed_code} (counted from 0, markdown included) differ from "
                         f"{source}; only prose can be carried over: re-execute it with "
                         f"`{rerun_command(Path(notebook_path).parent)}`.")
    for cell, new in zip(executed, current):
        if cell.cell_type == "markdown":
            cell.source = new.source
    recorded.setdefault("executed_source_sha256", recorded.get("source_sha256"))
    recorded["source_sha256"] = source_digest(source)
    nbformat.write(notebook, notebook_path)
    return True


def editions(results: Path) -> list[Path]:
    """The `notebooks/` folders of the executed editions under `results` (see EDITION_PATTERNS) that hold any."""
    found = {folder / "notebooks" for pattern in EDITION_PATTERNS for folder in Path(results).glob(pattern)}
    return sorted(folder for folder in found if any(folder.glob("[0-9][0-9]-*.ipynb")))


def rerun_command(edition: Path) -> str:
    """The course command that re-executes `edition` (its `notebooks/` folder), from the parameters it recorded."""
    recorded: dict[str, Any] = {}
    for notebook in sorted(Path(edition).glob("[0-9][0-9]-*.ipynb")):
        recorded = nbformat.read(notebook, as_version=4).metadata.get(METADATA_KEY, {}).get("parameters", {})
        if recorded:
            break
    scale, device = recorded.get("scale", "full"), recorded.get("device", "cuda")
    model = recorded.get("model_name_or_path")
    checkpoint = f" --model-name-or-path {model}" if model else ""
    return f"python -m xcomp_lab.tools.course --scale {scale} --device {device}{checkpoint} --edition {edition.parent}"
