"""Triton kernels for the kernel ops on CUDA (complex split into re/im); the 'native' backend on GPUs.

Same math as the C++ CPU kernels (kernels/*.cpp) and the oracles in reference.py:
    cauchy               r[b,k] = sum_n v/(z_k - w) + conj(v)/(z_k - conj(w))
    cauchy_backward      grad_v = sum_k g conj(p1) + conj(g) p2,  grad_w = conj(v) sum_k g conj(p1)^2 + conj(g) p2^2,
                         grad_z = -sum_b g conj(sum_n v p1^2 + conj(v) p2^2),  p1 = 1/(z-w), p2 = 1/(z-conj w)
    log_vandermonde      K[b,l] = 2 Re sum_n v exp(x l)
    vandermonde_moments  P0[b,n] = sum_l u exp(x l),  P1[b,n] = sum_l l u exp(x l)

Each program owns a tile of outputs and loops over the reduced axis in chunks, so nothing of size
(B, N, L) is materialised. Reciprocals are taken after scaling by s = |Re e| + |Im e| (two
divisions instead of one) so that |e|^2 can neither overflow nor underflow. Phases x*l are formed
exactly with an FMA (x*l = p + err), and cos/sin(p + err) is corrected to first order in err.

Triton has no complex dtype and reads interleaved complex memory through torch.view_as_real. The
kernels run unchanged on CPU tensors under TRITON_INTERPRET=1 (set before triton is imported),
which is how the tests check them. Row offsets are int64; a single axis (L or N) must stay below 2**31.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

INDEX_LIMIT = 2**31 - 1


@triton.jit
def _scaled_reciprocal(e_re, e_im):
    """1/e, safe against overflow/underflow of |e|^2."""
    s = tl.abs(e_re) + tl.abs(e_im)
    r = 1.0 / s
    a = e_re * r
    b = e_im * r
    q = r / (a * a + b * b)
    return a * q, -b * q


@triton.jit
def _exp_lx(x_re, x_im, l):
    """exp(x * l) with the products x*l split exactly as p + err by an FMA."""
    p_re = x_re * l
    err_re = tl.fma(x_re, l, -p_re)
    p_im = x_im * l
    err_im = tl.fma(x_im, l, -p_im)
    mag = tl.exp(p_re) * (1.0 + err_re)
    c = tl.cos(p_im)
    s = tl.sin(p_im)
    return mag * (c - s * err_im), mag * (s + c * err_im)


# --- tile prologue/epilogue helpers shared by the kernels (inlined by Triton) --------------------


@triton.jit
def _tile(start, size, BLOCK: tl.constexpr):
    """Offsets start + [0, BLOCK) along an axis of length size, and the mask of those inside it."""
    offs = start + tl.arange(0, BLOCK)
    return offs, offs < size


@triton.jit
def _program_tile(size, BLOCK: tl.constexpr):
    """The tile program (b, j) owns: row b (int64) and offsets j * BLOCK + [0, BLOCK) along an axis of length size,
    with their mask."""
    b = tl.program_id(0).to(tl.int64)
    offs, mask = _tile(tl.program_id(1) * BLOCK, size, BLOCK)
    return b, offs, mask


@triton.jit
def _complex_zeros(BLOCK: tl.constexpr, like):
    """Re/Im planes of a complex accumulator of BLOCK zeros in the dtype of like."""
    return tl.zeros([BLOCK], dtype=like.dtype), tl.zeros([BLOCK], dtype=like.dtype)


@triton.jit
def _load_complex(ptr, offs, mask, OTHER_RE: tl.constexpr):
    """Re and Im planes of the complex elements ptr[offs] (interleaved re/im); masked lanes read OTHER_RE + 0j."""
    re = tl.load(ptr + 2 * offs, mask=mask, other=OTHER_RE)
    im = tl.load(ptr + 2 * offs + 1, mask=mask, other=0.0)
    return re, im


@triton.jit
def _store_complex(ptr, offs, re, im, mask):
    """ptr[offs] = re + i im (interleaved re/im)."""
    tl.store(ptr + 2 * offs, re, mask=mask)
    tl.store(ptr + 2 * offs + 1, im, mask=mask)


@triton.jit
def _load_z(z_ptr, offs_k, mask_k):
    """Re/Im planes of the nodes z[offs_k]; masked lanes read z = 1 (nonzero, their terms are discarded)."""
    return _load_complex(z_ptr, offs_k, mask_k, 1.0)


@triton.jit
def _load_row_pair(a_ptr, c_ptr, offs, mask):
    """Re/Im planes of a[offs] and c[offs], two (B, N) complex inputs indexed alike; masked lanes read 0."""
    a_re, a_im = _load_complex(a_ptr, offs, mask, 0.0)
    c_re, c_im = _load_complex(c_ptr, offs, mask, 0.0)
    return a_re, a_im, c_re, c_im


@triton.jit
def _load_n_chunk(a_ptr, c_ptr, b, N, n0, BLOCK_N: tl.constexpr):
    """Chunk n0 + [0, BLOCK_N) of row b of two (B, N) complex inputs: mask_n and the Re/Im planes as columns."""
    offs_n, mask_n = _tile(n0, N, BLOCK_N)
    a_re, a_im, c_re, c_im = _load_row_pair(a_ptr, c_ptr, b * N + offs_n, mask_n)
    return mask_n, a_re[:, None], a_im[:, None], c_re[:, None], c_im[:, None]


@triton.jit
def _cauchy_poles(z_re, z_im, w_re, w_im):
    """p1 = 1/(z - w) and p2 = 1/(z - conj w), z and w broadcast against each other."""
    d = z_re - w_re
    p1_re, p1_im = _scaled_reciprocal(d, z_im - w_im)
    p2_re, p2_im = _scaled_reciprocal(d, z_im + w_im)
    return p1_re, p1_im, p2_re, p2_im


@triton.jit
def _cauchy_n_chunk(v_ptr, w_ptr, z_re, z_im, b, N, n0, BLOCK_N: tl.constexpr):
    """Chunk n0 + [0, BLOCK_N) of row b of v and w against a row (1, BLOCK_K) of z:
    mask_n, v as columns, and the (BLOCK_N, BLOCK_K) poles p1 = 1/(z - w), p2 = 1/(z - conj w)."""
    mask_n, v_re, v_im, w_re, w_im = _load_n_chunk(v_ptr, w_ptr, b, N, n0, BLOCK_N)
    p1_re, p1_im, p2_re, p2_im = _cauchy_poles(z_re, z_im, w_re, w_im)
    return mask_n, v_re, v_im, p1_re, p1_im, p2_re, p2_im


@triton.jit
def _masked_sum(keep, t, AXIS: tl.constexpr):
    """Sum of t along AXIS over the lanes where keep holds (masked lanes may hold garbage)."""
    return tl.sum(tl.where(keep, t, 0.0), axis=AXIS)


# --- kernels --------------------------------------------------------------------------------------


@triton.jit
def _cauchy_forward_kernel(v_ptr, w_ptr, z_ptr, out_ptr, N, L, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    b, offs_k, mask_k = _program_tile(L, BLOCK_K)
    z_re, z_im = _load_z(z_ptr, offs_k, mask_k)
    acc_re, acc_im = _complex_zeros(BLOCK_K, z_re)
    for n0 in range(0, N, BLOCK_N):
        mask_n, v_re, v_im, p1_re, p1_im, p2_re, p2_im = _cauchy_n_chunk(v_ptr, w_ptr, z_re[None, :], z_im[None, :],
                                                                         b, N, n0, BLOCK_N)
        # v p1 + conj(v) p2
        t_re = (v_re * p1_re - v_im * p1_im) + (v_re * p2_re + v_im * p2_im)
        t_im = (v_re * p1_im + v_im * p1_re) + (v_re * p2_im - v_im * p2_re)
        keep = mask_n[:, None] & mask_k[None, :]
        acc_re += _masked_sum(keep, t_re, 0)
        acc_im += _masked_sum(keep, t_im, 0)
    _store_complex(out_ptr, b * L + offs_k, acc_re, acc_im, mask_k)


@triton.jit
def _cauchy_backward_vw_kernel(g_ptr, v_ptr, w_ptr, z_ptr, gv_ptr, gw_ptr, N, L,
                               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    b, offs_n, mask_n = _program_tile(N, BLOCK_N)
    rows = b * N + offs_n
    v_re, v_im, w_re, w_im = _load_row_pair(v_ptr, w_ptr, rows, mask_n)
    sv_re, sv_im = _complex_zeros(BLOCK_N, v_re)
    sw_re, sw_im = _complex_zeros(BLOCK_N, v_re)
    for k0 in range(0, L, BLOCK_K):
        offs_k, mask_k = _tile(k0, L, BLOCK_K)
        z_re, z_im = _load_z(z_ptr, offs_k, mask_k)
        g_re, g_im = _load_complex(g_ptr, b * L + offs_k, mask_k, 0.0)
        g_re = g_re[None, :]
        g_im = g_im[None, :]
        p1_re, p1_im, p2_re, p2_im = _cauchy_poles(z_re[None, :], z_im[None, :], w_re[:, None], w_im[:, None])
        A_re = g_re * p1_re + g_im * p1_im  # g conj(p1)
        A_im = g_im * p1_re - g_re * p1_im
        B_re = g_re * p2_re + g_im * p2_im  # conj(g) p2
        B_im = g_re * p2_im - g_im * p2_re
        keep = mask_n[:, None] & mask_k[None, :]
        sv_re += _masked_sum(keep, A_re + B_re, 1)
        sv_im += _masked_sum(keep, A_im + B_im, 1)
        # A conj(p1) + B p2
        sw_re += _masked_sum(keep, (A_re * p1_re + A_im * p1_im) + (B_re * p2_re - B_im * p2_im), 1)
        sw_im += _masked_sum(keep, (A_im * p1_re - A_re * p1_im) + (B_re * p2_im + B_im * p2_re), 1)
    _store_complex(gv_ptr, rows, sv_re, sv_im, mask_n)
    _store_complex(gw_ptr, rows, v_re * sw_re + v_im * sw_im, v_re * sw_im - v_im * sw_re, mask_n)  # conj(v) SW


@triton.jit
def _cauchy_backward_z_kernel(g_ptr, v_ptr, w_ptr, z_ptr, gz_ptr, B, N, L,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_k, mask_k = _tile(tl.program_id(0) * BLOCK_K, L, BLOCK_K)
    z_re, z_im = _load_z(z_ptr, offs_k, mask_k)
    gz_re, gz_im = _complex_zeros(BLOCK_K, z_re)
    for b_idx in range(0, B):
        b = b_idx + tl.zeros([1], dtype=tl.int64)  # int64 row offsets (b_idx is int32, or a Python int when interpreted)
        t_re, t_im = _complex_zeros(BLOCK_K, z_re)
        for n0 in range(0, N, BLOCK_N):
            mask_n, v_re, v_im, p1_re, p1_im, p2_re, p2_im = _cauchy_n_chunk(v_ptr, w_ptr, z_re[None, :],
                                                                             z_im[None, :], b, N, n0, BLOCK_N)
            q1_re = p1_re * p1_re - p1_im * p1_im
            q1_im = 2 * p1_re * p1_im
            q2_re = p2_re * p2_re - p2_im * p2_im
            q2_im = 2 * p2_re * p2_im
            s_re = (v_re * q1_re - v_im * q1_im) + (v_re * q2_re + v_im * q2_im)  # v p1^2 + conj(v) p2^2
            s_im = (v_re * q1_im + v_im * q1_re) + (v_re * q2_im - v_im * q2_re)
            keep = mask_n[:, None] & mask_k[None, :]
            t_re += _masked_sum(keep, s_re, 0)
            t_im += _masked_sum(keep, s_im, 0)
        g_re, g_im = _load_complex(g_ptr, b * L + offs_k, mask_k, 0.0)
        gz_re -= g_re * t_re + g_im * t_im  # -g conj(T)
        gz_im -= g_im * t_re - g_re * t_im
    _store_complex(gz_ptr, offs_k, gz_re, gz_im, mask_k)


@triton.jit
def _log_vandermonde_kernel(v_ptr, x_ptr, out_ptr, N, L, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    b, offs_l, mask_l = _program_tile(L, BLOCK_L)
    acc = tl.zeros([BLOCK_L], dtype=tl.load(x_ptr).dtype)
    l = offs_l.to(acc.dtype)[None, :]
    for n0 in range(0, N, BLOCK_N):
        mask_n, v_re, v_im, x_re, x_im = _load_n_chunk(v_ptr, x_ptr, b, N, n0, BLOCK_N)
        e_re, e_im = _exp_lx(x_re, x_im, l)
        term = 2 * (v_re * e_re - v_im * e_im)
        acc += _masked_sum(mask_n[:, None] & mask_l[None, :], term, 0)
    tl.store(out_ptr + b * L + offs_l, acc, mask=mask_l)


@triton.jit
def _vandermonde_moments_kernel(u_ptr, x_ptr, p0_ptr, p1_ptr, N, L, FIRST_MOMENT: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    b, offs_n, mask_n = _program_tile(N, BLOCK_N)
    rows = b * N + offs_n
    x_re, x_im = _load_complex(x_ptr, rows, mask_n, 0.0)
    p0_re, p0_im = _complex_zeros(BLOCK_N, x_re)
    p1_re, p1_im = _complex_zeros(BLOCK_N, x_re)
    for l0 in range(0, L, BLOCK_L):
        offs_l, mask_l = _tile(l0, L, BLOCK_L)
        u = tl.load(u_ptr + b * L + offs_l, mask=mask_l, other=0.0)[None, :]
        l = offs_l.to(x_re.dtype)[None, :]
        e_re, e_im = _exp_lx(x_re[:, None], x_im[:, None], l)
        keep = mask_n[:, None] & mask_l[None, :]
        ue_re = tl.where(keep, u * e_re, 0.0)
        ue_im = tl.where(keep, u * e_im, 0.0)
        p0_re += tl.sum(ue_re, axis=1)
        p0_im += tl.sum(ue_im, axis=1)
        if FIRST_MOMENT:
            p1_re += tl.sum(l * ue_re, axis=1)
            p1_im += tl.sum(l * ue_im, axis=1)
    _store_complex(p0_ptr, rows, p0_re, p0_im, mask_n)
    if FIRST_MOMENT:
        _store_complex(p1_ptr, rows, p1_re, p1_im, mask_n)


# --- launchers (canonical inputs: 2-D, complex64/complex128, same device) -----------------------


def _real_view(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t.resolve_conj().resolve_neg().contiguous())


def _check_index_range(*sizes: int) -> None:
    if max(sizes) > INDEX_LIMIT // 2:
        raise ValueError(f"s4lib Triton kernels index one axis with int32: sizes {sizes} exceed {INDEX_LIMIT // 2}")


def _block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


def cauchy(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor, block_n: int = 32, block_k: int = 128) -> torch.Tensor:
    B, N = v.shape
    L = z.shape[0]
    _check_index_range(L, N)
    out = torch.empty(B, L, dtype=v.dtype, device=v.device)
    if B == 0 or L == 0:
        return out
    grid = (B, triton.cdiv(L, block_k))
    _cauchy_forward_kernel[grid](_real_view(v), _real_view(w), _real_view(z), torch.view_as_real(out), N, L,
                                 BLOCK_N=_block(N, block_n), BLOCK_K=block_k)
    return out


def cauchy_backward(grad, v, z, w, need_vw: bool, need_z: bool, block_n: int = 32, block_k: int = 128):
    B, N = v.shape
    L = z.shape[0]
    _check_index_range(L, N)
    g = _real_view(grad.to(v.dtype))
    vr, wr, zr = _real_view(v), _real_view(w), _real_view(z)
    empty = v.new_empty(0)
    grad_v = grad_w = grad_z = empty
    if need_vw:
        grad_v = torch.zeros_like(v)
        grad_w = torch.zeros_like(v)
        if B and N and L:
            grid = (B, triton.cdiv(N, _block(N, block_n)))
            _cauchy_backward_vw_kernel[grid](g, vr, wr, zr, torch.view_as_real(grad_v), torch.view_as_real(grad_w),
                                             N, L, BLOCK_N=_block(N, block_n), BLOCK_K=block_k)
    if need_z:
        grad_z = torch.zeros(L, dtype=v.dtype, device=v.device)
        if B and N and L:
            grid = (triton.cdiv(L, block_k),)
            _cauchy_backward_z_kernel[grid](g, vr, wr, zr, torch.view_as_real(grad_z), B, N, L,
                                            BLOCK_N=_block(N, block_n), BLOCK_K=block_k)
    return grad_v, grad_w, grad_z


def log_vandermonde(v: torch.Tensor, x: torch.Tensor, L: int, block_n: int = 32, block_l: int = 128) -> torch.Tensor:
    B, N = v.shape
    _check_index_range(L, N)
    out = torch.zeros(B, L, dtype=v.real.dtype, device=v.device)
    if B == 0 or L == 0 or N == 0:
        return out
    grid = (B, triton.cdiv(L, block_l))
    _log_vandermonde_kernel[grid](_real_view(v), _real_view(x), out, N, L, BLOCK_N=_block(N, block_n),
                                  BLOCK_L=block_l)
    return out


def vandermonde_moments(u: torch.Tensor, x: torch.Tensor, first_moment: bool, block_n: int = 32,
                        block_l: int = 128):
    B, N = x.shape
    L = u.shape[-1]
    _check_index_range(L, N)
    u = u.to(x.real.dtype).contiguous()
    P0 = torch.zeros(B, N, dtype=x.dtype, device=x.device)
    P1 = torch.zeros(B, N, dtype=x.dtype, device=x.device) if first_moment else x.new_empty(0)
    if B == 0 or L == 0 or N == 0:
        return P0, P1
    grid = (B, triton.cdiv(N, _block(N, block_n)))
    p1_view = torch.view_as_real(P1) if first_moment else torch.view_as_real(P0)
    _vandermonde_moments_kernel[grid](u, _real_view(x), torch.view_as_real(P0), p1_view, N, L,
                                      FIRST_MOMENT=first_moment, BLOCK_N=_block(N, block_n), BLOCK_L=block_l)
    return P0, P1


# --- ahead-of-time compilation check (no GPU needed) --------------------------------------------

KERNELS = (_cauchy_forward_kernel, _cauchy_backward_vw_kernel, _cauchy_backward_z_kernel,
           _log_vandermonde_kernel, _vandermonde_moments_kernel)


def compile_for_cuda(capability: int = 80, dtypes=("fp32", "fp64")) -> list[str]:
    """Compile every kernel to a CUDA binary for one compute capability, without a GPU.

    Proves on any machine (CI included) that the kernels type-check and lower through Triton's
    CUDA backend; run with TRITON_INTERPRET unset. Returns '<kernel>[<dtype>]' per compiled kernel.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    compiled = []
    for kernel in KERNELS:
        for dtype in dtypes:
            names = kernel.arg_names
            signature = {name: f"*{dtype}" if name.endswith("_ptr") else "constexpr" if name.isupper() else "i32"
                         for name in names}
            constexprs = {name: (True if name == "FIRST_MOMENT" else 16 if name == "BLOCK_N" else 128)
                          for name in names if name.isupper()}
            triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                           target=GPUTarget("cuda", capability, 32))
            compiled.append(f"{kernel.fn.__name__}[{dtype}]")
    return compiled
