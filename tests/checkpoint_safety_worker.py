"""A separate process for tests/test_checkpoint_safety.py: race another worker to build and load checkpoints.

Usage: python checkpoint_safety_worker.py BARRIER_DIR INDEX PARTIES. Two rounds for each kind of checkpoint, the
random tiny one (a new seed each round) and the trained tiny one (removed by worker 0 between rounds): in the
first, every worker starts at the same moment (a barrier of files); in the second, worker 0 starts and the others
start as soon as anything of that checkpoint shows up in the cache, so they arrive while it is being written.
Each worker prints one JSON line: per round, the directory it loaded and the sum of the parameters, or the error.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from xcomp_lab.model.checkpoint import build_checkpoint, cache_root, checkpoint_dir, trained_tiny_checkpoint
from xcomp_lab.model.loading import load_model

TIMEOUT_S = 120


def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Poll `condition` every millisecond or two until it holds."""
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up waiting for {what}")
        time.sleep(0.001)


def barrier(folder: Path, name: str, index: int, parties: int) -> None:
    """Wait until all `parties` workers have reached the barrier `name`."""
    (folder / f"{name}.{index}").touch()
    wait_for(lambda: len(list(folder.glob(f"{name}.*"))) >= parties, f"every worker at {name}")


def loaded(make: Callable[[], Path]) -> dict[str, object]:
    """Make a checkpoint, load it as the course does and summarise what was loaded (or the error raised)."""
    try:
        directory = make()
        model, _ = load_model(directory)
    except Exception as error:  # reported to the test, which names every failed round
        return {"error": f"{type(error).__name__}: {error}"}
    total = sum(parameter.double().sum() for parameter in model.parameters())
    return {"path": str(directory), "sum": float(torch.as_tensor(total))}


def race(
    folder: Path, name: str, index: int, parties: int, pattern: str, make: Callable[[], Path]
) -> dict[str, object]:
    """One round: everyone at once, or (with a `pattern`) worker 0 first and the others while it writes."""
    barrier(folder, name, index, parties)
    if index and pattern:
        checkpoints = cache_root() / "checkpoints"
        wait_for(lambda: any(checkpoints.glob(f"*{pattern}*")), f"worker 0 to start writing {pattern}")
    return loaded(make)


def main(folder: Path, index: int, parties: int) -> None:
    """Race the other workers round by round and print what this one loaded."""
    rounds = {}
    for seed, name in enumerate(("together", "while-writing")):
        pattern = checkpoint_dir("tiny", "float16", seed).name if seed else ""
        make = partial(build_checkpoint, "tiny", "float16", seed=seed, progress=False)
        rounds[f"random-{name}"] = race(folder, f"random-{name}", index, parties, pattern, make)
    rounds["trained-together"] = race(folder, "trained-together", index, parties, "", trained_tiny_checkpoint)
    barrier(folder, "trained-loaded", index, parties)
    if index == 0:  # the second round starts without the trained checkpoint (or its lock file) again
        for entry in (cache_root() / "checkpoints").glob("*trained-tiny-*"):
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    rounds["trained-while-writing"] = race(
        folder, "trained-while-writing", index, parties, "trained-tiny-", trained_tiny_checkpoint
    )
    print(json.dumps(rounds))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
