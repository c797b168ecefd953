"""Regenerate the course's sample scenes (xcomp_lab/data/samples/) from their seed: `python -m xcomp_lab.tools.samples`."""

from __future__ import annotations

import sys
from pathlib import Path

import xcomp_lab.data
from xcomp_lab.data.scenes import write_examples

SAMPLES = Path(xcomp_lab.data.__file__).resolve().parent / "samples"


def main(argv: list[str] | None = None) -> int:
    for written_path, text in write_examples(SAMPLES):
        print(f"{written_path}: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
