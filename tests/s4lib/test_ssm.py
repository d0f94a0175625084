"""SSM kernels against float64 references; convolution vs recurrence; state forwarding; Hurwitz stability."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from s4lib import FFTConv, S4Block, SSMKernelDiag, SSMKernelDPLR
from s4lib.discretize import dplr_real_matrix

from reference_ssm import causal_conv, dense_kernel_dplr, diag_kernel

BACKEND = "naive"  # these tests check the SSM math; tests/test_ops.py checks the backends


@settings(max_examples=25, deadline=None)
@given(H=st.integers(1, 4), half=st.integers(1, 8), L=st.integers(1, 130), channels=st.integers(1, 2),
       init=st.sampled_from(["legs", "fout", "lagt", "legt", "dplr-random", "legs+diag-inv"]),
       hurwitz=st.booleans(), seed=st.integers(0, 2**16))
def test_dplr_kernel_matches_dense_powers(H, half, L, channels, init, hurwitz, seed):
    torch.manual_seed(seed)
    rank = 2 if init == "legt" else 1
    if init == "legs+diag-inv" and H % 2:
        H += 1
    k = SSMKernelDPLR(H, 2 * half, channels=channels, init=init, rank=rank, hurwitz=hurwitz, backend=BACKEND).double()
    if not hurwitz:
        with torch.no_grad():
            k.Q.add_(0.3 * torch.randn_like(k.Q))
    K, _ = k(L)
    K_ref = dense_kernel_dplr(k, L)
    assert K.shape == (channels, H, L)
    assert (K - K_ref).abs().max() <= 1e-10 * max(1.0, K_ref.abs().max())


def test_dplr_kernel_length_doubling_and_truncation():
    torch.manual_seed(0)
    k = SSMKernelDPLR(3, 8, backend=BACKEND).double()
    K64, _ = k(64)
    assert int(k.l_kernel) == 64
    K128, _ = k(128)  # doubles C~ to length 128
    assert int(k.l_kernel) == 128
    assert torch.allclose(K128[..., :64], K64, atol=1e-12)
    assert torch.allclose(K128, dense_kernel_dplr(k, 128), atol=1e-12)
    K50, _ = k(50)  # shorter: truncation of the length-128 kernel
    assert torch.allclose(K50, K128[..., :50], atol=1e-12)


@pytest.mark.parametrize("disc", ["zoh", "bilinear", "dss"])
@pytest.mark.parametrize("init", ["diag-lin", "diag-inv", "diag-legs", "diag-real"])
def test_diag_kernel_matches_vandermonde(disc, init):
    torch.manual_seed(0)
    k = SSMKernelDiag(4, 16, channels=2, init=init, disc=disc, backend=BACKEND).double()
    K, _ = k(77)
    assert (K - diag_kernel(k, 77)).abs().max() < 1e-12


def test_diag_zoh_is_exact_exponential():
    """ZOH: dA = exp(dt Lambda), dB = (exp(dt Lambda) - 1)/Lambda B, checked against scipy's expm."""
    from scipy.linalg import expm
    torch.manual_seed(0)
    k = SSMKernelDiag(2, 4, init="diag-inv", backend=BACKEND).double()
    x, dB, _ = k._discrete()
    dt = k.dt().detach().numpy()
    Lam = k.Lambda().detach().numpy()
    for h in range(2):
        A = np.diag(Lam[h])
        assert np.allclose(expm(A * dt[h]), np.diag(np.exp(x[h].detach().numpy())))


def test_dss_handles_growing_modes():
    torch.manual_seed(0)
    k = SSMKernelDiag(2, 4, init="diag-lin", disc="dss", real_transform="none", backend=BACKEND).double()
    with torch.no_grad():
        k.Lambda_re.copy_(torch.tensor([[-0.5, 0.3]]).repeat(2, 1))  # Re Lambda = +0.5 (growing), -0.3
        k.log_dt.fill_(math.log(0.5))
    L = 3000  # exp(0.25 * 3000) overflows float64 if computed directly
    K, _ = k(L)
    assert torch.isfinite(K).all()
    # the normalised kernel equals the direct DSS formula wherever that formula is still finite
    L = 40
    Ks, _ = k(L)
    x = k.dt()[:, None] * k.Lambda()
    B = torch.view_as_complex(k.B)
    C = torch.view_as_complex(k.C)
    v = C * B * torch.expm1(x) / (k.Lambda() * torch.expm1(x * L))
    l = torch.arange(L, dtype=torch.float64)
    K_direct = 2 * (v[..., None] * torch.exp(x[..., None] * l)).sum(-2).real
    assert (Ks - K_direct).abs().max() < 1e-10


