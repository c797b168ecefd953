"""The planner's simulated allocator stream set against a CUDA allocator trace (`plan.validate.planned_events`,
`first_divergence`; the trace itself is recorded on a GPU by `tools.plan_matrix --trace`)."""

from __future__ import annotations

from xcomp_lab.plan.estimate import CUBLAS_WORKSPACE_SM90
from xcomp_lab.plan.validate import first_divergence, planned_events

MIB = 1 << 20


def test_planned_events_follow_the_call_from_its_start() -> None:
    record = {"preset": "llama-3-8b", "tiny": True, "dtype": "bf16", "quantization": "nf4", "attn": "sdpa",
              "batch": 2, "prompt_tokens": 16, "new_tokens": 3, "image_size": None}
    events = planned_events(record)
    allocs = [size for action, size in events if action == "alloc"]
    assert allocs[0] == CUBLAS_WORKSPACE_SM90  # the workspace, taken at the first product
    assert {action for action, _ in events} <= {"alloc", "free_completed", "segment_alloc", "segment_free"}
    assert sum(s for a, s in events if a == "alloc") >= sum(s for a, s in events if a == "free_completed")


def test_first_divergence_names_the_first_large_allocation_that_differs() -> None:
    measured = [["segment_free", 1, 40 * MIB, []], ["alloc", 2, 32 * MIB, ["ws"]], ["alloc", 3, 512, ["small"]],
                ["alloc", 4, 8 * MIB, ["a"]], ["free_completed", 4, 8 * MIB, []], ["alloc", 5, 6 * MIB, ["b"]]]
    planned = [["alloc", 32 * MIB], ["alloc", 1024], ["alloc", 8 * MIB], ["alloc", 7 * MIB]]
    found = first_divergence(measured, planned, context=1)
    assert found["index"] == 2 and found["measured"] == [(8 * MIB, ["a"]), (6 * MIB, ["b"])]
    assert found["planned"] == [8 * MIB, 7 * MIB]
    assert first_divergence(measured[:4], planned[:3]) is None


def test_traced_calls_are_found_by_name_and_compared(tmp_path, capsys) -> None:
    """A --trace run's folder: the matrix tool names each trace as validate finds it (a preset name with dots
    too), and a trace that is the planner's own stream does not part from it; one larger allocation does."""
    import gzip
    import json

    from xcomp_lab.plan import validate
    from xcomp_lab.tools.plan_matrix import Grid, trace_path

    record = {"preset": "llama-3-8b", "tiny": True, "dtype": "bf16", "quantization": "nf4", "attn": "sdpa",
              "batch": 2, "prompt_tokens": 16, "text_tokens": 16, "new_tokens": 3, "image_size": None,
              "allocated_peak": 1, "reserved_peak": 1}
    (tmp_path / validate.RECORDS).write_text(json.dumps(record) + "\n")
    path = trace_path(Grid((2,), (16,), 3, trace=str(tmp_path / validate.TRACES)), "llama-3-8b", "nf4", "sdpa", 2, 16)
    assert path.name == validate.trace_name("llama-3-8b", "nf4", "sdpa", 2, 16)
    assert trace_path(Grid((1,), (8,), 2), "llava-1.5-7b", "nf4", "eager", 1, 8) is None
    assert validate.trace_name("llava-1.5-7b", "nf4", "eager", 1, 8) == "llava-1.5-7b-nf4-eager-b1-t8.json.gz"
    events = [[action, 0, size, []] for action, size in planned_events(record)]
    path.parent.mkdir()
    with gzip.open(path, "wt") as out:
        json.dump({"segments_at_start": [], "events": events}, out)
    validate.main([str(tmp_path), "--traces"])
    assert json.loads(capsys.readouterr().out) == {"call": path.name, "divergence": None}
    large = next(i for i, e in enumerate(events) if e[0] == "alloc" and e[2] > 2 * MIB)
    events[large][2] += MIB
    with gzip.open(path, "wt") as out:
        json.dump({"segments_at_start": [], "events": events}, out)
    (found,) = validate.trace_divergences(tmp_path)
    assert found["divergence"]["index"] == sum(e[0] == "alloc" and e[2] > MIB for e in events[:large])


def test_a_session_runs_a_builds_calls_one_after_the_other() -> None:
    """As the matrix ran a build: the first call is the fresh-load plan; a later call keeps the workspace and starts
    from what the first left; a session takes one model only."""
    import time

    import pytest

    from xcomp_lab.plan.estimate import Session, check_call, run_plan

    def call(batch: int, model: str = "llama-3-8b:tiny"):
        return check_call(model, dtype="bf16", quantization="nf4", attn="sdpa", batch=batch, prompt_tokens=16,
                          new_tokens=3, image_size=None, device="cuda", card=None)

    session = Session()
    first = run_plan(call(2), time.perf_counter(), session=session)
    single = run_plan(call(2), time.perf_counter())
    assert (first.peak_bytes, first.reserved_peak_bytes) == (single.peak_bytes, single.reserved_peak_bytes)
    events: list[list] = []
    second = run_plan(call(2), time.perf_counter(), events=events, session=session)
    assert CUBLAS_WORKSPACE_SM90 not in [size for action, size in events if action == "alloc"]  # kept, not made
    assert second.peak_bytes == first.peak_bytes  # the same call again: the same bytes allocated
    with pytest.raises(ValueError, match="new Session"):
        run_plan(call(2, "qwen2.5-7b:tiny"), time.perf_counter(), session=session)
