"""Measure the peak on each card of the model split over two GPUs, next to the per-card prediction.

    python -m xcomp_lab.tools.gpu_split_run --out results/full-h100x2 --per-card-gb 24

Run on 2026-11-25 on two H100s (results/full-h100x2/: every card within 0.4% of its prediction). CI has no
GPU: tests/test_gpu_split_run.py checks its arguments and its refusal without two GPUs; tests/test_device_map.py
checks the report of that run (`xcomp_lab.lessons.device_map.split_report`).

Needs at least two CUDA GPUs (it refuses otherwise). Builds (or reuses) the full-scale FP16 checkpoint, then
for each dtype (FP32 and FP16 by default):

1. split: emulates cards of `--per-card-gb` GB on GPUs 0 and 1 (`set_per_process_memory_fraction` per device),
   loads with `from_pretrained(device_map="auto", max_memory={0: "<gb>GB", 1: "<gb>GB"})`, captions one image
   once to warm up, resets every card's peak, captions again (greedy, `no_grad`, no autocast, eager attention)
   and reads `torch.cuda.max_memory_allocated(i)` on each card. The same call is predicted per card by
   `estimate_split_caption` on the map the load really made (`model.hf_device_map`), on this host's CPU.
2. one card (unless `--no-one-card`): the same dtype on GPU 0 alone (`device_map={"": 0}`), no budget (the whole
   physical card), warmed up the same way: the tokens/s the split is compared with.

Each run appends one record to `<out>/split.jsonl`: per card its weights, measured and predicted peak and their
ratio, the budget, the OOM card measured and predicted, tokens/s, the caption and the map; `<out>/env.json`
names the GPUs and versions.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import transformers

from xcomp_lab.core.dtypes import DTYPE_NAMES
from xcomp_lab.core.machine import gpu_environment
from xcomp_lab.core.units import gb_to_bytes
from xcomp_lab.course.notebook import batch_of_images
from xcomp_lab.course.params import check_params
from xcomp_lab.estimate import estimate_split_caption, plan_from_pretrained
from xcomp_lab.memory import Budget
from xcomp_lab.memory.footprint import resident_bytes
from xcomp_lab.model.checkpoint import build_checkpoint
from xcomp_lab.model.loading import load_model
from xcomp_lab.model.scales import SCALES
from xcomp_lab.run.call import run_caption

CARDS = (0, 1)
_GPU_IN_MESSAGE = re.compile(r"GPU (\d+)")


class NotEnoughGpus(SystemExit):
    """Raised (exit status 1, message on stderr) when fewer than two CUDA GPUs are visible."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked: a positive card size, known dtypes and scale, a positive token count."""
    parser = argparse.ArgumentParser(prog="python -m xcomp_lab.tools.gpu_split_run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for split.jsonl and env.json, e.g. results/full-h100x2")
    parser.add_argument("--per-card-gb", type=float, default=24.0, help="each card's size to emulate, in GB (10**9)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float16"], help=f"any of {list(DTYPE_NAMES)}")
    parser.add_argument("--scale", default="full", help=f"one of {sorted(SCALES)}")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--no-one-card", action="store_true", help="skip the one-card speed reference")
    parser.add_argument("--deadline-s", type=float, default=1e9, help="skip runs that would start after this")
    args = parser.parse_args(argv)
    if not args.per_card_gb > 0:
        parser.error(f"--per-card-gb {args.per_card_gb:g}; give each card's size in GB, e.g. --per-card-gb 24")
    unknown = [d for d in args.dtypes if d not in DTYPE_NAMES]
    if unknown:
        parser.error(f"--dtypes {' '.join(args.dtypes)}: {unknown} unknown; choose from {list(DTYPE_NAMES)}")
    if args.scale not in SCALES:
        parser.error(f"--scale {args.scale}; choose one of {sorted(SCALES)}")
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens {args.max_new_tokens}; generate at least 1 token")
    return args


def require_gpus(n: int = len(CARDS)) -> int:
    """The number of visible CUDA GPUs; raises NotEnoughGpus, saying why and what to do, below `n`."""
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible < n:
        raise NotEnoughGpus(
            f"gpu_split_run needs at least {n} CUDA GPUs, but {visible} {'is' if visible == 1 else 'are'} visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}). Run it on a machine with {n} or "
            "more GPUs; without them, predict the per-card peaks on a CPU with "
            "xcomp_lab.estimate.split.course_split_estimates().")
    return visible


@contextmanager
def card_budgets(gb: float) -> Iterator[None]:
    """A `gb` GB card emulated on each of GPUs 0 and 1 for the block."""
    with ExitStack() as stack:
        for card in CARDS:
            stack.enter_context(Budget.for_card(gb, device=f"cuda:{card}").applied())
        yield


def _release() -> None:
    gc.collect()
    for card in range(torch.cuda.device_count()):
        torch.cuda.synchronize(card)
    torch.cuda.empty_cache()


def _caption(model: Any, tokenizer: Any, images: list[Any], max_new_tokens: int, image_size: int | None,
             label: str) -> Any:
    """One warm-up call (2 tokens), every card's peak reset, then the measured call."""
    settings = dict(device="cuda:0", grad="no_grad", use_autocast=False, image_size=image_size, label=label)
    run_caption(model, tokenizer, images, max_new_tokens=2, **settings)
    _release()
    for card in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(card)
    return run_caption(model, tokenizer, images, max_new_tokens=max_new_tokens, **settings)


