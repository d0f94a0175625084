"""The WaveFlow family: WaveFlowConfig, PRESETS and the flow model (log_prob, forward, inverse, sample).

A waveform x (B, n), n = h·w, is squeezed column-major to X (h rows, w columns). Each of the
n_flows affine autoregressive flows keeps row 0 and maps row i >= 1 to Z_i = X_i·exp(log_s_i) + b_i,
with (log_s_i, b_i) from a FlowNet over the rows < i and the condition (upsampled log-mel, squeezed
the same way); the rows (and the condition with them) are permuted between flows. The prior is
N(0, sigma²) per sample and log p(x) = Σ log N(z; 0, sigma²) + Σ log_s, reported in nats per sample.
Inversion is sequential in rows: `inverse(z, mel, method="plain")` reruns the network on the rows
found so far (the oracle); method="fast" caches the rows each layer needs (sashimi.nn.waveflow_fast).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as checkpoint_call

from ..nn.mel import LogMel
from ..objectives.waveflow import WAVEFLOW
from .config import ConfigMixin, S4Settings
from .pretrained import PretrainedMixin
from .registry import register_family
from ..nn.waveflow import (WIDTH_MODELS, FlowNet, MelUpsampler, height_dilations, squeeze, unsqueeze,
                           upsample_strides, width_dilations)

__all__ = ["WaveFlowConfig", "PRESETS", "WaveFlow", "row_permutation"]

PERMUTATIONS = ("paper", "reverse")
CONDITIONS = ("mel", "none")
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _check_int(name, value, low=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


@dataclass
class WaveFlowConfig(ConfigMixin, S4Settings):
    """Everything needed to rebuild a WaveFlow. `h` is the squeeze height (rows); None dilations take
    the rules of sashimi.nn.waveflow (height: cover h; width: 1, 2, ..., 128). width_model "conv" is
    the paper's 3x3 network, "s4" the bidirectional S4 layer along rows, which takes the S4 settings
    (sashimi.models.config.S4Settings; here mode "diag" = S4D by default, "dplr" = S4; ssm_lr None
    keeps the kernel's default rate). condition "none" is unconditional. Configs written before the
    shared S4 settings name the mode `s4_mode`; from_dict reads them."""

    family: str = "waveflow"
    name: str = "custom"
    h: int = 16
    n_flows: int = 8
    n_layers: int = 8
    residual_channels: int = 64
    height_dilations: tuple | None = None
    width_dilations: tuple | None = None
    permutation: str = "paper"
    sigma: float = 1.0
    width_model: str = "conv"
    # the S4 settings mode ... backend are keyword-only fields from S4Settings; S4D by default here
    mode: str = field(default="diag", kw_only=True)
    condition: str = "mel"
    # audio and log-mel features (sashimi.nn.mel.LogMel)
    sample_rate: int = 22050
    sample_len: int = 16000
    n_mels: int = 80
    n_fft: int = 1024
    win_length: int = 1024
    hop_length: int = 256
    f_min: float = 0.0
    f_max: float = 8000.0
    upsample_strides: tuple | None = None
    checkpointing: bool = False  # recompute each flow in the backward (training memory ~ one flow)
    # the objective adds uniform noise of this width (one 16-bit step) to the audio, so a density on
    # discrete or exactly silent audio stays bounded (0 turns it off)
    dequantize_step: float = 2.0 ** -15

    def __post_init__(self):
        self.check_family("waveflow")
        for name in ("h", "n_flows", "n_layers", "residual_channels", "sample_rate", "sample_len"):
            _check_int(name, getattr(self, name), 2 if name == "h" else 1)
        self.check_s4()
        if self.width_model not in WIDTH_MODELS:
            raise ValueError(f"width_model must be one of {WIDTH_MODELS}, got {self.width_model!r}")
        if self.permutation not in PERMUTATIONS:
            raise ValueError(f"permutation must be one of {PERMUTATIONS}, got {self.permutation!r}")
        if self.condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {CONDITIONS}, got {self.condition!r}")
        if not self.dequantize_step >= 0:
            raise ValueError(f"dequantize_step must be >= 0, got {self.dequantize_step!r}")
        if not self.sigma > 0:
            raise ValueError(f"sigma (the prior's standard deviation) must be > 0, got {self.sigma!r}")
        for name in ("height_dilations", "width_dilations", "upsample_strides"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(value)
                setattr(self, name, value)
                for v in value:
                    _check_int(f"{name} entries", v)
        for name in ("height_dilations", "width_dilations"):
            value = getattr(self, name)
            if value is not None and len(value) != self.n_layers:
                raise ValueError(f"{name} needs n_layers={self.n_layers} entries, got {list(value)}")
        if self.condition == "mel":
            for name in ("n_mels", "n_fft", "win_length", "hop_length"):
                _check_int(name, getattr(self, name))
            if self.upsample_strides is not None and math.prod(self.upsample_strides) != self.hop_length:
                raise ValueError(f"upsample_strides {list(self.upsample_strides)} must multiply to "
                                 f"hop_length={self.hop_length}")
            self.mel_transform()  # checks the STFT/mel settings against the sample rate

    # derived settings
    def resolved_height_dilations(self) -> tuple:
        return self.height_dilations or height_dilations(self.h, self.n_layers)

    def resolved_width_dilations(self) -> tuple:
        return self.width_dilations or width_dilations(self.n_layers)

    def resolved_upsample_strides(self) -> tuple:
        return self.upsample_strides or upsample_strides(self.hop_length)

    @property
    def cond_channels(self) -> int:
        return self.n_mels if self.condition == "mel" else 0

    def mel_transform(self) -> LogMel:
        return LogMel(self.sample_rate, self.n_fft, self.win_length, self.hop_length, self.n_mels,
                      self.f_min, self.f_max)

    @classmethod
    def from_dict(cls, d: dict) -> "WaveFlowConfig":
        """The config of a to_dict() output, also of one written with the mode under its older key `s4_mode`."""
        if isinstance(d, dict) and "s4_mode" in d:
            d = dict(d)
            if "mode" in d:
                raise ValueError("a WaveFlow configuration names the S4 mode twice (mode and s4_mode)")
            d["mode"] = d.pop("s4_mode")
        return super().from_dict(d)


PRESETS = {
    # the paper's small model: h = 16, r = 64, 8 flows x 8 layers (5.93M parameters)
    "waveflow-h16-r64": WaveFlowConfig(name="waveflow-h16-r64"),
    "waveflow-h16-r128": WaveFlowConfig(name="waveflow-h16-r128", residual_channels=128),
    "waveflow-h64-r64": WaveFlowConfig(name="waveflow-h64-r64", h=64),
    # S4 width model: 3x1 height convs + a bidirectional S4D layer along each row
    "waveflow-s4-h16": WaveFlowConfig(name="waveflow-s4-h16", width_model="s4"),
    # CPU-sized vocoder (faster than real time at 22.05 kHz, batch 1, 2 cores; see docs/waveflow.md)
    "waveflow-cpu": WaveFlowConfig(name="waveflow-cpu", n_flows=4, n_layers=6, residual_channels=32),
    # tests and demos
    "waveflow-tiny": WaveFlowConfig(name="waveflow-tiny", h=8, n_flows=2, n_layers=3, residual_channels=8,
                                    sample_len=4096),
}


def row_permutation(h: int, flow: int, n_flows: int, kind: str = "paper") -> torch.Tensor:
    """Rows after flow `flow`: new row i = old row perm[i]. "paper": reverse all rows after the first
    half of the flows, reverse each half of the rows after the others (h < 4, where a half is one
    row, reverses all: h = 2 alternates like WaveGlow's coupling); "reverse": reverse after every flow."""
    rows = torch.arange(h)
    if kind == "reverse" or flow < n_flows // 2 or h < 4:
        return rows.flip(0)
    half = h // 2
    return torch.cat([rows[:half].flip(0), rows[half:].flip(0)])


class WaveFlow(PretrainedMixin, nn.Module):
    """WaveFlow: x (B, n) [and log-mel (B, n_mels, n // hop)] <-> z (B, n), n a multiple of h."""

    objective = WAVEFLOW

    def __init__(self, config: WaveFlowConfig):
        super().__init__()
        self.config = config
        c = config
        self.h = c.h
        self.mel_transform = c.mel_transform() if c.condition == "mel" else None
        self.upsampler = MelUpsampler(c.resolved_upsample_strides()) if c.condition == "mel" else None
        self.flows = nn.ModuleList(
            FlowNet(c.residual_channels, c.n_layers, c.cond_channels, c.resolved_height_dilations(),
                    c.resolved_width_dilations(), c.width_model, s4=c.s4_kwargs())
            for _ in range(c.n_flows))
        # rows_k[i]: the row of the squeezed input that sits at row i when flow k runs (for the condition)
        perms = [row_permutation(c.h, k, c.n_flows, c.permutation) for k in range(c.n_flows)]
        rows = [torch.arange(c.h)]
        for p in perms[:-1]:
            rows.append(rows[-1][p])
        self.register_buffer("perms", torch.stack(perms), persistent=False)
        self.register_buffer("cond_rows", torch.stack(rows), persistent=False)

    # ------------------------------------------------------------------ inputs
    @property
    def conditional(self) -> bool:
        return self.config.condition == "mel"

    def mel(self, wav: torch.Tensor) -> torch.Tensor:
        """The model's log-mel features of a waveform (B, T) -> (B, n_mels, T // hop)."""
        if self.mel_transform is None:
            raise ValueError("this WaveFlow is unconditional (condition='none'): it takes no mel")
        return self.mel_transform(wav)

    def _check_audio(self, x: torch.Tensor, name: str) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 2:
            raise ValueError(f"{name} must be a float tensor (batch, samples), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[1] % self.h or x.shape[1] == 0:
            raise ValueError(f"{name} has {x.shape[1]} samples: WaveFlow with h={self.h} needs a positive "
                             f"multiple of h (crop or pad the audio; sashimi.objectives.waveflow pads and masks)")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or infinite values")

    def condition_rows(self, mel: torch.Tensor | None, n: int, batch: int) -> torch.Tensor | None:
        """Upsampled, squeezed condition (B, n_mels, h, n // h), or None for an unconditional model."""
        if not self.conditional:
            if mel is not None:
                raise ValueError("this WaveFlow is unconditional (condition='none'): pass mel=None")
            return None
        c = self.config
        if mel is None:
            raise ValueError(f"this WaveFlow is a vocoder: pass a log-mel (batch, n_mels={c.n_mels}, frames)")
        if mel.dim() != 3 or mel.shape[1] != c.n_mels or mel.shape[0] != batch:
            raise ValueError(f"mel must have shape (batch={batch}, n_mels={c.n_mels}, frames), got {tuple(mel.shape)}")
        frames = mel.shape[2]
        if frames * c.hop_length < n or (frames - 1) * c.hop_length >= n:
            raise ValueError(f"{frames} mel frames at hop {c.hop_length} ({c.sample_rate} Hz) do not match "
                             f"{n} samples: expected {math.ceil(n / c.hop_length)} frames "
                             f"(frames·hop >= samples > (frames - 1)·hop)")
        if not bool(torch.isfinite(mel).all()):
            raise ValueError("mel contains NaN or infinite values")
        up = self.upsampler(mel.to(next(self.parameters()).dtype))[..., :n]
        return squeeze(up, self.h)

    # ------------------------------------------------------------------ the flow
    def _flow_forward(self, k: int, X: torch.Tensor, cond: torch.Tensor | None):
        """Flow k on squeezed X (B, 1, h, w): Z and log_s (B, 1, h - 1, w) of rows 1..h-1."""
        net = self.flows[k]
        cond_k = None if cond is None else cond[:, :, self.cond_rows[k][1:]]
        if self.config.checkpointing and torch.is_grad_enabled():
            log_s, b = checkpoint_call(net, X[:, :, :-1], cond_k, use_reentrant=False)
        else:
            log_s, b = net(X[:, :, :-1], cond_k)
        Z = torch.cat([X[:, :, :1], X[:, :, 1:] * torch.exp(log_s) + b], dim=2)
        return Z, log_s

    def _run(self, x: torch.Tensor, mel: torch.Tensor | None, per_sample: bool):
        self._check_audio(x, "x")
        B, n = x.shape
        cond = self.condition_rows(mel, n, B)
        X = squeeze(x[:, None], self.h)
        # log_s of flow k at row i belongs to the sample at squeezed row cond_rows[k][i] of x
        logdet = X.new_zeros(B, 1, self.h, n // self.h) if per_sample else x.new_zeros(B)
        for k in range(self.config.n_flows):
            X, log_s = self._flow_forward(k, X, cond)
            if per_sample:
                logdet = logdet.index_add(2, self.cond_rows[k][1:], log_s)
            else:
                logdet = logdet + log_s.flatten(1).sum(1)
            if k < self.config.n_flows - 1:
                X = X[:, :, self.perms[k]]
        if per_sample:
            prior = self._prior_terms(X)
            prior = torch.empty_like(prior).index_copy_(2, self.cond_rows[-1], prior)
            return unsqueeze(prior + logdet)[:, 0]
        return unsqueeze(X)[:, 0], logdet

    def forward(self, x: torch.Tensor, mel: torch.Tensor | None = None):
        """x (B, n) -> (z (B, n), logdet (B,)): z = f(x), logdet = log|det df/dx| summed over samples."""
        return self._run(x, mel, per_sample=False)

    def _prior_terms(self, z: torch.Tensor) -> torch.Tensor:
        sigma = self.config.sigma
        return -0.5 * (z / sigma) ** 2 - math.log(sigma) - HALF_LOG_2PI

    def prior_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Σ over samples of log N(z; 0, sigma²), per example (B,)."""
        return self._prior_terms(z).flatten(1).sum(1)

    def log_likelihood(self, x: torch.Tensor, mel: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x) in nats, summed over the samples of each example (B,)."""
        z, logdet = self(x, mel)
        return self.prior_log_prob(z) + logdet

    def log_likelihood_terms(self, x: torch.Tensor, mel: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x) split over the samples (B, n): each sample's prior term log N(z; 0, sigma²) and its
        log_s in every flow, placed at that sample's position in x. The terms sum to log_likelihood(x);
        a loss may mask them (padding), which then scores the valid samples with the padding held fixed."""
        return self._run(x, mel, per_sample=True)

    def log_prob(self, x: torch.Tensor, mel: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x) in nats per sample, per example (B,)."""
        return self.log_likelihood(x, mel) / x.shape[1]

    @torch.no_grad()
    def inverse(self, z: torch.Tensor, mel: torch.Tensor | None = None, method: str = "fast") -> torch.Tensor:
        """z (B, n) -> x (B, n) with forward(x) = z. method "plain" reruns each flow's network on the rows
        found so far (the oracle, O(h²) rows of work per flow); "fast" steps one row at a time with
        per-layer row caches (sashimi.nn.waveflow_fast), the same numbers to float round-off."""
        if method not in ("fast", "plain"):
            raise ValueError(f"method must be 'fast' or 'plain', got {method!r}")
        self._check_audio(z, "z")
        B, n = z.shape
        cond = self.condition_rows(mel, n, B)
        if method == "fast":
            from ..nn.waveflow_fast import FastInverse
            return FastInverse(self).inverse(z, cond)
        X = squeeze(z[:, None], self.h)
        for k in reversed(range(self.config.n_flows)):
            if k < self.config.n_flows - 1:
                X = X[:, :, torch.argsort(self.perms[k])]
            X = self._flow_inverse_plain(k, X, cond)
        return unsqueeze(X)[:, 0]

    def _flow_inverse_plain(self, k: int, Z: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        net = self.flows[k]
        cond_k = None if cond is None else cond[:, :, self.cond_rows[k]]
        rows = [Z[:, :, :1]]
        for i in range(1, self.h):
            X_in = torch.cat(rows, dim=2)  # rows 0..i-1
            log_s, b = net(X_in, None if cond_k is None else cond_k[:, :, 1:i + 1])
            rows.append((Z[:, :, i:i + 1] - b[:, :, -1:]) * torch.exp(-log_s[:, :, -1:]))
        return torch.cat(rows, dim=2)

    @torch.no_grad()
    def sample(self, mel: torch.Tensor | None = None, temperature: float = 1.0, length: int | None = None,
               batch_size: int | None = None, generator: torch.Generator | None = None,
               method: str = "fast") -> torch.Tensor:
        """Audio (B, n) from z ~ N(0, (temperature·sigma)²). With a mel, n = frames·hop rounded down to a
        multiple of h; unconditional models take `length` (rounded down to a multiple of h) and batch_size."""
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        c = self.config
        if self.conditional:
            if mel is None:
                raise ValueError(f"this WaveFlow is a vocoder: pass a log-mel (batch, n_mels={c.n_mels}, frames)")
            B, n = mel.shape[0], (mel.shape[-1] * c.hop_length) // self.h * self.h
        else:
            B, n = batch_size or 1, ((length or c.sample_len) // self.h) * self.h
        if n == 0:
            raise ValueError(f"nothing to generate: fewer than h={self.h} samples requested")
        param = next(self.parameters())
        z = torch.randn(B, n, generator=generator, device=param.device, dtype=param.dtype)
        return self.inverse(z * (temperature * c.sigma), mel, method=method)


register_family("waveflow", WaveFlowConfig, WaveFlow, PRESETS)
