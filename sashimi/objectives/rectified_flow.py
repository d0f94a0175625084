"""Rectified flow: the straight interpolation, its velocity target and loss, timestep samplers, immiscible pairing.

    x_t = t * x1 + (1 - t) * x0,    x0 ~ N(0, I) (noise),  x1 the data,
    target v* = x1 - x0,            loss = mean ||v(x_t, t, c) - v*||^2 (over unmasked elements).

Timestep samplers draw t in (0, 1): uniform; logit-normal(m, s), t = sigmoid(N(m, s^2)) (1-RF);
Mix-Exp(a), p(t) = a / (2 (e^a - 1)) * (e^{a t} + e^{a (1 - t)}) (U-shaped, 2-RF); or any callable
(n, generator) -> (n,) tensor. Immiscible pairing permutes the noise of a batch so that the total
distance between noise and data is minimal (the Hungarian algorithm).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

__all__ = ["interpolate", "velocity_target", "rectified_flow_loss", "UniformSampler", "LogitNormalSampler",
           "MixExpSampler", "CallableSampler", "get_timestep_sampler", "immiscible_assignment",
           "rectified_flow_objective", "broadcast_time", "flow_count", "weighted_loss"]


def broadcast_time(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t (B,) -> (B, 1, ..., 1) so that it broadcasts against x (B, ...)."""
    return t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = t x1 + (1 - t) x0 for t (B,) and x0, x1 (B, ...)."""
    t = broadcast_time(t, x1)
    return t * x1 + (1 - t) * x0


def velocity_target(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """The straight path's velocity d x_t / dt = x1 - x0."""
    return x1 - x0


def rectified_flow_loss(v: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor, mask: torch.Tensor | None = None):
    """(sum of squared errors over unmasked elements, number of those elements).

    v, x0, x1: (B, ...) of one shape; mask broadcasts against them (e.g. (B, L, 1)); None keeps all.
    """
    if not (v.shape == x0.shape == x1.shape):
        raise ValueError(f"v, x0 and x1 must have one shape, got {tuple(v.shape)}, {tuple(x0.shape)}, "
                         f"{tuple(x1.shape)}")
    err = (v - velocity_target(x0, x1)).square()
    if mask is None:
        return err.sum(), err.numel()
    weight = torch.broadcast_to(mask.to(err.dtype), err.shape)
    return (err * weight).sum(), weight.sum()


