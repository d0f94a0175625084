"""Argument checks at config and API boundaries: check_int, check_number, check_ints (clear ValueErrors)."""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable

__all__ = ["check_int", "check_number", "check_ints"]


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


def check_ints(name: str, values: Any, low: int | None = None) -> tuple[int, ...]:
    """A sequence of ints >= low as a tuple of ints."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a sequence of ints >= {low}, got {values!r}")
    values = tuple(values)
    if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or (low is not None and v < low)
           for v in values):
        raise ValueError(f"{name} must be a sequence of ints >= {low}, got {list(values)!r}")
    return tuple(int(v) for v in values)
