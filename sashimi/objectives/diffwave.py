"""The DiffWave diffusion baseline: a linear beta schedule, the forward noising q(x_t | x_0) and the eps-prediction loss.

    beta_t linear from beta_1 = 1e-4 to beta_T = 0.02, T = 200 (SaShiMi's SC09 experiment);
    alpha_t = 1 - beta_t, abar_t = prod_{s <= t} alpha_s;
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,  loss = ||eps_theta(x_t, t, c) - eps||^2.

Steps are indexed 0 .. T-1 in code (step n is the paper's t = n + 1). The network receives the
continuous time n / T in [0, 1) so that one embedding serves flows and diffusion alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .rectified_flow import weighted_loss

__all__ = ["DiffusionSchedule", "q_sample", "diffwave_objective"]


@dataclass(frozen=True)
class DiffusionSchedule:
    """beta, alpha, abar of a linear schedule, in float64 (cast where used)."""

    T: int = 200
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self):
        if isinstance(self.T, bool) or not isinstance(self.T, int) or self.T < 1:
            raise ValueError(f"T must be an int >= 1, got {self.T!r}")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}")

    @property
    def betas(self) -> torch.Tensor:
        return torch.linspace(self.beta_start, self.beta_end, self.T, dtype=torch.float64)

    @property
    def alphas(self) -> torch.Tensor:
        return 1 - self.betas

    @property
    def alpha_bars(self) -> torch.Tensor:
        return torch.cumprod(self.alphas, dim=0)

    def model_time(self, steps: torch.Tensor) -> torch.Tensor:
        """Integer steps (B,) -> the network's continuous time input n / T."""
        return steps.to(torch.float32) / self.T


def q_sample(schedule: DiffusionSchedule, x0: torch.Tensor, steps: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar) x0 + sqrt(1 - abar) eps for integer steps (B,)."""
    abar = schedule.alpha_bars.to(x0.device)[steps].reshape(-1, *([1] * (x0.dim() - 1)))
    return (abar.sqrt() * x0 + (1 - abar).sqrt() * eps).to(x0.dtype)


def diffwave_objective(model, batch: dict, *, generator: torch.Generator | None = None):
    """objective(model, batch) -> (loss_sum, count, metrics): eps-prediction MSE at a uniform step."""
    schedule = model.diffusion_schedule()
    x0, mask = model.encode_batch(batch)
    B = x0.shape[0]
    steps = torch.randint(0, schedule.T, (B,), generator=generator).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    pred = model(q_sample(schedule, x0, steps, eps), schedule.model_time(steps), model.condition_from_batch(batch))
    err = (pred - eps).square()
    if mask is None:
        loss_sum, count = err.sum(), err.numel()
    else:
        weight = torch.broadcast_to(mask.to(err.dtype), err.shape)
        loss_sum, count = (err * weight).sum(), weight.sum()
    loss_sum, count = weighted_loss(loss_sum, count, batch)
    return loss_sum, count, {"mse": loss_sum.detach()}
