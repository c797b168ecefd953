"""The planner against measurements: predict every call of a measured matrix, and summarise the errors.

    python -m xcomp_lab.plan.validate results/plan-matrix-h200 --workers 14   # compare.jsonl, and the summary

A matrix folder (`tools.plan_matrix`) holds `records.jsonl`: each measured call names a preset, its dtype,
quantization, attention, batch, prompt tokens (image tokens included), image size and new tokens. `compare`
estimates the same call (`estimate`, for CUDA where it was measured on CUDA) and writes a row per call to
`compare.jsonl`: measured and predicted allocated and reserved peaks, per phase too, their relative errors
(predicted / measured - 1: negative is an under-prediction) and, where the folder's `accelerate.jsonl` holds it,
accelerate's weights-only figure for the call's dtype against the measured allocated peak. `matrix_summary`
groups the rows (by architecture, quantization, ...): the median and worst errors, the under-predictions over
1%, the prediction time; `matrix_table` and `matrix_markdown` print it; `bars` says which of issue 17's bars hold.

INT8 calls are planned with every input column an LLM.int8() outlier (the bound a plan without data gives).
`--int8-outliers mean` (or `largest`) predicts them instead with the outlier columns their own record counted
(`int8_outliers`, through `outliers.from_counts`): what the planner predicts once the outliers are measured, e.g.
by `outliers.calibrate_int8_outliers` on the real weights; those rows go to `compare-int8-<statistic>.jsonl`:

    python -m xcomp_lab.plan.validate results/plan-matrix-h200 --quantizations int8 --int8-outliers mean

Where a reserved peak differs while the allocated one matches, `plan.trace` sets a call's CUDA allocator trace against
the planner's simulated allocations.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from functools import partial
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from xcomp_lab.core.jsonl import append_jsonl, read_jsonl, write_jsonl
from xcomp_lab.memory.measure import CUDA_KIND
from xcomp_lab.plan.estimate import Call, Session, check_call, run_plan
from xcomp_lab.plan.outliers import STATISTICS, from_counts

RECORDS = "records.jsonl"
COMPARE = "compare.jsonl"
ANCHORS = "accelerate.jsonl"
UNDER_TOLERANCE = 0.01  # issue 17: no under-prediction larger than 1%
BARS = {"median allocated <= 1%": 0.01, "worst allocated <= 2%": 0.02, "worst reserved <= 3%": 0.03}


def measured_calls(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The calls a matrix measured (not skipped, not out of memory)."""
    return [r for r in records if "skipped" not in r and not r.get("oom") and r.get("allocated_peak")]


def accelerate_dtype(dtype: str, quantization: str) -> str:
    """The `accelerate estimate-memory` dtype that stands for a call's weights: FP16/BF16 as float16, NF4 as int4."""
    return {"int8": "int8", "nf4": "int4"}.get(quantization, "float32" if dtype == "fp32" else "float16")


SETTINGS = ("preset", "tiny", "dtype", "quantization", "attn", "batch", "prompt_tokens", "image_size", "new_tokens",
            "kind")


def settings_key(record: dict[str, Any]) -> str:
    """What identifies a call to the planner: the settings it is estimated with."""
    return json.dumps([record.get(key) for key in SETTINGS])


def predict_call(record: dict[str, Any], int8_outliers: str | None = None) -> dict[str, Any]:
    """The planner's figures for a measured call's settings: peaks, per phase too, and the time taken (or the error
    of a call the planner cannot predict, as `prediction_error`). `int8_outliers`: as `record_call`'s."""
    began = time.perf_counter()
    try:
        call = record_call(record, int8_outliers, "cuda" if record["kind"] == CUDA_KIND else "cpu")
        plan = run_plan(call, began)
    except Exception as exc:  # noqa: BLE001 (a call the planner cannot predict is reported, not fatal)
        return {"settings": settings_key(record), "prediction_error": f"{type(exc).__name__}: {exc}"}
    return plan_row(record, plan, int8_outliers if call.int8_outliers is not None else None)


def plan_row(record: dict[str, Any], plan: Any, int8_outliers: str | None = None) -> dict[str, Any]:
    """A prediction's line (`predicted.jsonl`): the plan's peaks, per phase too, for a measured call's settings."""
    return {"settings": settings_key(record), **({"int8_outliers": int8_outliers} if int8_outliers else {}),
            "predicted_allocated": plan.peak_bytes,
            "predicted_reserved": plan.reserved_peak_bytes, "predicted_weights": plan.weights_bytes,
            "predicted_image_tokens": plan.image_tokens, "predicted_where": plan.peak_where,
            "predict_s": round(plan.seconds, 2),
            "predicted_phases": {k: [v.allocated, v.reserved] for k, v in plan.phases.items()}}


