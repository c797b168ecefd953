"""What a prediction returns: `Estimate`, its breakdown table, verdict and comparison with a measurement."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from xcomp_lab.core.checks import check_int
from xcomp_lab.core.units import fmt_bytes
from xcomp_lab.memory import Budget, MemoryResult

AUTOCAST_COPIES = "autocast weight copies"


@dataclass(frozen=True)
class Estimate:
    """A predicted captioning call. Bytes are of the device predicted for (CUDA: as the allocator counts them).

    `activations_bytes` = peak - weights - KV cache, as `MemoryResult` defines it; it includes
    `autocast_copies_bytes`, the FP16 copies of weights autocast holds at the peak.
    """

    label: str
    device: str
    settings: dict[str, Any]
    weights_bytes: int  # parameters + buffers (rotary cos/sin tables) + bitsandbytes quantization statistics
    kv_cache_bytes: int  # analytic: 2 x layers x kv_heads x head_dim x batch x (prompt + new - 1) x bytes
    activations_bytes: int
    peak_bytes: int
    prompt_tokens: int
    new_tokens: int
    quant_state_bytes: int  # part of weights_bytes: absmax/SCB tensors, not parameters (CPU accounting misses them)
    autocast_copies_bytes: int
    peak_phase: str  # "prefill, decoder layer 4/4": the phase ("vision", "prefill", "decode step n") and the part
    simulated_kv_cache_bytes: int  # what the simulation's DynamicCache holds at the end: equals kv_cache_bytes
    phase_peaks: dict[str, int]  # the highest memory in each phase: "vision", "prefill", "decode"
    budget_bytes: int | None = None
    oom: bool | None = None  # None when no budget was given
    oom_op: str | None = None  # "aten.add.Tensor -> (1, 32, 1387, 1387) float32", as run_guarded reports it
    oom_location: str | None = None  # the model line: "file.py:185 in eager_attention: attn_weights = ..."
    oom_phase: str | None = None
    oom_in_use_bytes: int | None = None  # memory in use when the op that crosses the budget allocates
    seconds: float = 0.0  # how long the prediction took
    notes: tuple[str, ...] = field(default=(), repr=False)

    def breakdown(self) -> list[tuple[str, int, float]]:
        """(part, bytes, share of the peak) rows that add up to the peak: weights, KV cache, activations."""
        rows = [("weights", self.weights_bytes), ("KV cache", self.kv_cache_bytes)]
        # Activations are what the peak holds beyond the weights and the final cache; at a prefill peak the
        # cache is shorter than that, so the copies can exceed the residual: they are capped by it.
        copies = min(self.autocast_copies_bytes, self.activations_bytes)
        if copies:
            rows.append((AUTOCAST_COPIES, copies))
        rows.append(("activations and temporaries", self.activations_bytes - copies))
        return [(name, nbytes, nbytes / self.peak_bytes) for name, nbytes in rows]

    def table(self) -> str:
        """The breakdown as a name / size / % table with the peak and the budget verdict; print() it."""
        name = f"[{self.label}] " if self.label else ""
        lines = [f"{name}predicted for {self.device}: {self.prompt_tokens} prompt tokens + {self.new_tokens} new, "
                 f"peak in {self.peak_phase}",
                 f"{'part':<30}{'size':>12}{'share':>9}"]
        for part, nbytes, share in self.breakdown():
            lines.append(f"{part:<30}{fmt_bytes(nbytes):>12}{share:>8.1%}")
        lines.append(f"{'peak':<30}{fmt_bytes(self.peak_bytes):>12}{1:>8.1%}")
        if self.budget_bytes is not None:
            lines.append(self.verdict())
        return "\n".join(lines)

    def verdict(self) -> str:
        """One line: does the call fit the budget, and if not, where it would run out."""
        if self.budget_bytes is None:
            return "no budget given"
        budget = f"budget {fmt_bytes(self.budget_bytes)}"
        if not self.oom:
            return f"fits: {budget}, {fmt_bytes(self.budget_bytes - self.peak_bytes)} to spare"
        return (f"OOM: {budget}, crossed in {self.oom_phase} at {self.oom_op} with "
                f"{fmt_bytes(self.oom_in_use_bytes)} in use, {self.oom_location or 'no model frame'}")

    def compare(self, measured: MemoryResult) -> str:
        """`predicted 14.20 GiB | measured 14.61 GiB | x1.03` (measured / predicted), plus any OOM disagreement."""
        if not isinstance(measured, MemoryResult):
            raise TypeError(f"compare() needs a MemoryResult (run.memory, m.result), got {type(measured).__name__}")
        measured_device = "cpu" if measured.device == "cpu" else "cuda"
        if measured_device != self.device:
            raise ValueError(f"this estimate is for {self.device} but the measurement ran on {measured.device}: "
                             f"estimate with device={measured_device!r} to compare")
        line = (f"predicted {fmt_bytes(self.peak_bytes)} | measured {fmt_bytes(measured.peak_bytes)} | "
                f"x{measured.peak_bytes / self.peak_bytes:.2f}")
        if self.device == "cpu" and self.quant_state_bytes:
            line += f" | CPU accounting misses the {fmt_bytes(self.quant_state_bytes)} of bitsandbytes statistics"
        if self.oom is not None and bool(self.oom) != measured.oom:
            line += f" | OOM predicted: {'yes' if self.oom else 'no'}, measured: {'yes' if measured.oom else 'no'}"
        elif measured.oom:
            line += " | OOM predicted and measured (measured peak is where it stopped)"
        return line

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict."""
        return {name: (list(value) if name == "notes" else value)
                for name, value in ((n, getattr(self, n)) for n in self.__dataclass_fields__)}

    def __str__(self) -> str:
        name = f"[{self.label}] " if self.label else ""
        budget = f" | {self.verdict()}" if self.budget_bytes is not None else ""
        return (f"{name}predicted peak {fmt_bytes(self.peak_bytes)} on {self.device} = weights "
                f"{fmt_bytes(self.weights_bytes)} + KV cache {fmt_bytes(self.kv_cache_bytes)} + activations "
                f"{fmt_bytes(self.activations_bytes)}{budget}")


def fits(estimate: Estimate, budget_bytes: int | Budget) -> bool:
    """True when the predicted peak is within `budget_bytes` (or a Budget's limit)."""
    if not isinstance(estimate, Estimate):
        raise TypeError(f"fits() needs an Estimate, got {type(estimate).__name__}: call estimate_caption(...) first")
    limit = budget_bytes.limit_bytes if isinstance(budget_bytes, Budget) else budget_bytes
    check_int("budget_bytes", limit, hint="bytes or a Budget, e.g. xcomp_lab.core.units.gb_to_bytes(48)")
    return estimate.peak_bytes <= limit
