"""The non-causal SaShiMi U-Net as a flow / diffusion network: (x_t (B, L, C), t (B,), condition (B, E)) -> (B, L, C).

    # 1. embedding e = TimeEmbedding(t) (+ the condition's embedding, same width E)
    # 2. input projection C -> d_model
    # 3. down path: at each level, n_layers pairs (S4 -> FF), then DownPool (L/p, H*expand)
    # 4. centre: n_layers pairs, plus its input
    # 5. up path: UpPool + skip, then pairs, each followed by its mirror image's skip
    # 6. LayerNorm -> Linear -> GELU -> zero-initialised Linear to C channels

A pair injects the embedding at every level: y = x + S4(LN(x) + W_e e), then y + FF(LN(y)), where
W_e is the pair's own projection E -> H (DiffWave's per-layer diffusion-step projection). The S4
layers are bidirectional: every output sees the whole sequence. The output layer starts at zero, so
an untrained network predicts 0 (velocity or eps), a neutral start for either objective.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from s4lib import S4Block

from .backbone import DownPool, FFBlock, UpPool
from .embeddings import TimeEmbedding

__all__ = ["FlowUNet"]


class FlowPair(nn.Module):
    """(S4, FF) residual pair with the embedding added to the S4 branch's input."""

    def __init__(self, width: int, d_embed: int, ff: int, dropout: float, s4_kwargs: dict):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.embed = nn.Linear(d_embed, width)
        self.s4 = S4Block(width, transposed=False, dropout=dropout, bidirectional=True, **s4_kwargs)
        self.ff = None
        if ff > 0:
            self.norm2 = nn.LayerNorm(width)
            self.ff = FFBlock(width, ff, dropout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        z, _ = self.s4(self.norm1(x) + self.embed(e).unsqueeze(1))
        x = x + self.dropout(z)
        if self.ff is not None:
            x = x + self.dropout(self.ff(self.norm2(x)))
        return x


class FlowUNet(nn.Module):
    """See the module docstring. L must be a multiple of prod(pool)."""

    def __init__(self, in_channels: int = 1, d_model: int = 64, n_layers: int = 4, pool=(4, 4), expand: int = 2,
                 ff: int = 2, d_sinusoid: int = 128, d_embed: int = 512, dropout: float = 0.0, **s4_kwargs):
        super().__init__()
        pool = tuple(pool)
        for name, value, low in (("in_channels", in_channels, 1), ("d_model", d_model, 1), ("n_layers", n_layers, 0),
                                 ("expand", expand, 1), ("ff", ff, 0), ("d_embed", d_embed, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in pool):
            raise ValueError(f"pool must be a sequence of ints >= 1, got {pool!r}")
        self.in_channels, self.d_model, self.pool, self.d_embed = in_channels, d_model, pool, d_embed
        self.stride = 1
        for p in pool:
            self.stride *= p
        widths = [d_model * expand**i for i in range(len(pool) + 1)]

        def pairs(width):
            return nn.ModuleList(FlowPair(width, d_embed, ff, dropout, s4_kwargs) for _ in range(n_layers))

        self.time_embedding = TimeEmbedding(d_sinusoid, d_embed)
        self.input = nn.Linear(in_channels, d_model)
        self.down = nn.ModuleList(pairs(widths[i]) for i in range(len(pool)))
        self.down_pools = nn.ModuleList(DownPool(widths[i], expand, pool[i]) for i in range(len(pool)))
        self.center = pairs(widths[-1])
        self.up_pools = nn.ModuleList(UpPool(widths[i + 1], expand, pool[i], causal=False) for i in range(len(pool)))
        self.up = nn.ModuleList(pairs(widths[i]) for i in range(len(pool)))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, in_channels))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.in_channels:
            raise ValueError(f"x must have shape (batch, length, channels={self.in_channels}), got {tuple(x.shape)}")
        B, L, _ = x.shape
        if L < 1 or L % self.stride:
            raise ValueError(f"length must be a positive multiple of prod(pool)={self.stride}, got {L}")
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(B)
        if t.numel() != B:
            raise ValueError(f"t must hold one time per batch element ({B}), got {t.numel()}")
        # 1. embedding
        e = self.time_embedding(t).to(x.dtype)
        if condition is not None:
            if condition.shape != (B, self.d_embed):
                raise ValueError(f"condition must have shape ({B}, {self.d_embed}), got {tuple(condition.shape)}")
            e = e + condition
        # 2. input
        h = self.input(x)
        # 3-5. U-Net
        h = self._level(0, h, e)
        # 6. output
        return self.head(self.norm(h))

    def _level(self, i: int, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        if i == len(self.pool):
            y = x
            for pair in self.center:
                y = pair(y, e)
            return y + x
        skips = [x]
        for pair in self.down[i]:
            x = pair(x, e)
            skips.append(x)
        y = self.up_pools[i](self._level(i + 1, self.down_pools[i](x), e)) + skips.pop()
        for pair in self.up[i]:
            y = pair(y, e) + skips.pop()
        return y