# ------------------------------------------------------------------------------------ timestep samplers
class UniformSampler:
    """t ~ U(0, 1)."""

    name = "uniform"

    def __call__(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.rand(n, generator=generator, dtype=torch.float64).float()

    def density(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        return torch.ones_like(t)

    def __repr__(self):
        return "uniform"


class LogitNormalSampler:
    """t = sigmoid(u), u ~ N(m, s^2): density 1 / (s sqrt(2 pi) t (1-t)) exp(-(logit t - m)^2 / (2 s^2))."""

    name = "logit_normal"

    def __init__(self, m: float = 0.0, s: float = 1.0):
        if not (math.isfinite(m) and math.isfinite(s) and s > 0):
            raise ValueError(f"logit-normal needs a finite m and s > 0, got m={m}, s={s}")
        self.m, self.s = float(m), float(s)

    def __call__(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        u = torch.randn(n, generator=generator, dtype=torch.float64) * self.s + self.m
        return torch.sigmoid(u).float()

    def density(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        logit = torch.log(t) - torch.log1p(-t)
        return torch.exp(-(logit - self.m) ** 2 / (2 * self.s**2)) / (self.s * math.sqrt(2 * math.pi) * t * (1 - t))

    def __repr__(self):
        return f"logit_normal(m={self.m}, s={self.s})"


class MixExpSampler:
    """U-shaped p(t) = a / (2 (e^a - 1)) (e^{a t} + e^{a (1 - t)}) on [0, 1].

    An equal mixture of q(t) = a e^{a t} / (e^a - 1) and its mirror q(1 - t); q is sampled by its
    inverse CDF t = log(1 + u (e^a - 1)) / a.
    """

    name = "mix_exp"

    def __init__(self, a: float = 4.0):
        if not (math.isfinite(a) and a > 0):
            raise ValueError(f"Mix-Exp needs a finite a > 0, got a={a}")
        self.a = float(a)

    def __call__(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        flip = torch.rand(n, generator=generator, dtype=torch.float64) < 0.5
        t = torch.log1p(u * math.expm1(self.a)) / self.a
        return torch.where(flip, 1 - t, t).float()

    def density(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        a = self.a
        return a / (2 * math.expm1(a)) * (torch.exp(a * t) + torch.exp(a * (1 - t)))

    def __repr__(self):
        return f"mix_exp(a={self.a})"


class CallableSampler:
    """A user function (n, generator) -> n times in [0, 1], checked on every call."""

    name = "callable"

    def __init__(self, fn: Callable):
        if not callable(fn):
            raise TypeError(f"a timestep sampler must be callable (n, generator) -> (n,) tensor, got {fn!r}")
        self.fn = fn

    def __call__(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        t = torch.as_tensor(self.fn(n, generator), dtype=torch.float32).reshape(-1)
        if t.numel() != n:
            raise ValueError(f"the timestep sampler returned {t.numel()} times for a batch of {n}")
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()) or bool((t > 1).any()):
            raise ValueError("the timestep sampler must return finite times in [0, 1]")
        return t

    def __repr__(self):
        return f"callable({getattr(self.fn, '__name__', self.fn)!r})"


def get_timestep_sampler(spec="logit_normal", **params):
    """A sampler from a name ('uniform', 'logit_normal' [m, s], 'mix_exp' [a]), a sampler, or a callable."""
    if isinstance(spec, (UniformSampler, LogitNormalSampler, MixExpSampler, CallableSampler)):
        return spec
    if isinstance(spec, str):
        key = spec.lower().replace("-", "_")
        if key == "uniform":
            return UniformSampler()
        if key in ("logit_normal", "lognorm"):
            return LogitNormalSampler(**params)
        if key in ("mix_exp", "mixexp"):
            return MixExpSampler(**params)
        raise ValueError(f"unknown timestep sampler {spec!r}; expected 'uniform', 'logit_normal', 'mix_exp' "
                         "or a callable (n, generator) -> times")
    return CallableSampler(spec)


# ------------------------------------------------------------------------------------ immiscible pairing
def immiscible_assignment(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """The permutation p (B,) minimising sum_i ||x0[p[i]] - x1[i]||^2: pair data i with noise p[i].

    Squared Euclidean distances, solved exactly by scipy.optimize.linear_sum_assignment. Under DDP
    each process matches its own micro-batch (noise is drawn per process, no communication).
    """
    from scipy.optimize import linear_sum_assignment

    if x0.shape != x1.shape:
        raise ValueError(f"noise and data must have one shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
    a = x0.detach().reshape(x0.shape[0], -1).double().cpu()
    b = x1.detach().reshape(x1.shape[0], -1).double().cpu()
    cost = torch.cdist(b, a).square().numpy()  # cost[i, j]: data i with noise j
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return torch.from_numpy(perm).to(x0.device)


# ------------------------------------------------------------------------------------ the objective
def flow_count(batch: dict):
    """The count a flow objective reports for a batch, known before the forward: the real audio
    samples (batch["mask"].sum()) of a data batch, the elements of x1 for a batch of reflow pairs."""
    if "mask" in batch:
        return batch["mask"].sum()
    return batch["x1"].numel()


def weighted_loss(loss_sum, count, batch: dict):
    """(loss_sum, count) rescaled to count = flow_count(batch): the same mean, the loop's weight.

    Equal to the input when the model's space is the waveform; for mel frames it turns the sum
    over (frame, bin) elements into the mean error times the batch's real samples.
    """
    target = flow_count(batch)
    return loss_sum * (target / count), target


def rectified_flow_objective(model, batch: dict, *, timestep_sampler=None, immiscible: bool | None = None,
                             generator: torch.Generator | None = None):
    """objective(model, batch) -> (loss_sum, count, metrics) for a flow model v = model(x_t, t, cond).

    batch: "x1" (B, L, C) data in the model's space (or "wav" (B, L), which model.encode maps to
    it), optional "mask", "noise" (reflow pairs: the x0 that produced x1), "label"/"prompt"/"embedding".
    Fresh noise is drawn when the batch has none; immiscible (default: model.config.immiscible)
    re-pairs the noise within the batch; the timestep sampler defaults to the model's.
    """
    sampler = get_timestep_sampler(timestep_sampler) if timestep_sampler is not None else model.timestep_sampler()
    x1, mask = model.encode_batch(batch)
    x0 = batch.get("noise")
    if x0 is None:
        x0 = torch.randn(x1.shape, generator=generator, dtype=x1.dtype).to(x1.device)
    elif x0.shape != x1.shape:
        raise ValueError(f"batch['noise'] must have the data's shape {tuple(x1.shape)}, got {tuple(x0.shape)}")
    if immiscible if immiscible is not None else getattr(model.config, "immiscible", False):
        x0 = x0[immiscible_assignment(x0, x1)]
    t = sampler(x1.shape[0], generator).to(x1.device)
    v = model(interpolate(x0, x1, t), t, model.condition_from_batch(batch))
    loss_sum, count = weighted_loss(*rectified_flow_loss(v, x0, x1, mask), batch)
    return loss_sum, count, {"mse": loss_sum.detach()}
