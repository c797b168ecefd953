"""forensics: the trimmed allocator summary, a snapshot's largest allocations, reading a timeline by phase."""

from __future__ import annotations

import collections

import pytest
import torch

from xcomp_lab.core.units import fmt_bytes
from xcomp_lab.lessons import forensics


def fake_summary(monkeypatch) -> str:
    """torch.cuda.memory_summary's own text, from made-up allocator statistics (no GPU needed)."""
    stats = collections.defaultdict(int, {"allocated_bytes.all.current": 3 * 2**30, "allocated_bytes.all.peak": 4 * 2**30,
                                          "reserved_bytes.all.current": 5 * 2**30, "num_ooms": 0, "num_alloc_retries": 0})
    monkeypatch.setattr(torch.cuda.memory, "memory_stats", lambda device=None: stats)
    return torch.cuda.memory_summary(0, abbreviated=True)


def test_trim_memory_summary_keeps_the_header_and_the_chosen_rows(monkeypatch):
    full = fake_summary(monkeypatch)
    trimmed = forensics.trim_memory_summary(full)
    cells = [line.strip("|").strip() for line in trimmed.splitlines()]
    assert any("PyTorch CUDA memory summary" in c for c in cells)
    assert any(c.startswith("Metric") for c in cells)
    rows = [c.split("|")[0].strip() for c in cells if "|" in c and not c.startswith(("Metric", "CUDA OOMs"))]
    assert rows == list(forensics.SUMMARY_ROWS)
    assert "3072 MiB" in trimmed and "5120 MiB" in trimmed  # allocated now, reserved now
    assert "Active memory" in full and "Active memory" not in trimmed
    assert len(trimmed.splitlines()) < len(full.splitlines())


def test_trim_memory_summary_rejects_other_text():
    with pytest.raises(ValueError, match="memory_summary"):
        forensics.trim_memory_summary("not a summary")


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
            (0.5, 200, "decode"), (0.6, 240, ""), (0.7, 201, ""), (0.8, 243, ""), (0.9, 202, ""), (1.0, 100, "end")]


def test_timeline_with_load_puts_the_load_first_and_shifts_the_call():
    joined = forensics.timeline_with_load(2.0, 100, TIMELINE)
    assert joined[:2] == [(0.0, 0, "load"), (2.0, 100, "")]
    assert joined[2] == (2.0, 100, "start") and joined[-1] == (3.0, 100, "end")
    with pytest.raises(ValueError):
        forensics.timeline_with_load(1.0, 100, [])
    with pytest.raises(ValueError):
        forensics.timeline_with_load(-1.0, 100, TIMELINE)


def test_phases_read_each_marker_and_the_highest_sample_until_the_next():
    rows = {p.label: p for p in forensics.phases(TIMELINE)}
    assert list(rows) == ["start", "vision", "prefill", "decode", "end"]
    assert (rows["vision"].at_start_bytes, rows["vision"].highest_bytes, rows["vision"].at_end_bytes) == (120, 150, 150)
    assert rows["prefill"].highest_bytes == 400 and rows["prefill"].samples == 2
    assert rows["decode"].samples == 5 and rows["end"].samples == 1
    table = forensics.format_phases(list(rows.values()), fmt_bytes)
    assert table.splitlines()[0].split() == ["marker", "at", "marker", "highest", "rise"]
    assert "prefill" in table.splitlines()[3] and table.splitlines()[3].rstrip().endswith("KiB")
    with pytest.raises(ValueError, match="no marker"):
        forensics.phases([(0.0, 1, "")])


def test_phase_floors_follow_the_lowest_point_of_each_slice():
    assert forensics.phase_floors(TIMELINE, "decode", 2) == [200, 201]  # slices [200, 240] and [201, 243, 202]
    assert forensics.phase_floors(TIMELINE, "prefill", 3) is None  # fewer samples than slices
    with pytest.raises(ValueError, match="no marker 'load'"):
        forensics.phase_floors(TIMELINE, "load", 1)
    with pytest.raises(ValueError, match="positive"):
        forensics.phase_floors(TIMELINE, "decode", 0)


def test_process_resident_bytes_is_positive_on_linux():
    rss = forensics.process_resident_bytes()
    assert rss is None or rss > 2**20


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
