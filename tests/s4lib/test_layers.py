"""FFTConv / S4Block: input validation, dtypes and devices, serialisation, checkpoint compatibility,
optimiser groups, gradients, and agreement across kernel backends."""

import io
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import s4lib
from s4lib import FFTConv, S4Block, ops
from s4lib.compat import convert_state_spaces_state_dict, load_state_spaces


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("mode", ["dplr", "diag"])
def test_bad_inputs_name_the_expected_shape(mode):
    block = S4Block(8, d_state=8, mode=mode, backend="naive")
    with pytest.raises(ValueError, match=r"\(batch, d_model=8, length\)"):
        block(torch.randn(8, 16))  # missing batch dimension
    with pytest.raises(ValueError, match=r"expected 8"):
        block(torch.randn(2, 5, 16))  # wrong channel count
    with pytest.raises(TypeError, match="floating-point"):
        block(torch.randint(0, 3, (2, 8, 16)))
    with pytest.raises(TypeError, match="torch.Tensor"):
        block([[0.0] * 16] * 8)
    block_t = S4Block(8, d_state=8, mode=mode, transposed=False, backend="naive")
    with pytest.raises(ValueError, match=r"\(batch, length, d_model=8\)"):
        block_t(torch.randn(2, 8, 16))
    block.setup_step()
    with pytest.raises(ValueError, match=r"\(batch, d_model=8\)"):
        block.step(torch.randn(2, 3), block.default_state(2))
    with pytest.raises(ValueError, match="state must have shape"):
        block(torch.randn(2, 8, 16), state=block.default_state(3))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="even"):
        FFTConv(4, d_state=7)
    with pytest.raises(ValueError, match="unknown mode"):
        FFTConv(4, mode="s5")
    with pytest.raises(ValueError, match="n_ssm"):
        FFTConv(6, n_ssm=4)
    with pytest.raises(ValueError, match="unknown init"):
        FFTConv(4, mode="diag", init="legz")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        FFTConv(4, backend="cuda-magic")
    with pytest.raises(RuntimeError, match="setup_step"):
        FFTConv(4).step(torch.randn(1, 4), None)


@pytest.mark.parametrize("mode", ["dplr", "diag"])
@pytest.mark.parametrize("L", [1, 2, 3, 97, 1000])
def test_any_length_gives_finite_output(mode, L):
    block = S4Block(4, d_state=8, mode=mode, backend="naive")
    y, _ = block(torch.randn(2, 4, L))
    assert y.shape == (2, 4, L) and torch.isfinite(y).all()


# ----------------------------------------------------------------------------- dtypes, devices, serialisation

@pytest.mark.parametrize("mode", ["dplr", "diag"])
def test_float64_and_to(mode):
    torch.manual_seed(0)
    block = S4Block(4, d_state=8, mode=mode, backend="naive").eval()
    x = torch.randn(2, 4, 64)
    y32, _ = block(x)
    block64 = block.to(torch.float64)
    y64, _ = block64(x.double())
    assert y64.dtype == torch.float64
    assert torch.allclose(y32.double(), y64, atol=1e-4)
    block64.setup_step()
    y_t, _ = block64.step(x[..., 0].double(), block64.default_state(2))
    assert y_t.dtype == torch.float64
    assert block64.default_state(2).dtype == torch.complex128


@pytest.mark.parametrize("mode", ["dplr", "diag"])
def test_state_dict_round_trip_through_torch_save(mode):
    torch.manual_seed(0)
    a = S4Block(6, d_state=8, mode=mode, channels=2, backend="naive").eval()
    x = torch.randn(1, 6, 100)
    y_a, _ = a(x)  # attunes C~ (DPLR): the checkpoint must carry l_kernel with it
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    torch.manual_seed(1)
    b = S4Block(6, d_state=8, mode=mode, channels=2, backend="naive").eval()
    b.load_state_dict(sd)
    y_b, _ = b(x)
    assert torch.equal(y_a, y_b)


