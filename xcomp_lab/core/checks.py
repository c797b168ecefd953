"""Argument checks shared by every public function: one wording for what was given, what is allowed and why.

    check_int("batch_size", 0, hint="images captioned together")
    -> ValueError: batch_size=0; it must be an integer from 1 up (images captioned together).
"""

from __future__ import annotations

from collections.abc import Collection
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
