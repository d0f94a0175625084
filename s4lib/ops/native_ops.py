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


# The ops are defined with the low-level torch.library.Library API rather than the
# @torch.library.custom_op decorator: the decorator wraps every call in torch._disable_dynamo,
# whose first use imports torch._dynamo (much resident memory, docs/benchmarks.md) even in eager code.
_LIB = torch.library.Library("s4lib", "DEF")


def _define(schema: str, cpu, cuda=None) -> str:
    """Define s4lib::<schema> with a CPU (and optionally CUDA) implementation; returns the qualname."""
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    _LIB.impl(name, cpu, "CPU")
    if cuda is not None:
        _LIB.impl(name, cuda, "CUDA")
    return "s4lib::" + name


def _not_differentiable(qualname: str) -> None:
    """Autograd for a backward op: running it is fine, differentiating it raises a clear error."""

    def backward(ctx, *grads):
        raise RuntimeError(f"{qualname} has no autograd formula: double backward through the s4lib native "
                           "kernels is not supported (use backend='naive' for higher-order gradients)")

    torch.library.register_autograd(qualname, backward, setup_context=lambda ctx, inputs, output: None)


# --- Cauchy -----------------------------------------------------------------------------------


def cauchy(v: Tensor, z: Tensor, w: Tensor) -> Tensor:
    return _cpu_ops().cauchy_forward(v, z, w)


def _cauchy_cuda(v, z, w):
    return _triton().cauchy(v, z, w)


CAUCHY = _define("cauchy(Tensor v, Tensor z, Tensor w) -> Tensor", cauchy, _cauchy_cuda)


@torch.library.register_fake(CAUCHY)
def _cauchy_fake(v, z, w):
    return _empty_like_shape(v, (v.shape[0], z.shape[0]))


def cauchy_backward(grad: Tensor, v: Tensor, z: Tensor, w: Tensor, need_vw: bool,
                    need_z: bool) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(_cpu_ops().cauchy_backward(grad, v, z, w, need_vw, need_z))


def _cauchy_backward_cuda(grad, v, z, w, need_vw, need_z):
    return tuple(_triton().cauchy_backward(grad, v, z, w, need_vw, need_z))


CAUCHY_BACKWARD = _define("cauchy_backward(Tensor grad, Tensor v, Tensor z, Tensor w, bool need_vw, bool need_z)"
                          " -> (Tensor, Tensor, Tensor)", cauchy_backward, _cauchy_backward_cuda)


@torch.library.register_fake(CAUCHY_BACKWARD)
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


_not_differentiable(CAUCHY_BACKWARD)
torch.library.register_autograd(CAUCHY, _cauchy_autograd, setup_context=_cauchy_setup_context)


# --- log-Vandermonde --------------------------------------------------------------------------


def log_vandermonde(v: Tensor, x: Tensor, L: int) -> Tensor:
    return _cpu_ops().log_vandermonde(v, x, L)


def _log_vandermonde_cuda(v, x, L):
    return _triton().log_vandermonde(v, x, L)


LOG_VANDERMONDE = _define("log_vandermonde(Tensor v, Tensor x, SymInt L) -> Tensor", log_vandermonde,
                          _log_vandermonde_cuda)


@torch.library.register_fake(LOG_VANDERMONDE)
def _log_vandermonde_fake(v, x, L):
    return _empty_like_shape(v, (v.shape[0], L), dtype=v.real.dtype)


def vandermonde_moments(u: Tensor, x: Tensor, first_moment: bool) -> tuple[Tensor, Tensor]:
    return tuple(_cpu_ops().vandermonde_moments(u, x, first_moment))


def _vandermonde_moments_cuda(u, x, first_moment):
    return tuple(_triton().vandermonde_moments(u, x, first_moment))


VANDERMONDE_MOMENTS = _define("vandermonde_moments(Tensor u, Tensor x, bool first_moment) -> (Tensor, Tensor)",
                              vandermonde_moments, _vandermonde_moments_cuda)


@torch.library.register_fake(VANDERMONDE_MOMENTS)
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


_not_differentiable(VANDERMONDE_MOMENTS)
torch.library.register_autograd(LOG_VANDERMONDE, _log_vandermonde_autograd,
                                setup_context=_log_vandermonde_setup_context)


def log_vandermonde_transpose(u: Tensor, v: Tensor, x: Tensor, L: int) -> Tensor:
    if u.shape[-1] != L:
        raise ValueError(f"u must have last dimension L={L}, got shape {tuple(u.shape)}")
    P0, _ = torch.ops.s4lib.vandermonde_moments(u, x, False)
    return v * P0


LOG_VANDERMONDE_TRANSPOSE = _define("log_vandermonde_transpose(Tensor u, Tensor v, Tensor x, SymInt L) -> Tensor",
                                    log_vandermonde_transpose, log_vandermonde_transpose)


@torch.library.register_fake(LOG_VANDERMONDE_TRANSPOSE)
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


torch.library.register_autograd(LOG_VANDERMONDE_TRANSPOSE, _transpose_autograd,
                                setup_context=_transpose_setup_context)
