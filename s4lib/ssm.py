"""SSM convolution kernels: diagonal S4D (`SSMKernelDiag`) and diagonal-plus-low-rank S4 (`SSMKernelDPLR`).

A kernel module maps its parameters to the convolution kernel K (channels, H, L), and
runs the same system as a recurrence: `setup_step()`, `default_state(*batch)`,
`step(u, state) -> (y, state)`. States are (*batch, H, n) complex, n = N/2 (one coordinate
per conjugate pair; see s4lib.hippo), and y = 2 Re(C . x).

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
from .discretize import (
    bilinear_dense,
    bilinear_nodes,
    complex_to_real_state,
    discretize_bilinear_diag,
    discretize_zoh,
    dplr_real_matrix,
    functional_to_complex,
    krylov_dense,
    output_functional,
    real_to_complex_state,
)
from .hippo import DIAG_INITS, DPLR_INITS, diagonal_init, dplr_init, split_inits

REAL_TRANSFORMS = ("exp", "softplus", "relu", "none")
DIAG_DISCRETIZATIONS = ("zoh", "bilinear", "dss")
DPLR_STEP_MODES = ("linear", "dense")


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


class SSMKernelDPLR(SSMKernel):
    """S4: A = diag(Lambda) - P Q^*, bilinear discretisation, kernel by Cauchy products + Woodbury.

    hurwitz=True (default, SaShiMi): Q = P and Re Lambda = -transform(param) < 0, so
    A + A^* = 2 Re Lambda - 2 P P^* < 0 and every eigenvalue of A is in the open left half
    plane for any parameter value; hurwitz=False trains Q separately (original S4).

    The C parameter holds C~ = (I - dA^L)^T C for the current kernel length L (buffer
    l_kernel; 0 means "not attuned yet": C is then the plain C). The generating function at
    the L-th roots of unity gives the length-L kernel exactly for C~. A longer input doubles
    L (C~ <- (I + dA^L)^T C~). setup_step() recovers C by a float64 solve.
    """

    def __init__(self, d_model: int, d_state: int = 64, channels: int = 1, init="legs", rank: int = 1,
                 hurwitz: bool = True, l_max: int | None = None, **kwargs):
        super().__init__(d_model, d_state, channels, **kwargs)
        if not (isinstance(rank, int) and rank >= 1):
            raise ValueError(f"rank must be an int >= 1, got {rank!r}")
        if hurwitz and self.real_transform == "none":
            raise ValueError("hurwitz=True needs a real_transform that keeps Re(Lambda) < 0 "
                             "('exp', 'softplus' or 'relu'), got 'none'")
        self.rank, self.hurwitz, self.l_max = rank, hurwitz, l_max
        rng = _seeded_numpy_rng()
        Lambdas, Ps, Bs = [], [], []
        for name in split_inits(init, self.n_ssm):
            if name not in DPLR_INITS + DIAG_INITS:
                raise ValueError(f"unknown init {name!r} for mode='dplr'; expected one of {DPLR_INITS + DIAG_INITS}")
            Lam, P, B = dplr_init(name, d_state, rank, rng)
            Lambdas.append(Lam)
            Ps.append(P)
            Bs.append(B)
        Lambda = torch.as_tensor(np.stack(Lambdas), dtype=torch.complex64)  # (n_ssm, n)
        P = torch.as_tensor(np.stack(Ps, axis=1), dtype=torch.complex64)  # (rank, n_ssm, n)
        B = torch.as_tensor(np.stack(Bs), dtype=torch.complex64)
        C = torch.randn(channels, d_model, self.n, dtype=torch.complex64)
        self._register("Lambda_re", inverse_positive(-Lambda.real, self.real_transform), "A")
        self._register("Lambda_im", Lambda.imag.clone(), "A")
        self._register("P", _as_real(P), "A")
        if not hurwitz:
            self._register("Q", _as_real(P), "A")
        self._register("B", _as_real(B), "B")
        self._register("C", _as_real(C), None)
        self.register_buffer("l_kernel", torch.tensor(0))
        # the same length as a Python int: reading the buffer with .item() in forward would make the
        # FFT size data-dependent and break torch.compile(fullgraph=True); kept in sync by
        # _attune_C and by loading a state dict
        self._l_kernel_int = 0
        self.register_load_state_dict_post_hook(SSMKernelDPLR._sync_l_kernel)

    @staticmethod
    def _sync_l_kernel(module, incompatible_keys=None):
        module._l_kernel_int = int(module.l_kernel)

    # ------------------------------------------------------------ parameters
    def PQ(self):
        P = self._expand(_as_complex(self.P))  # (r, H, n)
        Q = P if self.hurwitz else self._expand(_as_complex(self.Q))
        return P, Q

    def apply_A(self, x, Lambda, P, Q):
        """A x on half coordinates: Lambda x - sum_r P_r 2 Re(Q_r^H x). x: (..., H, n)."""
        q = 2 * (Q.conj() * x.unsqueeze(-3)).sum(-1).real  # (..., r, H)
        return Lambda * x - (P * q.unsqueeze(-1)).sum(-3)

    def dense_system(self, rate: float = 1.0, dtype=None):
        """Real (dA (H, N, N), dB (H, N)) of the bilinear discretisation, in `dtype` (default float64)."""
        dtype = dtype or torch.float64
        cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        P, Q = self.PQ()
        A = dplr_real_matrix(self.Lambda().to(cdtype), P.to(cdtype), Q.to(cdtype))
        B = complex_to_real_state(self._expand(_as_complex(self.B)).to(cdtype))
        return bilinear_dense(A, B, self.dt(rate).to(dtype))

    # ------------------------------------------------------------ kernel length
    @torch.no_grad()
    def _attune_C(self, L: int):
        """Set C~ for length L (first use), or double the current length."""
        current = self._l_kernel_int
        dA, _ = self.dense_system()
        c = output_functional(_as_complex(self.C).to(torch.complex128))  # (C, H, N)
        dA_L = torch.linalg.matrix_power(dA, current if current > 0 else L)
        prod = torch.einsum("hji,chj->chi", dA_L, c)  # (dA^L)^T c
        if current == 0:
            c_new, new_length = c - prod, L
        else:
            c_new, new_length = c + prod, 2 * current
        self.C.copy_(_as_real(functional_to_complex(c_new).to(self.complex_dtype)))
        self.l_kernel.fill_(new_length)
        self._l_kernel_int = new_length

    def _kernel_length(self, L: int, rate: float) -> int:
        if self._l_kernel_int == 0 and self.l_max:
            self._attune_C(int(self.l_max))
        continuous_L = round(rate * L)
        while continuous_L > self._l_kernel_int:
            self._attune_C(continuous_L)
        return max(L, round(self._l_kernel_int / rate))

    # ------------------------------------------------------------ convolution mode
    def forward(self, L: int, state: torch.Tensor | None = None, rate: float = 1.0):
        """Kernel K (channels, H, L), and the state's contribution (B, channels, H, L) if a state is given."""
        discrete_L = self._kernel_length(L, rate)
        dt = self.dt(rate)[:, None]  # (H, 1)
        Lambda = self.Lambda()
        P, Q = self.PQ()
        B = self._expand(_as_complex(self.B))
        C = _as_complex(self.C)
        right = [B.unsqueeze(0), P]
        n_state = 0
        if state is not None:
            self._check_state(state)
            state = state.reshape(-1, self.H, self.n)
            n_state = state.shape[0]
            # y_l = C dA^{l+1} s has generating function C~ (I - dA w)^{-1} dA s, which equals the
            # B-kernel formula with B replaced by (I + dt/2 A) s / dt.
            B_state = state / dt + self.apply_A(state, Lambda, P, Q) / 2
            right.insert(0, B_state)
        right = torch.cat(right, dim=0)  # (S + 1 + r, H, n)
        left = torch.cat([C, Q.conj()], dim=0)  # (C + r, H, n)
        v = left.unsqueeze(1) * right.unsqueeze(0) * dt  # (C + r, S + 1 + r, H, n)
        z, scale, has_minus_one = bilinear_nodes(discrete_L, v.dtype, v.device)
        r = ops.cauchy(v, z, dt * Lambda, backend=self.backend)  # (C + r, S + 1 + r, H, L')
        ch, m = self.channels, n_state + 1
        # split (not slicing): its backward concatenates instead of filling zeros of r's size per slice
        r_C, r_Q = r.split([ch, self.rank], dim=0)
        k00, k01 = r_C.split([m, self.rank], dim=1)
        k10, k11 = r_Q.split([m, self.rank], dim=1)
        if self.rank == 1:
            k = k00 - k01 * k10 / (1 + k11)
        else:
            # k00 - k01 (I + k11)^{-1} k10, with the rank index as matrix dimension
            eye = torch.eye(self.rank, dtype=r.dtype, device=r.device)
            lhs = eye + k11.permute(2, 3, 0, 1)  # (H, L', r, r)
            sol = torch.linalg.solve(lhs, k10.permute(2, 3, 0, 1))  # (H, L', r, m)
            k = k00 - torch.einsum("cshl,hlsm->cmhl", k01, sol)
        k = k * scale
        if has_minus_one:
            # omega = -1: K^(-1) = (dt/2) C~_full . B_full = Re(sum_n v) exactly
            k = torch.cat([k, v[:ch, :m].sum(-1).real.to(k.dtype).unsqueeze(-1)], dim=-1)
        K = torch.fft.irfft(k, n=discrete_L)[..., :L]  # (C, S + 1, H, L)
        K_state = K[:, :n_state].transpose(0, 1) if state is not None else None
        return K[:, n_state], K_state

    @torch.no_grad()
    def forward_state(self, u: torch.Tensor, state: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """State after consuming u (B, H, L) from `state`, exactly, in O(H N L) work per sequence.

        Chunks of T steps: x <- dA^T x + [dB, dA dB, ..., dA^(T-1) dB] @ reversed(u_chunk).
        """
        self._check_state(state)
        dtype = u.dtype if u.dtype in (torch.float32, torch.float64) else torch.float32
        dA, dB = self.dense_system(dtype=torch.float64)
        L = u.shape[-1]
        T = min(chunk, L)
        G = krylov_dense(dA, dB, T).to(dtype)  # (H, N, T)
        dA_T = torch.linalg.matrix_power(dA, T).to(dtype)
        xi = complex_to_real_state(state).to(dtype)  # (B, H, N)
        for start in range(0, L, T):
            piece = u[..., start:start + T].to(dtype)
            t = piece.shape[-1]
            if t < T:  # last, shorter chunk
                dA_t = torch.linalg.matrix_power(dA, t).to(dtype)
                xi = torch.einsum("hij,bhj->bhi", dA_t, xi)
                xi = xi + torch.einsum("hit,bht->bhi", G[..., :t], piece.flip(-1))
            else:
                xi = torch.einsum("hij,bhj->bhi", dA_T, xi) + torch.einsum("hit,bht->bhi", G, piece.flip(-1))
        return real_to_complex_state(xi).to(state.dtype)

    # ------------------------------------------------------------ recurrence
    @torch.no_grad()
    def true_C(self) -> torch.Tensor:
        """C (channels, H, n) from the stored C~: solve (I - dA^L)^T c = c~ in float64."""
        C_tilde = _as_complex(self.C).to(torch.complex128)
        L = self._l_kernel_int
        if L == 0:
            return C_tilde
        dA, _ = self.dense_system()
        eye = torch.eye(self.N, dtype=torch.float64, device=dA.device)
        lhs = (eye - torch.linalg.matrix_power(dA, L)).transpose(-1, -2)  # (H, N, N)
        c = torch.linalg.solve(lhs, output_functional(C_tilde).transpose(0, 1).transpose(1, 2))  # (H, N, C)
        return functional_to_complex(c.permute(2, 0, 1))

    @torch.no_grad()
    def setup_step(self, mode: str = "linear"):
        """Precompute the recurrence. 'linear': O(N) per step via Woodbury (default); 'dense': O(N^2)."""
        if mode not in DPLR_STEP_MODES:
            raise ValueError(f"unknown step mode {mode!r} for S4 (DPLR); expected one of {DPLR_STEP_MODES} "
                             "('diagonal' is not offered: diagonalising dA is ill-conditioned)")
        cdtype = self.complex_dtype
        rdtype = self.log_dt.dtype
        C = self.true_C()
        if mode == "dense":
            dA, dB = self.dense_system()
            self._step = {"mode": mode, "dA": dA.to(rdtype), "dB": dB.to(rdtype),
                          "c": output_functional(C).to(rdtype)}
            return
        # x' = (I - dt/2 A)^{-1} [(I + dt/2 A) x + dt B u], both inverses by Woodbury in O(N r)
        dt = self.dt().to(torch.float64)[:, None]
        Lambda = self.Lambda().to(torch.complex128)
        P, Q = (t.to(torch.complex128) for t in self.PQ())
        B = self._expand(_as_complex(self.B)).to(torch.complex128)
        F_ = 1 / (1 - dt / 2 * Lambda)  # (H, n)
        # M0[h, r, s] = 2 Re sum_n conj(Q_r) F P_s ; M = (I + dt/2 M0)^{-1}
        M0 = 2 * torch.einsum("rhn,hn,shn->hrs", Q.conj(), F_, P).real
        eye = torch.eye(self.rank, dtype=torch.float64, device=M0.device)
        M = torch.linalg.inv(eye + dt[:, :, None] / 2 * M0)  # (H, r, r)
        self._step = {
            "mode": mode,
            "E": (1 + dt / 2 * Lambda).to(cdtype),
            "F": F_.to(cdtype),
            "dtB": (dt * B).to(cdtype),
            "Pd": (dt / 2 * P).to(cdtype),  # (r, H, n)
            "G": (dt / 2 * F_ * P).to(cdtype),  # (r, H, n)
            "Qc": Q.conj().to(cdtype),
            "M": M.to(rdtype),
            "C": C.to(cdtype),
        }

    def step(self, u: torch.Tensor, state: torch.Tensor):
        """u (B, H) -> y (B, channels, H), next state (B, H, n)."""
        s = self._step
        if s["mode"] == "dense":
            xi = complex_to_real_state(state)
            xi = torch.einsum("hij,bhj->bhi", s["dA"], xi) + s["dB"] * u.unsqueeze(-1)
            y = torch.einsum("chi,bhi->bch", s["c"], xi)
            return y, real_to_complex_state(xi)
        Qc = s["Qc"]
        q = 2 * (Qc * state.unsqueeze(-3)).sum(-1).real  # (B, r, H)
        y1 = s["E"] * state - (s["Pd"] * q.unsqueeze(-1)).sum(-3) + s["dtB"] * u.unsqueeze(-1)
        z = s["F"] * y1
        q2 = 2 * (Qc * z.unsqueeze(-3)).sum(-1).real  # (B, r, H)
        q3 = torch.einsum("hrs,bsh->brh", s["M"], q2)
        state = z - (s["G"] * q3.unsqueeze(-1)).sum(-3)
        y = 2 * (s["C"] * state.unsqueeze(-3)).sum(-1).real
        return y, state
