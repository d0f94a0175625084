"""Kernel ops (Cauchy, log-Vandermonde): every backend against the float64 oracle, and the dispatch.

Backends under test: 'naive', 'chunked', 'keops' (skipped only if pykeops is not installed) and
any other that `s4lib.ops.available_backends()` lists when the tests are collected. Each call
goes through the public API with `backend=name` and fails if dispatch fell back to another one.
"""

import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from s4lib import ops
from s4lib.ops import dispatch
from s4lib.ops.reference import cauchy_ref, log_vandermonde_ref, log_vandermonde_transpose_ref

OWN_BACKENDS = ("naive", "chunked", "keops")
BACKENDS = list(OWN_BACKENDS) + [name for name in ops.available_backends() if name not in OWN_BACKENDS]
C64, C128 = torch.complex64, torch.complex128
ORACLES = {"cauchy": cauchy_ref, "log_vandermonde": log_vandermonde_ref,
           "log_vandermonde_transpose": log_vandermonde_transpose_ref}


@pytest.fixture(params=BACKENDS, scope="module")
def backend(request):
    name = request.param
    if name == "keops":
        pytest.importorskip("pykeops")
    ok, reason = ops.backend_status(name)
    assert ok, f"backend {name!r} is not available: {reason}"
    return name


def run(op, name, *args, **kwargs):
    """Call `s4lib.ops.<op>` on backend `name`; any fallback (warning or broken backend) fails."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out = getattr(ops, op)(*args, backend=name, **kwargs)
    assert name not in dispatch._broken, f"backend {name!r} broke: {dispatch._broken[name]}"
    return out


def max_rel_err(a, b):
    """max |a - b| / max |b| (b the reference), computed in float64."""
    a, b = a.detach().to(torch.promote_types(b.dtype, torch.float64)), b.detach()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


# ----------------------------------------------------------------------------------------------
# random inputs
# ----------------------------------------------------------------------------------------------

def rand_complex(gen, shape, dtype=C128):
    real = torch.randn(*shape, 2, generator=gen, dtype=torch.float64)
    return torch.view_as_complex(real).to(dtype)


def rand_poles(gen, shape):
    """Stable poles: Re in [-1, -0.05], Im ~ N(0, 16)."""
    re = -(0.05 + 0.95 * torch.rand(*shape, generator=gen, dtype=torch.float64))
    return torch.complex(re, 4 * torch.randn(*shape, generator=gen, dtype=torch.float64))


def rand_exponents(gen, shape):
    """S4D-like dt * Lambda: Re in [-0.3, -1e-3], Im in [-3, 3]."""
    re = -(1e-3 + 0.3 * torch.rand(*shape, generator=gen, dtype=torch.float64))
    return torch.complex(re, 6 * torch.rand(*shape, generator=gen, dtype=torch.float64) - 3)


@st.composite
def broadcast_case(draw, count):
    """(seed, N, L, batch shapes) where the `count` batch shapes broadcast against each other."""
    base = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    shapes = []
    for _ in range(count):
        shape = [d if draw(st.booleans()) else 1 for d in base]
        shapes.append(tuple(shape[draw(st.integers(0, len(shape))):]))
    N = draw(st.sampled_from([1, 2, 3, 5, 8, 9, 16]))
    L = draw(st.one_of(st.integers(1, 40), st.integers(41, 3000)))
    seed = draw(st.integers(0, 2**31 - 1))
    return seed, N, L, shapes


def grads(out, inputs, cotangent):
    return torch.autograd.grad(out, inputs, cotangent)


# ----------------------------------------------------------------------------------------------
# forward and gradients against the float64 oracle, on random broadcast shapes
# ----------------------------------------------------------------------------------------------

TOL64 = 1e-10


@settings(max_examples=12, deadline=None)
@given(case=broadcast_case(2))
def test_cauchy_matches_oracle(backend, case):
    seed, N, L, (shape_v, shape_w) = case
    gen = torch.Generator().manual_seed(seed)
    v = rand_complex(gen, (*shape_v, N)).requires_grad_()
    w = rand_poles(gen, (*shape_w, N)).requires_grad_()
    z = torch.complex(0.1 * torch.randn(L, generator=gen, dtype=torch.float64),
                      6 * torch.randn(L, generator=gen, dtype=torch.float64)).requires_grad_()
    ref = cauchy_ref(v, z, w)
    out = run("cauchy", backend, v, z, w)
    assert out.shape == ref.shape and out.dtype == C128
    assert max_rel_err(out, ref) < TOL64
    g = rand_complex(gen, ref.shape)
    for name, got, want in zip("vzw", grads(out, (v, z, w), g), grads(ref, (v, z, w), g)):
        assert got.shape == want.shape, name
        assert max_rel_err(got, want) < TOL64, name


@settings(max_examples=12, deadline=None)
@given(case=broadcast_case(2))
def test_log_vandermonde_matches_oracle(backend, case):
    seed, N, L, (shape_v, shape_x) = case
    gen = torch.Generator().manual_seed(seed)
    v = rand_complex(gen, (*shape_v, N)).requires_grad_()
    x = rand_exponents(gen, (*shape_x, N)).requires_grad_()
    ref = log_vandermonde_ref(v, x, L)
    out = run("log_vandermonde", backend, v, x, L)
    assert out.shape == ref.shape and out.dtype == torch.float64
    assert max_rel_err(out, ref) < TOL64
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    for name, got, want in zip("vx", grads(out, (v, x), g), grads(ref, (v, x), g)):
        assert got.shape == want.shape, name
        assert max_rel_err(got, want) < TOL64, name


@settings(max_examples=12, deadline=None)
@given(case=broadcast_case(3))
def test_log_vandermonde_transpose_matches_oracle(backend, case):
    seed, N, L, (shape_u, shape_v, shape_x) = case
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(*shape_u, L, generator=gen, dtype=torch.float64).requires_grad_()
    v = rand_complex(gen, (*shape_v, N)).requires_grad_()
    x = rand_exponents(gen, (*shape_x, N)).requires_grad_()
    ref = log_vandermonde_transpose_ref(u, v, x, L)
    out = run("log_vandermonde_transpose", backend, u, v, x, L)
    assert out.shape == ref.shape and out.dtype == C128
    assert max_rel_err(out, ref) < TOL64
    g = rand_complex(gen, ref.shape)
    for name, got, want in zip("uvx", grads(out, (u, v, x), g), grads(ref, (u, v, x), g)):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        assert max_rel_err(got, want) < TOL64, name


def test_empty_batch(backend):
    v = torch.zeros(0, 3, dtype=C128, requires_grad=True)
    w = rand_poles(torch.Generator().manual_seed(0), (0, 3)).requires_grad_()
    z = torch.ones(5, dtype=C128, requires_grad=True)
    u = torch.zeros(0, 5, dtype=torch.float64, requires_grad=True)
    r = run("cauchy", backend, v, z, w)
    K = run("log_vandermonde", backend, v, w, 5)
    s = run("log_vandermonde_transpose", backend, u, v, w, 5)
    assert r.shape == (0, 5) and K.shape == (0, 5) and s.shape == (0, 3)
    (r.abs().sum() + K.sum() + s.abs().sum()).backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


# ----------------------------------------------------------------------------------------------
# gradcheck in complex128
# ----------------------------------------------------------------------------------------------

def small_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        v=rand_complex(gen, (2, 3)).requires_grad_(),
        w=rand_poles(gen, (2, 3)).requires_grad_(),
        z=rand_complex(gen, (5,)).requires_grad_(),
        x=rand_exponents(gen, (2, 3)).requires_grad_(),
        u=torch.randn(2, 7, generator=gen, dtype=torch.float64).requires_grad_(),
    )


def test_gradcheck_cauchy(backend):
    t = small_inputs()
    assert torch.autograd.gradcheck(lambda v, z, w: run("cauchy", backend, v, z, w), (t["v"], t["z"], t["w"]))


def test_gradcheck_log_vandermonde(backend):
    t = small_inputs()
    assert torch.autograd.gradcheck(lambda v, x: run("log_vandermonde", backend, v, x, 7), (t["v"], t["x"]))


def test_gradcheck_log_vandermonde_transpose(backend):
    t = small_inputs()
    assert torch.autograd.gradcheck(lambda u, v, x: run("log_vandermonde_transpose", backend, u, v, x, 7),
                                    (t["u"], t["v"], t["x"]))


@pytest.mark.parametrize("name", OWN_BACKENDS)
def test_gradgradcheck_vandermonde(name):
    """naive, chunked and keops also give second derivatives of the Vandermonde ops."""
    if name == "keops":
        pytest.importorskip("pykeops")
    t = small_inputs(1)
    assert torch.autograd.gradgradcheck(lambda v, x: run("log_vandermonde", name, v, x, 7), (t["v"], t["x"]))
    assert torch.autograd.gradgradcheck(lambda u, v, x: run("log_vandermonde_transpose", name, u, v, x, 7),
                                        (t["u"], t["v"], t["x"]))


# ----------------------------------------------------------------------------------------------
# float32 (complex64) accuracy on S4-like parameters, relative to the float64 oracle
# ----------------------------------------------------------------------------------------------

def s4d_parameters(H=8, N=32, init="inv", seed=0):
    """dt * Lambda and ZOH-discretised C*B for S4D-Lin / S4D-Inv, dt log-uniform in [1e-3, 1e-1]."""
    gen = torch.Generator().manual_seed(seed)
    dt = torch.exp(math.log(1e-3) + math.log(100) * torch.rand(H, 1, generator=gen, dtype=torch.float64))
    n = torch.arange(N, dtype=torch.float64)
    imag = math.pi * n if init == "lin" else (N / math.pi) * (N / (2 * n + 1) - 1)
    Lambda = torch.complex(torch.full((H, N), -0.5, dtype=torch.float64), imag.expand(H, N))
    C = rand_complex(gen, (H, N))
    x = dt * Lambda
    return C * (torch.exp(x) - 1) / Lambda, x, dt


def float32_errors(name, op, inputs32, args, cotangent):
    """Max relative errors (output, then each input's gradient) of a float32 run against the
    float64 oracle on the same (float32-representable) inputs. name=None runs the oracle in float32."""
    inputs32 = [t.detach().clone().requires_grad_() for t in inputs32]
    inputs64 = [t.detach().to(C128 if t.is_complex() else torch.float64).requires_grad_() for t in inputs32]
    ref = ORACLES[op](*inputs64, *args)
    out = ORACLES[op](*inputs32, *args) if name is None else run(op, name, *inputs32, *args)
    g64 = cotangent.to(ref.dtype)
    errors = [max_rel_err(out, ref)]
    for got, want in zip(grads(out, inputs32, g64.to(out.dtype)), grads(ref, inputs64, g64)):
        errors.append(max_rel_err(got, want))
    return errors


def float32_case(op, H=8, N=32, L=4096):
    """(inputs, extra args, output cotangent) for one op on S4-like float32 parameters."""
    gen = torch.Generator().manual_seed(3)
    if op == "log_vandermonde":
        v, x, _ = s4d_parameters(H, N, init="inv")
        return (v.to(C64), x.to(C64)), (L,), torch.randn(H, L, generator=gen, dtype=torch.float64)
    if op == "log_vandermonde_transpose":
        v, x, _ = s4d_parameters(H, N, init="lin", seed=1)
        u = torch.randn(H, L, generator=gen)
        return (u, v.to(C64), x.to(C64)), (L,), rand_complex(gen, (H, N))
    # S4: Cauchy against dt * Lambda at the bilinear nodes z = 2 (1 - omega)/(1 + omega),
    # omega = exp(-2 pi i k / L), k < L/2 (the node omega = -1 is left out).
    _, x, _ = s4d_parameters(H, N, init="lin", seed=2)
    omega = torch.exp(-2j * math.pi * torch.arange(L // 2, dtype=torch.float64) / L)
    z = 2 * (1 - omega) / (1 + omega)
    return (rand_complex(gen, (H, N), C64), z.to(C64), x.to(C64)), (), rand_complex(gen, (H, L // 2))


OPS = ["cauchy", "log_vandermonde", "log_vandermonde_transpose"]


@pytest.mark.parametrize("op", OPS)
def test_float32_accuracy(backend, op):
    """No backend is less accurate than the plain float32 computation (the oracle run in float32)."""
    inputs, args, cotangent = float32_case(op)
    plain = float32_errors(None, op, inputs, args, cotangent)
    errors = float32_errors(backend, op, inputs, args, cotangent)
    for what, err, base in zip(["output"] + [f"grad of input {i}" for i in range(len(inputs))], errors, plain):
        assert err <= 2 * base + 1e-6, f"{op} {what}: error {err:.2e} vs plain float32 {base:.2e}"


@pytest.mark.parametrize("op", OPS)
def test_chunked_float32_round_off(op):
    """'chunked' stays at float32 round-off relative to the largest value, whatever L (measured <= 4e-7)."""
    inputs, args, cotangent = float32_case(op)
    errors = float32_errors("chunked", op, inputs, args, cotangent)
    assert max(errors) < 1e-6, errors


@pytest.mark.parametrize("budget", [1, 700, 5000])
def test_chunked_many_tiles(monkeypatch, budget):
    """Tiny byte budgets force ragged tiles over batch and L (and one-row Vandermonde slices)."""
    from s4lib.ops import chunked
    monkeypatch.setattr(chunked, "CHUNK_BYTES", budget)
    monkeypatch.setattr(chunked, "CAUCHY_TILE_BYTES_CPU", budget)
    gen = torch.Generator().manual_seed(budget)
    B, N, L = 5, 3, 37
    v = rand_complex(gen, (B, N)).requires_grad_()
    w = rand_poles(gen, (B, N)).requires_grad_()
    x = rand_exponents(gen, (B, N)).requires_grad_()
    z = rand_complex(gen, (L,)).requires_grad_()
    u = torch.randn(B, L, generator=gen, dtype=torch.float64).requires_grad_()
    for op, inputs, args in [("cauchy", (v, z, w), ()), ("log_vandermonde", (v, x), (L,)),
                             ("log_vandermonde_transpose", (u, v, x), (L,))]:
        out, ref = run(op, "chunked", *inputs, *args), ORACLES[op](*inputs, *args)
        assert max_rel_err(out, ref) < TOL64, op
        g = rand_complex(gen, ref.shape) if ref.is_complex() else torch.randn(ref.shape, generator=gen, dtype=ref.dtype)
        for got, want in zip(grads(out, inputs, g), grads(ref, inputs, g)):
            assert max_rel_err(got, want) < TOL64, op


# ----------------------------------------------------------------------------------------------
# 'chunked' memory: never a (B, N, L) tensor
# ----------------------------------------------------------------------------------------------

MEMORY_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    from s4lib import ops

    def status_kib(field):  # VmHWM (peak RSS) is per address space; ru_maxrss survives exec
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    torch.set_num_threads(1)                 # deterministic allocations, robust to a busy machine
    B, N, L = 8, 128, 32768                  # one (B, N, L) complex64 tensor is 256 MiB
    v = torch.randn(B, N, dtype=torch.complex64, requires_grad=True)
    w = torch.complex(-0.5 * torch.ones(B, N), 10 * torch.randn(B, N)).requires_grad_()
    x = (0.01 * w).detach().requires_grad_()
    z = torch.complex(torch.zeros(L), torch.linspace(-50, 50, L)).requires_grad_()
    ops.cauchy(v, z[:8], w, backend="chunked").abs().sum().backward()      # warm up
    ops.log_vandermonde(v, x, 8, backend="chunked").sum().backward()
    ops.log_vandermonde_transpose(torch.randn(B, 8), v, x, 8, backend="chunked").abs().sum().backward()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                         # reset VmHWM to the current RSS
    rss_before = status_kib("VmRSS")
    ops.cauchy(v, z, w, backend="chunked").abs().sum().backward()
    ops.log_vandermonde(v, x, L, backend="chunked").sum().backward()
    ops.log_vandermonde_transpose(torch.randn(B, L), v, x, L, backend="chunked").abs().sum().backward()
    print((status_kib("VmHWM") - rss_before) * 1024)
""")


