"""Export a training checkpoint as the shareable model folder (config.json + model.safetensors)."""

from __future__ import annotations

import os

from .checkpoint import BEST_CHECKPOINT, LAST_CHECKPOINT, load_checkpoint, model_from_checkpoint, resolve_checkpoint

__all__ = ["export_checkpoint"]


def export_checkpoint(ckpt: str, out: str, use_ema: bool = True) -> dict:
    """Write the model of a checkpoint (a run directory: its best.pt, else last.pt) to the folder `out`.

    The EMA weights are exported when the checkpoint has them and use_ema is True, else the raw
    weights. Returns the provenance recorded under "info" in out/config.json: the checkpoint,
    its step, which weights ("ema" or "raw"), the preset and the validation NLL.
    """
    path = resolve_checkpoint(ckpt, prefer=(BEST_CHECKPOINT, LAST_CHECKPOINT))
    state = load_checkpoint(path)
    ema = bool(use_ema and state.get("ema") is not None)
    model = model_from_checkpoint(state, use_ema=use_ema, path=path)
    info = {"source_checkpoint": os.path.abspath(path), "step": state.get("step"), "weights": "ema" if ema else "raw",
            "preset": state.get("preset"), "val_bits": state.get("val_bits"),
            "best_val_bits": state.get("best_val_bits"), "checkpoint_format_version": state.get("format_version")}
    info = {k: (float(v) if hasattr(v, "item") else v) for k, v in info.items()}
    model.save_pretrained(out, info=info)
    return info
