"""The planner's simulated allocations set against a CUDA allocator trace of the same call.

    python -m xcomp_lab.plan.trace <a --trace run's folder>          # each traced call: what differs, one JSON line
    python -m xcomp_lab.plan.trace <folder> --as-built               # the planner continuing each build's process

Where a reserved peak differs while the allocated one matches, the stream of allocations differs in order or sizes.
`tools.plan_matrix --trace` records a measured call's allocator history on the GPU (`traces/<call>.json.gz`: every
event as [action, address, size, the innermost transformers/bitsandbytes/torch.nn lines that made it]);
`planned_events` gives the simulated allocator's events for the same call, and `trace_differences` aligns the two
streams of large-pool allocations (over 1 MiB, by their sizes rounded as the allocator rounds them, with
`difflib.SequenceMatcher`): what only the GPU allocated (cuDNN's workspaces, a kernel's internal copy), grouped by
the line that made it, and what only the plan allocated, by size. A CUDA trace names the size each tensor asked
for, as the simulation's events do (`allocator.CachingAllocator.log`).

Where the streams match and the reserved peaks still differ, the difference is where the segments lie: the caching
allocator takes the smallest free block that fits, the lowest address among equals, and the addresses are the
driver's. `--gpu-addresses` plans each call with the addresses its trace recorded (`gpu_placement`): the segments
that held memory at the call's start moved to the trace's, each new segment put where the GPU's next segment of that
size went; the simulation then reserves what the GPU reserved, where the stream is the GPU's.
"""

from __future__ import annotations

import argparse
import difflib
import gzip
import json
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from xcomp_lab.core.jsonl import read_jsonl
from xcomp_lab.plan.allocator import SMALL_BUFFER, SMALL_SIZE, CachingAllocator, round_size
from xcomp_lab.plan.estimate import Session, run_plan
from xcomp_lab.plan.outliers import STATISTICS
from xcomp_lab.plan.validate import RECORDS, build_of, measured_calls, record_call

TRACES = "traces"
LISTED = 8  # groups listed on each side


def trace_name(preset: str, quantization: str, attn: str, batch: int, text_tokens: int) -> str:
    """The file of a call's allocator trace in a matrix folder's `traces/` (`tools.plan_matrix --trace`)."""
    return f"{preset}-{quantization}-{attn}-b{batch}-t{text_tokens}.json.gz"


def planned_events(record: dict[str, Any], int8_outliers: str | None = None,
                   session: Session | None = None) -> list[list]:
    """The simulated allocator's actions over a measured call's prediction, every decode step run, from the call's
    start ([action, size]: "alloc", "free_completed", "segment_alloc", "segment_free"), to set against its CUDA
    trace; with `session`, the call continues that simulated process (`estimate.Session`)."""
    call = record_call(record, int8_outliers)
    events: list[list] = []
    run_plan(call, time.perf_counter(), exact_decode=True, events=events, session=session)
    return events