def build_of(record: dict[str, Any]) -> tuple[Any, ...]:
    """The build a measured call ran in: one process, one model loaded once (the matrix's run, preset and
    quantization)."""
    return (record.get("run"), record["preset"], record.get("tiny"), record["dtype"], record["quantization"])


def record_call(record: dict[str, Any], int8_outliers: str | None = None, device: str = "cuda") -> Call:
    """The planner's checked call for a measured call's settings on `device`; `int8_outliers` ("mean", "largest"):
    an INT8 call with its record's outlier columns (`outliers.from_counts`), not every column."""
    outliers = None
    if int8_outliers is not None and record["quantization"] == "int8" and record.get("int8_outliers"):
        outliers = from_counts(record["int8_outliers"], int8_outliers)
    return check_call(record["preset"] + (":tiny" if record.get("tiny") else ""), dtype=record["dtype"],
                      quantization=record["quantization"], attn=record["attn"], batch=record["batch"],
                      prompt_tokens=record["prompt_tokens"], new_tokens=record["new_tokens"],
                      image_size=record.get("image_size"), device=device, card=None, int8_outliers=outliers)


def predict_build(records: Sequence[dict[str, Any]], int8_outliers: str | None = None) -> list[dict[str, Any]]:
    """`predict_call` for the CUDA calls of one build in their measured order, each after the ones before it in one
    simulated process (`estimate.Session`), as the matrix ran them: a later call starts from what the earlier ones
    left, not from a fresh load."""
    session, out = Session(), []
    for record in records:
        began = time.perf_counter()
        call = record_call(record, int8_outliers)
        out.append(plan_row(record, run_plan(call, began, session=session),
                            int8_outliers if call.int8_outliers is not None else None))
    return out


def compare_call(record: dict[str, Any], predicted: dict[str, Any],
                 anchors: dict[tuple[str, str], int] | None = None) -> dict[str, Any]:
    """One measured call against its prediction (`predict_call`): the row of `compare.jsonl`."""
    row = {key: record[key] for key in ("preset", "architecture", "dtype", "quantization", "attn", "batch",
                                        "prompt_tokens", "image_tokens", "new_tokens", "run") if key in record}
    row.update(measured_allocated=record["allocated_peak"], measured_reserved=record["reserved_peak"],
               measured_weights=record["weights_bytes"])
    anchor = (anchors or {}).get((record["preset"], accelerate_dtype(record["dtype"], record["quantization"])))
    if anchor is not None:
        row.update(accelerate_bytes=anchor, accelerate_error_allocated=anchor / record["allocated_peak"] - 1)
    row.update({k: v for k, v in predicted.items() if k != "predicted_phases"})
    if "prediction_error" in predicted:
        return row
    phases = predicted["predicted_phases"]
    row["phases"] = {name: {"measured_allocated": peak["allocated"], "measured_reserved": peak["reserved"],
                            "predicted_allocated": phases.get(name, [None, None])[0],
                            "predicted_reserved": phases.get(name, [None, None])[1]}
                     for name, peak in record["phases"].items()}
    for key in ("allocated", "reserved"):
        m, p = row[f"measured_{key}"], row[f"predicted_{key}"]
        row[f"error_{key}"] = None if m is None or p is None else p / m - 1
    return row


def predict_calls(records: Sequence[dict[str, Any]], workers: int = 1, out: Path | None = None,
                  int8_outliers: str | None = None, as_built: bool = False) -> dict[str, dict[str, Any]]:
    """`predict_call` for each distinct setting of `records`, `workers` processes at a time: {settings key:
    prediction}; each also appended to `out` (JSON lines) as it is made, when given, to be reused by
    `compare(predicted=)`. `int8_outliers`: as `predict_call`'s. `as_built`: each build's calls in one simulated
    process, in their order (`predict_build`), a build per job."""
    if as_built:
        builds: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for record in records:
            builds.setdefault(build_of(record), []).append(record)
        predict, todo = partial(predict_build, int8_outliers=int8_outliers), list(builds.values())
    else:
        predict = partial(predict_call, int8_outliers=int8_outliers)
        todo = list({settings_key(r): r for r in records}.values())
    predictions = []

    def done(prediction: dict[str, Any] | list[dict[str, Any]]) -> None:
        for line in prediction if isinstance(prediction, list) else [prediction]:
            predictions.append(line)
            if out is not None:
                append_jsonl(out, line)
        bar.update()

    with tqdm(total=len(todo), desc="predict the matrix", unit="build" if as_built else "call") as bar:
        if workers <= 1:
            for record in todo:
                done(predict(record))
        else:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                for future in as_completed([pool.submit(predict, record) for record in todo]):
                    done(future.result())
    return {p["settings"]: p for p in predictions}


