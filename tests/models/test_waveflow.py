"""WaveFlow: exact inverse, log-determinant, likelihood at init, causality in height, fast == plain inversion."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sashimi.models.waveflow import PRESETS, WaveFlow, WaveFlowConfig, row_permutation
from sashimi.nn.waveflow import height_dilations, height_receptive_field, squeeze, unsqueeze


def tiny(h=8, **kw):
    kw = {"n_flows": 2, "n_layers": 3, "residual_channels": 6, "d_state": 4, **kw}
    return WaveFlowConfig(h=h, **kw)


def randomized(config, dtype=torch.float64, seed=0, scale=0.1):
    """A model whose weights are moved off their init (the zero output conv makes a new model the identity)."""
    torch.manual_seed(seed)
    model = WaveFlow(config).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def inputs(model, batch, n, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(batch, n, generator=g, dtype=dtype)
    mel = None
    if model.conditional:
        hop = model.config.hop_length
        frames = math.ceil(n / hop)
        mel = torch.randn(batch, model.config.n_mels, frames, generator=g, dtype=dtype) - 4
    return x, mel


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


SHAPES = [  # (config changes, samples)
    ({"h": 2}, 64), ({"h": 8}, 256), ({"h": 16}, 512), ({"h": 64, "n_layers": 8, "residual_channels": 4}, 512),
    ({"h": 32, "hop_length": 32, "n_fft": 64, "win_length": 64}, 32),  # w = 1: a flow over samples
]


@pytest.mark.parametrize("width_model", ["conv", "s4"])
@pytest.mark.parametrize("changes,n", SHAPES)
def test_inverse_of_forward_is_identity(changes, n, width_model):
    config = tiny(**{**changes, "width_model": width_model})
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        model = randomized(config, dtype)
        x, mel = inputs(model, 2, n, dtype)
        z, logdet = model(x, mel)
        assert z.shape == x.shape and logdet.shape == (2,)
        assert rel_err(z, x) > 1e-3  # the flow is not the identity
        for method in ("plain", "fast"):
            assert rel_err(model.inverse(z, mel, method=method), x) < tol, (dtype, method)


@pytest.mark.parametrize("kw", [{}, {"width_model": "s4"}, {"condition": "none"}, {"h": 2, "n_flows": 3}])
def test_logdet_equals_autograd_jacobian(kw):
    config = tiny(h=kw.pop("h", 4), hop_length=4, n_fft=16, win_length=16, sample_rate=16000, **kw)
    model = randomized(config, scale=0.3)
    x, mel = inputs(model, 1, 12)
    _, logdet = model(x, mel)
    J = torch.autograd.functional.jacobian(lambda v: model(v[None], mel)[0][0], x[0])
    sign, logabsdet = torch.linalg.slogdet(J)
    assert sign != 0
    torch.testing.assert_close(logdet[0], logabsdet, rtol=1e-10, atol=1e-10)
    assert abs(logabsdet.item()) > 1e-2


def test_nll_at_init_is_the_gaussian_nll():
    for sigma in (1.0, 0.5):
        model = WaveFlow(tiny(sigma=sigma)).double()
        x, mel = inputs(model, 3, 512)
        z, logdet = model(x, mel)
        torch.testing.assert_close(logdet, torch.zeros(3, dtype=torch.float64))
        gaussian = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64)).log_prob(x).mean(1)
        torch.testing.assert_close(model.log_prob(x, mel), gaussian, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("width_model", ["conv", "s4"])
def test_each_flow_is_causal_in_height(width_model):
    h, w = 16, 8
    model = randomized(tiny(h=h, n_layers=4, width_model=width_model))
    X = torch.randn(1, 1, h, w, dtype=torch.float64)
    cond = torch.randn(1, 80, h, w, dtype=torch.float64)
    for k in range(model.config.n_flows):
        Z, _ = model._flow_forward(k, X, cond)
        for i in (1, 5, 15):
            for which in ("audio", "cond"):
                X2, cond2 = X.clone(), cond.clone()
                (X2 if which == "audio" else cond2)[:, :, i] += 1.0
                Z2, _ = model._flow_forward(k, X2, cond2)
                # the condition is permuted by the flow's row order: find where row i of cond lands
                first = i if which == "audio" else int((model.cond_rows[k] == i).nonzero())
                changed = (Z2 - Z).abs().amax(dim=(0, 1, 3)) > 0
                if first == 0 and which == "cond":  # row 0 passes through: its condition is unused
                    assert not changed.any()
                    continue
                assert not changed[:first].any(), (k, i, which)
                assert changed[first:].any()


def dilated(h, dilations, **kw):
    return tiny(h=h, n_layers=len(dilations), height_dilations=tuple(dilations), residual_channels=4, **kw)


@pytest.mark.parametrize("h", [8, 16, 32, 64, 128])
def test_fast_inverse_equals_plain_for_the_paper_dilations(h):
    config = tiny(h=h, n_layers=8, residual_channels=4)
    assert config.resolved_height_dilations() == height_dilations(h, 8)
    model = randomized(config)
    x, mel = inputs(model, 2, 2 * h if h >= 64 else 4 * h)
    z, _ = model(x, mel)
    torch.testing.assert_close(model.inverse(z, mel, method="fast"), model.inverse(z, mel, method="plain"),
                               rtol=1e-12, atol=1e-12)


@settings(max_examples=10)
@given(dilations=st.lists(st.integers(1, 9), min_size=1, max_size=4), h=st.integers(2, 20),
       w=st.integers(1, 9), batch=st.integers(1, 3), width_model=st.sampled_from(["conv", "s4"]),
       condition=st.sampled_from(["mel", "none"]), seed=st.integers(0, 100))
def test_fast_inverse_equals_plain_for_any_dilations(dilations, h, w, batch, width_model, condition, seed):
    config = dilated(h, dilations, width_model=width_model, condition=condition, hop_length=1, n_fft=4,
                     win_length=4, upsample_strides=(1, 1))
    model = randomized(config, seed=seed)
    x, mel = inputs(model, batch, h * w, seed=seed)
    z, _ = model(x, mel)
    torch.testing.assert_close(model.inverse(z, mel, method="fast"), model.inverse(z, mel, method="plain"),
                               rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("width_model", ["conv", "s4"])
def test_fast_inverse_in_chunks_and_two_streams_equals_plain(threads, width_model):
    """A batch inverted in chunks of whole examples (two at a time with two threads) gives the plain
    inverse and each example's Σ log_s, whatever the chunk size."""
    from sashimi.nn.waveflow_fast import FastInverse
    model = randomized(tiny(h=8, width_model=width_model))
    x, mel = inputs(model, 5, 64)
    z, logdet = model(x, mel)
    cond = model.condition_rows(mel, 64, 5)
    plain = model.inverse(z, mel, method="plain")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for columns in (1, 16, 10_000):  # one example per chunk, two, the whole batch
            x_fast, log_s = FastInverse(model, chunk_columns=columns).inverse(z, cond, return_log_s=True)
            torch.testing.assert_close(x_fast, plain, rtol=1e-11, atol=1e-11)
            torch.testing.assert_close(log_s, logdet, rtol=1e-11, atol=1e-11)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(previous)