# ----------------------------------------------------------------------------- state-spaces v4 checkpoints

def v4_fixture(H, n, channels, rank, l_kernel, generator):
    """A state_dict with the key names, shapes and conventions of state-spaces/s4 v4's S4Block (mode='dplr')."""
    g = generator
    sd = {
        "layer.D": torch.randn(channels, H, generator=g),
        "layer.kernel.inv_dt": torch.rand(H, 1, generator=g) * (math.log(0.1) - math.log(0.001)) + math.log(0.001),
        "layer.kernel.A_real": torch.log(0.5 + torch.rand(H, n, generator=g)),
        "layer.kernel.A_imag": torch.rand(H, n, generator=g) * 10,
        "layer.kernel.B": torch.randn(1, H, n, 2, generator=g),
        "layer.kernel.C": torch.randn(channels, H, n, 2, generator=g),
        "layer.kernel.P": 0.5 * torch.randn(rank, H, n, 2, generator=g),
        "layer.kernel.l_kernel": torch.tensor(l_kernel),
        "output_linear.0.weight": torch.randn(2 * H, channels * H, generator=g) / H,
        "output_linear.0.bias": torch.randn(2 * H, generator=g),
    }
    return sd


def v4_reference_output(sd, x):
    """The v4 model's output computed from its raw parameters in the FULL complex space, float64.

    v4 semantics: A = -exp(A_real) - i A_imag (n kept eigenvalues; full space adds conjugates),
    A_full = diag(A, conj A) - P_f P_f^*, bilinear discretisation, y = C_f^T x_f with C~ = C (I - dA^L)
    stored when l_kernel > 0, y += D u, then GELU, then Linear + GLU.
    """
    c = lambda t: torch.view_as_complex(t.double().contiguous())
    A = -torch.exp(sd["layer.kernel.A_real"].double()) - 1j * sd["layer.kernel.A_imag"].double()
    B, C, P = c(sd["layer.kernel.B"])[0], c(sd["layer.kernel.C"]), c(sd["layer.kernel.P"])
    dt = torch.exp(sd["layer.kernel.inv_dt"].double())[:, 0]
    full = lambda t: torch.cat([t, t.conj()], -1)
    H, n = A.shape
    L, Lk = x.shape[-1], int(sd["layer.kernel.l_kernel"])
    Bx, Cx = full(B), full(C)  # (H, 2n), (ch, H, 2n)
    Pf = full(P)  # (r, H, 2n)
    Af = torch.diag_embed(full(A)) - torch.einsum("rhi,rhj->hij", Pf, Pf.conj())
    eye = torch.eye(2 * n, dtype=torch.complex128)
    lhs = eye - dt[:, None, None] / 2 * Af
    dA = torch.linalg.solve(lhs, eye + dt[:, None, None] / 2 * Af)
    dB = torch.linalg.solve(lhs, (dt[:, None] * Bx)[..., None])[..., 0]
    if Lk > 0:  # C holds C~: C^T = C~^T (I - dA^Lk)^{-1}
        M = eye - torch.linalg.matrix_power(dA, Lk)
        Cx = torch.linalg.solve(M.transpose(-1, -2).unsqueeze(0), Cx.unsqueeze(-1))[..., 0]
    K = []
    state = dB.clone()
    for _ in range(L):
        K.append(torch.einsum("chn,hn->ch", Cx, state).real)
        state = torch.einsum("hij,hj->hi", dA, state)
    K = torch.stack(K, -1)  # (ch, H, L)
    u = x.double()
    y = torch.zeros(u.shape[0], K.shape[0], H, L, dtype=torch.float64)
    for t in range(L):
        y[..., t] = torch.einsum("chj,bhj->bch", K[..., : t + 1].flip(-1), u[..., : t + 1])
    y = y + u.unsqueeze(1) * sd["layer.D"].double()[..., None]
    y = torch.nn.functional.gelu(y.reshape(u.shape[0], -1, L)).transpose(-1, -2)
    y = torch.nn.functional.linear(y, sd["output_linear.0.weight"].double(), sd["output_linear.0.bias"].double())
    return torch.nn.functional.glu(y, dim=-1).transpose(-1, -2)