def test_is_real_variant():
    torch.manual_seed(0)
    k = SSMKernelDiag(3, 6, init="diag-real", is_real=True, backend=BACKEND).double()
    assert not hasattr(k, "Lambda_im") and k.n == 6
    K, _ = k(20)
    Lam = k.Lambda().real
    B = torch.view_as_complex(k.B).real
    C = torch.view_as_complex(k.C).real
    dt = k.dt()[:, None]
    l = torch.arange(20, dtype=torch.float64)
    K_ref = ((C * torch.expm1(dt * Lam) / Lam * B)[..., None] * torch.exp(dt[..., None] * Lam[..., None] * l)).sum(-2)
    assert torch.allclose(K, K_ref, atol=1e-12)


# ----------------------------------------------------------------------------- conv vs step

def run_steps(layer, x):
    layer.setup_step(**({"mode": layer._mode} if hasattr(layer, "_mode") else {}))
    state = layer.default_state(x.shape[0])
    ys = []
    for t in range(x.shape[-1]):
        y_t, state = layer.step(x[..., t], state)
        ys.append(y_t)
    return torch.stack(ys, -1), state


CONFIGS = [("dplr", "legs", "linear"), ("dplr", "legs", "dense"), ("diag", "diag-lin", "linear"),
           ("diag", "diag-inv", "linear")]


