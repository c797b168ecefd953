"""Host RAM while a model loads: the peak of a process's resident memory (RSS) during the load, measured.

A model is made in host RAM before it reaches a GPU unless `from_pretrained(device_map=...)` sends each tensor on
as it is read, and `.half()` after an FP32 load needs the FP32 model in full first. `measure_host()` runs one
phase in this process and reports its RSS before, at the peak and at the end. `compare_loads()` loads a
checkpoint in several ways, each in a fresh Python process, several times, and says whether the loads differ by
more than the run-to-run noise.

Why a fresh process per load: the C allocator keeps memory a process has freed and hands it out again, so in a
process that has already loaded and dropped models, a load reuses pages that are already resident and its peak
looks smaller than it is, by an amount that depends on everything that ran before (measured at tiny scale with
glibc: the FP32-then-`.half()` load rose 28 MiB in a fresh process and 12 to 20 MiB after earlier loads, even
after `malloc_trim`). A fresh process is also what a learner's script is. Each is forked from a server process
that has imported torch and transformers and loaded nothing (multiprocessing's "forkserver"; a new interpreter
where there is none); it builds the model once on the meta device (importing the checkpoint's code, allocating
nothing) before its baseline is read, and starts CUDA first when the load sends tensors to a GPU, so that the
context's host memory is not counted as the load's.

How the peak is read (`peak_method()`):
- "VmHWM" (Linux 4.0 and later): writing "5" to /proc/self/clear_refs resets the kernel's high-water mark of
  the process's RSS to its current RSS; after the phase, VmHWM in /proc/self/status is the phase's peak, however
  briefly it lasted. It assumes the process may write its own clear_refs (its owner may, unless a sandbox such
  as gVisor refuses) and counts the whole process, every thread.
- "sampled": where VmHWM cannot be reset (macOS, Windows, a sandbox), a thread reads the RSS every `interval_s`
  (/proc/self/statm on Linux, else psutil): the largest sample is a floor for the peak, which can fall between
  two samples.
- None: neither works (no /proc and no psutil): `measure_host` raises and says so.

RSS counts the file pages a process has mapped as well as its own (anonymous) memory. safetensors maps the
checkpoint, so its pages count while mapped, and a model loaded on the CPU in the checkpoint's own dtype keeps
them as its weights. On Linux the sampler also reads the anonymous part (resident minus shared pages in
/proc/self/statm), so the two can be told apart.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import gc
import json
import multiprocessing
import multiprocessing.context
import os
import signal
import statistics
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from time import perf_counter
from typing import Any, TypeVar

import torch
from matplotlib.figure import Figure

from xcomp_lab.core.checks import check_choice, check_int, check_number
from xcomp_lab.core.units import fmt_bytes
from xcomp_lab.course.charts import COLORS, AxisUnit, finish, new_axes

T = TypeVar("T")
CLEAR_REFS = "/proc/self/clear_refs"
STATUS = "/proc/self/status"
STATM = "/proc/self/statm"
RESET_HWM = "5"  # clear_refs value that resets VmHWM to the current RSS (Linux 4.0, commit 695f0559)
NOISE_FACTOR = 3  # a difference counts when it is more than this many times the noise,
RELATIVE_FLOOR = 0.05  # and more than this share of the larger figure: steady repeats make tiny gaps "clear" too
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
LOAD_KEYS = ("dtype", "device_map", "attn_implementation", "then")
CASTS = ("half", "bfloat16")
# What the forkserver imports once for every load (transformers' top level imports lazily: name what loads use).
PRELOAD = ["torch", "transformers", "transformers.modeling_utils", "transformers.models.auto.modeling_auto",
           "transformers.models.auto.configuration_auto", "safetensors.torch", __name__]  # what `then` may ask for after the load: `.half()` or `.to(torch.bfloat16)`


def _status_bytes(field: str) -> int:
    """A "kB" field of /proc/self/status (VmRSS, VmHWM, RssAnon, ...) in bytes."""
    with open(STATUS, encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{STATUS} has no {field} line; this kernel does not report it.")


def reset_peak() -> None:
    """Reset the kernel's high-water mark of this process's RSS (VmHWM) to its current RSS (Linux only)."""
    with open(CLEAR_REFS, "w", encoding="ascii") as f:
        f.write(RESET_HWM)


def peak_since_reset() -> int:
    """VmHWM: the largest RSS of this process since the last `reset_peak()` (or since it started), in bytes."""
    return _status_bytes("VmHWM")


@functools.cache
def peak_method() -> str | None:
    """How this machine's RSS peak is read: "VmHWM" (exact), "sampled" (a floor) or None (see the module docstring)."""
    if sys.platform.startswith("linux"):
        try:
            reset_peak()
            peak_since_reset()
            return "VmHWM"
        except (OSError, RuntimeError):
            pass
    try:
        read_rss()
    except RuntimeError:
        return None
    return "sampled"


