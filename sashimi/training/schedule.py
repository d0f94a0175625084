"""The learning-rate schedule: linear warmup, then cosine decay (over steps or a wall-clock budget) or reduce-on-plateau."""

from __future__ import annotations

import math

__all__ = ["LRSchedule"]

KINDS = ("cosine", "plateau")


class LRSchedule:
    """Learning-rate multiplier: linear warmup over warmup_steps, then cosine or reduce-on-plateau.

    factor(step, seconds) multiplies every parameter group's initial lr (so SSM groups with their
    own lr are scaled alike). Cosine decays from 1 to min_ratio at decay_steps; with
    budget_seconds it decays over time instead: from the end of warmup to budget_seconds of
    training time (`seconds`, resumed runs included), so the model is decayed at the deadline.
    `observe(value)` feeds the plateau rule after each validation (lower is better).
    """

    def __init__(self, kind: str = "cosine", warmup_steps: int = 0, decay_steps: int = 1, min_ratio: float = 0.0,
                 plateau_factor: float = 0.5, plateau_patience: int = 5, budget_seconds: float | None = None):
        if kind not in KINDS:
            raise ValueError(f"schedule must be one of {KINDS}, got {kind!r}")
        self.kind, self.warmup, self.decay_steps, self.min_ratio = kind, warmup_steps, decay_steps, min_ratio
        self.factor_on_plateau, self.patience = plateau_factor, plateau_patience
        self.budget_seconds = budget_seconds
        self.plateau_scale, self.best, self.bad_validations = 1.0, math.inf, 0
        self.warmup_end_seconds = None  # training time when warmup ended (the start of a time-based decay)

    def factor(self, step: int, seconds: float = 0.0) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "plateau":
            return self.plateau_scale
        if self.budget_seconds is None:
            progress = (step - self.warmup) / max(1, self.decay_steps - self.warmup)
        else:
            if self.warmup_end_seconds is None:
                self.warmup_end_seconds = seconds
            start = min(self.warmup_end_seconds, self.budget_seconds)
            progress = (seconds - start) / max(self.budget_seconds - start, 1e-9)
        progress = min(1.0, max(0.0, progress))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def observe(self, value: float) -> None:
        if self.kind != "plateau":
            return
        if value < self.best:
            self.best, self.bad_validations = value, 0
        else:
            self.bad_validations += 1
            if self.bad_validations > self.patience:
                self.plateau_scale *= self.factor_on_plateau
                self.bad_validations = 0

    def state_dict(self) -> dict:
        state = {"plateau_scale": self.plateau_scale, "best": self.best, "bad_validations": self.bad_validations}
        if self.warmup_end_seconds is not None:
            state["warmup_end_seconds"] = self.warmup_end_seconds
        return state

    def load_state_dict(self, d: dict) -> None:
        self.plateau_scale, self.best, self.bad_validations = d["plateau_scale"], d["best"], d["bad_validations"]
        self.warmup_end_seconds = d.get("warmup_end_seconds")
