"""The instructor guide, generated from the course's own measurements: `docs/instructor-guide.md`.

    python -m xcomp_lab.tools.guide                     # re-render the guide from the inputs committed in docs/
    python -m xcomp_lab.tools.guide --timings course-output/tiny-cpu/timings.json --note "..."
                                                  # first record a course run: timings, results, this machine
    python -m xcomp_lab.tools.guide --check             # exit 1 if the committed guide is not what its inputs give
    make guide NOTE="..."                         # run the course at tiny scale, record it and render

Every number in the guide is read from a file: the tiny-scale course run recorded in `docs/`
(`timings-tiny-cpu.json`, `results-tiny-cpu.jsonl`) and the full-scale GPU run in `results/full-h100/`.
The hand-written parts are the learning goals (`GOALS`) and the safety notes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xcomp_lab.lessons.device_map import split_report
from xcomp_lab.core.units import GIB, fmt_bytes

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
GUIDE = DOCS / "instructor-guide.md"
TIMINGS = DOCS / "timings-tiny-cpu.json"
TINY_RESULTS = DOCS / "results-tiny-cpu.jsonl"
FULL = ROOT / "results" / "full-h100"
SPLIT = ROOT / "results" / "full-h100x2" / "split.jsonl"


@dataclass(frozen=True)
class Goals:
    """What one notebook asks and what a learner should be able to do after it."""

    question: str
    goals: tuple[str, ...]


GOALS: dict[str, Goals] = {
    "00": Goals("What is in the model, and what does params x bytes predict?", (
        "Name the parts of InternLM-XComposer2-VL-7B (InternLM2 decoder with PLoRA, CLIP ViT-L/14 at 490 px, "
        "projector) and say which part holds most of the 8.67 B parameters.",
        "Predict the weights' memory from parameters x bytes per parameter, in GiB, and explain the extra "
        "memory the count misses (the per-layer rotary caches).",
        "Explain what `trust_remote_code=True` runs, why to pin a revision and why to load safetensors.",
        "Caption an image with `model.chat()` exactly as the model card does.",
    )),
    "01": Goals("Why does the FP32 quick start run out of memory on 48 GB?", (
        "Emulate a 48 GB card (48 x 10**9 bytes, 44.70 GiB) and reproduce a real `OutOfMemoryError`.",
        "Read the error: what was allocated, what was asked for, and why attention is not the cause.",
        "Explain autocast's cache of FP16 weight copies under `no_grad`, and two fixes that keep FP32 "
        "(no autocast, or `inference_mode`).",
        "Recover from an OOM without restarting the kernel.",
    )),
    "02": Goals("`.half()` after loading, `dtype=` at load, or bfloat16?", (
        "Measure that 16 bits halve the weights, and that `.half()` after an FP32 load pays for the FP32 model first.",
        "Load with `dtype=` so the peak while loading stays at the 16-bit size.",
        "Compare FP16 and BF16 captions and logits against FP32 (drift, top-1 agreement) and their speed.",
    )),
    "03": Goals("What do `.eval()`, `no_grad` and `inference_mode` each save?", (
        "Separate what `.eval()` does (dropout off, reproducible answers) from what it does not (memory).",
        "Measure the memory a forgotten gradient mode costs in a scoring pass, and why a captioning call is "
        "protected by `generate()`'s own `no_grad`.",
        "Choose between `no_grad` and `inference_mode`.",
    )),
    "04": Goals("Eager vs sdpa, image size, batch and KV cache: where does the peak come from?", (
        "Count the tokens an image brings (1225 at 490 px) and relate the peak to prompt length and batch.",
        "Explain eager attention's batch x heads x T x T scores and when sdpa lowers the peak.",
        "Predict the KV cache from its formula and check it against measurement.",
        "Spot the FP32 logits of the whole prompt as part of the peak.",
    )),
    "05": Goals("`device_map=\"auto\"`, `max_memory` and CPU offload: what fits where, at what cost?", (
        "Plan the full model on the meta device: per-module sizes and how `device_map` fills cards layer by layer.",
        "Set `max_memory` for one or two cards and read the resulting map.",
        "Measure that offloading frees resident memory, keeps the caption and costs time on every token.",
    )),
    "06": Goals("bitsandbytes INT8 and NF4: what do they save and what do they cost?", (
        "Predict INT8 and NF4 footprints and explain what stays 16-bit (output head, embeddings, norms).",
        "Check that PLoRA still acts on image tokens after quantization.",
        "Weigh memory against speed (dequantization per matrix product) and caption quality.",
    )),
    "07": Goals("What do `memory_summary()`, snapshots and a timeline tell us?", (
        "Read `torch.cuda.memory_summary()`: allocated vs reserved, and what each line means.",
        "Record a memory snapshot and a timeline of one caption, and read it phase by phase "
        "(load, vision, prefill, decode).",
        "Name what the tools cannot see (reserved but unallocated, workspaces, memory outside PyTorch).",
    )),
    "08": Goals("All steps side by side, and a planner for your own card.", (
        "Compare every step of the course in one chart: memory, speed, quality.",
        "Use the planner (estimator on fake tensors) to decide whether a configuration fits a given card.",
        "Pick the cheapest change that fits a given card and defend the choice with the course's numbers.",
    )),
}


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a results file (one JSON object a line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No results file at {path}; a course run writes <output>/results.jsonl.")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{path} holds no records; did the course run finish?")
    return records


def _find(records: list[dict[str, Any]], step: str, *, with_extra: str | None = None) -> dict[str, Any]:
    """The first record of `step` (that has `with_extra` in its `extra`)."""
    for r in records:
        if r["step"] == step and (with_extra is None or with_extra in (r.get("extra") or {})):
            return r
    detail = f" with extra[{with_extra!r}]" if with_extra else ""
    raise KeyError(f"No record of step {step!r}{detail}; the guide needs it. Steps present: "
                   f"{sorted({r['step'] for r in records})}")


def _find_before(records: list[dict[str, Any]], step: str, anchor: str) -> dict[str, Any]:
    """The last record of `step` before the first record of `anchor` (a notebook's own reference run)."""
    anchor_at = records.index(_find(records, anchor))
    for r in reversed(records[:anchor_at]):
        if r["step"] == step:
            return r
    raise KeyError(f"No record of step {step!r} before {anchor!r}; the guide compares the two.")


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return None
    kib = int(re.search(r"MemTotal:\s+(\d+) kB", meminfo.read_text()).group(1))
    return round(kib * 1024 / GIB, 1)


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def describe_machine() -> dict[str, Any]:
    """This machine as the timings need it named: CPU, cores, memory, load, threads and the code's commit."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average_1_5_15_min_at_recording": [round(x, 2) for x in os.getloadavg()],
        "commit": _git("rev-parse", "HEAD"),
        "uncommitted_changes": None if status is None else bool(status),
    }


def record_run(timings: str | os.PathLike, docs: str | os.PathLike = DOCS, note: str = "") -> Path:
    """Copy a course run's `timings.json` and `results.jsonl` into `docs`, with this machine described.

    Run it right after the course, on the same machine and in the same environment (OMP_NUM_THREADS): the
    load averages and the thread setting are read now.
    """
    timings = Path(timings)
    if not timings.is_file():
        raise FileNotFoundError(f"No timings file at {timings}; `python -m xcomp_lab.tools.course --output DIR` writes "
                                "DIR/timings.json.")
    run = json.loads(timings.read_text())
    missing = {"parameters", "seconds"} - set(run)
    if missing:
        raise ValueError(f"{timings} lacks {sorted(missing)}; is it a timings.json written by xcomp_lab.tools.course?")
    records = read_records(timings.parent / "results.jsonl")
    stamps = sorted(r["timestamp"] for r in records)
    first = records[0]
    recorded = {
        "parameters": run["parameters"],
        "seconds": run["seconds"],
        "results": {"first": stamps[0], "last": stamps[-1], "count": len(records)},
        "software": {"torch": first["torch_version"], "transformers": first["transformers_version"]},
        "machine": describe_machine(),
        "note": note,
    }
    docs = Path(docs)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / TIMINGS.name).write_text(json.dumps(recorded, indent=2) + "\n")
    shutil.copyfile(timings.parent / "results.jsonl", docs / TINY_RESULTS.name)
    return docs / TIMINGS.name


def _tiny_machine(run: dict[str, Any]) -> str:
    """The CPU machine in full: cores, model, memory, threads and library versions."""
    m, s = run["machine"], run["software"]
    memory = f" ({m['memory_gib']:g} GiB RAM)" if m.get("memory_gib") else ""
    threads = f", OMP_NUM_THREADS={m['omp_num_threads']}" if m.get("omp_num_threads") else ""
    return f"{_tiny_short(run)}{memory}{threads}, torch {s['torch']}, transformers {s['transformers']}"


def _tiny_short(run: dict[str, Any]) -> str:
    return f"{run['machine']['cores']}-core {run['machine']['cpu']} CPU"


def _gpu_machine(env: dict[str, Any]) -> str:
    return (f"{env['gpu']} ({env['total_memory_bytes'] / GIB:.2f} GiB), torch {env['torch']}, CUDA {env['cuda']}, "
            f"transformers {env['transformers']}")


def _allocated(record: dict[str, Any]) -> str:
    """What PyTorch had allocated when a CUDA OOM was raised, as its error message says."""
    found = re.search(r"([\d.]+ [KMG]iB) is allocated by PyTorch", record.get("error") or "")
    if not found:
        raise ValueError(f"The error of step {record['step']!r} does not say what was allocated: {record['error']!r}")
    return found.group(1)


def _pct(new: float, old: float) -> str:
    return f"{(new - old) / old:+.0%}"


def _notebook_names(run: dict[str, Any]) -> list[str]:
    names = sorted(run["seconds"])
    lacking = [n for n in names if n[:2] not in GOALS]
    if lacking:
        raise ValueError(f"No learning goals for {lacking}; add them to xcomp_lab.tools.guide.GOALS.")
    return names


def header(run: dict[str, Any]) -> str:
    return f"""# Instructor guide

<!-- Generated by `python -m xcomp_lab.tools.guide` from docs/timings-tiny-cpu.json, docs/results-tiny-cpu.jsonl and
results/full-h100/; edit xcomp_lab/guide.py and regenerate instead of editing this file. -->

This guide is for whoever runs the xcomp-lab course as a workshop. Every measurement quoted in it is read from a
recorded run: the tiny-scale course run on a CPU recorded in `docs/` ({run['results']['count']} records, {run['results']['first']}
to {run['results']['last']}) and the full-scale GPU run in `results/full-h100/`. Each number names the machine it
was measured on."""


def setup_section() -> str:
    return """## Before the workshop

One command sets everything up and proves it works, on any machine with Python 3.11, `make` and PyPI (no GPU,
no conda, no model hub):

```bash
make course   # creates .venv from the pinned requirements.txt, then runs all nine notebooks at tiny scale
```

Run it once on the workshop machines (or the image learners will use) the day before: it installs the pinned
packages, builds and caches the tiny checkpoint and writes `course-output/tiny-cpu/summary.html`, so the first
notebook in the room starts at once. Then `make lab` opens JupyterLab on `notebooks/`. `make site` builds the
static HTML edition (`site/index.html`) for learners who only read. Nothing downloads a model: the course's
checkpoints are built locally and `HF_HUB_OFFLINE=1` is set by the Makefile."""


def timings_section(run: dict[str, Any]) -> str:
    seconds = run["seconds"]
    total = sum(seconds.values())
    rows = "\n".join(f"| `{name.removesuffix('.ipynb')}` | {seconds[name]:.1f} | {seconds[name] / total:.0%} |"
                     for name in _notebook_names(run))
    params = run["parameters"]
    load = run["machine"]["load_average_1_5_15_min_at_recording"]
    note = f" {run['note']}" if run.get("note") else ""
    return f"""## How long each notebook takes (tiny scale, measured)

Execution time of each notebook in one course run (`python -m xcomp_lab.tools.course`, papermill, kernel start
included) at `scale="{params['scale']}"` on `device="{params['device']}"`, on a {_tiny_machine(run)}. Load
averages (1, 5, 15 min) when the run was recorded, shortly after it ended: {', '.join(f'{x:.2f}' for x in load)}.{note}

| notebook | seconds | share |
|---|---|---|
{rows}
| **all** | **{total:.1f}** | |

These are machine times, not teaching times: a notebook runs in seconds here, and the room spends its time
reading the outputs and answering the questions at the end of each notebook."""


def goals_section(run: dict[str, Any]) -> str:
    parts = ["## Learning goals, notebook by notebook"]
    for name in _notebook_names(run):
        goals = GOALS[name[:2]]
        bullets = "\n".join(f"- {g}" for g in goals.goals)
        parts.append(f"### [`{name.removesuffix('.ipynb')}`](../notebooks/{name}) ({run['seconds'][name]:.1f} s at tiny "
                     "scale)\n\n"
                     f"*{goals.question}* After it, learners can:\n\n{bullets}")
    return "\n\n".join(parts)


def gpu_section(full: list[dict[str, Any]], env: dict[str, Any], full_notebooks: list[str]) -> str:
    stamps = sorted(r["timestamp"] for r in full)
    executed = ", ".join(f"`{n.removesuffix('.ipynb')}`" for n in full_notebooks) or "none yet"
    return f"""## The GPU edition

The same course at the real 7B-VL size needs a CUDA GPU with more memory than the card it emulates (a 48 GB card
is emulated with `torch.cuda.set_per_process_memory_fraction`). Every course step at full scale, in one command:

```bash
python -m xcomp_lab.tools.gpu_run --out results/full-h100 --budget-gb 48
```

One notebook at full scale, with papermill:

```bash
python -m papermill notebooks/01-reproduce-the-oom.ipynb out.ipynb -p scale full -p device cuda --cwd notebooks
```

and all nine: `make course SCALE=full DEVICE=cuda`. The committed full-scale run measured {len(full)} steps on an
{_gpu_machine(env)}, recorded from {stamps[0]} to {stamps[-1]} (`results/full-h100/results.jsonl`); notebooks
executed at full scale so far: {executed} (`results/full-h100/notebooks/`)."""


def faq_oom(full: list[dict[str, Any]], tiny: list[dict[str, Any]], env: dict[str, Any]) -> str:
    quick, plain, inference = (_find(full, s) for s in ("fp32-quickstart", "fp32-no-autocast", "fp32-inference-mode"))
    if not quick["oom"]:
        raise ValueError("The full-scale quick start no longer ran out of memory; rewrite faq_oom for the new result.")
    asked = re.search(r"Tried to allocate ([\d.]+ [KMG]iB)", quick["error"]).group(1)
    allocated = _allocated(quick)
    tiny_quick = _find(tiny, "fp32-quickstart")
    tiny_outcome = (f"runs out of its scaled budget too ({fmt_bytes(tiny_quick['peak_bytes'])} reached of "
                    f"{fmt_bytes(tiny_quick['budget_bytes'])})" if tiny_quick["oom"] else "fits its scaled budget")
    return f"""### Why did the FP32 quick start run out of memory at 44 GB?

Because of autocast, not attention. On the {env['gpu']}, under an emulated 48 GB card
({fmt_bytes(quick['budget_bytes'])} allowed: 48 GB is 48 x 10^9 bytes), the FP32 weights take
{fmt_bytes(quick['weights_bytes'])}. The quick start (`torch.set_grad_enabled(False)` and `model.chat` inside
autocast) died asking for {asked} with {allocated} allocated by PyTorch, the report's "44.16 GB in use". The same call
without autocast peaks at {fmt_bytes(plain['peak_bytes'])}, and autocast inside `inference_mode` at
{fmt_bytes(inference['peak_bytes'])}: when it died, the quick start held {fmt_bytes(quick['peak_bytes'] - plain['peak_bytes'])}
more than the whole call without autocast needs. That is autocast's cache of FP16 copies of the FP32 weights, kept
because parameters require grad even under `no_grad` (notebook 01). At tiny scale the quick start
{tiny_outcome}."""


def faq_eval(full: list[dict[str, Any]], tiny: list[dict[str, Any]], env: dict[str, Any], machine: str) -> str:
    train, evaluated = _find(tiny, "03-prefill-train-mode"), _find(tiny, "03-prefill-no-grad")
    grad, inference = _find(tiny, "03-prefill-grad-enabled"), _find(tiny, "03-prefill-inference-mode")
    delta = train["peak_bytes"] - evaluated["peak_bytes"]
    unbudgeted = grad["extra"].get("unbudgeted_peak_bytes")
    grad_text = (f"ran out of the budget ({fmt_bytes(grad['budget_bytes'])})"
                 + (f" and needs {fmt_bytes(unbudgeted)} without one" if unbudgeted else "")) if grad["oom"] \
        else f"peaked at {fmt_bytes(grad['peak_bytes'])}"
    caption_grad, caption_plain = _find(full, "fp32-grad-enabled"), _find(full, "fp32-no-autocast")
    return f"""### Does `.eval()` save memory?

No. On the {machine}, one forward pass over the caption prompt under `no_grad` peaked at
{fmt_bytes(train['peak_bytes'])} in training mode and {fmt_bytes(evaluated['peak_bytes'])} in eval mode: a difference
of {fmt_bytes(delta)} ({delta / evaluated['peak_bytes']:.1%} of the peak), dropout's own temporaries. `.eval()` makes
answers reproducible (dropout off), and `from_pretrained` already returns the model in eval mode. The gradient
mode is what decides memory: the same pass with gradients enabled {grad_text}, against
{fmt_bytes(evaluated['peak_bytes'])} under `no_grad` and {fmt_bytes(inference['peak_bytes'])} under `inference_mode`
(notebook 03). A captioning call is protected by `generate()`'s own `no_grad`: on the {env['gpu']}, the FP32 caption
with gradients enabled peaked at {fmt_bytes(caption_grad['peak_bytes'])} against {fmt_bytes(caption_plain['peak_bytes'])}
under `no_grad` ({fmt_bytes(caption_grad['peak_bytes'] - caption_plain['peak_bytes'])} more: the graph of the vision
tower and projector, which run before `generate`)."""


def faq_int8(full: list[dict[str, Any]], tiny: list[dict[str, Any]], env: dict[str, Any], machine: str) -> str:
    fp16, int8, nf4 = (_find(full, s) for s in ("fp16", "int8", "nf4"))
    quality = {"fp16": _find_before(tiny, "fp16", "int8")["extra"], "int8": _find(tiny, "int8")["extra"],
               "nf4": _find(tiny, "nf4")["extra"]}
    speeds = ", ".join(f"{r['tokens_per_s']:.1f} ({r['step'].upper()})" for r in (fp16, int8, nf4))
    agreement = ", ".join(f"{quality[s]['top1_agreement']:.1%} ({s.upper()})" for s in quality)
    return f"""### How much does INT8 save?

On the {env['gpu']}, INT8 cut the weights from {fmt_bytes(fp16['weights_bytes'])} (FP16) to
{fmt_bytes(int8['weights_bytes'])} ({_pct(int8['weights_bytes'], fp16['weights_bytes'])}) and the caption's peak from
{fmt_bytes(fp16['peak_bytes'])} to {fmt_bytes(int8['peak_bytes'])} ({_pct(int8['peak_bytes'], fp16['peak_bytes'])}); NF4
went to {fmt_bytes(nf4['weights_bytes'])} of weights and a {fmt_bytes(nf4['peak_bytes'])} peak. Not the ideal half and
quarter, because the output head, the embeddings and the norms stay 16-bit (notebook 06). Tokens per second, single
runs without warm-up, so rough: {speeds}. Quality, on the {machine} with this run's checkpoint (see the
note under the timings): the next-token
choice agrees with the FP32 reference at {agreement} of prompt positions."""


def faq_device_map(tiny: list[dict[str, Any]], full: list[dict[str, Any]], machine: str, split: str | None) -> str:
    offload = _find(tiny, "05-fp16-offload-disk")
    reference = _find_before(tiny, "fp16", "05-fp16-offload-disk")
    same = offload["caption"] == reference["caption"]
    full_offload = [r["step"] for r in full if "offload" in r["step"] or "device_map" in (r.get("extra") or {})]
    full_text = (f"The full-scale GPU run measured {', '.join(full_offload)}." if full_offload else
                 "The committed full-scale GPU run has no offload step yet, so its price on a real card is not "
                 "measured here; notebook 05 plans the full model's map on the meta device.")
    return f"""### Is `device_map="auto"` free?