def compare(folder: Path, presets: Sequence[str] | None = None, batches: Sequence[int] | None = None,
            text_tokens: Sequence[int] | None = None, workers: int = 1, predicted: Path | None = None,
            quantizations: Sequence[str] | None = None, int8_outliers: str | None = None,
            as_built: bool = False) -> list[dict[str, Any]]:
    """Predict the measured calls of `folder/records.jsonl` (all, or those of the given presets, batch sizes, text
    tokens and quantizations), `workers` processes at a time, and write the rows to `folder/compare.jsonl`
    (`compare_name`: another file with `int8_outliers`, `predict_call`'s, or `as_built`, `predict_calls`'); the rows.

    `predicted`: the JSON lines `predict_calls` wrote for the same settings with this planner (e.g. on another
    machine, while the matrix was measured); a call found there is not predicted again.
    """
    folder = Path(folder)
    measured = [r for r in measured_calls(read_jsonl(folder / RECORDS))
                if (presets is None or r["preset"] in presets) and (batches is None or r["batch"] in batches)
                and (text_tokens is None or r["text_tokens"] in text_tokens)
                and (quantizations is None or r["quantization"] in quantizations)]
    anchors = {(r["preset"], r["accelerate_dtype"]): r["total_bytes"]
               for r in (read_jsonl(folder / ANCHORS) if (folder / ANCHORS).exists() else [])}
    known = {p["settings"]: p for p in read_jsonl(predicted)} if predicted is not None else {}
    todo = [r for r in measured if settings_key(r) not in known]
    if as_built:  # a build's calls are predicted together, in order
        builds = {build_of(r) for r in todo}
        todo = [r for r in measured if build_of(r) in builds]
    known.update(predict_calls(todo, workers, int8_outliers=int8_outliers, as_built=as_built))
    rows = [compare_call(record, known[settings_key(record)], anchors) for record in measured]
    write_jsonl(folder / compare_name(int8_outliers, as_built), rows)
    return rows


def compare_name(int8_outliers: str | None = None, as_built: bool = False) -> str:
    """The comparison's file: `compare.jsonl`; `compare-int8-<statistic>.jsonl` for INT8 calls planned with their
    records' outlier columns; `-as-built` before `.jsonl` for calls planned as their builds ran them."""
    name = COMPARE if int8_outliers is None else f"compare-int8-{int8_outliers}.jsonl"
    return name.replace(".jsonl", "-as-built.jsonl") if as_built else name


def _worst(errors: Sequence[float]) -> float:
    return max(errors, key=abs)


def matrix_summary(rows: Sequence[dict[str, Any]], by: str = "architecture") -> list[dict[str, Any]]:
    """Per architecture (or per value of another field of the rows, `by`, e.g. "quantization"): calls predicted and
    not; the planner's median and worst (largest in size, sign kept) relative error on the allocated and reserved
    peaks; its under-predictions over 1% (on either peak); accelerate's median and worst error against the
    allocated peak; the median prediction time in seconds."""
    if any(by not in r for r in rows):
        raise ValueError(f"by={by!r} is not a field of every row; use a field of compare.jsonl such as "
                         "'architecture', 'quantization', 'attn' or 'preset'.")
    out = []
    for group in sorted({str(r[by]) for r in rows}):
        every = [r for r in rows if str(r[by]) == group]
        mine = [r for r in every if r.get("error_allocated") is not None]
        line: dict[str, Any] = {"group": group, "calls": len(mine), "not_predicted": len(every) - len(mine)}
        for key in ("allocated", "reserved"):
            errors = [r[f"error_{key}"] for r in mine if r.get(f"error_{key}") is not None]
            line[f"median_{key}"] = statistics.median(errors) if errors else None
            line[f"worst_{key}"] = _worst(errors) if errors else None
        line["under_1pct"] = sum(under(r) for r in mine)
        anchors = [r["accelerate_error_allocated"] for r in every if r.get("accelerate_error_allocated") is not None]
        line["median_accelerate"] = statistics.median(anchors) if anchors else None
        line["worst_accelerate"] = _worst(anchors) if anchors else None
        line["median_predict_s"] = statistics.median(r["predict_s"] for r in mine) if mine else None
        out.append(line)
    return out


def under(row: dict[str, Any]) -> bool:
    """Whether a row's prediction is below the measurement by more than 1% on either peak."""
    errors = [row.get(f"error_{key}") for key in ("allocated", "reserved")]
    return min(e for e in errors if e is not None) < -UNDER_TOLERANCE


