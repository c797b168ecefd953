"""Notebook 09's lesson module (`xcomp_lab.lessons.plan_any`): a config folder plans as its preset, the CPU check
is exact, the batch search keeps every plan and finds the largest that fits, the matrix summary's figures, the
widget without a browser, and the errors."""

from __future__ import annotations

import dataclasses
import statistics
from types import SimpleNamespace

import pytest

from xcomp_lab.core.resources import repository_root
from xcomp_lab.core.units import fmt_bytes
from xcomp_lab.lessons import plan_any
from xcomp_lab.memory.cards import CONTEXT_BYTES, card_named
from xcomp_lab.plan import estimate, validate

TINY = "llama-3-8b:tiny"
CALL = {"attn": "sdpa", "batch": 1, "prompt_tokens": 16, "new_tokens": 4}


@pytest.fixture(scope="module")
def tiny_plan():
    return estimate(TINY, **CALL, device="cuda", card="L40S")


def test_model_name_follows_the_scale_and_refuses_what_it_does_not_know() -> None:
    assert plan_any.model_name("llama-3-8b", "tiny") == TINY
    assert plan_any.model_name("qwen2-vl-7b", "full") == "qwen2-vl-7b"
    with pytest.raises(ValueError, match="scale"):
        plan_any.model_name("llama-3-8b", "huge")
    with pytest.raises(ValueError, match="preset"):
        plan_any.model_name("my-model", "tiny")


def test_a_config_folder_plans_as_its_preset(tmp_path, tiny_plan) -> None:
    folder = plan_any.config_folder("llama-3-8b", tmp_path / "model", tiny=True)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]
    by_folder = estimate(folder, **CALL, device="cuda", card="L40S")
    assert (by_folder.peak_bytes, by_folder.reserved_peak_bytes) == (tiny_plan.peak_bytes,
                                                                     tiny_plan.reserved_peak_bytes)


def test_the_cpu_run_is_the_cpu_prediction() -> None:
    settings = dict(CALL, dtype="fp32", batch=2)
    measured = plan_any.run_on_cpu("llama-3-8b", **settings)
    predicted = estimate(TINY, **settings, device="cpu")
    assert measured.peak_bytes == predicted.peak_bytes > measured.weights_bytes
    with pytest.raises(ValueError, match="is a VLM"):
        plan_any.run_on_cpu("qwen2-vl-7b", **settings)


def test_the_scaled_card_holds_room_times_the_reserved_peak(tiny_plan) -> None:
    card = plan_any.scaled_card(card_named("L40S"), tiny_plan, room=3)
    assert card.usable_bytes == round(tiny_plan.reserved_peak_bytes * 3)
    assert card.total_bytes == card.usable_bytes + CONTEXT_BYTES and "L40S" in card.name
    with pytest.raises(ValueError, match="room"):
        plan_any.scaled_card(card_named("L40S"), tiny_plan, room=1)


def test_batch_search_keeps_every_plan_and_finds_the_largest(monkeypatch) -> None:
    asked = []

    def fake_estimate(model, *, batch, card, device, **settings):
        asked.append(batch)
        return SimpleNamespace(fits=batch <= 6, peak_bytes=batch, reserved_peak_bytes=2 * batch)

    monkeypatch.setattr(plan_any, "estimate", fake_estimate)
    card = card_named("L4")
    search = plan_any.batch_search(TINY, card=card, prompt_tokens=16)
    assert search.largest == 6 and asked[:4] == [1, 2, 4, 8]
    assert list(search.plans) == sorted(set(asked)) and search.plans[6].fits and not search.plans[7].fits
    assert "largest batch that fits L4: 6" in str(search)
    reading = plan_any.search_reading(search)
    assert f"holds {card.usable_bytes / 2:.1f} times" in reading and "is 6, fewer than that" in reading
    assert f"costs {fmt_bytes(2)} of reserved memory on average, 100% of the batch-1 call's" in reading
    capped = plan_any.batch_search(TINY, card=card, limit=5)
    assert capped.largest == 5 and "the search's limit" in str(capped)
    monkeypatch.setattr(plan_any, "estimate", lambda model, **kw: SimpleNamespace(fits=False))
    assert plan_any.batch_search(TINY, card=card).largest is None
    with pytest.raises(ValueError, match="limit"):
        plan_any.batch_search(TINY, card=card, limit=0)


