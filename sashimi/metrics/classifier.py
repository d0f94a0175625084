"""The evaluation classifier: a small CNN over log-mel whose softmax and penultimate features feed the metrics.

    from sashimi.metrics.classifier import EvalClassifier
    clf = EvalClassifier.from_pretrained("runs/classifier")   # config.json + model.safetensors
    probs = clf.probabilities(wav)                             # (B, K) softmax
    feats = clf.embed(wav)                                     # (B, embedding_dim): the FID features

Input: a float waveform (B, T) at `config.sample_rate`, cut or zero-padded to `clip_samples`.
Network: LogMel -> per-band standardisation (training-set mean and std, stored) -> blocks of
[3x3 conv, BatchNorm, ReLU] x 2 + 2x2 max-pool -> mean over
frequency -> mean and max over time (concatenated) -> Linear -> ReLU (the embedding) -> Linear
(class logits). In eval mode (always, outside training) BatchNorm uses its stored statistics,
so a clip's features do not depend on the batch it is in. Training lives in sashimi.metrics.training.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from ..nn.mel import LogMel

__all__ = ["ClassifierConfig", "EvalClassifier", "fit_length"]

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


@dataclass
class ClassifierConfig:
    """Shape of an EvalClassifier and the facts of its training (classes, held-out accuracy)."""
    classes: tuple[str, ...] = ()
    sample_rate: int = 16000
    clip_samples: int = 16000
    n_fft: int = 1024
    win_length: int = 1024
    hop_length: int = 256
    n_mels: int = 64
    f_min: float = 0.0
    f_max: float = 8000.0
    channels: tuple[int, ...] = (16, 32, 64, 128)
    embedding_dim: int = 128
    dropout: float = 0.2
    family: str = "eval_classifier"
    evaluation: dict = field(default_factory=dict)  # held-out accuracy and how it was measured

    def __post_init__(self):
        self.classes, self.channels = tuple(self.classes), tuple(int(c) for c in self.channels)
        if len(self.classes) < 2:
            raise ValueError(f"an evaluation classifier needs at least 2 classes, got {list(self.classes)}")
        if self.f_max > self.sample_rate / 2:
            self.f_max = self.sample_rate / 2

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["classes"], d["channels"] = list(self.classes), list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ClassifierConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown evaluation-classifier config keys {unknown}; known: {sorted(known)}")
        return cls(**d)


def fit_length(wav: torch.Tensor, length: int) -> torch.Tensor:
    """(B, T) -> (B, length): the first `length` samples, zero-padded at the end when shorter."""
    if wav.shape[-1] >= length:
        return wav[..., :length]
    return nn.functional.pad(wav, (0, length - wav.shape[-1]))


class _ConvBlock(nn.Sequential):
    def __init__(self, c_in: int, c_out: int):
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                         nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                         nn.MaxPool2d(2, ceil_mode=True))


class EvalClassifier(nn.Module):
    """Log-mel CNN classifier; `embed` gives the penultimate features, `probabilities` the softmax."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = c = config
        self.log_mel = LogMel(c.sample_rate, c.n_fft, c.win_length, c.hop_length, c.n_mels, c.f_min, c.f_max)
        channels = (1,) + c.channels
        self.register_buffer("mel_mean", torch.zeros(c.n_mels))
        self.register_buffer("mel_std", torch.ones(c.n_mels))
        self.blocks = nn.Sequential(*(_ConvBlock(a, b) for a, b in zip(channels[:-1], channels[1:])))
        self.embedding = nn.Sequential(nn.Linear(2 * c.channels[-1], c.embedding_dim), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(c.dropout), nn.Linear(c.embedding_dim, c.num_classes))

    def mel(self, wav: torch.Tensor) -> torch.Tensor:
        """(B, T) waveform -> (B, n_mels, frames) log-mel of the clip fitted to clip_samples."""
        if wav.dim() == 1:
            wav = wav[None]
        if wav.dim() != 2:
            raise ValueError(f"the evaluation classifier expects waveforms (batch, samples), got shape {tuple(wav.shape)}")
        return self.log_mel(fit_length(wav.float(), self.config.clip_samples))

    @torch.no_grad()
    def set_input_statistics(self, mel: torch.Tensor) -> None:
        """Standardise each mel band by its mean and std over a training set's log-mel (N, n_mels, frames)."""
        self.mel_mean.copy_(mel.mean(dim=(0, 2)))
        self.mel_std.copy_(mel.std(dim=(0, 2)).clamp_min(1e-3))

    def embed_mel(self, mel: torch.Tensor) -> torch.Tensor:
        x = (mel - self.mel_mean[:, None]) / self.mel_std[:, None]
        h = self.blocks(x[:, None])  # (B, C, F', T')
        h = h.mean(dim=2)
        return self.embedding(torch.cat([h.mean(dim=2), h.amax(dim=2)], dim=1))

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """Class logits (B, K)."""
        return self.head(self.embed_mel(self.mel(wav)))

    @torch.no_grad()
    def embed(self, wav: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, embedding_dim), in eval mode."""
        return self.embed_mel(self.mel(wav))

    @torch.no_grad()
    def probabilities(self, wav: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self(wav), dim=-1)

    @torch.no_grad()
    def features_and_probabilities(self, wav: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings (N, D), softmax (N, K)) of N clips, in batches, in eval mode (the mode is restored)."""
        was_training = self.training
        self.eval()
        try:
            feats, probs = [], []
            for start in range(0, wav.shape[0], batch_size):
                e = self.embed_mel(self.mel(wav[start:start + batch_size]))
                feats.append(e)
                probs.append(torch.softmax(self.head(e), dim=-1))
        finally:
            self.train(was_training)
        return torch.cat(feats), torch.cat(probs)

    def network_state(self) -> dict:
        """The trained tensors (the log-mel transform is rebuilt from the config, so it is not stored)."""
        return {k: v.detach().contiguous() for k, v in self.state_dict().items() if not k.startswith("log_mel.")}

    def save_pretrained(self, folder: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        save_file(self.network_state(), os.path.join(folder, WEIGHTS_FILE))
        with open(os.path.join(folder, CONFIG_FILE), "w") as f:
            json.dump(self.config.to_dict(), f, indent=2)
            f.write("\n")

    @classmethod
    def from_pretrained(cls, folder: str) -> "EvalClassifier":
        from safetensors.torch import load_file

        config_path, weights_path = os.path.join(folder, CONFIG_FILE), os.path.join(folder, WEIGHTS_FILE)
        for path in (config_path, weights_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{folder!r} is not an evaluation classifier folder: {path} is missing "
                                        f"(train one with `sashimi metrics train-classifier --data DIR|builtin --out DIR`)")
        with open(config_path) as f:
            d = json.load(f)
        if d.get("family") != "eval_classifier":
            raise ValueError(f"{config_path} describes a {d.get('family')!r} model, not an evaluation classifier")
        model = cls(ClassifierConfig.from_dict(d))
        missing, unexpected = model.load_state_dict(load_file(weights_path), strict=False)
        missing = [k for k in missing if not k.startswith("log_mel.")]
        if missing or unexpected:
            raise ValueError(f"{weights_path} does not match its config: missing {missing}, unexpected {unexpected}")
        return model.eval()
