"""Discretisation of continuous SSMs, and the real (dense) view of a DPLR state matrix.

Half-coordinate convention (see s4lib.hippo): a state of true size N = 2n is n complex
numbers x; the real state is xi = [Re x, Im x]. With A = Lambda - P Q^* on the full
conjugate-pair space, its action on half coordinates is R-linear:

    (A x) = Lambda * x - sum_r P_r * 2 Re(Q_r^H x)

and an output y = 2 Re(C . x) is the real functional c = 2 [Re C, -Im C] on xi.
"""

from __future__ import annotations

import math

import torch


# --------------------------------------------------------------------------- diagonal (S4D)

def discretize_zoh(Lambda: torch.Tensor, B: torch.Tensor, dt: torch.Tensor):
    """Zero-order hold for diagonal A: dA = exp(dt Lambda), dB = (exp(dt Lambda) - 1)/Lambda * B."""
    dtA = dt * Lambda
    return torch.exp(dtA), torch.expm1(dtA) / Lambda * B


def discretize_bilinear_diag(Lambda: torch.Tensor, B: torch.Tensor, dt: torch.Tensor):
    """Bilinear (Tustin) for diagonal A: dA = (1 + dt Lambda/2)/(1 - dt Lambda/2), dB = dt B/(1 - dt Lambda/2)."""
    dtA = dt * Lambda
    denom = 1 - dtA / 2
    return (1 + dtA / 2) / denom, dt * B / denom


# --------------------------------------------------------------------------- real views

def complex_to_real_state(x: torch.Tensor) -> torch.Tensor:
    """(..., n) complex -> (..., 2n) real [Re x, Im x]."""
    return torch.cat([x.real, x.imag], dim=-1)


def real_to_complex_state(xi: torch.Tensor) -> torch.Tensor:
    n = xi.shape[-1] // 2
    return torch.complex(xi[..., :n], xi[..., n:])


def output_functional(C: torch.Tensor) -> torch.Tensor:
    """y = 2 Re(C . x) as a real functional c on xi: c = 2 [Re C, -Im C]."""
    return 2 * torch.cat([C.real, -C.imag], dim=-1)


def functional_to_complex(c: torch.Tensor) -> torch.Tensor:
    n = c.shape[-1] // 2
    return torch.complex(c[..., :n] / 2, -c[..., n:] / 2)


def dplr_real_matrix(Lambda: torch.Tensor, P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """The real (H, 2n, 2n) matrix of A = Lambda - P Q^* acting on xi = [Re x, Im x].

    Lambda: (H, n); P, Q: (r, H, n).
    """
    a, b = Lambda.real, Lambda.imag
    top = torch.cat([torch.diag_embed(a), torch.diag_embed(-b)], dim=-1)
    bottom = torch.cat([torch.diag_embed(b), torch.diag_embed(a)], dim=-1)
    A = torch.cat([top, bottom], dim=-2)
    p = complex_to_real_state(P)  # (r, H, 2n)
    q = complex_to_real_state(Q)
    return A - 2 * torch.einsum("rhi,rhj->hij", p, q)


def bilinear_dense(A: torch.Tensor, B: torch.Tensor, dt: torch.Tensor):
    """Bilinear discretisation of a dense real system: dA = (I - dt/2 A)^-1 (I + dt/2 A), dB = (I - dt/2 A)^-1 dt B.

    A: (H, M, M); B: (H, M); dt: (H,).
    """
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    half = (dt / 2)[:, None, None] * A
    lhs = eye - half
    dA = torch.linalg.solve(lhs, eye + half)
    dB = torch.linalg.solve(lhs, (dt[:, None] * B).unsqueeze(-1)).squeeze(-1)
    return dA, dB


# --------------------------------------------------------------------------- FFT nodes

_node_cache: dict = {}


def bilinear_nodes(L: int, dtype: torch.dtype, device: torch.device):
    """Nodes for the DPLR generating function at the roots of unity omega_k = exp(-2 pi i k / L).

    Returns (z, scale, has_minus_one): z_k = 2 (1 - omega_k)/(1 + omega_k) = 2 i tan(pi k / L) and
    scale_k = 2/(1 + omega_k), for k = 0 .. L//2 excluding omega = -1 (k = L/2 when L is even,
    where 1 + omega = 0; the caller treats that node exactly). Computed in float64, then cast.
    """
    key = (L, dtype, device)
    if key not in _node_cache:
        m = L // 2 + 1
        has_minus_one = L % 2 == 0
        k = torch.arange(m - 1 if has_minus_one else m, dtype=torch.float64)
        theta = math.pi * k / L  # half angle
        z = torch.complex(torch.zeros_like(theta), 2 * torch.tan(theta))
        # 2/(1 + e^{-2 i theta}) = e^{i theta}/cos(theta)
        scale = torch.complex(torch.cos(theta), torch.sin(theta)) / torch.cos(theta)
        if len(_node_cache) > 64:
            _node_cache.clear()
        _node_cache[key] = (z.to(device=device, dtype=dtype), scale.to(device=device, dtype=dtype), has_minus_one)
    return _node_cache[key]


def krylov_dense(dA: torch.Tensor, dB: torch.Tensor, T: int) -> torch.Tensor:
    """[dB, dA dB, ..., dA^{T-1} dB] as (H, M, T) by doubling (log2 T matrix products)."""
    G = dB.unsqueeze(-1)  # (H, M, 1)
    power = dA
    while G.shape[-1] < T:
        G = torch.cat([G, power @ G], dim=-1)
        power = power @ power
    return G[..., :T]
