"""Procedural audio synthesis behind the built-in dataset (`sashimi.data.datasets.BuiltinDataset`).

`synthesize_clip(label, timbre, rng)` renders one clip: one of ten melodic motifs
(`BUILTIN_CLASSES`) played in one of four timbres (`BUILTIN_TIMBRES`: wavetable harmonic tone,
FM, Karplus-Strong pluck, formant voice), with per-clip details drawn from `rng`. NumPy and
SciPy only; nothing is downloaded or stored. See docs/data.md.
"""

from __future__ import annotations

import numpy as np

__all__ = ["synthesize_clip", "MOTIFS", "BUILTIN_CLASSES", "BUILTIN_TIMBRES"]

# Ten melodic motifs (the classes): scale steps in semitones above the root, relative durations.
MOTIFS = (
    ((0, 4, 7), (1, 1, 2)),
    ((7, 4, 0), (1, 1, 2)),
    ((0, 2, 4, 5, 7), (1, 1, 1, 1, 2)),
    ((0, 12), (1, 1)),
    ((0, 0, 0), (1, 1, 1)),
    ((0, 3, 7, 3), (1, 1, 1, 1)),
    ((5, 0), (3, 1)),
    ((0, 7, 5, 4), (2, 1, 1, 2)),
    ((0,), (1,)),
    ((0, 2, 0, 2, 0), (1, 1, 1, 1, 2)),
)
BUILTIN_CLASSES = ("arpeggio_up", "arpeggio_down", "scale_up", "octave_leap", "repeated_note",
                   "minor_turn", "fourth_down", "leap_then_steps", "long_note", "trill")
BUILTIN_TIMBRES = ("harmonic", "fm", "pluck", "formant")
# Formant frequencies (Hz) of five vowels, a i u e o.
_VOWELS = np.array([(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (570, 840, 2410)],
                   dtype=np.float64)
_TABLE = 2048


def _wavetable(amplitudes) -> np.ndarray:
    """One period (_TABLE samples) of sum_k a_k sin(2 pi k t)."""
    spectrum = np.zeros(_TABLE // 2 + 1, dtype=np.complex128)
    spectrum[1:len(amplitudes) + 1] = -0.5j * _TABLE * np.asarray(amplitudes)
    return np.fft.irfft(spectrum, _TABLE)


def _oscillator(table: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Read a periodic wavetable at `phase` (cycles) with linear interpolation."""
    position = (phase % 1.0) * _TABLE
    i = position.astype(np.int64)
    frac = position - i
    a, b = table[i], table[(i + 1) % _TABLE]
    return a + frac * (b - a)


def synthesize_clip(label: int, timbre: int, rng: np.random.Generator, sample_rate: int = 16000,
                    n_samples: int = 16000) -> np.ndarray:
    """Synthesise one clip: motif `label` played in timbre `timbre`, details drawn from `rng`.

    The motif's notes fill 50-85% of the clip at a random onset; per clip: root pitch (MIDI
    52-67, continuous), articulation, attack/release, vibrato, timbre parameters, peak
    amplitude 0.25-0.8 and a little noise that follows the signal's envelope (silence stays
    exactly 0). Returns float32 (n_samples,).
    """
    from scipy.signal import lfilter

    sr, n = sample_rate, n_samples
    steps, durations = MOTIFS[label]
    out = np.zeros(n)
    root = rng.uniform(52.0, 67.0)
    f0s = 440.0 * 2.0 ** ((root + np.asarray(steps, dtype=np.float64) - 69.0) / 12.0)
    span = rng.uniform(0.5, 0.85) * n
    t_start = rng.uniform(0.02, 0.98 - span / n) * n
    lengths = np.asarray(durations, dtype=np.float64)
    lengths *= span / lengths.sum()
    onsets = t_start + np.concatenate([[0.0], np.cumsum(lengths)[:-1]])
    gate = rng.uniform(0.7, 0.95)
    attack, release = rng.uniform(0.002, 0.02) * sr, rng.uniform(0.01, 0.05) * sr
    vibrato_depth, vibrato_rate = rng.uniform(0.0, 0.006), rng.uniform(4.0, 7.0)
    n_harmonics = max(1, int(0.45 * sr / f0s.max()))  # band-limited for the highest note

    if timbre == 0:  # harmonic tone: 1/k^p partials, even ones scaled
        k = np.arange(1, min(24, n_harmonics) + 1)
        table = _wavetable(k ** -rng.uniform(0.8, 2.0) * np.where(k % 2 == 0, rng.uniform(0.3, 1.0), 1.0))
    elif timbre == 1:  # FM: carrier f0, modulator ratio * f0, decaying index
        ratio, index0, index_decay = rng.choice([0.5, 1.0, 2.0, 3.0]), rng.uniform(1.0, 4.0), rng.uniform(3.0, 12.0)
    elif timbre == 2:  # Karplus-Strong plucked string
        decay, brightness = rng.uniform(0.990, 0.998), rng.uniform(0.3, 0.9)
    else:  # formant: pulse-like source through three vowel resonators, a noise burst at each onset
        table = _wavetable(np.full(n_harmonics, n_harmonics ** -0.5))
        vowels = rng.integers(0, len(_VOWELS), size=len(steps))
        bandwidth, formant_shift = rng.uniform(60.0, 120.0), 2.0 ** rng.uniform(-0.1, 0.1)

    for j, (onset, length, f0) in enumerate(zip(onsets, lengths, f0s)):
        s, held = int(onset), int(length * gate)
        total = min(n - s, held + int(6 * release))
        if total <= 0:
            continue
        i = np.arange(total)
        t = i / sr
        envelope = np.minimum(1.0, i / attack) * np.where(i < held, 1.0, np.exp(-(i - held) / release))
        phase = np.cumsum(f0 * (1.0 + vibrato_depth * np.sin(2 * np.pi * vibrato_rate * t))) / sr
        if timbre == 0:
            note = _oscillator(table, phase) * np.exp(-1.5 * t)
        elif timbre == 1:
            note = np.sin(2 * np.pi * phase + index0 * np.exp(-index_decay * t) * np.sin(2 * np.pi * ratio * phase))
        elif timbre == 2:
            period = max(2, int(round(sr / f0)))
            excitation = np.zeros(total)
            burst = lfilter([brightness], [1.0, brightness - 1.0], rng.standard_normal(period))
            excitation[:min(period, total)] = burst[:total]
            feedback = np.zeros(period + 2)
            feedback[0], feedback[period], feedback[period + 1] = 1.0, -decay / 2, -decay / 2
            note = lfilter([1.0], feedback, excitation)
            envelope = np.where(i < held, 1.0, np.exp(-(i - held) / release))
        else:
            source = _oscillator(table, phase) + 0.5 * rng.standard_normal(total) * np.exp(-t / 0.008)
            note = np.zeros(total)
            for formant, gain in zip(_VOWELS[vowels[j]] * formant_shift, (1.0, 0.6, 0.3)):
                r, theta = np.exp(-np.pi * bandwidth / sr), 2 * np.pi * min(formant, 0.45 * sr) / sr
                note += gain * lfilter([1.0 - r], [1.0, -2.0 * r * np.cos(theta), r * r], source)
        out[s:s + total] += note * envelope

    out *= rng.uniform(0.25, 0.8) / max(np.abs(out).max(), 1e-12)
    follower = lfilter([0.01], [1.0, -0.99], np.abs(out))
    out += rng.uniform(0.001, 0.005) * follower * rng.standard_normal(n)
    out[np.abs(out) < 2e-5] = 0.0  # noise gate: silence is exactly 0 (the quantiser's zero level)
    return out.astype(np.float32)
