"""Predict, then measure: the course's exercises, checked against the figures each notebook has just measured.

Before a measurement a notebook asks for a prediction in a variable left at None (`my_fp16_peak_x = None`);
after it, an answer cell calls `check()` with that variable, the value this run measured and the figures the
worked reasoning needs:

    answer_2_1 = check("2.1", my_fp16_peak_x, measured=fp16_peak / fp32_peak, fp32=fp32_memory, fp16=fp16_memory)

`check()` prints one line comparing the two (`your prediction 0.5 | measured 0.526 | x0.95: within 10%, well
done.`), or, while the prediction is still None, one fixed line, so that executed notebooks stay deterministic.
The worked reasoning, computed from this run's figures, stays hidden until asked: `answer_2_1.solution()`.

Units: sizes in binary units (GiB = 1024**3 bytes, as everywhere in the course), given as a number in the
exercise's unit or as text with its own unit ("9.5 MiB"); ratios ("x") and batch sizes ("images") as numbers.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from numbers import Real
from typing import Any

from xcomp_lab.core.units import GIB, MIB, fmt_bytes
from xcomp_lab.memory import MemoryResult

KIB = 1024
SIZE_UNITS = {"B": 1, "KiB": KIB, "MiB": MIB, "GiB": GIB}
DECIMAL_UNITS = {"kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
RATIO = "x"  # a plain number: a multiple or a fraction of another figure
COUNT = "images"  # a whole number of images
PROMPTS = "prompts"  # a whole number of prompts (a batch of text, or of images with their text)
COUNTS = {COUNT: "image", PROMPTS: "prompt"}  # the units that count things, by the thing counted
UNITS = (*SIZE_UNITS, RATIO, *COUNTS)
WELL_DONE = 0.10  # relative distance from the measured value
CLOSE = 0.25
_ROUNDING = 1e-9  # so that 0.55 against 0.5 counts as within 10%


@dataclass(frozen=True)
class Exercise:
    """One prediction a notebook asks for, and how to explain its answer."""

    key: str  # "<notebook>.<n>", e.g. "2.1" in notebook 02
    variable: str  # the learner's variable in the notebook
    what: str  # the quantity predicted, as the answer line names it
    unit: str  # one of UNITS
    too_low: str  # hint for a prediction far below the measured value
    too_high: str  # hint for a prediction far above it
    reasoning: Callable[..., str] = field(repr=False)  # (measured, **figures) -> the worked solution

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"unit={self.unit!r} for exercise {self.key}; use one of {list(UNITS)}.")

    @property
    def notebook(self) -> str:
        """The two-digit prefix of the notebook that holds the exercise, e.g. "02"."""
        return f"{int(self.key.split('.')[0]):02d}"

    @property
    def skip_line(self) -> str:
        """What the answer cell prints while the prediction is None: fixed text, no measured figure."""
        return f"Exercise {self.key} skipped: set {self.variable} above and rerun this cell."


def _x(a: float, b: float) -> str:
    """`a / b` as a factor, "x-" when `b` is zero."""
    return f"x{a / b:.2f}" if b else "x-"


def _number(name: str, value: Any, what_to_do: str) -> float:
    """A finite, non-negative real number, or an error that says what was given and what to do."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name}={value!r} is a {type(value).__name__}, not a number; {what_to_do}.")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name}={value!r} is not a finite number; {what_to_do}.")
    if number < 0:
        raise ValueError(f"{name}={value!r} is negative; sizes, ratios and batch sizes never are: {what_to_do}.")
    return number


