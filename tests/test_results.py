"""The results file: records built from a measurement, appended as JSON lines and read back."""

import json
from datetime import datetime

import pytest
import torch

from xcomp_lab.core.units import MIB
from xcomp_lab.course.results import FIELDS, append_result, build_record, latest_by_step, read_results
from xcomp_lab.memory import Budget, measure


@pytest.fixture
def memory():
    with measure("cpu", budget=Budget.scaled_to(8 * MIB), label="record") as m:
        x = torch.empty(MIB // 4)
    m.set_kv_cache_bytes(MIB // 2)
    del x
    return m.result


def test_record_has_every_documented_field(memory):
    record = build_record("01-fp32", {"dtype": "float32", "tokens": 1300}, memory, tokens_per_s=12.5,
                          caption="a cat", predicted_peak_bytes=2 * MIB, extra={"note": "tiny"})
    assert tuple(record) == FIELDS
    assert record["params"] == {"dtype": "float32", "tokens": 1300}
    assert record["device"] == "cpu" and record["memory_kind"] == "cpu-accounting"
    assert record["peak_bytes"] == MIB and record["kv_cache_bytes"] == MIB // 2
    assert record["activations_bytes"] == MIB // 2 and record["weights_bytes"] == 0
    assert record["budget_bytes"] == memory.budget_bytes and record["oom"] is False
    assert record["torch_version"] == torch.__version__
    assert datetime.fromisoformat(record["timestamp"]).utcoffset().total_seconds() == 0
    assert record["extra"] == {"note": "tiny"} and record["predicted_peak_bytes"] == 2 * MIB


def test_round_trip_and_latest_by_step(tmp_path, memory):
    path = tmp_path / "sub" / "results.jsonl"
    first = build_record("01-fp32", {"run": 1}, memory)
    second = build_record("02-fp16", {"run": 2}, None, caption="no measurement")
    third = build_record("01-fp32", {"run": 3}, memory, tokens_per_s=3)
    for record in (first, second, third):
        append_result(path, record)
    records = read_results(path)
    assert records == [first, second, third]
    assert len(path.read_text().splitlines()) == 3
    latest = latest_by_step(records)
    assert list(latest) == ["01-fp32", "02-fp16"]
    assert latest["01-fp32"]["params"] == {"run": 3} and latest["01-fp32"]["tokens_per_s"] == 3.0
    assert latest["02-fp16"]["device"] is None and latest["02-fp16"]["peak_bytes"] is None


def test_bad_input_is_refused(tmp_path, memory):
    with pytest.raises(ValueError, match="params must be JSON-serialisable"):
        build_record("01", {"dtype": torch.float16}, memory)
    with pytest.raises(ValueError, match="step must be a non-empty string"):
        build_record("", {}, memory)
    with pytest.raises(ValueError, match="memory must be a MemoryResult"):
        build_record("01", {}, memory.as_dict())
    with pytest.raises(ValueError, match="record must be a dict with a string 'step'"):
        append_result(tmp_path / "r.jsonl", {"no": "step"})
    with pytest.raises(FileNotFoundError, match="No file of course results at .*missing.jsonl: run the notebooks"):
        read_results(tmp_path / "missing.jsonl")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"step": "ok"}) + "\n{not json\n")
    with pytest.raises(ValueError, match="broken.jsonl:2 is not a JSON line"):
        read_results(broken)


def test_an_append_after_a_torn_line_sets_the_fragment_aside_and_starts_a_line_of_its_own(tmp_path, memory):
    path = tmp_path / "results.jsonl"
    first = build_record("01-fp32", {"run": 1}, memory)
    append_result(path, first)
    whole = json.dumps(build_record("02-fp16", {"run": 2}, memory))
    with path.open("a") as f:
        f.write(whole[:40])  # the write that was interrupted
    with pytest.raises(ValueError, match=r"results.jsonl:2 is not a JSON line .*torn end of an interrupted write.*moves it to .*results"
                                         r"\.jsonl\.torn \(kept, not deleted\).*set_aside_torn_line"):
        read_results(path)
    third = build_record("03-bf16", {"run": 3}, memory)
    with pytest.warns(UserWarning, match=r"results.jsonl:2 was a torn line .* moved to .*results.jsonl.torn"):
        append_result(path, third)
    assert read_results(path) == [first, third]
    assert (tmp_path / "results.jsonl.torn").read_text() == f"results.jsonl:2: {whole[:40]}\n"


def test_a_complete_last_record_without_its_newline_is_kept(tmp_path, memory):
    path = tmp_path / "results.jsonl"
    first, second = build_record("01", {}, memory), build_record("02", {}, memory)
    path.write_text(json.dumps(first))
    append_result(path, second)
    assert read_results(path) == [first, second] and not (tmp_path / "results.jsonl.torn").exists()


def test_a_bad_line_inside_the_file_is_named_with_what_to_do(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"step": "a"}\n[1, 2]\n{"step": "b"}\n')
    with pytest.raises(ValueError, match=r"results.jsonl:2 is not a JSON object line \(it holds a list\): fix that line, or "
                                         r"move it out of the file \(to keep it, into .*results.jsonl.torn\)"):
        read_results(path)


def test_write_results_replaces_the_file_atomically(tmp_path, memory, monkeypatch):
    import os

    from xcomp_lab.course.results import write_results

    path = tmp_path / "results.jsonl"
    records = [build_record("01", {}, memory), build_record("02", {}, memory)]
    write_results(path, records)
    assert read_results(path) == records

    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_results(path, records[:1])
    assert read_results(path) == records and [p.name for p in tmp_path.iterdir()] == ["results.jsonl"]
    with pytest.raises(ValueError, match="record must be a dict with a string 'step'"):
        write_results(path, [{"no": "step"}])