def read_rss() -> tuple[int, int | None]:
    """This process's RSS now and, on Linux, its anonymous part (resident minus shared pages), in bytes."""
    try:
        with open(STATM, encoding="ascii") as f:
            resident, shared = (int(n) for n in f.read().split()[1:3])
        return resident * PAGE, (resident - shared) * PAGE
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        raise RuntimeError(f"cannot read this process's RSS: no {STATM} (not Linux) and psutil is not installed; "
                           f"`pip install psutil` to measure host RAM by sampling.") from None
    return psutil.Process().memory_info().rss, None


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


def release_freed() -> None:
    """Collect garbage, return CUDA's cached blocks, and hand freed heap pages back (glibc's `malloc_trim(0)`)."""
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class _Sampler(threading.Thread):
    """Reads the RSS every `interval_s` until stopped; keeps the largest total and anonymous values."""

    def __init__(self, interval_s: float) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.interval_s = interval_s
        self.stop_event = threading.Event()
        self.peak, self.anon_peak = read_rss()
        self.samples = 1

    def run(self) -> None:
        while not self.stop_event.wait(self.interval_s):
            self.take()

    def take(self) -> None:
        rss, anon = read_rss()
        self.peak = max(self.peak, rss)
        if anon is not None and self.anon_peak is not None:
            self.anon_peak = max(self.anon_peak, anon)
        self.samples += 1


@dataclass(frozen=True)
class HostPhase:
    """A process's RSS before, at the peak of, and at the end of one phase (a load), in bytes."""

    label: str
    method: str  # "VmHWM" (the kernel's exact high-water mark) or "sampled" (a floor)
    baseline_bytes: int  # RSS at the start, after garbage collection and malloc_trim
    peak_bytes: int  # RSS at its highest during the phase
    end_bytes: int  # RSS at the end, whatever the phase returned still alive
    anon_baseline_bytes: int | None  # the anonymous part (Linux), at the start
    anon_peak_bytes: int | None  # and the largest sample of it (a floor: sampled)
    samples: int  # RSS readings the sampler took
    seconds: float

    @property
    def rise_bytes(self) -> int:
        """How far the peak rose above the baseline: what the phase needed on top of the process."""
        return self.peak_bytes - self.baseline_bytes

    @property
    def held_bytes(self) -> int:
        """How much above the baseline the process still held at the end."""
        return self.end_bytes - self.baseline_bytes

    @property
    def anon_rise_bytes(self) -> int | None:
        """The anonymous part's largest sampled rise above its baseline (Linux), None elsewhere."""
        if self.anon_peak_bytes is None or self.anon_baseline_bytes is None:
            return None
        return self.anon_peak_bytes - self.anon_baseline_bytes

    def __str__(self) -> str:
        floor = "" if self.method == "VmHWM" else ">="
        return (f"{self.label}: RSS {fmt_bytes(self.baseline_bytes)} at start | peak {floor}"
                f"{fmt_bytes(self.peak_bytes)} (+{fmt_bytes(self.rise_bytes)}, {self.method}) | "
                f"{fmt_bytes(self.end_bytes)} at the end (+{fmt_bytes(self.held_bytes)}) | {self.seconds:.2f} s")


