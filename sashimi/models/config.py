"""Shared pieces of every family's config: value checks at config boundaries and the dict round trip.

A family's config is a dataclass with a `family: str` field that mixes in `ConfigMixin`:

    @dataclass
    class MyConfig(ConfigMixin):
        family: str = "my_family"
        width: int = 64
        dropout: float = 0.0

        def __post_init__(self):
            self.check_family("my_family")
            check_int("width", self.width, low=1)
            check_number("dropout", self.dropout, low=0, high=1, high_open=True)

`to_dict()` gives a JSON-able dict (tuples become lists), `from_dict(d)` rejects unknown keys and
fills a missing `family` with the class default (configs written before the field existed),
`replace(**changes)` is a validated copy.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Iterable

__all__ = ["ConfigMixin", "check_int", "check_number", "check_choice", "check_int_tuple", "jsonable"]


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """`value` must be an int (not a bool) in [low, high] (either bound may be None); returns it."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok and low is not None and value < low:
        ok = False
    if ok and high is not None and value > high:
        ok = False
    if not ok:
        if low is not None and high is not None:
            expected = f"an int in [{low}, {high}]"
        elif low is not None:
            expected = f"an int >= {low}"
        elif high is not None:
            expected = f"an int <= {high}"
        else:
            expected = "an int"
        raise ValueError(f"{name} must be {expected}, got {value!r}")
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
        if allow_none:
            expected += " (or None)"
        raise ValueError(f"{name} must be {expected}, got {value!r}")
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


def jsonable(value: Any) -> Any:
    """Tuples (also nested, also inside dicts) as lists: what json.dumps writes and json.loads returns."""
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return value


class ConfigMixin:
    """to_dict / from_dict / replace / check_family for a dataclass config with a `family` field."""

    def check_family(self, *allowed: str) -> None:
        """Raise unless self.family is one of `allowed` (call from __post_init__)."""
        if self.family not in allowed:
            expected = repr(allowed[0]) if len(allowed) == 1 else f"one of {allowed}"
            raise ValueError(f"{type(self).__name__}.family must be {expected}, got {self.family!r}")

    def replace(self, **changes):
        """A copy with some fields changed (validated again by __post_init__)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The fields as a JSON-able dict (tuples as lists), `family` included."""
        return jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict):
        """The config a to_dict() output describes; unknown keys raise, a missing `family` takes the default."""
        if not isinstance(d, dict):
            raise TypeError(f"a model configuration must be a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model configuration keys {unknown} for {cls.__name__} (written by another "
                             f"version?); expected a subset of {sorted(known)}")
        return cls(**d)
