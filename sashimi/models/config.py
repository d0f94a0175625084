"""Shared pieces of every family's config: the dict round trip and the family key (checks: sashimi.checks).

A family's config is a dataclass with a `family: str` field that mixes in `ConfigMixin`:

    from sashimi.checks import check_int, check_number

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
from typing import Any

__all__ = ["ConfigMixin", "jsonable"]


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