def measure_host(fn: Callable[[], T], *, label: str = "phase", interval_s: float = 0.002) -> tuple[T, HostPhase]:
    """Run `fn()` and measure this process's RSS: baseline, peak during the call, and end (its result still alive).

    The peak is the kernel's VmHWM where it can be reset, else the largest of samples taken every `interval_s`.
    In a process that has freed memory before, the peak can be lower than a fresh process's (see the module
    docstring); `compare_loads` measures each load in a fresh process for that reason.
    """
    if not callable(fn):
        raise ValueError(f"fn must be a callable taking no arguments, got {type(fn).__name__}: wrap the call, "
                         f"e.g. measure_host(lambda: AutoModel.from_pretrained(path, dtype=torch.float16))")
    check_number("interval_s", interval_s, maximum=1.0, hint="seconds between two RSS samples, e.g. 0.002")
    method = peak_method()
    if method is None:
        read_rss()  # raises with what to do
    release_freed()
    if method == "VmHWM":
        reset_peak()
    baseline, anon_baseline = read_rss()
    sampler = _Sampler(interval_s)
    start = perf_counter()
    sampler.start()
    try:
        value = fn()
    finally:
        sampler.stop_event.set()
        sampler.join()
    seconds = perf_counter() - start
    sampler.take()
    end, _ = read_rss()
    # The kernel's RSS counters are batched per CPU, so two readings can disagree by a few pages: the peak is at
    # least every reading taken.
    peak = max(sampler.peak, end, peak_since_reset() if method == "VmHWM" else 0)
    return value, HostPhase(label, method, baseline, peak, end, anon_baseline, sampler.anon_peak, sampler.samples,
                            seconds)


def check_load(load: Mapping[str, Any]) -> dict[str, Any]:
    """A load as `compare_loads` takes it: `from_pretrained` keywords (JSON values) and `then` ("half" or None)."""
    if not isinstance(load, Mapping) or set(load) - set(LOAD_KEYS):
        raise ValueError(f"a load is a dict with keys among {list(LOAD_KEYS)}, got {load!r}: e.g. "
                         f"{{'dtype': 'float32', 'then': 'half'}} or {{'dtype': 'float16', 'device_map': {{'': 'cuda'}}}}")
    if load.get("then") is not None:
        check_choice("then", load["then"], CASTS, hint="the cast after the load: 'half' is model.half()")
    try:
        json.dumps(dict(load))
    except TypeError:
        raise ValueError(f"a load must be plain JSON (it is sent to a fresh process): dtypes as names, e.g. "
                         f"'float16' instead of torch.float16; got {load!r}") from None
    return dict(load)


def _run_load(path: str, load: Mapping[str, Any]) -> Any:
    """What a measured load does: plain `from_pretrained`, then the cast `then` asks for.

    The dtype and attention go in as the checkpoint's code takes them (`model.loading.pretrained_keywords`: for the
    original's code, transformers 4.33.2's `torch_dtype` and no `attn_implementation`).
    """
    from transformers import AutoModel

    from xcomp_lab.model.loading import pretrained_keywords

    kwargs = {k: v for k, v in load.items() if k not in ("then", "dtype", "attn_implementation")}
    kwargs.update(pretrained_keywords(path, load.get("dtype", "auto"), load.get("attn_implementation")))
    model = AutoModel.from_pretrained(path, trust_remote_code=True, **kwargs)
    if load.get("then") == "half":
        model = model.half()
    elif load.get("then") == "bfloat16":
        model = model.to(torch.bfloat16)
    return model


def _uses_cuda(load: Mapping[str, Any]) -> bool:
    device_map = load.get("device_map")
    places = device_map.values() if isinstance(device_map, Mapping) else [device_map]
    return any(isinstance(p, (int, str)) and str(p) not in ("cpu", "disk", "meta") for p in places if p is not None)


def _child(request: Mapping[str, Any]) -> HostPhase:
    """In the fresh process: import the checkpoint's code, then measure one load (or nothing, when `load` is None).

    For the original's code, transformers 4.33.2 is prepared first where the server could not import it (its
    import-time check refuses a newer tokenizers, as on the GPU image: `original.environment`).
    """
    path, load = request["path"], request.get("load")
    if "transformers" not in sys.modules:
        from xcomp_lab.original.detect import checkpoint_environment, uses_original_code

        if uses_original_code(path):
            from xcomp_lab.original.environment import prepare_transformers

            prepare_transformers(checkpoint_environment(path))
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    with torch.device("meta"):
        AutoModel.from_config(config, trust_remote_code=True)  # imports the checkpoint's code; allocates nothing
    if load is not None and _uses_cuda(load):
        torch.zeros(1, device="cuda")  # the CUDA context, in the baseline
    call = (lambda: None) if load is None else (lambda: _run_load(path, load))
    _, phase = measure_host(call, label=request.get("label", "load"), interval_s=request.get("interval_s", 0.002))
    return phase


