"""S4D: the diagonal SSM kernel (`SSMKernelDiag`), kernel by a log-Vandermonde product."""

from __future__ import annotations

import numpy as np
import torch

from . import ops
from .discretize import discretize_bilinear_diag, discretize_zoh
from .hippo import DIAG_INITS, diagonal_init, split_inits
from .ssm_base import SSMKernel, _as_complex, _as_real, _seeded_numpy_rng, inverse_positive

DIAG_DISCRETIZATIONS = ("zoh", "bilinear", "dss")


class SSMKernelDiag(SSMKernel):
    """S4D: diagonal state matrix A = diag(Lambda), kernel by a log-Vandermonde product.

    disc: 'zoh' (dA = exp(dt Lambda)), 'bilinear', or 'dss' (DSS-exp: kernel normalised over
    its length L, for which real parts may be positive with real_transform='none').
    is_real: a real-valued SSM (Lambda, B, C real; N real modes; an EMA-like model).
    """

    def __init__(self, d_model: int, d_state: int = 64, channels: int = 1, init="diag-lin", disc: str = "zoh",
                 is_real: bool = False, **kwargs):
        super().__init__(d_model, d_state, channels, **kwargs)
        if disc not in DIAG_DISCRETIZATIONS:
            raise ValueError(f"unknown disc {disc!r}; expected one of {DIAG_DISCRETIZATIONS}")
        self.disc, self.is_real = disc, is_real
        if is_real:
            self.n = d_state  # N real modes, each stored as a complex number with zero imaginary part
        rng = _seeded_numpy_rng()
        names = split_inits(init, self.n_ssm)
        Lambdas, Bs = [], []
        for name in names:
            name = name if name.startswith("diag") else {"legs": "diag-legs"}.get(name, name)
            if name not in DIAG_INITS:
                raise ValueError(f"unknown init {name!r} for mode='diag'; expected one of {DIAG_INITS}")
            Lam, B = diagonal_init(name, 2 * self.n, rng)
            Lambdas.append(Lam)
            Bs.append(B)
        Lambda = torch.as_tensor(np.stack(Lambdas), dtype=torch.complex64)  # (n_ssm, n)
        B = torch.as_tensor(np.stack(Bs), dtype=torch.complex64)
        C = torch.randn(channels, d_model, self.n, dtype=torch.complex64)
        if is_real:
            Lambda, B = Lambda.real + 0j, B.real + 0j
            C = C.real + 0j
        self._register("Lambda_re", inverse_positive(-Lambda.real, self.real_transform), "A")
        if not is_real:
            self._register("Lambda_im", Lambda.imag.clone(), "A")
        self._register("B", _as_real(B), "B")
        self._register("C", _as_real(C), None)

    # ------------------------------------------------------------ discretisation
    def _discrete(self, rate=1.0, L=None):
        """(x, dB, C) with dA = exp(x): x = log dA (H, n), dB (H, n), C (channels, H, n)."""
        dt = self.dt(rate)[:, None]
        Lambda = self.Lambda()
        B = self._expand(_as_complex(self.B))
        C = _as_complex(self.C)
        if self.is_real:
            B, C = B.real + 0j, (C.real + 0j) / 2  # K = sum_n (no conjugate pair): fold the 1/2 into C
        if self.disc == "zoh":
            dA, dB = discretize_zoh(Lambda, B, dt)
            x = dt * Lambda
        elif self.disc == "bilinear":
            dA, dB = discretize_bilinear_diag(Lambda, B, dt)
            x = torch.log(dA)
        else:  # dss: dB = B (exp(dtA) - 1) / (Lambda (exp(dtA L) - 1)), the DSS-exp normalisation
            if L is None:
                raise ValueError("disc='dss' needs a kernel length")
            x = dt * Lambda
            grow = x.real > 0
            # growing modes use dB exp(x (L-1)) (finite), paired with the flipped kernel in forward()
            x_decay = torch.where(grow, -torch.ones_like(x), x)
            x_grow = torch.where(grow, x, torch.ones_like(x))
            dB_decay = B * torch.expm1(x_decay) / (Lambda * torch.expm1(x_decay * L))
            dB_grow = B * torch.expm1(x_grow) / (Lambda * (torch.exp(x_grow) - torch.exp(-x_grow * (L - 1))))
            dB = torch.where(grow, dB_grow, dB_decay)
        return x, dB, C

    def forward(self, L: int, state: torch.Tensor | None = None, rate: float = 1.0):
        """Kernel K (channels, H, L), and the state's contribution (B, channels, H, L) if a state is given."""
        x, dB, C = self._discrete(rate, L)
        self._last_L = L
        v = C * dB  # (C, H, n)
        grow = x.real > 0
        if self.disc == "dss" and bool(grow.any()):
            # growing modes: exp(x l) = exp(x (L-1)) exp(-x (L-1-l)); dB already carries exp(x (L-1))
            zero = torch.zeros_like(v)
            x_decaying = torch.where(grow, -x, x)  # every entry decays; masked entries carry v = 0
            K = ops.log_vandermonde(torch.where(grow, zero, v), x_decaying, L, backend=self.backend)
            K = K + ops.log_vandermonde(torch.where(grow, v, zero), x_decaying, L, backend=self.backend).flip(-1)
        else:
            K = ops.log_vandermonde(v, x, L, backend=self.backend)
        K_state = None
        if state is not None:
            self._check_state(state)
            # y_l = 2 Re C dA^{l+1} s
            v_state = C * (torch.exp(x) * state).unsqueeze(-3)  # (B, C, H, n)
            K_state = ops.log_vandermonde(v_state, x, L, backend=self.backend)
        return K, K_state

    @torch.no_grad()
    def forward_state(self, u: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """State after consuming u (B, H, L) from `state`: dA^L s + sum_l dA^(L-1-l) dB u_l."""
        self._check_state(state)
        L = u.shape[-1]
        x, dB, _ = self._discrete(1.0, getattr(self, "_last_L", L))
        contribution = ops.log_vandermonde_transpose(u.flip(-1), dB, x, L, backend=self.backend)
        return torch.exp(x * L) * state + contribution

    # ------------------------------------------------------------ recurrence
    def setup_step(self, mode: str = "linear", L: int | None = None):
        if mode not in ("linear", "diagonal", "dense"):
            raise ValueError(f"unknown step mode {mode!r} for S4D; expected 'linear'")
        if self.disc == "dss" and L is None and not hasattr(self, "_last_L"):
            raise ValueError("disc='dss' normalises by the kernel length: run forward once or pass L")
        with torch.no_grad():
            x, dB, C = self._discrete(1.0, L or getattr(self, "_last_L", None))
            self._step = {"dA": torch.exp(x), "dB": dB, "C": C}

    def step(self, u: torch.Tensor, state: torch.Tensor):
        """u (B, H) -> y (B, channels, H), next state (B, H, n)."""
        s = self._step
        state = s["dA"] * state + s["dB"] * u.unsqueeze(-1)
        y = 2 * (s["C"] * state.unsqueeze(-3)).sum(-1).real
        return y, state
