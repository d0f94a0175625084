"""The kernel ops as torch custom ops (torch.library): fake implementations and autograd included.

    s4lib::cauchy(v, z, w) -> r                                  (B, N), (L,), (B, N) -> (B, L)
    s4lib::cauchy_backward(grad, v, z, w, need_vw, need_z) -> (grad_v, grad_w, grad_z)
    s4lib::log_vandermonde(v, x, L) -> K                         (B, N) complex -> (B, L) real
    s4lib::vandermonde_moments(u, x, first_moment) -> (P0, P1)   P0 = sum_l u_l exp(x l), P1 = sum_l l u_l exp(x l)
    s4lib::log_vandermonde_transpose(u, v, x, L) -> r            r = v * P0

Inputs are canonical (2-D, contiguous, one complex dtype), as `s4lib.ops` hands them to backends.
CPU tensors run the compiled C++ kernels (built on first use, see native_build); CUDA tensors run
the Triton kernels (triton_kernels). Because the ops are opaque to torch.compile and have fake
implementations, compiled code calling them does not graph-break.

Gradients, in PyTorch's convention grad_x = conj(df/dx) g + (df/d conj x) conj(g):
    cauchy:            see kernels/cauchy_cpu.cpp
    log_vandermonde:   grad_v = 2 conj(P0(g)),  grad_x = 2 conj(v P1(g))
    transpose:         grad_u = log_vandermonde(v conj(g) / 2),  grad_v = conj(P0(u)) g,
                       grad_x = conj(v P1(u)) g
The backward ops are not themselves differentiable (no double backward); autograd raises if asked.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import native_build


def _cpu_ops():
    native_build.load()  # compiles once; raises RuntimeError with the reason if impossible
    return torch.ops.s4lib_cpu


def _triton():
    from . import triton_kernels

    return triton_kernels


def _empty_like_shape(t: Tensor, shape, dtype=None) -> Tensor:
    return t.new_empty(shape, dtype=dtype if dtype is not None else t.dtype)


# --- Cauchy -----------------------------------------------------------------------------------


@torch.library.custom_op("s4lib::cauchy", mutates_args=(), device_types="cpu")
def cauchy(v: Tensor, z: Tensor, w: Tensor) -> Tensor:
    return _cpu_ops().cauchy_forward(v, z, w)


@cauchy.register_kernel("cuda")
def _cauchy_cuda(v, z, w):
    return _triton().cauchy(v, z, w)


@cauchy.register_fake
def _cauchy_fake(v, z, w):
    return _empty_like_shape(v, (v.shape[0], z.shape[0]))


@torch.library.custom_op("s4lib::cauchy_backward", mutates_args=(), device_types="cpu")
def cauchy_backward(grad: Tensor, v: Tensor, z: Tensor, w: Tensor, need_vw: bool,
                    need_z: bool) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(_cpu_ops().cauchy_backward(grad, v, z, w, need_vw, need_z))


@cauchy_backward.register_kernel("cuda")
def _cauchy_backward_cuda(grad, v, z, w, need_vw, need_z):
    return _triton().cauchy_backward(grad, v, z, w, need_vw, need_z)


@cauchy_backward.register_fake
def _cauchy_backward_fake(grad, v, z, w, need_vw, need_z):
    vw_shape = tuple(v.shape) if need_vw else (0,)
    return (_empty_like_shape(v, vw_shape), _empty_like_shape(v, vw_shape),
            _empty_like_shape(v, (z.shape[0],) if need_z else (0,)))


def _cauchy_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _cauchy_autograd(ctx, grad):
    v, z, w = ctx.saved_tensors
    need_v, need_z, need_w = ctx.needs_input_grad
    grad_v, grad_w, grad_z = torch.ops.s4lib.cauchy_backward(grad, v, z, w, need_v or need_w, need_z)
    return (grad_v if need_v else None, grad_z if need_z else None, grad_w if need_w else None)


cauchy.register_autograd(_cauchy_autograd, setup_context=_cauchy_setup_context)


# --- log-Vandermonde --------------------------------------------------------------------------


@torch.library.custom_op("s4lib::log_vandermonde", mutates_args=(), device_types="cpu")
def log_vandermonde(v: Tensor, x: Tensor, L: int) -> Tensor:
    return _cpu_ops().log_vandermonde(v, x, L)


@log_vandermonde.register_kernel("cuda")
def _log_vandermonde_cuda(v, x, L):
    return _triton().log_vandermonde(v, x, L)


@log_vandermonde.register_fake
def _log_vandermonde_fake(v, x, L):
    return _empty_like_shape(v, (v.shape[0], L), dtype=v.real.dtype)


@torch.library.custom_op("s4lib::vandermonde_moments", mutates_args=(), device_types="cpu")
def vandermonde_moments(u: Tensor, x: Tensor, first_moment: bool) -> tuple[Tensor, Tensor]:
    return tuple(_cpu_ops().vandermonde_moments(u, x, first_moment))


@vandermonde_moments.register_kernel("cuda")
def _vandermonde_moments_cuda(u, x, first_moment):
    return _triton().vandermonde_moments(u, x, first_moment)


@vandermonde_moments.register_fake
def _vandermonde_moments_fake(u, x, first_moment):
    return (_empty_like_shape(x, tuple(x.shape)),
            _empty_like_shape(x, tuple(x.shape) if first_moment else (0,)))


def _log_vandermonde_setup_context(ctx, inputs, output):
    v, x, L = inputs
    ctx.save_for_backward(v, x)


def _log_vandermonde_autograd(ctx, grad):
    v, x = ctx.saved_tensors
    need_v, need_x, _ = ctx.needs_input_grad
    P0, P1 = torch.ops.s4lib.vandermonde_moments(grad, x, need_x)
    grad_v = 2 * P0.conj_physical() if need_v else None
    grad_x = 2 * (v * P1).conj_physical() if need_x else None
    return grad_v, grad_x, None


log_vandermonde.register_autograd(_log_vandermonde_autograd, setup_context=_log_vandermonde_setup_context)


@torch.library.custom_op("s4lib::log_vandermonde_transpose", mutates_args=(), device_types=("cpu", "cuda"))
def log_vandermonde_transpose(u: Tensor, v: Tensor, x: Tensor, L: int) -> Tensor:
    if u.shape[-1] != L:
        raise ValueError(f"u must have last dimension L={L}, got shape {tuple(u.shape)}")
    P0, _ = torch.ops.s4lib.vandermonde_moments(u, x, False)
    return v * P0


@log_vandermonde_transpose.register_fake
def _log_vandermonde_transpose_fake(u, v, x, L):
    return torch.empty_like(v)


def _transpose_setup_context(ctx, inputs, output):
    u, v, x, L = inputs
    ctx.L = L
    ctx.save_for_backward(u, v, x)


def _transpose_autograd(ctx, grad):
    u, v, x = ctx.saved_tensors
    need_u, need_v, need_x, _ = ctx.needs_input_grad
    grad_u = grad_v = grad_x = None
    if need_u:  # Re sum_n v conj(g) exp(x l) = log_vandermonde(v conj(g) / 2)
        grad_u = torch.ops.s4lib.log_vandermonde(v * grad.conj_physical() / 2, x, ctx.L).to(u.dtype)
    if need_v or need_x:
        P0, P1 = torch.ops.s4lib.vandermonde_moments(u, x, need_x)
        if need_v:
            grad_v = P0.conj_physical() * grad
        if need_x:
            grad_x = (v * P1).conj_physical() * grad
    return grad_u, grad_v, grad_x, None


log_vandermonde_transpose.register_autograd(_transpose_autograd, setup_context=_transpose_setup_context)