When the whole model fits on one card, `device_map="auto"` places every module there and offloads nothing. When it
does not fit, it offloads, and that is paid in time, not in quality. On the {machine}, offloading half the decoder layers to disk
cut resident weights from {fmt_bytes(reference['weights_bytes'])} to {fmt_bytes(offload['weights_bytes'])}
({_pct(offload['weights_bytes'], reference['weights_bytes'])}) and the peak from {fmt_bytes(reference['peak_bytes'])}
to {fmt_bytes(offload['peak_bytes'])}; the caption was {'identical' if same else 'DIFFERENT'}. Tokens per second,
one run each inside the memory accounting on a shared machine, so rough: {reference['tokens_per_s']:.1f} without
offload, {offload['tokens_per_s']:.1f} with it. The cost grows with what is offloaded: every generated token reads
the offloaded weights again (from disk on a CPU, across PCIe on a GPU). {full_text}{_split_text(split)}"""


def _split_text(split: str | None) -> str:
    if split is None:
        return ""
    return f"""

Split over two GPUs instead (`python -m xcomp_lab.tools.gpu_split_run`, two H100s each emulating a 24 GB card,
`{SPLIT.relative_to(ROOT)}`), each card's measured peak against the per-card estimate, and the speed against the
whole model on one card:

```
{split}
```

