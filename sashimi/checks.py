"""Argument checks at config and API boundaries: check_int, check_number, check_choice, check_int_tuple."""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable

__all__ = ["check_int", "check_number", "check_choice", "check_int_tuple"]


def _expected_int(low, high) -> str:
    if low is not None and high is not None:
        return f"an int in [{low}, {high}]"
    if low is not None:
        return f"an int >= {low}"
    if high is not None:
        return f"an int <= {high}"
    return "an int"


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None, *,
              allow_none: bool = False) -> int | None:
    """`value` must be an int (numpy ints too; not a bool) in [low, high] (a bound may be None); returns int(value).

    allow_none accepts None (an optional setting) and returns it.
    """
    if value is None and allow_none:
        return None
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok and ((low is not None and value < low) or (high is not None and value > high)):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be {_expected_int(low, high)}{' (or None)' if allow_none else ''}, "
                         f"got {value!r}")
    return int(value)


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False, allow_none: bool = False):
    """`value` must be a finite real number (not a bool) within the bounds; returns it unchanged.

    low_open / high_open exclude the bound itself; allow_none accepts None (an optional setting).
    """
    if value is None and allow_none:
        return value
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None and (value <= low if low_open else value < low):
        ok = False
    if ok and high is not None and (value >= high if high_open else value > high):
        ok = False
    if not ok:
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if low_open else '>='} {low}")
        if high is not None:
            bounds.append(f"{'<' if high_open else '<='} {high}")
        expected = "a finite number" + (f" {' and '.join(bounds)}" if bounds else "")
        raise ValueError(f"{name} must be {expected}{' (or None)' if allow_none else ''}, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Iterable) -> Any:
    """`value` must be one of `choices`; returns it."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_int_tuple(name: str, value: Any, low: int = 1, length: int | None = None) -> tuple:
    """A sequence of ints >= low (of `length` entries when given) as a tuple."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"{name} must be a list of ints >= {low}, got {value!r}")
    value = tuple(value)
    if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low for v in value):
        raise ValueError(f"{name} must be a list of ints >= {low}, got {list(value)!r}")
    if length is not None and len(value) != length:
        raise ValueError(f"{name} needs {length} entries, got {list(value)!r}")
    return tuple(int(v) for v in value)