@pytest.mark.parametrize("mode,init,step_mode", CONFIGS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_conv_equals_recurrence_long(mode, init, step_mode, dtype, tol):
    torch.manual_seed(0)
    L = 4096
    layer = FFTConv(4, d_state=16, mode=mode, init=init, backend=BACKEND).to(dtype).eval()
    layer._mode = step_mode
    x = torch.randn(2, 4, L, dtype=dtype)
    with torch.no_grad():
        y, _ = layer(x)
        y_step, _ = run_steps(layer, x)
    assert (y - y_step).abs().max() <= tol * y.abs().max()


@settings(max_examples=8, deadline=None)
@given(B=st.integers(1, 3), H=st.integers(1, 6), L=st.integers(1, 600), cfg=st.sampled_from(CONFIGS),
       channels=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_conv_equals_recurrence_random(B, H, L, cfg, channels, seed):
    mode, init, step_mode = cfg
    torch.manual_seed(seed)
    layer = FFTConv(H, d_state=8, channels=channels, mode=mode, init=init, backend=BACKEND).eval()
    layer._mode = step_mode
    x = torch.randn(B, H, L)
    with torch.no_grad():
        y, _ = layer(x)
        y_step, _ = run_steps(layer, x)
    assert y.shape == (B, channels * H, L)
    assert (y - y_step).abs().max() <= 1e-4 * y.abs().max()


def test_recurrence_after_training_steps():
    """Exactness must survive training (C~ and A moved away from init)."""
    torch.manual_seed(0)
    for mode in ("dplr", "diag"):
        layer = S4Block(8, d_state=16, mode=mode, backend=BACKEND, transposed=True)
        opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
        x = torch.randn(2, 8, 256)
        for _ in range(5):
            y, _ = layer(x)
            loss = (y ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        layer.eval()
        with torch.no_grad():
            y, _ = layer(x)
            layer.setup_step()
            state = layer.default_state(2)
            ys = []
            for t in range(256):
                y_t, state = layer.step(x[..., t], state)
                ys.append(y_t)
        assert (y - torch.stack(ys, -1)).abs().max() <= 1e-4 * y.abs().max()


def test_step_modes_agree_with_dense_reference_float64():
    torch.manual_seed(0)
    k = SSMKernelDPLR(3, 8, rank=2, init="legt", backend=BACKEND).double()
    k(32)  # attune C~
    dA, dB = k.dense_system()
    x = torch.randn(2, 3, dtype=torch.float64)
    for mode in ("linear", "dense"):
        k.setup_step(mode)
        state = k.default_state(2).normal_()
        _, new = k.step(x, state)
        xi = torch.cat([state.real, state.imag], -1)
        expected = torch.einsum("hij,bhj->bhi", dA, xi) + dB * x[..., None]
        assert torch.allclose(torch.cat([new.real, new.imag], -1), expected, atol=1e-12)


# ----------------------------------------------------------------------------- state forwarding

@settings(max_examples=10, deadline=None)
@given(mode=st.sampled_from(["dplr", "diag"]), cuts=st.lists(st.integers(1, 299), max_size=4), seed=st.integers(0, 999))
def test_chunked_state_forwarding_equals_whole(mode, cuts, seed):
    torch.manual_seed(seed)
    L = 300
    layer = FFTConv(5, d_state=8, mode=mode, backend=BACKEND).double().eval()
    x = torch.randn(2, 5, L, dtype=torch.float64)
    with torch.no_grad():
        y, _ = layer(x)
        bounds = [0] + sorted(set(cuts)) + [L]
        state = layer.default_state(2)
        pieces = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            y_piece, state = layer(x[..., a:b], state=state)
            pieces.append(y_piece)
        layer.setup_step()
        s = layer.default_state(2)
        for t in range(L):
            _, s = layer.step(x[..., t], s)
    assert (torch.cat(pieces, -1) - y).abs().max() < 1e-10
    assert (state - s).abs().max() < 1e-10


def test_forward_state_nonzero_initial_state_float32():
    torch.manual_seed(0)
    for mode in ("dplr", "diag"):
        layer = FFTConv(4, d_state=16, mode=mode, backend=BACKEND).eval()
        x = torch.randn(1, 4, 1000)
        s0 = layer.default_state(1).normal_()
        with torch.no_grad():
            y, s1 = layer(x, state=s0)
            layer.setup_step()
            s, ys = s0.clone(), []
            for t in range(1000):
                y_t, s = layer.step(x[..., t], s)
                ys.append(y_t)
        assert (y - torch.stack(ys, -1)).abs().max() <= 1e-4 * y.abs().max()
        assert (s1 - s).abs().max() <= 1e-4 * s.abs().max()


# ----------------------------------------------------------------------------- bidirectional, rate

def test_bidirectional_matches_two_sided_convolution():
    torch.manual_seed(0)
    layer = FFTConv(3, d_state=8, bidirectional=True, activation=None, backend=BACKEND).double()
    L = 40
    x = torch.randn(2, 3, L, dtype=torch.float64)
    y, _ = layer(x)
    K, _ = layer.kernel(L)
    K_fwd, K_bwd = K[:1], K[1:]
    # the backward kernel is shifted by one so lag 0 is counted once: y_t += sum_{j>t} K_bwd[j-t-1] x_j
    back = causal_conv(x.flip(-1), K_bwd).flip(-1)  # sum_{j>=t} K_bwd[j-t] x_j
    shifted = torch.zeros_like(back)
    shifted[..., :-1] = back[..., 1:]
    expected = causal_conv(x, K_fwd) + shifted + x.unsqueeze(1) * layer.D[..., None]
    assert torch.allclose(y, expected.reshape(2, 3, L), atol=1e-10)
    with pytest.raises(ValueError, match="bidirectional"):
        layer(x, state=layer.default_state(2))


def test_rate_scales_dt_exactly_for_s4d():
    torch.manual_seed(0)
    a = FFTConv(4, d_state=8, mode="diag", backend=BACKEND).double()
    b = FFTConv(4, d_state=8, mode="diag", backend=BACKEND).double()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        b.kernel.log_dt.add_(math.log(2.0))
    x = torch.randn(1, 4, 100, dtype=torch.float64)
    assert torch.allclose(a(x, rate=2.0)[0], b(x)[0], atol=1e-12)


def test_rate_for_s4_keeps_continuous_length():
    """A model attuned at length 2L, run at rate 2 on L samples, approximates doubled dt closely."""
    torch.manual_seed(0)
    a = FFTConv(4, d_state=16, mode="dplr", backend=BACKEND).double()
    x = torch.randn(1, 4, 512, dtype=torch.float64)
    a(torch.randn(1, 4, 1024, dtype=torch.float64))  # attune at 1024
    y2, _ = a(x, rate=2.0)
    assert int(a.kernel.l_kernel) == 1024
    b = FFTConv(4, d_state=16, mode="dplr", backend=BACKEND).double()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        b.kernel.log_dt.add_(math.log(2.0))
        b.kernel.l_kernel.fill_(0)
        b.kernel.C.copy_(torch.view_as_real(a.kernel.true_C()))
    y_ref, _ = b(x)
    assert torch.isfinite(y2).all()
    assert (y2 - y_ref).abs().max() < 2e-2 * y_ref.abs().max()


# ----------------------------------------------------------------------------- Hurwitz stability

def spectrum(kernel):
    P, Q = kernel.PQ()
    A = dplr_real_matrix(kernel.Lambda().to(torch.complex128), P.to(torch.complex128), Q.to(torch.complex128))
    return torch.linalg.eigvals(A)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.sampled_from([1.0, 10.0, 1e3]), rank=st.integers(1, 3),
       transform=st.sampled_from(["exp", "softplus", "relu"]))
def test_hurwitz_spectrum_in_left_half_plane_for_any_parameters(seed, scale, rank, transform):
    torch.manual_seed(seed)
    k = SSMKernelDPLR(3, 8, rank=rank, init="dplr-random", real_transform=transform, backend=BACKEND).double()
    with torch.no_grad():
        for p in (k.Lambda_re, k.Lambda_im, k.P, k.B):
            p.copy_(torch.randn_like(p) * scale)
        if transform == "exp":
            k.Lambda_re.clamp_(max=5.0)  # exp overflow is not a stability question
    eig = spectrum(k)
    assert (eig.real < 0).all()
    dA, _ = k.dense_system()
    assert (torch.linalg.eigvals(dA).abs() < 1).all()


def test_hurwitz_100k_steps_stay_bounded():
    torch.manual_seed(0)
    layer = FFTConv(4, d_state=16, mode="dplr", activation=None, backend=BACKEND).eval()
    with torch.no_grad():  # adversarial parameters: large low-rank part and eigenvalues near the axis
        layer.kernel.P.mul_(30.0)
        layer.kernel.Lambda_re.fill_(math.log(1e-4))
        layer.kernel.log_dt.fill_(math.log(0.5))
    layer.setup_step()
    state = layer.default_state(1)
    u = torch.randn(100_000, 1, 4)
    peak = 0.0
    with torch.no_grad():
        for t in range(100_000):
            y, state = layer.step(u[t], state)
            if t % 1000 == 0:
                peak = max(peak, float(state.abs().max()))
    assert torch.isfinite(state).all() and torch.isfinite(y).all()
    assert peak < 1e4 and float(state.abs().max()) < 1e4


def test_untied_parameterisation_can_go_unstable():
    torch.manual_seed(0)
    layer = FFTConv(2, d_state=8, mode="dplr", hurwitz=False, activation=None, backend=BACKEND).eval()
    with torch.no_grad():
        layer.kernel.Q.copy_(-3.0 * layer.kernel.P)  # A = Lambda + 3 P P^*: eigenvalue in the right half plane
    assert (spectrum(layer.kernel).real > 0).any()
    layer.setup_step()
    state = layer.default_state(1)
    with torch.no_grad():
        for _ in range(20_000):
            _, state = layer.step(torch.randn(1, 2), state)
    assert not torch.isfinite(state).all() or state.abs().max() > 1e6


def test_hurwitz_rejects_unconstrained_real_part():
    with pytest.raises(ValueError, match="hurwitz"):
        SSMKernelDPLR(2, 8, real_transform="none")
