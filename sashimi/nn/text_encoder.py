"""A small trainable text encoder for short prompts: UTF-8 bytes -> embeddings -> Transformer -> mean pool."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["TextEncoder", "encode_prompts"]

PAD = 256  # byte values are 0..255


def encode_prompts(prompts, max_len: int) -> torch.Tensor:
    """A list of non-empty strings -> (B, max_len) int64 byte ids, PAD-filled (longer prompts are cut)."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
        raise TypeError(f"prompts must be a non-empty list of strings, got {type(prompts).__name__}")
    ids = torch.full((len(prompts), max_len), PAD, dtype=torch.int64)
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompt {i} must be a string, got {type(p).__name__}")
        data = p.strip().lower().encode("utf-8")[:max_len]
        if not data:
            raise ValueError(f"prompt {i} is empty; give a short description such as 'pluck motif 3'")
        ids[i, :len(data)] = torch.tensor(list(data), dtype=torch.int64)
    return ids


class TextEncoder(nn.Module):
    """prompts (list of str) -> (B, d_embed). Byte-level (no tokenizer files), learned positions."""

    def __init__(self, d_embed: int, d_model: int = 128, n_layers: int = 2, n_heads: int = 4, max_len: int = 64):
        super().__init__()
        self.max_len = max_len
        self.tokens = nn.Embedding(PAD + 1, d_model, padding_idx=PAD)
        self.positions = nn.Parameter(torch.randn(max_len, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, 2 * d_model, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.out = nn.Linear(d_model, d_embed)

    def forward(self, prompts) -> torch.Tensor:
        ids = encode_prompts(prompts, self.max_len).to(self.positions.device)
        pad = ids == PAD
        h = self.encoder(self.tokens(ids) + self.positions, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.out((h * keep).sum(1) / keep.sum(1))