@pytest.mark.parametrize("l_kernel", [0, 64])
@pytest.mark.parametrize("rank,channels", [(1, 1), (2, 2)])
def test_load_state_spaces_v4_checkpoint(l_kernel, rank, channels):
    g = torch.Generator().manual_seed(0)
    H, n = 4, 4
    sd = v4_fixture(H, n, channels, rank, l_kernel, g)
    block = S4Block(H, d_state=2 * n, mode="dplr", rank=rank, channels=channels, backend="naive").double().eval()
    load_state_spaces(block, sd)
    x = torch.randn(2, H, 64, generator=g, dtype=torch.float64)
    y, _ = block(x)
    assert (y - v4_reference_output(sd, x)).abs().max() < 1e-9
    # and the recurrence of the loaded model reproduces it
    block.setup_step()
    state = block.default_state(2)
    ys = []
    for t in range(64):
        y_t, state = block.step(x[..., t], state)
        ys.append(y_t)
    assert (torch.stack(ys, -1) - y).abs().max() < 1e-9


def test_load_state_spaces_s4d_and_errors():
    g = torch.Generator().manual_seed(0)
    sd = v4_fixture(4, 4, 1, 1, 0, g)
    sd = {k: v for k, v in sd.items() if not (k.endswith(".P") or k.endswith("l_kernel"))}
    block = S4Block(4, d_state=8, mode="diag", backend="naive").double()
    load_state_spaces(block, sd)
    assert torch.allclose(block.layer.kernel.Lambda_im, sd["layer.kernel.A_imag"].double())
    assert "layer.kernel.log_dt" in convert_state_spaces_state_dict(sd)
    wrong = S4Block(4, d_state=16, mode="diag", backend="naive")
    with pytest.raises(ValueError, match="architecture"):
        load_state_spaces(wrong, sd)
    other_transform = S4Block(4, d_state=8, mode="diag", real_transform="softplus", backend="naive")
    with pytest.raises(ValueError, match="real_transform"):
        load_state_spaces(other_transform, sd)


# ----------------------------------------------------------------------------- optimiser marks

def test_param_groups_from_marks():
    block = S4Block(4, d_state=8, mode="dplr", lr={"A": 1e-3, "B": 2e-3, "dt": 0.0}, backend="naive")
    kernel = block.layer.kernel
    assert "log_dt" in dict(kernel.named_buffers())  # lr 0 freezes dt
    groups = s4lib.param_groups(block, weight_decay=0.1, lr=1e-2)
    by_lr = {g.get("lr"): g for g in groups}
    assert {id(p) for p in by_lr[1e-3]["params"]} == {id(kernel.Lambda_re), id(kernel.Lambda_im), id(kernel.P)}
    assert by_lr[1e-3]["weight_decay"] == 0.0 and by_lr[2e-3]["params"][0] is kernel.B
    plain = by_lr[1e-2]
    assert plain["weight_decay"] == 0.1 and any(p is kernel.C for p in plain["params"])
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len([p for p in block.parameters()])
    opt = torch.optim.AdamW(groups)
    y, _ = block(torch.randn(1, 4, 32))
    y.sum().backward()
    opt.step()


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("mode", ["dplr", "diag"])
def test_layer_gradcheck_float64(mode):
    torch.manual_seed(0)
    layer = FFTConv(2, d_state=4, mode=mode, backend="naive", activation="tanh").double()
    layer(torch.randn(1, 2, 12, dtype=torch.float64))  # attune C~ first (not differentiable by design)
    names = ["kernel.log_dt", "kernel.Lambda_re", "kernel.Lambda_im", "kernel.B", "kernel.C", "D"]
    if mode == "dplr":
        names.append("kernel.P")
    params = {k: v.detach().clone().requires_grad_(True) for k, v in layer.named_parameters() if k in names}
    x = torch.randn(1, 2, 12, dtype=torch.float64, requires_grad=True)

    def f(x, *values):
        return torch.func.functional_call(layer, dict(zip(params, values)), (x,))[0]

    assert torch.autograd.gradcheck(f, (x, *params.values()))


