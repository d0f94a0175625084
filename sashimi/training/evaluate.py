"""Evaluation: a model's objective averaged over batches (shared with validation), and over a checkpoint's data split.

    from sashimi.training.evaluate import evaluate
    evaluate("runs/sc09", "builtin", split="test", json_path="test.json")["nll_bits_per_sample"]

The number reported is the family's objective metric per audio sample (for the autoregressive
family: bits/sample = cross-entropy (nats) / ln 2), averaged over every real (unmasked) sample
of the split; padding is excluded. A run directory means its best.pt (best validation), or
last.pt when there is no best.pt; pass a file to choose.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
from torch.utils.data import DataLoader

from ..checks import check_int
from ..data.datasets import dataset_for
from ..files import write_json
from ..models.registry import resolve_config
from ..objectives.base import Objective, objective_for
from ..progress import progress as progress_display
from .checkpoint import BEST_CHECKPOINT, LAST_CHECKPOINT, CheckpointError, load_checkpoint, model_from_checkpoint, \
    resolve_checkpoint
from .rundir import check_output_file

__all__ = ["sum_metrics", "evaluate"]


@torch.no_grad()
def sum_metrics(model: torch.nn.Module, objective: Objective, batches, device, autocast=contextlib.nullcontext,
                bar=None) -> tuple[dict[str, float], float]:
    """The objective's metrics summed over batches (in eval mode), and the count they sum over.

    Divide a sum by the count for the per-sample figure; sums and counts add across processes.
    `bar`, if given, is updated per batch and shows the running headline metric.
    """
    was_training = model.training
    model.eval()
    sums, total_count = {}, 0.0
    try:
        for batch in batches:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with autocast():
                _, count, metrics = objective(model, batch)
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + float(value)
            total_count += float(count)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(**{objective.metric: f"{sums[objective.metric] / max(total_count, 1.0):.4f}"})
    finally:
        model.train(was_training)
    return sums, total_count


def evaluate(ckpt: str, data: str | None = None, split: str = "test", batch_size: int = 8, json_path: str | None = None,
             use_ema: bool = True, preset: str | None = None, n_items: int | None = None, num_workers: int = 0,
             device: str | torch.device | None = None, progress: bool = True) -> dict:
    """The objective's metric per sample over the whole `split` of `data` ('builtin' or a folder; default: the run's).

    ckpt: a run directory or a checkpoint file. use_ema: use the EMA weights when the checkpoint has
    them. preset: if given, the checkpoint must come from this preset. Returns (and writes to
    json_path) {summary_key (e.g. "nll_bits_per_sample"), "metric", "unit", "n_samples", "split",
    "checkpoint", "preset", "step", ...}.
    """
    check_int("batch_size", batch_size, 1)
    if json_path:
        check_output_file(json_path, "json_path")  # before the evaluation, not after it
    path = resolve_checkpoint(ckpt, prefer=(BEST_CHECKPOINT, LAST_CHECKPOINT))
    state = load_checkpoint(path)
    if preset is not None and state.get("preset") != preset:
        raise CheckpointError(f"{path} comes from preset {state.get('preset')!r}, not {preset!r}")
    if data is None:
        data = state["train_config"]["data"]
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model_from_checkpoint(state, use_ema=use_ema, path=path).to(device).eval()
    objective = objective_for(model)
    used_ema = use_ema and state.get("ema") is not None
    n_parameters = sum(p.numel() for p in model.parameters())
    print(f"sashimi eval: {path} (preset {state.get('preset')!r}, step {state['step']}, "
          f"{n_parameters:,} parameters{', EMA weights' if used_ema else ''})")

    dataset = dataset_for(resolve_config(state["model_config"]), data, split, n_items=n_items)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    bar = progress_display(total=len(loader), desc=f"eval {split}", disable=not progress)
    sums, count = sum_metrics(model, objective, loader, device, bar=bar)
    bar.close()
    if count == 0:
        raise ValueError(f"the {split!r} split of {data!r} has no audio samples to evaluate")
    value = sums[objective.metric] / count
    if not math.isfinite(value):
        raise FloatingPointError(f"the {objective.metric} per sample of {path} on {split!r} is not finite ({value})")

    result = {objective.summary_key: value, "metric": objective.metric, "unit": objective.unit,
              "n_samples": int(count), "n_items": len(dataset), "split": split, "data": str(data),
              "checkpoint": os.path.abspath(path), "preset": state.get("preset"), "step": state["step"],
              "ema": used_ema}
    print(f"{split}: {value:.4f} {objective.unit} over {int(count):,} samples ({len(dataset):,} items)")
    if json_path:
        try:
            write_json(json_path, result)
        except OSError as e:
            raise OSError(e.errno, f"cannot write {json_path}: {e.strerror or e} (the result was {value:.4f} "
                                   f"{objective.unit}; choose another path)") from e
    return result

