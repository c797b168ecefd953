"""Where each part of the model goes: accelerate's device map for a set of cards, computed without weights.

`plan_device_map(config, max_memory)` builds the model on the `meta` device (shapes, no storage) and asks
`accelerate.infer_auto_device_map` where each module goes, with the model's `_no_split_modules` (a decoder
layer is never cut in two: its residual connections need all of it on one device). With `balanced=True`
the per-GPU limits are first evened out as `from_pretrained(device_map="auto")` does on several GPUs. The
result is a `DevicePlan`: the map, the bytes per device, the decoder layers per device, the modules that
were split, and the buffers that `dispatch_model` keeps on the execution device even for offloaded modules
(with `offload_buffers=False`, its default).

`offload_layers_map(config, n, main, target)` writes the simpler map one picks by hand: everything on the
main device except the last `n` decoder layers, which go to `target` ("cpu" or "disk").

`plan_from_pretrained(config, max_memory)` computes the map exactly as transformers' `from_pretrained(...,
device_map="auto", max_memory=...)` does: transformers 5.24 balances the GPUs with its own
`get_balanced_memory`, whose margin is 1.25 x the largest leaf module (here the output head, 1.5 GB in FP32)
instead of accelerate's 1.25 x the largest layer. At full scale on two 24 GB cards that gives 17 + 15 decoder
layers, where `plan_device_map(..., balanced=True)` gives 16 + 16.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import torch
from accelerate import infer_auto_device_map
from accelerate.utils import compute_module_sizes, get_balanced_memory, get_max_memory

from xcomp_lab.core.checks import check_int
from xcomp_lab.core.dtypes import check_dtype, dtype_name
from xcomp_lab.core.units import fmt_bytes

if TYPE_CHECKING:
    from xcomp_lab.model.modeling_internlm_xcomposer2 import InternLMXComposer2ForCausalLM

OFFLOAD_DEVICES = ("cpu", "disk")
LAYER_PREFIX = "model.layers."


def meta_model(target: Any, dtype: str | torch.dtype | None = None) -> InternLMXComposer2ForCausalLM:
    """The replica of a scale, configuration or model on the meta device: every shape, no memory.

    Built under `dtype` as the default dtype, as `from_pretrained(dtype=...)` builds it (buffers included).
    """
    from xcomp_lab.model.inventory import as_config
    from xcomp_lab.model.modeling_internlm_xcomposer2 import InternLMXComposer2ForCausalLM

    config = target.config if isinstance(target, torch.nn.Module) else target
    previous = torch.get_default_dtype()
    try:
        if dtype is not None:
            torch.set_default_dtype(check_dtype(dtype))
        with torch.device("meta"):
            return InternLMXComposer2ForCausalLM(as_config(config))
    finally:
        torch.set_default_dtype(previous)


_ACCELERATE_LOGGERS = ("accelerate.utils.modeling", "accelerate.big_modeling")


@contextmanager
def quiet_accelerate() -> Iterator[list[warnings.WarningMessage]]:
    """Silence accelerate's log lines for the block and collect its Python warnings in the yielded list.

    Planning for cards this machine lacks logs "Device 0 is not available"; dispatching an offloaded model logs
    "Some parameters are on the meta device ...", naming the devices in an order that changes between runs.
    """
    loggers = [logging.getLogger(name) for name in _ACCELERATE_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _device_order(device: Any) -> tuple[int, Any]:
    return (0, device) if isinstance(device, int) else (1, OFFLOAD_DEVICES.index(device) if device in OFFLOAD_DEVICES else -1)


@dataclass(frozen=True)
class DevicePlan:
    """A device map and what it puts where; byte counts at the plan's dtype."""

    device_map: dict[str, int | str]
    module_bytes: dict[str, int]  # bytes of each module named in the map
    max_memory: dict[int | str, int]  # the limits the map was computed under (after balancing)
    dtype: str
    total_bytes: int
    placement: dict[str, tuple[int | str, ...]]  # each top-level part and decoder layer -> its device(s)
    split_modules: tuple[str, ...]  # no-split modules whose parts landed on different devices
    offloaded_buffer_bytes: int  # buffers of offloaded modules, which stay on the execution device
    notes: tuple[str, ...]  # accelerate's warnings while planning

    def bytes_per_device(self) -> dict[int | str, int]:
        """Bytes placed on each device, GPUs first, then cpu and disk."""
        out: dict[int | str, int] = {}
        for name, device in self.device_map.items():
            out[device] = out.get(device, 0) + self.module_bytes[name]
        return dict(sorted(out.items(), key=lambda kv: _device_order(kv[0])))

    def layers_per_device(self) -> dict[int | str, list[int]]:
        """Decoder layer indices on each device (a split layer is listed under each of its devices)."""
        out: dict[int | str, list[int]] = {}
        for name, devices in self.placement.items():
            if name.startswith(LAYER_PREFIX):
                for device in devices:
                    out.setdefault(device, []).append(int(name[len(LAYER_PREFIX):]))
        return dict(sorted(out.items(), key=lambda kv: _device_order(kv[0])))

    @property
    def execution_device(self) -> int | str:
        """Where the offloaded modules run: the first GPU of the map, else the CPU."""
        gpus = [d for d in self.bytes_per_device() if not (isinstance(d, str) and d in OFFLOAD_DEVICES)]
        return gpus[0] if gpus else "cpu"

    @property
    def offloaded_bytes(self) -> int:
        """Bytes kept away from the execution device: cpu and disk with a GPU to run on, disk alone on a CPU."""
        away = ("disk",) if self.execution_device == "cpu" else OFFLOAD_DEVICES
        return sum(b for device, b in self.bytes_per_device().items() if device in away)

    def describe(self) -> str:
        """One line per device: bytes, limit, decoder layers and the other modules placed there."""
        lines = []
        layers = self.layers_per_device()
        for device, nbytes in self.bytes_per_device().items():
            limit = self.max_memory.get(device)
            limit_text = f" of {fmt_bytes(limit)} allowed" if limit is not None else ""
            idx = layers.get(device, [])
            layer_text = f"layers {idx[0]}-{idx[-1]} ({len(idx)})" if idx else "no decoder layer"
            others = [n for n, d in self.placement.items() if device in d and not n.startswith(LAYER_PREFIX)]
            label = f"GPU {device}" if isinstance(device, int) else device
            lines.append(f"{label:>5s}: {fmt_bytes(nbytes):>10s}{limit_text} | {layer_text}"
                         + (f" + {', '.join(others)}" if others else ""))
        return "\n".join(lines)