# ----------------------------------------------------------------------------- backends agree

@pytest.mark.parametrize("mode", ["dplr", "diag"])
def test_layer_outputs_and_gradients_agree_across_backends(mode):
    backends = [b for b in ops.available_backends() if b != "naive"]
    torch.manual_seed(0)
    ref = S4Block(8, d_state=16, mode=mode, backend="naive")
    x = torch.randn(2, 8, 300)
    y_ref, _ = ref(x)
    y_ref.square().sum().backward()
    grads_ref = {k: p.grad.clone() for k, p in ref.named_parameters()}
    for backend in backends:
        other = S4Block(8, d_state=16, mode=mode, backend=backend)
        other.load_state_dict(ref.state_dict())
        y, _ = other(x)
        y.square().sum().backward()
        assert (y - y_ref).abs().max() <= 1e-4 * y_ref.abs().max(), backend
        for k, p in other.named_parameters():
            assert (p.grad - grads_ref[k]).abs().max() <= 1e-3 * grads_ref[k].abs().max() + 1e-6, (backend, k)


# ----------------------------------------------------------------------------- block options

def test_block_options_and_aliases():
    torch.manual_seed(0)
    block = S4Block(8, d_state=8, gate=2, bottleneck=2, mode="diag", backend="naive").eval()
    x = torch.randn(2, 8, 50)
    y, _ = block(x, lengths=torch.tensor([50, 20]))
    y_full, _ = block(x)
    x_masked = x.clone()
    x_masked[1, :, 20:] = 0
    y_masked, _ = block(x_masked)
    assert torch.allclose(y[1], y_masked[1], atol=1e-6) and torch.allclose(y[0], y_full[0])
    cache = block.allocate_inference_cache(3, 100)
    assert cache.shape == block.default_state(3).shape
    block.setup_step()
    ys, state = [], block.default_state(2)
    for t in range(50):
        y_t, state = block.step(x[..., t], state)
        ys.append(y_t)
    assert (torch.stack(ys, -1) - y_full).abs().max() <= 1e-4 * y_full.abs().max()


@settings(max_examples=10, deadline=None)
@given(transposed=st.booleans(), channels=st.integers(1, 3), mode=st.sampled_from(["dplr", "diag"]),
       L=st.integers(1, 200), l_max=st.one_of(st.none(), st.integers(1, 256)))
def test_shapes_and_l_max(transposed, channels, mode, L, l_max):
    block = S4Block(4, d_state=8, channels=channels, mode=mode, transposed=transposed, l_max=l_max, backend="naive")
    x = torch.randn(3, 4, L) if transposed else torch.randn(3, L, 4)
    y, state = block(x)
    assert y.shape == x.shape and state is None and torch.isfinite(y).all()


# ----------------------------------------------------------------------------- fft_conv

def _circular_conv_reference(u, K, n, D):
    """float64 oracle: y[b, c, h, t] = sum_s u[b, h, s] K[c, h, (t - s) mod n] + D[c, h] u[b, h, t], t < L."""
    B, H, L = u.shape
    C, _, Lk = K.shape
    Kp = torch.zeros(C, H, n, dtype=K.dtype)
    Kp[..., :Lk] = K
    t = torch.arange(L)[:, None]
    s = torch.arange(L)[None, :]
    circ = Kp[..., (t - s) % n]  # (C, H, L_t, L_s)
    y = torch.einsum("chts,bhs->bcht", circ, u)
    if D is not None:
        y = y + D[None, :, :, None] * u[:, None]
    return y


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), C=st.integers(1, 3), H=st.integers(1, 5), L=st.integers(1, 40),
       Lk=st.integers(1, 40), extra=st.integers(0, 9), with_D=st.booleans(),
       block_bytes=st.sampled_from([1, 700, 2**23]), dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 2**16))
