"""Classifier-free guidance: out = f(x, t, null) + w (f(x, t, c) - f(x, t, null)) for a velocity or eps model."""

from __future__ import annotations

import math

import torch

__all__ = ["guided_output", "check_guidance_scale"]


def check_guidance_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise ValueError(f"the guidance scale must be a finite number >= 0, got {scale!r}")
    return float(scale)


def guided_output(model, x: torch.Tensor, t: torch.Tensor, cond, null, scale: float, batched: bool | None = None):
    """model(x, t, cond) -> output; cond, null: condition tensors (B, E) (null is the 'no condition').

    scale 1 is the conditional output and scale 0 the unconditional one (one evaluation each);
    other scales evaluate both, in one batch of 2B by default (`batched=False`: two calls).
    """
    scale = check_guidance_scale(scale)
    if cond is None or (batched is None and scale == 1.0):
        return model(x, t, cond)
    if batched is None and scale == 0.0:
        return model(x, t, null)
    if batched is False:
        out_c, out_u = model(x, t, cond), model(x, t, null)
    else:
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null]))
        out_c, out_u = out.chunk(2)
    return out_u + scale * (out_c - out_u)