def _size_in_bytes(text: str, name: str) -> float:
    """'9.5 MiB' -> bytes; decimal units and unknown units fail with the units allowed."""
    match = re.fullmatch(r"\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]+)\s*", text)
    if match is None:
        raise ValueError(f"{name}={text!r}; write a size as a number and a unit, e.g. '9.5 MiB' or '14 GiB'.")
    number, unit = float(match.group(1)), match.group(2)
    if number < 0:
        raise ValueError(f"{name}={text!r} is negative; a size never is: write e.g. '9.5 MiB'.")
    if unit in DECIMAL_UNITS:
        binary = unit[0].upper() + "iB"
        converted = number * DECIMAL_UNITS[unit] / SIZE_UNITS[binary] if binary in SIZE_UNITS else None
        suggestion = f" ({text.strip()} = {converted:.3g} {binary})" if converted is not None else ""
        raise ValueError(f"{name}={text!r} uses a decimal unit ({unit} = {DECIMAL_UNITS[unit]:,} bytes); the course "
                         f"counts in binary units: write it in {'/'.join(SIZE_UNITS)}{suggestion}.")
    if unit not in SIZE_UNITS:
        raise ValueError(f"{name}={text!r}: unknown unit {unit!r}; use one of {list(SIZE_UNITS)}.")
    return number * SIZE_UNITS[unit]


def parse_prediction(value: Any, unit: str, name: str = "prediction") -> float | None:
    """The learner's prediction in `unit`; None stays None (not answered yet).

    Sizes take a number in `unit` or text with its own binary unit ("9.5 MiB"); ratios and batch sizes take
    a number. Anything else fails with what was given and what to write instead.
    """
    if unit not in UNITS:
        raise ValueError(f"unit={unit!r}; use one of {list(UNITS)}.")
    if value is None:
        return None
    if isinstance(value, str):
        if unit not in SIZE_UNITS:
            raise TypeError(f"{name}={value!r} is text; this exercise wants a plain number "
                            f"({'e.g. 0.5 for half' if unit == RATIO else f'a whole number of {unit}, e.g. 4'}).")
        return _size_in_bytes(value, name) / SIZE_UNITS[unit]
    hint = {RATIO: "give a plain number such as 0.5 or 1.5"} | {
        counted: f"give a whole number of {counted} such as 4" for counted in COUNTS}
    number = _number(name, value, hint.get(unit, f"give a number of {unit} such as 1.5, or text such as '1.5 {unit}'"))
    if unit in COUNTS and not number.is_integer():
        raise ValueError(f"{name}={value!r}; a batch is a whole number of {unit}, e.g. {math.floor(number)}.")
    return number


@dataclass(frozen=True)
class Answer:
    """A prediction set against this run's value; `solution()` prints the worked reasoning."""

    exercise: Exercise
    prediction: float | None  # in the exercise's unit; None when not answered yet
    measured: float  # in the exercise's unit
    measured_raw: float = field(repr=False)  # as the notebook passed it (bytes for sizes)
    lower_bound: bool = False  # the measurement stopped early (out of memory): the true value is at least this
    source: str = "measured"  # what produced the value: "measured", or "planner" for the estimator's answer
    figures: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def skipped(self) -> bool:
        return self.prediction is None

    @property
    def factor(self) -> float | None:
        """Prediction / measured value; None when skipped or when the measured value is zero."""
        if self.prediction is None or self.measured == 0:
            return None
        return self.prediction / self.measured

    def _format(self, value: float) -> str:
        unit = self.exercise.unit
        if unit in SIZE_UNITS:  # in the unit the exercise asked for, whatever unit the learner wrote
            return f"{value:,.2f} {unit}" if value >= 0.1 else f"{value:.3g} {unit}"
        if unit in COUNTS:
            return f"{value:.0f} {COUNTS[unit]}{'' if value == 1 else 's'}"
        return f"{value:.3g}"

    def verdict(self) -> str:
        """How far the prediction is from the value, with a hint when it is far: the end of the answer line."""
        ex, factor = self.exercise, self.factor
        if self.prediction is None:
            return "skipped"
        if factor is None:  # the measured value is zero
            return "exactly right, well done." if self.prediction == 0 else f"too high. Hint: {ex.too_high}"
        if self.lower_bound and factor >= 1 - WELL_DONE - _ROUNDING:
            return (f"x{factor:.2f}: consistent: the run stopped at the budget before its peak, so the true value "
                    f"is at least the one shown.")
        if abs(factor - 1) <= WELL_DONE + _ROUNDING:
            return f"x{factor:.2f}: within {WELL_DONE:.0%}, well done."
        if abs(factor - 1) <= CLOSE + _ROUNDING:
            return f"x{factor:.2f}: within {CLOSE:.0%}, close; .solution() shows where the gap comes from."
        return f"x{factor:.2f}: too {'low' if factor < 1 else 'high'}. Hint: {ex.too_low if factor < 1 else ex.too_high}"

    def line(self) -> str:
        """The one line the answer cell prints."""
        ex = self.exercise
        if self.prediction is None:
            return ex.skip_line
        at_least = "at least " if self.lower_bound else ""
        return (f"Exercise {ex.key}, {ex.what}: your prediction {self._format(self.prediction)} | {self.source} "
                f"{at_least}{self._format(self.measured)} | {self.verdict()}")

    def solution(self) -> None:
        """Print the worked reasoning, computed from this run's figures."""
        ex = self.exercise
        print(f"Exercise {ex.key}, {ex.what}: worked solution with this run's figures")
        print(ex.reasoning(self.measured_raw, **self.figures))
        if self.prediction is not None:
            print(f"Your prediction: {self._format(self.prediction)}.")

    def __repr__(self) -> str:
        return f"Answer({self.line()!r})"


