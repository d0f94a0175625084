"""The objective contract the training loop calls: Objective(fn, metric, unit) and objective_for(model).

    loss_sum, count, metrics = objective(model, batch)

- `batch` is a collated dict of items (sashimi.data.datasets): `wav` (B, L) float32, `mask` (B, L)
  bool, `label` (B,) int64, and `tokens` (B, L) int64 when the model quantises.
- `loss_sum` is a differentiable 0-d tensor: the loss summed over `count` units (audio samples).
  The loop minimises sum(loss_sum) / sum(count) over the global batch (all micro-batches and
  processes), so `count(batch)` must be known before the forward: `Objective.count` gives it
  (default: the number of real samples, batch["mask"].sum()).
- `metrics` maps names to sums over the same count (0-d tensors or floats); the loop reports
  each as sum / count, `train_<name>` and `val_<name>`. `metric` names the one validation
  reports and best.pt follows (lower is better); `unit` is how it reads ("bits/sample").

A model class names its objective with a class attribute, `objective = Objective(...)`;
`objective_for(model)` finds it, so the loop needs no list of families.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Objective", "objective_for", "count_real_samples"]


def count_real_samples(batch: dict) -> torch.Tensor:
    """The number of real (unpadded) audio samples in a batch: batch["mask"].sum()."""
    return batch["mask"].sum()


@dataclass(frozen=True)
class Objective:
    """A family's training objective and how its headline number reads."""
    fn: Callable  # (model, batch) -> (loss_sum, count, metrics)
    metric: str  # the key of metrics that validation reports, e.g. "bits"
    unit: str  # e.g. "bits/sample"
    summary_key: str  # the key of the evaluation JSON, e.g. "nll_bits_per_sample"
    count: Callable = count_real_samples  # batch -> the count fn will return, before running the model

    def __call__(self, model: torch.nn.Module, batch: dict):
        return self.fn(model, batch)


def objective_for(model: torch.nn.Module) -> Objective:
    """The Objective a model class declares (`objective = Objective(...)` on the class)."""
    objective = getattr(type(model), "objective", None)
    if not isinstance(objective, Objective):
        raise TypeError(f"{type(model).__name__} declares no training objective: give the class an attribute "
                        f"`objective = sashimi.objectives.base.Objective(...)`")
    return objective
