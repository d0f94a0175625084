"""The 'native' backend: C++ CPU kernels and (interpreted) Triton kernels against the float64 oracle,
forward and backward; gradcheck; torch.library.opcheck; torch.compile without graph breaks; the
layer against the naive backend (building, caching and fallbacks: test_native_build.py).

Error bounds are condition-aware: a kernel in precision eps is held to C * eps * (sum of the
magnitudes of the terms it adds up), the bound a correctly rounded sum satisfies, with the
number of terms in C. A formula or indexing error shows up as O(1) relative error instead.
"""

import os
import subprocess
import sys

import pytest
from conftest import skip_unless_ci
import torch
from hypothesis import given, settings, strategies as st

# Triton kernels run on CPU tensors only through the interpreter, which must be chosen before the
# kernels are defined (at import of s4lib.ops.triton_kernels).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from s4lib import ops  # noqa: E402
from s4lib.ops import native_build  # noqa: E402
from s4lib.ops.reference import cauchy_ref, log_vandermonde_ref, log_vandermonde_transpose_ref  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DTYPES = [torch.complex64, torch.complex128]


def _eps(dtype):
    return torch.finfo(dtype.to_real() if dtype.is_complex else dtype).eps


@pytest.fixture(scope="module")
def native_cpu():
    """The compiled CPU kernels; a missing compiler skips, a failed build fails."""
    if native_build.compiler_path() is None:
        skip_unless_ci(f"no C++ compiler ({native_build.compiler()!r})")
    import s4lib.ops.native  # noqa: F401  (registers the s4lib::* custom ops)

    native_build.load()
    return torch.ops.s4lib