def _child_entry(request: Mapping[str, Any], conn: Any) -> None:
    with open(os.devnull, "w") as devnull:  # progress bars and warnings would land in the caller's output
        os.dup2(devnull.fileno(), sys.stdout.fileno())
        os.dup2(devnull.fileno(), sys.stderr.fileno())
    try:
        conn.send(("ok", dataclasses.asdict(_child(request))))
    except BaseException as exc:  # reported to the parent, which raises it with the load's name
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


@functools.cache
def _context() -> multiprocessing.context.BaseContext:
    """Processes forked from a server that has imported torch and transformers but loaded nothing ("forkserver"):
    fresh for every load without paying the imports each time; a new interpreter each time where there is none."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def measure_in_fresh_process(path: str | os.PathLike, load: Mapping[str, Any] | None, *, label: str = "load",
                             interval_s: float = 0.002, timeout_s: float = 1800) -> HostPhase:
    """Load `path` as `load` says (None: nothing) in a fresh process and return that process's `HostPhase`."""
    request = {"path": os.fspath(path), "load": None if load is None else check_load(load), "label": label,
               "interval_s": check_number("interval_s", interval_s, maximum=1.0, hint="seconds between samples")}
    context = _context()
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child_entry, args=(request, sender), name=f"host-memory {label}", daemon=True)
    process.start()
    sender.close()
    answer = None
    try:
        if receiver.poll(timeout_s):
            answer = receiver.recv()
    except EOFError:  # the process died before it answered
        pass
    finally:
        receiver.close()
        process.join(timeout=60)
        if process.is_alive():
            process.kill()
            process.join()
    if answer is None:
        code = process.exitcode
        if code is not None and code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
            hint = " (SIGKILL: most likely the kernel's OOM killer: the host ran out of RAM)" if name == "SIGKILL" else ""
            why = f"was killed by {name}{hint}"
        else:
            why = f"gave no answer within {timeout_s:g} s" if code is None else f"exited with code {code}"
        raise RuntimeError(f"the fresh process measuring {label!r} {why}.")
    status, value = answer
    if status != "ok":
        raise RuntimeError(f"the fresh process measuring {label!r} failed: {value}")
    return HostPhase(**value)


@dataclass(frozen=True)
class Difference:
    """Two loads' medians compared with the noise: `clear` when the gap is over NOISE_FACTOR x the noise and over
    RELATIVE_FLOOR of the larger median (repeats in fresh processes can agree to a few pages, and a gap of a few
    pages says nothing about a way of loading).

    `of` is "rise" (the peak above the baseline), "held" (what the process still held at the end) or "anon" (the
    sampled peak of the process's own, anonymous, memory above its baseline).
    """

    first: str
    second: str
    first_bytes: int
    second_bytes: int
    noise_bytes: int
    of: str = "rise"

    @property
    def bytes(self) -> int:
        return self.first_bytes - self.second_bytes

    @property
    def clear(self) -> bool:
        larger = max(abs(self.first_bytes), abs(self.second_bytes))
        return abs(self.bytes) > max(NOISE_FACTOR * self.noise_bytes, RELATIVE_FLOOR * larger)

    def line(self) -> str:
        """One sentence: the gap, its ratio, and whether it stands out from the noise."""
        more = "more" if self.bytes >= 0 else "less"
        ratio = f" (x{self.first_bytes / self.second_bytes:.2f})" if self.second_bytes > 0 else ""
        size = fmt_bytes(abs(self.bytes))
        gap = {"rise": f"{self.first} rose {size} {more} above the baseline than {self.second}{ratio}",
               "held": f"{self.first} held at the end {size} {more} than {self.second}{ratio}",
               "anon": f"{self.first}'s own (anonymous) memory rose {size} {more} than {self.second}'s{ratio}",
               }[self.of]
        if self.clear:
            return f"{gap}: over {NOISE_FACTOR} x the noise ({fmt_bytes(self.noise_bytes)})."
        return (f"{gap}: within {NOISE_FACTOR} x the noise ({fmt_bytes(self.noise_bytes)}) or {RELATIVE_FLOOR:.0%} of "
                f"the larger figure, so no verdict from this run.")


