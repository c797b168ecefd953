"""The instructor guide, generated from the course's own measurements: `docs/instructor-guide.md`.

    python -m xcomp_lab.tools.guide                     # re-render the guide from the inputs committed in docs/
    python -m xcomp_lab.tools.guide --timings course-output/tiny-cpu/timings.json --note "..."
                                                  # first record a course run: timings, results, this machine
    python -m xcomp_lab.tools.guide --check             # exit 1 if the committed guide is not what its inputs give
    make guide NOTE="..."                         # run the course at tiny scale, record it and render

The text is the Jinja2 template `xcomp_lab/tools/templates/instructor-guide.md.j2` (package data): every heading,
sentence, command and table layout, and the formatting of each figure. This module reads the inputs, computes
every figure the text quotes and renders: the tiny-scale course run recorded in `docs/` (`timings-tiny-cpu.json`,
`results-tiny-cpu.jsonl`), the full-scale GPU run in `results/full-h100/` and, when present, the two-GPU split in
`results/full-h100x2/split.jsonl`; paths are found from `repository_root()` when a function runs.

The learning goals (`GOALS`) stay here as Python data rather than in the template or a data file: they are
checked against the notebooks a run timed (a notebook without goals is refused), tests read them, and a typed
table needs no loader or schema of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from xcomp_lab.core.jsonl import read_jsonl
from xcomp_lab.core.machine import describe_machine
from xcomp_lab.core.resources import package_file, repository_root
from xcomp_lab.core.units import GIB, fmt_bytes
from xcomp_lab.lessons.device_map import split_report
from xcomp_lab.model.configuration_internlm_xcomposer2 import VIT_L14_490

TEMPLATE = "instructor-guide.md.j2"
TIMINGS_NAME = "timings-tiny-cpu.json"
TINY_RESULTS_NAME = "results-tiny-cpu.jsonl"


@dataclass(frozen=True)
class GuidePaths:
    """Where the guide's inputs are read and the guide is written."""

    docs: Path
    guide: Path
    timings: Path
    tiny_results: Path
    full: Path
    split: Path


def guide_paths(root: Path | None = None) -> GuidePaths:
    """The guide's files in a checkout (default: `repository_root()`, looked up now)."""
    root = repository_root() if root is None else Path(root)
    docs = root / "docs"
    return GuidePaths(docs=docs, guide=docs / "instructor-guide.md", timings=docs / TIMINGS_NAME,
                      tiny_results=docs / TINY_RESULTS_NAME, full=root / "results" / "full-h100",
                      split=root / "results" / "full-h100x2" / "split.jsonl")


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


def record_run(timings: str | os.PathLike, docs: str | os.PathLike | None = None, note: str = "") -> Path:
    """Copy a course run's `timings.json` and `results.jsonl` into `docs` (default: the checkout's `docs/`), with
    this machine described.

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
    results = timings.parent / "results.jsonl"
    records = read_jsonl(results, what="course results", hint="a course run writes <output>/results.jsonl")
    if not records:
        raise ValueError(f"{results} holds no records; did the course run finish?")
    stamps = sorted(r["timestamp"] for r in records)
    first = records[0]
    recorded = {
        "parameters": run["parameters"],
        "seconds": run["seconds"],
        "results": {"first": stamps[0], "last": stamps[-1], "count": len(records)},
        "software": {"torch": first["torch_version"], "transformers": first["transformers_version"]},
        "machine": describe_machine(repository_root()),
        "note": note,
    }
    docs = guide_paths().docs if docs is None else Path(docs)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / TIMINGS_NAME).write_text(json.dumps(recorded, indent=2) + "\n")
    shutil.copyfile(results, docs / TINY_RESULTS_NAME)
    return docs / TIMINGS_NAME


def _allocated(record: dict[str, Any]) -> str:
    """What PyTorch had allocated when a CUDA OOM was raised, as its error message says."""
    found = re.search(r"([\d.]+ [KMG]iB) is allocated by PyTorch", record.get("error") or "")
    if not found:
        raise ValueError(f"The error of step {record['step']!r} does not say what was allocated: {record['error']!r}")
    return found.group(1)


def _change(new: float, old: float) -> float:
    """The relative change from `old` to `new` (the template shows it as a signed percentage)."""
    return (new - old) / old


def _image_px(record: dict[str, Any]) -> int:
    """The image side a record's run used: its own setting, else the model's vision tower default."""
    return record["params"]["image_size"] or VIT_L14_490["image_size"]


def _tiny(run: dict[str, Any]) -> dict[str, Any]:
    """The recorded tiny-scale run: machine, software, load, note and each notebook's time and goals."""
    names = sorted(run["seconds"])
    lacking = [n for n in names if n[:2] not in GOALS]
    if lacking:
        raise ValueError(f"No learning goals for {lacking}; add them to xcomp_lab.tools.guide.GOALS.")
    total = sum(run["seconds"].values())
    machine, software = run["machine"], run["software"]
    return {
        "records": run["results"]["count"], "first": run["results"]["first"], "last": run["results"]["last"],
        "scale": run["parameters"]["scale"], "device": run["parameters"]["device"],
        "cores": machine["cores"], "cpu": machine["cpu"], "memory_gib": machine.get("memory_gib"),
        "omp_num_threads": machine.get("omp_num_threads"), "torch": software["torch"],
        "transformers": software["transformers"], "load": machine["load_average_1_5_15_min_at_recording"],
        "note": run.get("note") or "", "total_seconds": total,
        "notebooks": [{"name": name, "stem": name.removesuffix(".ipynb"), "seconds": run["seconds"][name],
                       "share": run["seconds"][name] / total, "question": GOALS[name[:2]].question,
                       "goals": GOALS[name[:2]].goals} for name in names],
    }


