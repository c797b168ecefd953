"""The planner's validation matrix: measure one greedy generate call per setting, one JSON line each.

    python -m xcomp_lab.tools.plan_matrix --device cuda --out results/plan-matrix-h200   # every preset, on a GPU
    python -m xcomp_lab.tools.plan_matrix --device cpu --tiny --out /tmp/matrix         # tiny presets, on the CPU
    python -m xcomp_lab.tools.plan_matrix --accelerate --out results/plan-matrix-h200   # accelerate's anchors (CPU)
    python -m xcomp_lab.tools.plan_matrix --compare --out results/plan-matrix-h200      # the planner against them
    python -m xcomp_lab.tools.plan_matrix --device cuda --out /tmp/t --presets llava-1.5-7b --quantizations nf4 \
        --attns eager --batches 1 4 --text-tokens 512 --trace    # those calls' allocator histories (--trace)

(`--compare` is `plan.validate.compare`, the one comparison, plus the chart `compare.png`.)

For every preset, dtype (its published one) and quantization (none, INT8, NF4) the model is built once with
random weights (`plan.build.build_model`: what `from_pretrained` leaves), then, switching the attention in place
(eager, sdpa; Gemma 2 has no sdpa), one `generate(do_sample=False, max_new_tokens=min_new_tokens=N)` call runs for
every batch size and prompt length. A prompt is a number of text tokens plus, for a VLM, one image at the
model's default size, as many tokens as its processor makes of it. Builds run in an order that covers every
architecture and every quantization first, so that a run cut short by `--deadline-s` still covers both.

Each build runs in a fresh process of its own (`--workers` of them at a time; the caching allocator is per
process, so the builds do not see each other's memory): its random checkpoint drawn, the model loaded by
`from_pretrained` from it (host to device, as from a file), then its calls. So the weights' segments are the ones
a load into a fresh process leaves, whatever ran before, and every call starts from them: garbage collected,
cache emptied (`torch.cuda.empty_cache()` releases every segment the previous call left without the weights in
it) and peaks reset. On CUDA the caching allocator's `max_memory_allocated`/`max_memory_reserved` are read; on
the CPU the tensor accounting of `xcomp_lab.memory.measure` counts every storage. Phases are marked by forward
hooks (`run.call.phase_marks`), which read the peak of the phase that ends and reset it
(`reset_peak_memory_stats` changes no allocation): "vision" from the vision encoder's start, "prefill" from the
language model's first forward, "decode" from its second; the call's peak is the largest phase peak. For INT8
the number of LLM.int8() outlier columns of every quantized linear's input is recorded (`int8_outliers`, by input
width and by linear, prefill and decode apart: `plan.outliers.count_outliers`), for every build the segments
the load leaves (`load_segments`), and on CUDA the times a call's cudaMalloc failed and the allocator released its
cached segments to retry (`alloc_retries`, from `torch.cuda.memory_stats`: builds side by side share the GPU, and a
retry changes the reserved peak).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import multiprocessing
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager, nullcontext
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
from xcomp_lab.plan import validate
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
from xcomp_lab.plan.families import family_of
from xcomp_lab.plan.outliers import RunningInt8Linear, count_outliers
from xcomp_lab.plan.presets import Preset, get_preset, preset_names
from xcomp_lab.plan.trace import TRACES, trace_name
from xcomp_lab.run.call import phase_marks

RECORDS = validate.RECORDS
COMPARE = validate.COMPARE
ANCHORS = validate.ANCHORS
CHART = "compare.png"
ENV = "env.json"
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


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module that holds the decoder layers (its first forward is the prefill, each later one a decode step)."""
    return model.get_submodule(family_of(model.config).layers.rsplit(".", 1)[0])


@dataclass(frozen=True)
class Grid:
    """The calls measured on each built model."""

    batches: tuple[int, ...]
    text_tokens: tuple[int, ...]
    new_tokens: int
    trace: str | None = None  # a folder: each call's CUDA allocator history written there (`trace_call`)


def measure_call(model: torch.nn.Module, inputs: dict[str, torch.Tensor], new_tokens: int,
                 device: torch.device, trace: Path | None = None) -> dict[str, Any]:
    """One greedy generate call of exactly `new_tokens` tokens, measured per phase; with `trace` (a .json.gz path,
    CUDA only), the caching allocator's history of the call written there (`trace_call`)."""
    inputs = {key: value.to(device) for key, value in inputs.items()}
    cuda = device.type == "cuda"
    tracing = trace_call(trace, device) if trace is not None and cuda else nullcontext()
    meter = PhaseMeter(device, model)
    error = None
    outliers: dict[str, dict[str, list[int]]] = {}
    int8 = any(type(m).__name__ == "Linear8bitLt" for m in model.modules())
    retries = torch.cuda.memory_stats(device).get("num_alloc_retries", 0) if cuda else 0
    naming = RunningInt8Linear(model) if int8 else nullcontext()
    counting = count_outliers(outliers, lambda: meter.phase, naming) if int8 else nullcontext()
    try:
        with tracing, meter, phase_marks(model, meter, vision=vision_tower(model), decoder=language_model(model)), \
                naming, counting, torch.inference_mode():
            model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           pad_token_id=model.generation_config.eos_token_id)
    except torch.OutOfMemoryError as exc:
        error = f"OutOfMemoryError: {str(exc).splitlines()[0]}"
    del inputs
    return {"start_allocated": meter.start["allocated"], "start_reserved": meter.start["reserved"],
            "allocated_peak": meter.peak("allocated"), "reserved_peak": meter.peak("reserved"),
            "phases": meter.phases, "seconds": round(meter.seconds, 4), "oom": error is not None, "error": error,
            **({"alloc_retries": torch.cuda.memory_stats(device).get("num_alloc_retries", 0) - retries} if cuda else {}),
            **({"int8_outliers": outliers} if outliers else {})}