def test_chunked_memory_is_bounded():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, root], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    growth = int(result.stdout.split()[-1])
    # the outputs, gradients and cotangents are (B, L) (2 MiB each); a quarter of one (B, N, L) tensor:
    assert growth < 64 * 2**20, f"peak RSS grew by {growth / 2**20:.0f} MiB (one (B, N, L) tensor is 256 MiB)"


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------

def spy(monkeypatch, name, op="cauchy"):
    """Count the calls that reach backend `name`'s real implementation of `op`."""
    impl = dispatch.get_backend(name)
    calls = []
    real = getattr(impl, op)

    def counted(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(impl, op, counted)
    return calls


def cauchy_inputs(dtype=C128):
    t = small_inputs()
    return t["v"].detach().to(dtype), t["z"].detach().to(dtype), t["w"].detach().to(dtype)


def test_explicit_backend_argument_wins(monkeypatch):
    monkeypatch.setenv("S4LIB_BACKEND", "chunked")
    naive_calls, chunked_calls = spy(monkeypatch, "naive"), spy(monkeypatch, "chunked")
    v, z, w = cauchy_inputs()
    out = ops.cauchy(v, z, w, backend="naive")
    assert len(naive_calls) == 1 and not chunked_calls
    torch.testing.assert_close(out, cauchy_ref(v, z, w))


def test_environment_variable_selects_backend(monkeypatch):
    naive_calls, chunked_calls = spy(monkeypatch, "naive"), spy(monkeypatch, "chunked")
    v, z, w = cauchy_inputs()
    monkeypatch.setenv("S4LIB_BACKEND", " Naive ")
    ops.cauchy(v, z, w)
    assert len(naive_calls) == 1 and not chunked_calls
    monkeypatch.setenv("S4LIB_BACKEND", "chunked")
    ops.cauchy(v, z, w)
    assert len(naive_calls) == 1 and len(chunked_calls) == 1


def test_unknown_backend_is_a_value_error_naming_the_choices(monkeypatch):
    v, z, w = cauchy_inputs()
    with pytest.raises(ValueError) as info:
        ops.cauchy(v, z, w, backend="cudnn")
    for choice in dispatch.BACKEND_NAMES:
        assert repr(choice) in str(info.value)
    monkeypatch.setenv("S4LIB_BACKEND", "fastest")
    with pytest.raises(ValueError, match="S4LIB_BACKEND"):
        ops.log_vandermonde(v, w, 4)


class FailingBackend:
    """A backend that is available but raises at compute time."""

    name = "native"

    def __init__(self):
        self.calls = 0

    def status(self):
        return True, "fake"

    def supports(self, op, *tensors):
        return None

    def cauchy(self, *args):
        self.calls += 1
        raise RuntimeError("simulated kernel fault")

    log_vandermonde = log_vandermonde_transpose = cauchy


def test_failing_backend_warns_once_and_falls_back(monkeypatch):
    fake = FailingBackend()
    monkeypatch.setitem(dispatch._loaded, "native", fake)
    monkeypatch.setattr(dispatch, "_broken", {})
    monkeypatch.setattr(dispatch, "_warned", set())
    v, z, w = cauchy_inputs()
    with pytest.warns(RuntimeWarning) as record:
        out = ops.cauchy(v, z, w, backend="native")
    messages = [str(r.message) for r in record if issubclass(r.category, RuntimeWarning)]
    assert len(messages) == 1 and "native" in messages[0] and "simulated kernel fault" in messages[0]
    torch.testing.assert_close(out, cauchy_ref(v, z, w))
    assert not ops.backend_status("native")[0]
    with warnings.catch_warnings():  # broken now: skipped silently, never called again
        warnings.simplefilter("error")
        out = ops.cauchy(v, z, w, backend="native")
    torch.testing.assert_close(out, cauchy_ref(v, z, w))
    assert fake.calls == 1


def test_keops_status_reports_missing_pykeops(monkeypatch):
    from s4lib.ops import keops as keops_backend
    monkeypatch.setattr(keops_backend, "_state", {"module": None, "import_error": None, "compile_error": None})
    monkeypatch.setitem(sys.modules, "pykeops", None)  # makes `import pykeops` fail
    ok, reason = keops_backend.BACKEND.status()
    assert not ok and "pykeops" in reason


def test_keops_compile_failure_is_reported_and_falls_back(monkeypatch):
    """A formula KeOps cannot build: status() says why, dispatch warns once and falls back."""
    pytest.importorskip("pykeops")
    from s4lib.ops import keops as keops_backend
    assert keops_backend.BACKEND.status()[0]
    monkeypatch.setattr(keops_backend, "_state", dict(keops_backend._state))
    monkeypatch.setattr(keops_backend, "_reductions", {})
    aliases = keops_backend._FORMULAS["cauchy1"][1]
    monkeypatch.setitem(keops_backend._FORMULAS, "cauchy1", ("NoSuchOperation(C, P - Q)", aliases))
    monkeypatch.setattr(dispatch, "_broken", {})
    monkeypatch.setattr(dispatch, "_warned", set())
    v, z, w = cauchy_inputs()
    with pytest.warns(RuntimeWarning, match="keops.*NoSuchOperation"):
        out = ops.cauchy(v, z, w, backend="keops")
    torch.testing.assert_close(out, cauchy_ref(v, z, w))
    assert not ops.backend_status("keops")[0]
    ok, reason = keops_backend.BACKEND.status()
    assert not ok and "cauchy1" in reason and "NoSuchOperation" in reason


# ----------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------

def test_real_inputs_are_type_errors():
    v, z, w = cauchy_inputs()
    with pytest.raises(TypeError, match="complex"):
        ops.cauchy(v.real, z, w)
    with pytest.raises(TypeError, match="complex"):
        ops.cauchy(v, z.real, w)
    with pytest.raises(TypeError, match="complex"):
        ops.log_vandermonde(v, w.real, 4)
    with pytest.raises(TypeError, match="real"):
        ops.log_vandermonde_transpose(torch.zeros(2, 4, dtype=C128), v, w, 4)
    with pytest.raises(TypeError):
        ops.cauchy(v.to(C64), z, w)  # mixed complex dtypes


def test_mismatched_state_size_is_a_value_error():
    v, z, w = cauchy_inputs()
    with pytest.raises(ValueError, match="last dimension"):
        ops.cauchy(v, z, w[:, :2])
    with pytest.raises(ValueError, match="last dimension"):
        ops.log_vandermonde(v, w[:, :2], 4)
    with pytest.raises(ValueError, match="last dimension"):
        ops.log_vandermonde_transpose(torch.zeros(2, 4, dtype=torch.float64), v, w[:, :2], 4)


def test_non_broadcasting_batch_is_a_value_error():
    v, z, w = cauchy_inputs()
    w3 = torch.cat([w, w[:1]])  # (3, N) against (2, N)
    with pytest.raises(ValueError, match="broadcast"):
        ops.cauchy(v, z, w3)
    with pytest.raises(ValueError, match="broadcast"):
        ops.log_vandermonde(v, w3, 4)
    with pytest.raises(ValueError, match="broadcast"):
        ops.log_vandermonde_transpose(torch.zeros(3, 4, dtype=torch.float64), v, w, 4)


@pytest.mark.parametrize("L", [0, -3, 2.0, True])
def test_length_below_one_or_not_an_int_is_a_value_error(L):
    v, z, w = cauchy_inputs()
    with pytest.raises(ValueError, match="L must be a positive int"):
        ops.log_vandermonde(v, w, L)
    with pytest.raises(ValueError):
        ops.log_vandermonde_transpose(torch.zeros(2, 4, dtype=torch.float64), v, w, L)


def test_empty_state_dimension_and_nodes_are_rejected():
    v = torch.zeros(3, 0, dtype=torch.complex64)
    with pytest.raises(ValueError, match="N >= 1"):
        ops.cauchy(v, torch.ones(4, dtype=torch.complex64), v)
    with pytest.raises(ValueError, match="N >= 1"):
        ops.log_vandermonde(v, v, 5)
    with pytest.raises(ValueError, match="N >= 1"):
        ops.log_vandermonde_transpose(torch.zeros(3, 5), v, v, 5)
    w = torch.ones(3, 2, dtype=torch.complex64)
    with pytest.raises(ValueError, match="L >= 1"):
        ops.cauchy(w, torch.zeros(0, dtype=torch.complex64), w)