def trace_differences(measured: Sequence[Sequence[Any]], planned: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """The large-pool allocations of a CUDA trace's events ([action, address, size, lines]) and of the planner's
    ([action, size]) aligned by size: how many each side made and matched, the GPU's own ("measured_only": by the
    innermost line that made them, the most bytes first: count, bytes, the first one's index among the measured
    allocations) and the plan's own ("planned_only": by size, the most bytes first: count), each list cut to
    `LISTED` groups."""
    real = [(round_size(e[2]), (e[3] if len(e) > 3 else None) or ["?"]) for e in measured
            if e[0] == "alloc" and e[2] > SMALL_SIZE]
    plan = [round_size(e[1]) for e in planned if e[0] == "alloc" and e[1] > SMALL_SIZE]
    matcher = difflib.SequenceMatcher(None, [size for size, _ in real], plan, autojunk=False)
    matched = 0
    gpu: dict[str, list[int]] = defaultdict(lambda: [0, 0, -1])
    ours: dict[int, int] = defaultdict(int)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            matched += i2 - i1
            continue
        for index in range(i1, i2):
            group = gpu[real[index][1][0]]
            group[0], group[1] = group[0] + 1, group[1] + real[index][0]
            group[2] = index if group[2] < 0 else group[2]
        for size in plan[j1:j2]:
            ours[size] += 1
    measured_only = sorted(({"line": line, "count": c, "bytes": b, "first": f} for line, (c, b, f) in gpu.items()),
                           key=lambda g: -g["bytes"])
    planned_only = sorted(({"size": size, "count": c} for size, c in ours.items()),
                          key=lambda g: -g["size"] * g["count"])
    return {"measured": len(real), "planned": len(plan), "matched": matched,
            "measured_only": measured_only[:LISTED], "planned_only": planned_only[:LISTED]}


def gpu_placement(trace: dict[str, Any]) -> tuple[Callable[[CachingAllocator], None], list[tuple[int, int]]]:
    """An `at_start` for `estimate.run_plan` that puts the simulated segments where a CUDA trace of the call saw
    them: the large segments left at the call's start (those the trace's opening `empty_cache` did not release)
    moved to the trace's addresses, largest to largest, and each new segment placed where the GPU's next new segment
    of that size went. Also the list of the trace's new segments ([size, address]) not used yet: what the plan
    did not ask for (e.g. cuDNN's workspace, which the plan does not make)."""
    released, new, started = set(), [], False
    for action, address, size, *_ in trace["events"]:
        started = started or action == "alloc"
        if action == "segment_free" and not started:
            released.add(address)
        elif action == "segment_alloc" and started:
            new.append((size, address))
    kept = sorted(((size, address) for address, size, _ in trace["segments_at_start"]
                   if address not in released and size > SMALL_BUFFER), reverse=True)

    def next_address(size: int) -> int | None:
        index = next((i for i, (s, _) in enumerate(new) if s == size), None)
        return None if index is None else new.pop(index)[1]

    def at_start(allocator: CachingAllocator) -> None:
        ours = sorted(((size, address) for address, size in allocator.segments.items() if size > SMALL_BUFFER),
                      reverse=True)
        for (size, address), (gpu_size, gpu_address) in zip(ours, kept):
            if size == gpu_size:
                allocator.move_segment(address, gpu_address)
        allocator.placement = next_address

    return at_start, new


def planned_on_gpu_addresses(record: dict[str, Any], trace: dict[str, Any],
                             int8_outliers: str | None = None) -> dict[str, Any]:
    """A measured call planned with its trace's segment addresses (`gpu_placement`), every decode step run: the
    planned peaks beside the measured ones, and the GPU's new segments the plan did not ask for."""
    at_start, unused = gpu_placement(trace)
    plan = run_plan(record_call(record, int8_outliers), time.perf_counter(), exact_decode=True, at_start=at_start)
    return {"measured_allocated": record["allocated_peak"], "measured_reserved": record["reserved_peak"],
            "planned_allocated": plan.peak_bytes, "planned_reserved": plan.reserved_peak_bytes,
            "error_reserved": plan.reserved_peak_bytes / record["reserved_peak"] - 1,
            "gpu_segments_unused": [[size, address] for size, address in unused]}


def traced_calls(folder: Path, int8_outliers: str | None = None, as_built: bool = False) -> list[dict[str, Any]]:
    """For each call of `folder/records.jsonl` with a trace in `folder/traces`: {"call": the trace's name,
    "differences": `trace_differences`}. `as_built`: each build's calls planned in one simulated process, in their
    measured order (a later call starts from what the earlier ones left, as on the GPU)."""
    out, sessions = [], {}
    for record in measured_calls(read_jsonl(Path(folder) / RECORDS)):
        path = trace_of(folder, record)
        if not (path.is_file() or as_built):
            continue
        session = sessions.setdefault(build_of(record), Session()) if as_built else None
        planned = planned_events(record, int8_outliers, session)
        if path.is_file():
            out.append({"call": path.name, "differences": trace_differences(read_trace(path)["events"], planned)})
    return out


def traced_on_gpu_addresses(folder: Path, int8_outliers: str | None = None) -> list[dict[str, Any]]:
    """For each call of `folder/records.jsonl` with a trace: {"call": the trace's name,
    **`planned_on_gpu_addresses`}."""
    out = []
    for record in measured_calls(read_jsonl(Path(folder) / RECORDS)):
        path = trace_of(folder, record)
        if path.is_file():
            out.append({"call": path.name, **planned_on_gpu_addresses(record, read_trace(path), int8_outliers)})
    return out


def trace_of(folder: Path, record: dict[str, Any]) -> Path:
    """Where a measured call's trace is in a --trace run's folder (it may not exist)."""
    return Path(folder) / TRACES / trace_name(record["preset"], record["quantization"], record["attn"],
                                              record["batch"], record["text_tokens"])


def read_trace(path: Path) -> dict[str, Any]:
    """A trace written by `tools.plan_matrix --trace`: {"segments_at_start": [...], "events": [...]}."""
    with gzip.open(path, "rt") as trace:
        return json.load(trace)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a plan_matrix --trace run's folder (records.jsonl, traces/)")
    parser.add_argument("--int8-outliers", choices=STATISTICS, default=None,
                        help="INT8 calls with the outlier columns their records counted, not every column")
    parser.add_argument("--as-built", action="store_true",
                        help="each build's calls in one simulated process, in their measured order")
    parser.add_argument("--gpu-addresses", action="store_true",
                        help="plan each traced call with the segment addresses its trace recorded, and give its peaks")
    args = parser.parse_args(argv)
    if not (args.folder / RECORDS).is_file():
        parser.error(f"{args.folder} holds no {RECORDS}: give the --out folder of a `tools.plan_matrix --trace` run")
    if args.gpu_addresses and args.as_built:
        parser.error("--gpu-addresses plans each call from a fresh load, with its own trace's addresses: leave out "
                     "--as-built")
    lines = (traced_on_gpu_addresses(args.folder, args.int8_outliers) if args.gpu_addresses
             else traced_calls(args.folder, args.int8_outliers, args.as_built))
    for line in lines:
        print(json.dumps(line))


if __name__ == "__main__":
    main()
