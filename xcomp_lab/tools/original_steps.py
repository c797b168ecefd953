"""Run the course's steps through the original model's own remote code, in its environment (transformers 4.33.2).

    .venv-original/bin/python -m xcomp_lab.tools.original_steps --code-dir ../shared/reference/internlm-xcomposer2-vl-7b \
        --results results/original-small-cpu/results.jsonl [--scale small] [--device cpu] [--steps fp32-quickstart,...]

Builds (or reuses) the original-code checkpoint of `--scale` from the remote-code files in `--code-dir`
(`xcomp_lab.model.original`), or takes a real downloaded checkpoint with `--checkpoint` (its own folder holds the
code), puts its environment in force before transformers is imported, and runs `xcomp_lab.original.steps` on the
first sample scene: one results record per step appended to `--results`, and with `--report` one JSON file
holding them all with the versions that ran. Refused unless the transformers it imports is 4.33.2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from xcomp_lab.core.resources import package_file
from xcomp_lab.model.original import SCALES, build_original_checkpoint, check_code_dir

DEFAULT_STEPS = ("fp32-quickstart", "fp32-no-autocast", "fp32-inference-mode", "fp32-grad-enabled", "fp32-device-map",
                 "fp16-half", "fp16-half-no-autocast", "fp16", "bf16", "fp16-sdpa", "int8", "int8-plora", "int8-skip",
                 "nf4", "nf4-plora", "nf4-skip")
SAMPLE = ("xcomp_lab.data", "samples", "scene-0.png")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--code-dir", type=Path, help="folder holding the five remote-code files; a checkpoint of "
                                                      "random weights is built from them")
    source.add_argument("--checkpoint", type=Path, help="a downloaded internlm-xcomposer2-vl-7b folder (real weights)")
    parser.add_argument("--scale", default="small", choices=sorted(SCALES), help="with --code-dir: the build's size")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--steps", default=",".join(DEFAULT_STEPS), help="comma-separated original-code steps")
    parser.add_argument("--budget-gb", type=float, default=48.0, help="the card whose budget the course emulates")
    parser.add_argument("--max-new-tokens", type=int, default=2,
                        help="new tokens per caption (2: the prefill and the first decode step, where the "
                             "original's peak falls)")
    parser.add_argument("--results", type=Path, required=True, help="JSON-lines file the records are appended to")
    parser.add_argument("--report", type=Path, help="also write every record and the versions to this JSON file")
    parser.add_argument("--image", type=Path, help="image to caption (default: the first sample scene)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.checkpoint is not None:
        checkpoint, code_dir = args.checkpoint, check_code_dir(args.checkpoint)
        variables = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")}
    else:
        code_dir = check_code_dir(args.code_dir)
        built = build_original_checkpoint(code_dir, args.scale)
        checkpoint, variables = built.path, built.environment()

    from xcomp_lab.original.environment import prepare_transformers

    notes = prepare_transformers(variables)
    import torch

    from xcomp_lab.original.steps import pretrained_loader, run_steps

    torch.set_grad_enabled(False)  # the quick start's first line
    device = args.device if args.device != "cuda" else "cuda:0"
    image = os.fspath(args.image or package_file(*SAMPLE))
    names = [name for name in args.steps.split(",") if name]
    records = run_steps(names, pretrained_loader(checkpoint, device), image=image, device=device, scale=args.scale,
                        code_dir=code_dir, checkpoint=os.fspath(checkpoint), results_path=args.results,
                        budget_gb=args.budget_gb, max_new_tokens=args.max_new_tokens, environment_notes=notes,
                        progress=lambda line: print(line, file=sys.stderr, flush=True))
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps({"records": records, "versions": records[0]["extra"]["versions"]
                                           if records else None}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
