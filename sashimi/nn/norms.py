"""Normalisation layers of the residual blocks: LayerNorm, or the scalar-gain variant of state-spaces/s4's training code."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["ScalarLayerNorm", "BLOCK_NORMS", "make_block_norm"]

BLOCK_NORMS = ("layer", "scalar")


class ScalarLayerNorm(nn.Module):
    """y = s * (x - mean + m) / std over the last dimension, with one learned gain s and shift m.

    std is the population standard deviation without an epsilon. This is the normalisation of the
    residual blocks in the reference's training code (its TransposedLN with scalar=True), kept so
    that models trained there load with the same outputs; note that m is added before the division.
    """

    def __init__(self, d_model: int):
        super().__init__()
        self.d_model = d_model
        self.m = nn.Parameter(torch.zeros(1))
        self.s = nn.Parameter(torch.ones(1))
        self.m._optim = {"weight_decay": 0.0}
        self.s._optim = {"weight_decay": 0.0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        std, mean = torch.std_mean(x, dim=-1, unbiased=False, keepdim=True)
        return (self.s / std) * (x - mean + self.m)

    def extra_repr(self) -> str:
        return f"{self.d_model}"


def make_block_norm(kind: str, d_model: int) -> nn.Module:
    """'layer': nn.LayerNorm(d_model); 'scalar': ScalarLayerNorm(d_model)."""
    if kind == "layer":
        return nn.LayerNorm(d_model)
    if kind == "scalar":
        return ScalarLayerNorm(d_model)
    raise ValueError(f"block norm must be one of {BLOCK_NORMS}, got {kind!r}")
