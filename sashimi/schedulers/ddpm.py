"""DDPM ancestral sampling for an eps-prediction model: x_{n-1} = mean(x_n, eps) + sigma_n z.

    mean = (x_n - beta_n / sqrt(1 - abar_n) eps) / sqrt(alpha_n),
    sigma_n^2 = beta_n (1 - abar_{n-1}) / (1 - abar_n)  (the posterior variance, as DiffWave uses).
"""

from __future__ import annotations

import torch

from ..objectives.diffwave import DiffusionSchedule

__all__ = ["DDPMScheduler"]


class DDPMScheduler:
    """timesteps T-1 .. 0 (integer steps); step(eps, n, x_n) -> x_{n-1} (noise from `generator`)."""

    def __init__(self, schedule: DiffusionSchedule | None = None, generator: torch.Generator | None = None):
        self.schedule = schedule or DiffusionSchedule()
        self.generator = generator
        self.set_timesteps()

    def set_timesteps(self, num_steps: int | None = None) -> None:
        T = self.schedule.T
        if num_steps not in (None, T):
            raise ValueError(f"ancestral DDPM sampling runs all T={T} steps, got {num_steps}; use DDIM for fewer")
        self.timesteps = torch.arange(T - 1, -1, -1)
        self.num_steps = T

    def step(self, model_output: torch.Tensor, n, sample: torch.Tensor) -> torch.Tensor:
        n = int(n)
        s = self.schedule
        beta, alpha, abar = s.betas[n].item(), s.alphas[n].item(), s.alpha_bars[n].item()
        mean = (sample - beta / (1 - abar) ** 0.5 * model_output) / alpha**0.5
        if n == 0:
            return mean
        abar_prev = s.alpha_bars[n - 1].item()
        sigma = (beta * (1 - abar_prev) / (1 - abar)) ** 0.5
        z = torch.randn(sample.shape, generator=self.generator, dtype=sample.dtype).to(sample.device)
        return mean + sigma * z