def _row(arch: str, alloc: float | None, resv: float | None, accel: float, seconds: float = 1.0) -> dict:
    row = {"architecture": arch, "preset": arch, "quantization": "none", "attn": "sdpa", "batch": 1,
           "prompt_tokens": 512, "measured_allocated": 100, "measured_reserved": 110,
           "accelerate_error_allocated": accel, "accelerate_bytes": round(100 * (1 + accel))}
    if alloc is None:
        row["prediction_error"] = "ValueError: no"
    else:
        row.update(error_allocated=alloc, error_reserved=resv, predict_s=seconds,
                   predicted_allocated=round(100 * (1 + alloc)), predicted_reserved=round(110 * (1 + resv)))
    return row


def test_matrix_summary_per_architecture() -> None:
    rows = [_row("a", 0.001, -0.02, -0.5, 2.0), _row("a", -0.003, 0.0, -0.1, 4.0), _row("a", None, None, -0.3),
            _row("b", 0.0, 0.001, -0.2)]
    a, b = validate.matrix_summary(rows)
    assert (a["calls"], a["not_predicted"], b["calls"]) == (2, 1, 1)
    assert a["median_allocated"] == pytest.approx(statistics.median([0.001, -0.003]))
    assert a["worst_allocated"] == -0.003 and a["worst_reserved"] == -0.02
    assert a["under_1pct"] == 1 and b["under_1pct"] == 0
    assert a["median_accelerate"] == -0.3 and a["worst_accelerate"] == -0.5 and a["median_predict_s"] == 3.0
    table = validate.matrix_table([a, b])
    assert "2+1" in table and "-2.00%" in table
    assert "| a | 2 (1) | -0.10% / -0.30% | -1.00% / -2.00% | 1 | -30.00% / -50.00% | 3.0 s |" in \
        validate.matrix_markdown([a, b])
    (none,) = validate.matrix_summary(rows, by="quantization")
    assert (none["group"], none["calls"], none["under_1pct"]) == ("none", 3, 1)
    assert validate.matrix_table([none], by="quantization").startswith("quantization ")
    with pytest.raises(ValueError, match="by='dtype'"):
        validate.matrix_summary(rows, by="dtype")
    reading = plan_any.matrix_reading([a, b], rows)
    assert reading.startswith("3 of 4 compared calls have a prediction.")
    assert "not met: worst reserved <= 3%" not in reading and "no under-prediction over 1%" in reading
    assert "below the measured allocated peak on 4 of 4 calls" in reading
    assert plan_any.matrix_chart(rows).axes[0].get_xlabel() == "measured max_memory_allocated (GiB)"


def test_the_committed_matrix_reads_back(tmp_path) -> None:
    rows, records, env = plan_any.read_matrix(repository_root() / "results" / "plan-matrix-h200")
    summary = validate.matrix_summary(rows)
    assert sum(s["calls"] + s["not_predicted"] for s in summary) == len(rows) > 0
    assert len(validate.measured_calls(records)) >= len(rows) and env["runs"][-1]["gpu"]["gpu"]
    with pytest.raises(FileNotFoundError, match="plan_matrix"):
        plan_any.read_matrix(tmp_path)


def test_charts_draw_the_card(tiny_plan) -> None:
    figure = plan_any.plan_chart(tiny_plan)  # a tiny model on a real card: the card is named, not drawn
    usable = fmt_bytes(card_named("L40S").usable_bytes)
    assert figure.axes[0].get_ylabel() == "MiB" and f"L40S: {usable} usable, off the chart" in figure.axes[0].get_title()
    card = plan_any.scaled_card(card_named("L40S"), tiny_plan)
    shrunk = plan_any.plan_chart(dataclasses.replace(tiny_plan, card=card))
    assert any("usable on L40S" in t.get_text() for t in shrunk.axes[0].get_legend().get_texts())
    search = plan_any.BatchSearch(1, 256, card, {1: tiny_plan})
    assert plan_any.search_chart(search).axes[0].get_ylabel() == "MiB"


def test_the_widget_shows_the_initial_plan_and_predicts_on_click(tiny_plan) -> None:
    box = plan_any.plan_widget("llama-3-8b:tiny", "L40S", initial=tiny_plan)
    output = box.children[-1]
    assert tiny_plan.table() in output.outputs[0]["text"]
    controls = {w.description: w for row in box.children[:-1] for w in row.children}
    controls["model"].value = "gemma-2-9b:tiny"  # no sdpa: the error is shown, nothing raised
    controls["Predict"].click()
    assert output.outputs[0]["text"].startswith("error: attn='sdpa'")
    controls["attention"].value = "eager"
    controls["Predict"].click()
    assert output.outputs[0]["text"].startswith("gemma-2-9b:tiny on cuda: bf16, none, eager")
    with pytest.raises(ValueError, match="model"):
        plan_any.plan_widget("my-model")


