"""WaveFlow generation: vocode log-mels (from wav files or mel arrays) and sample unconditional models.

    from sashimi.pipelines.waveflow import WaveFlowPipeline, load_waveflow, read_mel_input
    pipe = WaveFlowPipeline(load_waveflow("runs/vocoder"))
    mel, info = read_mel_input("speech.wav", pipe.model)     # or "mels.npy": (n_mels, frames)
    result = pipe.vocode(mel, temperature=1.0, seed=0)       # result.audio (B, n) in [-1, 1]

The result carries each clip's exact log-likelihood under the model (nats/sample, from the same
inversion) and the wall-clock speed; `sashimi.pipelines.report.write_report` writes its listening page.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..models.waveflow import WaveFlow
from ..nn.waveflow_fast import FastInverse

__all__ = ["WaveFlowPipeline", "WaveFlowResult", "load_waveflow", "read_mel_input"]

LN2 = math.log(2.0)
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".aiff", ".aif", ".mp3")


@dataclass
class WaveFlowResult:
    """Audio (B, n) float32 clipped to [-1, 1], its log-likelihood per sample (of the unclipped output),
    the wall time of the inversion and the settings used."""
    audio: torch.Tensor
    nats_per_sample: torch.Tensor  # (B,) float64: log p(x) / n
    sample_rate: int
    seconds: float
    path: str  # 'fast' or 'plain'
    clipped_fraction: float = 0.0
    settings: dict = field(default_factory=dict)
    prefix_len: int = 0

    @property
    def n_samples(self) -> int:
        return self.audio.shape[0]

    @property
    def n_generated(self) -> int:
        """Samples per clip."""
        return self.audio.shape[1]

    @property
    def samples_per_second(self) -> float:
        return self.audio.numel() / max(self.seconds, 1e-9)

    @property
    def real_time_factor(self) -> float:
        """Seconds of audio per second of wall time (> 1: faster than real time)."""
        return self.samples_per_second / self.sample_rate

    @property
    def bits_per_sample(self) -> torch.Tensor:
        """(B,) negative log-likelihood per sample in bits (a density: it can be negative)."""
        return -self.nats_per_sample / LN2

    def summary(self) -> dict:
        return {
            "settings": self.settings,
            "throughput": {"samples_per_second": self.samples_per_second, "real_time_factor": self.real_time_factor,
                           "seconds": self.seconds, "generated_samples": self.audio.numel(), "path": self.path},
            "clipped_fraction": self.clipped_fraction,
            "samples": [{"index": i, "nats_per_sample": float(self.nats_per_sample[i]),
                         "bits_per_sample": float(self.bits_per_sample[i]),
                         "log_likelihood_bits": float(-self.bits_per_sample[i] * self.n_generated)}
                        for i in range(self.n_samples)],
        }


def load_waveflow(path: str, use_ema: bool = True) -> WaveFlow:
    """A WaveFlow from a shareable folder (config.json + model.safetensors), a training run folder (its
    best.pt, else last.pt) or a checkpoint file."""
    from ..models.pretrained import WEIGHTS_NAME, from_pretrained
    from ..training.checkpoint import (BEST_CHECKPOINT, LAST_CHECKPOINT, CheckpointError, load_checkpoint,
                                       model_from_checkpoint, resolve_checkpoint)

    if os.path.isdir(path) and os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
        model = from_pretrained(path)
    else:
        file = resolve_checkpoint(path, prefer=(BEST_CHECKPOINT, LAST_CHECKPOINT))
        model = model_from_checkpoint(load_checkpoint(file), use_ema=use_ema, path=file)
    if not isinstance(model, WaveFlow):
        raise CheckpointError(f"{path} holds a {model.config.family} model, not a WaveFlow")
    return model


def read_mel_input(path: str, model: WaveFlow):
    """A vocoder input file -> (log-mel (B, n_mels, frames), info). Audio files are loaded at the model's
    rate (resampled if needed) and turned into the model's log-mel; .npy arrays must already be log-mels
    of the model's definition: (n_mels, frames) or (B, n_mels, frames) at its hop and sample rate."""
    c = model.config
    if not model.conditional:
        raise ValueError("this WaveFlow is unconditional: use `sashimi generate`, it takes no mel")
    expected = (f"a log-mel array (n_mels={c.n_mels}, frames) or (batch, {c.n_mels}, frames) computed at "
                f"{c.sample_rate} Hz with hop {c.hop_length}, FFT {c.n_fft}, window {c.win_length}, "
                f"{c.f_min:g}-{c.f_max:g} Hz (sashimi.nn.mel.LogMel)")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {path} as a .npy array ({e}); expected {expected}") from e
        if array.ndim == 2:
            array = array[None]
        if array.ndim != 3 or array.shape[1] != c.n_mels:
            hint = " (it looks transposed: frames first)" if array.ndim == 3 and array.shape[2] == c.n_mels else ""
            raise ValueError(f"{path} has shape {tuple(array.shape)}{hint}; expected {expected}")
        if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
            raise ValueError(f"{path} must hold finite floats; expected {expected}")
        return torch.from_numpy(array.astype(np.float32)), {"input": path, "kind": "mel"}
    if suffix not in AUDIO_SUFFIXES:
        raise ValueError(f"{path}: expected an audio file ({', '.join(AUDIO_SUFFIXES)}) or {expected} in .npy")
    from ..data.audio import load_audio, probe_audio

    file_rate = probe_audio(path, check_content=False).sample_rate
    wav = load_audio(path, sample_rate=c.sample_rate)
    if wav.shape[0] < model.mel_transform.min_length():
        raise ValueError(f"{path} is too short ({wav.shape[0]} samples at {c.sample_rate} Hz); need at least "
                         f"{model.mel_transform.min_length()}")
    info = {"input": path, "kind": "audio", "file_sample_rate": file_rate,
            "resampled": file_rate != c.sample_rate}
    return model.mel(wav[None]), info


