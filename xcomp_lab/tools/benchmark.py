"""How good is the estimator, and what does measuring cost? `python -m xcomp_lab.tools.benchmark`.

1. Tiny scale on this CPU, every course step: the measured peak (`run_step` under the course budget)
   against the predicted one, their ratio, and OOM measured / predicted.
2. The CPU accounting's overhead: one caption, exactly as `run_caption` makes it, timed with and without
   `measure` around it (the best of a few runs each, interleaved).
3. Full scale on CUDA under a 48 GB card, every step: the predictions to compare with the GPU run later,
   and how long each took here.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any, Sequence

import torch

from xcomp_lab.core.units import fmt_bytes
from xcomp_lab.course.params import CourseParams, check_params
from xcomp_lab.course.steps import STEPS, Step, course_budget, load_for_step, run_step
from xcomp_lab.data.scenes import make_dataset
from xcomp_lab.estimate import estimate_step
from xcomp_lab.memory import measure
from xcomp_lab.model.inventory import parameter_count
from xcomp_lab.model.scales import config_for_scale
from xcomp_lab.model.tokenizer import CAPTION_QUERY
from xcomp_lab.run.call import autocast, grad_mode
from xcomp_lab.run.captioning import prompt_batch
from xcomp_lab.run.generate import greedy_generate


def _images(params: CourseParams) -> list[Any]:
    size = params.image_size or config_for_scale(params.scale).image_size
    return [image for image, _ in make_dataset(params.batch_size, seed=1000, image_size=size)]


def tiny_rows(params: CourseParams | None = None) -> list[dict[str, Any]]:
    """Measured against predicted, per step, at tiny scale on CPU."""
    params = params or check_params(device="cpu")
    budget = course_budget(params, parameter_count(params.scale) * 4)  # the notebooks' budget
    images = _images(params)
    rows = []
    for step in STEPS.values():
        start = time.perf_counter()
        predicted = estimate_step(step, params)
        seconds = time.perf_counter() - start
        model, tokenizer = load_for_step(step, params)
        run, _ = run_step(step, model, tokenizer, images, params, budget)
        rows.append(dict(step=step.name, measured=run.memory.peak_bytes, predicted=predicted.peak_bytes,
                         unseen=predicted.quant_state_bytes, oom_measured=run.memory.oom,
                         oom_predicted=predicted.oom, predict_s=seconds, estimate=predicted, run=run))
    return rows


def _caption(model: Any, tokenizer: Any, images: Sequence[Any], step: Step, params: CourseParams) -> None:
    """The body of `run_caption`'s measured step, without the measurement."""
    with grad_mode(step.grad), autocast(params.device, step.use_autocast):
        embeds, im_mask = prompt_batch(model, tokenizer, images, CAPTION_QUERY, params.image_size)
        greedy_generate(model, tokenizer, embeds, im_mask, max_new_tokens=params.max_new_tokens, return_cache=True)


def accounting_overhead(step: Step, params: CourseParams | None = None, repeats: int = 5,
                        threads: int = 1) -> tuple[float, float]:
    """(best seconds without measure, best seconds with measure) for one caption of `step`, on `threads` threads.

    One thread by default: on a busy 2-core machine, two OpenMP threads wait on each other and a tiny caption's
    time swings tenfold, while the accounting's cost (Python work per op) does not depend on threads.
    """
    params = params or check_params(device="cpu")
    model, tokenizer = load_for_step(step, params)
    images = _images(params)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _caption(model, tokenizer, images, step, params)  # warm-up: first calls pay for lazy initialisation
        plain, measured = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            _caption(model, tokenizer, images, step, params)
            plain.append(time.perf_counter() - start)
            start = time.perf_counter()
            with measure("cpu", model=model):
                _caption(model, tokenizer, images, step, params)
            measured.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return min(plain), min(measured)


