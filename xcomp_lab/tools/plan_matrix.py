"""The planner's validation matrix: measure one greedy generate call per setting, one JSON line each.

    python -m xcomp_lab.tools.plan_matrix --device cuda --out results/plan-matrix-h200   # every preset, on a GPU
    python -m xcomp_lab.tools.plan_matrix --device cpu --tiny --out /tmp/matrix         # tiny presets, on the CPU
    python -m xcomp_lab.tools.plan_matrix --accelerate --out results/plan-matrix-h200   # accelerate's anchors (CPU)
    python -m xcomp_lab.tools.plan_matrix --compare --out results/plan-matrix-h200      # the planner against them

For every preset, dtype (its published one) and quantization (none, INT8, NF4) the model is built once with
random weights (`plan.build.build_model`: what `from_pretrained` leaves), then, switching the attention in place
(eager, sdpa; Gemma 2 has no sdpa), one `generate(do_sample=False, max_new_tokens=min_new_tokens=N)` call runs for
every batch size and prompt length. A prompt is a number of text tokens plus, for a VLM, one image at the
model's default size, as many tokens as its processor makes of it. Builds run in an order that covers every
architecture and every quantization first, so that a run cut short by `--deadline-s` still covers both.

Each call is measured from a clean state (garbage collected, cache emptied, peaks reset). On CUDA the caching
allocator's `max_memory_allocated`/`max_memory_reserved` are read; on the CPU the tensor accounting of
`xcomp_lab.memory.measure` counts every storage. Phases are marked by forward hooks, which read the peak of the
phase that ends and reset it (`reset_peak_memory_stats` changes no allocation): "prefill" from the call's start
to the start of the second forward (the vision encoder's own forward, "vision", cut out of it), "decode" after.
The call's peak is the largest phase peak.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self
from unittest import mock

import torch
import transformers
from tqdm.auto import tqdm

from xcomp_lab.core.jsonl import append_jsonl, read_jsonl, write_jsonl
from xcomp_lab.core.machine import describe_machine, gpu_environment
from xcomp_lab.memory.footprint import resident_bytes, statistics_bytes
from xcomp_lab.memory.measure import CPU_KIND, CUDA_KIND, CpuAccounting
from xcomp_lab.plan.build import (
    ATTENTIONS,
    DTYPES,
    QUANTIZATIONS,
    build_model,
    image_inputs,
    make_inputs,
    meta_model,
    random_checkpoint,
)
from xcomp_lab.plan.estimate import supports_sdpa
from xcomp_lab.plan.presets import Preset, get_preset, preset_names

RECORDS = "records.jsonl"
COMPARE = "compare.jsonl"
CHART = "compare.png"
ENV = "env.json"
ANCHORS = "accelerate.jsonl"
VISION_TOWERS = ("visual", "vision_tower", "vision_model")  # Qwen2-VL, LLaVA, Idefics3


def dtype_name(dtype: torch.dtype) -> str:
    """"bf16", "fp16" or "fp32"."""
    return next(name for name, value in DTYPES.items() if value == dtype)


def versions() -> dict[str, str | None]:
    """The versions of the libraries a measurement depends on."""
    import accelerate
    import transformers
    try:
        import bitsandbytes
        bnb = bitsandbytes.__version__
    except ImportError:
        bnb = None
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "bitsandbytes": bnb}


def build_order(presets: Sequence[str], quantizations: Sequence[str]) -> list[tuple[str, str]]:
    """Every (preset, quantization), in rounds: each round builds every preset once, the quantization turning with
    the preset and the round, so that the first round covers every preset and every quantization."""
    return [(name, quantizations[(i + r) % len(quantizations)])
            for r in range(len(quantizations)) for i, name in enumerate(presets)]


def attentions_of(preset: Preset, attns: Sequence[str], tiny: bool) -> tuple[list[str], dict[str, str]]:
    """The attentions the model supports among `attns`, and a reason for each it does not."""
    config = preset.config(tiny)
    skipped = {"sdpa": f"{type(meta_model(config)).__name__} has no sdpa attention in "
                       f"transformers {transformers.__version__}"} \
        if "sdpa" in attns and not supports_sdpa(config) else {}
    return [a for a in attns if a not in skipped], skipped


class PhaseMeter:
    """The peaks of allocated (and, on CUDA, reserved) memory per phase of a block, read and reset at each mark."""

    def __init__(self, device: torch.device, model: torch.nn.Module) -> None:
        self.device, self.model = device, model
        self.phases: dict[str, dict[str, int | None]] = {}
        self.phase = "prefill"
        self.cpu: CpuAccounting | None = None

    def __enter__(self) -> Self:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = {"allocated": torch.cuda.memory_allocated(self.device),
                          "reserved": torch.cuda.memory_reserved(self.device)}
        else:
            weights = resident_bytes(self.model, "cpu")
            self.cpu = CpuAccounting(weights, budget=None, sample_every=1 << 20, max_samples=64)
            self.cpu.__enter__()
            self.start = {"allocated": weights, "reserved": None}
        self.t0 = time.perf_counter()
        return self

    def _close(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = {"allocated": torch.cuda.max_memory_allocated(self.device),
                    "reserved": torch.cuda.max_memory_reserved(self.device)}
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            peak = {"allocated": self.cpu.peak, "reserved": None}
            self.cpu.peak = self.cpu.current
        seen = self.phases.setdefault(self.phase, peak)
        for key, value in peak.items():
            if value is not None and value > seen[key]:
                seen[key] = value

    def mark(self, phase: str) -> None:
        """End the current phase (its peak so far kept) and start `phase`."""
        self._close()
        self.phase = phase

    def __exit__(self, *exc: object) -> None:
        self._close()
        self.seconds = time.perf_counter() - self.t0
        if self.cpu is not None:
            self.cpu.__exit__(None, None, None)

    def peak(self, key: str) -> int | None:
        """The block's peak of "allocated" or "reserved" (None for reserved on the CPU)."""
        values = [p[key] for p in self.phases.values() if p[key] is not None]
        return max(values) if values else None