def test_the_guide_answers_every_question_the_notebook_asks() -> None:
    """Until a recorded course run times notebook 09 (`make guide`), the guide's own tests do not read its questions."""
    from xcomp_lab.tools import guide

    paths = guide.guide_paths()
    (key,) = guide.answer_key(paths.sources, ["09-plan-your-own-model"], guide.guide_context(paths))
    assert len(key["questions"]) == len(guide.ANSWERS["09"]) >= 2 and len(guide.GOALS["09"].goals) >= 2


def test_repeated_calls_are_read_beside_their_plan(tmp_path) -> None:
    """`reserved_repeats`: runs that reserved the same bytes are counted, a call whose runs differ or whose plan is
    more than 1% off is listed with every run; no repeat at all is said so."""
    import json

    def record(batch: int, reserved: int) -> dict:
        return {"preset": "p", "quantization": "none", "attn": "sdpa", "batch": batch, "prompt_tokens": 8,
                "reserved_peak": reserved, "allocated_peak": 100}

    (tmp_path / "records.jsonl").write_text("\n".join(json.dumps(record(b, r)) for b, r in ((1, 200), (4, 400))))
    plans = [{"settings": validate.settings_key(record(b, 0)), "predicted_reserved": r}
             for b, r in ((1, 200), (4, 400))]
    assert plan_any.reserved_repeats(tmp_path, plans).startswith("No call")
    (tmp_path / "repeats" / "a").mkdir(parents=True)
    (tmp_path / "repeats" / "a" / "records.jsonl").write_text(
        json.dumps(record(1, 200)) + "\n" + json.dumps(record(4, 500)) + "\n")
    lines = plan_any.reserved_repeats(tmp_path, plans).splitlines()
    assert lines[0].startswith("2 calls measured 2 times: 1 reserved the same bytes every time, 1 did not")
    assert len(lines) == 2 and "batch 4" in lines[1] and "(25.0% apart)" in lines[1] and "+0.00%, -20.00%" in lines[1]


def test_calls_measured_alone_are_set_beside_the_matrix() -> None:
    """`reserved_alone`: each call measured alone is paired with the same call in the matrix; the tallies count the
    calls within 3% and under by more than 1% on each side, and only calls the matrix puts more than 1% off get a
    line; a call the matrix lacks is left out, and none at all is said so."""
    def row(batch: int, error: float, measured: int = 1000) -> dict:
        return {"settings": f"[{batch}]", "preset": "p", "quantization": "nf4", "attn": "sdpa", "batch": batch,
                "prompt_tokens": 8, "error_reserved": error, "measured_reserved": measured,
                "measured_allocated": 500, "error_allocated": 0.0, "architecture": "a", "predict_s": 1.0}

    matrix = [row(1, -0.05, 1100), row(2, 0.004), row(4, 0.002)]
    alone = [row(1, 0.001, 1048), row(2, -0.002), row(8, 0.5)]
    lines = plan_any.reserved_alone(matrix, alone).splitlines()
    assert lines[0].startswith("The 2 calls the matrix put furthest from the plan on the reserved peak (|error| 0.40%")
    assert lines[1] == ("- against the matrix's run: within 3% on 1, under-predicted by more than 1% on 1, largest "
                        "error -5.00% (p nf4 sdpa batch 1, 8 tokens)")
    assert lines[2].startswith("- against the call alone:   within 3% on 2, under-predicted by more than 1% on 0")
    assert "at most 0.000% apart" in lines[3]
    assert len(lines) == 6 and "batch 1" in lines[4] and "(plan -5.00%)" in lines[4] and "(+0.10%)" in lines[4]
    assert lines[5].startswith("The matrix's 3 calls with these 2 as measured alone") and "holds" in lines[5]
    assert [r["error_reserved"] for r in plan_any.merge_alone(matrix, alone)] == [0.001, -0.002, 0.002]
    assert plan_any.reserved_alone(matrix, [row(8, 0.5)]).startswith("No call measured alone")
    assert plan_any.reserved_alone([*matrix, row(8, 0.2)], alone[:2]).startswith("2 calls of the matrix, each")
