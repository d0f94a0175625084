"""The model families by name: which config class, model class and presets each `family` key means.

A family module registers itself when imported (at its end):

    register_family("waveflow", WaveFlowConfig, WaveFlow, PRESETS)

and then, for every registered family,

    build_model("waveflow-tiny")                 # a preset name of any family
    build_model({"family": "waveflow", ...})     # a to_dict() output (no family key: autoregressive)
    build_model(WaveFlowConfig(...), h=8)        # a config object, with field overrides

Modules of the `sashimi.models` package are imported on demand (the first time a name is not
found, or when listing), so a new family only adds its file. Preset names are unique across
families. One config class may serve several families (its `family` field says which).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass

import torch.nn as nn

__all__ = ["Family", "UnknownFamilyError", "register_family", "families", "get_family", "preset_names",
           "get_preset", "resolve_config", "build_model"]

DEFAULT_FAMILY = "autoregressive"  # configs written before the `family` key existed
_INFRASTRUCTURE = {"config", "registry", "pretrained", "state_spaces"}


class UnknownFamilyError(ValueError):
    """A family name (or a preset name) that no registered family knows."""


@dataclass(frozen=True)
class Family:
    name: str
    config_cls: type
    model_cls: type
    presets: dict


_FAMILIES: dict[str, Family] = {}
_discovered = False


def register_family(name: str, config_cls: type, model_cls: type, presets: dict | None = None) -> Family:
    """Make a family known by name. Its presets' names must not be taken by another family.

    config_cls: a dataclass with a `family` field and to_dict() / from_dict(d) (see models.config);
    model_cls: an nn.Module subclass built as model_cls(config), with a `.config` attribute.
    presets: name -> config of this family (shared, never modified: build_model copies). Registering
    the same name again replaces the family (a module reloaded); the preset-name check still holds.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a family name must be a non-empty string, got {name!r}")
    if not isinstance(config_cls, type) or not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"family {name!r}: config_cls must be a dataclass, got {config_cls!r}")
    if "family" not in {f.name for f in dataclasses.fields(config_cls)}:
        raise TypeError(f"family {name!r}: {config_cls.__name__} has no `family` field")
    for method in ("to_dict", "from_dict"):
        if not callable(getattr(config_cls, method, None)):
            raise TypeError(f"family {name!r}: {config_cls.__name__} has no {method}()")
    if not isinstance(model_cls, type) or not issubclass(model_cls, nn.Module):
        raise TypeError(f"family {name!r}: model_cls must be an nn.Module subclass, got {model_cls!r}")
    presets = dict(presets or {})
    for preset, config in presets.items():
        if not isinstance(config, config_cls):
            raise TypeError(f"family {name!r}: preset {preset!r} is a {type(config).__name__}, "
                            f"not a {config_cls.__name__}")
        if config.family != name:
            raise ValueError(f"family {name!r}: preset {preset!r} has family {config.family!r}")
        for other in _FAMILIES.values():
            if other.name != name and preset in other.presets:
                raise ValueError(f"family {name!r}: preset name {preset!r} is already a preset of "
                                 f"family {other.name!r}")
    family = Family(name, config_cls, model_cls, presets)
    _FAMILIES[name] = family
    return family


def _discover() -> None:
    """Import every module of sashimi.models once (family modules register themselves)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = importlib.import_module(__package__)
    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in _INFRASTRUCTURE and not info.name.startswith("_"):
            importlib.import_module(f"{__package__}.{info.name}")


def families() -> list[str]:
    """The registered family names, sorted."""
    _discover()
    return sorted(_FAMILIES)


def get_family(name: str) -> Family:
    """The registered family `name`; UnknownFamilyError lists the known ones."""
    if name not in _FAMILIES:
        _discover()
    if name not in _FAMILIES:
        raise UnknownFamilyError(f"unknown model family {name!r}; known families: {families()}")
    return _FAMILIES[name]


def preset_names(family: str | None = None) -> list[str]:
    """Preset names of one family, or of all families, sorted."""
    if family is not None:
        return sorted(get_family(family).presets)
    _discover()
    return sorted(p for f in _FAMILIES.values() for p in f.presets)


def get_preset(name: str):
    """A copy of the config of the preset `name` (of any family)."""
    for _ in range(2):
        for family in _FAMILIES.values():
            if name in family.presets:
                return dataclasses.replace(family.presets[name])
        _discover()
    raise UnknownFamilyError(f"unknown preset {name!r}; expected one of {preset_names()}")


def resolve_config(config, **overrides):
    """A config object from a preset name, a to_dict() output or a config object, with field overrides.

    A dict without a `family` key is an autoregressive config (written before the key existed).
    """
    if isinstance(config, str):
        config = get_preset(config)
    elif isinstance(config, dict):
        name = config.get("family", DEFAULT_FAMILY)
        if not isinstance(name, str):
            raise UnknownFamilyError(f"a configuration's family must be a string, got {name!r}")
        config = get_family(name).config_cls.from_dict(config)
    elif dataclasses.is_dataclass(config) and not isinstance(config, type) and hasattr(config, "family"):
        family = get_family(config.family)
        if not isinstance(config, family.config_cls):
            raise TypeError(f"a {type(config).__name__} says family {config.family!r}, whose configs are "
                            f"{family.config_cls.__name__}")
    else:
        raise TypeError(f"expected a preset name, a config dict or a config object, got {type(config).__name__}")
    if overrides:
        if "family" in overrides:
            raise ValueError("family cannot be overridden: start from a config or preset of that family")
        fields = {f.name for f in dataclasses.fields(config)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown {type(config).__name__} fields {unknown}; expected some of {sorted(fields)}")
    return dataclasses.replace(config, **overrides)  # a copy: presets are never modified


def build_model(config="tiny", **overrides) -> nn.Module:
    """The model of any registered family from a preset name, a config dict or a config object.

    overrides are config fields (e.g. build_model("sc09", n_layers=2)). The model is freshly
    initialised; see sashimi.from_pretrained for trained weights.
    """
    config = resolve_config(config, **overrides)
    return get_family(config.family).model_cls(config)
