"""Sampling loops of the flow families: ODE integration with guidance, diffusion sampling, and straightness S.

Every function takes a network `model(x, t, condition) -> output` (a FlowModel or any callable of
that signature), noise x0 (B, ...), and condition / null tensors (B, E) or None.
"""

from __future__ import annotations

import torch

from sashimi.schedulers.ddim import DDIMScheduler
from sashimi.schedulers.ddpm import DDPMScheduler
from sashimi.schedulers.flow_euler import FlowEulerScheduler
from sashimi.schedulers.flow_heun import FlowHeunScheduler
from sashimi.schedulers.guidance import check_guidance_scale, guided_output

__all__ = ["flow_scheduler", "sample_flow", "sample_diffusion", "straightness", "check_steps"]

ODE_METHODS = {"euler": FlowEulerScheduler, "heun": FlowHeunScheduler}


def check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"the number of sampling steps must be an int >= 1, got {steps!r}")
    return steps


def flow_scheduler(method: str = "euler", steps: int = 24, schedule="linear"):
    if method not in ODE_METHODS:
        raise ValueError(f"unknown ODE method {method!r}; expected one of {sorted(ODE_METHODS)}")
    return ODE_METHODS[method](check_steps(steps), schedule)


def _times(t, x):
    return torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)


@torch.no_grad()
def sample_flow(model, noise: torch.Tensor, condition=None, null=None, steps: int = 24, method: str = "euler",
                schedule="linear", cfg: float = 1.0, trajectory: bool = False):
    """Integrate dx/dt = v(x, t, c) from x(0) = noise to t = 1; returns x(1) (and the list of states).

    cfg: the guidance scale w, v = v(null) + w (v(c) - v(null)) (1: plain conditional).
    """
    check_guidance_scale(cfg)
    if cfg != 1.0 and condition is not None and null is None:
        raise ValueError("guidance with a scale other than 1 needs the null condition")
    scheduler = flow_scheduler(method, steps, schedule)
    x, states = noise, [noise]
    for t in scheduler.timesteps:
        v = guided_output(model, x, _times(t, x), condition, null, cfg)
        x = scheduler.step(v, t, x)
        if trajectory and (scheduler.order == 1 or scheduler.step_index % 2 == 0):
            states.append(x)
    return (x, states) if trajectory else x


@torch.no_grad()
def sample_diffusion(model, noise: torch.Tensor, schedule, condition=None, null=None, method: str = "ddpm",
                     steps: int | None = None, cfg: float = 1.0, generator: torch.Generator | None = None):
    """DDPM ancestral (all T steps) or DDIM deterministic (any number of steps) for an eps model."""
    if method == "ddpm":
        scheduler = DDPMScheduler(schedule, generator)
        scheduler.set_timesteps(steps)
    elif method == "ddim":
        scheduler = DDIMScheduler(schedule, check_steps(steps if steps is not None else 50))
    else:
        raise ValueError(f"unknown diffusion sampler {method!r}; expected 'ddpm' or 'ddim'")
    x = noise
    for n in scheduler.timesteps:
        t = torch.full((x.shape[0],), int(n) / schedule.T, dtype=x.dtype, device=x.device)
        x = scheduler.step(guided_output(model, x, t, condition, null, cfg), n, x)
    return x


@torch.no_grad()
def straightness(model, noise: torch.Tensor, condition=None, null=None, steps: int = 24, cfg: float = 1.0) -> dict:
    """S = int_0^1 E ||(Z_1 - Z_0) - v(Z_t, t)||^2 dt along the model's own Euler trajectories.

    Evaluated on the same `steps`-point grid as the trajectory (a left Riemann sum), and reported
    per element (the squared norm divided by the number of elements of one sample), next to the
    mean squared displacement E ||Z_1 - Z_0||^2 / D for scale. S is 0 exactly when every
    trajectory is a straight line travelled at constant speed: then one Euler step is exact.
    """
    scheduler = flow_scheduler("euler", steps)
    x, velocities = noise, []
    for t in scheduler.timesteps:
        v = guided_output(model, x, _times(t, x), condition, null, cfg)
        velocities.append(v)
        x = scheduler.step(v, t, x)
    displacement = x - noise
    dims = noise[0].numel()
    widths = (scheduler.grid[1:] - scheduler.grid[:-1]).tolist()
    S = sum(h * float((displacement - v).double().square().sum()) for h, v in zip(widths, velocities))
    return {"S": S / (noise.shape[0] * dims), "displacement": float(displacement.double().square().mean()),
            "steps": steps, "samples": x}