def test_inverse_flops_count_the_folded_work():
    from sashimi.nn.waveflow_fast import inverse_flops_per_sample
    config = PRESETS["waveflow-h16-r64"]
    nominal, folded = inverse_flops_per_sample(config), inverse_flops_per_sample(config, folded=True)
    # h = 16, r = 64, 8 x 8, 80 mels: the folded products by hand (start, conditions, taps, [res; skip])
    r, L, C, h = 64, 8, 80, 16
    taps = 3 * (h - 1) - 3  # per layer: rows 0 and 1 skip two taps and one (d_h = 1)
    by_hand = 8 * ((h - 1) * (2 * r + 2 * L * 2 * r * (C + 1) + (L - 1) * 2 * (r + 2) * (r + 1) + 2 * 2 * (r + 1))
                   + L * taps * 2 * 2 * r * 3 * r) / h + 2 * 6 * C * (1 / 16 + 1)
    assert folded == pytest.approx(by_hand, rel=1e-12)
    assert 0.85 * nominal < folded < nominal
    s4 = PRESETS["waveflow-s4-h16"]
    assert inverse_flops_per_sample(s4, folded=True) == inverse_flops_per_sample(s4)


def test_height_dilation_rule():
    assert height_dilations(16, 8) == (1,) * 8
    assert height_dilations(32, 8) == (1, 2, 4, 1, 2, 4, 1, 2)
    assert height_dilations(64, 8) == (1, 2, 4, 8, 16, 1, 2, 4)
    assert height_dilations(128, 8) == (1, 2, 4, 8, 16, 32, 64, 1)
    for h in (3, 17, 24, 40, 100, 200):
        for layers in (4, 6, 8, 10):
            d = height_dilations(h, layers)
            assert len(d) == layers
            if height_receptive_field([2 ** i for i in range(layers)]) >= h:
                assert height_receptive_field(d) >= h
    assert height_dilations(16000, 8) == tuple(2 ** i for i in range(8))  # w = 1: WaveNet-like


