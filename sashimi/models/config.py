"""Shared pieces of every family's config: the dict round trip, the family key and the S4 layer settings.

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
`replace(**changes)` is a validated copy. A family whose network has S4 layers also subclasses
`S4Settings`: its fields (mode ... backend) become keyword-only fields of the config itself, so a
saved config stays one flat dict; `check_s4()` (from __post_init__) validates them and
`s4_kwargs()` is what every S4 layer of the network takes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..checks import check_choice, check_int, check_number

__all__ = ["ConfigMixin", "S4Settings", "S4_MODES", "jsonable"]

S4_MODES = ("dplr", "diag")


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


@dataclass(kw_only=True)
class S4Settings:
    """The settings every S4 layer of a network gets (keyword-only fields of the config that subclasses this).

    mode 'dplr' (S4, with the Hurwitz parameterisation when hurwitz=True) or 'diag' (S4D); init
    None means the mode's default ('legs' / 'diag-lin'); n_ssm None gives every channel its own
    (A, B); ssm_lr is the learning rate marked on A, B and dt (None: none marked; a dict: per
    parameter, see s4lib.optim). backend picks the kernel-op backend (None: the S4LIB_BACKEND
    variable, else 'auto'); it does not change the model.
    """

    mode: str = "dplr"
    hurwitz: bool = True
    d_state: int = 64
    n_ssm: int | None = None
    init: str | None = None
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    ssm_lr: float | dict | None = 1e-3
    backend: str | None = None

    def check_s4(self) -> None:
        """Raise a ValueError naming the first S4 setting that is out of range (call from __post_init__)."""
        check_choice("mode", self.mode, S4_MODES)
        if not isinstance(self.hurwitz, bool):
            raise ValueError(f"hurwitz must be True or False, got {self.hurwitz!r}")
        check_int("d_state", self.d_state, 2)
        if self.d_state % 2:
            raise ValueError(f"d_state must be even (states come in conjugate pairs), got {self.d_state}")
        check_int("n_ssm", self.n_ssm, 1, allow_none=True)
        for name in ("init", "backend"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a name (a string) or None, got {value!r}")
        check_number("dt_min", self.dt_min, 0, low_open=True)
        check_number("dt_max", self.dt_max, self.dt_min)
        if not isinstance(self.ssm_lr, dict):  # a dict gives per-parameter rates (see s4lib.optim)
            check_number("ssm_lr", self.ssm_lr, 0, allow_none=True)

    def s4_kwargs(self) -> dict:
        """The keyword arguments of every S4 layer (S4Block / FFTConv / SSM kernel) of the network."""
        kwargs = {"mode": self.mode, "d_state": self.d_state, "n_ssm": self.n_ssm, "dt_min": self.dt_min,
                  "dt_max": self.dt_max, "lr": self.ssm_lr, "backend": self.backend}
        if self.mode == "dplr":
            kwargs["hurwitz"] = self.hurwitz
        if self.init is not None:
            kwargs["init"] = self.init
        return kwargs
