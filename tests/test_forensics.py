"""forensics: a snapshot's largest allocations, a CUDA timeline rebuilt from the memory history, reading a timeline
by phase and by decode step, the marked caption, the host's memory."""

from __future__ import annotations

from pathlib import Path

import pytest

from xcomp_lab.core.units import fmt_bytes
from xcomp_lab.lessons import forensics


def frame(filename: str, line: int, name: str) -> dict:
    return {"filename": filename, "line": line, "name": name}


def test_largest_allocations_groups_by_size_and_names_the_model_line():
    torch_frame = frame("/x/site-packages/torch/nn/modules/linear.py", 125, "forward")
    model_frame = frame("/ckpt/modeling_internlm_xcomposer2.py", 412, "forward")
    caller = frame("/x/site-packages/transformers/generation/utils.py", 10, "generate")
    trace = [
        {"action": "alloc", "size": 100, "frames": [torch_frame, model_frame, caller]},
        {"action": "alloc", "size": 100, "frames": [torch_frame, model_frame, caller]},
        {"action": "free_completed", "size": 100, "frames": []},
        {"action": "alloc", "size": 300, "frames": [torch_frame, caller]},
        {"action": "segment_alloc", "size": 10_000, "frames": []},
        {"action": "alloc", "size": 7, "frames": []},
    ]
    top = forensics.largest_allocations({"device_traces": [trace]}, n=2)
    assert [(a.size, a.count) for a in top] == [(300, 1), (100, 2)]
    assert top[0].where.startswith("utils.py:10 in generate")  # the innermost frame outside torch
    assert top[1].where.startswith("modeling_internlm_xcomposer2.py:412 in forward")  # the model's line preferred
    everything = forensics.largest_allocations({"device_traces": [trace]}, n=10)
    assert everything[-1].where == "no Python frame outside torch"
    with pytest.raises(ValueError, match="device_traces"):
        forensics.largest_allocations({"segments": []})
    with pytest.raises(ValueError, match="1 device"):
        forensics.largest_allocations({"device_traces": [trace]}, device=1)


TIMELINE = [(0.0, 100, "start"), (0.1, 120, "vision"), (0.2, 150, ""), (0.3, 130, "prefill"), (0.4, 400, ""),
            (0.5, 200, "decode"), (0.6, 240, ""), (0.7, 201, "decode"), (0.8, 243, ""), (0.9, 202, "decode"),
            (0.95, 150, ""), (1.0, 100, "end")]


def test_timeline_with_load_puts_the_load_first_and_shifts_the_call():
    joined = forensics.timeline_with_load(2.0, 100, TIMELINE)
    assert joined[:2] == [(0.0, 0, "load"), (2.0, 100, "")]
    assert joined[2] == (2.0, 100, "start") and joined[-1] == (3.0, 100, "end")
    with pytest.raises(ValueError):
        forensics.timeline_with_load(1.0, 100, [])
    with pytest.raises(ValueError):
        forensics.timeline_with_load(-1.0, 100, TIMELINE)


def test_phases_merge_the_decode_steps_and_read_the_highest_sample():
    rows = {p.label: p for p in forensics.phases(TIMELINE)}
    assert list(rows) == ["start", "vision", "prefill", "decode", "end"]
    assert (rows["vision"].at_start_bytes, rows["vision"].highest_bytes, rows["vision"].at_end_bytes) == (120, 150, 150)
    assert rows["prefill"].highest_bytes == 400 and rows["prefill"].samples == 2
    assert rows["decode"].markers == 3 and rows["decode"].samples == 6 and rows["decode"].highest_bytes == 243
    table = forensics.format_phases(list(rows.values()), fmt_bytes)
    assert table.splitlines()[0].split() == ["marker", "at", "marker", "highest", "rise"]
    assert table.splitlines()[4].startswith("decode x3")
    with pytest.raises(ValueError, match="no marker"):
        forensics.phases([(0.0, 1, "")])


