"""FlowModel: the conditional SaShiMi U-Net of the rectified-flow and DiffWave families, with its data space.

forward(x, t, condition) -> (B, L, C) is the network (velocity for rectified flow, eps for
DiffWave). `condition(labels=|prompts=|embedding=)` and `null_condition(B)` give the (B, d_embed)
condition tensors the network adds to its time embedding; `encode_batch` maps a data batch to
the model's space (raw samples, or normalised log-mel frames) and `decode` maps back to audio.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from sashimi.nn.embeddings import LabelEmbedding
from sashimi.nn.flow_unet import FlowUNet
from sashimi.nn.text_encoder import TextEncoder
from .flow_config import FlowConfig
from .pretrained import PretrainedMixin
from .registry import register_family

__all__ = ["FlowModel", "register_flow_family"]


class FlowModel(PretrainedMixin, nn.Module):
    def __init__(self, config: FlowConfig):
        super().__init__()
        if not isinstance(config, FlowConfig):
            raise TypeError(f"FlowModel needs a FlowConfig, got {type(config).__name__}")
        self.config = config
        c = config
        self.net = FlowUNet(c.channels, c.d_model, c.n_layers, c.pool, c.expand, c.ff, c.d_sinusoid, c.d_embed,
                            c.dropout, **c.s4_kwargs())
        self.labels = self.text = self.user = None
        if c.condition == "label":
            self.labels = LabelEmbedding(c.n_classes, c.d_embed)
        elif c.condition == "text":
            self.text = TextEncoder(c.d_embed, c.text_d_model, c.text_layers, max_len=c.text_max_len)
        elif c.condition == "embedding":
            self.user = nn.Linear(c.d_condition, c.d_embed)
        if c.condition in ("text", "embedding"):
            self.null_embedding = nn.Parameter(torch.zeros(c.d_embed))
        self._mel = None

    # ------------------------------------------------------------------ network
    def forward(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x, t, condition)

    @property
    def conditional(self) -> bool:
        return self.config.condition != "none"

    # ------------------------------------------------------------------ conditions
    def condition(self, labels=None, prompts=None, embedding=None) -> torch.Tensor | None:
        """The condition tensor (B, d_embed) of labels (B,) ints, prompts (list of B strings) or a
        user embedding (B, d_condition); None for an unconditional model."""
        kind = self.config.condition
        given = {k: v for k, v in (("labels", labels), ("prompts", prompts), ("embedding", embedding)) if v is not None}
        expected = {"label": "labels", "text": "prompts", "embedding": "embedding"}.get(kind)
        if kind == "none":
            if given:
                raise ValueError(f"this model is unconditional; it takes no {', '.join(given)}")
            return None
        if set(given) != {expected}:
            flag = {"labels": "--label", "prompts": "--prompt", "embedding": "--embedding"}[expected]
            raise ValueError(f"this model is conditioned by {kind!r}: pass {expected}= ({flag}), "
                             f"got {sorted(given) or 'nothing'}")
        if kind == "label":
            labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
            bad = (labels < 0) | (labels >= self.config.n_classes)
            if bool(bad.any()):
                raise ValueError(f"unknown label {int(labels[bad][0])}: this model knows labels "
                                 f"0..{self.config.n_classes - 1}")
            return self.labels(labels)
        if kind == "text":
            return self.text(list(prompts))
        embedding = torch.as_tensor(embedding, dtype=self.null_embedding.dtype, device=self.null_embedding.device)
        if embedding.dim() != 2 or embedding.shape[1] != self.config.d_condition:
            raise ValueError(f"the embedding must have shape (batch, {self.config.d_condition}), "
                             f"got {tuple(embedding.shape)}")
        if not bool(torch.isfinite(embedding).all()):
            raise ValueError("the embedding holds NaN or infinite values")
        return self.user(embedding)

    def null_condition(self, batch_size: int) -> torch.Tensor | None:
        """The learned 'no condition' (B, d_embed), for guidance; None for an unconditional model."""
        if self.labels is not None:
            return self.labels(torch.full((batch_size,), self.labels.null_id, dtype=torch.int64))
        if self.text is not None or self.user is not None:
            return self.null_embedding.expand(batch_size, -1)
        return None

    def condition_from_batch(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """A training batch's condition; items without one (label -1, empty caption) and, in training,
        a random fraction p_uncond get the null condition."""
        kind = self.config.condition
        if kind == "none":
            return None
        B = len(batch["wav"]) if "wav" in batch else len(batch["x1"])
        drop = torch.zeros(B, dtype=torch.bool)
        if self.training and self.config.p_uncond > 0:
            drop = torch.rand(B, generator=generator) < self.config.p_uncond
        if kind == "label":
            labels = torch.as_tensor(batch["label"], dtype=torch.int64).reshape(-1).cpu()
            labels = torch.where((labels < 0) | drop, torch.full_like(labels, self.labels.null_id), labels)
            return self.labels(labels)
        null = self.null_condition(B)
        if kind == "text":
            prompts = list(batch.get("prompt") or [""] * B)
            missing = torch.tensor([not p.strip() for p in prompts]) | drop
            texts = [p if not m else "-" for p, m in zip(prompts, missing.tolist())]
            cond = self.text(texts)
        else:
            cond = self.condition(embedding=batch["embedding"])
            missing = drop
        return torch.where(missing.to(cond.device).unsqueeze(1), null, cond)

    # ------------------------------------------------------------------ data space
    def mel_transform(self):
        if self._mel is None:
            try:
                from sashimi.nn.mel import LogMel
            except ImportError as err:  # pragma: no cover - the mel transform ships with the WaveFlow vocoder
                raise RuntimeError("space='mel' needs sashimi.nn.mel.LogMel (the WaveFlow vocoder's features)") from err
            c = self.config
            self._mel = LogMel(c.sample_rate, n_fft=c.n_fft, win_length=c.n_fft, hop_length=c.hop_length,
                               n_mels=c.n_mels, f_max=min(8000.0, c.sample_rate / 2))
        return self._mel

    def encode_audio(self, wav: torch.Tensor) -> torch.Tensor:
        """Audio (B, L) in [-1, 1] -> the model's space (B, frames, channels)."""
        if self.config.space == "waveform":
            return wav.unsqueeze(-1)
        mel = self.mel_transform()(wav)  # (B, n_mels, frames)
        mel = mel[..., :self.config.frames].transpose(1, 2)
        return (mel - self.config.mel_mean) / self.config.mel_std

    def encode_batch(self, batch: dict):
        """(x1 (B, frames, channels), mask broadcastable to it or None)."""
        if "x1" in batch:
            return batch["x1"], batch.get("x1_mask")
        wav = batch["wav"]
        x1 = self.encode_audio(wav.to(next(self.parameters()).device))
        mask = batch.get("mask")
        if mask is None or self.config.space == "mel":
            return x1, None
        return x1, mask.to(x1.device).unsqueeze(-1)

    def decode(self, x: torch.Tensor, vocoder=None) -> torch.Tensor:
        """The model's space (B, frames, channels) -> audio (B, L) in [-1, 1]."""
        if self.config.space == "waveform":
            return x[..., 0].clamp(-1, 1)
        if vocoder is None:
            raise ValueError("a mel-space model needs a WaveFlow vocoder to make audio (pass vocoder=)")
        n_mels = getattr(getattr(vocoder, "config", None), "n_mels", self.config.n_mels)
        if n_mels != self.config.n_mels:
            raise ValueError(f"the vocoder takes {n_mels} mel bins, this model makes {self.config.n_mels}")
        mel = x.transpose(1, 2) * self.config.mel_std + self.config.mel_mean  # (B, n_mels, frames)
        return vocoder.sample(mel).clamp(-1, 1)

    def noise_shape(self, batch_size: int) -> tuple:
        return (batch_size, self.config.frames, self.config.channels)

    # ------------------------------------------------------------------ the family's processes
    def timestep_sampler(self):
        from sashimi.objectives.rectified_flow import get_timestep_sampler

        return get_timestep_sampler(self.config.timestep_sampler, **(self.config.timestep_params or {}))

    def diffusion_schedule(self):
        from sashimi.objectives.diffwave import DiffusionSchedule

        c = self.config
        return DiffusionSchedule(c.T, c.beta_start, c.beta_end)

    def extra_repr(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        return f"family={self.config.family}, space={self.config.space}, condition={self.config.condition}, " \
               f"params={n / 1e6:.2f}M"


def register_flow_family(family: str, model_cls: type, presets: dict, default: str, title: str, noun: str):
    """Register a FlowConfig family and return its `build(config=default, **overrides)`.

    title names the presets in errors ('DiffWave'), noun what a config of another family is not.
    """
    if not issubclass(model_cls, FlowModel):
        raise TypeError(f"family {family!r}: {model_cls.__name__} is not a FlowModel")

    def build(config=default, **overrides) -> FlowModel:
        if isinstance(config, str):
            if config not in presets:
                raise ValueError(f"unknown {title} preset {config!r}; expected one of {sorted(presets)}")
            config = presets[config]
        elif isinstance(config, dict):
            config = FlowConfig.from_dict(config)
        config = config.replace(**overrides)
        if config.family != family:
            raise ValueError(f"a {config.family!r} config is not {noun}")
        return model_cls(config)

    build.__doc__ = f"A fresh {model_cls.__name__} from a {title} preset name, a config dict or a FlowConfig."
    build.__qualname__ = build.__name__ = "build"
    register_family(family, FlowConfig, model_cls, presets)
    return build
