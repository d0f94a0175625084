"""S4: the diagonal-plus-low-rank SSM kernel (`SSMKernelDPLR`), kernel by Cauchy products + Woodbury."""

from __future__ import annotations

import numpy as np
import torch

from . import ops
from .discretize import (
    bilinear_dense,
    bilinear_nodes,
    complex_to_real_state,
    dplr_real_matrix,
    functional_to_complex,
    krylov_dense,
    output_functional,
    real_to_complex_state,
)
from .hippo import DIAG_INITS, DPLR_INITS, dplr_init, split_inits
from .ssm_base import SSMKernel, _as_complex, _as_real, _seeded_numpy_rng, inverse_positive

DPLR_STEP_MODES = ("linear", "dense")


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
