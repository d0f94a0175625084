"""The 'keops' backend: the kernel ops as PyKeOps reductions (KeOps compiles them; CPU or CUDA).

KeOps never materialises the (B, N, L) tensor: each op is a sum over one index of a formula
evaluated pairwise. Complex numbers travel as real (re, im) pairs (`torch.view_as_real`) and
the formulas use KeOps's complex helpers on those pairs. Three generic reductions serve every
op and every gradient; the backward passes are written out here with the same reductions
(as in the 'chunked' backend), so KeOps's symbolic differentiation is never used:

    cauchy1:     out[b, i] = sum_j c[b, j] / (p[b, i] - q[b, j])
    cauchy2:     out[b, i] = sum_j c[b, j] / (p[b, i] - q[b, j])**2
    vandermonde: out[b, i] = sum_j a[b, j] exp((x_i[b, i] + x_j[b, j]) (t_i[b, i] + t_j[b, j]))

The last one holds both Vandermonde primitives in one kernel: with x_i = 0, t_j = 0 it is
sum_n a_n exp(x_n l) (the sum over n, i = l), with x_j = 0, t_i = 0 it is sum_l u_l exp(x_n l)
(the sum over l, i = n); the zero terms are added exactly.

Kernels compile on first use (a few seconds each, cached on disk by PyKeOps) on the KeOps 'CPU'
backend for CPU tensors and 'GPU' for CUDA tensors. On CPU, KeOps's generated code runs float64
as fast as float32, so float32 inputs are computed in float64 there (more accurate, and half
the kernels to compile); on GPU each dtype runs natively. A failed import or compile is
reported by `status()` and raised, so dispatch falls back. KeOps loads what it compiled from
its cache folder: one that someone else could write to is replaced by a folder under the
s4lib cache (see native_cache), never by a fixed path in /tmp.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from . import native_cache
from .chunked import _positions, vandermonde_functions

# (formula, aliases): the variable roles are fixed here; batches are KeOps batch dimensions.
_FORMULAS = {
    "cauchy1": ("ComplexDivide(C, P - Q)", ("P = Vi(2)", "Q = Vj(2)", "C = Vj(2)")),
    "cauchy2": ("ComplexDivide(C, ComplexMult(P - Q, P - Q))", ("P = Vi(2)", "Q = Vj(2)", "C = Vj(2)")),
    "vandermonde": ("ComplexMult(A, ComplexExp(ComplexRealScal(Ti + Tj, Xi + Xj)))",
                    ("Ti = Vi(1)", "Xi = Vi(2)", "Tj = Vj(1)", "Xj = Vj(2)", "A = Vj(2)")),
}

_state = {"module": None, "import_error": None, "compile_error": None}
_reductions: dict = {}


def _pykeops():
    """Import pykeops once (quietly: it prints a CUDA notice on CPU-only machines), in a trusted cache folder."""
    if _state["module"] is None and _state["import_error"] is None:
        try:
            _trusted_keops_cache()
            with contextlib.redirect_stdout(io.StringIO()):
                import pykeops
                import pykeops.torch  # noqa: F401  (Genred)
            pykeops.set_verbose(False)
            build = pykeops.get_build_folder()
            reason = _untrusted(build)
            if reason is not None:
                private = native_cache.trusted_subdir(f"keops{pykeops.__version__}")
                warnings.warn(f"s4lib: not using the KeOps build folder {build}: {reason}; using {private}",
                              RuntimeWarning, stacklevel=3)
                pykeops.set_build_folder(str(private))
            _state["module"] = pykeops
        except Exception as e:  # ImportError, or a broken installation
            _state["import_error"] = f"pykeops unavailable: {type(e).__name__}: {e}"
    return _state["module"]


def _untrusted(folder: str) -> str | None:
    """Why KeOps must not load compiled formulas from `folder` (or its nearest existing parent), or None."""
    path = Path(folder)
    while not path.exists() and path.parent != path:
        path = path.parent
    reason = native_cache.untrusted_reason(path)
    if reason is None and not os.access(path, os.W_OK):
        reason = f"{path} is not writable"
    return reason


def _trusted_keops_cache() -> None:
    """Point KEOPS_CACHE_FOLDER at a folder of ours (0700) before pykeops is imported.

    pykeops reads its formula cache from that folder at import; if the configured or default one
    could hold someone else's files, a folder under the s4lib cache is used instead (with a warning).
    """
    try:
        from importlib.metadata import version

        default = os.path.join(os.path.expanduser("~"), ".cache", f"keops{version('keopscore')}")
    except Exception:
        return  # not installed: the import below reports it
    wanted = os.environ.get("KEOPS_CACHE_FOLDER") or default
    reason = _untrusted(wanted)
    if reason is None:
        native_cache.make_private_dir(Path(wanted))
        reason = native_cache.untrusted_reason(Path(wanted))
    if reason is not None:
        private = native_cache.trusted_subdir("keops")
        warnings.warn(f"s4lib: not using the KeOps cache folder {wanted}: {reason}; using {private}",
                      RuntimeWarning, stacklevel=4)
        os.environ["KEOPS_CACHE_FOLDER"] = str(private)


def _reduce(name: str, *args: torch.Tensor) -> torch.Tensor:
    """Run reduction `name` over j on real tensors (B or 1, I or J, dim); returns (B, I, 2).

    A batch dimension of 1 broadcasts (KeOps supports it), so shared inputs are not copied B times.
    """
    dtype = args[0].dtype
    if any(a.numel() == 0 for a in args):  # KeOps rejects empty arrays; an empty sum is zero
        batch = torch.broadcast_shapes(*(a.shape[:-2] for a in args))
        return args[0].new_zeros(*batch, args[0].shape[-2], 2)
    pykeops = _pykeops()
    on_cpu = args[0].device.type == "cpu"
    if on_cpu and dtype == torch.float32:
        args = [a.double() for a in args]
    key = (name, args[0].dtype)
    if key not in _reductions:
        formula, aliases = _FORMULAS[name]
        # Kahan summation: sums over L run to thousands of terms (it matters for float32 on GPU).
        _reductions[key] = pykeops.torch.Genred(formula, list(aliases), reduction_op="Sum", axis=1,
                                                sum_scheme="kahan_scheme")
    backend = "CPU" if on_cpu else "GPU"
    device_id = -1 if args[0].device.index is None else args[0].device.index
    try:
        out = _reductions[key](*[a.contiguous() for a in args], backend=backend, device_id=device_id)
    except Exception as e:
        _state["compile_error"] = f"KeOps reduction {name} ({key[1]}, {backend}) failed: {type(e).__name__}: {e}"
        raise
    return out.to(dtype)


def _pairs(t: torch.Tensor) -> torch.Tensor:
    """Complex (..., n) -> real (..., n, 2)."""
    return torch.view_as_real(t.resolve_conj().contiguous())


def _cauchy_sum(name: str, p: torch.Tensor, q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """sum_j c_j / (p_i - q_j) (cauchy1) or / (p_i - q_j)**2 (cauchy2); p (B, I), q, c (B, J) complex."""
    return torch.view_as_complex(_reduce(name, _pairs(p), _pairs(q), _pairs(c)))


# ----------------------------------------------------------------------------------------------
# Cauchy
# ----------------------------------------------------------------------------------------------

def _stacked_conj(a: torch.Tensor) -> torch.Tensor:
    return torch.cat([a, a.conj_physical()], dim=-1)


class _Cauchy(torch.autograd.Function):
    """r = sum_n v/(z - w) + conj(v)/(z - conj(w)), as one sum over the 2N poles [w, conj(w)]."""

    @staticmethod
    def forward(ctx, v, z, w):
        ctx.save_for_backward(v, z, w)
        return _cauchy_sum("cauchy1", z.unsqueeze(0), _stacked_conj(w), _stacked_conj(v))

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        # Same equations as the chunked backend, with W = [w, conj(w)], V = [v, conj(v)]:
        # sum_k conj(g_k)/(z_k - W_n) = -sum_k conj(g_k)/(W_n - z_k), and 1/(z - W)^2 = 1/(W - z)^2.
        v, z, w = ctx.saved_tensors
        need_v, need_z, need_w = ctx.needs_input_grad
        N = v.shape[-1]
        W, V = _stacked_conj(w), _stacked_conj(v)
        zb = z.unsqueeze(0)  # (1, L): broadcast over the batch
        gbar = g.conj_physical()
        grad_v = grad_z = grad_w = None
        if need_v:
            s = -_cauchy_sum("cauchy1", W, zb, gbar)
            grad_v = s[:, :N].conj() + s[:, N:]
        if need_w:
            q = _cauchy_sum("cauchy2", W, zb, gbar)
            grad_w = v.conj() * (q[:, :N].conj() + q[:, N:])
        if need_z:
            t = _cauchy_sum("cauchy2", zb, W, V)
            grad_z = -(g * t.conj()).sum(0)
        return grad_v, grad_z, grad_w


# ----------------------------------------------------------------------------------------------
# Vandermonde
# ----------------------------------------------------------------------------------------------

def _fold(a: torch.Tensor, x: torch.Tensor):
    """(B, M, K) and (B, N) -> (B*M, K) and x repeated to (B*M, N): M becomes a batch dimension."""
    B, M = a.shape[:2]
    N = x.shape[-1]
    return a.reshape(B * M, a.shape[-1]), x.unsqueeze(1).expand(B, M, N).reshape(B * M, N)


def _vandermonde(t_i, x_i, t_j, x_j, a):
    """sum_j a_j exp((x_i + x_j)(t_i + t_j)): t (B, I or J) real, x (B, I or J) and a (B, J) complex."""
    return torch.view_as_complex(_reduce("vandermonde", t_i.unsqueeze(-1), _pairs(x_i),
                                         t_j.unsqueeze(-1), _pairs(x_j), _pairs(a)))


def _eval_impl(a: torch.Tensor, x: torch.Tensor, L: int, real_part: bool) -> torch.Tensor:
    B, M, N = a.shape
    a2, x2 = _fold(a, x)
    t = _positions(L, x).unsqueeze(0)  # (1, L): broadcast over the batch, like the zeros
    y = _vandermonde(t, x2.new_zeros(1, L), t.new_zeros(1, N), x2, a2).reshape(B, M, L)
    return y.real.contiguous() if real_part else y


def _sum_impl(u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    B, M, L = u.shape
    N = x.shape[-1]
    u2, x2 = _fold(u, x)
    if not u2.is_complex():
        u2 = torch.complex(u2, torch.zeros_like(u2))
    t = _positions(L, x).unsqueeze(0)  # (1, L): broadcast over the batch, like the zeros
    return _vandermonde(t.new_zeros(1, N), x2, t, x2.new_zeros(1, L), u2).reshape(B, M, N)


_VandermondeEval, _VandermondeSum = vandermonde_functions(_eval_impl, _sum_impl)


# ----------------------------------------------------------------------------------------------
# The backend
# ----------------------------------------------------------------------------------------------

class _KeOps:
    name = "keops"

    def status(self):
        pykeops = _pykeops()
        if pykeops is None:
            return False, _state["import_error"]
        if _state["compile_error"] is not None:
            return False, _state["compile_error"]
        where = "CPU and CUDA" if pykeops.config.gpu_available else "CPU"
        return True, f"pykeops {pykeops.__version__} ({where}; kernels compile on first use)"

    def supports(self, op, *tensors):
        device = tensors[0].device
        if device.type == "cpu":
            return None
        if device.type == "cuda":
            return None if _pykeops().config.gpu_available else "pykeops was installed without CUDA support"
        return f"KeOps runs on CPU and CUDA tensors, not {device.type}"

    def cauchy(self, v, z, w):
        return _Cauchy.apply(v, z, w)

    def log_vandermonde(self, v, x, L):
        return 2 * _VandermondeEval.apply(v.unsqueeze(1), x, L, True).squeeze(1)

    def log_vandermonde_transpose(self, u, v, x, L):
        return v * _VandermondeSum.apply(u.unsqueeze(1), x).squeeze(1)


BACKEND = _KeOps()
