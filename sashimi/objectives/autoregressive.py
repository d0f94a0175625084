"""The autoregressive objective: next-sample cross-entropy over quantised audio, reported in bits per sample.

    loss_sum, count, metrics = AUTOREGRESSIVE(model, batch)   # batch["tokens"], batch["mask"]

The model reads the tokens shifted right by one (the first input is the quantiser's zero
level, silence) and predicts every token: inputs[t] = tokens[t - 1]. loss_sum is the NLL in
nats summed over the real samples (what the loop minimises); metrics["bits"] the same in bits
(what it reports). The model's forward(inputs, targets, mask) computes the likelihood in chunks
of time, so the logits of a whole batch never exist at once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Objective

__all__ = ["LN2", "nll_bits", "shift_right", "autoregressive_loss", "AUTOREGRESSIVE"]

LN2 = math.log(2.0)  # nats per bit


def nll_bits(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None):
    """Negative log-likelihood in bits, summed over the unmasked positions: (sum_bits, count).

    logits (..., n_classes), targets (...) integer levels, mask (...) bool (True = counted) or
    None for all. sum_bits is a differentiable 0-d tensor (cross-entropy / ln 2); count a 0-d
    long tensor. Bits per sample = sum_bits / count; both sum across batches and processes.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree: "
                         "expected logits (..., n_classes) and targets (...)")
    if targets.is_floating_point() or targets.is_complex():
        raise TypeError(f"targets must be integer levels, got {targets.dtype}")
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1).long(),
                         reduction="none")
    if mask is None:
        return ce.sum() / LN2, torch.tensor(ce.numel(), device=ce.device)
    if mask.shape != targets.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must have the targets' shape {tuple(targets.shape)}")
    mask = mask.reshape(-1)
    ce = torch.where(mask.bool(), ce, torch.zeros((), dtype=ce.dtype, device=ce.device))
    return ce.sum() / LN2, mask.bool().sum()


def shift_right(tokens: torch.Tensor, first: int) -> torch.Tensor:
    """inputs[..., 0] = first, inputs[..., t] = tokens[..., t - 1]: what a causal model reads to predict tokens."""
    inputs = torch.empty_like(tokens)
    inputs[..., 0] = first
    inputs[..., 1:] = tokens[..., :-1]
    return inputs


def autoregressive_loss(model: torch.nn.Module, batch: dict):
    """(NLL in nats summed over the real samples, their count, {"bits": the NLL in bits}).

    `model` is a WaveformAR (or any module with `config.zero_level` and forward(inputs,
    targets, mask) -> (sum_bits, count)).
    """
    if "tokens" not in batch:
        raise KeyError("the autoregressive objective needs batch['tokens'] (quantised audio): build the dataset "
                       "with the model's quantiser (sashimi.data.datasets.dataset_for)")
    tokens, mask = batch["tokens"], batch["mask"]
    bits, count = model(shift_right(tokens, model.config.zero_level), tokens, mask)
    return bits * LN2, count, {"bits": bits.detach()}


AUTOREGRESSIVE = Objective(autoregressive_loss, metric="bits", unit="bits/sample", summary_key="nll_bits_per_sample")