def _full(full: list[dict[str, Any]], env: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The full-scale GPU run: its card, software, budget, span and the notebooks executed at full scale."""
    stamps = sorted(r["timestamp"] for r in full)
    return {
        "steps": len(full), "first": stamps[0], "last": stamps[-1], "card_gb": full[0]["params"]["budget_gb"],
        "gpu": env["gpu"], "gpu_gib": env["total_memory_bytes"] / GIB, "torch": env["torch"], "cuda": env["cuda"],
        "transformers": env["transformers"],
        "executed": [p.stem for p in sorted((folder / "notebooks").glob("[0-9][0-9]-*.ipynb"))],
    }


def _eval_mode(full: list[dict[str, Any]], tiny: list[dict[str, Any]]) -> dict[str, Any]:
    """Training vs eval mode and the gradient modes, tiny scale; the FP32 caption with and without grad, full scale."""
    train, evaluated = _find(tiny, "03-prefill-train-mode"), _find(tiny, "03-prefill-no-grad")
    grad, inference = _find(tiny, "03-prefill-grad-enabled"), _find(tiny, "03-prefill-inference-mode")
    caption_grad, caption_plain = _find(full, "fp32-grad-enabled"), _find(full, "fp32-no-autocast")
    dropout = train["peak_bytes"] - evaluated["peak_bytes"]
    return {
        "train_peak": train["peak_bytes"], "eval_peak": evaluated["peak_bytes"], "dropout": dropout,
        "dropout_share": dropout / evaluated["peak_bytes"], "grad_oom": grad["oom"],
        "grad_budget": grad["budget_bytes"],
        "grad_unbudgeted_peak": grad["extra"].get("unbudgeted_peak_bytes"), "grad_peak": grad["peak_bytes"],
        "inference_peak": inference["peak_bytes"], "caption_grad_peak": caption_grad["peak_bytes"],
        "caption_plain_peak": caption_plain["peak_bytes"],
        "caption_graph": caption_grad["peak_bytes"] - caption_plain["peak_bytes"],
    }


def _quick_start(full: list[dict[str, Any]], tiny: list[dict[str, Any]]) -> dict[str, Any]:
    """The FP32 quick start's OOM at full scale against the same call without autocast; its outcome at tiny scale."""
    quick, plain, inference = (_find(full, s) for s in ("fp32-quickstart", "fp32-no-autocast", "fp32-inference-mode"))
    if not quick["oom"]:
        raise ValueError("The full-scale quick start no longer ran out of memory; rewrite its answer in "
                         f"xcomp_lab/tools/templates/{TEMPLATE} for the new result.")
    tiny_quick = _find(tiny, "fp32-quickstart")
    return {
        "card_gb": quick["params"]["budget_gb"], "budget": quick["budget_bytes"], "weights": quick["weights_bytes"],
        "asked": re.search(r"Tried to allocate ([\d.]+ [KMG]iB)", quick["error"]).group(1),
        "allocated": _allocated(quick), "plain_peak": plain["peak_bytes"], "inference_peak": inference["peak_bytes"],
        "autocast_cache": quick["peak_bytes"] - plain["peak_bytes"], "tiny_oom": tiny_quick["oom"],
        "tiny_peak": tiny_quick["peak_bytes"], "tiny_budget": tiny_quick["budget_bytes"],
    }


def _quantized(full: list[dict[str, Any]], tiny: list[dict[str, Any]]) -> dict[str, Any]:
    """INT8 and NF4 against FP16: memory and speed at full scale, next-token agreement at tiny scale."""
    fp16, int8, nf4 = (_find(full, s) for s in ("fp16", "int8", "nf4"))
    quality = {"fp16": _find_before(tiny, "fp16", "int8")["extra"], "int8": _find(tiny, "int8")["extra"],
               "nf4": _find(tiny, "nf4")["extra"]}
    return {
        "fp16_weights": fp16["weights_bytes"], "int8_weights": int8["weights_bytes"],
        "nf4_weights": nf4["weights_bytes"], "fp16_peak": fp16["peak_bytes"], "int8_peak": int8["peak_bytes"],
        "nf4_peak": nf4["peak_bytes"], "int8_weights_change": _change(int8["weights_bytes"], fp16["weights_bytes"]),
        "int8_peak_change": _change(int8["peak_bytes"], fp16["peak_bytes"]),
        "speeds": [{"label": r["step"].upper(), "tokens_per_s": r["tokens_per_s"]} for r in (fp16, int8, nf4)],
        "agreement": [{"label": s.upper(), "top1": q["top1_agreement"]} for s, q in quality.items()],
    }


def _offload(tiny: list[dict[str, Any]], full: list[dict[str, Any]]) -> dict[str, Any]:
    """Half the decoder offloaded to disk against the notebook's own FP16 run (tiny scale); full-scale offload steps."""
    offload = _find(tiny, "05-fp16-offload-disk")
    resident = _find_before(tiny, "fp16", "05-fp16-offload-disk")
    return {
        "resident_weights": resident["weights_bytes"], "offloaded_weights": offload["weights_bytes"],
        "weights_change": _change(offload["weights_bytes"], resident["weights_bytes"]),
        "resident_peak": resident["peak_bytes"], "offloaded_peak": offload["peak_bytes"],
        "same_caption": offload["caption"] == resident["caption"],
        "resident_tokens_per_s": resident["tokens_per_s"], "offloaded_tokens_per_s": offload["tokens_per_s"],
        "full_steps": [r["step"] for r in full if "offload" in r["step"] or "device_map" in (r.get("extra") or {})],
    }


def _split(path: Path) -> dict[str, Any] | None:
    """The two-GPU split runs: the per-card budgets and `split_report`'s lines; None without a split.jsonl."""
    if not path.is_file():
        return None
    records = read_jsonl(path, what="two-GPU runs")
    return {"card_gb": sorted({r["per_card_gb"] for r in records if r["kind"] == "split"}),
            "report": split_report(path)}


def _sdpa(full: list[dict[str, Any]], tiny: list[dict[str, Any]]) -> dict[str, Any]:
    """Eager against sdpa attention: one full-size image at full scale, the largest tiny image at tiny scale."""
    eager, sdpa = _find(full, "fp16"), _find(full, "fp16-sdpa")
    t_eager, t_sdpa = _find(tiny, "04-eager-336px-b1"), _find(tiny, "04-sdpa-336px-b1")
    return {
        "image_px": _image_px(full[0]), "prompt_tokens": full[0]["extra"]["prompt_tokens"],
        "eager_peak": eager["peak_bytes"], "sdpa_peak": sdpa["peak_bytes"], "tiny_image_px": _image_px(t_eager),
        "tiny_prompt_tokens": t_eager["extra"]["prompt_tokens"], "tiny_eager_peak": t_eager["peak_bytes"],
        "tiny_sdpa_peak": t_sdpa["peak_bytes"], "tiny_change": _change(t_sdpa["peak_bytes"], t_eager["peak_bytes"]),
    }


def _half(full: list[dict[str, Any]], tiny: list[dict[str, Any]]) -> dict[str, Any]:
    """`.half()` after an FP32 load against `dtype=torch.float16` at load: the load at tiny scale, the peaks at full."""
    half, at_load = (_find(tiny, s, with_extra="load_after_bytes")["extra"] for s in ("fp16-half", "fp16"))
    return {
        "fp32_loaded": half["load_before_bytes"], "halved": half["load_after_bytes"],
        "loaded_as_fp16": at_load["load_after_bytes"], "full_half_peak": _find(full, "fp16-half")["peak_bytes"],
        "full_fp16_peak": _find(full, "fp16")["peak_bytes"], "full_device": full[0]["device_name"],
    }


def _estimator(predictions: dict[str, Any], full: list[dict[str, Any]]) -> dict[str, Any]:
    """The estimator's worst error on the steps that fit, and what it predicted for those that ran out of memory."""
    fitting = {step: p["ratio"] for step, p in predictions.items() if not p["measured_oom"]}
    return {
        "worst_error": max(abs(r - 1) for r in fitting.values()), "fitting": len(fitting),
        "oom": [{"step": step, "predicted_oom": p["predicted_oom"], "op": p["oom_op"], "phase": p["oom_phase"],
                 "in_use": p["oom_in_use_bytes"], "allocated": _allocated(_find(full, step))}
                for step, p in predictions.items() if p["measured_oom"]],
    }


def _budget(tiny: list[dict[str, Any]]) -> dict[str, Any]:
    """The scaled card of the tiny run: the card it stands for, its budget and the FP32 weights."""
    quick = _find(tiny, "fp32-quickstart")
    return {"card_gb": quick["params"]["budget_gb"], "budget": quick["budget_bytes"], "weights": quick["weights_bytes"]}


def guide_context(paths: GuidePaths | None = None) -> dict[str, Any]:
    """Every value the template needs, read and computed from the inputs `paths` names (default: the checkout's)."""
    paths = guide_paths() if paths is None else paths
    if not paths.timings.is_file():
        raise FileNotFoundError(f"No recorded run at {paths.timings}; record one with "
                                "`python -m xcomp_lab.tools.guide --timings <course-output>/timings.json`.")
    for name in ("results.jsonl", "env.json", "predictions.json"):
        if not (paths.full / name).is_file():
            raise FileNotFoundError(f"{paths.full} lacks {name}; "
                                    f"`python -m xcomp_lab.tools.gpu_run --out {paths.full}` writes it.")
    run = json.loads(paths.timings.read_text())
    tiny = read_jsonl(paths.tiny_results, what="tiny-scale results",
                      hint="record a course run with `python -m xcomp_lab.tools.guide --timings <output>/timings.json`")
    full = read_jsonl(paths.full / "results.jsonl", what="full-scale results")
    env = json.loads((paths.full / "env.json").read_text())
    predictions = json.loads((paths.full / "predictions.json").read_text())
    return {
        "tiny": _tiny(run), "full": _full(full, env, paths.full), "eval_mode": _eval_mode(full, tiny),
        "quick_start": _quick_start(full, tiny), "quantized": _quantized(full, tiny), "offload": _offload(tiny, full),
        "split": _split(paths.split), "sdpa": _sdpa(full, tiny), "half": _half(full, tiny),
        "estimator": _estimator(predictions, full), "budget": _budget(tiny),
    }


def _template_source(name: str) -> tuple[str, str, None]:
    """A template shipped in xcomp_lab/tools/templates, read through importlib.resources."""
    found = package_file("xcomp_lab.tools", "templates", name)
    return found.read_text(encoding="utf-8"), str(found), None


def guide_template() -> jinja2.Template:
    """The guide's template; an undefined value raises jinja2.UndefinedError instead of rendering empty."""
    environment = jinja2.Environment(loader=jinja2.FunctionLoader(_template_source), undefined=jinja2.StrictUndefined,
                                     keep_trailing_newline=True, autoescape=False, trim_blocks=True,
                                     lstrip_blocks=True)
    environment.filters["bytes"] = fmt_bytes
    environment.filters["fmt"] = format
    return environment.get_template(TEMPLATE)


def render_guide(paths: GuidePaths | None = None) -> str:
    """The guide as markdown, from the recorded runs `paths` names (default: the checkout's)."""
    return guide_template().render(guide_context(paths))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timings", type=Path, help="a course run's timings.json to record into docs/ first")
    parser.add_argument("--note", default="", help="what else ran on the machine, checkpoint used, ...")
    parser.add_argument("--check", action="store_true", help="only check that the committed guide is current")
    args = parser.parse_args(argv)
    if args.check and args.timings:
        parser.error("--check compares the committed guide with the committed inputs; it records nothing")
    paths = guide_paths()
    if args.timings:
        print(f"recorded {record_run(args.timings, paths.docs, note=args.note)}")
    text = render_guide(paths)
    if args.check:
        current = paths.guide.is_file() and paths.guide.read_text() == text
        print(f"{paths.guide} is {'current' if current else 'stale: run python -m xcomp_lab.tools.guide'}")
        return 0 if current else 1
    paths.guide.write_text(text)
    print(f"guide written to {paths.guide}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
