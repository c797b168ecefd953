"""Carry prose-only changes of the notebook sources into executed copies, without running them again.

    python -m xcomp_lab.tools.refresh_prose results/full-h200/notebooks [more folders]

For each numbered copy whose source (`notebooks/src/NN-name.py`) changed since it ran: where only markdown changed,
its markdown cells are replaced with the source's and its stamp moved to the source's digest (the digest it ran
from stays, as `executed_source_sha256`); where code changed, it is named with the command that re-executes it and
the exit status is 1. `tests/test_editions.py` then holds the refreshed copies to the current sources.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from xcomp_lab.core.resources import repository_root
from xcomp_lab.course.editions import refresh_prose, stale_copies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="folders of executed notebooks (an edition's notebooks/)")
    parser.add_argument("--sources", type=Path, default=repository_root() / "notebooks" / "src",
                        help="the jupytext sources (default: the repository's notebooks/src)")
    args = parser.parse_args(argv)
    status = 0
    for folder in args.folders:
        if not folder.is_dir():
            parser.error(f"{folder} is not a folder; give an edition's notebooks/ folder, e.g. results/full-h200/notebooks")
        for stale in stale_copies(folder, args.sources):
            try:
                refresh_prose(stale.notebook, stale.source)
            except (ValueError, FileNotFoundError) as error:
                print(f"not refreshed: {error}")
                status = 1
            else:
                print(f"refreshed: {stale.notebook} (prose of {stale.source.name})")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