def test_step_floors_take_the_lowest_point_of_each_step():
    assert forensics.step_floors(TIMELINE, "decode") == [200, 201, 150]  # the last step runs into the end
    assert forensics.step_floors(TIMELINE, "prefill") == [130]
    with pytest.raises(ValueError, match="no marker 'load'"):
        forensics.step_floors(TIMELINE, "load")


def test_timeline_object_reads_and_draws():
    timeline = forensics.Timeline(tuple(TIMELINE), "test")
    assert timeline.phase("decode").markers == 3 and timeline.highest_bytes == 400
    assert timeline.floors() == [200, 201, 150] and timeline.above(100)[0] == (0.0, 0, "start")
    assert "decode x3" in timeline.table()
    with pytest.raises(ValueError, match="no phase 'load'"):
        timeline.phase("load")
    assert timeline.chart(load_seconds=1.0, weights_bytes=100, title="t").axes


def event(action: str, size: int, t: int) -> dict:
    return {"action": action, "size": size, "time_us": t, "addr": 0, "frames": []}


# A history that starts before the call: 3 allocations came before the log, the call's start mark is read after
# the log's first allocation and its free, the prefill mark after the second allocation, the end after the last free.
HISTORY = [event("alloc", 10, 1), event("free_requested", 10, 2), event("free_completed", 10, 2),
           event("segment_alloc", 2**20, 3), event("alloc", 100, 3), event("alloc", 50, 4),
           event("free_requested", 50, 5), event("free_requested", 100, 6), event("alloc", 7, 7),
           event("free_requested", 7, 8)]
MARKS = [forensics.Mark("start", 4, 1536, 1000), forensics.Mark("prefill", 5, 1536, 1100),
         forensics.Mark("end", 7, 1536, 1000)]


def test_trace_timeline_rebuilds_every_allocation_and_places_the_marks():
    samples = forensics.trace_timeline({"device_traces": [HISTORY]}, MARKS)
    assert samples[0] == (0.0, 1000, "start") and samples[-1][1:] == (1000, "end")
    assert [b for _, b, label in samples if not label] == [1100, 1150, 1100, 1000, 1007, 1000]
    assert (1e-06, 1100, "prefill") in samples  # after the second allocation, at the time of the next entry
    assert max(b for _, b, _ in samples) == 1150
    phases = {p.label: p for p in forensics.phases(samples)}
    assert phases["prefill"].highest_bytes - phases["prefill"].at_start_bytes == 50


def test_trace_timeline_refuses_a_history_that_does_not_fit_the_marks():
    with pytest.raises(ValueError, match="larger max_entries"):
        forensics.trace_timeline({"device_traces": [HISTORY]}, [forensics.Mark("start", 2, 0, 1000), *MARKS[1:]])
    with pytest.raises(ValueError, match="take the snapshot right after the call"):
        forensics.trace_timeline({"device_traces": [HISTORY]}, [MARKS[0], forensics.Mark("prefill", 5, 0, 999), MARKS[2]])
    untimed = [{k: v for k, v in e.items() if k != "time_us"} for e in HISTORY]
    with pytest.raises(ValueError, match="time_us"):
        forensics.trace_timeline({"device_traces": [untimed]}, MARKS)
    with pytest.raises(ValueError, match="device_traces"):
        forensics.trace_timeline({"segments": []}, MARKS)
    with pytest.raises(ValueError, match="at least the start and the end"):
        forensics.trace_timeline({"device_traces": [HISTORY]}, MARKS[:1])


def test_host_memory_reads_proc_on_linux():
    host = forensics.host_memory()
    if host.total_bytes is None:
        pytest.skip("no /proc/meminfo here")
    assert 0 < host.available_bytes <= host.total_bytes
    assert host.process_resident_bytes is None or host.process_resident_bytes > 2**20