def bars(rows: Sequence[dict[str, Any]]) -> dict[str, bool]:
    """Issue 17's bars over all predicted rows: median allocated error <= 1% in every architecture, worst allocated
    <= 2%, worst reserved <= 3% (where measured), no under-prediction over 1% (on either peak)."""
    predicted = [r for r in rows if r.get("error_allocated") is not None]
    if not predicted:
        return {}
    medians = [abs(s["median_allocated"]) for s in matrix_summary(predicted)]
    reserved = [abs(r["error_reserved"]) for r in predicted if r.get("error_reserved") is not None]
    return {"median allocated <= 1%": max(medians) <= BARS["median allocated <= 1%"],
            "worst allocated <= 2%": max(abs(r["error_allocated"]) for r in predicted) <= BARS["worst allocated <= 2%"],
            "worst reserved <= 3%": max(reserved, default=0.0) <= BARS["worst reserved <= 3%"],
            "no under-prediction over 1%": not any(under(r) for r in predicted)}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2%}"


def matrix_table(summary: Sequence[dict[str, Any]], by: str = "architecture") -> str:
    """The summary as a text table: errors as predicted / measured - 1 (negative: under-predicted)."""
    lines = [(f"{by:<13}{'calls':>6}{'alloc median':>13}{'alloc worst':>12}{'resv median':>12}"
              f"{'resv worst':>11}{'under >1%':>10}{'accelerate median':>18}{'worst':>9}{'predict s':>10}")]
    for s in summary:
        calls = f"{s['calls']}" + (f"+{s['not_predicted']}" if s["not_predicted"] else "")
        seconds = "-" if s["median_predict_s"] is None else f"{s['median_predict_s']:.1f}"
        lines.append(f"{s['group']:<13}{calls:>6}{_pct(s['median_allocated']):>13}"
                     f"{_pct(s['worst_allocated']):>12}{_pct(s['median_reserved']):>12}{_pct(s['worst_reserved']):>11}"
                     f"{s['under_1pct']:>10}{_pct(s['median_accelerate']):>18}{_pct(s['worst_accelerate']):>9}"
                     f"{seconds:>10}")
    return "\n".join(lines)


def matrix_markdown(summary: Sequence[dict[str, Any]], by: str = "architecture") -> str:
    """The summary as a Markdown table (the README's), errors as predicted / measured - 1."""
    lines = [(f"| {by} | calls predicted (not) | allocated: median / worst | reserved: median / worst | "
              "under-predicted > 1% | accelerate vs allocated: median / worst | median prediction time |"),
             "|---|---|---|---|---|---|---|"]
    for s in summary:
        seconds = "-" if s["median_predict_s"] is None else f"{s['median_predict_s']:.1f} s"
        lines.append(f"| {s['group']} | {s['calls']} ({s['not_predicted']}) | {_pct(s['median_allocated'])} / "
                     f"{_pct(s['worst_allocated'])} | {_pct(s['median_reserved'])} / {_pct(s['worst_reserved'])} | "
                     f"{s['under_1pct']} | {_pct(s['median_accelerate'])} / {_pct(s['worst_accelerate'])} | {seconds} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a plan_matrix results folder (records.jsonl)")
    parser.add_argument("--workers", type=int, default=1, help="calls predicted at once, one process each")
    parser.add_argument("--predicted", type=Path, default=None,
                        help="predictions made earlier by this planner (--predict-only's file): not made again")
    parser.add_argument("--predict-only", type=Path, default=None,
                        help="only predict the settings of the folder's records, into this JSON-lines file")
    parser.add_argument("--quantizations", nargs="+", default=None, help="only the calls of these quantizations")
    parser.add_argument("--int8-outliers", choices=STATISTICS, default=None,
                        help="INT8 calls with the outlier columns their records counted (the mean or the largest "
                             "per input), not every column; rows to compare-int8-<statistic>.jsonl")
    parser.add_argument("--as-built", action="store_true",
                        help="each build's calls in one simulated process, in their measured order (a later call "
                             "starts from what the earlier ones left), not each from a fresh load")
    parser.add_argument("--by", nargs="+", default=["architecture", "quantization"],
                        help="the summaries printed: fields of compare.jsonl")
    args = parser.parse_args(argv)
    if args.predict_only is not None:
        predict_calls([r for r in measured_calls(read_jsonl(args.folder / RECORDS))
                       if args.quantizations is None or r["quantization"] in args.quantizations],
                      args.workers, args.predict_only, args.int8_outliers, args.as_built)
        return
    rows = compare(args.folder, workers=args.workers, predicted=args.predicted, quantizations=args.quantizations,
                   int8_outliers=args.int8_outliers, as_built=args.as_built)
    for by in args.by:
        print(matrix_table(matrix_summary(rows, by), by))
    print(json.dumps(bars(rows)))


if __name__ == "__main__":
    main()
