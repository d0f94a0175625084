"""The 'chunked' backend: pure PyTorch kernel ops in bounded memory (never a (B, N, L) tensor).

Cauchy (S4/DPLR), r[b, k] = sum_n v/(z_k - w) + conj(v)/(z_k - conj(w)), is computed tile by
tile over (batch, L): each tile builds D = 1/(z_k - [w, conj(w)]) of shape (Bc, 2N, Lc), small
enough to stay in cache, and reduces it over n with a batched matrix-vector product. The
backward pass recomputes the tiles from the saved inputs (v, z, w) and needs D and D**2:

    grad_v = conj(sum_k conj(g_k) D1) + sum_k conj(g_k) D2          (D1 = 1/(z - w), D2 = 1/(z - conj(w)))
    grad_w = conj(v) * (conj(sum_k conj(g_k) D1**2) + sum_k conj(g_k) D2**2)
    grad_z = -g * conj(sum_n v D1**2 + conj(v) D2**2)               (summed over the batch)

Log-Vandermonde (S4D), E[n, l] = exp(x_n l), uses a two-level factorisation of the exponent:
with l = c*C + j (C ~ sqrt(L), j < C), exp(x l) = Q[c, n] * P[n, j] where Q = exp(x c C) and
P = exp(x j). Both tables hold only O(N sqrt(L)) values and are computed directly (never by
repeated multiplication), in float64 for complex64 inputs, so every E[n, l] carries a few
float32 round-offs whatever l is. Then

    sum_n a_n E[n, l]  =  sum_n (a_n Q[c, n]) P[n, j]          -> one batched matmul
    sum_l u_l E[n, l]  =  sum_c Q[c, n] sum_j u[cC + j] P[n, j] -> one batched matmul and a sum

Those two primitives are each other's adjoints, so their autograd Functions differentiate
through each other (any order of derivative); the public ops are thin wrappers:

    log_vandermonde(v, x, L)              = 2 * Re vandermonde_eval(v, x, L)
    log_vandermonde_transpose(u, v, x, L) = v * vandermonde_sum(u, x)

Gradients follow PyTorch's convention for complex inputs: grad_x = conj(dy/dx) g + conj(g) dy/d(conj x).
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

# Bound on the bytes of any one intermediate (a tile, a table, a matmul operand); the peak
# extra memory of an op is a small multiple of it plus its inputs and outputs.
CHUNK_BYTES = 32 << 20
# The Cauchy tile on CPU is much smaller than the bound, per intra-op thread: a tile whose share
# stays in a core's L2 cache runs the Cauchy product several times faster than a 32 MiB one
# (docs/benchmarks.md). GPUs take the bound.
CAUCHY_TILE_BYTES_CPU = 2 << 20


def _tiles(B: int, L: int, bytes_per_cell: int, device: torch.device, max_l: int = 512):
    """(batch slice, length slice) pairs covering (B, L), each tile about the tile budget."""
    if device.type == "cpu":
        budget = min(CHUNK_BYTES, CAUCHY_TILE_BYTES_CPU * torch.get_num_threads())
    else:
        budget = CHUNK_BYTES
    cells = max(1, budget // max(1, bytes_per_cell))
    Lc = max(1, min(L, max_l, cells))
    Bc = max(1, min(B, cells // Lc))
    for b0 in range(0, B, Bc):
        for l0 in range(0, L, Lc):
            yield slice(b0, b0 + Bc), slice(l0, l0 + Lc)


def _stacked_conj(a: torch.Tensor) -> torch.Tensor:
    """[a, conj(a)] along the last dimension: (B, N) -> (B, 2N)."""
    return torch.cat([a, a.conj_physical()], dim=-1)


# ----------------------------------------------------------------------------------------------
# Cauchy
# ----------------------------------------------------------------------------------------------

def _inverse_differences(z: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """D[b, n, k] = 1 / (z[k] - W[b, n]) for one tile: z (Lc,), W (Bc, 2N, 1) -> (Bc, 2N, Lc)."""
    if z.dtype == torch.complex128 and z.device.type == "cpu":
        # torch's complex128 reciprocal is ~10x slower than complex64's on CPU; 1/d = conj(d)/|d|^2
        # in real arithmetic is about twice as fast as it.
        d_re, d_im = z.real - W.real, z.imag - W.imag
        scale = torch.addcmul(d_re * d_re, d_im, d_im).reciprocal_()
        return torch.complex(d_re.mul_(scale), d_im.mul_(scale).neg_())
    return torch.sub(z, W).reciprocal_()


class _Cauchy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, z, w):
        ctx.save_for_backward(v, z, w)
        B, N = v.shape
        L = z.shape[0]
        V = _stacked_conj(v).unsqueeze(1)  # (B, 1, 2N)
        W = _stacked_conj(w).unsqueeze(-1)  # (B, 2N, 1)
        out = torch.empty(B, L, dtype=v.dtype, device=v.device)
        for bs, ls in _tiles(B, L, 2 * N * v.element_size(), v.device):
            D = _inverse_differences(z[ls], W[bs])  # (Bc, 2N, Lc)
            out[bs, ls] = torch.bmm(V[bs], D).squeeze(1)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        v, z, w = ctx.saved_tensors
        need_v, need_z, need_w = ctx.needs_input_grad
        B, N = v.shape
        L = z.shape[0]
        V = _stacked_conj(v).unsqueeze(1)
        W = _stacked_conj(w).unsqueeze(-1)
        gbar = g.conj_physical().unsqueeze(1)  # (B, 1, L)
        sum_D = torch.zeros(B, 2 * N, dtype=v.dtype, device=v.device) if need_v else None
        sum_D2 = torch.zeros(B, 2 * N, dtype=v.dtype, device=v.device) if need_w else None
        t = torch.empty(B, L, dtype=v.dtype, device=v.device) if need_z else None
        for bs, ls in _tiles(B, L, 2 * N * v.element_size(), v.device):
            D = _inverse_differences(z[ls], W[bs])  # (Bc, 2N, Lc)
            gb = gbar[bs, :, ls]  # (Bc, 1, Lc); conj(g) @ D^T is much faster than D @ conj(g)
            if need_v:
                sum_D[bs] += torch.bmm(gb, D.transpose(1, 2)).squeeze(1)
            if need_w or need_z:
                D.square_()
                if need_w:
                    sum_D2[bs] += torch.bmm(gb, D.transpose(1, 2)).squeeze(1)
                if need_z:
                    t[bs, ls] = torch.bmm(V[bs], D).squeeze(1)
        grad_v = grad_z = grad_w = None
        if need_v:
            grad_v = sum_D[:, :N].conj() + sum_D[:, N:]
        if need_w:
            grad_w = v.conj() * (sum_D2[:, :N].conj() + sum_D2[:, N:])
        if need_z:
            grad_z = -(g * t.conj()).sum(0)
        return grad_v, grad_z, grad_w


# ----------------------------------------------------------------------------------------------
# Vandermonde: tables and the two primitives
# ----------------------------------------------------------------------------------------------

def _block_size(L: int) -> int:
    """Width C of the inner block: about sqrt(L), so both tables are O(sqrt(L)) long."""
    return max(1, math.isqrt(L - 1) + 1) if L > 1 else 1


# Below these exponents exp() is subnormal (or zero) in the output dtype. Subnormals make CPU
# arithmetic very slow (exp itself too) and lie far below round-off: flush them to zero.
_EXP_FLOOR = {torch.float32: -87.0, torch.float64: -708.0}


def _exp_parts(re: torch.Tensor, im: torch.Tensor, out_re: torch.Tensor, out_im: torch.Tensor) -> None:
    """Write Re and Im of exp(re + i im) into out_re, out_im; re, im are float64 and consumed.

    Built from real exp/cos/sin (torch's complex exp is many times slower on CPU) and rounded
    once to the output dtype.
    """
    floor = _EXP_FLOOR[out_re.dtype]
    too_small = re < floor
    magnitude = re.clamp_(min=floor).exp_().masked_fill_(too_small, 0.0)
    torch.mul(torch.cos(im), magnitude, out=out_re)
    torch.mul(im.sin_(), magnitude, out=out_im)


def _tables(x: torch.Tensor, L: int, C: int):
    """P2 = [Re P; Im P] (B, 2N, C) real and Q (B, ceil(L/C), N) complex, where
    P[b, n, j] = exp(x j) for j < C and Q[b, c, n] = exp(x c C).

    The exponents are formed in float64 and each entry is rounded once to x's precision: the
    phase Im(x) * l is exact before the exponential, so accuracy does not degrade with l.
    """
    B, N = x.shape
    real = x.real.dtype
    x_re, x_im = x.real.double(), x.imag.double()
    n_blocks = -(-L // C)
    j = torch.arange(C, device=x.device, dtype=torch.float64)
    c = torch.arange(n_blocks, device=x.device, dtype=torch.float64).mul_(C).unsqueeze(-1)
    P2 = torch.empty(B, 2 * N, C, dtype=real, device=x.device)
    _exp_parts(x_re.unsqueeze(-1) * j, x_im.unsqueeze(-1) * j, P2[:, :N], P2[:, N:])
    Q_re = torch.empty(B, n_blocks, N, dtype=real, device=x.device)
    Q_im = torch.empty_like(Q_re)
    _exp_parts(x_re.unsqueeze(-2) * c, x_im.unsqueeze(-2) * c, Q_re, Q_im)
    return P2, torch.complex(Q_re, Q_im)


def _vandermonde_batch_slices(B: int, M: int, N: int, L: int, C: int, itemsize: int, device):
    """Batch slices so that the largest intermediate of a slice (a float64 table, the matmul
    operand A or its product) stays within CHUNK_BYTES. Few large slices: every torch op costs a
    thread synchronisation, which is slow on a busy machine."""
    n_blocks = -(-L // C)
    per_row = itemsize * max(2 * N * (C + n_blocks), 2 * M * n_blocks * (N + C))
    Bc = max(1, min(B, CHUNK_BYTES // max(1, per_row)))
    return [slice(b0, b0 + Bc) for b0 in range(0, B, Bc)]


def _eval_impl(a: torch.Tensor, x: torch.Tensor, L: int, real_part: bool) -> torch.Tensor:
    """y[b, m, l] = sum_n a[b, m, n] exp(x[b, n] l) (its real part if real_part). a: (B, M, N)."""
    B, M, N = a.shape
    C = _block_size(L)
    n_blocks = -(-L // C)
    rows = M * n_blocks
    out = torch.empty(B, M, L, dtype=a.real.dtype if real_part else a.dtype, device=a.device)
    for bs in _vandermonde_batch_slices(B, M, N, L, C, a.element_size(), a.device):
        P2, Q = _tables(x[bs], L, C)
        Bc = P2.shape[0]
        A = (a[bs].unsqueeze(2) * Q.unsqueeze(1)).reshape(Bc, rows, N)  # a_n Q[c, n]
        if real_part:  # Re(A P) = [A.re, -A.im] @ [P.re; P.im]
            y = torch.bmm(torch.cat([A.real, -A.imag], dim=-1), P2)
        else:  # [[A.re, -A.im], [A.im, A.re]] @ [P.re; P.im] = [Re(A P); Im(A P)]
            A2 = torch.cat([torch.cat([A.real, -A.imag], dim=-1), torch.cat([A.imag, A.real], dim=-1)], dim=1)
            y = torch.bmm(A2, P2)
            y = torch.complex(y[:, :rows], y[:, rows:])
        out[bs] = y.reshape(Bc, M, n_blocks * C)[..., :L]
    return out


def _sum_impl(u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """S[b, m, n] = sum_l u[b, m, l] exp(x[b, n] l). u: (B, M, L), real or complex."""
    B, M, L = u.shape
    N = x.shape[-1]
    C = _block_size(L)
    n_blocks = -(-L // C)
    rows = M * n_blocks
    out = torch.empty(B, M, N, dtype=x.dtype, device=x.device)
    pad = n_blocks * C - L
    for bs in _vandermonde_batch_slices(B, M, N, L, C, x.element_size(), x.device):
        P2, Q = _tables(x[bs], L, C)
        Bc = P2.shape[0]
        U = torch.nn.functional.pad(u[bs], (0, pad)).reshape(Bc, rows, C)
        if u.is_complex():  # [U.re; U.im] @ [P.re, P.im]^T, then recombine the four products
            T2 = torch.bmm(torch.cat([U.real, U.imag], dim=1), P2.transpose(1, 2))
            T = torch.complex(T2[:, :rows, :N] - T2[:, rows:, N:], T2[:, :rows, N:] + T2[:, rows:, :N])
        else:
            T2 = torch.bmm(U, P2.transpose(1, 2))
            T = torch.complex(T2[..., :N], T2[..., N:])
        out[bs] = (T.reshape(Bc, M, n_blocks, N) * Q.unsqueeze(1)).sum(2)
    return out


def _positions(L: int, like: torch.Tensor) -> torch.Tensor:
    return torch.arange(L, device=like.device, dtype=like.real.dtype)


def vandermonde_functions(eval_impl, sum_impl):
    """The autograd Functions (Eval, Sum) of the two Vandermonde primitives, given their forward
    implementations (shared with the keops backend):

        eval_impl(a, x, L, real_part): y[b, m, l] = sum_n a[b, m, n] exp(x[b, n] l)  (or Re y)
        sum_impl(u, x):                S[b, m, n] = sum_l u[b, m, l] exp(x[b, n] l)   (u real or complex)

    Each backward pass is the other primitive, so derivatives of any order work.
    """

    class Eval(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, x, L, real_part):
            ctx.save_for_backward(a, x)
            ctx.L = L
            return eval_impl(a, x, L, real_part)

        @staticmethod
        def backward(ctx, g):
            # dy_l/da_n = E[n, l] and dy_l/dx_n = a_n l E[n, l] are holomorphic, so
            # grad_a = conj(sum_l conj(g_l) E), grad_x = sum_m conj(a_m sum_l l conj(g_l) E).
            a, x = ctx.saved_tensors
            need_a, need_x = ctx.needs_input_grad[:2]
            grad_a = grad_x = None
            gbar = g.conj() if g.is_complex() else g
            M = a.shape[1]
            if need_a and need_x:  # one pass over the tables for both
                s = Sum.apply(torch.cat([gbar, gbar * _positions(ctx.L, g)], dim=1), x)
                s_a, s_x = s[:, :M], s[:, M:]
            elif need_a:
                s_a = Sum.apply(gbar, x)
            elif need_x:
                s_x = Sum.apply(gbar * _positions(ctx.L, g), x)
            if need_a:
                grad_a = s_a.conj()
            if need_x:
                grad_x = (a * s_x).sum(1).conj()
            return grad_a, grad_x, None, None

    class Sum(torch.autograd.Function):
        @staticmethod
        def forward(ctx, u, x):
            ctx.save_for_backward(u, x)
            return sum_impl(u, x)

        @staticmethod
        def backward(ctx, g):
            # dS_n/du_l = E[n, l] and dS_n/dx_n = sum_l l u_l E[n, l]: grad_u = conj(sum_n conj(g_n) E)
            # (its real part for real u), grad_x = g conj(sum_l l u_l E).
            u, x = ctx.saved_tensors
            need_u, need_x = ctx.needs_input_grad
            grad_u = grad_x = None
            L = u.shape[-1]
            if need_u:
                if u.is_complex():
                    grad_u = Eval.apply(g.conj(), x, L, False).conj()
                else:
                    grad_u = Eval.apply(g.conj(), x, L, True)
            if need_x:
                grad_x = (g * Sum.apply(u * _positions(L, u), x).conj()).sum(1)
            return grad_u, grad_x

    return Eval, Sum


_VandermondeEval, _VandermondeSum = vandermonde_functions(_eval_impl, _sum_impl)


# ----------------------------------------------------------------------------------------------
# The backend
# ----------------------------------------------------------------------------------------------

class _Chunked:
    name = "chunked"

    def status(self):
        return True, "pure PyTorch, bounded memory (tiles over batch and L)"

    def supports(self, op, *tensors):
        return None

    def cauchy(self, v, z, w):
        return _Cauchy.apply(v, z, w)

    def log_vandermonde(self, v, x, L):
        return 2 * _VandermondeEval.apply(v.unsqueeze(1), x, L, True).squeeze(1)

    def log_vandermonde_transpose(self, u, v, x, L):
        return v * _VandermondeSum.apply(u.unsqueeze(1), x).squeeze(1)


BACKEND = _Chunked()
