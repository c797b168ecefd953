"""Notebook 05's helpers: what a model split over two GPUs measured against its per-card prediction."""

from __future__ import annotations

from pathlib import Path

from xcomp_lab.core.jsonl import read_jsonl
from xcomp_lab.core.units import fmt_bytes


def split_report(path: str | Path) -> str:
    """One line per run of a `split.jsonl` written by `python -m xcomp_lab.tools.gpu_split_run`: each card's
    measured peak against its prediction, and tokens/s against the same dtype on one card."""
    path = Path(path)
    records = read_jsonl(path, what="two-GPU runs", hint=f"run `python -m xcomp_lab.tools.gpu_split_run --out "
                         f"{path.parent}` on a machine with two GPUs first")
    one_card = {r["dtype"]: r for r in records if r["kind"] == "one-card"}
    lines = []
    for r in (r for r in records if r["kind"] == "split"):
        cards = " | ".join(
            f"card {card}: {'OOM' if r['oom'] and r['oom_card_measured'] == int(card) else fmt_bytes(c['peak_bytes'])}"
            f" measured, {fmt_bytes(c['predicted_peak_bytes'])} predicted (x{c['measured_over_predicted']:.3f})"
            for card, c in r["cards"].items())
        speed = f"{r['tokens_per_s']:.1f} tok/s" if r["tokens_per_s"] else "no speed"
        alone = one_card.get(r["dtype"])
        if alone and alone["tokens_per_s"] and r["tokens_per_s"]:
            speed += f" (one card: {alone['tokens_per_s']:.1f}, x{r['tokens_per_s'] / alone['tokens_per_s']:.2f})"
        lines.append(f"{r['case']}: {cards} | {speed}")
    return "\n".join(lines)
