"""LogMel against a float64 numpy reference of the same definition, and its input checks."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sashimi.nn.mel import LogMel, hz_to_mel, mel_to_hz


def reference_log_mel(x, sample_rate, n_fft, win_length, hop_length, n_mels, f_min, f_max):
    """The definition written out in float64 numpy: explicit framing, an explicit DFT matrix,
    Slaney mel points and triangles built one band at a time."""
    x = np.asarray(x, dtype=np.float64)
    left = (n_fft - hop_length) // 2
    padded = np.pad(x, (left, n_fft - hop_length - left), mode="reflect")
    frames = len(x) // hop_length
    n = np.arange(win_length)
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * n / win_length)  # periodic Hann
    window = np.zeros(n_fft)
    offset = (n_fft - win_length) // 2
    window[offset:offset + win_length] = hann
    k = np.arange(n_fft // 2 + 1)[:, None]
    dft = np.exp(-2j * np.pi * k * np.arange(n_fft)[None] / n_fft)
    spec = np.stack([np.abs(dft @ (padded[t * hop_length:t * hop_length + n_fft] * window))
                     for t in range(frames)], axis=1)

    def mel(f):
        return 3 * f / 200 if f < 1000 else 15 + 27 * math.log(f / 1000) / math.log(6.4)

    def hz(m):
        return 200 * m / 3 if m < 15 else 1000 * math.exp((m - 15) * math.log(6.4) / 27)

    points = [hz(m) for m in np.linspace(mel(f_min), mel(f_max), n_mels + 2)]
    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    bank = np.zeros((n_mels, len(freqs)))
    for b in range(n_mels):
        lo, mid, hi = points[b], points[b + 1], points[b + 2]
        for i, f in enumerate(freqs):
            if lo < f < hi:
                bank[b, i] = ((f - lo) / (mid - lo) if f <= mid else (hi - f) / (hi - mid)) * 2 / (hi - lo)
    return np.log(np.maximum(bank @ spec, 1e-5))


def test_mel_scale_round_trip_and_anchor_points():
    assert hz_to_mel(1000.0) == pytest.approx(15.0)
    assert hz_to_mel(6400.0) == pytest.approx(42.0)
    f = torch.linspace(0, 11025, 200, dtype=torch.float64)
    torch.testing.assert_close(mel_to_hz(hz_to_mel(f)), f, rtol=1e-12, atol=1e-9)


def test_default_vocoder_features_match_reference():
    torch.manual_seed(0)
    x = torch.randn(2, 22050 // 4, dtype=torch.float64) * 0.3
    m = LogMel(22050)
    out = m(x)
    assert out.shape == (2, 80, x.shape[1] // 256)
    ref = reference_log_mel(x[1].numpy(), 22050, 1024, 1024, 256, 80, 0.0, 8000.0)
    np.testing.assert_allclose(out[1].numpy(), ref, rtol=0, atol=1e-9)
    out32 = m(x.float())
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32[1].numpy(), ref, rtol=0, atol=2e-3)


@settings(max_examples=12)
@given(sample_rate=st.sampled_from([8000, 16000, 22050, 24000, 44100]),
       n_fft=st.sampled_from([64, 128, 256]), win_frac=st.sampled_from([1.0, 0.75, 0.5]),
       hop_frac=st.sampled_from([0.25, 0.5, 0.3]), n_mels=st.integers(4, 40),
       f_min=st.sampled_from([0.0, 30.0]), f_max_frac=st.sampled_from([1.0, 0.8]),
       extra=st.integers(0, 300), seed=st.integers(0, 2 ** 16))
def test_any_configuration_matches_reference(sample_rate, n_fft, win_frac, hop_frac, n_mels, f_min,
                                             f_max_frac, extra, seed):
    win, hop = int(n_fft * win_frac), max(1, int(n_fft * hop_frac))
    f_max = sample_rate / 2 * f_max_frac
    m = LogMel(sample_rate, n_fft, win, hop, n_mels, f_min, f_max)
    length = m.min_length() + extra
    x = torch.randn(length, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    out = m(x)
    assert out.shape == (n_mels, length // hop)
    ref = reference_log_mel(x.numpy(), sample_rate, n_fft, win, hop, n_mels, f_min, f_max)
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-9)


def test_silence_is_the_floor_and_state_dict_is_empty():
    m = LogMel(16000, f_max=8000.0)
    out = m(torch.zeros(1, 4000))
    torch.testing.assert_close(out, torch.full_like(out, math.log(1e-5)))
    assert m.state_dict() == {}


def test_bad_input_is_refused_clearly():
    m = LogMel(22050)
    with pytest.raises(ValueError, match="NaN"):
        m(torch.tensor([0.0, float("nan")]).repeat(1000)[None])
    with pytest.raises(ValueError, match="too short"):
        m(torch.zeros(1, 100))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        m(torch.zeros(1, 2, 3000))
    with pytest.raises(TypeError, match="float"):
        m(torch.zeros(1, 3000, dtype=torch.int64))
    with pytest.raises(ValueError, match="sample_rate/2"):
        LogMel(8000)  # default f_max 8 kHz is above 4 kHz Nyquist
    with pytest.raises(ValueError, match="win_length"):
        LogMel(22050, n_fft=512, win_length=1024)
