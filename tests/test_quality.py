import math

import numpy as np
import pytest
import torch

from xcomp_lab.data.quality import (
    QualityReport,
    agreement,
    exact_match,
    logit_stats,
    normalise,
    quality_report,
    token_accuracy,
)

# Two positions over a vocabulary of 2, chosen so every statistic can be worked out by hand.
CANDIDATE = [[0.0, 0.0], [1.0, 2.0]]
REFERENCE = [[math.log(3.0), 0.0], [2.0, 1.0]]
# Row 1: reference softmax (3/4, 1/4) vs uniform. Row 2: (p, 1-p) vs (1-p, p), p = e/(e+1).
KL_ROW_1 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
KL_ROW_2 = (math.e - 1) / (math.e + 1)


def test_normalise_ignores_case_spacing_and_trailing_punctuation():
    assert normalise("  A Small   red circle. ") == "a small red circle"
    assert normalise("a red circle!?") == "a red circle"
    assert normalise("") == ""


def test_exact_match_on_hand_made_captions():
    references = ["a small red circle", "a large blue square left of a small green triangle"]
    same_after_normalising = ["A small red circle.", "a large blue square  left of a small green triangle"]
    one_word_differs = ["a small red circle", "a large blue square left of a small red triangle"]
    assert exact_match(same_after_normalising, references) == 1
    assert exact_match(one_word_differs, references) == 0.5
    assert exact_match(["a small red", "a large blue square"], references) == 0


def test_token_accuracy_on_hand_made_captions():
    assert token_accuracy(["a small blue circle"], ["a small red circle"]) == 0.75
    # Missing words count as errors: 4 of the longer caption's 10 words match.
    assert token_accuracy(["a small red circle"], ["a small red circle left of a large blue square"]) == 4 / 10
    # Position by position: dropping one word shifts everything after it.
    assert token_accuracy(["a red circle"], ["a small red circle"]) == 0.25
    assert token_accuracy(["", "a small red circle."], ["", "A small red circle"]) == 1.0
    averaged = token_accuracy(["a small blue circle", "a red square"], ["a small red circle", "a red square"])
    assert averaged == pytest.approx((0.75 + 1.0) / 2)


def test_one_wrong_word_is_not_a_perfect_score():
    assert exact_match(["a large red circle"], ["a small red circle"]) == 0
    assert token_accuracy(["a large red circle"], ["a small red circle"]) < 1


def test_agreement_between_two_models():
    assert agreement(["a red circle", "a blue square"], ["A red circle.", "a green square"]) == 0.5


@pytest.mark.parametrize("metric", [exact_match, token_accuracy, agreement])
def test_metrics_refuse_bad_inputs(metric):
    with pytest.raises(ValueError, match="same length, got 2 and 1"):
        metric(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty"):
        metric([], [])
    with pytest.raises(TypeError, match="single string"):
        metric("a red circle", "a red circle")


def test_logit_stats_match_hand_computed_values():
    stats = logit_stats(torch.tensor(CANDIDATE), torch.tensor(REFERENCE))
    assert stats["max_abs_diff"] == pytest.approx(math.log(3.0))
    assert stats["mean_abs_diff"] == pytest.approx((math.log(3.0) + 0 + 1 + 1) / 4)
    assert stats["top1_agreement"] == 0.5
    assert stats["kl_mean"] == pytest.approx((KL_ROW_1 + KL_ROW_2) / 2, rel=1e-5)
    assert stats["n_nonfinite"] == 0


def test_logit_stats_of_identical_logits():
    logits = torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(0))
    stats = logit_stats(logits, logits.clone())
    assert stats["max_abs_diff"] == 0 and stats["mean_abs_diff"] == 0
    assert stats["top1_agreement"] == 1
    assert stats["kl_mean"] == pytest.approx(0, abs=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_logit_stats_accept_any_float_dtype(dtype):
    candidate, reference = torch.tensor(CANDIDATE, dtype=dtype), torch.tensor(REFERENCE, dtype=torch.float32)
    stats = logit_stats(candidate, reference)
    expected = logit_stats(candidate.float(), reference)
    assert stats == pytest.approx(expected)
    assert stats["top1_agreement"] == 0.5
    assert all(isinstance(value, (float, int)) for value in stats.values())


def test_logit_stats_accept_numpy_and_mixed_dtypes():
    stats = logit_stats(np.array(CANDIDATE, dtype=np.float16), torch.tensor(REFERENCE, dtype=torch.bfloat16))
    assert stats["top1_agreement"] == 0.5


def test_logit_stats_ignore_entries_the_reference_masks_out():
    reference = torch.tensor([[0.0, 0.0, float("-inf")]])
    stats = logit_stats(torch.tensor([[0.0, 0.0, 5.0]]), reference)
    assert math.isfinite(stats["kl_mean"]) and stats["kl_mean"] > 0


def test_logit_stats_count_fp16_overflow():
    overflowed = torch.tensor([[70000.0, 0.0]]).half()
    assert logit_stats(overflowed, torch.zeros(1, 2))["n_nonfinite"] == 1


def test_logit_stats_refuse_bad_inputs():
    with pytest.raises(ValueError, match=r"same shape .*\(2, 5\) and \(2, 4\)"):
        logit_stats(torch.zeros(2, 5), torch.zeros(2, 4))
    with pytest.raises(TypeError, match="floating-point"):
        logit_stats(torch.zeros(2, 5, dtype=torch.int64), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="at least one position"):
        logit_stats(torch.zeros(0, 5), torch.zeros(0, 5))


def test_report_prints_one_line():
    report = QualityReport(exact_match=0.975, token_accuracy=0.991, n=200)
    assert str(report) == "exact match 97.5% | token accuracy 99.1% | n=200"
    assert report.as_dict() == {"exact_match": 0.975, "token_accuracy": 0.991, "n": 200}


def test_quality_report_with_reference_model():
    report = quality_report(
        ["a small red circle", "a large blue square"],
        ["a small red circle", "a large blue circle"],
        reference_predictions=["a small red circle", "a large blue circle"],
        logits=torch.tensor(CANDIDATE, dtype=torch.float16),
        reference_logits=torch.tensor(REFERENCE),
    )
    assert report.exact_match == 0.5 and report.token_accuracy == pytest.approx(0.875) and report.n == 2
    assert report.agreement_with_reference == 0.5
    row = report.as_dict()
    assert row["agreement_with_reference"] == 0.5 and row["top1_agreement"] == 0.5
    text = str(report)
    assert "\n" not in text
    assert text.startswith("exact match 50.0% | token accuracy 87.5% | n=2 | agreement 50.0% | top-1 50.0% | KL ")


def test_quality_report_needs_both_logits_or_neither():
    with pytest.raises(ValueError, match="both logits and reference_logits"):
        quality_report(["a"], ["a"], logits=torch.zeros(1, 2))
