"""JSON-lines files (one JSON object a line): the one reader and the one appender the package uses."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_jsonl(path: str | os.PathLike, *, what: str = "records", hint: str = "") -> list[dict[str, Any]]:
    """Every object in a JSON-lines file, in order; blank lines are skipped.

    A missing file or a line that is not JSON raises an error naming the file (and the line), followed by
    `hint` (what writes the file) when given.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No file of {what} at {path}{': ' + hint if hint else ''}.")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number} is not a JSON line ({exc.msg}): fix or delete that line") from None
    return records


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one object as a JSON line, creating the file and its folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
