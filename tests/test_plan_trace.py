"""The planner's simulated allocator stream set against a CUDA allocator trace (`plan.trace.planned_events`,
`trace_differences`; the trace itself is recorded on a GPU by `tools.plan_matrix --trace`)."""

from __future__ import annotations

from xcomp_lab.plan.estimate import CUBLAS_WORKSPACE_SM90
from xcomp_lab.plan.trace import planned_events, trace_differences

MIB = 1 << 20


def test_planned_events_follow_the_call_from_its_start() -> None:
    record = {"preset": "llama-3-8b", "tiny": True, "dtype": "bf16", "quantization": "nf4", "attn": "sdpa",
              "batch": 2, "prompt_tokens": 16, "new_tokens": 3, "image_size": None}
    events = planned_events(record)
    allocs = [size for action, size in events if action == "alloc"]
    assert allocs[0] == CUBLAS_WORKSPACE_SM90  # the workspace, taken at the first product
    assert {action for action, _ in events} <= {"alloc", "free_completed", "segment_alloc", "segment_free"}
    assert sum(s for a, s in events if a == "alloc") >= sum(s for a, s in events if a == "free_completed")


def test_trace_differences_align_the_streams_and_name_what_each_side_alone_made() -> None:
    """A CUDA trace names the bytes asked for; the GPU's extra allocations (a workspace) are grouped by the line that
    made them, the plan's own by size; small allocations are left out."""
    measured = [["segment_free", 1, 40 * MIB, []], ["alloc", 2, 8 * MIB - 100, ["a.py:1 f"]], ["alloc", 3, 512, ["s"]],
                ["alloc", 4, 15 * MIB, ["conv.py:548 _conv_forward"]], ["free_completed", 4, 15 * MIB, []],
                ["alloc", 5, 6 * MIB, ["b.py:2 g"]], ["alloc", 6, 3 * MIB, ["c.py:3 h"]]]
    planned = [["alloc", 8 * MIB - 100], ["alloc", 1024], ["alloc", 6 * MIB], ["alloc", 5 * MIB], ["alloc", 5 * MIB]]
    found = trace_differences(measured, planned)
    assert (found["measured"], found["planned"], found["matched"]) == (4, 4, 2)
    assert found["measured_only"] == [{"line": "conv.py:548 _conv_forward", "count": 1, "bytes": 15 * MIB, "first": 1},
                                      {"line": "c.py:3 h", "count": 1, "bytes": 3 * MIB, "first": 3}]
    assert found["planned_only"] == [{"size": 5 * MIB, "count": 2}]
    same = trace_differences([["alloc", i, size, ["x"]] for i, (_, size) in enumerate(planned)], planned)
    assert same["matched"] == same["planned"] == 4 and not same["measured_only"] and not same["planned_only"]