Two cards give memory, not speed: they run one after the other."""


def faq_sdpa(full: list[dict[str, Any]], tiny: list[dict[str, Any]], env: dict[str, Any], machine: str) -> str:
    eager, sdpa = _find(full, "fp16"), _find(full, "fp16-sdpa")
    t_eager, t_sdpa = _find(tiny, "04-eager-336px-b1"), _find(tiny, "04-sdpa-336px-b1")
    prompt = full[0]["extra"]["prompt_tokens"]
    return f"""### Does sdpa attention lower the peak?

Only when the attention scores are the peak. On the {env['gpu']} with one 490 px image ({prompt} prompt tokens),
FP16 peaked at {fmt_bytes(eager['peak_bytes'])} with eager attention and {fmt_bytes(sdpa['peak_bytes'])} with sdpa: the
peak there is the prompt's FP32 logits, not the scores. On the {machine}, with a 336 px image
({t_eager['extra']['prompt_tokens']} prompt tokens), eager peaked at {fmt_bytes(t_eager['peak_bytes'])} and sdpa at
{fmt_bytes(t_sdpa['peak_bytes'])} ({_pct(t_sdpa['peak_bytes'], t_eager['peak_bytes'])}): the scores grow with the square
of the prompt (notebook 04)."""


def faq_half(full: list[dict[str, Any]], tiny: list[dict[str, Any]], machine: str) -> str:
    half, at_load = (_find(tiny, s, with_extra="load_after_bytes")["extra"] for s in ("fp16-half", "fp16"))
    return f"""### Is `.half()` after loading as good as `dtype=torch.float16`?

