"""One-step distillation of a (reflowed) rectified flow: x1_hat = x0 + v(x0, 0, c) regresses the flow's own pair.

    loss = ||x0 + v(x0, 0, c) - x1||^2,  (x0, x1) a reflow pair (noise, ODE(noise)).

This is the rectified-flow loss at t = 0 exactly (x_0 is the noise, the target x1 - x0), so the
distilled model is a flow model whose one Euler step is its whole trajectory.
"""

from __future__ import annotations

import torch

from .rectified_flow import rectified_flow_loss, weighted_loss

__all__ = ["distillation_objective"]


def distillation_objective(model, batch: dict, *, generator: torch.Generator | None = None):
    """objective(model, batch) -> (loss_sum, count, metrics); the batch must carry reflow pairs."""
    if batch.get("noise") is None:
        raise ValueError("one-step distillation trains on reflow pairs: the batch needs 'noise' (and 'x1')")
    x1, mask = model.encode_batch(batch)
    x0 = batch["noise"].to(x1.device)
    t = torch.zeros(x1.shape[0], dtype=x1.dtype, device=x1.device)
    v = model(x0, t, model.condition_from_batch(batch, generator))
    loss_sum, count = weighted_loss(*rectified_flow_loss(v, x0, x1, mask), batch)
    return loss_sum, count, {"mse": loss_sum.detach()}
