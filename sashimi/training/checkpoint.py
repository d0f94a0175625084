"""Training checkpoints: their layout, writing, loading with format checks, and RNG states.

    from sashimi.training.checkpoint import load_checkpoint, model_from_checkpoint
    model = model_from_checkpoint(load_checkpoint("runs/tiny/best.pt"))   # EMA weights when present

A checkpoint is one `torch.save`d dict of tensors and primitives (it loads with weights_only=True):
format_version, preset, model_config, train_config, model, ema, optimizer, scheduler, step,
data {epoch, index, seed, batch_size}, rng (one state per process), nonfinite_total,
best_val_bits, val_bits, elapsed_seconds, world_size, torch_version. `sashimi.training.loop` writes them
(`write_checkpoint`) and resumes from them; evaluation and generation read them.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist

from ..files import atomic_write
from .guard import nonfinite_entries
from ..models.registry import build_model, resolve_config

__all__ = ["CheckpointError", "CHECKPOINT_FORMAT", "LAST_CHECKPOINT", "BEST_CHECKPOINT", "resolve_checkpoint",
           "load_checkpoint", "model_from_checkpoint", "write_checkpoint", "config_diff", "gather_rng_states",
           "rng_state", "set_rng_state"]

CHECKPOINT_FORMAT = 1  # bump when the checkpoint layout changes incompatibly
LAST_CHECKPOINT = "last.pt"  # written every ckpt_every steps, at the end, and on SIGINT/SIGTERM
BEST_CHECKPOINT = "best.pt"  # written when the validation NLL improves


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, of another format version, or of another model."""


# ----------------------------------------------------------------------------- RNG states


def rng_state() -> dict:
    """torch / CUDA / numpy / python RNG states as tensors and primitives (loadable with weights_only=True)."""
    py_version, py_state, py_gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss_next": py_gauss},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss_next"]))


def gather_rng_states(world_size: int) -> list[dict]:
    """Every process's rng_state(), in rank order. Collective: every process of the group calls it."""
    if world_size == 1:
        return [rng_state()]
    states = [None] * world_size
    dist.all_gather_object(states, rng_state())
    return states


# ----------------------------------------------------------------------------- writing


def write_checkpoint(path: str, *, train_config: dict, model_config: dict, model: dict, ema: dict | None,
                     optimizer: dict, scheduler: dict, step: int, data: dict, rng: list[dict], nonfinite_total: int,
                     best_val_bits: float, val_bits: float | None, elapsed_seconds: float, world_size: int) -> None:
    """Write a checkpoint of the layout above (state dicts, configs as dicts) atomically to path."""
    state = {
        "format_version": CHECKPOINT_FORMAT,
        "preset": train_config["preset"],
        "model_config": model_config,
        "train_config": train_config,
        "model": model,
        "ema": ema,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "step": step,
        "data": data,
        "rng": rng,
        "nonfinite_total": nonfinite_total,
        "best_val_bits": best_val_bits,
        "val_bits": val_bits,
        "elapsed_seconds": elapsed_seconds,
        "world_size": world_size,
        "torch_version": str(torch.__version__),
    }
    bad = nonfinite_entries(model, "model.") + nonfinite_entries(ema, "ema.")
    if bad:
        raise CheckpointError(f"refusing to write {path}: non-finite weights in {', '.join(bad[:3])}"
                              + (f" and {len(bad) - 3} more" if len(bad) > 3 else ""))
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except OSError as e:
        kept = f"the previous {os.path.basename(path)} is kept" if os.path.exists(path) else "nothing was written"
        raise OSError(e.errno, f"cannot write checkpoint {path}: {e.strerror or e} ({kept}); free space or "
                               f"choose another --out, then --resume") from e


# ----------------------------------------------------------------------------- reading


def resolve_checkpoint(ckpt: str, prefer: tuple[str, ...] = (LAST_CHECKPOINT,)) -> str:
    """A checkpoint file, or the first of `prefer` that exists in a run directory."""
    if os.path.isdir(ckpt):
        for name in prefer:
            if os.path.isfile(os.path.join(ckpt, name)):
                return os.path.join(ckpt, name)
        raise CheckpointError(f"no checkpoint ({' or '.join(prefer)}) in run directory {ckpt}")
    if not os.path.isfile(ckpt):
        raise CheckpointError(f"checkpoint {ckpt} does not exist")
    return ckpt


def load_checkpoint(path: str) -> dict:
    """torch.load(weights_only=True) plus format checks; raises CheckpointError with the reason."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from e
    if size == 0:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is empty (0 bytes; its writing was cut "
                              f"short, e.g. by a full disk); use another checkpoint of the run or retrain")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, unsafe pickle content, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {reason}") from e
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"{path} is not a sashimi checkpoint (no format_version)")
    if state["format_version"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has checkpoint format version {state['format_version']}, but this "
                              f"version of sashimi reads format {CHECKPOINT_FORMAT}")
    return state


def config_diff(saved: dict, wanted: dict) -> list[str]:
    """The model-config fields in which a checkpoint differs from the requested model, as readable lines."""
    # fields added since the checkpoint was written (e.g. family) take their defaults
    try:
        saved = resolve_config(saved).to_dict()
    except (TypeError, ValueError):
        pass  # an unreadable config: compare the raw dicts
    # 'backend' picks how kernels are computed, not what the model is: a run may resume on another one
    keys = sorted((set(saved) | set(wanted)) - {"backend"})
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731  (JSON turns tuples into lists)
    return [f"{k}: checkpoint {saved.get(k)!r} vs requested {wanted.get(k)!r}"
            for k in keys if norm(saved.get(k)) != norm(wanted.get(k))]


def model_from_checkpoint(state: dict, use_ema: bool = True, path: str = "checkpoint"):
    """Build the model described by a loaded checkpoint and load its (EMA) weights."""
    try:
        model = build_model(state["model_config"])
    except Exception as e:
        raise CheckpointError(f"{path}: cannot build the model it describes ({e})") from e
    weights = state["ema"] if use_ema and state.get("ema") is not None else state["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit its model config (preset {state.get('preset')!r}): {e}") from e
    return model
