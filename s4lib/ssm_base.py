"""Shared base of the SSM convolution kernels: dt, optimiser marks, shapes, state format, helpers.

A kernel module maps its parameters to the convolution kernel K (channels, H, L), and
runs the same system as a recurrence: `setup_step()`, `default_state(*batch)`,
`step(u, state) -> (y, state)`. States are (*batch, H, n) complex, n = N/2 (one coordinate
per conjugate pair; see s4lib.hippo), and y = 2 Re(C . x). The two kernels are
s4lib.ssm_diag.SSMKernelDiag (S4D) and s4lib.ssm_dplr.SSMKernelDPLR (S4).

Parameters of A (Lambda, P, Q), B and dt carry optimiser marks (`p._optim`), read by
s4lib.optim: by default lr 1e-3 and no weight decay.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops

REAL_TRANSFORMS = ("exp", "softplus", "relu", "none")


def positive(param: torch.Tensor, transform: str) -> torch.Tensor:
    """Map an unconstrained parameter to the (positive) magnitude -Re(Lambda)."""
    if transform == "exp":
        return torch.exp(param)
    if transform == "softplus":
        return F.softplus(param)
    if transform == "relu":
        return F.relu(param) + 1e-4
    if transform == "none":
        return param
    raise ValueError(f"unknown real_transform {transform!r}; expected one of {REAL_TRANSFORMS}")


def inverse_positive(value: torch.Tensor, transform: str) -> torch.Tensor:
    value = value.clamp(min=1e-4)
    if transform == "exp":
        return torch.log(value)
    if transform == "softplus":
        return value + torch.log(-torch.expm1(-value))  # log(exp(v) - 1), stable
    if transform in ("relu", "none"):
        return value
    raise ValueError(f"unknown real_transform {transform!r}; expected one of {REAL_TRANSFORMS}")


def _as_real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t.resolve_conj()).clone()


def _as_complex(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_complex(t if t.stride(-1) == 1 and t.stride(-2) == 2 else t.contiguous())


def _seeded_numpy_rng() -> np.random.Generator:
    """numpy RNG seeded from torch's, so torch.manual_seed controls every init."""
    return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))


class SSMKernel(nn.Module):
    """Shared parts: dt, C, optimiser marks, shape bookkeeping.

    d_model (H): independent channels; d_state (N): true state size (n = N/2 complex pairs);
    channels: number of output channels per input channel (the SSM is 1-in, channels-out);
    n_ssm: number of trainable (A, B) copies shared across the H channels (must divide H;
    channel h uses copy h mod n_ssm); None means H.
    """

    def __init__(self, d_model: int, d_state: int = 64, channels: int = 1, n_ssm: int | None = None,
                 dt_min: float = 1e-3, dt_max: float = 1e-1, lr=1e-3, real_transform: str = "exp",
                 backend: str | None = None):
        super().__init__()
        if not (isinstance(d_model, int) and d_model > 0):
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        if not (isinstance(d_state, int) and d_state >= 2 and d_state % 2 == 0):
            raise ValueError(f"d_state must be an even int >= 2 (states come in conjugate pairs), got {d_state!r}")
        if not (0 < dt_min <= dt_max):
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        n_ssm = d_model if n_ssm is None else n_ssm
        if not (isinstance(n_ssm, int) and n_ssm > 0 and d_model % n_ssm == 0):
            raise ValueError(f"n_ssm must be a positive divisor of d_model={d_model}, got {n_ssm!r}")
        if real_transform not in REAL_TRANSFORMS:
            raise ValueError(f"unknown real_transform {real_transform!r}; expected one of {REAL_TRANSFORMS}")
        if backend is not None:
            ops.dispatch.resolve_name(backend)  # validate early
        # import / build the kernel backend now, not inside a later torch.compile trace
        ops.dispatch.prepare(backend)
        self.H, self.N, self.n = d_model, d_state, d_state // 2
        self.channels, self.n_ssm = channels, n_ssm
        self.repeat = d_model // n_ssm
        self.real_transform = real_transform
        self.backend = backend
        self.lr = lr

        # dt: log-uniform in [dt_min, dt_max], one per channel
        log_dt = torch.rand(d_model) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        self._register("log_dt", log_dt, "dt")

    # ---------------------------------------------------------------- registration
    def _lr_for(self, key):
        if isinstance(self.lr, dict):
            return self.lr.get(key)
        return self.lr

    def _register(self, name, tensor, key):
        """Trainable parameter with an optimiser mark, or a buffer when its lr is 0."""
        lr = self._lr_for(key) if key is not None else None
        if lr == 0.0:
            self.register_buffer(name, tensor)
            return
        self.register_parameter(name, nn.Parameter(tensor))
        if key is not None:
            mark = {"weight_decay": 0.0}
            if lr is not None:
                mark["lr"] = lr
            getattr(self, name)._optim = mark

    # ---------------------------------------------------------------- parameters
    def dt(self, rate: float = 1.0) -> torch.Tensor:
        return torch.exp(self.log_dt) * rate  # (H,)

    def _expand(self, t: torch.Tensor) -> torch.Tensor:
        """(..., n_ssm, n) -> (..., H, n): channel h uses SSM copy h mod n_ssm."""
        if self.repeat == 1:
            return t
        reps = [1] * (t.dim() - 2) + [self.repeat, 1]
        return t.repeat(*reps)

    def Lambda(self) -> torch.Tensor:
        """Diagonal of A (or of its diagonal part), (H, n) complex."""
        real = -positive(self.Lambda_re, self.real_transform)
        Lambda = torch.complex(real, self.Lambda_im) if hasattr(self, "Lambda_im") else torch.complex(real, torch.zeros_like(real))
        return self._expand(Lambda)

    @property
    def complex_dtype(self):
        return torch.complex128 if self.log_dt.dtype == torch.float64 else torch.complex64

    def default_state(self, *batch_shape, device=None) -> torch.Tensor:
        device = device if device is not None else self.log_dt.device
        return torch.zeros(*batch_shape, self.H, self.n, dtype=self.complex_dtype, device=device)

    def _check_state(self, state, batch_shape=None):
        if not isinstance(state, torch.Tensor) or not state.is_complex():
            raise TypeError(f"state must be a complex tensor (*batch, H={self.H}, n={self.n}) as made by "
                            f"default_state(), got {getattr(state, 'dtype', type(state).__name__)}")
        if state.shape[-2:] != (self.H, self.n) or (batch_shape is not None and state.shape[:-2] != batch_shape):
            expected = f"({', '.join(map(str, batch_shape)) + ', ' if batch_shape else '*batch, '}H={self.H}, n={self.n})"
            raise ValueError(f"state must have shape {expected}, got {tuple(state.shape)}")

    def extra_repr(self):
        return f"H={self.H}, N={self.N}, channels={self.channels}, n_ssm={self.n_ssm}"
