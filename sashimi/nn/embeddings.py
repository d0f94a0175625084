"""Embeddings for conditional generators: sinusoidal time features, the time MLP, class labels with a null id."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["sinusoidal_embedding", "TimeEmbedding", "LabelEmbedding"]


def sinusoidal_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """t (B,) in [0, 1] -> (B, dim): [sin(s t w_k), cos(s t w_k)], w_k = 10000^(-k / (dim/2 - 1)).

    The time is multiplied by `scale` (1000) first, so that the fastest feature turns ~160 times over
    [0, 1] as over the integer steps of a 1000-step diffusion.
    """
    if dim < 4 or dim % 2:
        raise ValueError(f"the sinusoidal embedding needs an even dim >= 4, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1))
    angles = scale * t.to(torch.float32).reshape(-1, 1) * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class TimeEmbedding(nn.Module):
    """t (B,) -> (B, d_embed): sinusoidal features -> Linear -> SiLU -> Linear -> SiLU."""

    def __init__(self, d_sinusoid: int = 128, d_embed: int = 512):
        super().__init__()
        self.d_sinusoid = d_sinusoid
        self.fc1 = nn.Linear(d_sinusoid, d_embed)
        self.fc2 = nn.Linear(d_embed, d_embed)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return F.silu(self.fc2(F.silu(self.fc1(sinusoidal_embedding(t, self.d_sinusoid)))))


class LabelEmbedding(nn.Module):
    """Class ids (B,) in [0, n_classes) -> (B, d_embed); id n_classes (`null_id`) is the learned 'no label'."""

    def __init__(self, n_classes: int, d_embed: int):
        super().__init__()
        if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 1:
            raise ValueError(f"n_classes must be an int >= 1, got {n_classes!r}")
        self.n_classes = n_classes
        self.embedding = nn.Embedding(n_classes + 1, d_embed)

    @property
    def null_id(self) -> int:
        return self.n_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(labels, device=self.embedding.weight.device)
        if labels.dtype not in (torch.int64, torch.int32) or labels.dim() != 1:
            raise TypeError(f"labels must be a 1-D integer tensor, got {labels.dtype} of shape {tuple(labels.shape)}")
        bad = (labels < 0) | (labels > self.n_classes)
        if bool(bad.any()):
            raise ValueError(f"unknown label {int(labels[bad][0])}: this model knows labels 0..{self.n_classes - 1}"
                             f" (and {self.null_id} for 'none')")
        return self.embedding(labels.long())
