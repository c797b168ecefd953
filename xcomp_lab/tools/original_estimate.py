"""The estimator on the original code, against the GPU: every measured record predicted, and its error.

    .venv-original/bin/python -m xcomp_lab.tools.original_estimate \\
        --records results/original-h200/results-1.jsonl results/original-h200/results-2.jsonl \\
        --out results/original-h200/estimate.jsonl [--design]

Reads the records `xcomp_lab.tools.original_gpu_run` wrote (a later file's record of a step replaces an earlier
one's: results-2.jsonl re-measured three steps), predicts each with `xcomp_lab.original.estimate.estimate_original`
on this CPU (the same step, image, new tokens, scale and budget as the record; a step that ran out of memory is
also predicted without a budget, against its `extra.unbudgeted` figures; a step whose call failed is predicted
too, and the prediction's error is set against the measured one), writes one JSON line per row to `--out` and
prints the markdown table (`--update`: only the rows predicted now are replaced in an existing `--out`; `--show`:
the table of an existing `--out`, nothing predicted).
`--design` adds the rows of DESIGN.md section 6's "The original model, reproduced" table, predicted at that
table's prompt (1387 tokens, the real tokenizer's) with its 48 x 10^9-byte budget.

The model's files (config, code, tokenizer; no weights) are `--files`, by default those `original_gpu_run
--prepare` wrote, else written from `--code-dir` into the build cache (`model.original.cache_dir()`).

`--check-cpu --code-dir <folder> --steps ... --max-new-tokens 2` checks the estimator on this CPU instead, on the
small original-code checkpoint (`model.original.build_original_checkpoint`, cached) or `--files`: each step predicted with `device="cpu"`, then run for real on a model of random weights built the same
way (`steps.direct_loader`) and measured by `steps.chat_once` (`memory.measure`'s CPU accounting); one row each
with both figures and phases.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from xcomp_lab.core.jsonl import read_jsonl, write_jsonl
from xcomp_lab.core.resources import package_file
from xcomp_lab.model.original import (
    CHECKPOINT_NAME,
    build_original_checkpoint,
    cache_dir,
    check_code_dir,
    write_model_files,
)

GIB = 1024**3
SAMPLE = ("xcomp_lab.data", "samples", "scene-0.png")
DESIGN_PROMPT_TOKENS = 1387  # DESIGN.md section 6: 150 system + 1225 image + 12 query tokens, the real tokenizer's
DESIGN_BUDGET_BYTES = 48 * 10**9  # its 48 GB card, as 48 x 10^9 bytes (44.70 GiB allowed)
# DESIGN.md section 6's rows: (row, step, measured peak GiB, note of the measured result)
DESIGN_ROWS = (
    ("FP32 quick start (no_grad + autocast)", "fp32-quickstart-48e9", 44.38,
     "OOM at `attn_weights + attention_mask`, 44.27 GiB allocated, asking 236 MiB"),
    ("FP32, no autocast", "fp32-no-autocast", 35.41, "fits"),
    ("FP32, autocast inside inference_mode", "fp32-inference-mode", 35.30, "fits"),
    (".half(), quick start", "fp16-half", 18.06, "fits"),
)


def latest_records(paths: list[Path]) -> list[tuple[dict[str, Any], Path]]:
    """Each step's record, from the last file that holds one, in the order the steps first appear."""
    chosen: dict[str, tuple[dict[str, Any], Path]] = {}
    for path in paths:
        for record in read_jsonl(path, what="original-code GPU records",
                                 hint="written by python -m xcomp_lab.tools.original_gpu_run"):
            chosen[record["params"]["original_step"]] = (record, path)
    return list(chosen.values())


def model_files(files: Path | None, code_dir: Path | None, scale: str) -> Path:
    """The checkpoint's files without weights: `files`, the GPU run's prepared ones, or written from `code_dir`."""
    from xcomp_lab.tools.original_gpu_run import prepared_dir

    if files is not None:
        return files
    prepared = prepared_dir() / "files" / scale / CHECKPOINT_NAME
    if (prepared / "config.json").is_file():
        return prepared
    if code_dir is None:
        raise SystemExit(f"no model files at {prepared}: pass --files, or --code-dir (the folder of the original's "
                         "five remote-code files) to write them")
    from xcomp_lab.original.steps import code_digest

    code = check_code_dir(code_dir)
    target = cache_dir() / f"files-{scale}-{code_digest(code)}" / CHECKPOINT_NAME
    if not (target / "config.json").is_file():
        write_model_files(target, code, scale)
    return target


PREDICTED: dict[tuple[Any, ...], dict[str, Any]] = {}  # one prediction per distinct call (two records share one)