def check(key: str, prediction: Any, *, measured: float, lower_bound: bool = False, source: str = "measured",
          **figures: Any) -> Answer:
    """Compare the learner's prediction for exercise `key` with this run's `measured` value, print one line.

    `measured` is in bytes for size exercises and a plain number otherwise; `lower_bound=True` says the run
    stopped early (out of memory), so the true value is at least `measured`; `figures` are the run's values the
    worked solution is computed from (each exercise names its own). The returned Answer prints that solution
    with `.solution()`.
    """
    if key not in EXERCISES:
        raise KeyError(f"exercise {key!r} does not exist; the course has {list(EXERCISES)}.")
    ex = EXERCISES[key]
    if not isinstance(lower_bound, bool):
        raise TypeError(f"lower_bound={lower_bound!r}; pass True when the run stopped early, else False.")
    if not isinstance(source, str) or not source:
        raise ValueError(f"source={source!r}; name what produced the value, e.g. 'measured' or 'planner'.")
    raw = _number("measured", measured, "pass the value this run measured")
    try:
        inspect.signature(ex.reasoning).bind(raw, **figures)
    except TypeError:
        needed = [p for p in inspect.signature(ex.reasoning).parameters][1:]
        raise TypeError(f"check({key!r}) needs the figures {needed} of this run; got {sorted(figures)}.") from None
    answer = Answer(ex, parse_prediction(prediction, ex.unit, ex.variable),
                    raw / SIZE_UNITS[ex.unit] if ex.unit in SIZE_UNITS else raw, raw, lower_bound, source, figures)
    print(answer.line())
    return answer


# The worked solutions: each takes the measured value as the notebook passed it, then its own figures.

def _fp32_footprint(measured: float, n_params: int) -> str:
    from xcomp_lab.memory.cards import card_for_gb

    card = card_for_gb(48)
    params = n_params * 4
    return (f"- params x bytes: {n_params:,} parameters x 4 bytes (FP32) = {fmt_bytes(params)}.\n"
            f"- The count misses the buffers: the rotary cos/sin tables every decoder layer keeps, "
            f"{fmt_bytes(measured - params)}.\n"
            f"- Parameters + buffers = {fmt_bytes(measured)}, before the first token. Set it against what PyTorch "
            f"sees on a card, not against the size it is sold with: the course's 48 GB card, "
            f"{card.describe()}, keeps {fmt_bytes(card.usable_bytes - measured)} beside it for the caption.")