TRACE_ENTRIES = 1_000_000  # allocator events kept by a trace (a call of the matrix makes some 10^4 to 10^5)
TRACE_PACKAGES = ("transformers/", "bitsandbytes/", "torch/nn/")  # where a trace names the line that allocated


@contextmanager
def trace_call(path: Path, device: torch.device) -> Iterator[None]:
    """Record the CUDA caching allocator's history of a block (`torch.cuda.memory._record_memory_history`, from
    before the call's `empty_cache`) and write it to `path` (gzipped JSON): the segments at the start ([address, size,
    allocated]) and every event in order ([action, address, size, the innermost transformers, bitsandbytes or
    torch.nn lines that made it]), to set against the planner's simulated stream (`plan.allocator`)."""
    import gzip

    index = device.index if device.index is not None else torch.cuda.current_device()
    start = [[seg["address"], seg["total_size"], seg["allocated_size"]] for seg in torch.cuda.memory_snapshot()
             if seg["device"] == index]
    torch.cuda.memory._record_memory_history(max_entries=TRACE_ENTRIES, stacks="python")
    try:
        yield
    finally:
        torch.cuda.synchronize(device)
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        path.parent.mkdir(parents=True, exist_ok=True)
        events = [[e["action"], e.get("addr"), e["size"], _trace_lines(e.get("frames", []))]
                  for e in snapshot["device_traces"][index]]
        with gzip.open(path, "wt") as out:
            json.dump({"segments_at_start": start, "events": events}, out)


def _trace_lines(frames: Sequence[dict[str, Any]], count: int = 3) -> list[str]:
    """The innermost `count` frames of the packages that allocate, each as file:line function."""
    return [f"{f['filename'].rsplit('site-packages/', 1)[-1]}:{f['line']} {f['name']}" for f in frames
            if any(package in f["filename"] for package in TRACE_PACKAGES)][:count]


def _pad_token(model: torch.nn.Module) -> None:
    eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = eos[0] if isinstance(eos, list) else eos


def load_segments() -> list[list[int]]:
    """The caching allocator's segments of the large pool now: [size, bytes allocated in it] each (the small
    pool's 2 MiB segments left out)."""
    return [[seg["total_size"], seg["allocated_size"]] for seg in torch.cuda.memory_snapshot()
            if seg["segment_type"] == "large"]


def measure_build(name: str, quantization: str, attns: Sequence[str], grid: Grid, device: str, tiny: bool,
                  common: dict[str, Any], deadline: float | None = None) -> list[dict[str, Any]]:
    """Draw the preset's random checkpoint, build the model on `device` and measure every call of the grid on it:
    the records, one per call (or one saying why the build was skipped when `deadline`, a `time.time()`, had
    passed). Run in a fresh process for each build (`run_matrix`)."""
    preset, device = get_preset(name), torch.device(device)
    if deadline is not None and time.time() > deadline:
        return [{**common, "preset": name, "quantization": quantization, "tiny": tiny,
                 "skipped": "not started: the run's deadline had passed"}]
    supported, skipped = attentions_of(preset, attns, tiny)
    base = {**common, "preset": preset.name, "architecture": preset.config(tiny).model_type, "tiny": tiny,
            "dtype": dtype_name(preset.dtype), "quantization": quantization, "new_tokens": grid.new_tokens}
    checkpoint = random_checkpoint(preset, preset.dtype, device, tiny=tiny)
    checkpoint.draw()  # in pinned host memory: the load copies it to the device, as from a file
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
                    load_reserved_peak=torch.cuda.max_memory_reserved(device), load_segments=load_segments())
    else:
        load.update(weights_bytes=load["parameter_bytes"], load_allocated_peak=None, load_reserved_peak=None)
    _pad_token(model)
    records = []
    for attn in attns:
        if attn in skipped:
            records.append({**base, "attn": attn, "skipped": skipped[attn]})
            continue
        model.set_attn_implementation(attn)
        for text_tokens in grid.text_tokens:
            image_size = preset.default_image_size(tiny) if preset.is_vlm else None
            for batch in grid.batches:
                inputs = make_inputs(preset, batch_size=batch, prompt_tokens=text_tokens + _image_tokens(preset, tiny),
                                     image_size=image_size, tiny=tiny)
                records.append({**base, "attn": attn, "batch": batch, "prompt_tokens": inputs["input_ids"].shape[1],
                                "image_tokens": _image_count(preset, tiny, inputs["input_ids"][0]),
                                "image_size": image_size, "text_tokens": text_tokens, **load,
                                **measure_call(model, inputs, grid.new_tokens, device, trace_path(
                                    grid, name, quantization, attn, batch, text_tokens))})
    del model
    gc.collect()
    return records


