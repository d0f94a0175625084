"""Likelihood evaluation: NLL in bits per sample of a trained checkpoint over a whole data split.

    from sashimi.training.evaluate import evaluate
    evaluate("runs/sc09", "builtin", split="test", json_path="test.json")["nll_bits_per_sample"]

bits/sample = cross-entropy (nats) / ln 2, averaged over every real (unmasked) audio sample of
the split; padding is excluded. A run directory means its best.pt (best validation NLL), or
last.pt when there is no best.pt; pass a file to choose.
"""

from __future__ import annotations

import math
import os

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.datasets import make_dataset
from ..models.autoregressive import count_parameters
from .loop import (BEST_CHECKPOINT, LAST_CHECKPOINT, CheckpointError, load_checkpoint, model_from_checkpoint,
                    resolve_checkpoint, write_json)

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(ckpt: str, data: str | None = None, split: str = "test", batch_size: int = 8, json_path: str | None = None,
             use_ema: bool = True, preset: str | None = None, n_items: int | None = None, num_workers: int = 0,
             device: str | torch.device | None = None, progress: bool = True) -> dict:
    """NLL in bits/sample over the whole `split` of `data` ('builtin' or a folder; default: the run's data).

    ckpt: a run directory or a checkpoint file. use_ema: use the EMA weights when the checkpoint has
    them. preset: if given, the checkpoint must come from this preset. Returns (and writes to
    json_path) {"nll_bits_per_sample", "n_samples", "split", "checkpoint", "preset", "step", ...}.
    """
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    path = resolve_checkpoint(ckpt, prefer=(BEST_CHECKPOINT, LAST_CHECKPOINT))
    state = load_checkpoint(path)
    if preset is not None and state.get("preset") != preset:
        raise CheckpointError(f"{path} comes from preset {state.get('preset')!r}, not {preset!r}")
    if data is None:
        data = state["train_config"]["data"]
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model_from_checkpoint(state, use_ema=use_ema, path=path).to(device).eval()
    used_ema = use_ema and state.get("ema") is not None
    print(f"sashimi eval: {path} (preset {state.get('preset')!r}, step {state['step']}, "
          f"{count_parameters(model):,} parameters{', EMA weights' if used_ema else ''})")

    mc = state["model_config"]
    dataset = make_dataset(data, split, sample_rate=mc["sample_rate"], sample_len=mc["sample_len"],
                           quantization=mc["quantization"], bits=mc["bits"], n_items=n_items)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    total_bits, total_count = 0.0, 0
    bar = tqdm(loader, desc=f"eval {split}", disable=not progress, dynamic_ncols=True)
    for batch in bar:
        bits, count = model(batch["x"].to(device), batch["y"].to(device), batch["mask"].to(device))
        total_bits += float(bits)
        total_count += int(count)
        bar.set_postfix(bits=f"{total_bits / max(total_count, 1):.4f}")
    if total_count == 0:
        raise ValueError(f"the {split!r} split of {data!r} has no audio samples to evaluate")
    nll = total_bits / total_count
    if not math.isfinite(nll):
        raise FloatingPointError(f"the NLL of {path} on {split!r} is not finite ({nll})")

    result = {"nll_bits_per_sample": nll, "n_samples": total_count, "n_items": len(dataset), "split": split,
              "data": str(data), "checkpoint": os.path.abspath(path), "preset": state.get("preset"),
              "step": state["step"], "ema": used_ema}
    print(f"{split}: {nll:.4f} bits/sample over {total_count:,} samples ({len(dataset):,} items)")
    if json_path:
        folder = os.path.dirname(os.path.abspath(json_path))
        os.makedirs(folder, exist_ok=True)
        write_json(json_path, result)
    return result