def test_prefill_parts_measure_attention_and_logits_on_the_real_prompt(tiny_model, scene_image):
    model, tokenizer = tiny_model
    parts = forensics.measure_prefill_parts(model, tokenizer, [scene_image], device="cpu")
    cfg = model.config
    assert parts.logits_bytes == parts.tokens * cfg.vocab_size * 4  # FP32 model: .float() makes no copy
    scores = cfg.num_attention_heads * parts.tokens**2 * 4  # FP32 scores of one layer
    assert scores < parts.attention_bytes < 10 * scores


def test_run_caption_samples_every_allocation_when_asked(tiny_model, scene_image):
    from xcomp_lab.run.call import run_caption

    model, tokenizer = tiny_model
    coarse = run_caption(model, tokenizer, [scene_image], device="cpu", max_new_tokens=2)
    fine = run_caption(model, tokenizer, [scene_image], device="cpu", max_new_tokens=2, sample_every=1)
    assert len(fine.memory.timeline) > 10 * len(coarse.memory.timeline)
    assert fine.memory.peak_bytes == coarse.memory.peak_bytes
    assert max(b for _, b, _ in fine.memory.timeline) == fine.memory.peak_bytes  # no spike between samples


def test_caption_timeline_marks_every_decode_step_and_records(tiny_model, scene_image, tmp_path):
    from xcomp_lab.course.params import check_params

    model, tokenizer = tiny_model
    params = check_params(scale="tiny", device="cpu", max_new_tokens=4, results_path=tmp_path / "r.jsonl")
    caption = forensics.caption_timeline(model, tokenizer, [scene_image], params, step_name="fp32-no-autocast")
    run = caption.run
    assert run.ok and caption.marks == () and caption.record["step"] == "07-caption-timeline"
    timeline = caption.timeline()
    labels = [label for _, _, label in timeline.samples if label]
    assert labels[:3] == ["start", "vision", "prefill"] and labels[-1] == "end"
    assert labels.count("decode") == run.new_tokens - 1
    assert timeline.highest_bytes == run.memory.peak_bytes  # one sample per allocation: no spike is missed
    assert (tmp_path / "r.jsonl").read_text().count("\n") == 1


def test_first_decode_reads_the_three_causes_from_its_figures():
    timeline = forensics.Timeline(((0.0, 100, "start"), (1.0, 150, "prefill"), (2.0, 400, ""), (3.0, 180, "decode-1"),
                                   (4.0, 200, ""), (5.0, 170, "decode"), (6.0, 100, "end")), "test")
    first = forensics.FirstDecode(layers=2, prompt_tokens=10, at_start_bytes=80, cache_view_bytes=40,
                                  cache_storage_bytes=100, prefill_logits_bytes=0, new_kv_bytes=8)
    assert first.packed_bytes == 60
    lines = first.lines(timeline).splitlines()
    assert len(lines) == 4
    assert f"{fmt_bytes(60)} more, the packed wqkv outputs" in lines[1]
    assert "were freed before decode step 1" in lines[2]
    assert lines[3].startswith(f"3. decode step 1 rises {fmt_bytes(20)} above its start")
    with pytest.raises(ValueError, match="no phase 'decode-1'"):
        first.lines(forensics.Timeline(((0.0, 1, "start"), (1.0, 2, "prefill")), "test"))


def test_recorded_peak_phases_of_the_original_at_full_size():
    folder = Path(__file__).resolve().parents[1] / "results" / "original-h200"
    phases = forensics.recorded_peak_phases(folder / "results-1.jsonl", folder / "results-2.jsonl")
    assert phases["fp32-no-autocast"] == "decode-1"  # DESIGN.md section 6: the first decode step
    assert phases["fp32-quickstart"] == "OOM in prefill"
    assert phases["fp16-half-no-autocast"] == "failed"  # the RuntimeError in img2emb
    with pytest.raises(ValueError, match="at least one results file"):
        forensics.recorded_peak_phases()