def trace_path(grid: Grid, name: str, quantization: str, attn: str, batch: int, text_tokens: int) -> Path | None:
    """Where a call's allocator trace goes, or None when the grid traces nothing."""
    if grid.trace is None:
        return None
    return Path(grid.trace) / trace_name(name, quantization, attn, batch, text_tokens)


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
               done: Sequence[tuple[str, str]] = (), workers: int = 1) -> Path:
    """Measure the matrix into `out_dir/records.jsonl` (appended build by build) and write `env.json`.

    Each build runs in a fresh process, `workers` at a time (0: all in this process, one after the other; the CPU
    accounting has no allocator history). `done`: (preset, quantization) builds measured by an earlier run, left
    out. `deadline_s`: no build starts after that many seconds (each is recorded as skipped).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / RECORDS
    if out.exists():
        out.unlink()
    env = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "command": " ".join(["python -m xcomp_lab.tools.plan_matrix", *sys.argv[1:]]),
           "device": str(device), "workers": workers, "versions": versions(), "machine": describe_machine(Path.cwd()),
           **({"gpu": gpu_environment()} if device.type == "cuda" else {})}
    (out_dir / ENV).write_text(json.dumps({"runs": [{**env, "run": 1}]}, indent=2) + "\n")
    common = {"device": str(device), "kind": CUDA_KIND if device.type == "cuda" else CPU_KIND,
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, **versions()}
    order = [build for build in build_order(presets, quantizations) if build not in set(done)]
    deadline = None if deadline_s is None else time.time() + deadline_s
    jobs = [(name, quantization, tuple(attns), grid, str(device), tiny, common, deadline)
            for name, quantization in order]
    with tqdm(total=len(jobs), desc="plan matrix", unit="build") as bar:
        if workers == 0:
            for job in jobs:
                for record in measure_build(*job):
                    append_jsonl(out, record)
                bar.update()
        else:
            spawn = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=spawn, max_tasks_per_child=1) as pool:
                for future in as_completed([pool.submit(measure_build, *job) for job in jobs]):
                    for record in future.result():
                        append_jsonl(out, record)
                    bar.update()
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
    parser.add_argument("--workers", type=int, default=1,
                        help="builds measured at once, each in a fresh process (0: one after the other in this one); "
                             "with --compare, calls predicted at once")
    parser.add_argument("--skip-done", type=Path, default=None,
                        help="an earlier run's records.jsonl: the builds it measured are left out")
    parser.add_argument("--trace", action="store_true",
                        help="CUDA: write each call's caching-allocator history to <out>/traces (restrict the grid "
                             "with --presets, --quantizations, --attns, --batches, --text-tokens to the calls wanted)")
    parser.add_argument("--compare", action="store_true",
                        help="predict the calls in --out's records.jsonl (those of --presets, --batches and --text-tokens "
                             "given): compare.jsonl, compare.png, a summary per architecture")
    parser.add_argument("--predicted", type=Path, default=None,
                        help="with --compare: predictions this planner made earlier (plan.validate --predict-only)")
    parser.add_argument("--accelerate", action="store_true",
                        help="only write accelerate's estimate-memory anchors (accelerate.jsonl), on the CPU")
    args = parser.parse_args(argv)
    if args.accelerate:
        accelerate_anchors(args.presets, args.out / ANCHORS)
        return
    if args.compare:
        rows = validate.compare(args.out, args.presets, args.batches, args.text_tokens, args.workers, args.predicted)
        compare_chart(rows, args.out / CHART)
        for by in ("architecture", "quantization"):
            print(validate.matrix_table(validate.matrix_summary(rows, by), by))
        print(json.dumps(validate.bars(rows)))
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU is visible here; use --device cpu --tiny")
    grid = Grid(batches=tuple(args.batches or ((1, 2) if args.tiny else (1, 4))),
                text_tokens=tuple(args.text_tokens or ((16, 48) if args.tiny else (512, 2048))),
                new_tokens=args.new_tokens or (4 if args.tiny else 8),
                trace=str(args.out / TRACES) if args.trace else None)
    done = [] if args.skip_done is None else \
        [(r["preset"], r["quantization"]) for r in read_jsonl(args.skip_done) if "skipped" not in r]
    run_matrix(args.presets, args.quantizations, args.attns, grid, device, args.tiny, args.out, args.deadline_s,
               done, args.workers)


if __name__ == "__main__":
    main()
