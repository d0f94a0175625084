"""Weights to start a training run from: a model folder, a run directory or a checkpoint file -> (config, weights).

    from sashimi.training.init_from import read_init
    config, weights, where = read_init("runs/rf1")   # best.pt (else last.pt), EMA weights when present

What `TrainConfig.init_from` reads (reflow starts from the 1-RF model, distillation from the 2-RF
one). The configuration comes back as a config object of its family (sashimi.models.registry).
"""

from __future__ import annotations

import os

from ..models.registry import resolve_config
from .checkpoint import BEST_CHECKPOINT, LAST_CHECKPOINT, CheckpointError, load_checkpoint, resolve_checkpoint

__all__ = ["read_init"]


def read_init(path: str, use_ema: bool = True):
    """(config object, state dict, the file read) of a model folder (config.json + model.safetensors),
    a run directory (its best.pt, else last.pt) or a checkpoint file; CheckpointError names the problem."""
    from ..models.pretrained import WEIGHTS_NAME, from_pretrained

    if not isinstance(path, (str, os.PathLike)) or not os.path.exists(path):
        raise CheckpointError(f"init_from {path!r} does not exist; expected a model folder (config.json + "
                              f"model.safetensors), a run directory or a checkpoint file")
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
        try:
            model = from_pretrained(os.fspath(path))
        except (OSError, ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"init_from {path}: cannot load the model folder ({e})") from e
        return model.config, model.state_dict(), os.path.join(path, WEIGHTS_NAME)
    file = resolve_checkpoint(os.fspath(path), prefer=(BEST_CHECKPOINT, LAST_CHECKPOINT))
    state = load_checkpoint(file)
    try:
        config = resolve_config(state["model_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"init_from {file}: cannot read its model config ({e})") from e
    weights = state["ema"] if use_ema and state.get("ema") is not None else state["model"]
    return config, weights, file