def vision_tower(model: torch.nn.Module) -> torch.nn.Module | None:
    """The VLM's vision encoder (the first submodule named as one), or None for an LLM."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in VISION_TOWERS:
            return module
    return None


@contextmanager
def phase_hooks(model: torch.nn.Module, meter: PhaseMeter) -> Iterator[None]:
    """Mark "decode" at the second forward of the model and "vision" around its vision encoder's forward."""
    calls = [0]

    def on_forward(module: torch.nn.Module, args: Any, kwargs: Any) -> None:
        calls[0] += 1
        if calls[0] == 2:
            meter.mark("decode")

    handles = [model.register_forward_pre_hook(on_forward, with_kwargs=True)]
    tower = vision_tower(model)
    if tower is not None:
        handles.append(tower.register_forward_pre_hook(lambda *_: meter.mark("vision")))
        handles.append(tower.register_forward_hook(lambda *_: meter.mark("prefill")))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class Grid:
    """The calls measured on each built model."""

    batches: tuple[int, ...]
    text_tokens: tuple[int, ...]
    new_tokens: int


def measure_call(model: torch.nn.Module, inputs: dict[str, torch.Tensor], new_tokens: int,
                 device: torch.device) -> dict[str, Any]:
    """One greedy generate call of exactly `new_tokens` tokens, measured per phase."""
    inputs = {key: value.to(device) for key, value in inputs.items()}
    meter = PhaseMeter(device, model)
    error = None
    try:
        with meter, phase_hooks(model, meter), torch.inference_mode():
            model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           pad_token_id=model.generation_config.eos_token_id)
    except torch.OutOfMemoryError as exc:
        error = f"OutOfMemoryError: {str(exc).splitlines()[0]}"
    del inputs
    return {"start_allocated": meter.start["allocated"], "start_reserved": meter.start["reserved"],
            "allocated_peak": meter.peak("allocated"), "reserved_peak": meter.peak("reserved"),
            "phases": meter.phases, "seconds": round(meter.seconds, 4), "oom": error is not None, "error": error}


def _pad_token(model: torch.nn.Module) -> None:
    eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = eos[0] if isinstance(eos, list) else eos


