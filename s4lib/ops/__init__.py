"""Kernel ops behind the SSM convolution kernels: Cauchy (S4/DPLR) and log-Vandermonde (S4D).

    cauchy(v, z, w)                         r[..., k] = sum_n v/(z_k - w) + conj(v)/(z_k - conj(w))
    log_vandermonde(v, x, L)                K[..., l] = 2 Re sum_n v exp(x l)
    log_vandermonde_transpose(u, v, x, L)   r[..., n] = v sum_l u_l exp(x l)

The leading (batch) dimensions of v and w (resp. v and x, and u) broadcast against each
other. `backend` is one of 'auto', 'naive', 'chunked', 'keops', 'native'; None reads the
environment variable S4LIB_BACKEND (default 'auto'). See `s4lib.ops.dispatch`.
"""

from __future__ import annotations

import torch

from .dispatch import BACKEND_NAMES, available_backends, backend_status, call
from .reference import cauchy_ref, log_vandermonde_ref, log_vandermonde_transpose_ref

__all__ = [
    "cauchy",
    "log_vandermonde",
    "log_vandermonde_transpose",
    "available_backends",
    "backend_status",
    "BACKEND_NAMES",
    "cauchy_ref",
    "log_vandermonde_ref",
    "log_vandermonde_transpose_ref",
]


def _check_complex(name, t, ndim_min=1):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_complex():
        raise TypeError(f"{name} must be complex (complex64 or complex128), got {t.dtype}")
    if t.dim() < ndim_min:
        raise ValueError(f"{name} must have at least {ndim_min} dimension(s) (..., N), got shape {tuple(t.shape)}")


def _check_same(names, tensors):
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        raise TypeError(f"{', '.join(names)} must share one complex dtype, got {[t.dtype for t in tensors]}")
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"{', '.join(names)} must be on one device, got {[str(t.device) for t in tensors]}")


def _broadcast_flat(a, b, names):
    """Broadcast the batch dims of two (..., N) tensors; return (B, N) views and the batch shape."""
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"{names[0]} and {names[1]} must have the same last dimension N, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    try:
        batch = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    except RuntimeError:
        raise ValueError(f"batch dimensions of {names[0]} {tuple(a.shape)} and {names[1]} {tuple(b.shape)} "
                         f"do not broadcast") from None
    N = a.shape[-1]
    if N < 1:
        raise ValueError(f"{names[0]} and {names[1]} need a state dimension N >= 1, got shapes "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    a = a.expand(*batch, N).reshape(-1, N).contiguous()
    b = b.expand(*batch, N).reshape(-1, N).contiguous()
    return a, b, batch


def _check_length(L):
    if isinstance(L, bool) or not isinstance(L, int) or L < 1:
        raise ValueError(f"L must be a positive int, got {L!r}")


def cauchy(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Conjugate-symmetric Cauchy product. v, w: (..., N); z: (L,). Returns (..., L) complex."""
    _check_complex("v", v)
    _check_complex("w", w)
    _check_complex("z", z)
    if z.dim() != 1 or z.shape[0] < 1:
        raise ValueError(f"z must be 1-D (L,) with L >= 1 nodes, got shape {tuple(z.shape)}")
    _check_same(("v", "z", "w"), (v, z, w))
    v2, w2, batch = _broadcast_flat(v, w, ("v", "w"))
    z = z.contiguous()
    r = call("cauchy", backend, (v2, z, w2))
    return r.reshape(*batch, z.shape[0])


def log_vandermonde(v: torch.Tensor, x: torch.Tensor, L: int, backend: str | None = None) -> torch.Tensor:
    """K[..., l] = 2 Re sum_n v exp(x l) for l < L. v, x: (..., N) complex. Returns (..., L) real."""
    _check_complex("v", v)
    _check_complex("x", x)
    _check_length(L)
    _check_same(("v", "x"), (v, x))
    v2, x2, batch = _broadcast_flat(v, x, ("v", "x"))
    K = call("log_vandermonde", backend, (v2, x2), L)
    return K.reshape(*batch, L)


def log_vandermonde_transpose(u: torch.Tensor, v: torch.Tensor, x: torch.Tensor, L: int | None = None,
                              backend: str | None = None) -> torch.Tensor:
    """r[..., n] = v sum_l u_l exp(x l). u: (..., L) real; v, x: (..., N) complex. Returns (..., N) complex."""
    _check_complex("v", v)
    _check_complex("x", x)
    _check_same(("v", "x"), (v, x))
    if not isinstance(u, torch.Tensor) or u.is_complex() or not u.is_floating_point():
        raise TypeError(f"u must be a real floating tensor (..., L), got "
                        f"{u.dtype if isinstance(u, torch.Tensor) else type(u).__name__}")
    if u.dim() < 1:
        raise ValueError(f"u must have shape (..., L), got {tuple(u.shape)}")
    if L is None:
        L = u.shape[-1]
    _check_length(L)
    if u.shape[-1] != L:
        raise ValueError(f"u must have last dimension L={L}, got shape {tuple(u.shape)}")
    if u.device != v.device:
        raise ValueError(f"u and v must be on one device, got {u.device} and {v.device}")
    u = u.to(v.real.dtype)
    N = v.shape[-1]
    if N < 1:
        raise ValueError(f"v and x need a state dimension N >= 1, got shape {tuple(v.shape)}")
    if x.shape[-1] != N:
        raise ValueError(f"v and x must have the same last dimension N, got {tuple(v.shape)} and {tuple(x.shape)}")
    try:
        batch = torch.broadcast_shapes(u.shape[:-1], v.shape[:-1], x.shape[:-1])
    except RuntimeError:
        raise ValueError(f"batch dimensions of u {tuple(u.shape)}, v {tuple(v.shape)} and x {tuple(x.shape)} "
                         f"do not broadcast") from None
    u2 = u.expand(*batch, L).reshape(-1, L).contiguous()
    v2 = v.expand(*batch, N).reshape(-1, N).contiguous()
    x2 = x.expand(*batch, N).reshape(-1, N).contiguous()
    r = call("log_vandermonde_transpose", backend, (u2, v2, x2), L)
    return r.reshape(*batch, N)
