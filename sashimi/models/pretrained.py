"""The shareable model format: a folder with config.json and model.safetensors, for any registered family.

    model.save_pretrained("my-model")            # any model with PretrainedMixin
    model = sashimi.from_pretrained("my-model")  # the family comes from config.json

config.json holds the format name and version, the family, the model's config (its to_dict()),
the SHA-256 of the weights file and, optionally, an `info` dict (provenance: run, step, EMA).
model.safetensors holds the state_dict (parameters and persistent buffers, e.g. each S4 kernel's
attuned length l_kernel); safetensors stores raw tensors only, so loading a downloaded model runs
no code. A module's non-tensor extra state (get_extra_state) goes to config.json as JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import torch
import torch.nn as nn

from ..files import atomic_write

__all__ = ["PretrainedError", "PretrainedMixin", "save_pretrained", "from_pretrained", "read_pretrained_config",
           "FORMAT_NAME", "FORMAT_VERSION", "CONFIG_NAME", "WEIGHTS_NAME"]

FORMAT_NAME = "sashimi-pretrained"
FORMAT_VERSION = 1  # bump when the folder layout changes incompatibly
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_EXTRA_STATE = "_extra_state"


class PretrainedError(ValueError):
    """A pretrained-model folder that is missing, damaged, of another format, or inconsistent."""


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ImportError("the sashimi model format needs the safetensors package: pip install safetensors") from e
    return safetensors.torch


def _split_state(model: nn.Module):
    """state_dict -> (tensors for safetensors, JSON-able extra states)."""
    tensors, extra, storages = {}, {}, set()
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            t = value.detach().to("cpu")
            if t.is_complex():
                raise PretrainedError(f"{key}: complex tensors are not supported by safetensors; "
                                      "store a real view (torch.view_as_real)")
            # safetensors refuses tensors that share memory (tied or viewed weights): copy those
            if not t.is_contiguous() or (t.numel() and t.untyped_storage().data_ptr() in storages):
                t = t.clone(memory_format=torch.contiguous_format)
            if t.numel():
                storages.add(t.untyped_storage().data_ptr())
            tensors[key] = t
        elif key.endswith(_EXTRA_STATE):
            try:
                json.dumps(value)
            except TypeError as e:
                raise PretrainedError(f"{key}: a module's extra state must be JSON-able to be saved "
                                      f"in {CONFIG_NAME}, got {type(value).__name__}") from e
            extra[key] = value
        else:
            raise PretrainedError(f"{key}: state_dict entry of type {type(value).__name__} cannot be saved")
    return tensors, extra


def _family_of(model: nn.Module):
    from .registry import get_family

    config = getattr(model, "config", None)
    name = getattr(config, "family", None)
    if name is None or not callable(getattr(config, "to_dict", None)):
        raise PretrainedError(f"{type(model).__name__} has no .config with a family and to_dict(): "
                              "only models of a registered family can be saved")
    family = get_family(name)
    if not isinstance(model, family.model_cls):
        raise PretrainedError(f"a {type(model).__name__} with a {name!r} config: the {name!r} family's model "
                              f"class is {family.model_cls.__name__}")
    return family


def save_pretrained(model: nn.Module, directory: str, *, info: dict | None = None) -> str:
    """Write `model` to the folder `directory` (created if needed) as config.json + model.safetensors.

    info: an optional JSON-able dict kept in config.json (provenance: source run, step, EMA, ...).
    Weights are written first, then config.json (which holds their digest), each atomically.
    Returns the folder.
    """
    family = _family_of(model)
    tensors, extra = _split_state(model)
    if info is not None:
        try:
            json.dumps(info)
        except TypeError as e:
            raise PretrainedError(f"info must be JSON-able: {e}") from e
    metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "family": family.name}
    data = _safetensors().save(tensors, metadata=metadata)
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values() if t.is_floating_point()})
    os.makedirs(directory, exist_ok=True)
    atomic_write(os.path.join(directory, WEIGHTS_NAME), data)
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "family": family.name,
        "model_class": type(model).__name__,
        "config": model.config.to_dict(),
        "weights": {"file": WEIGHTS_NAME, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                    "tensors": len(tensors), "dtypes": dtypes,
                    "parameters": sum(p.numel() for p in model.parameters())},
        "extra_state": extra,
        "info": info or {},
        "torch_version": str(torch.__version__),
    }
    text = json.dumps(config, indent=2, sort_keys=False) + "\n"
    atomic_write(os.path.join(directory, CONFIG_NAME), text.encode())
    return directory


def read_pretrained_config(directory: str) -> dict:
    """config.json of a pretrained folder, checked for the format name and version (not the weights)."""
    if not os.path.isdir(directory):
        raise PretrainedError(f"{directory} is not a folder (a pretrained model is a folder with "
                              f"{CONFIG_NAME} and {WEIGHTS_NAME})")
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise PretrainedError(f"{path} does not exist: {directory} is not a pretrained-model folder")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PretrainedError(f"{path}: cannot read it as JSON ({e})") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        raise PretrainedError(f"{path} is not a sashimi model config (expected \"format\": \"{FORMAT_NAME}\")")
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise PretrainedError(f"{path}: format_version must be a positive int, got {version!r}")
    if version > FORMAT_VERSION:
        raise PretrainedError(f"{path} has format version {version}; this version of sashimi reads up to "
                              f"{FORMAT_VERSION}: upgrade sashimi")
    for key, kind in (("family", str), ("config", dict)):
        if not isinstance(config.get(key), kind):
            raise PretrainedError(f"{path}: \"{key}\" must be a {kind.__name__}, got {config.get(key)!r}")
    return config


def _read_weights(directory: str, meta: dict, verify: bool) -> dict:
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise PretrainedError(f"{path} does not exist (the weights of {os.path.join(directory, CONFIG_NAME)})")
    with open(path, "rb") as f:
        data = f.read()
    expected = (meta.get("weights") or {}).get("sha256")
    if verify and expected is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected:
            size = (meta.get("weights") or {}).get("bytes")
            how = f"{len(data)} bytes, {CONFIG_NAME} says {size}" if size is not None and size != len(data) \
                else f"{len(data)} bytes"
            raise PretrainedError(f"{path} does not match the SHA-256 recorded in {CONFIG_NAME} ({how}): the "
                                  "file is truncated, damaged or was modified (verify=False skips this check)")
    try:
        tensors = _safetensors().load(data)
    except Exception as e:  # safetensors raises its own SafetensorError (and others on garbage)
        raise PretrainedError(f"cannot read {path} as safetensors ({type(e).__name__}: {e}): "
                              "the file is truncated or damaged") from e
    return tensors


def _check_fit(model: nn.Module, tensors: dict, directory: str, overrides: dict) -> None:
    """Missing, unexpected or mis-shaped weights as one error naming both files."""
    own = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shapes = [f"{k}: file {tuple(tensors[k].shape)} vs config {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(tensors)) if tuple(own[k].shape) != tuple(tensors[k].shape)]
    problems = []
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches ({'; '.join(shapes[:4])}{'; ...' if len(shapes) > 4 else ''})")
    if missing:
        problems.append(f"{len(missing)} missing ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:4])}"
                        f"{', ...' if len(unexpected) > 4 else ''})")
    if problems:
        with_overrides = f" with the overrides {overrides}" if overrides else ""
        raise PretrainedError(f"the weights in {os.path.join(directory, WEIGHTS_NAME)} do not fit the model "
                              f"{os.path.join(directory, CONFIG_NAME)} describes{with_overrides}: {'; '.join(problems)}")


def from_pretrained(directory: str, *, device=None, verify: bool = True, **overrides) -> nn.Module:
    """The model saved in `directory` by save_pretrained (any registered family), in eval mode.

    device: where to put it (default CPU). verify: check model.safetensors against the SHA-256 in
    config.json. overrides: config fields that do not change the weights' shapes (e.g. backend).
    The floating-point dtype of the saved weights is kept (a float64 model loads as float64).
    """
    from .registry import UnknownFamilyError, get_family

    meta = read_pretrained_config(directory)
    config_path = os.path.join(directory, CONFIG_NAME)
    try:
        family = get_family(meta["family"])
    except UnknownFamilyError as e:
        raise PretrainedError(f"{config_path}: {e}") from e
    config_dict = dict(meta["config"])
    if config_dict.setdefault("family", family.name) != family.name:
        raise PretrainedError(f"{config_path}: family {family.name!r} but its config says {config_dict['family']!r}")
    try:
        config = family.config_cls.from_dict(config_dict)
        if overrides:
            config = dataclasses.replace(config, **overrides)
    except (TypeError, ValueError) as e:
        raise PretrainedError(f"{config_path}: invalid {family.name} configuration ({e})") from e
    tensors = _read_weights(directory, meta, verify)
    extra = meta.get("extra_state") or {}
    try:
        model = family.model_cls(config)
    except (TypeError, ValueError) as e:
        raise PretrainedError(f"{config_path}: cannot build the model it describes ({e})") from e
    _check_fit(model, tensors, directory, overrides)
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) == 1 and next(iter(dtypes)) != torch.get_default_dtype():
        model.to(next(iter(dtypes)))
    state = dict(tensors)
    state.update(extra)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # pragma: no cover - _check_fit catches what strict loading would
        raise PretrainedError(f"{os.path.join(directory, WEIGHTS_NAME)}: {e}") from e
    if device is not None:
        model.to(device)
    return model.eval()


class PretrainedMixin:
    """save_pretrained(dir) / from_pretrained(dir) for a family's model (an nn.Module with `.config`)."""

    def save_pretrained(self, directory: str, *, info: dict | None = None) -> str:
        """Write config.json + model.safetensors to `directory`; see sashimi.models.pretrained."""
        return save_pretrained(self, directory, info=info)

    @classmethod
    def from_pretrained(cls, directory: str, **kwargs):
        """Load a folder written by save_pretrained; it must hold a model of this class."""
        model = from_pretrained(directory, **kwargs)
        if not isinstance(model, cls):
            raise PretrainedError(f"{os.path.join(directory, CONFIG_NAME)} holds a {type(model).__name__} "
                                  f"(family {model.config.family!r}), not a {cls.__name__}")
        return model
