"""Which source an executed notebook came from, so that a stale copy is caught instead of read.

Every executed notebook (the tiny copies in `notebooks/`, the full-scale GPU copies under `results/full-*/`)
carries in its metadata the SHA-256 of the jupytext source it was built from (`notebooks/src/NN-name.py`) and
the parameters it ran with. `stale_copies()` lists the copies whose source has changed since; the test suite
fails on any, naming the command that regenerates them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat

METADATA_KEY = "xcomp_lab"


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