def _autocast_extra(measured: float, extra_bytes: int, copies_bytes: int, weights_bytes: int) -> str:
    ratio = extra_bytes / copies_bytes if copies_bytes else 0.0
    near = ("close to the copies, not equal to them: the two calls peak at different moments" if 0.8 <= ratio <= 1.2
            else "not the copies alone: the two calls differ in more than autocast's cache")
    return (f"- Autocast runs each matrix product in FP16: it casts every FP32 linear and convolution weight to an "
            f"FP16 copy, 2 bytes per parameter, and while the weight requires grad (parameters do, even under "
            f"no_grad) keeps each copy until the autocast block ends; inside inference_mode it keeps none (torch 2.10 "
            f"and later).\n"
            f"- Those copies add up to {fmt_bytes(copies_bytes)} = {_x(copies_bytes, weights_bytes)} the FP32 "
            f"parameters ({fmt_bytes(weights_bytes)}): half of their 4 bytes, less the parameters that are not "
            f"linear or convolution weights (embeddings, norms).\n"
            f"- Measured: the quick start peaks {fmt_bytes(extra_bytes)} above inference_mode = x{measured:.2f} the "
            f"weights, {_x(extra_bytes, copies_bytes)} the copies: {near}.")


def _fp16_peak(measured: float, fp32: MemoryResult, fp16: MemoryResult) -> str:
    rest32, rest16 = fp32.peak_bytes - fp32.weights_bytes, fp16.peak_bytes - fp16.weights_bytes
    side = ("above half, because the rest shrank less than the weights" if measured > 0.5 else
            "below half, because the rest shrank more than the weights" if measured < 0.5 else "exactly half")
    return (f"- FP32 caption: weights {fmt_bytes(fp32.weights_bytes)} + KV cache {fmt_bytes(fp32.kv_cache_bytes)} + "
            f"activations {fmt_bytes(fp32.activations_bytes)} -> peak {fmt_bytes(fp32.peak_bytes)}.\n"
            f"- In 16 bits the weights go {_x(fp16.weights_bytes, fp32.weights_bytes)} "
            f"({fmt_bytes(fp16.weights_bytes)}), the KV cache {_x(fp16.kv_cache_bytes, fp32.kv_cache_bytes)} and the "
            f"activations {_x(fp16.activations_bytes, fp32.activations_bytes)} ({fmt_bytes(fp16.activations_bytes)}): "
            f"not all of them are 16-bit, since the output head's logits are upcast to FP32 with .float() whatever "
            f"the weights' dtype.\n"
            f"- The weights were {fp32.weights_bytes / fp32.peak_bytes:.0%} of the FP32 peak and halved; the rest of "
            f"it went {_x(rest16, rest32)} ({fmt_bytes(rest32)} -> {fmt_bytes(rest16)}). So the peak is "
            f"{fmt_bytes(fp16.peak_bytes)} = x{measured:.2f} the FP32 peak: {side}.")


def _grad_scoring(measured: float, enabled: MemoryResult, no_grad: MemoryResult) -> str:
    rise_no_grad = no_grad.peak_bytes - no_grad.start_bytes
    rise_enabled = enabled.peak_bytes - enabled.start_bytes
    more = "at least " if enabled.oom else ""
    return (f"- Under no_grad each layer's activations are freed as the pass moves on: the peak rises "
            f"{fmt_bytes(rise_no_grad)} above the memory at its start ({fmt_bytes(no_grad.peak_bytes)} in all).\n"
            f"- With gradients enabled every operation on a tensor that requires grad (the weights do) saves what its "
            f"backward pass needs, so the activations of every layer stay until the output is dropped: the peak "
            f"rises {more}{fmt_bytes(rise_enabled)} above its start, {more}{_x(rise_enabled, rise_no_grad)} what "
            f"no_grad needed.\n"
            f"- Peak against no_grad's: {more}x{measured:.2f}. The weights are the same in both: the ratio grows "
            f"with the activations' share of the peak (the prompt's length, the batch).")


