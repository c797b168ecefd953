"""Load/cast memory and drift from a reference (xcomp_lab.lessons.precision), on tiny models, exact byte counts."""

import dataclasses

import pytest
import torch
from torch import nn

from xcomp_lab.lessons.precision import (
    RESIDENT_KIND,
    Reference,
    drift_from,
    drift_line,
    fp32_reference,
    measure_cast,
    measure_load,
    stored_dtypes,
    with_speed,
)
from xcomp_lab.data.quality import QualityReport
from xcomp_lab.memory.footprint import resident_bytes
from xcomp_lab.run.speed import Speed

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class WithBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 32)
        self.register_buffer("table", torch.randn(128), persistent=False)


def test_load_on_cpu_reports_resident_bytes_and_no_peak():
    (model, extra), change = measure_load(lambda: (WithBuffer(), "tokenizer"), "cpu")
    assert extra == "tokenizer"
    assert change.kind == RESIDENT_KIND and change.peak_bytes is None
    assert change.before_bytes == 0
    assert change.after_bytes == resident_bytes(model, "cpu") == (64 * 32 + 32 + 128) * 4
    assert change.peak_or_lower_bound == change.after_bytes
    assert "not visible" in str(change)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cast_halves_parameters_and_floating_buffers(dtype):
    model = WithBuffer()
    fp32 = resident_bytes(model, "cpu")
    same, change = measure_cast(model, dtype, "cpu")
    assert same is model and model.linear.weight.dtype == dtype and model.table.dtype == dtype
    assert change.before_bytes == fp32 and change.after_bytes * 2 == fp32
    # On CPU the peak is not measured; the FP32 model that existed before the cast is its floor.
    assert change.peak_bytes is None and change.peak_or_lower_bound == fp32


def test_cast_and_load_reject_bad_arguments():
    with pytest.raises(ValueError, match="floating torch dtype"):
        measure_cast(WithBuffer(), torch.int8, "cpu")
    with pytest.raises(ValueError, match="callable"):
        measure_load("model.safetensors", "cpu")


@cuda_only
def test_cast_on_cuda_peaks_above_the_fp32_model():
    model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(4)]).cuda()
    fp32 = resident_bytes(model, "cuda")
    _, change = measure_cast(model, torch.float16, "cuda")
    assert change.after_bytes * 2 == fp32
    # .half() makes each FP16 copy while the FP32 tensor it replaces still exists.
    assert change.peak_bytes >= fp32 + 1024 * 1024 * 2


def test_a_model_against_itself_has_no_drift(tiny_model):
    model, tokenizer = tiny_model
    reference = fp32_reference(model, tokenizer, n=2, n_logits=1, max_new_tokens=4)
    assert isinstance(reference, Reference) and len(reference.captions) == 2
    assert reference.logits.dtype == torch.float32 and reference.logits.shape[0] == 1
    drift = drift_from(reference, model, tokenizer)
    assert drift.captions == reference.captions
    report = drift.report
    assert report.agreement_with_reference == 1.0 and report.n == 2
    assert report.logit_stats["max_abs_diff"] == 0.0 and report.logit_stats["top1_agreement"] == 1.0
    assert "same caption as FP32 100%" in drift_line(report)


def test_reference_checks_its_sizes(tiny_model):
    model, tokenizer = tiny_model
    with pytest.raises(ValueError, match="n_logits=3 is more than n=2"):
        fp32_reference(model, tokenizer, n=2, n_logits=3)


def test_with_speed_replaces_tokens_per_s_and_keeps_the_rest():
    record = {"step": "fp16", "tokens_per_s": 1.0, "extra": {"exact_match": 0.5}}
    updated = with_speed(record, Speed(seconds=2.0, new_tokens=16, batch=2, repeats=3))
    assert updated["tokens_per_s"] == 16.0 and updated["extra"]["exact_match"] == 0.5
    assert record["tokens_per_s"] == 1.0  # a copy, not the same dict


def test_only_the_courses_full_checkpoint_counts_as_random_weights(tmp_path):
    from xcomp_lab.course.params import check_params

    tiny = check_params(scale="tiny", device="cpu", results_path=tmp_path / "r.jsonl")
    assert not tiny.random_weights
    for scale, path, random_ in (("full", None, True), ("full", "/models/xcomposer2", False), ("tiny", None, False)):
        params = dataclasses.replace(tiny, scale=scale, model_name_or_path=path)
        assert params.random_weights is random_


def test_stored_dtypes_reads_the_safetensors_headers(tiny_checkpoint):
    stored = stored_dtypes(tiny_checkpoint)  # the fixture stores FP32
    assert list(stored) == ["F32"]
    data = sum(p.stat().st_size for p in tiny_checkpoint.glob("*.safetensors"))
    assert 0.99 * data < stored["F32"] < data  # the file is the tensors plus a JSON header
    assert stored_dtypes("internlm/internlm-xcomposer2-vl-7b") == {}  # a hub id: nothing local to read


def test_noise_label():
    report = QualityReport(n=2, exact_match=0.0, token_accuracy=0.0, agreement_with_reference=1.0,
                           logit_stats={"max_abs_diff": 0.5, "mean_abs_diff": 0.1, "top1_agreement": 0.9})
    assert "noise" not in drift_line(report)
    assert drift_line(report, noise=True).endswith("random weights: the caption and top-1 figures are noise")
