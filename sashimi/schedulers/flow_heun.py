"""Heun (explicit trapezoidal) ODE steps for a flow: second order, two velocity evaluations per step.

    x' = x + h v(x, t),   x <- x + h/2 (v(x, t) + v(x', t + h)).

As in diffusers' Heun scheduler, `timesteps` lists each evaluation time (t_0, t_1, t_1, t_2, ...,
t_{n-1}, t_n): step() alternates between the predictor and the corrector.
"""

from __future__ import annotations

import torch

from .time_grid import time_grid

__all__ = ["FlowHeunScheduler"]


class FlowHeunScheduler:
    order = 2

    def __init__(self, num_steps: int = 12, schedule="linear"):
        self.set_timesteps(num_steps, schedule)

    def set_timesteps(self, num_steps: int, schedule="linear") -> None:
        self.grid = time_grid(num_steps, schedule)
        pairs = torch.stack([self.grid[:-1], self.grid[1:]], dim=1).reshape(-1)
        self.timesteps = pairs  # float64; cast where the model takes them
        self.num_steps, self.step_index = num_steps, 0
        self._start = self._velocity = None

    def step(self, model_output: torch.Tensor, t, sample: torch.Tensor) -> torch.Tensor:
        k, corrector = divmod(self.step_index, 2)
        if k >= self.num_steps:
            raise RuntimeError("all steps are taken; call set_timesteps to start again")
        h = (self.grid[k + 1] - self.grid[k]).item()
        self.step_index += 1
        if not corrector:  # predictor: an Euler step, remembered for the correction
            self._start, self._velocity = sample, model_output
            return sample + h * model_output
        out = self._start + 0.5 * h * (self._velocity + model_output)
        self._start = self._velocity = None
        return out