def predict(step: str, files: Path, scale: str, image: str, new_tokens: int, budget: int | None,
            prompt_tokens: int | None = None) -> dict[str, Any]:
    """The estimate as a dict, or {"error": ...} where the replayed call fails as the real one can."""
    from xcomp_lab.original.estimate import estimate_original
    from xcomp_lab.original.steps import STEP_FAILURES, get_original_step

    known = get_original_step(step)
    key = (known.step, known.recipe, known.device_map, scale, new_tokens, budget, prompt_tokens)
    if key not in PREDICTED:
        try:
            PREDICTED[key] = estimate_original(known, files, scale=scale, image=image, device="cuda",
                                               budget_bytes=budget, max_new_tokens=new_tokens,
                                               prompt_tokens=prompt_tokens).as_dict()
        except STEP_FAILURES as error:
            PREDICTED[key] = {"error": f"{type(error).__name__}: {error}".splitlines()[0]}
    return {**PREDICTED[key], "step": step} if "step" in PREDICTED[key] else PREDICTED[key]


def error_of(predicted: int | None, measured: int | None) -> float | None:
    """predicted / measured - 1 (negative: under-predicted)."""
    return None if predicted is None or not measured else predicted / measured - 1


def rows_for(record: dict[str, Any], source: Path, files: Path, image: str) -> list[dict[str, Any]]:
    """The rows of one record: its call, and for an OOM also the call without a budget."""
    step, extra = record["params"]["original_step"], record["extra"]
    scale, new_tokens = record["params"]["scale"], record["params"]["max_new_tokens"]
    base = {"step": step, "source": os.fspath(source), "device_name": record["device_name"],
            "prompt_tokens_measured": extra.get("prompt_tokens"), "prompt": "records' (this checkpoint's tokenizer)"}
    error = record["error"] if not record["oom"] else None
    requested = re.search(r"Tried to allocate ([\d.]+ [KMG]iB)", record["error"] or "")
    measured = {"peak_bytes": record["peak_bytes"], "peak_phase": extra.get("peak_phase"), "oom": record["oom"],
                "oom_in_use_bytes": extra.get("oom_in_use_bytes"), "oom_location": extra.get("oom_location"),
                "oom_requested": requested.group(1) if requested else None,
                "error": error, "budget_bytes": record["budget_bytes"]}
    print(f"[{step}] predicting ({os.fspath(source)})", file=sys.stderr, flush=True)
    predicted = predict(step, files, scale, image, new_tokens, record["budget_bytes"] if record["oom"] else None)
    rows = [{**base, "budget": "record's" if record["oom"] else "none (fits)", "measured": measured,
             "predicted": predicted, "error": error_of(predicted.get("peak_bytes"), record["peak_bytes"])}]
    if record["oom"]:
        unbudgeted = extra["unbudgeted"]
        print(f"[{step}] predicting without a budget", file=sys.stderr, flush=True)
        free = predict(step, files, scale, image, new_tokens, None)
        rows.append({**base, "budget": "none", "measured": {"peak_bytes": unbudgeted["peak_bytes"],
                                                             "peak_phase": unbudgeted["peak_phase"], "oom": False},
                     "predicted": free, "error": error_of(free.get("peak_bytes"), unbudgeted["peak_bytes"])})
    return rows


def design_rows(files: Path, scale: str, image: str, wanted: set[str]) -> list[dict[str, Any]]:
    """DESIGN.md section 6's rows (those of the `wanted` steps, or all), predicted at its prompt length and budget
    (measured on an H100 and an H200)."""
    rows = []
    for row, step, measured_gib, result in DESIGN_ROWS:
        if wanted and step not in wanted:
            continue
        print(f"[{step}] predicting DESIGN.md's row at {DESIGN_PROMPT_TOKENS} tokens", file=sys.stderr, flush=True)
        predicted = predict(step, files, scale, image, 16, DESIGN_BUDGET_BYTES, DESIGN_PROMPT_TOKENS)
        measured = round(measured_gib * GIB) if measured_gib is not None else None
        rows.append({"step": step, "row": row, "source": "DESIGN.md section 6", "device_name": "H100 / H200",
                     "prompt_tokens_measured": DESIGN_PROMPT_TOKENS, "budget": "48 x 10^9 bytes",
                     "prompt": f"DESIGN.md's ({DESIGN_PROMPT_TOKENS} tokens)",
                     "measured": {"peak_bytes": measured, "result": result}, "predicted": predicted,
                     "error": error_of(predicted.get("peak_bytes"), measured)})
    return rows


def check_cpu(steps: list[str], files: Path, scale: str, image: str, new_tokens: int) -> list[dict[str, Any]]:
    """Each step predicted on the CPU and measured for real there, as `steps.run_steps` measures it."""
    import torch

    from xcomp_lab.core.dtypes import check_dtype
    from xcomp_lab.original.estimate import estimate_original
    from xcomp_lab.original.matmul import FloatMatmul
    from xcomp_lab.original.steps import (
        chat_once,
        direct_loader,
        get_original_step,
        peak_phase,
    )

    rows = []
    for name in steps:
        step = get_original_step(name)
        predicted = estimate_original(step, files, scale=scale, image=image, device="cpu", max_new_tokens=new_tokens)
        torch.manual_seed(0)
        model, tokenizer = direct_loader(files, "cpu", scale)(step)
        if step.step.cast is not None:
            model = model.to(check_dtype(step.step.cast))
        with FloatMatmul():  # outside the measurement: FP16 products at FP32 speed, the same tensors seen
            result, probe, _ = chat_once(model, tokenizer, image, step, "cpu", None, new_tokens)
        rows.append({"step": name, "predicted": predicted.as_dict(),
                     "measured": {"peak_bytes": result.memory.peak_bytes, "start_bytes": result.memory.start_bytes,
                                  "peak_phase": peak_phase(result, probe), "kv_cache_bytes": probe.kv_bytes,
                                  "prompt_tokens": probe.prompt_tokens, "new_tokens": probe.decoder_calls,
                                  "error": result.memory.error}})
        model = tokenizer = result = None
    return rows


