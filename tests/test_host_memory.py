"""Host RAM while loading (xcomp_lab.lessons.host_memory): the RSS peak of a phase, in this process and in fresh ones."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from xcomp_lab.core.units import MIB
from xcomp_lab.lessons import host_memory
from xcomp_lab.lessons.host_memory import (
    Difference,
    HostComparison,
    HostPhase,
    check_load,
    compare_loads,
    host_peaks_chart,
    measure_host,
    measure_in_fresh_process,
    peak_method,
)

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and /proc/self/statm are Linux's")


def touched(nbytes: int) -> np.ndarray:
    """An array whose every page has been written, so that it is resident."""
    return np.ones(nbytes // 8)


@linux_only
def test_this_machine_resets_the_high_water_mark():
    assert peak_method() == "VmHWM"


@linux_only
def test_a_transient_allocation_shows_in_the_peak_and_not_at_the_end():
    def transient() -> int:
        block = touched(64 * MIB)
        return int(block[-1])

    value, phase = measure_host(transient, label="transient")
    assert value == 1 and phase.method == "VmHWM" and phase.label == "transient"
    # Gone before the end: only a high-water mark sees it (the kernel's RSS counters batch per CPU: within 2%).
    assert phase.rise_bytes >= 0.98 * 64 * MIB
    assert phase.held_bytes < 8 * MIB
    assert phase.anon_rise_bytes is not None and phase.anon_rise_bytes <= phase.rise_bytes


@linux_only
def test_a_kept_allocation_is_held_at_the_end_and_sampling_sees_it(monkeypatch):
    block, phase = measure_host(lambda: touched(32 * MIB))
    assert phase.held_bytes >= 0.98 * 32 * MIB and phase.rise_bytes >= phase.held_bytes
    del block
    monkeypatch.setattr(host_memory, "peak_method", lambda: "sampled")
    block, sampled = measure_host(lambda: touched(32 * MIB), interval_s=0.001)
    assert sampled.method == "sampled" and sampled.rise_bytes >= 0.98 * 32 * MIB and sampled.samples >= 2
    assert ">=" in str(sampled) and ">=" not in str(phase)


@linux_only
def test_mapped_file_pages_count_in_rss_but_not_as_anonymous_memory(tmp_path):
    file = tmp_path / "weights.bin"
    np.ones(32 * MIB // 8).tofile(file)

    def read_mapped() -> float:
        mapped = np.memmap(file, dtype=np.float64, mode="r")
        return float(mapped.sum())  # touches every page of the mapping

    total, phase = measure_host(read_mapped)
    assert total == 32 * MIB // 8
    assert phase.rise_bytes >= 30 * MIB
    assert phase.anon_rise_bytes < 8 * MIB  # the pages are the file's, not the process's own


def phase(label: str, rise: int, held: int | None = None, anon: int | None = None) -> HostPhase:
    held = rise if held is None else held
    return HostPhase(label, "VmHWM", 100 * MIB, 100 * MIB + rise, 100 * MIB + held, 90 * MIB,
                     None if anon is None else 90 * MIB + anon, 10, 0.5)


def test_a_comparison_reads_medians_spread_and_noise():
    comparison = HostComparison({"a": [phase("a", 30 * MIB), phase("a", 36 * MIB), phase("a", 31 * MIB)],
                                 "b": [phase("b", 10 * MIB, anon=MIB), phase("b", 11 * MIB, anon=MIB),
                                       phase("b", 10 * MIB, anon=MIB)]})
    assert comparison.repeats == 3 and comparison.method == "VmHWM"
    assert comparison.rise("a") == 31 * MIB and comparison.held("b") == 10 * MIB
    assert comparison.spread("a") == 6 * MIB and comparison.noise_bytes == 6 * MIB
    assert comparison.anon_rise("b") == MIB and comparison.anon_rise("a") is None
    gap = comparison.difference("a", "b")
    assert gap.bytes == 21 * MIB and gap.clear  # 21 MiB > 3 x 6 MiB
    assert "rose 21.00 MiB more above the baseline than b (x3.10): over 3 x the noise (6.00 MiB)" in gap.line()
    assert comparison.difference("a", "b", of="held").of == "held"
    with pytest.raises(ValueError, match="of='anon' needs the anonymous part"):
        comparison.difference("a", "b", of="anon")  # a's anonymous part was not measured
    table = comparison.table()
    assert "31.00 MiB" in table and "30.00 MiB - 36.00 MiB" in table and "3 repeats each" in table
    with pytest.raises(KeyError, match="no load named 'c'"):
        comparison.rise("c")
    with pytest.raises(ValueError, match="of='peak'"):
        comparison.difference("a", "b", of="peak")


@pytest.mark.parametrize("first, second, noise, clear", [
    (20 * MIB, 10 * MIB, 3 * MIB, True),
    (20 * MIB, 12 * MIB, 3 * MIB, False),  # 8 MiB is within 3 x 3 MiB
    (10 * MIB + 200 * 1024, 10 * MIB, 4096, False),  # steady repeats, but 2% of the figure: no verdict
    (10 * MIB, 20 * MIB, MIB, True),
])
def test_a_difference_is_called_only_beyond_the_noise_and_five_percent(first, second, noise, clear):
    gap = Difference("x", "y", first, second, noise)
    assert gap.clear is clear
    assert ("no verdict" in gap.line()) is not clear
    assert ("less" in gap.line()) is (first < second)


def test_bad_arguments_say_what_to_pass():
    with pytest.raises(ValueError, match="callable"):
        measure_host("model.safetensors")
    with pytest.raises(ValueError, match="interval_s"):
        measure_host(lambda: None, interval_s=0)
    with pytest.raises(ValueError, match="keys among"):
        check_load({"torch_dtype": "float16"})
    with pytest.raises(ValueError, match="then='float'"):
        check_load({"dtype": "float32", "then": "float"})
    with pytest.raises(ValueError, match="plain JSON"):
        check_load({"dtype": torch.float16})
    with pytest.raises(ValueError, match="non-empty mapping"):
        compare_loads("path", {})
    with pytest.raises(ValueError, match="repeats=0"):
        compare_loads("path", {"b": {"dtype": "float16"}}, repeats=0)


@pytest.fixture(scope="module")
def fp16_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    from xcomp_lab.model.checkpoint import build_checkpoint

    return build_checkpoint("tiny", "float16", seed=0, out_dir=tmp_path_factory.mktemp("tiny-fp16"), progress=False)


@linux_only
def test_loads_in_fresh_processes_tell_fp32_then_half_from_fp16(fp16_checkpoint):
    comparison = compare_loads(fp16_checkpoint, {"fp32 then half": {"dtype": "float32", "then": "half"},
                                                 "fp16": {"dtype": "float16"}}, repeats=2)
    stored = sum(p.stat().st_size for p in fp16_checkpoint.glob("*.safetensors"))  # FP16 weights, and a header
    assert comparison.method == "VmHWM" and comparison.repeats == 2
    # (a) makes the FP32 model (2 x the file) in the process's own memory, then its FP16 copy; (b) maps the file.
    assert comparison.anon_rise("fp32 then half") >= 0.9 * 2 * stored
    assert comparison.anon_rise("fp16") < 0.5 * stored
    gap = comparison.difference("fp32 then half", "fp16")
    assert gap.clear and gap.bytes >= 0.9 * stored
    assert isinstance(host_peaks_chart(comparison, references={"FP16 weights": stored}), Figure)


@linux_only
def test_a_failing_load_names_itself(tmp_path):
    with pytest.raises(RuntimeError, match="measuring 'broken' failed: "):
        measure_in_fresh_process(tmp_path, {"dtype": "float16"}, label="broken")


def test_the_chart_saves_a_png(tmp_path):
    comparison = HostComparison({"a": [phase("a", 30 * MIB, held=5 * MIB, anon=20 * MIB)],
                                 "b": [phase("b", 10 * MIB, anon=MIB)]})
    fig = host_peaks_chart(comparison, references={"FP16 weights": 9 * MIB}, path=tmp_path / "host.png")
    assert isinstance(fig, Figure) and (tmp_path / "host.png").stat().st_size > 0
    assert "MiB" in fig.axes[0].get_ylabel()
