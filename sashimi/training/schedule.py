"""The learning-rate schedule of sashimi.training.loop: linear warmup, then cosine decay or reduce-on-plateau."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .loop import TrainConfig

__all__ = ["LRSchedule"]


class LRSchedule:
    """Learning-rate multiplier: linear warmup, then cosine decay or reduce-on-plateau.

    factor(step) multiplies every parameter group's initial lr (so SSM groups with their own
    lr are scaled alike). `observe(val_bits)` feeds the plateau rule after each validation.
    """

    def __init__(self, cfg: TrainConfig):
        self.kind, self.warmup = cfg.schedule, cfg.warmup_steps
        self.decay_steps = cfg.decay_steps or cfg.max_steps
        self.min_ratio = cfg.min_lr_ratio
        self.factor_on_plateau, self.patience = cfg.plateau_factor, cfg.plateau_patience
        self.plateau_scale, self.best, self.bad_validations = 1.0, math.inf, 0

    def factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "plateau":
            return self.plateau_scale
        progress = min(1.0, (step - self.warmup) / max(1, self.decay_steps - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def observe(self, val_bits: float) -> None:
        if self.kind != "plateau":
            return
        if val_bits < self.best:
            self.best, self.bad_validations = val_bits, 0
        else:
            self.bad_validations += 1
            if self.bad_validations > self.patience:
                self.plateau_scale *= self.factor_on_plateau
                self.bad_validations = 0

    def state_dict(self) -> dict:
        return {"plateau_scale": self.plateau_scale, "best": self.best, "bad_validations": self.bad_validations}

    def load_state_dict(self, d: dict) -> None:
        self.plateau_scale, self.best, self.bad_validations = d["plateau_scale"], d["best"], d["bad_validations"]