def test_fft_conv_matches_float64_circular_convolution(B, C, H, L, Lk, extra, with_D, block_bytes, dtype, seed):
    """fft_conv (channel blocks of any size, hand-written backward) against a float64 circulant sum."""
    import s4lib.fftconv as fc

    g = torch.Generator().manual_seed(seed)
    n = max(L, Lk) + extra
    u = torch.randn(B, H, L, generator=g, dtype=torch.float64)
    K = torch.randn(C, H, Lk, generator=g, dtype=torch.float64)
    D = torch.randn(C, H, generator=g, dtype=torch.float64) if with_D else None
    w = torch.randn(B, C, H, L, generator=g, dtype=torch.float64)
    leaves = [u, K] + ([D] if with_D else [])
    ref_in = [t.clone().requires_grad_() for t in leaves]
    y_ref = _circular_conv_reference(ref_in[0], ref_in[1], n, ref_in[2] if with_D else None)
    grads_ref = torch.autograd.grad((y_ref * w).sum(), ref_in)
    old = fc.SPECTRUM_BLOCK_BYTES
    fc.SPECTRUM_BLOCK_BYTES = block_bytes
    try:
        ins = [t.to(dtype).requires_grad_() for t in leaves]
        y = fc.fft_conv(ins[0], ins[1], n, D=ins[2] if with_D else None)
        grads = torch.autograd.grad((y * w.to(dtype)).sum(), ins)
    finally:
        fc.SPECTRUM_BLOCK_BYTES = old
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert y.shape == (B, C, H, L) and y.dtype == dtype
    assert (y.double() - y_ref).abs().max() <= tol * (1 + y_ref.abs().max())
    for got, want in zip(grads, grads_ref):
        assert got.shape == want.shape
        assert (got.double() - want).abs().max() <= tol * (1 + want.abs().max())


def test_fft_conv_gradcheck_and_bad_sizes():
    torch.manual_seed(0)
    u = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    K = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    D = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, K, D: s4lib.fftconv.fft_conv(u, K, 12, D=D), (u, K, D))
    assert torch.autograd.gradgradcheck(lambda u, K, D: s4lib.fftconv.fft_conv(u, K, 12, D=D), (u, K, D))
    with pytest.raises(ValueError, match="FFT size"):
        s4lib.fftconv.fft_conv(u, K, 6)
    with pytest.raises(TypeError, match="real"):
        s4lib.fftconv.fft_conv(u.to(torch.complex128), K, 12)


def test_fft_conv_half_inputs_compute_in_float32():
    """bfloat16 inputs (as CPU autocast hands them over) are convolved in float32, forward and backward."""
    torch.manual_seed(1)
    u = torch.randn(2, 3, 40).bfloat16().requires_grad_()
    K = torch.randn(1, 3, 40).bfloat16().requires_grad_()
    D = torch.randn(1, 3).requires_grad_()
    y = s4lib.fftconv.fft_conv(u, K, 80, D=D)
    assert y.dtype == torch.float32
    y.square().sum().backward()
    u32, K32, D32 = (t.detach().float().requires_grad_() for t in (u, K, D))
    y32 = s4lib.fftconv.fft_conv(u32, K32, 80, D=D32)
    y32.square().sum().backward()
    torch.testing.assert_close(y, y32)
    assert u.grad.dtype == torch.bfloat16 and K.grad.dtype == torch.bfloat16
    torch.testing.assert_close(u.grad.float(), u32.grad.bfloat16().float())
    torch.testing.assert_close(D.grad, D32.grad)
