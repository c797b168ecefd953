"""Argument checks shared by every public function: one wording for what was given, what is allowed and why.

    check_int("batch_size", 0, hint="images captioned together")
    -> ValueError: batch_size=0; it must be an integer from 1 up (images captioned together).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from numbers import Real
from typing import Any, TypeVar

T = TypeVar("T")


def _range(minimum: float | None, maximum: float | None, above: bool) -> str:
    low = None if minimum is None else (f"above {minimum:g}" if above else f"from {minimum:g}")
    if maximum is None:
        return f"{low} up" if low and not above else (low or "any value")
    return f"{low} to {maximum:g}" if low else f"up to {maximum:g}"


def check_int(name: str, value: Any, *, minimum: int | None = 1, maximum: int | None = None, hint: str = "") -> int:
    """`value` if it is an int (not a bool) from `minimum` to `maximum` (either None: unbounded), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum) \
            or (maximum is not None and value > maximum):
        why = f" ({hint})" if hint else ""
        kind = "a positive integer" if minimum == 1 and maximum is None else \
            f"an integer {_range(minimum, maximum, above=False)}"
        raise ValueError(f"{name}={value!r}; it must be {kind}{why}.")
    return value


def check_number(name: str, value: Any, *, above: float | None = 0, maximum: float | None = None,
                 hint: str = "") -> float:
    """`value` as a float if it is a real number (not a bool) above `above` and at most `maximum`, else ValueError."""
    if isinstance(value, bool) or not isinstance(value, Real) or value != value \
            or (above is not None and not value > above) or (maximum is not None and value > maximum):
        why = f" ({hint})" if hint else ""
        kind = "a positive number" if above == 0 and maximum is None else \
            f"a number {_range(above, maximum, above=True)}"
        raise ValueError(f"{name}={value!r}; it must be {kind}{why}.")
    return float(value)


def check_choice(name: str, value: T, allowed: Collection[T], hint: str = "") -> T:
    """`value` if it is one of `allowed`, else ValueError listing them."""
    try:
        known = value in allowed
    except TypeError:  # an unhashable value asked of a set
        known = False
    if not known:
        why = f" ({hint})" if hint else ""
        raise ValueError(f"{name}={value!r}; choose one of {list(allowed)}{why}.")
    return value


@dataclass(frozen=True)
class Limit:
    """The largest value an integer setting may take, and why: the error for a larger one says both."""

    maximum: int
    why: str

    def check(self, name: str, value: Any, *, minimum: int = 1, hint: str = "") -> int:
        """`value` if it is an int from `minimum` (see `check_int`) to this limit, else ValueError."""
        check_int(name, value, minimum=minimum, hint=hint)
        if value > self.maximum:
            raise ValueError(f"{name}={value!r}; it must be at most {self.maximum} ({self.why}).")
        return value


# The size of one captioning call: checked in a notebook's first cell (course.params.check_params) and before a
# prediction (estimate.call.check_call), so that a value typed one or two digits too long fails at once instead of
# running for minutes (or hanging) after the model has loaded. Each limit keeps every size the course uses; the
# seconds quoted were measured at tiny scale on a 2-core CPU, one thread.
BATCH_SIZE = Limit(256, "exercise 8.1's largest-batch search tries up to 256 with the planner; one tiny-scale "
                        "call on 256 images already takes about 40 s on a CPU")
IMAGE_SIZE = Limit(980, "twice the full model's 490 px and the planner's largest: 4900 image tokens an image, 4x "
                        "the default; the vision tower's attention grows with the side to the fourth power, and "
                        "one tiny-scale call at 980 px takes about 20 s on a CPU")
NEW_TOKENS = Limit(1024, "chat()'s own default answer length; a caption needs tens, the planner offers up to 512, "
                         "and timing 1024 tokens three times takes about a minute at tiny scale on a CPU")
