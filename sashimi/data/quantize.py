"""Quantisation of float waveforms in [-1, 1] to integer levels and back: mu-law and linear.

With Q = 2**bits levels (256 for 8 bits) and mu = Q - 1 (255):

    mu-law compress    y = sign(x) * log(1 + mu |x|) / log(1 + mu)        x, y in [-1, 1]
    mu-law expand      x = sign(y) * ((1 + mu)**|y| - 1) / mu
    encode             q = floor((y + 1) / 2 * (Q - 1) + 1/2)              q in {0, ..., Q - 1}
    decode             y = 2 q / (Q - 1) - 1

Linear quantisation is the same grid without the compression (y = x). Level 0 decodes to
exactly -1 and level Q - 1 to exactly +1; silence (x = 0) encodes to the level Q / 2 (128 for
8 bits), `Quantizer.zero_level`, the first input of an autoregressive model. encode(decode(q))
== q for every level. Out-of-range inputs (including +-inf) are clamped to [-1, 1]; NaN raises
ValueError. The arithmetic runs in float64 whatever the input dtype (in numpy for CPU
inputs, so it does not compete for torch's threads; in torch on other devices). Results are
torch tensors on the input's device.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..checks import check_int

__all__ = [
    "Quantizer",
    "mu_law_encode",
    "mu_law_decode",
    "linear_encode",
    "linear_decode",
    "QUANTIZATIONS",
    "quantization_kind",
]

QUANTIZATIONS = ("mu_law", "linear")
_KIND_ALIASES = {"mu_law": "mu_law", "mulaw": "mu_law", "mu": "mu_law", "linear": "linear"}


def quantization_kind(kind) -> str:
    """The canonical name ('mu_law' or 'linear') of a quantisation kind: any case, '-' for '_', 'mulaw', 'mu'."""
    canonical = _KIND_ALIASES.get(str(kind).lower().replace("-", "_"))
    if canonical is None:
        raise ValueError(f"quantisation kind must be one of {QUANTIZATIONS}, got {kind!r}")
    return canonical


def _check_bits(bits: int) -> int:
    return check_int("bits", bits, 1, 16)


def _on_cpu(a) -> bool:
    return not isinstance(a, torch.Tensor) or a.device.type == "cpu"


def _as_float64(x, name: str = "x"):
    """x as float64: a numpy array for CPU input (tensor, ndarray, sequence, scalar), else a tensor.

    NaN raises ValueError.
    """
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise TypeError(f"{name} must be real, got {x.dtype}")
        x = x.detach()
        x = x.to(torch.float64).numpy() if x.device.type == "cpu" else x.to(torch.float64)
    else:
        x = np.asarray(x, dtype=np.float64)
    n_nan = int(torch.isnan(x).sum()) if isinstance(x, torch.Tensor) else int(np.isnan(x).sum())
    if n_nan:
        raise ValueError(f"{name} contains NaN; cannot quantise (found {n_nan} NaN values)")
    return x


def _as_levels(q, levels: int):
    """q as int64 (a numpy array for CPU input, else a tensor); values outside [0, levels) raise ValueError."""
    if isinstance(q, torch.Tensor):
        q = q.detach()
        if q.device.type == "cpu":
            q = q.numpy()
    if isinstance(q, torch.Tensor):
        if q.is_floating_point() and not torch.equal(q, q.round()):
            raise ValueError(f"q must hold integer levels, got non-integer values of dtype {q.dtype}")
        q = q.to(torch.int64)
        lo, hi = (int(q.min()), int(q.max())) if q.numel() else (0, 0)
    else:
        q = np.asarray(q)
        if q.dtype.kind not in "iub":
            if q.dtype.kind != "f" or not np.array_equal(q, np.round(q)):
                raise ValueError(f"q must hold integer levels, got dtype {q.dtype}")
        q = q.astype(np.int64)
        lo, hi = (int(q.min()), int(q.max())) if q.size else (0, 0)
    if lo < 0 or hi >= levels:
        raise ValueError(f"q must lie in [0, {levels - 1}], got values in [{lo}, {hi}]")
    return q


def _to_tensor(a, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.to(dtype)
    return torch.as_tensor(a).to(dtype)


def _xp(a):
    """The array namespace of a: numpy or torch (same names for the functions used here)."""
    return torch if isinstance(a, torch.Tensor) else np


def _grid_encode(y, levels: int) -> torch.Tensor:
    """Nearest level on the uniform grid over [-1, 1] (halves round up, so 0 -> levels // 2)."""
    xp = _xp(y)
    y = xp.clip(y, -1.0, 1.0)
    return _to_tensor(xp.floor((y + 1.0) / 2.0 * (levels - 1) + 0.5), torch.int64)


def _grid_decode(q, levels: int):
    return 2.0 * q / (levels - 1) - 1.0


def _check_mu(mu, levels: int) -> float:
    mu = float(levels - 1 if mu is None else mu)
    if not mu > 0:
        raise ValueError(f"mu must be positive, got {mu}")
    return mu


def mu_law_encode(x, bits: int = 8, mu: float | None = None) -> torch.Tensor:
    """Mu-law quantise x in [-1, 1] to int64 levels in [0, 2**bits - 1]; mu defaults to 2**bits - 1."""
    levels = 2 ** _check_bits(bits)
    mu = _check_mu(mu, levels)
    x = _as_float64(x)
    xp = _xp(x)
    x = xp.clip(x, -1.0, 1.0)
    y = xp.sign(x) * xp.log1p(mu * xp.abs(x)) / math.log1p(mu)
    return _grid_encode(y, levels)


def mu_law_decode(q, bits: int = 8, mu: float | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `mu_law_encode`: int levels -> float waveform in [-1, 1] (float32 by default)."""
    levels = 2 ** _check_bits(bits)
    mu = _check_mu(mu, levels)
    y = _grid_decode(_as_levels(q, levels), levels)
    xp = _xp(y)
    return _to_tensor(xp.sign(y) * xp.expm1(xp.abs(y) * math.log1p(mu)) / mu, dtype)


def linear_encode(x, bits: int = 8) -> torch.Tensor:
    """Uniformly quantise x in [-1, 1] to int64 levels in [0, 2**bits - 1]."""
    levels = 2 ** _check_bits(bits)
    return _grid_encode(_as_float64(x), levels)


def linear_decode(q, bits: int = 8, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `linear_encode`: int levels -> float waveform in [-1, 1] (float32 by default)."""
    levels = 2 ** _check_bits(bits)
    return _to_tensor(_grid_decode(_as_levels(q, levels), levels), dtype)


class Quantizer:
    """A waveform quantiser: `encode(x) -> int64 levels`, `decode(q) -> float32 waveform`.

    kind: 'mu_law' (default, mu = levels - 1) or 'linear'; bits: 1..16 (8 -> 256 levels).
    `zero_level` is the level of silence (levels // 2, i.e. 128 for 8 bits).
    """

    def __init__(self, kind: str = "mu_law", bits: int = 8, mu: float | None = None):
        kind = quantization_kind(kind)
        if mu is not None and kind != "mu_law":
            raise ValueError("mu only applies to kind='mu_law'")
        self.kind = kind
        self.bits = _check_bits(bits)
        self.levels = 2 ** self.bits
        self.mu = _check_mu(mu, self.levels) if kind == "mu_law" else None

    @property
    def zero_level(self) -> int:
        """The level that silence (x = 0) encodes to: levels // 2."""
        return self.levels // 2

    def encode(self, x) -> torch.Tensor:
        if self.kind == "mu_law":
            return mu_law_encode(x, self.bits, self.mu)
        return linear_encode(x, self.bits)

    def decode(self, q, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.kind == "mu_law":
            return mu_law_decode(q, self.bits, self.mu, dtype=dtype)
        return linear_decode(q, self.bits, dtype=dtype)

    __call__ = encode

    def __repr__(self) -> str:
        mu = "" if self.kind != "mu_law" or self.mu == self.levels - 1 else f", mu={self.mu:g}"
        return f"Quantizer(kind={self.kind!r}, bits={self.bits}{mu})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Quantizer) and (self.kind, self.bits, self.mu) == (other.kind, other.bits, other.mu)

    def __hash__(self) -> int:
        return hash((self.kind, self.bits, self.mu))
