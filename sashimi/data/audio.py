"""Audio file I/O through soundfile: load (mono mix-down, resampling, validation) and atomic save.

`load_audio(path, sample_rate)` returns a float32 mono waveform at `sample_rate`, reading any
format libsndfile knows (wav, flac, ogg, ...); integer PCM (8/16/24/32-bit) comes back scaled to
[-1, 1). Resampling is polyphase (scipy.signal.resample_poly) by the rational factor
sample_rate / file_rate, with a Kaiser-window low-pass that is flat to 0.9 x the lower Nyquist
frequency and attenuates by 80 dB from the Nyquist frequency on (no audible aliasing). A
region (`start`, `num_frames`, in output samples) can be read without decoding the whole file
and equals the same slice of the whole file to float round-off. Every problem a user's file can cause raises `AudioError` (a ValueError) naming
the file and a short `reason`: 'unreadable', 'empty', 'non-finite', 'read-error'.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from ..checks import check_int
from ..files import atomic_write

__all__ = ["AudioError", "AudioInfo", "load_audio", "save_audio", "probe_audio", "resample_factors",
           "resampled_length", "AUDIO_EXTENSIONS"]

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")

# Largest up/down factor used as is; beyond it the ratio is approximated (the filter has
# about 20 * max(up, down) taps, so exact factors like 16000/44101 would be very slow).
_MAX_RESAMPLE_FACTOR = 1000
_BLOCK_FRAMES = 1 << 20
_STOPBAND_DB = 80.0


class AudioError(ValueError):
    """A file that cannot be used as audio. `path` and `reason` say which file and why."""

    def __init__(self, path, reason: str, detail: str = ""):
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{self.path}: {reason}" + (f" ({detail})" if detail else ""))


@dataclass(frozen=True)
class AudioInfo:
    """What `probe_audio` learned about a file: frames and rate as stored, channel count."""
    frames: int
    sample_rate: int
    channels: int
    format: str = ""
    subtype: str = ""


def _soundfile():
    try:
        import soundfile
    except ImportError as e:  # pragma: no cover - environment problem, not a user file
        raise ImportError("audio I/O needs the 'soundfile' package: pip install soundfile") from e
    return soundfile


def _check_rate(sample_rate, name="sample_rate") -> int:
    return check_int(name, sample_rate, 1)


def resample_factors(rate_in: int, rate_out: int) -> tuple[int, int]:
    """(up, down), coprime, with up/down = rate_out/rate_in (approximated if either exceeds 1000)."""
    ratio = Fraction(_check_rate(rate_out), _check_rate(rate_in))
    if max(ratio.numerator, ratio.denominator) > _MAX_RESAMPLE_FACTOR:
        small = min(ratio, 1 / ratio).limit_denominator(_MAX_RESAMPLE_FACTOR)
        small = max(small, Fraction(1, _MAX_RESAMPLE_FACTOR))  # rates more than 1000x apart
        ratio = small if ratio <= 1 else 1 / small
    return ratio.numerator, ratio.denominator


def resampled_length(frames: int, rate_in: int, rate_out: int) -> int:
    """Number of samples `load_audio` returns for a file of `frames` frames at rate_in."""
    up, down = resample_factors(rate_in, rate_out)
    return -(-frames * up // down)


def _open(path):
    sf = _soundfile()
    if not os.path.exists(path):
        raise AudioError(path, "unreadable", "no such file")
    try:
        return sf.SoundFile(path)
    except Exception as e:  # libsndfile: unknown format, truncated header, permissions, ...
        raise AudioError(path, "unreadable", str(e).splitlines()[0] if str(e) else type(e).__name__) from e


def _read(f, path, frames: int) -> np.ndarray:
    """Read `frames` frames from an open SoundFile as a float32 mono (frames,) array."""
    try:
        data = f.read(frames, dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError(path, "read-error", str(e).splitlines()[0] if str(e) else type(e).__name__) from e
    data = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32)
    if not np.isfinite(data).all():
        raise AudioError(path, "non-finite", f"{int((~np.isfinite(data)).sum())} NaN/inf samples")
    return data


def probe_audio(path, check_content: bool = True) -> AudioInfo:
    """Open a file and check that it is usable audio; with check_content, decode it all (in blocks).

    Raises AudioError for unreadable, empty (0 frames) or non-finite files. The returned frame
    count is the one actually decoded when check_content is set (headers of truncated files lie).
    """
    with _open(path) as f:
        frames, rate, channels = f.frames, f.samplerate, f.channels
        if check_content:
            frames = 0
            while True:
                block = _read(f, path, _BLOCK_FRAMES)
                frames += len(block)
                if len(block) < _BLOCK_FRAMES:
                    break
        info = AudioInfo(int(frames), int(rate), int(channels), f.format, f.subtype)
    if info.frames <= 0:
        raise AudioError(path, "empty", "0 frames")
    if info.sample_rate <= 0:
        raise AudioError(path, "unreadable", f"sample rate {info.sample_rate}")
    return info


@functools.lru_cache(maxsize=16)
def _lowpass(up: int, down: int) -> np.ndarray:
    """Anti-aliasing FIR at the upsampled rate: flat to 0.9 x the lower Nyquist, -80 dB from 1.0 x on."""
    from scipy.signal import firwin, kaiserord
    max_rate = max(up, down)
    numtaps, beta = kaiserord(_STOPBAND_DB, 0.1 / max_rate)
    numtaps |= 1  # odd: a whole-sample delay that resample_poly compensates
    return firwin(numtaps, 0.95 / max_rate, window=("kaiser", beta))


def _resample(x: np.ndarray, up: int, down: int) -> np.ndarray:
    from scipy.signal import resample_poly
    return resample_poly(x.astype(np.float64), up, down, window=_lowpass(up, down)).astype(np.float32)


def _filter_margin(up: int, down: int) -> int:
    """Input samples on either side that one output sample of `_resample` depends on (plus one)."""
    return -(-(len(_lowpass(up, down)) // 2) // up) + 1


def load_audio(path, sample_rate: int | None = None, *, start: int = 0, num_frames: int | None = None,
               return_rate: bool = False):
    """Load a file as a float32 mono tensor (T,), resampled to `sample_rate` (None: keep the file's).

    `start` and `num_frames` select a region in output samples (at `sample_rate`); only the
    needed part of the file (plus the resampling filter's support) is decoded. A region past
    the end comes back shorter, or empty. With return_rate, returns (wav, rate).
    Raises AudioError (a ValueError) for unreadable, empty or non-finite audio.
    """
    if start < 0 or (num_frames is not None and num_frames < 0):
        raise ValueError(f"start and num_frames must be >= 0, got {start}, {num_frames}")
    path = os.fspath(path)
    with _open(path) as f:
        rate_in = f.samplerate
        if f.frames <= 0:
            raise AudioError(path, "empty", "0 frames")
        rate_out = rate_in if sample_rate is None else _check_rate(sample_rate)
        up, down = resample_factors(rate_in, rate_out)
        total_out = -(-f.frames * up // down)
        stop = total_out if num_frames is None else min(total_out, start + num_frames)
        if start >= stop:
            wav = np.zeros(0, np.float32)
        elif up == down:
            f.seek(start)
            wav = _read(f, path, stop - start)
        else:
            # Output sample J sits at input position J * down / up. Decode from a multiple of
            # `down` (so the polyphase phases match a whole-file resampling) with the filter's
            # half-width of margin on either side.
            margin = _filter_margin(up, down)
            block = max(0, (start * down // up - margin) // down)
            src_start = block * down
            src_stop = min(f.frames, -(-stop * down // up) + margin + 1)
            f.seek(src_start)
            x = _read(f, path, src_stop - src_start)
            if len(x) == 0:
                raise AudioError(path, "read-error", f"no frames decoded at frame {src_start}")
            offset = start - block * up
            wav = _resample(x, up, down)[offset:offset + (stop - start)]
    wav = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
    return (wav, rate_out) if return_rate else wav


def save_audio(path, wav, sample_rate: int, subtype: str = "PCM_16") -> None:
    """Write a waveform in [-1, 1] as a WAV file (16-bit PCM by default), atomically.

    wav: (T,) mono or (C, T) channels-first, tensor or array; values outside [-1, 1] are
    clipped. Written atomically (sashimi.files.atomic_write): a reader never sees a half-written file.
    """
    sf = _soundfile()
    sample_rate = _check_rate(sample_rate)
    if isinstance(wav, torch.Tensor):
        wav = wav.detach().cpu().to(torch.float64).numpy()
    data = np.asarray(wav, dtype=np.float64)
    if data.ndim == 2:
        data = data.T  # soundfile wants (frames, channels)
    elif data.ndim != 1:
        raise ValueError(f"wav must be (T,) or (channels, T), got shape {data.shape}")
    if data.size and not np.isfinite(data).all():
        raise ValueError(f"wav contains {int((~np.isfinite(data)).sum())} NaN/inf values; refusing to write {path}")
    data = np.clip(data, -1.0, 1.0)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: sf.write(f, data, sample_rate, format="WAV", subtype=subtype))
