"""ODE and diffusion samplers against exact solutions; classifier-free guidance limits."""

import math

import pytest
import torch

from sashimi.objectives.diffwave import DiffusionSchedule
from sashimi.schedulers.ddim import DDIMScheduler
from sashimi.schedulers.ddpm import DDPMScheduler
from sashimi.schedulers.flow_euler import FlowEulerScheduler
from sashimi.schedulers.flow_heun import FlowHeunScheduler
from sashimi.schedulers.guidance import guided_output
from sashimi.schedulers.time_grid import time_grid


def _run(scheduler, field, x):
    for t in scheduler.timesteps:
        x = scheduler.step(field(x, float(t)), t, x)
    return x


@pytest.mark.parametrize("schedule, n", [("linear", 1), ("linear", 4), ("cosine", 4), (lambda u: u**2, 5),
                                         ([0.0, 0.1, 0.15, 0.7, 1.0], 4)],
                         ids=["linear-1", "linear-4", "cosine", "square", "list"])
def test_euler_is_exact_on_the_linear_field_of_a_point_mass(schedule, n):
    # v(x, t) = (x1 - x) / (1 - t): linear in x; its solution is the straight line x0 + t (x1 - x0)
    x1 = torch.tensor([[2.0, -1.0, 0.5]], dtype=torch.float64)
    x0 = torch.tensor([[0.3, 0.7, -1.2]], dtype=torch.float64)
    out = _run(FlowEulerScheduler(n, schedule), lambda x, t: (x1 - x) / (1 - t), x0)
    torch.testing.assert_close(out, x1, rtol=0, atol=1e-12)


def _error(cls, n):
    # dx/dt = x cos(t): x(1) = x(0) exp(sin 1)
    x0 = torch.tensor([1.0], dtype=torch.float64)
    out = _run(cls(n), lambda x, t: x * math.cos(t), x0)
    return abs(float(out) - math.exp(math.sin(1.0)))


def test_heun_is_second_order_and_euler_first():
    heun = [_error(FlowHeunScheduler, n) for n in (8, 16, 32)]
    euler = [_error(FlowEulerScheduler, n) for n in (8, 16, 32)]
    for a, b in zip(heun, heun[1:]):
        assert 3.5 < a / b < 4.5
    for a, b in zip(euler, euler[1:]):
        assert 1.8 < a / b < 2.2
    assert len(FlowHeunScheduler(8).timesteps) == 16


def test_time_grid_rejects_bad_schedules():
    for bad, match in ((0, "int >= 1"), (-2, "int >= 1"), (1.5, "int >= 1")):
        with pytest.raises(ValueError, match=match):
            time_grid(bad)
    with pytest.raises(ValueError, match="increase strictly"):
        time_grid(2, [0.0, 0.6, 0.5])
    with pytest.raises(ValueError, match="gives 1 steps"):
        time_grid(2, [0.0, 1.0])
    with pytest.raises(ValueError, match="unknown step schedule"):
        time_grid(2, "karras")
    s = FlowEulerScheduler(1)
    s.step(torch.zeros(1), 0.0, torch.zeros(1))
    with pytest.raises(RuntimeError, match="set_timesteps"):
        s.step(torch.zeros(1), 0.0, torch.zeros(1))


def _point_mass_eps(schedule, c):
    abar = schedule.alpha_bars

    def eps(x, n):
        a = abar[int(n)].item()
        return (x - a**0.5 * c) / (1 - a) ** 0.5
    return eps


def _gaussian_eps(schedule, s2):
    abar = schedule.alpha_bars

    def eps(x, n):  # E[eps | x_n] for data N(0, s2)
        a = abar[int(n)].item()
        return (1 - a) ** 0.5 * x / (a * s2 + 1 - a)
    return eps


@pytest.mark.parametrize("steps", [1, 7, 200])
def test_ddim_with_the_exact_eps_of_a_point_mass_lands_on_it(steps):
    schedule = DiffusionSchedule()
    c = torch.tensor([0.4, -0.2], dtype=torch.float64)
    out = _run(DDIMScheduler(schedule, steps), _point_mass_eps(schedule, c), torch.randn(5, 2, dtype=torch.float64))
    torch.testing.assert_close(out, c.expand(5, 2), rtol=0, atol=1e-9)


def test_ddpm_ancestral_samples_the_data_distribution():
    schedule = DiffusionSchedule()
    c = torch.tensor([0.4, -0.2], dtype=torch.float64)
    out = _run(DDPMScheduler(schedule, torch.Generator().manual_seed(0)), _point_mass_eps(schedule, c),
               torch.randn(5, 2, dtype=torch.float64))
    torch.testing.assert_close(out, c.expand(5, 2), rtol=0, atol=1e-9)
    # Gaussian data N(0, 0.25): with the exact posterior eps the samples have variance 0.25
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20000, dtype=torch.float64, generator=g)
    out = _run(DDPMScheduler(schedule, g), _gaussian_eps(schedule, 0.25), x)
    assert abs(float(out.var()) - 0.25) < 0.02 and abs(float(out.mean())) < 0.02
    with pytest.raises(ValueError, match="DDIM"):
        DDPMScheduler(schedule).set_timesteps(24)
    with pytest.raises(ValueError, match="1 <= steps"):
        DDIMScheduler(schedule, 0)


def test_classifier_free_guidance_limits():
    torch.manual_seed(0)
    W = torch.randn(3, 4)

    def model(x, t, c):
        return x * t[:, None] + c @ W[:, :4] + x.square()

    x, t = torch.randn(2, 4), torch.rand(2)
    cond, null = torch.randn(2, 3), torch.randn(2, 3)
    for batched in (None, True, False):
        torch.testing.assert_close(guided_output(model, x, t, cond, null, 1.0, batched), model(x, t, cond))
        torch.testing.assert_close(guided_output(model, x, t, cond, null, 0.0, batched), model(x, t, null))
    w = 3.0
    ref = model(x, t, null) + w * (model(x, t, cond) - model(x, t, null))
    torch.testing.assert_close(guided_output(model, x, t, cond, null, w), ref)
    for bad in (-1.0, float("nan"), "3"):
        with pytest.raises(ValueError, match="guidance scale"):
            guided_output(model, x, t, cond, null, bad)