@pytest.fixture(scope="module")
def triton_kernels():
    pytest.importorskip("triton") if not os.environ.get("CI") else __import__("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    import importlib

    from s4lib.ops import triton_kernels as tk

    return importlib.reload(tk)  # defined after TRITON_INTERPRET was set, whatever imported it first


# ------------------------------------------------------------------ problem generators (S4-like)


def cauchy_problem(B, N, L, dtype, seed, general_z=False, distinct_poles=0):
    """Poles w with Re w < 0 (dt * Lambda), nodes z on the imaginary axis as in S4 (or anywhere).

    distinct_poles > 0: row b of w is row b % distinct_poles, as when S4's Woodbury numerators
    broadcast against one dt * Lambda (the kernels then share denominators across rows).
    """
    g = torch.Generator().manual_seed(seed)
    rd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    ru = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
    v = torch.complex(rd(B, N), rd(B, N))
    w = torch.complex(-0.5 * ru(B, N) - 1e-3, 10 * rd(B, N))
    z = torch.complex(torch.zeros(L, dtype=torch.float64), 3 * L ** 0.5 * rd(L))
    if general_z:
        z = z + torch.complex(rd(L), rd(L))
    if distinct_poles:
        w = w[torch.arange(B) % distinct_poles]
    return [t.to(dtype) for t in (v, z, w)]


def vandermonde_problem(B, N, L, dtype, seed):
    """x = dt * lambda with Re x < 0 spanning decay lengths from a few steps to ~1e4 steps."""
    g = torch.Generator().manual_seed(seed)
    rd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    ru = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
    v = torch.complex(rd(B, N), rd(B, N))
    x = torch.complex(-(10 ** (-4 + 3.5 * ru(B, N))), rd(B, N) * 10 ** (-3 + 3 * ru(B, N)))
    u = rd(B, L)
    return v.to(dtype), x.to(dtype), u.to(dtype.to_real())


def _c(t):
    return t.detach().to(torch.complex128 if t.is_complex() else torch.float64)


# ------------------------------------------------------------------ error bounds


def cauchy_scales(v, z, w, g):
    """Sums of term magnitudes for r, grad_v, grad_w, grad_z (all float64)."""
    v, z, w, g = _c(v), _c(z), _c(w), _c(g)
    a1 = 1 / (z[None, None, :] - w[..., None]).abs()  # (B, N, L)
    a2 = 1 / (z[None, None, :] - w.conj()[..., None]).abs()
    vabs, gabs = v.abs()[..., None], g.abs()[:, None, :]
    r = (vabs * (a1 + a2)).sum(1)
    gv = (gabs * (a1 + a2)).sum(-1)
    gw = v.abs() * (gabs * (a1**2 + a2**2)).sum(-1)
    gz = (gabs * vabs * (a1**2 + a2**2)).sum((0, 1))
    return r, gv, gw, gz


def assert_within(name, got, want, scale, count, dtype, factor=4.0):
    err = (_c(got) - _c(want)).abs()
    # floor: values below the smallest normal number are flushed to zero (denormals are ~100x slower)
    tiny = torch.finfo(dtype.to_real() if dtype.is_complex else dtype).tiny
    bound = factor * (count + 8) * (_eps(dtype) * scale + tiny)
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"{name}: error {worst:.3g}x the bound {factor}*eps*(terms+8)*sum|terms| ({dtype})"


def check_cauchy(impl_forward, impl_backward, B, N, L, dtype, seed, general_z=False, distinct_poles=0,
                 need=(True, True)):
    v, z, w = cauchy_problem(B, N, L, dtype, seed, general_z, distinct_poles)
    g = torch.randn(B, L, dtype=dtype, generator=torch.Generator().manual_seed(seed + 1))
    r = impl_forward(v, z, w)
    grad_v, grad_w, grad_z = impl_backward(g, v, z, w)
    vd, zd, wd = (_c(t).requires_grad_() for t in (v, z, w))
    r_ref = cauchy_ref(vd, zd, wd)
    gv_ref, gz_ref, gw_ref = torch.autograd.grad(r_ref, (vd, zd, wd), _c(g))
    s_r, s_gv, s_gw, s_gz = cauchy_scales(v, z, w, g)
    assert r.dtype == dtype and r.shape == (B, L)
    assert_within("cauchy", r, r_ref, s_r, 2 * N, dtype)
    if need[0]:
        assert_within("grad_v", grad_v, gv_ref, s_gv, 2 * L, dtype)
        assert_within("grad_w", grad_w, gw_ref, s_gw, 2 * L, dtype)
    if need[1]:
        assert_within("grad_z", grad_z, gz_ref, s_gz, 2 * B * N, dtype)


def check_vandermonde(impl_forward, impl_moments, B, N, L, dtype, seed):
    v, x, u = vandermonde_problem(B, N, L, dtype, seed)
    l = torch.arange(L, dtype=torch.float64)
    E = torch.exp(_c(x)[..., None] * l)  # (B, N, L), float64
    Eabs = E.abs()
    if dtype == torch.complex128:
        # The float64 oracle itself rounds the phase x*l (error ~ eps |x| l), as does any double
        # evaluation; complex64 kernels are held to the tighter bound without this factor.
        Eabs = Eabs * (1 + _c(x).abs()[..., None] * l)
    K = impl_forward(v, x, L)
    assert K.dtype == dtype.to_real() and K.shape == (B, L)
    assert_within("log_vandermonde", K, log_vandermonde_ref(_c(v), _c(x), L),
                  (2 * _c(v).abs()[..., None] * Eabs).sum(1), N, dtype)
    P0, P1 = impl_moments(u, x)
    ud = _c(u)[:, None, :]
    assert_within("moment 0", P0, (ud * E).sum(-1), (ud.abs() * Eabs).sum(-1), L, dtype)
    assert_within("moment 1", P1, (ud * l * E).sum(-1), (ud.abs() * l * Eabs).sum(-1), L, dtype)


# ------------------------------------------------------------------ CPU kernels vs oracle

SMALL = dict(B=st.integers(1, 4), N=st.sampled_from([1, 2, 3, 5, 7, 12, 32, 33, 48]),
             L=st.one_of(st.integers(1, 300), st.sampled_from([63, 64, 65, 255, 256, 257, 1000, 2049])),
             dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))


def _native_cauchy_backward(ops_, need_vw=True, need_z=True):
    return lambda g, v, z, w: ops_.cauchy_backward(g, v, z, w, need_vw, need_z)


@settings(max_examples=40)
@given(**SMALL, general_z=st.booleans())
def test_cpu_cauchy_matches_oracle(native_cpu, B, N, L, dtype, seed, general_z):
    check_cauchy(native_cpu.cauchy, _native_cauchy_backward(native_cpu), B, N, L, dtype, seed, general_z)