def _units(model: torch.nn.Module) -> list[str]:
    """The parts a plan reports: the top-level modules, with the decoder listed layer by layer."""
    names = []
    for name, child in model.named_children():
        if name == "model":
            names += [f"model.{n}" for n, _ in child.named_children() if n != "layers"]
            names += [f"{LAYER_PREFIX}{i}" for i in range(len(child.layers))]
        else:
            names.append(name)
    return sorted(names, key=lambda n: (not n.startswith("model.tok"), not n.startswith(LAYER_PREFIX),
                                        int(n.split(".")[2]) if n.startswith(LAYER_PREFIX) else 0))


def _placement(model: torch.nn.Module, device_map: Mapping[str, Any]) -> dict[str, tuple[int | str, ...]]:
    """Each unit's device(s): from the map's key that contains it, or from the keys inside it when it was cut."""
    out = {}
    for unit in _units(model):
        inside = [d for k, d in device_map.items() if k.startswith(unit + ".")]
        around = [(len(k), d) for k, d in device_map.items() if k == "" or unit == k or unit.startswith(k + ".")]
        devices = inside + ([max(around, key=lambda kd: kd[0])[1]] if around else [])
        out[unit] = tuple(sorted(set(devices), key=_device_order))
    return out


def _split_modules(model: torch.nn.Module, device_map: Mapping[str, Any], no_split: list[str]) -> tuple[str, ...]:
    names = [n for n, m in model.named_modules() if type(m).__name__ in no_split]
    return tuple(n for n in names if any(key.startswith(n + ".") for key in device_map))