def full_rows(budget_gb: float = 48) -> list[dict[str, Any]]:
    """Full-scale predictions on CUDA under a `budget_gb` card, per step (no GPU needed)."""
    params = dataclasses.replace(check_params(device="cpu", budget_gb=budget_gb), scale="full", device="cuda")
    rows = []
    for step in STEPS.values():
        start, cpu = time.perf_counter(), time.process_time()
        predicted = estimate_step(step, params)
        rows.append(dict(step=step.name, estimate=predicted, wall_s=time.perf_counter() - start,
                         cpu_s=time.process_time() - cpu))
    return rows


def _yes(flag: bool | None) -> str:
    return "-" if flag is None else ("yes" if flag else "no")


def format_tiny(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'step':<20}{'measured':>12}{'predicted':>12}{'ratio':>7}{'exact*':>7}  {'OOM m/p':<9}{'predict':>8}"]
    for r in rows:
        # CPU accounting cannot see bitsandbytes' statistics: without them the prediction is what it counts.
        seen = r["predicted"] - r["unseen"]
        lines.append(f"{r['step']:<20}{fmt_bytes(r['measured']):>12}{fmt_bytes(r['predicted']):>12}"
                     f"{r['measured'] / r['predicted']:>7.3f}{r['measured'] / seen:>7.3f}  "
                     f"{_yes(r['oom_measured']) + '/' + _yes(r['oom_predicted']):<9}{r['predict_s']:>7.1f}s")
    lines.append("ratio = measured / predicted. exact* = the same without the bitsandbytes statistics (absmax/SCB),"
                 " which are not parameters and so invisible to CPU accounting. An OOM run's measured peak is where"
                 " it stopped.")
    for r in rows:
        if r["oom_measured"] or r["oom_predicted"]:
            lines.append(f"{r['step']}: predicted {r['estimate'].verdict()}")
    return "\n".join(lines)


def format_full(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'step':<20}{'weights':>11}{'KV':>11}{'activ.':>11}{'peak':>11}  {'48 GB card':<40}{'wall':>7}{'cpu':>7}"]
    for r in rows:
        e = r["estimate"]
        verdict = f"OOM in {e.oom_phase}" if e.oom else f"fits, {fmt_bytes(e.budget_bytes - e.peak_bytes)} spare"
        lines.append(f"{r['step']:<20}{fmt_bytes(e.weights_bytes):>11}{fmt_bytes(e.kv_cache_bytes):>11}"
                     f"{fmt_bytes(e.activations_bytes):>11}{fmt_bytes(e.peak_bytes):>11}  {verdict:<40}"
                     f"{r['wall_s']:>6.1f}s{r['cpu_s']:>6.1f}s")
    first = rows[0]["estimate"]
    lines.append(f"prompt {first.prompt_tokens} tokens (course tokenizer) + {first.new_tokens} new; peak = "
                 f"torch.cuda.max_memory_allocated as predicted; wall = elapsed here, cpu = this process's CPU time.")
    for r in rows:
        if r["estimate"].oom:
            lines.append(f"{r['step']}: {r['estimate'].verdict()}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per overhead measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while timing the overhead")
    parser.add_argument("--skip-full", action="store_true", help="leave out the full-scale predictions")
    args = parser.parse_args(argv)
    params = check_params(device="cpu")
    print(f"1. Tiny scale on CPU, {params}")
    print(format_tiny(tiny_rows(params)))
    print(f"\n2. CPU accounting overhead on one caption (best of {args.repeats} runs each, {args.threads} thread(s))")
    for name in ("fp32-no-autocast", "fp16", "int8", "nf4"):
        plain, measured = accounting_overhead(STEPS[name], params, args.repeats, args.threads)
        print(f"{name:<20} without {plain * 1000:7.1f} ms | with measure {measured * 1000:7.1f} ms | "
              f"x{measured / plain:.2f}")
    if not args.skip_full:
        print("\n3. Full scale on CUDA (predicted on this machine), 48 GB card = "
              f"{fmt_bytes(48 * 10**9)} allowed")
        print(format_full(full_rows()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