def test_traced_calls_are_found_by_name_and_compared(tmp_path, capsys) -> None:
    """A --trace run's folder: the matrix tool names each trace as validate finds it (a preset name with dots
    too), and a trace that is the planner's own stream does not part from it; one larger allocation does."""
    import gzip
    import json

    from xcomp_lab.plan import trace, validate
    from xcomp_lab.tools.plan_matrix import Grid, trace_path

    record = {"preset": "llama-3-8b", "tiny": True, "dtype": "bf16", "quantization": "nf4", "attn": "sdpa",
              "batch": 2, "prompt_tokens": 16, "text_tokens": 16, "new_tokens": 3, "image_size": None,
              "allocated_peak": 1, "reserved_peak": 1}
    (tmp_path / validate.RECORDS).write_text(json.dumps(record) + "\n")
    path = trace_path(Grid((2,), (16,), 3, trace=str(tmp_path / trace.TRACES)), "llama-3-8b", "nf4", "sdpa", 2, 16)
    assert path.name == trace.trace_name("llama-3-8b", "nf4", "sdpa", 2, 16)
    assert trace_path(Grid((1,), (8,), 2), "llava-1.5-7b", "nf4", "eager", 1, 8) is None
    assert trace.trace_name("llava-1.5-7b", "nf4", "eager", 1, 8) == "llava-1.5-7b-nf4-eager-b1-t8.json.gz"
    events = [[action, 0, size, []] for action, size in planned_events(record)]
    path.parent.mkdir()
    with gzip.open(path, "wt") as out:
        json.dump({"segments_at_start": [], "events": events}, out)
    trace.main([str(tmp_path)])
    (line,) = [json.loads(text) for text in capsys.readouterr().out.splitlines()]
    assert line["call"] == path.name and line["differences"]["matched"] == line["differences"]["planned"] > 0
    assert not line["differences"]["measured_only"] and not line["differences"]["planned_only"]
    large = next(i for i, e in enumerate(events) if e[0] == "alloc" and e[2] > 2 * MIB)
    events[large][2] += MIB
    events[large][3] = ["modeling_llama.py:1 forward"]
    with gzip.open(path, "wt") as out:
        json.dump({"segments_at_start": [], "events": events}, out)
    (found,) = trace.traced_calls(tmp_path)
    index = sum(e[0] == "alloc" and e[2] > MIB for e in events[:large])
    assert found["differences"]["measured_only"] == [{"line": "modeling_llama.py:1 forward", "count": 1,
                                                      "bytes": events[large][2] + 511 & ~511, "first": index}]
    assert found["differences"]["planned_only"] == [{"size": events[large][2] - MIB + 511 & ~511, "count": 1}]


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


def test_aten_kernels_internal_copies_seen_in_the_traces_are_planned() -> None:
    """`masked_scatter` keeps an int64 prefix sum and a contiguous copy of its mask, both of the output's size (after
    it); `native_layer_norm` copies a non-contiguous input first; a `sum` into another dtype copies its input to it,
    except FP16/BF16 read into FP32; every other op adds nothing."""
    import torch

    from xcomp_lab.plan.accounting import aten_temporaries

    aten = torch.ops.aten
    embeds = torch.empty(2, 300, 64, dtype=torch.bfloat16, device="meta")
    mask = torch.empty(2, 300, 1, dtype=torch.bool, device="meta")
    n = 2 * 300 * 64
    assert aten_temporaries(aten.masked_scatter.default, (embeds, mask, embeds), {}) == ((), (n * 8, n + 511 & ~511))
    weight = torch.empty(64, dtype=torch.bfloat16, device="meta")
    transposed = torch.empty(2, 64, 300, dtype=torch.bfloat16, device="meta").transpose(1, 2)
    layer_norm = aten.native_layer_norm.default
    assert aten_temporaries(layer_norm, (transposed, [64], weight, weight, 1e-6), {}) == ((n * 2,), ())
    assert aten_temporaries(layer_norm, (embeds, [64], weight, weight, 1e-6), {}) == ((), ())
    flags = torch.empty(4, 17, 3, 364, 364, dtype=torch.bool, device="meta")
    assert aten_temporaries(aten.sum.dim_IntList, (flags, [-1, -2, -3]), {}) == ((), (flags.numel() * 8,))
    assert aten_temporaries(aten.sum.dim_IntList, (embeds, [-1]), {"dtype": torch.float32}) == ((), ())
    assert aten_temporaries(aten.sum.default, (embeds,), {}) == ((), ())
    assert aten_temporaries(aten.add.Tensor, (embeds, embeds), {}) == ((), ())


def test_sdpa_on_cuda_allocates_its_output_alone_in_the_fused_kernels_layout() -> None:
    """The CPU's fused attention, which the fake tensors run, also returns an FP32 log-sum-exp; CUDA's fused kernels
    without gradients return the output alone, laid out (batch, query, heads, head dim)."""
    import torch

    from xcomp_lab.plan.accounting import CudaSdpa

    q = torch.randn(2, 8, 5, 16, dtype=torch.bfloat16)
    k = v = torch.randn(2, 8, 5, 16, dtype=torch.bfloat16)
    _, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    assert lse.shape == (2, 8, 5) and lse.dtype == torch.float32  # what the plan no longer counts on CUDA
    with CudaSdpa():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.shape == (2, 8, 5, 16) and out.dtype == torch.bfloat16
    assert out.transpose(1, 2).is_contiguous()


