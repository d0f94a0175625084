"""Log-mel spectrogram of raw audio: the conditioning features of a vocoder and of mel metrics.

Definition (one place; tests/nn/test_mel.py checks it against a float64 numpy reference):

1. Padding. The waveform x (length T) is reflect-padded by ``left = (n_fft - hop) // 2`` samples
   in front and ``n_fft - hop - left`` behind (not torch.stft's ``center=True``), so frame t covers
   padded samples [t·hop, t·hop + n_fft) and is centred on the middle of hop block t, i.e. on
   original samples [t·hop, (t+1)·hop). There are exactly ``frames = T // hop`` frames; a trailing
   partial block of ``T % hop`` samples gets no frame of its own. Reflect padding needs
   ``T > n_fft - hop - left`` (and at least one frame needs ``T >= hop``).
2. Window. A periodic Hann window of ``win_length`` samples, zero-padded on both sides to
   ``n_fft`` (centred), multiplies each frame.
3. Spectrum. ``|DFT_{n_fft}(frame)|`` at the ``n_fft // 2 + 1`` non-negative frequencies
   k·sample_rate/n_fft: the magnitude (power 1), not the power.
4. Mel filter bank. The Slaney mel scale (Auditory Toolbox; librosa's default ``htk=False``):
   mel(f) = 3f/200 below 1 kHz, 15 + 27·ln(f/1000)/ln(6.4) above. ``n_mels + 2`` points equally
   spaced in mel between mel(f_min) and mel(f_max), mapped back to Hz, give triangular filters
   (peak 1 at the middle point, 0 at its neighbours, linear in Hz between), each then scaled by
   2/(f_{m+2} − f_m) (Slaney area normalisation: equal area per band). This is the filter bank of
   WaveGlow-, WaveFlow- and HiFi-GAN-style vocoder features, so mel arrays from those pipelines
   match when their STFT settings match.
5. Log. ``log(max(mel, floor))``, natural log, floor 1e-5 (so silence is log(1e-5) ≈ −11.51).

Any sample rate works: only f_max ≤ sample_rate / 2 is required.
"""

from __future__ import annotations

import math

import torch
from torch import nn

LOG_FLOOR = 1e-5


def hz_to_mel(f):
    """Slaney mel scale: linear 3f/200 below 1 kHz, logarithmic above (works on floats and tensors)."""
    f_sp, min_log_hz = 200.0 / 3.0, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    if isinstance(f, torch.Tensor):
        return torch.where(f >= min_log_hz, min_log_mel + torch.log(f.clamp_min(1e-12) / min_log_hz) / logstep,
                           f / f_sp)
    return min_log_mel + math.log(f / min_log_hz) / logstep if f >= min_log_hz else f / f_sp


def mel_to_hz(m):
    """Inverse of hz_to_mel."""
    f_sp, min_log_hz = 200.0 / 3.0, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    if isinstance(m, torch.Tensor):
        return torch.where(m >= min_log_mel, min_log_hz * torch.exp(logstep * (m - min_log_mel)), f_sp * m)
    return min_log_hz * math.exp(logstep * (m - min_log_mel)) if m >= min_log_mel else f_sp * m


def mel_filterbank(sample_rate: float, n_fft: int, n_mels: int, f_min: float, f_max: float,
                   dtype=torch.float64) -> torch.Tensor:
    """Slaney-normalised triangular mel filters, (n_mels, n_fft // 2 + 1), computed in float64."""
    fft_freqs = torch.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1, dtype=torch.float64)
    mel_points = torch.linspace(hz_to_mel(float(f_min)), hz_to_mel(float(f_max)), n_mels + 2, dtype=torch.float64)
    hz_points = mel_to_hz(mel_points)
    lower_edge, centre, upper_edge = hz_points[:-2, None], hz_points[1:-1, None], hz_points[2:, None]
    rising = (fft_freqs - lower_edge) / (centre - lower_edge)
    falling = (upper_edge - fft_freqs) / (upper_edge - centre)
    triangles = torch.clamp(torch.minimum(rising, falling), min=0.0)
    return (triangles * (2.0 / (upper_edge - lower_edge))).to(dtype)


