"""Step schedules for ODE samplers: n + 1 increasing times from 0 (noise) to 1 (data)."""

from __future__ import annotations

import math

import torch

__all__ = ["time_grid"]


def _check_steps(num_steps) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"the number of sampling steps must be an int >= 1, got {num_steps!r}")
    return num_steps


def time_grid(num_steps: int, schedule="linear") -> torch.Tensor:
    """float64 (num_steps + 1,) times 0 = t_0 < ... < t_n = 1.

    schedule: 'linear' (uniform steps); 'cosine' (t = (1 - cos(pi u)) / 2: small steps at both
    ends); a callable mapping u in [0, 1] (a float64 tensor) to t, increasing with f(0) = 0 and
    f(1) = 1; or a sequence of times itself (then num_steps must match its length - 1).
    """
    num_steps = _check_steps(num_steps)
    u = torch.linspace(0, 1, num_steps + 1, dtype=torch.float64)
    if isinstance(schedule, str):
        if schedule == "linear":
            t = u
        elif schedule == "cosine":
            t = (1 - torch.cos(math.pi * u)) / 2
        else:
            raise ValueError(f"unknown step schedule {schedule!r}; expected 'linear', 'cosine', a callable "
                             "or a sequence of times")
    elif callable(schedule):
        t = torch.as_tensor(schedule(u), dtype=torch.float64).reshape(-1)
    else:
        t = torch.as_tensor(schedule, dtype=torch.float64).reshape(-1)
        if t.numel() != num_steps + 1:
            raise ValueError(f"a schedule of {t.numel()} times gives {t.numel() - 1} steps, not {num_steps}")
    if t.numel() != num_steps + 1 or not bool(torch.isfinite(t).all()):
        raise ValueError("the step schedule must give num_steps + 1 finite times")
    if abs(float(t[0])) > 1e-12 or abs(float(t[-1]) - 1) > 1e-12 or bool((t[1:] <= t[:-1]).any()):
        raise ValueError(f"the step schedule must increase strictly from 0 to 1, got {t.tolist()}")
    return t