class WaveFlowPipeline:
    """Vocoding and unconditional sampling with a WaveFlow (fast row-cached inversion by default)."""

    def __init__(self, model: WaveFlow):
        self.model = model.eval()

    def _run(self, z: torch.Tensor, mel: torch.Tensor | None, fast: bool, settings: dict) -> WaveFlowResult:
        model = self.model
        start = time.perf_counter()
        with torch.no_grad():
            cond = model.condition_rows(mel, z.shape[1], z.shape[0])
            if fast:
                x, log_s = FastInverse(model).inverse(z, cond, return_log_s=True)
                log_p = model.prior_log_prob(z) + log_s
            else:
                x = model.inverse(z, mel, method="plain")
                log_p = model.log_likelihood(x, mel)
        seconds = time.perf_counter() - start
        clipped = float((x.abs() > 1).float().mean())
        return WaveFlowResult(audio=x.float().clamp(-1, 1), nats_per_sample=log_p.double() / x.shape[1],
                              sample_rate=model.config.sample_rate, seconds=seconds,
                              path="fast" if fast else "plain", clipped_fraction=clipped, settings=settings)

    def _noise(self, batch: int, n: int, temperature: float, seed: int) -> torch.Tensor:
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        param = next(self.model.parameters())
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(batch, n, generator=g, dtype=torch.float64).to(param.dtype)
        return z * (temperature * self.model.config.sigma)

    def vocode(self, mel: torch.Tensor, temperature: float = 1.0, seed: int = 0, fast: bool = True) -> WaveFlowResult:
        """Log-mel (B, n_mels, frames) or (n_mels, frames) -> audio of frames·hop samples (rounded down to
        a multiple of h)."""
        model, c = self.model, self.model.config
        if not model.conditional:
            raise ValueError("this WaveFlow is unconditional: use generate(), it takes no mel")
        if mel.dim() == 2:
            mel = mel[None]
        n = (mel.shape[-1] * c.hop_length) // c.h * c.h
        if n == 0:
            raise ValueError(f"a mel of {mel.shape[-1]} frames gives fewer than h={c.h} samples")
        mel = mel[..., :math.ceil(n / c.hop_length)]
        settings = {"temperature": temperature, "seed": seed, "frames": mel.shape[-1], "batch": mel.shape[0]}
        return self._run(self._noise(mel.shape[0], n, temperature, seed), mel, fast, settings)

    def generate(self, n: int = 1, seconds: float = 1.0, temperature: float = 1.0, seed: int = 0,
                 fast: bool = True) -> WaveFlowResult:
        """n unconditional clips of `seconds` (rounded down to a multiple of h samples)."""
        model, c = self.model, self.model.config
        if model.conditional:
            raise ValueError("this WaveFlow is a vocoder: use vocode(mel)")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        length = int(seconds * c.sample_rate) // c.h * c.h
        if length == 0:
            raise ValueError(f"{seconds} s at {c.sample_rate} Hz is fewer than h={c.h} samples")
        settings = {"temperature": temperature, "seed": seed, "seconds": length / c.sample_rate, "n": n}
        return self._run(self._noise(n, length, temperature, seed), None, fast, settings)


