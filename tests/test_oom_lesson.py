"""Notebook 01's helpers: reading real out-of-memory messages, and the history of the failing quick start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

from xcomp_lab.core.units import GIB, MIB
from xcomp_lab.course.params import check_params
from xcomp_lab.course.steps import STEPS, course_budget, run_step
from xcomp_lab.lessons.oom import (
    COPY_TAG,
    CPU,
    CPU_HISTORY,
    CUDA,
    CUDA_ONE_LINE,
    SEPARATOR,
    CpuCopyRecorder,
    copy_recorder,
    copy_trace,
    copy_trace_chart,
    parse_oom_message,
    with_categories,
)
from xcomp_lab.memory import Budget, measure
from xcomp_lab.memory.budget import BudgetExceededError

ROOT = Path(__file__).resolve().parent.parent

# The full-scale quick start on this project's H200 (torch 2.11.0+cu130, the L40S budget), as notebook 01 printed it.
H200_QUICKSTART = (
    "OutOfMemoryError: CUDA out of memory. Tried to allocate 226.00 MiB. GPU 0 has a total capacity of 139.80 GiB of "
    "which 95.46 GiB is free. Including non-PyTorch memory, this process has 44.33 GiB memory in use. 43.74 GiB "
    "allowed; Of the allocated memory 43.33 GiB is allocated by PyTorch, and 342.44 MiB is reserved by PyTorch but "
    "unallocated. If reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:"
    "True to avoid fragmentation.  See documentation for Memory Management  (https://docs.pytorch.org/docs/stable/"
    "notes/cuda.html#optimizing-memory-usage-with-pytorch-cuda-alloc-conf)")
# Public reports: two other processes on the card and the "capacty" misprint of some releases (a vLLM user's H100);
# a card with nothing free and no process line; the older one-line form (pytorch/pytorch issue #88081).
TWO_PROCESSES = (
    "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 448.00 MiB. GPU 1 has a total capacty of "
    "79.10 GiB of which 364.31 MiB is free. Process 175080 has 1.46 GiB memory in use. Process 175356 has 77.26 GiB "
    "memory in use. Of the allocated memory 72.12 GiB is allocated by PyTorch, and 3.78 GiB is reserved by PyTorch but "
    "unallocated. If reserved but unallocated memory is large try setting max_split_size_mb to avoid fragmentation.")
NOTHING_FREE = (
    "CUDA out of memory. Tried to allocate 730.00 MiB. GPU 0 has a total capacity of 8.00 GiB of which 0 bytes is "
    "free. Of the allocated memory 6.52 GiB is allocated by PyTorch, and 666.27 MiB is reserved by PyTorch but "
    "unallocated.")
ONE_LINE = ("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 23.70 GiB total capacity; 1.21 GiB already "
            "allocated; 6.69 MiB free; 1.22 GiB reserved in total by PyTorch)")


def gib(x: float) -> int:
    return round(x * GIB)


def mib(x: float) -> int:
    return round(x * MIB)


# ------------------------------------------------------------------------------------------------ the message

def test_the_h100_quick_start_message_reads_field_by_field():
    record = json.loads((ROOT / "results" / "full-h100" / "results.jsonl").read_text().splitlines()[0])
    assert record["step"] == "fp32-quickstart"
    oom = parse_oom_message(record["error"])
    assert oom.source == CUDA and oom.is_cuda and oom.gpu == 0
    assert (oom.requested_bytes, oom.total_capacity_bytes, oom.free_bytes) == (mib(226), gib(79.18), gib(33.96))
    assert oom.processes == (("this process", gib(45.21)),) and oom.this_process_bytes == gib(45.21)
    assert (oom.limit_bytes, oom.allocated_bytes, oom.reserved_unallocated_bytes) == (gib(44.70), gib(44.22),
                                                                                      mib(329.01))
    assert oom.reserved_bytes == gib(44.22) + mib(329.01)
    assert oom.outside_allocator_bytes == gib(45.21) - oom.reserved_bytes
    assert oom.over_by_bytes == oom.reserved_bytes + mib(226) - gib(44.70) > 0


def test_the_h200_message_adds_up_to_its_failure():
    oom = parse_oom_message(H200_QUICKSTART)
    assert (oom.limit_bytes, oom.allocated_bytes, oom.free_bytes) == (gib(43.74), gib(43.33), gib(95.46))
    table = oom.table()
    for words in ("Tried to allocate", "GPU 0 has a total capacity of", "of which ... is free",
                  "this process has ... memory in use", "... allowed", "... is allocated by PyTorch",
                  "... is reserved by PyTorch but unallocated"):
        assert words in table
    assert "-> reserved by PyTorch = allocated + unallocated = 43.66 GiB" in table
    assert "over the limit of 43.74 GiB by 148.6" in table  # 43.33 GiB + 342.44 MiB + 226 MiB - 43.74 GiB
    assert "what was already held decided the failure" in table


def test_other_processes_misprints_and_an_empty_card_are_read():
    two = parse_oom_message(TWO_PROCESSES)
    assert two.gpu == 1 and two.total_capacity_bytes == gib(79.10)
    assert two.processes == (("process 175080", gib(1.46)), ("process 175356", gib(77.26)))
    assert two.limit_bytes is None and two.this_process_bytes is None and two.outside_allocator_bytes is None
    assert two.over_by_bytes == mib(448) - mib(364.31)  # no limit set: the card's free memory is what ran out
    empty = parse_oom_message(NOTHING_FREE)
    assert empty.free_bytes == 0 and empty.processes == () and empty.over_by_bytes == mib(730)
    assert "over the 0.0 KiB free by 730.00 MiB" in empty.table()


def test_the_older_one_line_message_is_read():
    oom = parse_oom_message(ONE_LINE)
    assert oom.source == CUDA_ONE_LINE and oom.gpu == 0 and oom.limit_bytes is None
    assert (oom.requested_bytes, oom.total_capacity_bytes, oom.allocated_bytes, oom.free_bytes) == (
        mib(20), gib(23.70), gib(1.21), mib(6.69))
    assert oom.reserved_bytes == gib(1.22)


# The CPU budget's message of the quick start in the course run recorded on 2026-12-01 (docs/results-tiny-cpu.jsonl).
CPU_QUICKSTART_ERROR = ("BudgetExceededError: CPU budget exceeded (emulating a 48 GB card): Tried to allocate 600.2 KiB "
                        "in aten._softmax.default -> shape (1, 4, 196, 196) float32. 24.29 MiB in use of a budget of "
                        "24.85 MiB.")


def test_the_cpu_budget_message_of_a_course_run_is_read():
    oom = parse_oom_message(CPU_QUICKSTART_ERROR)
    assert oom.source == CPU and not oom.is_cuda and oom.reserved_bytes is None
    assert (oom.op, oom.shape, oom.dtype, oom.card_gb) == ("aten._softmax.default", (1, 4, 196, 196), "float32", 48.0)
    assert (oom.requested_bytes, oom.allocated_bytes, oom.limit_bytes) == (round(600.2 * 1024), mib(24.29),
                                                                           mib(24.85))
    assert [row[0] for row in oom.rows()] == ["Tried to allocate", "in <op>", "-> shape, dtype", "... in use",
                                              "a budget of"]


def test_a_live_budget_error_parses_to_its_own_attributes():
    budget = Budget.scaled_to(1024 * 1024, gb=48)
    with pytest.raises(BudgetExceededError) as raised:
        with measure("cpu", budget=budget):
            torch.empty(2 * budget.limit_bytes, dtype=torch.uint8)
    error = raised.value
    oom = parse_oom_message(str(error))
    assert oom.op == error.op and oom.shape == error.shape and oom.dtype == error.dtype
    for parsed, exact in ((oom.requested_bytes, error.requested_bytes), (oom.allocated_bytes, error.in_use_bytes),
                          (oom.limit_bytes, error.budget_bytes)):
        assert abs(parsed - exact) <= max(64, exact // 200)  # the message rounds to 3 or 4 figures
    assert oom.over_by_bytes > 0


def test_what_is_not_an_oom_message_is_refused_with_what_to_pass():
    with pytest.raises(ValueError, match="not an out-of-memory message.*run.memory.error"):
        parse_oom_message("RuntimeError: shapes cannot be multiplied")
    with pytest.raises(TypeError, match="text must be the message string"):
        parse_oom_message(None)


# -------------------------------------------------------------------------------------- a history, by hand

def alloc(addr: int, size: int, label: str, copy: bool = False) -> dict:
    return {"action": "alloc", "addr": addr, "size": size, "stream": 0, "frames": [],
            "user_metadata": label + (SEPARATOR + COPY_TAG if copy else "")}


def free(addr: int, size: int) -> list[dict]:
    return [{"action": a, "addr": addr, "size": size, "stream": 0, "frames": [], "user_metadata": ""}
            for a in ("free_requested", "free_completed")]


def test_a_history_reads_into_in_use_copies_parts_and_the_failure():
    events = [alloc(1, 100, "vision tower", copy=True), alloc(2, 50, "vision tower"), *free(2, 50),
              {"action": "segment_alloc", "addr": 9, "size": 4096, "user_metadata": "prefill: decoder layer 0"},
              alloc(3, 200, "prefill: decoder layer 0", copy=True), alloc(4, 30, "prefill: decoder layer 0"),
              {"action": "oom", "size": 500, "device_free": 10, "user_metadata": "prefill: decoder layer 0"},
              *free(4, 30), *free(3, 200), *free(1, 100), *free(7, 1000)]
    trace = copy_trace({"device_traces": [events]}, start_bytes=1000)
    assert trace.parts == ((1, "vision tower"), (3, "prefill: decoder layer 0"))
    assert trace.part_rows == (("vision tower", 100, 100, 1150), ("prefill: decoder layer 0", 200, 300, 1330))
    assert (trace.oom_at, trace.in_use_at_oom, trace.copies_at_oom, trace.requested_bytes) == (4, 1330, 300, 500)
    assert trace.oom_label == "prefill: decoder layer 0" and trace.copies_made == 300
    assert trace.in_use[-1] == 0 and trace.copies[-1] == 0  # a block from before the recording was freed too
    assert "OOM in prefill: decoder layer 0: asked for 0.5 KiB with 1.3 KiB in use" in trace.table()
    fig = copy_trace_chart(trace, budget_bytes=1500)
    assert isinstance(fig, Figure) and len(fig.axes) == 2


def test_a_full_ring_buffer_and_an_empty_history_are_refused():
    events = [alloc(i, 10, "vision tower") for i in range(5)]
    with pytest.raises(ValueError, match="max_entries=5.*oldest events were overwritten"):
        copy_trace({"device_traces": [events]}, 0, max_entries=5)
    with pytest.raises(ValueError, match="torch.cuda.memory._snapshot"):
        copy_trace({"segments": []}, 0)
    with pytest.raises(ValueError, match="no allocation"):
        copy_trace({"device_traces": [[]]}, 0)


def test_categories_colour_the_copies_and_keep_the_viewer_working():
    events = [alloc(1, 100, "vision tower", copy=True), alloc(2, 50, "vision tower"), *free(2, 50)]
    coloured = with_categories({"device_traces": [events], "segments": []})
    assert [e["category"] for e in coloured["device_traces"][0]] == [COPY_TAG, "other tensor", "unknown", "unknown"]
    assert "category" not in events[0]  # the snapshot given is left as it was
    from torch.cuda._memory_viz import trace_plot

    assert "Active Memory Timeline" in trace_plot(coloured)


# --------------------------------------------------------------------------- the quick start, recorded on CPU

@pytest.fixture(scope="module")
def quickstart(tiny_model, tmp_path_factory):
    model, tokenizer = tiny_model
    params = check_params(scale="tiny", device="cpu", results_path=tmp_path_factory.mktemp("r") / "results.jsonl")
    from xcomp_lab.course.notebook import batch_of_images

    return model, tokenizer, params, batch_of_images(params), course_budget(params, model.config)


def test_the_recorded_quick_start_fails_where_the_course_run_does(quickstart):
    model, tokenizer, params, images, budget = quickstart
    step = STEPS["fp32-quickstart"]
    plain, _ = run_step(step, model, tokenizer, images, params, budget)
    recorder = copy_recorder(model, "cpu")
    assert isinstance(recorder, CpuCopyRecorder) and recorder.start_bytes == plain.memory.start_bytes
    with recorder:
        traced, _ = run_step(step, model, tokenizer, images, params, budget)
    assert not plain.ok and not traced.ok and traced.memory.error == plain.memory.error
    oom = parse_oom_message(traced.memory.error)
    snapshot = recorder.snapshot(traced.memory.error)
    trace = copy_trace(snapshot, recorder.start_bytes, source=CPU_HISTORY)
    assert trace.source == CPU_HISTORY and trace.oom_event is not None
    assert abs(trace.in_use_at_oom - oom.allocated_bytes) <= oom.allocated_bytes // 200  # the message rounds
    assert abs(trace.requested_bytes - oom.requested_bytes) <= max(64, oom.requested_bytes // 200)
    assert trace.in_use[-1] == recorder.start_bytes  # every allocation of the failed call was freed
    labels = [label for _, label in trace.parts]
    assert labels[0] == "vision tower" and "prefill: decoder layer 0" in labels
    assert trace.oom_label.startswith("prefill: decoder layer")
    assert 0 < trace.copies_at_oom < trace.in_use_at_oom - recorder.start_bytes
    held = [row[2] for row in trace.part_rows]
    assert held == sorted(held)  # under no_grad the copies only pile up
    oom_events = [e for e in snapshot["device_traces"][0] if e["action"] == "oom"]
    assert len(oom_events) == 1 and oom_events[0]["size"] == trace.requested_bytes


def test_the_recorder_counts_what_measure_counts_and_inference_mode_holds_no_copies(quickstart):
    model, tokenizer, params, images, _ = quickstart
    for name in ("fp32-quickstart", "fp32-inference-mode"):
        with copy_recorder(model, "cpu") as recorder:
            run, _ = run_step(STEPS[name], model, tokenizer, images, params, None)
        trace = copy_trace(recorder.snapshot(), recorder.start_bytes, source=CPU_HISTORY)
        assert run.ok and trace.oom_event is None
        assert max(trace.in_use) == recorder.peak == run.memory.peak_bytes
        assert trace.copies_made > 0
        largest_weight = max(p.numel() * 2 for p in model.parameters())
        if name == "fp32-inference-mode":
            assert max(trace.copies) <= 2 * largest_weight  # each copy freed after its matmul
        else:
            assert max(trace.copies) > 4 * largest_weight
    with pytest.raises(ValueError, match="does not end with the failed request"):
        recorder.snapshot(CPU_QUICKSTART_ERROR)  # this call fitted: its history ends with no failed request
    with pytest.raises(ValueError, match="error is a CUDA message"):
        recorder.snapshot(H200_QUICKSTART)


def test_the_recorder_needs_a_known_device():
    with pytest.raises(ValueError, match="device='mps'; use 'cpu' or 'cuda'"):
        copy_recorder(nn.Linear(2, 2), "mps")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA tagger writes into the CUDA allocator's history")
def test_the_cuda_tagger_marks_autocast_copies_in_the_allocator_history(tiny_model):
    model, tokenizer = tiny_model
    model = model.cuda()
    from xcomp_lab.course.notebook import sample_images

    try:
        start = torch.cuda.memory_allocated()
        torch.cuda.memory._record_memory_history(max_entries=100_000, stacks="python")
        with copy_recorder(model, "cuda"), torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
            model.chat(tokenizer, "<ImageHere>Describe.", image=sample_images(1)[0][0], max_new_tokens=2,
                       do_sample=False)
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
        model.cpu()
    trace = copy_trace(snapshot, start, max_entries=100_000)
    assert trace.copies_made > 0 and trace.parts[0][1] == "vision tower"
    assert torch.cuda.memory._get_memory_metadata() == ""  # the tagger leaves no label behind