def _grad_caption(measured: float, graph_bytes: int, no_grad_peak_bytes: int) -> str:
    return (f"- transformers decorates generate() with @torch.no_grad(): the decoder and the output head run "
            f"without autograd whatever the caller does.\n"
            f"- Only what runs before generate() follows the caller's mode: the vision tower, the projector and the "
            f"splice of image tokens. Their graph, {fmt_bytes(graph_bytes)}, hangs on the prompt embeddings, which "
            f"live until generate() returns.\n"
            f"- So the call peaks about that much above no_grad's {fmt_bytes(no_grad_peak_bytes)}: "
            f"{_x(no_grad_peak_bytes + graph_bytes, no_grad_peak_bytes)} by this reasoning, x{measured:.2f} measured "
            f"(a scoring pass, with no generate() to switch gradients off, pays for every layer instead).")


def _batch_peak(measured: float, one: MemoryResult, four: MemoryResult) -> str:
    made_one = one.activations_bytes + one.kv_cache_bytes
    made_four = four.activations_bytes + four.kv_cache_bytes
    return (f"- The weights do not grow with the batch: {fmt_bytes(one.weights_bytes)} at batch 1 and "
            f"{fmt_bytes(four.weights_bytes)} at batch 4.\n"
            f"- What the call makes, activations + KV cache, is per image: {fmt_bytes(made_one)} at batch 1, "
            f"{fmt_bytes(made_four)} at batch 4 ({_x(made_four, made_one)}, about 4).\n"
            f"- So the peak goes from {fmt_bytes(one.peak_bytes)} to {fmt_bytes(four.peak_bytes)}: x{measured:.2f}, "
            f"{'far from' if measured < 3 else 'close to'} x4 because the weights are "
            f"{one.weights_bytes / one.peak_bytes:.0%} of the batch-1 peak.")


def _activation_growth(measured: float, short_tokens: int, long_tokens: int, scores_bytes: int | None = None,
                       logits_bytes: int | None = None) -> str:
    r = long_tokens / short_tokens
    closer = ("closer to the T² growth: the T x T attention scores make most of the activations at the long prompt"
              if measured > r**1.5 else
              "closer to the linear growth: the T x T scores are not stored (sdpa) or smaller than a term that grows "
              "with T")
    lines = [f"- The prompt grows x{r:.2f}, from {short_tokens} to {long_tokens} tokens.",
             f"- What grows with T (hidden states, MLP activations, the logits of every position) grows x{r:.2f}; eager "
             f"attention's scores, batch x heads x T x T, grow with T²: x{r * r:.1f}."]
    if scores_bytes is not None and logits_bytes is not None:
        held = 4 * scores_bytes  # masked scores, FP32 softmax (two FP16-sized), its FP16 cast
        larger = ("eager attention's is the larger: it sets the eager peak" if held > logits_bytes else
                  "the logits are the larger: they set the peak, and the scores stay below it")
        lines.append(f"- At {long_tokens} tokens one layer's scores take {fmt_bytes(scores_bytes)}, and eager attention "
                     f"holds at least four of them at its softmax (masked scores, FP32 softmax, its FP16 cast): "
                     f"{fmt_bytes(held)}, against {fmt_bytes(logits_bytes)} for the logits of every position in FP16 "
                     f"and FP32: {larger}.")
    lines.append(f"- Measured x{measured:.1f}, {measured / r:.1f} times the linear growth: {closer}.")
    return "\n".join(lines)


def _offload_resident(measured: float, reference_bytes: int, offloaded_bytes: int, kept_buffer_bytes: int,
                      layers: int, of_layers: int) -> str:
    predicted = reference_bytes - offloaded_bytes + kept_buffer_bytes
    return (f"- Offloading moves the parameters of {layers} of {of_layers} decoder layers: "
            f"{fmt_bytes(offloaded_bytes)}, {offloaded_bytes / reference_bytes:.0%} of the {fmt_bytes(reference_bytes)} "
            f"of weights. The decoder layers are not the whole model: the embeddings, the output head and the vision "
            f"tower stay.\n"
            f"- The offloaded layers' rotary tables are buffers and stay on the device: {fmt_bytes(kept_buffer_bytes)}.\n"
            f"- Resident: {fmt_bytes(reference_bytes)} - {fmt_bytes(offloaded_bytes)} + {fmt_bytes(kept_buffer_bytes)} "
            f"= {fmt_bytes(predicted)} = {_x(predicted, reference_bytes)} the reference; measured x{measured:.2f}.")