def _describe(model: WaveFlow) -> str:
    c = model.config
    n_params = sum(p.numel() for p in model.parameters())
    return (f"WaveFlow {c.name} ({n_params / 1e6:.2f}M parameters, h={c.h}, {c.n_flows} flows x {c.n_layers} "
            f"layers, r={c.residual_channels}, width model {c.width_model}, {c.sample_rate} Hz)")


def vocode_files(ckpt: str, inputs: list[str], out: str, temperature: float = 1.0, seed: int = 0,
                 fast: bool = True, log=print) -> list[dict]:
    """`sashimi vocode`: each input (wav or .npy log-mel) -> OUT/<input name>/ with its listening page."""
    from .report import write_report

    model = load_waveflow(ckpt)
    log(f"sashimi vocode: {ckpt}: {_describe(model)}")
    pipe = WaveFlowPipeline(model)
    pages = []
    for path in inputs:
        mel, info = read_mel_input(path, model)
        if info.get("resampled"):
            log(f"note: {path} is at {info['file_sample_rate']} Hz; resampled to the model's {model.config.sample_rate} Hz")
        result = pipe.vocode(mel, temperature=temperature, seed=seed, fast=fast)
        folder = os.path.join(out, os.path.splitext(os.path.basename(path))[0])
        paths = write_report(folder, result, info={"checkpoint": os.path.abspath(ckpt), **info},
                             title=f"WaveFlow vocoder: {os.path.basename(path)}", stem="vocoded")
        log(f"{path}: {result.audio.numel():,} samples in {result.seconds:.2f} s = "
            f"{result.real_time_factor:.3f}x real time; {float(result.nats_per_sample.mean()):.3f} nats/sample; "
            f"listening page {paths['index']}")
        pages.append(paths)
    return pages


def generate_files(ckpt: str, out: str | None, n: int, seconds: float, temperature: float = 1.0, seed: int = 0,
                   fast: bool = True, log=print) -> dict:
    """`sashimi generate` for an unconditional WaveFlow: n clips -> OUT with the listening page."""
    from .report import write_report

    model = load_waveflow(ckpt)
    log(f"sashimi generate: {ckpt}: {_describe(model)}")
    result = WaveFlowPipeline(model).generate(n, seconds, temperature=temperature, seed=seed, fast=fast)
    out = out or os.path.join(ckpt if os.path.isdir(ckpt) else os.path.dirname(os.path.abspath(ckpt)), "samples")
    paths = write_report(out, result, info={"checkpoint": os.path.abspath(ckpt)}, title="WaveFlow samples")
    log(f"wrote {n} clips to {out}: {result.real_time_factor:.3f}x real time, "
        f"{float(result.nats_per_sample.mean()):.3f} nats/sample; listening page {paths['index']}")
    return paths


def is_waveflow_checkpoint(ckpt: str) -> bool:
    """Whether a --ckpt argument names a WaveFlow (shareable folder, run folder or checkpoint file)."""
    from ..models.pretrained import WEIGHTS_NAME, read_pretrained_config
    from ..training.checkpoint import BEST_CHECKPOINT, LAST_CHECKPOINT, load_checkpoint, resolve_checkpoint

    try:
        if os.path.isdir(ckpt) and os.path.isfile(os.path.join(ckpt, WEIGHTS_NAME)):
            return read_pretrained_config(ckpt).get("family") == "waveflow"
        state = load_checkpoint(resolve_checkpoint(ckpt, prefer=(BEST_CHECKPOINT, LAST_CHECKPOINT)))
    except (OSError, ValueError):
        return False
    return state.get("model_config", {}).get("family") == "waveflow"
