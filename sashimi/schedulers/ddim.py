"""DDIM deterministic sampling (eta = 0) for an eps-prediction model over any decreasing subset of steps.

    x0_hat = (x_n - sqrt(1 - abar_n) eps) / sqrt(abar_n),
    x_m = sqrt(abar_m) x0_hat + sqrt(1 - abar_m) eps      (m the next step; abar_{-1} = 1).
"""

from __future__ import annotations

import torch

from ..objectives.diffwave import DiffusionSchedule

__all__ = ["DDIMScheduler"]


class DDIMScheduler:
    def __init__(self, schedule: DiffusionSchedule | None = None, num_steps: int = 50):
        self.schedule = schedule or DiffusionSchedule()
        self.set_timesteps(num_steps)

    def set_timesteps(self, num_steps: int) -> None:
        T = self.schedule.T
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= T:
            raise ValueError(f"DDIM needs 1 <= steps <= T={T}, got {num_steps!r}")
        # evenly spaced from T-1 down to 0 (distinct integers)
        steps = torch.linspace(T - 1, 0, num_steps, dtype=torch.float64).round().long()
        self.timesteps = torch.unique_consecutive(steps)
        self.num_steps = len(self.timesteps)
        self._next = {int(a): int(b) for a, b in zip(self.timesteps[:-1], self.timesteps[1:])}

    def step(self, model_output: torch.Tensor, n, sample: torch.Tensor) -> torch.Tensor:
        n = int(n)
        abar = self.schedule.alpha_bars
        a_n = abar[n].item()
        m = self._next.get(n, -1)
        a_m = abar[m].item() if m >= 0 else 1.0
        x0_hat = (sample - (1 - a_n) ** 0.5 * model_output) / a_n**0.5
        return a_m**0.5 * x0_hat + (1 - a_m) ** 0.5 * model_output