def test_squeeze_is_column_major():
    x = torch.arange(12.0)[None, None]
    X = squeeze(x, 4)
    assert X[0, 0, 1, 2] == 2 * 4 + 1
    assert torch.equal(unsqueeze(X), x)


def test_permutations():
    assert row_permutation(8, 0, 8).tolist() == [7, 6, 5, 4, 3, 2, 1, 0]
    assert row_permutation(8, 4, 8).tolist() == [3, 2, 1, 0, 7, 6, 5, 4]
    assert row_permutation(2, 5, 8).tolist() == [1, 0]  # h = 2 alternates like bipartite coupling
    assert row_permutation(8, 7, 8, "reverse").tolist() == list(range(7, -1, -1))


def test_presets_and_config_round_trip():
    n_params = sum(p.numel() for p in WaveFlow(PRESETS["waveflow-h16-r64"]).parameters())
    assert 5.85e6 < n_params < 5.95e6
    s4_params = sum(p.numel() for p in WaveFlow(PRESETS["waveflow-s4-h16"]).parameters())
    assert s4_params <= n_params
    for name, config in PRESETS.items():
        assert config.name == name and config.family == "waveflow"
        assert WaveFlowConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown"):
        WaveFlowConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="width_model"):
        WaveFlowConfig(width_model="lstm")
    with pytest.raises(ValueError, match="multiply"):
        WaveFlowConfig(upsample_strides=(4, 4))
    with pytest.raises(ValueError, match="sample_rate/2"):
        WaveFlowConfig(sample_rate=8000)  # f_max 8 kHz above Nyquist


def test_bad_input_is_refused_clearly():
    model = WaveFlow(tiny(hop_length=64, n_fft=256, win_length=256))
    x, mel = inputs(model, 2, 256, torch.float32)
    with pytest.raises(ValueError, match="multiple of h"):
        model(x[:, :250], mel)
    with pytest.raises(ValueError, match="NaN"):
        model(torch.full_like(x, float("nan")), mel)
    with pytest.raises(ValueError, match="n_mels=80"):
        model(x, mel[:, :40])
    with pytest.raises(ValueError, match="expected 4 frames"):
        model(x, mel[..., :2])
    with pytest.raises(ValueError, match="vocoder"):
        model(x)
    with pytest.raises(ValueError, match="unconditional"):
        WaveFlow(tiny(condition="none"))(x, mel)
    with pytest.raises(ValueError, match="method"):
        model.inverse(x, mel, method="quick")


def test_sample_shapes_and_temperature_zero():
    model = randomized(tiny(hop_length=64, n_fft=256, win_length=256), torch.float32)
    _, mel = inputs(model, 2, 256, torch.float32)
    audio = model.sample(mel, temperature=0.7, generator=torch.Generator().manual_seed(0))
    assert audio.shape == (2, 256) and torch.isfinite(audio).all()
    unconditional = randomized(tiny(condition="none"), torch.float32)
    assert unconditional.sample(length=100, batch_size=3).shape == (3, 96)
    silent = unconditional.sample(length=64, temperature=0.0)
    torch.testing.assert_close(silent, unconditional.inverse(torch.zeros(1, 64)))


def test_log_likelihood_terms_sum_to_the_log_likelihood():
    model = randomized(tiny(h=8, n_flows=3))
    x, mel = inputs(model, 2, 256)
    terms = model.log_likelihood_terms(x, mel)
    assert terms.shape == x.shape
    torch.testing.assert_close(terms.sum(1), model.log_likelihood(x, mel), rtol=1e-12, atol=1e-10)
    assert torch.isfinite(terms).all()