def test_segments_go_where_they_are_placed_and_move_with_their_blocks() -> None:
    """`CachingAllocator.placement` puts a new segment at the address it returns (None: the allocator's own order);
    `move_segment` takes a segment's blocks, allocated and free, along, so best fit and merging go on there."""
    import pytest

    from xcomp_lab.plan.allocator import CachingAllocator

    alloc = CachingAllocator()
    wanted = {40 * MIB: 1 << 40}
    alloc.placement = wanted.get
    a = alloc.malloc(40 * MIB)
    assert a.address == 1 << 40 and alloc.segments == {1 << 40: 40 * MIB}
    b, c = alloc.malloc(12 * MIB), alloc.malloc(12 * MIB)  # a 12 MiB segment each, in the allocator's own order
    assert b.address != 1 << 40 and c.address < b.address
    alloc.free(a)
    alloc.move_segment(1 << 40, 1 << 41)
    d = alloc.malloc(30 * MIB)  # best fit: the moved segment's free block
    assert d.address == 1 << 41 and d.segment == 1 << 41
    alloc.free(b)
    alloc.move_segment(b.segment, 1 << 42)  # its only block freed before the move
    alloc.move_segment(c.segment, 1 << 43)  # every block allocated: moved with it
    assert c.address == 1 << 43
    alloc.free(c)
    alloc.free(d)
    alloc.empty_cache()
    assert alloc.reserved == 0 and alloc.segments == {} and alloc.members == {}
    with pytest.raises(ValueError, match="no segment at"):
        alloc.move_segment(1 << 44, 0)


def test_gpu_placement_moves_the_kept_segments_and_hands_out_the_traces_addresses() -> None:
    """A trace's segments left at the call's start (not released by its opening empty_cache) are matched by size,
    largest first; new segments take the trace's addresses of their size in order; a trace without segments leaves
    the plan as it is."""
    from xcomp_lab.plan.allocator import CachingAllocator
    from xcomp_lab.plan.estimate import run_plan
    from xcomp_lab.plan.trace import gpu_placement, planned_on_gpu_addresses
    from xcomp_lab.plan.validate import record_call

    trace = {"segments_at_start": [[1 << 40, 100 * MIB, 90 * MIB], [1 << 41, 20 * MIB, 0]],
             "events": [["segment_free", 1 << 41, 20 * MIB], ["alloc", 5, 512],
                        ["segment_alloc", 3 << 40, 20 * MIB], ["segment_alloc", 4 << 40, 20 * MIB],
                        ["segment_alloc", 5 << 40, 16 * MIB]]}
    at_start, unused = gpu_placement(trace)
    alloc = CachingAllocator()
    kept = alloc.malloc(100 * MIB - 512)  # the weights' segment (segments of 2 MiB and less are not matched)
    at_start(alloc)
    assert kept.segment == 1 << 40
    assert alloc.malloc(5 * MIB).segment == 3 << 40 and alloc.malloc(16 * MIB).segment == 5 << 40
    assert unused == [(20 * MIB, 4 << 40)]
    record = {"preset": "llama-3-8b", "tiny": True, "dtype": "bf16", "quantization": "nf4", "attn": "sdpa",
              "batch": 2, "prompt_tokens": 16, "text_tokens": 16, "new_tokens": 3, "image_size": None,
              "allocated_peak": 1, "reserved_peak": 1}
    plain = planned_on_gpu_addresses(record, {"segments_at_start": [], "events": []})
    default = run_plan(record_call(record), 0.0, exact_decode=True)
    assert plain["planned_reserved"] == default.reserved_peak_bytes and plain["gpu_segments_unused"] == []
