"""How good are captions and logits: against the true captions, and against a reference model (FP32 vs NF4)."""

import math
import string
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

_TRAILING_PUNCTUATION = string.punctuation + " "


def normalise(text: str) -> str:
    """Lowercase, collapse whitespace and drop trailing punctuation, so "A red circle. " == "a red circle"."""
    return " ".join(text.lower().split()).rstrip(_TRAILING_PUNCTUATION)


def _check_pairs(predictions: Sequence[str], references: Sequence[str], names: tuple[str, str]) -> None:
    for name, texts in zip(names, (predictions, references)):
        if isinstance(texts, str):
            raise TypeError(
                f"{name} must be a list of captions, got a single string {texts!r}; wrap it in a list."
            )
    if len(predictions) != len(references):
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same length, got {len(predictions)} and {len(references)}; "
            "pass one caption of each per image."
        )
    if len(predictions) == 0:
        raise ValueError(f"{names[0]} and {names[1]} are empty; pass at least one caption of each.")


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of pairs that are equal after normalise()."""
    _check_pairs(predictions, references, ("predictions", "references"))
    return sum(normalise(p) == normalise(r) for p, r in zip(predictions, references)) / len(predictions)


def _pair_token_accuracy(prediction: str, reference: str) -> float:
    predicted, true = normalise(prediction).split(), normalise(reference).split()
    longer = max(len(predicted), len(true))
    if longer == 0:
        return 1.0
    # Dividing by the longer caption means extra or missing words count as errors.
    return sum(p == t for p, t in zip(predicted, true)) / longer


def token_accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Word-level accuracy, position by position, over the longer caption of each pair; averaged over pairs."""
    _check_pairs(predictions, references, ("predictions", "references"))
    return sum(_pair_token_accuracy(p, r) for p, r in zip(predictions, references)) / len(predictions)


def agreement(a_captions: Sequence[str], b_captions: Sequence[str]) -> float:
    """Fraction of images on which two models give the same caption (after normalise())."""
    _check_pairs(a_captions, b_captions, ("a_captions", "b_captions"))
    return sum(normalise(a) == normalise(b) for a, b in zip(a_captions, b_captions)) / len(a_captions)


def _as_float32(name: str, values: torch.Tensor | np.ndarray) -> torch.Tensor:
    tensor = torch.as_tensor(values)
    if not tensor.is_floating_point():
        raise TypeError(
            f"{name} must hold floating-point logits, got dtype {tensor.dtype}; pass the model's logits."
        )
    return tensor.float()


def logit_stats(
    logits: torch.Tensor | np.ndarray, reference_logits: torch.Tensor | np.ndarray
) -> dict[str, float]:
    """Compare logits of shape (..., vocab) with a reference's, all in float32 whatever the input dtype.

    Returns max_abs_diff and mean_abs_diff of the raw logits, top1_agreement (fraction of positions
    whose argmax agree), kl_mean (KL(reference || logits) of the softmaxes, nats, averaged over
    positions) and n_nonfinite (inf/nan entries in either input, e.g. from FP16 overflow; when it is
    not 0 the other numbers are not to be trusted).
    """
    candidate = _as_float32("logits", logits)
    reference = _as_float32("reference_logits", reference_logits)
    if candidate.shape != reference.shape:
        raise ValueError(
            f"logits and reference_logits must have the same shape (..., vocab), got {tuple(candidate.shape)} "
            f"and {tuple(reference.shape)}; compare outputs for the same inputs."
        )
    if candidate.ndim == 0 or candidate.shape[-1] == 0 or candidate.numel() == 0:
        raise ValueError(
            f"logits need shape (..., vocab) with at least one position and one vocabulary entry, "
            f"got {tuple(candidate.shape)}."
        )
    reference = reference.to(candidate.device)
    difference = (candidate - reference).abs()
    log_q = torch.log_softmax(candidate, dim=-1)
    log_p = torch.log_softmax(reference, dim=-1)
    p = log_p.exp()
    # Entries the reference gives probability 0 (e.g. masked to -inf) contribute 0, not nan.
    kl = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=-1)
    nonfinite = (~torch.isfinite(candidate)).sum() + (~torch.isfinite(reference)).sum()
    return {
        "max_abs_diff": difference.max().item(),
        "mean_abs_diff": difference.mean().item(),
        "top1_agreement": (candidate.argmax(dim=-1) == reference.argmax(dim=-1)).float().mean().item(),
        "kl_mean": kl.mean().item(),
        "n_nonfinite": int(nonfinite.item()),
    }


@dataclass
class QualityReport:
    """Caption quality of one model on n images, optionally compared with a reference model."""

    exact_match: float
    token_accuracy: float
    n: int
    agreement_with_reference: float | None = None
    logit_stats: dict[str, float] | None = None

    def as_dict(self) -> dict[str, float | int]:
        """Flat dict (logit stats inlined), leaving out comparisons that were not made."""
        row: dict[str, float | int] = {
            "exact_match": self.exact_match,
            "token_accuracy": self.token_accuracy,
            "n": self.n,
        }
        if self.agreement_with_reference is not None:
            row["agreement_with_reference"] = self.agreement_with_reference
        if self.logit_stats is not None:
            row.update(self.logit_stats)
        return row

    def __str__(self) -> str:
        parts = [
            f"exact match {100 * self.exact_match:.1f}%",
            f"token accuracy {100 * self.token_accuracy:.1f}%",
            f"n={self.n}",
        ]
        if self.agreement_with_reference is not None:
            parts.append(f"agreement {100 * self.agreement_with_reference:.1f}%")
        if self.logit_stats is not None:
            kl = self.logit_stats["kl_mean"]
            kl_text = f"{kl:.2e}" if math.isfinite(kl) else str(kl)
            parts.append(f"top-1 {100 * self.logit_stats['top1_agreement']:.1f}% | KL {kl_text}")
        return " | ".join(parts)


def quality_report(
    predictions: Sequence[str],
    references: Sequence[str],
    reference_predictions: Sequence[str] | None = None,
    logits: torch.Tensor | np.ndarray | None = None,
    reference_logits: torch.Tensor | np.ndarray | None = None,
) -> QualityReport:
    """All metrics in one report: vs the true captions, and vs a reference model's captions/logits if given."""
    if (logits is None) != (reference_logits is None):
        raise ValueError("pass both logits and reference_logits, or neither.")
    return QualityReport(
        exact_match=exact_match(predictions, references),
        token_accuracy=token_accuracy(predictions, references),
        n=len(predictions),
        agreement_with_reference=(
            None if reference_predictions is None else agreement(predictions, reference_predictions)
        ),
        logit_stats=None if logits is None else logit_stats(logits, reference_logits),
    )
