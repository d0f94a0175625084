"""Naive reference implementations of the kernel ops: the oracle every backend is tested against.

Each function materialises the full (..., N, L) tensor and lets autograd differentiate it.
They are short on purpose: a reader can check them against the equations in one glance.
All three take canonical, already-broadcast inputs; `s4lib.ops` handles shapes and dispatch.
"""

import torch


def cauchy_ref(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Conjugate-symmetric Cauchy product.

    r[..., k] = sum_n v[..., n] / (z[k] - w[..., n]) + conj(v[..., n]) / (z[k] - conj(w[..., n]))

    v, w: (..., N) complex; z: (L,) complex. Returns (..., L) complex.
    """
    zk = z.unsqueeze(-2)  # (1, L)
    vn, wn = v.unsqueeze(-1), w.unsqueeze(-1)  # (..., N, 1)
    r = vn / (zk - wn) + vn.conj() / (zk - wn.conj())
    return r.sum(dim=-2)


def log_vandermonde_ref(v: torch.Tensor, x: torch.Tensor, L: int) -> torch.Tensor:
    """Log-Vandermonde product (the S4D kernel).

    K[..., l] = 2 * Re( sum_n v[..., n] * exp(x[..., n] * l) ),  l = 0 .. L-1

    v, x: (..., N) complex. Returns (..., L) real.
    """
    l = torch.arange(L, device=x.device, dtype=x.real.dtype)
    vandermonde = torch.exp(x.unsqueeze(-1) * l)  # (..., N, L)
    return 2 * (v.unsqueeze(-1) * vandermonde).sum(dim=-2).real


def log_vandermonde_transpose_ref(u: torch.Tensor, v: torch.Tensor, x: torch.Tensor, L: int) -> torch.Tensor:
    """Transposed log-Vandermonde product (state forwarding for S4D).

    r[..., n] = v[..., n] * sum_l u[..., l] * exp(x[..., n] * l),  l = 0 .. L-1

    u: (..., L) real; v, x: (..., N) complex. Returns (..., N) complex.
    """
    l = torch.arange(L, device=x.device, dtype=x.real.dtype)
    vandermonde = torch.exp(x.unsqueeze(-1) * l)  # (..., N, L)
    return v * (vandermonde * u.unsqueeze(-2).to(vandermonde.dtype)).sum(dim=-1)