For the caption, yes; for loading, no. On the {machine}, the process held {fmt_bytes(half['load_before_bytes'])}
of FP32 weights before `.half()` brought them to {fmt_bytes(half['load_after_bytes'])}; with `dtype=torch.float16`
at load the weights were read as FP16 and ended at {fmt_bytes(at_load['load_after_bytes'])}, with no FP32 copy on
the way: for `.half()`, the FP32 model has to fit first (notebook 02). The captions' peaks afterwards match
({fmt_bytes(_find(full, 'fp16-half')['peak_bytes'])} and {fmt_bytes(_find(full, 'fp16')['peak_bytes'])} on the
{full[0]['device_name']})."""


def faq_estimator(predictions: dict[str, Any], full: list[dict[str, Any]], env: dict[str, Any]) -> str:
    fitting = {step: p["ratio"] for step, p in predictions.items() if not p["measured_oom"]}
    worst = max(abs(r - 1) for r in fitting.values())
    oom = [(step, p) for step, p in predictions.items() if p["measured_oom"]]
    oom_text = "; ".join(
        f"for `{step}` it predicted {'an' if p['predicted_oom'] else 'no'} OOM, at {p['oom_op']} ({p['oom_phase']}) with "
        f"{fmt_bytes(p['oom_in_use_bytes'])} in use (measured: {_allocated(_find(full, step))} allocated when it "
        "failed)" for step, p in oom)
    return f"""### Can I trust the estimator and the planner?