@dataclass(frozen=True)
class HostComparison:
    """Each load measured `repeats` times in fresh processes, in turn (every load once, then again)."""

    phases: dict[str, list[HostPhase]]

    @property
    def method(self) -> str:
        return next(iter(self.phases.values()))[0].method

    @property
    def repeats(self) -> int:
        return len(next(iter(self.phases.values())))

    def rise(self, name: str) -> int:
        """The median peak rise of load `name` over its repeats."""
        return int(statistics.median(p.rise_bytes for p in self._of(name)))

    def held(self, name: str) -> int:
        """The median of what load `name` still held at its end."""
        return int(statistics.median(p.held_bytes for p in self._of(name)))

    def anon_rise(self, name: str) -> int | None:
        """The median sampled rise of the anonymous part of load `name` (Linux), None elsewhere."""
        values = [p.anon_rise_bytes for p in self._of(name)]
        return None if None in values else int(statistics.median(values))

    def spread(self, name: str) -> int:
        """Largest minus smallest of load `name`'s peak rises, or of what it held at the end, over its repeats."""
        phases = self._of(name)
        return max(max(values) - min(values) for values in ([p.rise_bytes for p in phases],
                                                              [p.held_bytes for p in phases]))

    @property
    def noise_bytes(self) -> int:
        """The run-to-run noise: the widest spread of any load's repeats (at least a page)."""
        return max([self.spread(name) for name in self.phases] + [PAGE])

    def difference(self, first: str, second: str, *, of: str = "rise") -> Difference:
        """Two loads' median peak rises (`of="rise"`), what they held at the end (`of="held"`) or the rises of their
        anonymous memory (`of="anon"`, Linux only), against the noise."""
        check_choice("of", of, ("rise", "held", "anon"),
                     hint="the peak above the baseline, what was held at the end, or the anonymous part's peak")
        value = {"rise": self.rise, "held": self.held, "anon": self.anon_rise}[of]
        first_bytes, second_bytes = value(first), value(second)
        if first_bytes is None or second_bytes is None:
            raise ValueError(f"of='anon' needs the anonymous part of the RSS, which only Linux reports "
                             f"(/proc/self/statm); this comparison was measured by {self.method}: use of='rise'.")
        return Difference(first, second, first_bytes, second_bytes, self.noise_bytes, of)

    def _of(self, name: str) -> list[HostPhase]:
        if name not in self.phases:
            raise KeyError(f"no load named {name!r}; measured: {list(self.phases)}")
        return self.phases[name]

    def table(self) -> str:
        """Median peak rise (with its range), anonymous part, and what each load still held at its end."""
        floor = "" if self.method == "VmHWM" else ">="
        width = max(len(name) for name in self.phases)
        lines = [f"{'load':{width}s} {'peak above baseline':>20s} {'range':>23s} {'anonymous':>10s} "
                 f"{'held at end':>12s} {'seconds':>8s}"]
        for name, phases in self.phases.items():
            rises = [p.rise_bytes for p in phases]
            anon = self.anon_rise(name)
            lines.append(f"{name:{width}s} {floor + fmt_bytes(self.rise(name)):>20s} "
                         f"{fmt_bytes(min(rises)) + ' - ' + fmt_bytes(max(rises)):>23s} "
                         f"{'-' if anon is None else fmt_bytes(anon):>10s} {fmt_bytes(self.held(name)):>12s} "
                         f"{statistics.median(p.seconds for p in phases):8.2f}")
        baseline = statistics.median(p.baseline_bytes for phases in self.phases.values() for p in phases)
        lines.append(f"RSS peak by {self.method}, each load in a fresh process ({fmt_bytes(baseline)} before it, "
                     f"median), {self.repeats} repeats each; noise (the widest spread of a load's repeats) "
                     f"{fmt_bytes(self.noise_bytes)}.")
        return "\n".join(lines)


