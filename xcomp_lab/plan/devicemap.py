"""Per-device plans for a device map: where `from_pretrained(device_map=..., max_memory=...)` puts each module, and
the allocated peak of each device during the planned call.

`device_map_of` places the planner's model (fake, quantized as loaded) with accelerate's own
`infer_auto_device_map`, over the model's own no-split module classes: the first device is filled in module order
up to its `max_memory`, then the next; "cpu" and "disk" take what no GPU holds. The replay then counts every new
storage against the device of the module that runs (a forward pre-hook on each module of the map): the KV cache of
a layer on that layer's device, the logits on the output head's, the inputs on the first device, and a copy on
the module's device of each tensor argument held on another one (the hidden state where the layers cross from one
device to the next), as accelerate's hooks make it. Not simulated: the weights of offloaded modules brought to a
GPU for their forward, and reserved memory per device (the plan's reserved figures are the call on one card).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from xcomp_lab.estimate.accounting import round_cuda
from xcomp_lab.memory.footprint import statistics
from xcomp_lab.plan.accounting import PlanAccounting


@dataclass(frozen=True)
class DevicePeak:
    """One device of a device map in a planned call: its weights and its allocated peak (bytes, CUDA blocks)."""

    device: str
    weights: int
    peak: int


def check_max_memory(max_memory: Any) -> dict[int | str, int]:
    """`max_memory` as accelerate takes it ({0: "20GiB", 1: 10 * 2**30, "cpu": "64GiB"}), in bytes."""
    from accelerate.utils import convert_file_size_to_int

    if not isinstance(max_memory, dict) or not max_memory:
        raise TypeError(f"max_memory={max_memory!r}; pass a dict of device to memory, e.g. {{0: '20GiB', 1: '20GiB'}} "
                        "(GPU indices, 'cpu', 'disk'), as from_pretrained(max_memory=...) takes it.")
    checked = {}
    for device, size in max_memory.items():
        if not (isinstance(device, int) and device >= 0) and device not in ("cpu", "disk"):
            raise ValueError(f"max_memory has the device {device!r}; a device is a GPU index (0, 1, ...), 'cpu' or "
                             "'disk'.")
        try:
            checked[device] = convert_file_size_to_int(size)
        except ValueError as exc:
            raise ValueError(f"max_memory[{device!r}]={size!r} is not a size; give bytes or a string such as "
                             "'20GiB' or '500MB'.") from exc
    return checked


def device_map_of(model: nn.Module, max_memory: dict[int | str, int]) -> dict[str, int | str]:
    """Where accelerate places `model`'s modules within `max_memory` (its `infer_auto_device_map`, the model's
    no-split classes)."""
    from accelerate import infer_auto_device_map

    # accelerate warns that a GPU index it cannot see is "not available": a plan is made without the GPUs.
    quiet = logging.getLogger("accelerate.utils.modeling")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return infer_auto_device_map(model, max_memory=max_memory,
                                     no_split_module_classes=list(getattr(model, "_no_split_modules", None) or []))
    finally:
        quiet.setLevel(level)


def device_name(device: int | str) -> str:
    """"cuda:0" for a GPU index, the name itself for "cpu" or "disk"."""
    return f"cuda:{device}" if isinstance(device, int) else str(device)


def weights_per_device(model: nn.Module, device_map: dict[str, int | str]) -> dict[str, int]:
    """The bytes (CUDA blocks) of each device's parameters, buffers and bitsandbytes statistics, each storage once."""
    out: dict[str, int] = {device_name(d): 0 for d in device_map.values()}
    seen: set[int] = set()
    for name, device in device_map.items():
        module = model.get_submodule(name) if name else model
        for sub in module.modules():
            for t in [*sub.parameters(recurse=False), *sub.buffers(recurse=False), *statistics(sub)]:
                key = t.untyped_storage()._cdata
                if key not in seen:
                    seen.add(key)
                    out[device_name(device)] += round_cuda(t.untyped_storage().nbytes())
    return out


@contextmanager
def follow_devices(model: nn.Module, device_map: dict[str, int | str], acc: PlanAccounting,
                   start: dict[str, int]) -> Iterator[None]:
    """Count the replay's storages per device (`PlanAccounting.place_on_devices` from `start`), the device set by
    each mapped module as it starts (each module of a mapped container: a ModuleList has no forward). A tensor
    argument held on another device is copied to the module's, as accelerate's hooks copy it (`send_to_device`)."""
    acc.place_on_devices(start)

    def starts(device: str, _module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        acc.device = device

        def to_device(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                held = acc.device_of.get(value.untyped_storage()._cdata)
                return value.clone() if held is not None and held[0] != device else value
            return value

        return tuple(to_device(a) for a in args), {k: to_device(v) for k, v in kwargs.items()}

    handles = []
    for name, device in device_map.items():
        module = model.get_submodule(name) if name else model
        targets = list(module.children()) if isinstance(module, (nn.ModuleList, nn.ModuleDict)) else [module]
        handles += [t.register_forward_pre_hook(partial(starts, device_name(device)), with_kwargs=True)
                    for t in targets]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def device_peaks(acc: PlanAccounting, weights: dict[str, int]) -> dict[str, DevicePeak]:
    """Each device's weights and allocated peak after the replay."""
    return {device: DevicePeak(device, weights.get(device, 0), acc.device_peaks.get(device, 0))
            for device in sorted(set(weights) | set(acc.device_peaks), key=lambda d: (not d.startswith("cuda"), d))}


def first_gpu(device_map: dict[str, int | str]) -> str:
    """The device the inputs go to: the first GPU of the map (the first device if none)."""
    devices = [d for d in device_map.values() if isinstance(d, int)]
    return device_name(min(devices) if devices else next(iter(device_map.values())))