def _int8_weights(measured: float, fp16_bytes: int, predicted_bytes: int, stats_bytes: int) -> str:
    # The prediction keeps every tensor but the converted weights: fp16 - predicted = n - stats for n int8 weights.
    linear_fp16 = 2 * (fp16_bytes - predicted_bytes + stats_bytes)
    rest = fp16_bytes - linear_fp16
    return (f"- bitsandbytes converts every nn.Linear but the output head: 1 byte per weight instead of 2, plus one "
            f"FP32 scale per output row. Their weights hold {fmt_bytes(linear_fp16)} in FP16, "
            f"{linear_fp16 / fp16_bytes:.0%} of FP16's {fmt_bytes(fp16_bytes)}: they become "
            f"{fmt_bytes(linear_fp16 / 2)} + {fmt_bytes(stats_bytes)} of scales.\n"
            f"- Everything else keeps its 16 bits, {fmt_bytes(rest)}: embeddings, the output head, biases, norms, "
            f"the patch convolution, the rotary tables.\n"
            f"- Total {fmt_bytes(rest)} + {fmt_bytes(linear_fp16 / 2)} + {fmt_bytes(stats_bytes)} = "
            f"{fmt_bytes(predicted_bytes)} = {_x(predicted_bytes, fp16_bytes)} FP16's weights; measured "
            f"x{measured:.2f}. A model halves only as far as its linears weigh.")


def _logits(measured: float, batch: int, tokens: int, vocab: int) -> str:
    n = batch * tokens * vocab
    return (f"- The output head scores every prompt position against the whole vocabulary: {batch} x {tokens} x "
            f"{vocab:,} = {n:,} logits.\n"
            f"- It writes them in FP16, 2 bytes each: {fmt_bytes(2 * n)}; the forward then upcasts them with .float(), "
            f"4 bytes each: {fmt_bytes(4 * n)}, while the FP16 logits are still alive.\n"
            f"- Together 6 bytes per logit: {fmt_bytes(6 * n)}; measured {fmt_bytes(measured)} ({_x(measured, 6 * n)}).\n"
            f"- Only the last position picks the next token: computing that one alone would take "
            f"{fmt_bytes(6 * batch * vocab)}.")


def _largest_batch(measured: float, peaks: Mapping[int, int], budget_bytes: int, card: str = "",
                   counted: str = "image") -> str:
    budget = f"the {card}'s {fmt_bytes(budget_bytes)} budget" if card else f"the {fmt_bytes(budget_bytes)} budget"
    largest = int(measured)
    if largest == 0:
        return (f"- Even one {counted} crosses {budget} (the replay stopped at {fmt_bytes(peaks[1])}): no batch "
                f"fits. Lower the precision or quantize first.")
    lines = [f"- One {counted}: predicted peak {fmt_bytes(peaks[1])} of {budget}, which leaves "
             f"{fmt_bytes(budget_bytes - peaks[1])}."]
    if largest >= 2:
        per_item = peaks[2] - peaks[1]
        room = (budget_bytes - peaks[1]) / per_item if per_item else math.inf
        lines.append(f"- A second {counted} adds {fmt_bytes(per_item)}, its own activations and KV cache; the "
                     f"weights stay. {fmt_bytes(budget_bytes - peaks[1])} / {fmt_bytes(per_item)} = {room:.1f} more "
                     f"{counted}s: about {1 + math.floor(room)} in all, if every {counted} costs the same.")
    after = largest + 1
    if after in peaks:
        lines.append(f"- The planner, batch by batch: {largest} fits ({fmt_bytes(peaks[largest])}); {after} does not "
                     f"(its replay crossed the budget at {fmt_bytes(peaks[after])}).")
    else:
        lines.append(f"- The planner stopped its search at batch {largest}, which still fits "
                     f"({fmt_bytes(peaks[largest])}): the largest batch is at least that.")
    return "\n".join(lines)