def gib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / GIB:.2f}"


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2%}"


def outcome(side: dict[str, Any], predicted: bool) -> str:
    """How the call ended: fits, OOM (the line, allocated then, and the request where known), or the error."""
    if side.get("error"):
        return f"**{side['error'].split(',')[0]}**"
    if side.get("result"):
        return side["result"]
    if not side.get("oom"):
        return "fits"
    place, _, line = (side["oom_location"] or "").partition(" in forward: ")
    where = f"`{line.strip().rstrip('(')}` ({place})"
    if predicted:
        return (f"OOM at {where}, {gib(side['oom_allocated_bytes'])} GiB allocated, asking "
                f"{side['oom_requested_bytes'] / 2**20:.0f} MiB")
    return f"OOM at {where}, {gib(side['oom_in_use_bytes'])} GiB allocated, asking {side['oom_requested']}"


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table: measured vs predicted peak (`max_memory_allocated`), the error, the phase and the outcome."""
    header = ("| step | prompt tokens | budget | measured peak GiB | predicted GiB | error | peak phase (measured / "
              "predicted) | measured result | predicted result |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        m, p = row["measured"], row["predicted"]
        name = row.get("row") or row["step"]
        tokens = p.get("prompt_tokens", row["prompt_tokens_measured"]) or "-"
        lines.append(f"| {name} | {tokens} | {row['budget']} | "
                     f"{gib(m.get('peak_bytes'))} | {gib(p.get('peak_bytes'))} | {percent(row['error'])} | "
                     f"{m.get('peak_phase') or '-'} / {p.get('peak_phase') or '-'} | {outcome(m, False)} | "
                     f"{outcome(p, True)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=Path, nargs="+", help="original_gpu_run's results files")
    parser.add_argument("--out", type=Path, required=True, help="JSON-lines file of the rows (replaced)")
    parser.add_argument("--files", type=Path, help="the model's files without weights (config, code, tokenizer)")
    parser.add_argument("--code-dir", type=Path, help="the original's remote-code folder, to write the files")
    parser.add_argument("--steps", default="", help="comma-separated steps to predict (default: every record's)")
    parser.add_argument("--design", action="store_true", help="also DESIGN.md section 6's rows at 1387 tokens")
    parser.add_argument("--show", action="store_true", help="print the table of an existing --out, predict nothing")
    parser.add_argument("--update", action="store_true", help="keep --out's rows of the steps not predicted now")
    parser.add_argument("--check-cpu", action="store_true", help="predict and measure --steps on this CPU instead")
    parser.add_argument("--max-new-tokens", type=int, default=2, help="with --check-cpu: new tokens per caption")
    args = parser.parse_args(argv)
    if args.show:
        print(markdown(read_jsonl(args.out, what="estimate rows", hint="written by this command")))
        return 0
    from xcomp_lab.original.environment import prepare_transformers

    prepare_transformers({"HF_HOME": tempfile.mkdtemp(prefix="hf-home-"), "HF_HUB_OFFLINE": "1",
                          "TRANSFORMERS_OFFLINE": "1"})
    image = os.fspath(package_file(*SAMPLE))
    if args.check_cpu:
        if (args.files is None and args.code_dir is None) or not args.steps:
            parser.error("--check-cpu needs --steps and --code-dir (or --files: a small checkpoint's folder)")
        files = args.files or build_original_checkpoint(check_code_dir(args.code_dir), "small").path
        write_jsonl(args.out, check_cpu(args.steps.split(","), files, "small", image, args.max_new_tokens))
        return 0
    if not args.records:
        parser.error("pass --records (original_gpu_run's results files), or --check-cpu")
    records = latest_records(args.records)
    wanted = {name for name in args.steps.split(",") if name}
    records = [(r, p) for r, p in records if not wanted or r["params"]["original_step"] in wanted]
    if not records:
        raise SystemExit(f"no records of steps {sorted(wanted)} in {[os.fspath(p) for p in args.records]}")
    scale = records[0][0]["params"]["scale"]
    files = model_files(args.files, args.code_dir, scale)
    rows = [row for record, path in records for row in rows_for(record, path, files, image)]
    if args.design:
        rows += design_rows(files, scale, image, wanted)
    if args.update and args.out.is_file():
        fresh = {(row["step"], row["source"], row["budget"]): row for row in rows}
        kept = read_jsonl(args.out, what="estimate rows")
        rows = [fresh.pop((row["step"], row["source"], row["budget"]), row) for row in kept] + list(fresh.values())
    write_jsonl(args.out, rows)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