At full scale, for the steps it covers: the estimator (`xcomp_lab.estimate.caption`, fake tensors on a CPU, no GPU) was
within {worst:.1%} of the peak measured on the {env['gpu']} for each of the {len(fitting)} steps that fit
(`results/full-h100/predictions.json`); {oom_text}. Its blind spots are what the allocator cannot see either:
memory outside PyTorch (CUDA context, cuBLAS workspaces) and fragmentation (notebook 07)."""


def faq_budget(tiny: list[dict[str, Any]], machine: str) -> str:
    quick = _find(tiny, "fp32-quickstart")
    return f"""### What does "a 48 GB card" mean on a CPU?

The course scales the card to the tiny model: the same ratio of budget to FP32 parameter bytes as 48 GB to the full
model, enforced by counting every tensor allocation. On the {machine} that budget was
{fmt_bytes(quick['budget_bytes'])} for {fmt_bytes(quick['weights_bytes'])} of FP32 weights. It raises the same kind of
error as the GPU allocator; each notebook says which budget is in force."""


def safety_section() -> str:
    return """## Safety: what loading a model runs

Notebook 00 teaches these four points where the model is first loaded; learners will ask about them.

### What does `trust_remote_code=True` run?

The Python files shipped inside the checkpoint (`config.json`'s `auto_map` names them): the course's own
`modeling_internlm_xcomposer2.py` for the replica, the original authors' code for real weights. It runs with
your permissions, on import, before any weight is read. Read those files first.

### How do I make sure I run the code I read?

Pin the exact version: `from_pretrained(..., revision="<commit hash>")` fixes both the weights and the remote code
to one commit of the hub repository; a branch name such as `main` can change under you. For a local copy, keep
the directory read-only and under version control.

### Why safetensors, and what about `.bin` files?

A safetensors file holds tensors and a JSON header, nothing executable. A pickled `.bin` (or `.pt`) checkpoint can
run arbitrary code when it is unpickled. Pass `use_safetensors=True` to `from_pretrained` to refuse pickled
weights; if you must read one, use `torch.load(path, weights_only=True)` (torch's default since 2.6; older torch
and transformers versions, such as those the real model's card pins, may not default to it, so pass it
explicitly). The course's checkpoints are safetensors only (`xcomp_lab/model/checkpoint.py`), and the Makefile
sets `HF_HUB_OFFLINE=1`, so nothing is fetched from a hub."""


def refresh_section() -> str:
    return """## Refreshing this guide

After the notebooks or the tiny checkpoint change, one command runs the course, records it and regenerates
this file (the table above says how long the course takes):

```bash
make guide NOTE="what else ran on the machine, which checkpoint"
```

It runs `python -m xcomp_lab.tools.course --output course-output/guide`, then
`python -m xcomp_lab.tools.guide --timings course-output/guide/timings.json --note "..."` (both with
`OMP_NUM_THREADS=1`), which copies the timings and results into `docs/` with this machine described, and renders
`docs/instructor-guide.md`. Commit the three files.
`python -m xcomp_lab.tools.guide` alone re-renders from the committed inputs; `tests/test_guide.py` fails when the
committed guide is not what they give."""


def render_guide(timings: str | os.PathLike = TIMINGS, tiny_results: str | os.PathLike = TINY_RESULTS,
                 full: str | os.PathLike = FULL) -> str:
    """The guide as markdown, from a recorded tiny run and a full-scale results folder."""
    timings, full = Path(timings), Path(full)
    if not timings.is_file():
        raise FileNotFoundError(f"No recorded run at {timings}; record one with "
                                "`python -m xcomp_lab.tools.guide --timings <course-output>/timings.json`.")
    for name in ("results.jsonl", "env.json", "predictions.json"):
        if not (full / name).is_file():
            raise FileNotFoundError(f"{full} lacks {name}; `python -m xcomp_lab.tools.gpu_run --out {full}` writes it.")
    run = json.loads(timings.read_text())
    tiny = read_records(tiny_results)
    full_records = read_records(full / "results.jsonl")
    env = json.loads((full / "env.json").read_text())
    predictions = json.loads((full / "predictions.json").read_text())
    full_notebooks = sorted(p.name for p in (full / "notebooks").glob("[0-9][0-9]-*.ipynb"))
    machine = f"{_tiny_short(run)} (tiny scale)"
    faq = [
        "## Common questions, answered from the course's measurements",
        faq_eval(full_records, tiny, env, machine),
        faq_oom(full_records, tiny, env),
        faq_int8(full_records, tiny, env, machine),
        faq_device_map(tiny, full_records, machine, split_report(SPLIT) if SPLIT.is_file() else None),
        faq_sdpa(full_records, tiny, env, machine),
        faq_half(full_records, tiny, machine),
        faq_estimator(predictions, full_records, env),
        faq_budget(tiny, machine),
    ]
    sections = [header(run), setup_section(), timings_section(run), goals_section(run),
                gpu_section(full_records, env, full_notebooks), "\n\n".join(faq), safety_section(), refresh_section()]
    return "\n\n".join(sections) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timings", type=Path, help="a course run's timings.json to record into docs/ first")
    parser.add_argument("--note", default="", help="what else ran on the machine, checkpoint used, ...")
    parser.add_argument("--check", action="store_true", help="only check that the committed guide is current")
    args = parser.parse_args(argv)
    if args.check and args.timings:
        parser.error("--check compares the committed guide with the committed inputs; it records nothing")
    if args.timings:
        print(f"recorded {record_run(args.timings, note=args.note)}")
    text = render_guide()
    if args.check:
        current = GUIDE.is_file() and GUIDE.read_text() == text
        print(f"{GUIDE} is {'current' if current else 'stale: run python -m xcomp_lab.tools.guide'}")
        return 0 if current else 1
    GUIDE.write_text(text)
    print(f"guide written to {GUIDE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