def run_build(preset: Preset, quantization: str, attns: Sequence[str], grid: Grid, device: torch.device,
              tiny: bool, checkpoint: Any, common: dict[str, Any], out: Path, bar: tqdm) -> None:
    """Build one model and measure every call of the grid on it, appending each record to `out`."""
    supported, skipped = attentions_of(preset, attns, tiny)
    base = {**common, "preset": preset.name, "architecture": preset.config(tiny).model_type, "tiny": tiny,
            "dtype": dtype_name(preset.dtype), "quantization": quantization, "new_tokens": grid.new_tokens}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    model = build_model(preset, dtype=preset.dtype, attn=supported[0], quantization=quantization, device=device,
                        tiny=tiny, checkpoint=checkpoint)
    model.eval()
    load: dict[str, Any] = {"load_s": round(time.perf_counter() - t0, 3),
                            "parameter_bytes": resident_bytes(model, str(device)) + statistics_bytes(model)}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        load.update(weights_bytes=torch.cuda.memory_allocated(device),
                    load_allocated_peak=torch.cuda.max_memory_allocated(device),
                    load_reserved_peak=torch.cuda.max_memory_reserved(device))
    else:
        load.update(weights_bytes=load["parameter_bytes"], load_allocated_peak=None, load_reserved_peak=None)
    _pad_token(model)
    for attn in attns:
        if attn in skipped:
            append_jsonl(out, {**base, "attn": attn, "skipped": skipped[attn]})
            bar.update(len(grid.batches) * len(grid.text_tokens))
            continue
        model.set_attn_implementation(attn)
        for text_tokens in grid.text_tokens:
            image_size = preset.default_image_size(tiny) if preset.is_vlm else None
            for batch in grid.batches:
                inputs = make_inputs(preset, batch_size=batch, prompt_tokens=text_tokens + _image_tokens(preset, tiny),
                                     image_size=image_size, tiny=tiny)
                record = {**base, "attn": attn, "batch": batch, "prompt_tokens": inputs["input_ids"].shape[1],
                          "image_tokens": _image_count(preset, tiny, inputs["input_ids"][0]),
                          "image_size": image_size, "text_tokens": text_tokens, **load,
                          **measure_call(model, inputs, grid.new_tokens, device)}
                append_jsonl(out, record)
                bar.set_postfix_str(f"{preset.name} {quantization} {attn} b{batch} t{record['prompt_tokens']}")
                bar.update()
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _image_count(preset: Preset, tiny: bool, input_ids: torch.Tensor) -> int:
    """The image tokens in one prompt (0 for an LLM)."""
    return int((input_ids == preset.config(tiny).image_token_id).sum()) if preset.is_vlm else 0


def _image_tokens(preset: Preset, tiny: bool) -> int:
    """The tokens the processor's image segment takes (image tokens and their markers), 0 for an LLM."""
    if not preset.is_vlm:
        return 0
    return image_inputs(preset, preset.default_image_size(tiny), tiny)["input_ids"].shape[1]


def run_matrix(presets: Sequence[str], quantizations: Sequence[str], attns: Sequence[str], grid: Grid,
               device: torch.device, tiny: bool, out_dir: Path, deadline_s: float | None = None,
               done: Sequence[tuple[str, str]] = ()) -> Path:
    """Measure the matrix into `out_dir/records.jsonl` (appended call by call) and write `env.json`.

    `done`: (preset, quantization) builds measured by an earlier run, left out.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / RECORDS
    if out.exists():
        out.unlink()
    env = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "command": " ".join(["python -m xcomp_lab.tools.plan_matrix", *sys.argv[1:]]),
           "device": str(device), "versions": versions(), "machine": describe_machine(Path.cwd()),
           **({"gpu": gpu_environment()} if device.type == "cuda" else {})}
    (out_dir / ENV).write_text(json.dumps(env, indent=2) + "\n")
    common = {"device": str(device), "kind": CUDA_KIND if device.type == "cuda" else CPU_KIND,
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, **versions()}
    order = [build for build in build_order(presets, quantizations) if build not in set(done)]
    calls = len(attns) * len(grid.batches) * len(grid.text_tokens)
    checkpoints: dict[str, Any] = {}
    t0 = time.perf_counter()
    with tqdm(total=len(order) * calls, desc="plan matrix", unit="call") as bar:
        for name, quantization in order:
            preset = get_preset(name)
            if deadline_s is not None and time.perf_counter() - t0 > deadline_s:
                append_jsonl(out, {**common, "preset": name, "quantization": quantization, "tiny": tiny,
                                   "skipped": f"not started: the run's deadline of {deadline_s:g} s had passed"})
                bar.update(calls)
                continue
            if name not in checkpoints:  # one random checkpoint per preset, drawn once, read by its 3 builds
                checkpoints.clear()
                checkpoints[name] = random_checkpoint(preset, preset.dtype, device, tiny=tiny)
                checkpoints[name].draw()
            run_build(preset, quantization, attns, grid, device, tiny, checkpoints[name], common, out, bar)
    return out


def accelerate_anchors(presets: Sequence[str], out: Path) -> list[dict[str, Any]]:
    """accelerate's `estimate-memory` figures for each preset, from its own functions on the meta model.

    `accelerate estimate-memory` takes a Hub id; its `gather_data` is run with its model maker pointed at the
    meta model built from the preset's config (float32, as it builds it), so its own size and dtype rules apply.
    """
    from accelerate.commands import estimate

    records = []
    for name in tqdm(presets, desc="accelerate estimate-memory", unit="model"):
        preset = get_preset(name)
        model = meta_model(preset.config(), torch.float32)
        args = argparse.Namespace(model_name=preset.source, library_name="transformers", trust_remote_code=False,
                                  dtypes=["float32", "float16", "int8", "int4"])
        with mock.patch.object(estimate, "create_empty_model", lambda *a, _model=model, **k: _model):
            rows = estimate.gather_data(args)
        for dtype, largest_layer, total, training in rows:
            records.append({"preset": name, "source": preset.source, "accelerate_dtype": dtype,
                            "total_bytes": int(total), "largest_layer_bytes": int(largest_layer),
                            "training_bytes": {k: int(v) for k, v in training.items() if v != -1}, **versions()})
    write_jsonl(out, records)
    return records


def accelerate_dtype(dtype: str, quantization: str) -> str:
    """The `accelerate estimate-memory` dtype that stands for a call's weights: FP16/BF16 as float16, NF4 as int4."""
    return {"int8": "int8", "nf4": "int4"}.get(quantization, "float32" if dtype == "fp32" else "float16")


