"""Rectified-flow and DiffWave objectives against float64 references; timestep densities; immiscible pairing."""

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sashimi.objectives.diffwave import DiffusionSchedule, q_sample
from sashimi.objectives.rectified_flow import (LogitNormalSampler, MixExpSampler, UniformSampler,
                                                 get_timestep_sampler, immiscible_assignment, interpolate,
                                                 rectified_flow_loss)


def test_rectified_flow_loss_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    x0, x1, v = (torch.randn(3, 8, 2, generator=g) for _ in range(3))
    t = torch.rand(3, generator=g)
    mask = torch.rand(3, 8, 1, generator=g) > 0.3
    xt = interpolate(x0, x1, t)
    loss, count = rectified_flow_loss(v, x0, x1, mask)
    a, b, w, tt, m = (z.double().numpy() for z in (x0, x1, v, t, mask))
    ref_xt = np.empty_like(a)
    ref_loss, ref_count = 0.0, 0
    for i in range(3):
        for j in range(8):
            for c in range(2):
                ref_xt[i, j, c] = tt[i] * b[i, j, c] + (1 - tt[i]) * a[i, j, c]
                if m[i, j, 0]:
                    ref_loss += (w[i, j, c] - (b[i, j, c] - a[i, j, c])) ** 2
                    ref_count += 1
    np.testing.assert_allclose(xt.numpy(), ref_xt, rtol=1e-6, atol=1e-6)
    assert float(count) == ref_count
    assert abs(float(loss) - ref_loss) < 1e-5 * max(1.0, ref_loss)
    full, n = rectified_flow_loss(v, x0, x1)
    assert n == v.numel()
    assert abs(float(full) - float(((v - (x1 - x0)) ** 2).double().sum())) < 1e-4


def _bin_probabilities(density, edges, sub=200):
    probs = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        u = torch.linspace(lo, hi, sub + 1, dtype=torch.float64)
        mid = (u[1:] + u[:-1]) / 2
        probs.append(float(density(mid).sum()) * (hi - lo) / sub)
    return np.array(probs)


@pytest.mark.parametrize("sampler", [UniformSampler(), LogitNormalSampler(0.0, 1.0), LogitNormalSampler(0.5, 0.7),
                                     MixExpSampler(4.0), MixExpSampler(1.0)], ids=repr)
def test_timestep_density_matches_histogram(sampler):
    n = 200_000
    t = sampler(n, torch.Generator().manual_seed(1)).double().numpy()
    assert t.min() >= 0 and t.max() <= 1
    edges = np.linspace(0, 1, 41)
    counts, _ = np.histogram(t, bins=edges)
    expected = n * _bin_probabilities(sampler.density, edges.tolist())
    assert abs(expected.sum() - n) < 1e-3 * n  # the density integrates to one
    # Poisson noise: 5 sigma per bin
    assert np.all(np.abs(counts - expected) <= 5 * np.sqrt(expected) + 5), (counts, expected.round())


def test_mix_exp_is_u_shaped_and_symmetric():
    s = MixExpSampler(4.0)
    d = s.density(torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    assert d[0] == pytest.approx(d[4]) and d[1] == pytest.approx(d[3]) and d[2] < d[1] < d[0]


def test_callable_and_bad_timestep_samplers():
    s = get_timestep_sampler(lambda n, g: torch.full((n,), 0.25))
    assert torch.equal(s(3), torch.full((3,), 0.25))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        get_timestep_sampler(lambda n, g: torch.full((n,), 2.0))(3)
    with pytest.raises(ValueError, match="returned 2 times"):
        get_timestep_sampler(lambda n, g: torch.zeros(2))(3)
    with pytest.raises(ValueError, match="unknown timestep sampler"):
        get_timestep_sampler("gamma")
    with pytest.raises(ValueError, match="s > 0"):
        LogitNormalSampler(0, 0)
    with pytest.raises(ValueError, match="a > 0"):
        MixExpSampler(-1)


def _total(x0, x1, perm):
    return float((x0[perm] - x1).double().square().sum())


@settings(max_examples=30)
@given(st.integers(1, 12), st.integers(1, 20), st.integers(0, 2**31 - 1))
def test_immiscible_assignment_never_increases_total_distance(batch, dim, seed):
    g = torch.Generator().manual_seed(seed)
    x0, x1 = torch.randn(batch, dim, generator=g), torch.randn(batch, dim, generator=g) * 3 + 1
    perm = immiscible_assignment(x0, x1)
    assert sorted(perm.tolist()) == list(range(batch))  # a permutation
    assert _total(x0, x1, perm) <= _total(x0, x1, torch.arange(batch)) + 1e-6
    # and never worse than a random re-pairing
    assert _total(x0, x1, perm) <= _total(x0, x1, torch.randperm(batch, generator=g)) + 1e-6


def test_immiscible_assignment_is_the_optimum():
    g = torch.Generator().manual_seed(3)
    x0, x1 = torch.randn(6, 2, 5, generator=g), torch.randn(6, 2, 5, generator=g)
    best = min(_total(x0, x1, torch.tensor(p)) for p in itertools.permutations(range(6)))
    assert _total(x0, x1, immiscible_assignment(x0, x1)) == pytest.approx(best, rel=1e-9)


def test_diffusion_schedule_and_q_sample_match_float64_reference():
    s = DiffusionSchedule()
    betas = s.betas.numpy()
    assert len(betas) == 200 and betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 200))
    np.testing.assert_allclose(s.alpha_bars.numpy(), abar, rtol=1e-12)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 16, 1, generator=g), torch.randn(4, 16, 1, generator=g)
    steps = torch.tensor([0, 10, 150, 199])
    xt = q_sample(s, x0, steps, eps).double().numpy()
    ref = np.sqrt(abar[steps])[:, None, None] * x0.double().numpy() + \
        np.sqrt(1 - abar[steps])[:, None, None] * eps.double().numpy()
    np.testing.assert_allclose(xt, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="T must be"):
        DiffusionSchedule(T=0)
