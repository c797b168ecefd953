"""Run the course's steps at full scale on one GPU and write their results, in one command.

    python -m xcomp_lab.tools.gpu_run --out results/full-h100 --budget-gb 48

Builds the full-scale FP16 checkpoint (random weights drawn on the GPU, written shard by shard), then for
each step in `STEPS` loads the model as the step says (reusing it between steps that load alike), captions
one image under the budget and appends the record to `<out>/results.jsonl`. It also writes the environment
(`env.json`), the FP16 step's memory timeline and `memory_summary()` text. A deadline keeps the run inside a
rented machine's time: steps left when it passes are listed as skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
import transformers

from xcomp_lab.core.machine import gpu_environment
from xcomp_lab.core.units import fmt_bytes
from xcomp_lab.course.notebook import batch_of_images, record
from xcomp_lab.course.params import check_params
from xcomp_lab.course.steps import STEPS, course_budget, load_for_step, run_step
from xcomp_lab.model.checkpoint import build_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--scale", default="full", help="tiny, to smoke-test the script on a CPU")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget-gb", type=float, default=48.0)
    parser.add_argument("--steps", nargs="*", default=list(STEPS))
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--deadline-s", type=float, default=1e9, help="skip steps that would start after this")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    params = check_params(scale=args.scale, device=args.device, budget_gb=args.budget_gb, max_new_tokens=args.max_new_tokens,
                          results_path=out / "results.jsonl")
    (out / "env.json").write_text(json.dumps(gpu_environment(), indent=2))
    transformers.utils.logging.set_verbosity_error()

    start = time.perf_counter()
    build_checkpoint(args.scale, "float16", seed=0, device=args.device)
    print(f"checkpoint ready in {time.perf_counter() - start:.0f} s", flush=True)

    images = batch_of_images(params)
    model = tokenizer = loaded_as = budget = None
    skipped = []
    for name in args.steps:
        step = STEPS[name]
        if time.perf_counter() - began > args.deadline_s:
            skipped.append(name)
            continue
        load_key = (step.dtype, step.cast, step.quantization)
        if load_key != loaded_as:
            model = tokenizer = None
            gc.collect()
            torch.cuda.empty_cache()
            t = time.perf_counter()
            model, tokenizer = load_for_step(replace(step, attn_implementation=None), params)
            loaded_as = load_key
            print(f"loaded {load_key} in {time.perf_counter() - t:.0f} s", flush=True)
        if budget is None:
            budget = course_budget(params, model.config)
            print(budget.describe(), flush=True)
        model.config._attn_implementation = step.attn_implementation or params.attn_implementation
        run, rec = run_step(step, model, tokenizer, images, params, budget)
        rec["extra"]["seconds"] = round(run.seconds, 3)
        record(params, rec)
        print(f"  {step.describe()} | {run.tokens_per_s or 0:.1f} tok/s | reserved peak "
              f"{fmt_bytes(run.memory.reserved_peak_bytes or 0)}", flush=True)
        if not run.ok:
            print(run.oom_report, flush=True)
        if name == "fp16" and params.device == "cuda":
            (out / "timeline-fp16.json").write_text(json.dumps(run.memory.timeline))
            (out / "memory_summary-fp16.txt").write_text(torch.cuda.memory_summary())
    (out / "skipped.json").write_text(json.dumps(skipped))
    print(f"done in {time.perf_counter() - began:.0f} s; skipped: {skipped}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
