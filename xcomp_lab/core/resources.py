"""Where the package finds what it reads at run time, installed or in a checkout.

Two kinds of places:

- **Package data**, shipped inside `xcomp_lab` and found through `importlib.resources` (any install, editable
  or not): the sample scenes (`xcomp_lab/data/samples`), the trained tiny captioner (`xcomp_lab/model/trained`)
  and the instructor guide's template (`xcomp_lab/tools/templates`).
- **The repository root**, for the tools that work on a checkout (the notebooks, `docs/`, `results/`): the
  folder `XCOMP_LAB_ROOT` names, else the nearest folder at or above the current directory that holds
  `notebooks/` and `pyproject.toml` (so notebooks, which run in `notebooks/`, find it too), else the folder
  above an editable install's package.
"""

from __future__ import annotations

import os
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

ROOT_ENV = "XCOMP_LAB_ROOT"


def package_file(package: str, *parts: str) -> Traversable:
    """A file or folder shipped inside the package, e.g. package_file("xcomp_lab.data", "samples")."""
    found = resources.files(package)
    for part in parts:
        found = found / part
    if not found.is_file() and not found.is_dir():
        raise FileNotFoundError(f"{'/'.join(parts)} is missing from the installed package {package}: reinstall "
                                "xcomp-lab (pip install .) so that its package data is included.")
    return found


def _is_root(folder: Path) -> bool:
    return (folder / "notebooks").is_dir() and (folder / "pyproject.toml").is_file()


def repository_root() -> Path:
    """The checkout of xcomp-lab the tools work on (see the module docstring for the search order)."""
    named = os.environ.get(ROOT_ENV)
    if named:
        if not _is_root(Path(named)):
            raise FileNotFoundError(f"{ROOT_ENV}={named!r} is not an xcomp-lab checkout (no notebooks/ and "
                                    "pyproject.toml there): point it at the folder you cloned.")
        return Path(named).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if _is_root(folder):
            return folder
    beside_package = Path(__file__).resolve().parents[2]
    if _is_root(beside_package):
        return beside_package
    raise FileNotFoundError(f"No xcomp-lab checkout at or above {here}: run from inside the repository you "
                            f"cloned, or set {ROOT_ENV} to it.")