@settings(max_examples=20)
@given(B=st.integers(2, 11), distinct=st.integers(1, 3), N=st.sampled_from([1, 3, 8, 33]),
       L=st.sampled_from([1, 5, 64, 300, 1025]), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16),
       need=st.sampled_from([(True, True), (True, False), (False, True)]))
def test_cpu_cauchy_shared_poles_match_oracle(native_cpu, B, distinct, N, L, dtype, seed, need):
    """Rows sharing poles (grouped, up to 4 per pass, remainders included) and partial backward."""
    check_cauchy(native_cpu.cauchy, _native_cauchy_backward(native_cpu, *need), B, N, L, dtype, seed,
                 distinct_poles=distinct, need=need)


@settings(max_examples=40)
@given(**SMALL)
def test_cpu_log_vandermonde_matches_oracle(native_cpu, B, N, L, dtype, seed):
    check_vandermonde(native_cpu.log_vandermonde, lambda u, x: native_cpu.vandermonde_moments(u, x, True),
                      B, N, L, dtype, seed)


@settings(max_examples=4)
@given(N=st.sampled_from([1, 3, 5]), L=st.integers(20_000, 100_000), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_cpu_long_sequences_match_oracle(native_cpu, N, L, dtype, seed):
    check_vandermonde(native_cpu.log_vandermonde, lambda u, x: native_cpu.vandermonde_moments(u, x, True),
                      1, N, L, dtype, seed)
    check_cauchy(native_cpu.cauchy, _native_cauchy_backward(native_cpu), 1, N, L, dtype, seed)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_partial_backward_equals_full(native_cpu, dtype):
    v, z, w = cauchy_problem(3, 5, 200, dtype, 0)
    g = torch.randn(3, 200, dtype=dtype)
    full = native_cpu.cauchy_backward(g, v, z, w, True, True)
    only_vw = native_cpu.cauchy_backward(g, v, z, w, True, False)
    only_z = native_cpu.cauchy_backward(g, v, z, w, False, True)
    torch.testing.assert_close(only_vw[0], full[0], rtol=0, atol=0)
    torch.testing.assert_close(only_vw[1], full[1], rtol=0, atol=0)
    torch.testing.assert_close(only_z[2], full[2], rtol=0, atol=0)
    assert only_vw[2].numel() == 0 and only_z[0].numel() == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_cauchy_extreme_ranges_take_the_exact_path(native_cpu, dtype):
    """|z| near overflow of |z|^4, and z within 1e-20 of a pole: still the oracle's answer."""
    v, z, w = cauchy_problem(2, 3, 70, dtype, 1)
    z_far = z.clone()
    z_far[5] = 1e25 + 1j
    w_near, z_near = w.clone(), z.clone()
    w_near[0, 1] = complex(-1e-21, 1e-20)  # |z - w|^2 |z - conj w|^2 = 1e-80 underflows float32
    z_near[7] = 0
    for zz, ww in ((z_far, w), (z_near, w_near)):
        r = native_cpu.cauchy(v, zz, ww)
        ref = cauchy_ref(_c(v), _c(zz), _c(ww))
        assert torch.isfinite(r).all()
        s_r = cauchy_scales(v, zz, ww, torch.ones(2, 70))[0]
        assert_within("cauchy (extreme)", r, ref, s_r, 6, dtype)


def test_cpu_nan_propagates(native_cpu):
    v, z, w = cauchy_problem(1, 4, 100, torch.complex64, 2)
    w[0, 2] = float("nan")
    assert torch.isnan(native_cpu.cauchy(v, z, w)).all()


def test_cpu_conjugate_views_are_read_correctly(native_cpu):
    v, z, w = cauchy_problem(2, 3, 50, torch.complex64, 3)
    r = native_cpu.cauchy(v.conj(), z.conj(), w.conj())
    torch.testing.assert_close(r, native_cpu.cauchy(v.conj().resolve_conj(), z.conj().resolve_conj(),
                                                    w.conj().resolve_conj()), rtol=0, atol=0)


# ------------------------------------------------------------------ autograd, opcheck, compile


def test_gradcheck_complex128(native_cpu):
    v, z, w = (t.requires_grad_() for t in cauchy_problem(2, 3, 7, torch.complex128, 4, general_z=True))
    assert torch.autograd.gradcheck(native_cpu.cauchy, (v, z, w))
    v, x, u = vandermonde_problem(2, 3, 9, torch.complex128, 5)
    v, x, u = v.requires_grad_(), x.requires_grad_(), u.requires_grad_()
    assert torch.autograd.gradcheck(lambda v, x: native_cpu.log_vandermonde(v, x, 9), (v, x))
    assert torch.autograd.gradcheck(lambda u, v, x: native_cpu.log_vandermonde_transpose(u, v, x, 9), (u, v, x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_transpose_matches_oracle(native_cpu, dtype):
    v, x, u = vandermonde_problem(3, 5, 300, dtype, 6)
    got = ops.log_vandermonde_transpose(u, v, x, backend="native")
    want = log_vandermonde_transpose_ref(_c(u), _c(v), _c(x), 300)
    torch.testing.assert_close(_c(got), want, rtol=1e-5 if dtype == torch.complex64 else 1e-12, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(native_cpu, dtype):
    from torch.library import opcheck

    v, z, w = cauchy_problem(2, 3, 11, dtype, 7)
    vx, x, u = vandermonde_problem(2, 3, 11, dtype, 8)
    g = torch.randn(2, 11, dtype=dtype)
    grad = lambda *ts: tuple(t.clone().requires_grad_() for t in ts)  # noqa: E731
    cases = [
        (native_cpu.cauchy.default, grad(v, z, w)),
        (native_cpu.cauchy_backward.default, (g, v, z, w, True, True)),
        (native_cpu.cauchy_backward.default, (g, v, z, w, False, True)),
        (native_cpu.log_vandermonde.default, grad(vx, x) + (11,)),
        (native_cpu.vandermonde_moments.default, (u, x, True)),
        (native_cpu.vandermonde_moments.default, (u, x, False)),
        (native_cpu.log_vandermonde_transpose.default, grad(u, vx, x) + (11,)),
    ]
    for op, args in cases:
        result = opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


def test_double_backward_raises_clearly(native_cpu):
    v, z, w = (t.requires_grad_() for t in cauchy_problem(2, 3, 16, torch.complex128, 13))
    (grad_v,) = torch.autograd.grad(native_cpu.cauchy(v, z, w).abs().sum(), v, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        torch.autograd.grad(grad_v.abs().sum(), w)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_no_graph_break(native_cpu, compiler):
    """A function calling the ops compiles as one graph, forward and backward."""
    torch._dynamo.reset()

    def kernel(v, z, w, x, L: int):
        return native_cpu.cauchy(v, z, w).abs().sum() + native_cpu.log_vandermonde(v, x, L).sum()

    compiled = torch.compile(kernel, fullgraph=True, backend=compiler)
    v, z, w = cauchy_problem(2, 4, 16, torch.complex64, 9)
    x = vandermonde_problem(2, 4, 16, torch.complex64, 10)[1]
    v1, v2 = v.clone().requires_grad_(), v.clone().requires_grad_()
    loss_c, loss_e = compiled(v1, z, w, x, 16), kernel(v2, z, w, x, 16)
    torch.testing.assert_close(loss_c, loss_e)
    loss_c.backward()
    loss_e.backward()
    torch.testing.assert_close(v1.grad, v2.grad)


def test_compile_through_dispatch(native_cpu):
    """s4lib.ops.cauchy(..., backend='native') inside torch.compile(fullgraph=True)."""
    torch._dynamo.reset()
    v, z, w = cauchy_problem(2, 4, 16, torch.complex64, 11)
    f = torch.compile(lambda v, z, w: ops.cauchy(v, z, w, backend="native"), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(v, z, w), native_cpu.cauchy(v, z, w))


# ------------------------------------------------------------------ dispatch behaviour


def test_backend_status_and_supports(native_cpu):
    from s4lib.ops.native import BACKEND

    ok, reason = ops.backend_status("native")
    assert ok and "C++" in reason
    v, z, w = cauchy_problem(1, 2, 3, torch.complex64, 0)
    assert BACKEND.supports("cauchy", v, z, w) is None
    assert "dtype" in BACKEND.supports("cauchy", v.to(torch.complex32), z.to(torch.complex32), w.to(torch.complex32))
    assert "device" in BACKEND.supports("cauchy", v.to("meta"), z.to("meta"), w.to("meta"))


@pytest.mark.parametrize("mode", ["diag", "dplr"])
def test_layer_native_equals_naive(native_cpu, mode):
    from s4lib import S4Block

    torch.manual_seed(0)
    x = torch.randn(2, 8, 64)
    outs = []
    for backend in ("naive", "native"):
        torch.manual_seed(1)
        block = S4Block(8, d_state=16, mode=mode, backend=backend)
        xi = x.clone().requires_grad_()
        y, _ = block(xi)
        y.square().sum().backward()
        outs.append((y.detach(), xi.grad, [p.grad for p in block.parameters()]))
    (y0, gx0, gp0), (y1, gx1, gp1) = outs
    torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gx1, gx0, rtol=1e-4, atol=1e-5)
    for a, b in zip(gp1, gp0):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------------ Triton kernels (interpreted on CPU)


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _on(fn):
    """Run a Triton launcher on the test device and bring results back to the CPU."""
    def wrapped(*args):
        out = fn(*(a.to(_device()) if isinstance(a, torch.Tensor) else a for a in args))
        return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()
    return wrapped


@settings(max_examples=8)
@given(B=st.integers(1, 3), N=st.sampled_from([1, 3, 5, 33]), L=st.sampled_from([1, 7, 64, 129, 300]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16), general_z=st.booleans())
def test_triton_cauchy_matches_oracle(triton_kernels, B, N, L, dtype, seed, general_z):
    tk = triton_kernels
    check_cauchy(_on(tk.cauchy), _on(lambda g, v, z, w: tk.cauchy_backward(g, v, z, w, True, True)),
                 B, N, L, dtype, seed, general_z)


@settings(max_examples=8)
@given(B=st.integers(1, 3), N=st.sampled_from([1, 3, 5, 33]), L=st.sampled_from([1, 7, 64, 129, 300, 3000]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_triton_log_vandermonde_matches_oracle(triton_kernels, B, N, L, dtype, seed):
    tk = triton_kernels
    check_vandermonde(_on(tk.log_vandermonde), _on(lambda u, x: tk.vandermonde_moments(u, x, True)),
                      B, N, L, dtype, seed)


def test_triton_cauchy_extreme_ranges(triton_kernels):
    v, z, w = cauchy_problem(1, 3, 20, torch.complex64, 12)
    z[3] = 1e25 + 1j
    w[0, 1] = complex(-1e-21, 1e-20)
    z[4] = 0
    r = _on(triton_kernels.cauchy)(v, z, w)
    assert torch.isfinite(r).all()
    assert_within("triton cauchy (extreme)", r, cauchy_ref(_c(v), _c(z), _c(w)),
                  cauchy_scales(v, z, w, torch.ones(1, 20))[0], 6, torch.complex64)


def test_triton_kernels_compile_for_cuda():
    """Every kernel lowers through Triton's CUDA backend to a cubin (sm_80, fp32 and fp64), no GPU needed."""
    pytest.importorskip("triton") if not os.environ.get("CI") else __import__("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = "from s4lib.ops.triton_kernels import compile_for_cuda; print(len(compile_for_cuda()))"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "10"


# ------------------------------------------------------------------ threads


def test_kernels_give_the_same_result_on_any_number_of_threads(native_cpu):
    """The kernels split their work with at::parallel_for (compiled with OpenMP): every thread
    count gives the one-thread result. Outputs that one thread sums in a fixed order are equal bit
    for bit; the log-Vandermonde gradients add per-thread partial sums over L, so they agree to
    float32 rounding."""
    from s4lib.ops import native_build as nb

    assert "-fopenmp" in nb.build_flags() or sys.platform == "darwin"
    v, z, w = (t.requires_grad_() for t in cauchy_problem(7, 16, 301, torch.complex64, 21, distinct_poles=3))
    vv, x, _ = vandermonde_problem(5, 16, 9, torch.complex64, 22)
    vv.requires_grad_(), x.requires_grad_()
    g_c = torch.randn(7, 301, dtype=torch.complex64)
    g_v = torch.randn(5, 999)
    saved = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            r = native_cpu.cauchy(v, z, w)
            K = native_cpu.log_vandermonde(vv, x, 999)
            grads = torch.autograd.grad((r * g_c).real.sum() + (K * g_v).sum(), [v, z, w, vv, x])
            results.append([r.detach(), K.detach(), *grads])
    finally:
        torch.set_num_threads(saved)
    for other in results[1:]:
        for i, (a, b) in enumerate(zip(results[0], other)):
            if i < 5:  # cauchy forward and grads, log_vandermonde forward
                assert torch.equal(a, b), i
            else:
                assert (a - b).abs().max() <= 1e-5 * a.abs().max(), i


def _thread_cpu_ticks() -> dict[int, int]:
    """CPU time (user + system, clock ticks) of every thread of this process, from /proc."""
    ticks = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        ticks[int(tid)] = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks


def test_kernels_use_more_than_one_thread(native_cpu):
    """With two torch threads the Cauchy kernel's work lands on two threads. Counted per thread from
    /proc (each thread's own CPU time), so another job holding a core slows the kernel but does not
    change the count; where /proc is missing, CPU time against wall time (which needs an idle machine)."""
    import time

    if os.cpu_count() < 2:
        skip_unless_ci("one CPU: cannot show two threads at work (CI machines have two cores)")
    v, z, w = cauchy_problem(64, 32, 4096, torch.complex64, 23)
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        native_cpu.cauchy(v, z, w)
        if os.path.isdir("/proc/self/task"):
            before, cpu = _thread_cpu_ticks(), time.process_time()
            while time.process_time() - cpu < 1.0:  # at least 100 ticks of work in all
                native_cpu.cauchy(v, z, w)
            after = _thread_cpu_ticks()
            used = sorted((after[t] - before.get(t, 0) for t in after), reverse=True)
            share = used[1] / max(sum(used), 1) if len(used) > 1 else 0.0
            assert share > 0.2, f"per-thread CPU ticks {used[:4]}: the second thread did {share:.0%} of the work"
            return
        best = 0.0
        for _ in range(5):  # the best of five: a busy machine may deschedule one thread
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(3):
                native_cpu.cauchy(v, z, w)
            best = max(best, (time.process_time() - cpu) / (time.perf_counter() - wall))
    finally:
        torch.set_num_threads(saved)
    assert best > 1.2, f"CPU time / wall time = {best:.2f}: the kernel ran on one thread"


@pytest.mark.parametrize("mode", ["dplr", "diag"])
@pytest.mark.parametrize("warm", [False, True])
def test_compiled_layer_is_one_graph_and_matches_eager(native_cpu, mode, warm):
    """torch.compile(FFTConv, fullgraph=True): no graph break anywhere in the layer (the kernel
    length is a Python int, not a tensor read with .item()), same output and gradients as eager,
    whether or not C~ was attuned before compiling."""
    from s4lib import FFTConv

    torch._dynamo.reset()
    torch.manual_seed(5)
    layer = FFTConv(8, d_state=16, mode=mode, backend="native")
    eager_layer = FFTConv(8, d_state=16, mode=mode, backend="native")
    eager_layer.load_state_dict(layer.state_dict())
    x = torch.randn(2, 8, 64)
    if warm:
        layer(x), eager_layer(x)
    y, _ = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    y_eager, _ = eager_layer(x)
    torch.testing.assert_close(y, y_eager)
    y.square().sum().backward()
    y_eager.square().sum().backward()
    for (name, p), q in zip(layer.named_parameters(), eager_layer.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_attuned_kernel_length_survives_state_dict_round_trip():
    from s4lib import FFTConv

    layer = FFTConv(4, d_state=8, mode="dplr", backend="naive")
    layer(torch.randn(1, 4, 100))
    clone = FFTConv(4, d_state=8, mode="dplr", backend="naive")
    clone.load_state_dict(layer.state_dict())
    assert clone.kernel._l_kernel_int == layer.kernel._l_kernel_int == 100
    torch.testing.assert_close(clone(torch.ones(1, 4, 100))[0], layer(torch.ones(1, 4, 100))[0])
