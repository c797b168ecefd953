"""The planner against measurements: predict every call of a measured matrix and report the errors.

    python -m xcomp_lab.plan.validate results/plan-matrix-h200 --out /tmp/plan-vs-h200.jsonl

Each record of `tools.plan_matrix` (`records.jsonl`) names a preset, its dtype, quantization, attention, batch,
prompt tokens (image tokens included), image size and new tokens; the same call is estimated for CUDA and the
prediction's allocated and reserved peaks are set against the measured `allocated_peak` and `reserved_peak`.
The error is (predicted - measured) / measured: negative is an under-prediction.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from xcomp_lab.plan.estimate import estimate


def measured_calls(folder: Path) -> list[dict[str, Any]]:
    """The measured (not skipped, not out-of-memory) calls of a matrix folder."""
    lines = (folder / "records.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return [r for r in records if "skipped" not in r and not r.get("oom") and r.get("allocated_peak")]


def compare(record: dict[str, Any]) -> dict[str, Any]:
    """One record's call predicted, with both errors."""
    plan = estimate(record["preset"] + (":tiny" if record.get("tiny") else ""), dtype=record["dtype"],
                    quantization=record["quantization"], attn=record["attn"], batch=record["batch"],
                    prompt_tokens=record["prompt_tokens"], new_tokens=record["new_tokens"],
                    image_size=record.get("image_size"), device="cuda")
    keys = ("preset", "architecture", "dtype", "quantization", "attn", "batch", "prompt_tokens")
    return {**{k: record[k] for k in keys},
            "measured_allocated": record["allocated_peak"], "predicted_allocated": plan.peak_bytes,
            "measured_reserved": record["reserved_peak"], "predicted_reserved": plan.reserved_peak_bytes,
            "allocated_error": plan.peak_bytes / record["allocated_peak"] - 1,
            "reserved_error": plan.reserved_peak_bytes / record["reserved_peak"] - 1,
            "predicted_where": plan.peak_where, "seconds": round(plan.seconds, 2)}


def summary(rows: Iterable[dict[str, Any]]) -> str:
    """Per architecture: calls, median and worst |error| of allocated and reserved, the worst under-prediction."""
    by_arch: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_arch.setdefault(row["architecture"], []).append(row)
    lines = [(f"{'architecture':<12}{'calls':>6}{'alloc median':>14}{'alloc worst':>13}{'resv median':>13}"
             f"{'resv worst':>12}{'most under':>12}")]
    for arch, group in by_arch.items():
        alloc = [abs(r["allocated_error"]) for r in group]
        resv = [abs(r["reserved_error"]) for r in group]
        under = min(min(r["allocated_error"], r["reserved_error"]) for r in group)
        lines.append(f"{arch:<12}{len(group):>6}{statistics.median(alloc):>14.2%}{max(alloc):>13.2%}"
                     f"{statistics.median(resv):>13.2%}{max(resv):>12.2%}{under:>12.2%}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a plan_matrix results folder (records.jsonl)")
    parser.add_argument("--out", type=Path, required=True, help="JSON lines of the comparisons (appended)")
    parser.add_argument("--part", default="0/1", help="k/n: compare every n-th call from the k-th (parallel runs)")
    args = parser.parse_args(argv)
    part, parts = (int(v) for v in args.part.split("/"))
    calls = measured_calls(args.folder)[part::parts]
    done = {json.dumps({k: r[k] for k in ("preset", "quantization", "attn", "batch", "prompt_tokens")})
            for r in map(json.loads, args.out.read_text().splitlines())} if args.out.exists() else set()
    for record in tqdm(calls, desc="plan vs measured", unit="call"):
        key = json.dumps({k: record[k] for k in ("preset", "quantization", "attn", "batch", "prompt_tokens")})
        if key in done:
            continue
        with args.out.open("a") as f:
            f.write(json.dumps(compare(record)) + "\n")


if __name__ == "__main__":
    main()
