"""The model families by name (minimal form: the autoregressive family; the full registry replaces this file).

    resolve_config("tiny", sample_len=1024)   # a preset name, a to_dict() output or a config object
    build_model(config)                       # the model of that config's family
    preset_names()                            # every family's presets
"""

from __future__ import annotations

import dataclasses
import importlib

__all__ = ["preset_names", "get_preset", "resolve_config", "build_model"]

_FAMILY_MODULES = {"autoregressive": "sashimi.models.autoregressive"}


def _module(family: str = "autoregressive"):
    if family not in _FAMILY_MODULES:
        raise ValueError(f"unknown model family {family!r}; known families: {sorted(_FAMILY_MODULES)}")
    return importlib.import_module(_FAMILY_MODULES[family])


def preset_names(family: str | None = None) -> list[str]:
    families = [family] if family is not None else list(_FAMILY_MODULES)
    return sorted(p for f in families for p in _module(f).PRESETS)


def get_preset(name: str):
    for family in _FAMILY_MODULES:
        presets = _module(family).PRESETS
        if name in presets:
            return dataclasses.replace(presets[name])
    raise ValueError(f"unknown preset {name!r}; expected one of {preset_names()}")


def resolve_config(config, **overrides):
    """A config object from a preset name, a to_dict() output or a config object, with field overrides."""
    if isinstance(config, str):
        config = get_preset(config)
    elif isinstance(config, dict):
        config = _module(config.get("family", "autoregressive")).ModelConfig.from_dict(
            {k: v for k, v in config.items() if k != "family"})
    elif not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"expected a preset name, a config dict or a config object, got {type(config).__name__}")
    return dataclasses.replace(config, **overrides)


def build_model(config="tiny", **overrides):
    config = resolve_config(config, **overrides)
    return _module(getattr(config, "family", "autoregressive")).WaveformAR(config)