class LogMel(nn.Module):
    """Log-mel spectrogram (see the module docstring): (B, T) or (T,) float -> (B, n_mels, T // hop_length)."""

    def __init__(self, sample_rate: int, n_fft: int = 1024, win_length: int = 1024, hop_length: int = 256,
                 n_mels: int = 80, f_min: float = 0.0, f_max: float = 8000.0):
        super().__init__()
        for name, value in (("sample_rate", sample_rate), ("n_fft", n_fft), ("win_length", win_length),
                            ("hop_length", hop_length), ("n_mels", n_mels)):
            if isinstance(value, bool) or int(value) != value or value <= 0:
                raise ValueError(f"LogMel: {name} must be a positive integer, got {value!r}")
        if win_length > n_fft:
            raise ValueError(f"LogMel: win_length ({win_length}) must be <= n_fft ({n_fft})")
        if hop_length > n_fft:
            raise ValueError(f"LogMel: hop_length ({hop_length}) must be <= n_fft ({n_fft})")
        if not 0.0 <= f_min < f_max <= sample_rate / 2.0:
            raise ValueError(f"LogMel: need 0 <= f_min < f_max <= sample_rate/2 = {sample_rate / 2.0:g} Hz, "
                             f"got f_min={f_min:g}, f_max={f_max:g}")
        self.sample_rate, self.n_fft, self.win_length = int(sample_rate), int(n_fft), int(win_length)
        self.hop_length, self.n_mels = int(hop_length), int(n_mels)
        self.f_min, self.f_max = float(f_min), float(f_max)
        self.pad_left = (self.n_fft - self.hop_length) // 2
        self.pad_right = self.n_fft - self.hop_length - self.pad_left
        # derived from the arguments, so not part of a state_dict
        self.register_buffer("filters", mel_filterbank(sample_rate, n_fft, n_mels, f_min, f_max), persistent=False)
        self.register_buffer("window", torch.hann_window(self.win_length, periodic=True, dtype=torch.float64),
                             persistent=False)

    def extra_repr(self) -> str:
        return (f"sample_rate={self.sample_rate}, n_fft={self.n_fft}, win_length={self.win_length}, "
                f"hop_length={self.hop_length}, n_mels={self.n_mels}, f_min={self.f_min:g}, f_max={self.f_max:g}")

    def min_length(self) -> int:
        """The shortest waveform this transform accepts (one frame, and room for reflect padding)."""
        return max(self.hop_length, max(self.pad_left, self.pad_right) + 1)

    def num_frames(self, length: int) -> int:
        return length // self.hop_length

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        if not isinstance(wav, torch.Tensor) or not wav.is_floating_point():
            raise TypeError(f"LogMel expects a float tensor (B, T) or (T,), got "
                            f"{type(wav).__name__ if not isinstance(wav, torch.Tensor) else wav.dtype}")
        squeeze = wav.dim() == 1
        if squeeze:
            wav = wav[None]
        if wav.dim() != 2:
            raise ValueError(f"LogMel expects a waveform (B, T) or (T,), got shape {tuple(wav.shape)}")
        if wav.shape[-1] < self.min_length():
            raise ValueError(f"LogMel: a waveform of {wav.shape[-1]} samples is too short; need at least "
                             f"{self.min_length()} (hop_length {self.hop_length}, n_fft {self.n_fft})")
        if not bool(torch.isfinite(wav).all()):
            raise ValueError("LogMel: the waveform contains NaN or infinite samples")
        dtype = wav.dtype if wav.dtype == torch.float64 else torch.float32
        padded = nn.functional.pad(wav.to(dtype)[:, None], (self.pad_left, self.pad_right), mode="reflect")[:, 0]
        spectrum = torch.stft(padded, self.n_fft, hop_length=self.hop_length, win_length=self.win_length,
                              window=self.window.to(dtype), center=False, return_complex=True)
        mel = torch.matmul(self.filters.to(dtype), spectrum.abs())
        out = torch.log(torch.clamp(mel, min=LOG_FLOOR))
        assert out.shape[-1] == self.num_frames(wav.shape[-1])
        return out[0] if squeeze else out
