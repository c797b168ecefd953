"""JSON-lines files (one JSON object a line): the one reader, appender and rewriter the package uses.

An interrupted write can leave a torn last line (a fragment without its newline). Appending first sets such a
line aside, into `<file>.torn` with its line number, so that the new record starts a line of its own and the
fragment is kept for whoever wants to look at it; `set_aside_torn_line` does the same on request. Rewriting
(`write_jsonl`) writes a new file next to the old one and renames it over the old one, so a reader sees either
the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

TORN_SUFFIX = ".torn"


def torn_path(path: str | os.PathLike) -> Path:
    """Where torn lines of `path` are set aside: `<path>.torn`."""
    path = Path(path)
    return path.with_name(path.name + TORN_SUFFIX)


def _is_object(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:  # not JSON, or not UTF-8
        return False


def read_jsonl(path: str | os.PathLike, *, what: str = "records", hint: str = "") -> list[dict[str, Any]]:
    """Every object in a JSON-lines file, in order; blank lines are skipped.

    A missing file, or a line that is not a JSON object, raises an error naming the file (and the line) and
    what to do; a missing file's error ends with `hint` (what writes the file) when given.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No file of {what} at {path}{': ' + hint if hint else ''}.")
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            problem = f"not a JSON line ({exc.msg})"
        else:
            if isinstance(record, dict):
                records.append(record)
                continue
            problem = f"not a JSON object line (it holds a {type(record).__name__})"
        if number == len(lines):  # the text does not end with a newline: a write was cut short
            raise ValueError(f"{path}:{number} is {problem}: the torn end of an interrupted write. The next "
                             f"append moves it to {torn_path(path)} (kept, not deleted); to move it now: "
                             f"from xcomp_lab.core.jsonl import set_aside_torn_line; "
                             f"set_aside_torn_line({str(path)!r})")
        raise ValueError(f"{path}:{number} is {problem}: fix that line, or move it out of the file (to keep it, "
                         f"into {torn_path(path)}).")
    return records


def set_aside_torn_line(path: str | os.PathLike) -> Path | None:
    """Move a torn last line of `path` to `<path>.torn` (with its line number); returns that file, or None.

    The last line is torn when it lacks its newline and is not a JSON object, or is not a JSON object at all;
    a JSON object that lacks only its newline is a complete record and gets its newline back.
    """
    path = Path(path)
    data = path.read_bytes() if path.is_file() else b""
    ends_line = data.endswith(b"\n")
    start = data.rfind(b"\n", 0, len(data) - 1 if ends_line else len(data)) + 1
    last = data[start:].rstrip(b"\n")
    if not last.strip() or _is_object(last):
        if data and not ends_line:
            with path.open("ab") as f:
                f.write(b"\n")
        return None
    number = data.count(b"\n", 0, start) + 1
    torn = torn_path(path)
    with torn.open("ab") as f:  # kept first: an interruption from here on loses nothing
        f.write(b"%s:%d: " % (path.name.encode(), number) + last + b"\n")
    os.truncate(path, start)
    warnings.warn(f"{path}:{number} was a torn line (an interrupted write); it was moved to {torn}.", stacklevel=2)
    return torn


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one object as a JSON line, creating the file and its folder if needed.

    A torn last line left by an interrupted write is set aside first (`set_aside_torn_line`).
    """
    path = Path(path)
    line = (json.dumps(record) + "\n").encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    set_aside_torn_line(path)
    with path.open("ab") as f:
        f.write(line)


def write_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    """Replace `path` with `records`, one JSON line each, atomically: a new file is written, then renamed over it."""
    path = Path(path)
    text = "".join(json.dumps(record) + "\n" for record in records)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = path.with_name(f".{path.name}.{os.getpid()}.new")
    try:
        with new.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.chmod(new, path.stat().st_mode)
        os.replace(new, path)
    finally:
        new.unlink(missing_ok=True)