def _record(case: str, kind: str, dtype: str, gb: float | None, run: Any, cards: dict[int, dict[str, Any]],
            extra: dict[str, Any]) -> dict[str, Any]:
    oom_text = run.memory.error or ""
    match = _GPU_IN_MESSAGE.search(oom_text) if run.memory.oom else None
    return {"case": case, "kind": kind, "dtype": dtype, "per_card_gb": gb, "timestamp": time.time(),
            "oom": run.memory.oom, "oom_card_measured": int(match.group(1)) if match else None,
            "error": run.memory.error, "caption": run.captions[0] if run.ok else None,
            "prompt_tokens": run.prompt_tokens, "new_tokens": run.new_tokens, "seconds": round(run.seconds, 3),
            "tokens_per_s": run.tokens_per_s, "kv_cache_bytes": run.memory.kv_cache_bytes,
            "cards": {str(card): numbers for card, numbers in cards.items()}, **extra}


def measure_split(path: Path, args: argparse.Namespace, dtype: str, images: list[Any],
                  image_size: int | None) -> dict[str, Any]:
    """Load split over cards 0 and 1 under per-card budgets, caption, and set each card's peak beside its prediction."""
    gb, case = args.per_card_gb, f"{len(CARDS)}x{args.per_card_gb:g}GB-{dtype}"
    max_memory = {card: f"{gb:g}GB" for card in CARDS}
    with card_budgets(gb):
        model, tokenizer = load_model(path, dtype=dtype, device_map="auto", max_memory=max_memory,
                                      attn_implementation="eager")
        device_map = dict(model.hf_device_map)
        weights = {card: resident_bytes(model, f"cuda:{card}") for card in CARDS}
        run = _caption(model, tokenizer, images, args.max_new_tokens, image_size, case)
        peaks = {card: torch.cuda.max_memory_allocated(card) for card in CARDS}
    del model
    _release()
    predicted = estimate_split_caption(args.scale, device_map, dtype=dtype, grad="no_grad",
                                       new_tokens=args.max_new_tokens, image_size=image_size,
                                       budget=gb_to_bytes(gb), tokenizer=tokenizer, label=case)
    planned = plan_from_pretrained(args.scale, max_memory, dtype=dtype).device_map
    cards = {card: {"weights_bytes": weights[card], "peak_bytes": peaks[card],
                    "predicted_peak_bytes": predicted.cards[card].peak_bytes,
                    "predicted_weights_bytes": predicted.cards[card].weights_bytes,
                    "measured_over_predicted": round(peaks[card] / predicted.cards[card].peak_bytes, 4),
                    "budget_bytes": gb_to_bytes(gb)} for card in CARDS}
    return _record(case, "split", dtype, gb, run, cards, {
        "device_map": {k: str(v) for k, v in device_map.items()}, "map_as_planned": device_map == planned,
        "oom_card_predicted": predicted.oom_card, "prediction": predicted.summary(),
        "prediction_seconds": round(predicted.seconds, 1)})


def measure_one_card(path: Path, args: argparse.Namespace, dtype: str, images: list[Any],
                     image_size: int | None) -> dict[str, Any]:
    """The same call with the whole model on GPU 0 and no budget: the speed the split is compared with."""
    case = f"1-card-{dtype}"
    model, tokenizer = load_model(path, dtype=dtype, device_map={"": 0}, attn_implementation="eager")
    run = _caption(model, tokenizer, images, args.max_new_tokens, image_size, case)
    cards = {0: {"peak_bytes": torch.cuda.max_memory_allocated(0), "budget_bytes": None}}
    del model
    _release()
    return _record(case, "one-card", dtype, None, run, cards, {})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_gpus()
    began = time.perf_counter()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "env.json").write_text(json.dumps(gpu_environment(), indent=2))
    transformers.utils.logging.set_verbosity_error()
    params = check_params(scale=args.scale, device="cuda", budget_gb=args.per_card_gb,
                          max_new_tokens=args.max_new_tokens, results_path=out / "split.jsonl")
    path = build_checkpoint(args.scale, "float16", seed=0, device="cuda")
    images = batch_of_images(params)
    runs = [(measure_split, dtype) for dtype in args.dtypes]
    runs += [] if args.no_one_card else [(measure_one_card, dtype) for dtype in args.dtypes]
    for measure_run, dtype in runs:
        if time.perf_counter() - began > args.deadline_s:
            print(f"skipped {measure_run.__name__} {dtype}: past the deadline", flush=True)
            continue
        record = measure_run(path, args, dtype, images, params.image_size)
        with (out / "split.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        cards = " | ".join(f"card {c}: peak {n['peak_bytes'] / 2**30:.2f} GiB"
                           + (f" (predicted x{n['measured_over_predicted']})" if "measured_over_predicted" in n else "")
                           for c, n in record["cards"].items())
        print(f"{record['case']}: {cards} | {record['tokens_per_s'] or 0:.1f} tok/s"
              + (f" | OOM on card {record['oom_card_measured']}" if record["oom"] else ""), flush=True)
    print(f"done in {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
