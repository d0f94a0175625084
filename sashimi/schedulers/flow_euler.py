"""Euler ODE steps for a flow dx/dt = v(x, t) from t = 0 (noise) to t = 1 (data): x <- x + (t' - t) v."""

from __future__ import annotations

import torch

from .time_grid import time_grid

__all__ = ["FlowEulerScheduler"]


class FlowEulerScheduler:
    """set_timesteps(n, schedule) then, for t in timesteps: sample = step(v(sample, t), t, sample)."""

    order = 1

    def __init__(self, num_steps: int = 24, schedule="linear"):
        self.set_timesteps(num_steps, schedule)

    def set_timesteps(self, num_steps: int, schedule="linear") -> None:
        self.grid = time_grid(num_steps, schedule)
        self.timesteps = self.grid[:-1]  # float64; cast where the model takes them
        self.num_steps, self.step_index = num_steps, 0

    def step(self, model_output: torch.Tensor, t, sample: torch.Tensor) -> torch.Tensor:
        k = self.step_index
        if k >= self.num_steps:
            raise RuntimeError("all steps are taken; call set_timesteps to start again")
        self.step_index += 1
        return sample + (self.grid[k + 1] - self.grid[k]).item() * model_output