EXERCISES: dict[str, Exercise] = {ex.key: ex for ex in (
    Exercise("0.1", "my_fp32_footprint_gib", "the full model's FP32 footprint", "GiB",
             "FP32 takes 4 bytes per parameter, and the model keeps buffers beside its parameters.",
             "count 4 bytes per FP32 parameter and divide by 1024**3 for GiB.",
             _fp32_footprint),
    Exercise("1.1", "my_autocast_extra_x", "the quick start's extra peak over inference_mode, in FP32 weights", RATIO,
             "autocast keeps an FP16 copy of every weight it multiplies: 2 bytes for each 4 the FP32 weights take.",
             "the copies are FP16, 2 bytes per parameter against FP32's 4, and only matmul weights are copied.",
             _autocast_extra),
    Exercise("2.1", "my_fp16_peak_x", "FP16 caption peak / FP32 caption peak", RATIO,
             "the weights halve, but not everything in a caption's peak is stored in 16 bits.",
             "the weights are most of the peak, and they halve exactly: 2 bytes per parameter instead of 4.",
             _fp16_peak),
    Exercise("3.1", "my_grad_scoring_x", "scoring pass peak with gradients enabled / under no_grad", RATIO,
             "with gradients enabled the activations of every layer are saved for a backward pass, not freed.",
             "the weights are in both peaks and do not change: only the activations are saved.",
             _grad_scoring),
    Exercise("3.2", "my_grad_caption_x", "caption peak with gradients enabled / under no_grad", RATIO,
             "the vision tower and the projector run before generate(), in the caller's mode: their graph stays.",
             "generate() switches gradients off itself: only what runs before it records a graph.",
             _grad_caption),
    Exercise("4.1", "my_batch4_peak_x", "peak at batch 4 / peak at batch 1", RATIO,
             "every image brings its own activations and KV cache: that part grows four times.",
             "the weights are loaded once, whatever the batch: only activations and KV cache are per image.",
             _batch_peak),
    Exercise("4.2", "my_activation_growth_x", "activations at the longest prompt / at the shortest", RATIO,
             "every activation grows with the prompt; eager's T x T scores add more only where they outweigh the "
             "logits of every position.",
             "only the attention scores grow with T²; everything else grows with T.",
             _activation_growth),
    Exercise("5.1", "my_offload_resident_x", "resident weights after offloading / before", RATIO,
             "only the decoder layers' parameters move: the rest of the model and the layers' buffers stay.",
             "half the decoder layers are a large share of the weights, and they leave the device whole but for "
             "their buffers.",
             _offload_resident),
    Exercise("6.1", "my_int8_weights_x", "INT8 weights / FP16 weights", RATIO,
             "an INT8 weight takes 1 byte against FP16's 2, and every linear layer but the output head is converted.",
             "only nn.Linear layers are converted: embeddings, the output head, norms and buffers keep 16 bits.",
             _int8_weights),
    Exercise("7.1", "my_logits_mib", "memory the output head and its FP32 upcast add", "MiB",
             "the logits exist twice for a moment: the head's FP16 output and its FP32 copy, for every position.",
             "count one score per prompt position and vocabulary entry, at 2 bytes (FP16) plus 4 (the FP32 copy).",
             _logits),
    Exercise("8.1", "my_largest_batch", "largest batch of images that fits the budget in FP16", COUNT,
             "after the weights, each image costs only its activations and KV cache: divide the room left by that.",
             "the weights come once, but each image adds its activations and KV cache to them.",
             _largest_batch),
    Exercise("9.1", "my_largest_prompt_batch", "largest batch of prompts that fits the card, by the planner", PROMPTS,
             "after the weights, each prompt costs only its activations and KV cache: divide the room left by that.",
             "the weights come once, but each prompt adds its activations and KV cache, and reserved memory "
             "grows in whole segments.",
             partial(_largest_batch, counted="prompt")),
)}