def _buffer_bytes(model: torch.nn.Module, prefix: str, dtype: torch.dtype) -> int:
    module = model.get_submodule(prefix) if prefix else model
    size = torch.empty((), dtype=dtype).element_size()
    return sum(b.numel() * (size if b.is_floating_point() else b.element_size()) for b in module.buffers())


def _planning_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """`dtype` checked, and concrete: a plan needs bytes per value."""
    torch_dtype = check_dtype(dtype)
    if torch_dtype is None:
        raise ValueError("dtype='auto' has no size to plan with; give 'float32', 'float16' or 'bfloat16'.")
    return torch_dtype


def plan_device_map(config_or_model: Any, max_memory: Mapping[int | str, int | str], *,
                    dtype: str | torch.dtype = "float16", balanced: bool = False) -> DevicePlan:
    """accelerate's device map for the model of `config_or_model` under `max_memory`, e.g. {0: "24GB", "cpu": "64GiB"}.

    GPUs are integer keys; sizes as ints (bytes) or strings ("24GB" is 24 x 10**9 bytes, "24GiB" 24 x 1024**3).
    A GPU need not exist on this machine: the plan only reads shapes. `balanced=True` evens out the GPUs as
    `from_pretrained(device_map="auto")` does when there are several.
    """
    torch_dtype = _planning_dtype(dtype)
    model = config_or_model if isinstance(config_or_model, torch.nn.Module) else meta_model(config_or_model)
    device_map, sizes, resolved, notes = accelerate_device_map(model, max_memory, torch_dtype, balanced=balanced)
    return _plan(model, device_map, sizes, torch_dtype, resolved, notes)


def accelerate_device_map(model: torch.nn.Module, max_memory: Mapping[int | str, int | str], torch_dtype: torch.dtype,
                          *, balanced: bool = False) -> tuple[dict[str, Any], Mapping[str, int], dict[Any, int],
                                                               tuple[str, ...]]:
    """accelerate's map for any (meta) model with its `_no_split_modules`, after `get_balanced_memory` where
    `balanced`: (device map, module sizes in bytes as accelerate gives them, 0 for a module without tensors, each
    device's limit in bytes, accelerate's warnings)."""
    if not max_memory:
        raise ValueError("max_memory is empty; give each device's limit, e.g. {0: '24GB', 'cpu': '64GiB'}.")
    no_split = list(model._no_split_modules)
    limits = dict(max_memory)
    with quiet_accelerate() as caught:
        if balanced:
            limits = get_balanced_memory(model, max_memory=limits, no_split_module_classes=no_split, dtype=torch_dtype)
        device_map = infer_auto_device_map(model, max_memory=limits, no_split_module_classes=no_split, dtype=torch_dtype)
        sizes = compute_module_sizes(model, dtype=torch_dtype)
    with quiet_accelerate():
        resolved = get_max_memory(dict(limits))
    return (dict(device_map), sizes, {k: int(v) for k, v in resolved.items()}, tuple(str(w.message) for w in caught))