def compare(out_dir: Path, presets: Sequence[str] | None = None, batches: Sequence[int] | None = None,
            text_tokens: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Predict the measured calls of `out_dir/records.jsonl` (all, or those of the given presets, batch sizes and
    text tokens) with `xcomp_lab.plan.estimate` on this CPU, and write `compare.jsonl` and `compare.png`.

    A row holds the measured and predicted allocated and reserved peaks and their relative error (per phase too)
    and, where `out_dir/accelerate.jsonl` holds it, accelerate's weights-only figure for the call's dtype and its
    relative error against the measured allocated peak; a call the planner cannot predict keeps its error.
    """
    from xcomp_lab.plan.estimate import estimate

    measured = [r for r in read_jsonl(out_dir / RECORDS) if "skipped" not in r and not r["oom"]
                and (presets is None or r["preset"] in presets) and (batches is None or r["batch"] in batches)
                and (text_tokens is None or r["text_tokens"] in text_tokens)]
    anchors = {(r["preset"], r["accelerate_dtype"]): r["total_bytes"]
               for r in (read_jsonl(out_dir / ANCHORS) if (out_dir / ANCHORS).exists() else [])}
    rows = []
    for record in tqdm(measured, desc="predict the matrix", unit="call"):
        row = {key: record[key] for key in ("preset", "architecture", "dtype", "quantization", "attn", "batch",
                                            "prompt_tokens", "image_tokens", "new_tokens", "run")
               if key in record}
        row.update(measured_allocated=record["allocated_peak"], measured_reserved=record["reserved_peak"],
                   measured_weights=record["weights_bytes"])
        anchor = anchors.get((record["preset"], accelerate_dtype(record["dtype"], record["quantization"])))
        if anchor is not None:
            row.update(accelerate_bytes=anchor, accelerate_error_allocated=anchor / record["allocated_peak"] - 1)
        rows.append(row)
        try:
            plan = estimate(record["preset"] + (":tiny" if record["tiny"] else ""), dtype=record["dtype"],
                            quantization=record["quantization"], attn=record["attn"], batch=record["batch"],
                            prompt_tokens=record["prompt_tokens"], new_tokens=record["new_tokens"],
                            image_size=record["image_size"],
                            device="cuda" if record["kind"] == CUDA_KIND else "cpu")
        except Exception as exc:  # noqa: BLE001 (a call the planner cannot predict is reported, not fatal)
            row["prediction_error"] = f"{type(exc).__name__}: {exc}"
            continue
        row.update(predicted_allocated=plan.peak_bytes, predicted_reserved=plan.reserved_peak_bytes,
                   predicted_weights=plan.weights_bytes, predicted_image_tokens=plan.image_tokens,
                   predict_s=round(plan.seconds, 2),
                   phases={name: {"measured_allocated": peak["allocated"], "measured_reserved": peak["reserved"],
                                  "predicted_allocated": plan.phases[name].allocated if name in plan.phases else None,
                                  "predicted_reserved": plan.phases[name].reserved if name in plan.phases else None}
                           for name, peak in record["phases"].items()})
        for key in ("allocated", "reserved"):
            m, p = row[f"measured_{key}"], row[f"predicted_{key}"]
            row[f"error_{key}"] = None if m is None or p is None else p / m - 1
    write_jsonl(out_dir / COMPARE, rows)
    compare_chart(rows, out_dir / CHART)
    return rows


def _median_worst(errors: list[float]) -> dict[str, float]:
    """The median and the worst (largest in size, sign kept) of relative errors."""
    return {"median": statistics.median(errors), "worst": max(errors, key=abs)} if errors else {}


def error_summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per architecture: calls predicted and not, the median and worst relative error of the planner on each peak
    and of accelerate's figure on the allocated peak, the median prediction time."""
    out = []
    for arch in sorted({r["architecture"] for r in rows}):
        every = [r for r in rows if r["architecture"] == arch]
        mine = [r for r in every if "prediction_error" not in r]
        line: dict[str, Any] = {"architecture": arch, "calls": len(mine), "not_predicted": len(every) - len(mine)}
        for key, name, among in (("error_allocated", "allocated", mine), ("error_reserved", "reserved", mine),
                                 ("accelerate_error_allocated", "accelerate", every)):
            errors = [r[key] for r in among if r.get(key) is not None]
            line.update({f"{stat}_{name}": value for stat, value in _median_worst(errors).items()})
        if mine:
            line["median_predict_s"] = statistics.median(r["predict_s"] for r in mine)
        out.append(line)
    return out


def compare_chart(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Measured against predicted allocated and reserved peaks (GiB), one colour per architecture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from xcomp_lab.core.units import GIB

    anchors = [(r["measured_allocated"] / GIB, r["accelerate_bytes"] / GIB) for r in rows if "accelerate_bytes" in r]
    rows = [r for r in rows if "prediction_error" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    for ax, key in zip(axes, ("allocated", "reserved")):
        for arch in sorted({r["architecture"] for r in rows}):
            points = [(r[f"measured_{key}"] / GIB, r[f"predicted_{key}"] / GIB) for r in rows
                      if r["architecture"] == arch and r[f"predicted_{key}"] is not None]
            if points:
                ax.scatter(*zip(*points), label=arch, s=18)
        if key == "allocated" and anchors:
            ax.scatter(*zip(*anchors), marker="x", color="grey", s=14, label="accelerate estimate-memory")
        if not ax.collections:
            ax.text(0.5, 0.5, "no prediction", ha="center", transform=ax.transAxes)
        top = max([x for x, _ in anchors] + [r[f"measured_{key}"] / GIB for r in rows if r[f"measured_{key}"]]
                  + [0.001])
        ax.plot([0, top * 1.05], [0, top * 1.05], color="grey", linewidth=0.8)
        ax.set(xlabel=f"measured max_memory_{key} (GiB)", ylabel="predicted (GiB)",
               title=f"{key} peak of a generate call")
        if ax.collections:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the results folder")
    parser.add_argument("--device", default="cuda", help="cuda (GPU allocator) or cpu (tensor accounting)")
    parser.add_argument("--tiny", action="store_true", help="the presets' tiny variants (CPU tests)")
    parser.add_argument("--presets", nargs="+", default=preset_names(), choices=preset_names())
    parser.add_argument("--quantizations", nargs="+", default=list(QUANTIZATIONS), choices=QUANTIZATIONS)
    parser.add_argument("--attns", nargs="+", default=list(ATTENTIONS), choices=ATTENTIONS)
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="default 1 4 (tiny: 1 2)")
    parser.add_argument("--text-tokens", nargs="+", type=int, default=None,
                        help="text tokens of a prompt, the image's tokens added for a VLM; default 512 2048 "
                             "(tiny: 16 48)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 8 (tiny: 4)")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="start no new build after this many seconds (the rest recorded as skipped)")
    parser.add_argument("--skip-done", type=Path, default=None,
                        help="an earlier run's records.jsonl: the builds it measured are left out")
    parser.add_argument("--compare", action="store_true",
                        help="predict the calls in --out's records.jsonl (those of --presets, --batches and --text-tokens "
                             "given): compare.jsonl, compare.png, a summary per architecture")
    parser.add_argument("--accelerate", action="store_true",
                        help="only write accelerate's estimate-memory anchors (accelerate.jsonl), on the CPU")
    args = parser.parse_args(argv)
    if args.accelerate:
        accelerate_anchors(args.presets, args.out / ANCHORS)
        return
    if args.compare:
        for line in error_summary(compare(args.out, args.presets, args.batches, args.text_tokens)):
            print(json.dumps(line))
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU is visible here; use --device cpu --tiny")
    grid = Grid(batches=tuple(args.batches or ((1, 2) if args.tiny else (1, 4))),
                text_tokens=tuple(args.text_tokens or ((16, 48) if args.tiny else (512, 2048))),
                new_tokens=args.new_tokens or (4 if args.tiny else 8))
    done = [] if args.skip_done is None else \
        [(r["preset"], r["quantization"]) for r in read_jsonl(args.skip_done) if "skipped" not in r]
    run_matrix(args.presets, args.quantizations, args.attns, grid, device, args.tiny, args.out, args.deadline_s,
               done)


if __name__ == "__main__":
    main()
