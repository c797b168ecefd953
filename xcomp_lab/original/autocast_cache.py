"""Does autocast keep its low-precision weight copies? The experiment behind the quick start's OOM, on any torch.

    python -m xcomp_lab.original.autocast_cache [--out docs/autocast-cache.json]

Autocast caches the copy it casts of a weight for as long as the autocast block lasts, when the weight is a leaf
that requires grad (parameters do, even under no_grad). PyTorch PR #165068 (torch 2.10 and later) stopped that
inside `inference_mode`; on older torch, `inference_mode` keeps the copies too. CPU autocast shares the cache
logic, so the question is answered on a CPU: `LAYERS` FP32 linears of `WIDTH` x `WIDTH` run once under
`torch.autocast("cpu", dtype=torch.bfloat16)` in each setting below, measured by the course's tensor accounting
(`xcomp_lab.memory.measure`). Needs only torch (and this package on the path), so it runs under old versions too.

Settings: no autocast (the reference), the quick start (`no_grad` + autocast), `inference_mode` + autocast,
`no_grad` + `autocast(cache_enabled=False)`, and `no_grad` + autocast on parameters with `requires_grad_(False)`.
`cached_copies_bytes` is each setting's peak above the reference's, in units of one layer's copy.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from xcomp_lab.memory.measure import measure

LAYERS, WIDTH = 8, 2048
COPY_DTYPE = torch.bfloat16
SETTINGS = ("no-autocast", "no_grad+autocast", "inference_mode+autocast", "no_grad+autocast(cache_enabled=False)",
            "no_grad+autocast, requires_grad_(False)")


def _run(setting: str) -> int:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(LAYERS)))
    if setting.endswith("requires_grad_(False)"):
        model.requires_grad_(False)
    x = torch.randn(4, WIDTH)
    grad = torch.inference_mode() if setting.startswith("inference_mode") else torch.no_grad()
    cast = (nullcontext() if setting == "no-autocast" else
            torch.autocast("cpu", dtype=COPY_DTYPE, cache_enabled="cache_enabled=False" not in setting))
    with grad, cast, measure("cpu", model=model) as meter:
        model(x)
    return meter.result.peak_bytes - meter.result.start_bytes


def run_experiment() -> dict[str, Any]:
    """Each setting's peak above the weights, and how many layers' copies that is beyond the reference."""
    copy = WIDTH * WIDTH * torch.empty((), dtype=COPY_DTYPE).element_size()
    above = {setting: _run(setting) for setting in SETTINGS}
    reference = above["no-autocast"]
    return {
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "processor": platform.processor() or None, "layers": LAYERS, "width": WIDTH, "copy_dtype": str(COPY_DTYPE),
        "weights_bytes": LAYERS * WIDTH * WIDTH * 4, "one_copy_bytes": copy,
        "peak_above_weights_bytes": above,
        "cached_copies": {setting: round((value - reference) / copy, 2) for setting, value in above.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="append this torch's result to a JSON list in this file")
    args = parser.parse_args(argv)
    result = run_experiment()
    print(json.dumps(result, indent=1))
    if args.out is not None:
        runs = json.loads(args.out.read_text()) if args.out.is_file() else []
        runs = [run for run in runs if run["torch"] != result["torch"]] + [result]
        args.out.write_text(json.dumps(runs, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