def compare_loads(path: str | os.PathLike, loads: Mapping[str, Mapping[str, Any]], *, repeats: int = 2,
                  interval_s: float = 0.002) -> HostComparison:
    """Load the checkpoint at `path` in each way of `loads` (name -> `from_pretrained` keywords), `repeats` times.

    Each load runs in a fresh Python process (see the module docstring); the loads take turns (a, b, c, a, b,
    c, ...) so that a drift of the machine shows as spread, not as a gap between loads. A load's keywords are
    plain JSON: {"dtype": "float32", "then": "half"} is `from_pretrained(path, dtype=torch.float32).half()`, and for a
    checkpoint of the original's code `torch_dtype=torch.float32` (its transformers 4.33.2's name; `_run_load`).
    """
    if not isinstance(loads, Mapping) or not loads:
        raise ValueError(f"loads must be a non-empty mapping of name -> load, got {loads!r}: e.g. "
                         f"{{'float16 at load': {{'dtype': 'float16'}}}}")
    checked = {name: check_load(load) for name, load in loads.items()}
    check_int("repeats", repeats, hint="times each load is measured; 2 or more measure the noise")
    phases: dict[str, list[HostPhase]] = {name: [] for name in checked}
    for _ in range(repeats):
        for name, load in checked.items():
            phases[name].append(measure_in_fresh_process(path, load, label=name, interval_s=interval_s))
    return HostComparison(phases)


def host_peaks_chart(comparison: HostComparison, *, references: Mapping[str, int] | None = None,
                     title: str | None = None, path: str | None = None) -> Figure:
    """One bar per load: the median peak rise above the baseline (range as whiskers), and what it held at the end.

    `references` draws lines at sizes to read the bars against, e.g. {"FP16 weights": n_bytes}.
    """
    references = dict(references or {})
    names = list(comparison.phases)
    rises = [comparison.rise(n) for n in names]
    highs = [max(p.rise_bytes for p in comparison.phases[n]) for n in names]
    lows = [min(p.rise_bytes for p in comparison.phases[n]) for n in names]
    held = [max(comparison.held(n), 0) for n in names]
    anon = [comparison.anon_rise(n) for n in names]
    unit = AxisUnit.for_bytes(max(highs + list(references.values()) + [1]))
    fig, ax = new_axes(max(6.0, 1.8 * len(names) + 3.0), 4.4)
    x = list(range(len(names)))
    ax.bar(x, [unit.of(r) for r in rises], width=0.6, color=COLORS["weights"], label="peak above baseline (median)")
    ax.bar(x, [unit.of(h) for h in held], width=0.3, color=COLORS["buffers"], label="still held at the end")
    if None not in anon:
        ax.scatter(x, [unit.of(a) for a in anon], marker="D", color=COLORS["activations"], zorder=3,
                   label="anonymous part of the peak (sampled)")
    ax.errorbar(x, [unit.of(r) for r in rises], yerr=[[unit.of(r - lo) for r, lo in zip(rises, lows)],
                                                       [unit.of(hi - r) for r, hi in zip(rises, highs)]],
                fmt="none", ecolor=COLORS["budget"], capsize=4, label=f"range over {comparison.repeats} repeats")
    for i, rise in enumerate(rises):
        ax.annotate(unit.fmt(rise), (i, unit.of(highs[i])), xytext=(0, 4), textcoords="offset points",
                    ha="center", fontsize=8)
    for (name, nbytes), style in zip(references.items(), (":", "-.", "--")):
        ax.axhline(unit.of(nbytes), color=COLORS["other"], linestyle=style, linewidth=1.2, label=name)
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel(f"RSS above the baseline, {unit.label}")
    ax.set_ylim(0, unit.of(max(highs + list(references.values()) + [1])) * 1.2)
    ax.set_title(title or f"Host RAM while loading (RSS peak by {comparison.method})")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.legend(loc="outside right upper", fontsize=8)
    return finish(fig, path)
