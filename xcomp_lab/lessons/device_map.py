"""Notebook 05's helpers: the two-GPU run against its per-card prediction, and what offloading did to the peak.

- `split_report`: one line per split run of `results/<run>/split.jsonl` (written by
  `python -m xcomp_lab.tools.gpu_split_run`): each card's measured peak against its prediction, and the speed
  against one card.
- `split_layers`: the decoder layers on each card in the map that load really made, to compare with a plan.
- `offload_effect`: the activations of an offloaded caption against the reference's, taken apart into what
  each run found allocated at its start and what the offloaded weights in flight added to the peak.
- `original_meta_model`, `plan_original` and `cut_modules`: the original's own code on the meta device, the map
  transformers 4.33.2 computes for it, and which modules of given classes a map cuts (the original declares only
  its decoder layer in `_no_split_modules`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xcomp_lab.core.checks import check_int
from xcomp_lab.core.jsonl import read_jsonl
from xcomp_lab.core.units import fmt_bytes
from xcomp_lab.memory import MemoryResult

LAYER_PREFIX = "model.layers."


def _split_records(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    return read_jsonl(path, what="two-GPU runs", hint=f"run `python -m xcomp_lab.tools.gpu_split_run --out "
                      f"{path.parent}` on a machine with two GPUs first")


def _layers_by_card(device_map: dict[str, Any]) -> dict[int, list[int]]:
    """Decoder layer indices per card of a recorded map (cards recorded as strings: "0", "1")."""
    out: dict[int, list[int]] = {}
    for name, card in device_map.items():
        if name.startswith(LAYER_PREFIX):
            out.setdefault(int(card), []).append(int(name[len(LAYER_PREFIX):]))
    return {card: sorted(layers) for card, layers in sorted(out.items())}


def split_layers(path: str | Path, dtype: str = "float32") -> dict[int, list[int]]:
    """{card: decoder layer indices} of the map the two-GPU load of `dtype` really made (`model.hf_device_map`)."""
    records = [r for r in _split_records(path) if r["kind"] == "split" and r["dtype"] == dtype and r.get("device_map")]
    if not records:
        raise ValueError(f"{path} holds no split run of dtype={dtype!r} with its map; it has "
                         f"{sorted({r['dtype'] for r in _split_records(path) if r['kind'] == 'split'})}.")
    return _layers_by_card(records[-1]["device_map"])


def split_report(path: str | Path) -> str:
    """One line per run of a `split.jsonl` written by `python -m xcomp_lab.tools.gpu_split_run`: each card's
    measured peak against its prediction, and tokens/s against the same dtype on one card."""
    records = _split_records(path)
    one_card = {r["dtype"]: r for r in records if r["kind"] == "one-card"}
    lines = []
    for r in (r for r in records if r["kind"] == "split"):
        cards = " | ".join(
            f"card {card}: {'OOM' if r['oom'] and r['oom_card_measured'] == int(card) else fmt_bytes(c['peak_bytes'])}"
            f" measured, {fmt_bytes(c['predicted_peak_bytes'])} predicted (x{c['measured_over_predicted']:.3f})"
            for card, c in r["cards"].items())
        speed = f"{r['tokens_per_s']:.1f} tok/s" if r["tokens_per_s"] else "no speed"
        alone = one_card.get(r["dtype"])
        if alone and alone["tokens_per_s"] and r["tokens_per_s"]:
            speed += f" (one card: {alone['tokens_per_s']:.1f}, x{r['tokens_per_s'] / alone['tokens_per_s']:.2f})"
        lines.append(f"{r['case']}: {cards} | {speed}")
    return "\n".join(lines)


def offload_effect(reference: MemoryResult, offloaded: MemoryResult, *, largest_weight_bytes: int,
                   seen_weight_bytes: int) -> str:
    """The offloaded caption's activations against the reference's, taken apart, one line per figure.

    Activations are counted from each run's start, less what was already allocated there beside the weights
    (`MemoryResult.activations_bytes`). So memory one run makes and keeps (on a GPU, the cuBLAS workspace of a
    process's first matrix multiplies) counts in its own activations and not in a later run's: the difference is
    corrected for that before it is read as what the offloaded weights in flight added. `largest_weight_bytes`:
    the largest weight a hook brings in; `seen_weight_bytes`: how much of one brought-in weight the measurement
    saw (0 when it cannot see them, and then the difference says nothing about them).
    """
    check_int("largest_weight_bytes", largest_weight_bytes)
    check_int("seen_weight_bytes", seen_weight_bytes, minimum=0, hint="bytes of one brought-in weight the measurement saw")
    diff = offloaded.activations_bytes - reference.activations_bytes
    held_ref = max(reference.start_bytes - reference.weights_bytes, 0)
    held_off = max(offloaded.start_bytes - offloaded.weights_bytes, 0)
    kept = reference.end_bytes - reference.start_bytes
    in_flight = diff + held_off - held_ref
    lines = [f"activations, offloaded minus reference: {fmt_bytes(diff)}",
             f"allocated at each start beside the weights, counted in neither run's activations: reference "
             f"{fmt_bytes(held_ref)}, offloaded {fmt_bytes(held_off)}",
             f"the reference's call ended {fmt_bytes(kept)} above its start (memory it made and kept, in its own peak)",
             f"corrected for what each run found allocated: {fmt_bytes(in_flight)}"]
    if seen_weight_bytes == 0:
        lines.append("this measurement did not see a weight brought in by a hook: the difference says nothing about "
                     "the weights in flight")
    elif in_flight >= largest_weight_bytes / 100:
        lines.append(f"the weights in flight raised the peak by {fmt_bytes(in_flight)} (the largest offloaded weight: "
                     f"{fmt_bytes(largest_weight_bytes)})")
    elif in_flight > -largest_weight_bytes / 100:
        lines.append(f"the weights in flight did not raise the peak (under 1% of the largest offloaded weight, "
                     f"{fmt_bytes(largest_weight_bytes)}): it came while no offloaded module was running, and each "
                     f"weight leaves the device as soon as its module has run")
    else:
        lines.append(f"the offloaded run peaked {fmt_bytes(-in_flight)} lower than the reference after the correction: "
                     f"something the two runs do differently, not the weights in flight")
    return "\n".join(lines)


def original_meta_model(checkpoint: str | Path, scale: str = "full", dtype: str = "float32") -> Any:
    """The original model of `scale`, built on the meta device from the remote code inside `checkpoint` (shapes only).

    Its classes come from the checkpoint's own files, as `from_pretrained(trust_remote_code=True)` imports them;
    the CLIP tower its constructor downloads is built from its configuration instead (no weights on meta). Needs
    the original's environment (transformers 4.33.2).
    """
    from unittest import mock

    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from xcomp_lab.core.dtypes import check_dtype
    from xcomp_lab.model.original import (
        AUTO_MAP,
        MODEL_CLASS,
        clip_config,
        original_config,
    )

    config_class = get_class_from_dynamic_module(AUTO_MAP["AutoConfig"], Path(checkpoint))
    model_class = get_class_from_dynamic_module(MODEL_CLASS, Path(checkpoint))
    vision = CLIPVisionConfig(**clip_config(scale)["vision_config"])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(check_dtype(dtype))
    try:
        with mock.patch.object(CLIPVisionModel, "from_pretrained", lambda *_, **__: CLIPVisionModel(vision)), \
                torch.device("meta"):
            return model_class(config_class(**original_config(scale)))
    finally:
        torch.set_default_dtype(previous)


def cut_modules(model: Any, device_map: dict[str, Any], classes: Sequence[str]) -> list[str]:
    """Modules of `model` whose class is one of `classes` and that `device_map` cuts across devices (its keys name
    their parts rather than the whole module)."""
    if not classes:
        raise ValueError("classes is empty: name the module classes to look for, e.g. ['CLIPEncoderLayer']")
    return [name for name, module in model.named_modules() if type(module).__name__ in classes
            and any(key.startswith(name + ".") for key in device_map)]


@dataclass(frozen=True)
class OriginalPlan:
    """accelerate's device map for the original's model, and what it puts on each device (bytes at the plan's dtype)."""

    device_map: dict[str, Any]
    max_memory: dict[Any, int]  # the limits the map was computed under (after balancing)
    bytes_per_device: dict[Any, int]
    layers_per_device: dict[Any, list[int]]  # decoder layer indices (a cut layer under each of its devices)
    others_per_device: dict[Any, list[str]]  # the other parts: top-level modules, or the parts of a cut one

    def describe(self) -> str:
        """One line per device: bytes, limit, decoder layers and the other modules placed there."""
        lines = []
        for device, nbytes in self.bytes_per_device.items():
            limit = self.max_memory.get(device)
            idx = self.layers_per_device.get(device, [])
            layers = f"layers {idx[0]}-{idx[-1]} ({len(idx)})" if idx else "no decoder layer"
            others = self.others_per_device.get(device, [])
            label = f"GPU {device}" if isinstance(device, int) else str(device)
            lines.append(f"{label:>5s}: {fmt_bytes(nbytes):>10s}"
                         + (f" of {fmt_bytes(limit)} allowed" if limit is not None else "")
                         + f" | {layers}" + (f" + {', '.join(others)}" if others else ""))
        return "\n".join(lines)


def _units(model: Any) -> list[str]:
    """The parts a plan reports: the top-level modules, with the decoder's children listed (its layers one by one)."""
    names = []
    for name, child in model.named_children():
        if name == "model":
            for inner, grandchild in child.named_children():
                if inner == "layers":
                    names += [f"{LAYER_PREFIX}{i}" for i in range(len(grandchild))]
                else:
                    names.append(f"model.{inner}")
        else:
            names.append(name)
    return names


def _devices(unit: str, device_map: dict[str, Any]) -> list[Any]:
    """The device(s) a unit is on: the map's key holding it, or the keys inside it where the map cut it."""
    inside = [d for k, d in device_map.items() if k.startswith(unit + ".")]
    around = [(len(k), d) for k, d in device_map.items() if k in ("", unit) or unit.startswith(k + ".")]
    found = inside + ([max(around, key=lambda kd: kd[0])[1]] if around else [])
    return list(dict.fromkeys(found))


def plan_original(model: Any, max_memory: dict[Any, int | str], *, dtype: str = "float32",
                  balanced: bool = False) -> OriginalPlan:
    """The map transformers 4.33.2's `from_pretrained` computes for the original's (meta) model: accelerate's
    `infer_auto_device_map` with the model's `_no_split_modules`, after `get_balanced_memory` where `balanced`
    (as `device_map="auto"` does on several GPUs; `device_map="sequential"` skips it). GPUs need not exist here."""
    from xcomp_lab.core.dtypes import check_dtype
    from xcomp_lab.estimate.placement import accelerate_device_map

    device_map, sizes, resolved, _ = accelerate_device_map(model, max_memory, check_dtype(dtype), balanced=balanced)
    per_device: dict[Any, int] = {}
    for name, device in device_map.items():
        per_device[device] = per_device.get(device, 0) + int(sizes[name])
    layers: dict[Any, list[int]] = {}
    others: dict[Any, list[str]] = {}
    for unit in _units(model):
        for device in _devices(unit, device_map):
            if unit.startswith(LAYER_PREFIX):
                layers.setdefault(device, []).append(int(unit[len(LAYER_PREFIX):]))
            else:
                others.setdefault(device, []).append(unit)
    return OriginalPlan(device_map, resolved, per_device, layers, others)