def plan_from_pretrained(config_or_model: Any, max_memory: Mapping[int | str, int | str], *,
                         dtype: str | torch.dtype = "float16") -> DevicePlan:
    """The map `from_pretrained(..., device_map="auto", max_memory=max_memory, dtype=dtype)` computes.

    `config_or_model`: a scale ("tiny", "full"), a configuration or a model (only its configuration is read).
    The same two calls transformers makes (`transformers.integrations.accelerate.get_balanced_memory`, then its
    `infer_auto_device_map`) on the model built on the meta device in `dtype`; GPUs need not exist here.
    """
    from transformers.integrations.accelerate import get_balanced_memory as tf_balanced_memory
    from transformers.integrations.accelerate import infer_auto_device_map as tf_infer_auto_device_map

    if not max_memory:
        raise ValueError("max_memory is empty; give each device's limit, e.g. {0: '24GB', 1: '24GB'}.")
    torch_dtype = _planning_dtype(dtype)
    model = meta_model(config_or_model, torch_dtype)
    with quiet_accelerate() as caught:
        limits = tf_balanced_memory(model, max_memory=dict(max_memory), no_split_module_classes=model._no_split_modules)
        device_map = tf_infer_auto_device_map(model, max_memory=limits, no_split_module_classes=model._no_split_modules,
                                              no_placement_params=getattr(model, "_no_placement_params", None))
        sizes = compute_module_sizes(model, dtype=torch_dtype)
    return _plan(model, device_map, sizes, torch_dtype, {k: int(v) for k, v in limits.items()},
                 tuple(str(w.message) for w in caught))


def summarize_map(config_or_model: Any, device_map: Mapping[str, int | str], *,
                  dtype: str | torch.dtype = "float16") -> DevicePlan:
    """The same summary for a device map written by hand (or read from `model.hf_device_map`)."""
    torch_dtype = _planning_dtype(dtype)
    model = config_or_model if isinstance(config_or_model, torch.nn.Module) else meta_model(config_or_model)
    with quiet_accelerate():
        sizes = compute_module_sizes(model, dtype=torch_dtype)
    unknown = [name for name in device_map if name not in sizes]
    if unknown:
        raise ValueError(f"device_map names modules the model does not have: {unknown}; use names from model.named_modules().")
    return _plan(model, dict(device_map), sizes, torch_dtype, {}, ())


def _plan(model: torch.nn.Module, device_map: dict[str, Any], sizes: Mapping[str, int], dtype: torch.dtype,
          max_memory: dict[int | str, int], notes: tuple[str, ...]) -> DevicePlan:
    no_split = list(model._no_split_modules)
    # As dispatch_model decides: with a GPU to run on, cpu and disk modules are offloaded; with only the CPU,
    # disk modules are, and cpu modules simply stay where they run.
    on_gpu = any(not (isinstance(d, str) and d in OFFLOAD_DEVICES) for d in device_map.values())
    offloaded = [n for n, d in device_map.items() if d == "disk" or (on_gpu and d == "cpu")]
    return DevicePlan(
        device_map=dict(device_map),
        module_bytes={name: int(sizes[name]) for name in device_map},
        max_memory=max_memory,
        dtype=dtype_name(dtype),
        total_bytes=int(sizes[""]),
        placement=_placement(model, device_map),
        split_modules=_split_modules(model, device_map, no_split),
        offloaded_buffer_bytes=sum(_buffer_bytes(model, n, dtype) for n in offloaded),
        notes=notes,
    )


def offload_layers_map(config: Any, n_offloaded: int, main: int | str, target: str) -> dict[str, int | str]:
    """A device map with everything on `main` except the last `n_offloaded` decoder layers, put on `target`."""
    layers = config.num_hidden_layers
    check_int("n_offloaded", n_offloaded, maximum=layers, hint="decoder layers to offload")
    if target not in OFFLOAD_DEVICES:
        raise ValueError(f"target={target!r}; offload to one of {list(OFFLOAD_DEVICES)}.")
    if main == target:
        raise ValueError(f"main={main!r} is the offload target too; keep the model on a GPU index or 'cpu' and offload to 'disk'.")
    device_map: dict[str, int | str] = {"model.tok_embeddings": main}
    for i in range(layers):
        device_map[f"{LAYER_PREFIX}{i}"] = target if i >= layers - n_offloaded else main
    device_map.update({"model.norm": main, "output": main, "vit": main, "vision_proj": main})
    return device_map
