"""The WaveFlow objective: negative log-likelihood of (dequantised) audio in nats per sample."""

from __future__ import annotations

import math

import torch

LN2 = math.log(2.0)


def usable_length(config, length: int) -> int:
    """The longest prefix of a `length`-sample clip the model scores: whole mel hops (vocoders), then
    whole columns of h samples."""
    if config.condition == "mel":
        length = (length // config.hop_length) * config.hop_length
    return (length // config.h) * config.h


def prepare(model, wav: torch.Tensor, mask: torch.Tensor | None = None, dequantize: bool = True):
    """Crop a batch of waveforms (B, L) to the usable length, add the dequantisation noise, compute the
    log-mel (from the clean audio) -> (x, mel or None, mask)."""
    config = model.config
    n = usable_length(config, wav.shape[-1])
    if n == 0:
        need = config.hop_length if config.condition == "mel" else config.h
        raise ValueError(f"clips of {wav.shape[-1]} samples are too short for this WaveFlow (need at least "
                         f"{max(need, config.h)})")
    param = next(model.parameters())
    wav = wav.to(device=param.device, dtype=param.dtype)
    mel = None
    if model.conditional:
        mel = model.mel(wav[:, :n])
        mel = mel[..., :math.ceil(n / config.hop_length)]
    x = wav[:, :n]
    if dequantize and config.dequantize_step > 0:
        x = x + (torch.rand_like(x) - 0.5) * config.dequantize_step
    mask = torch.ones_like(x, dtype=torch.bool) if mask is None else mask[:, :n].to(x.device)
    return x, mel, mask


def waveflow_objective(model, batch: dict):
    """-log p(x) summed over the valid samples of the batch, the number of those samples, and metrics:
    nll (nats/sample) and nll_bits (bits/sample) of this batch. Padding (mask False) is excluded from the
    sum (its samples are held at their padded values, see WaveFlow.log_likelihood_terms)."""
    if "wav" not in batch:
        raise KeyError(f"a WaveFlow batch needs 'wav' (float audio (B, L)); got keys {sorted(batch)}")
    x, mel, mask = prepare(model, batch["wav"], batch.get("mask"))
    terms = model.log_likelihood_terms(x, mel)
    mask = mask.to(terms.dtype)
    loss_sum = -(terms * mask).sum()
    count = mask.sum()
    nll = (loss_sum.detach() / count.clamp_min(1)).item()
    return loss_sum, count, {"nll": nll, "nll_bits": nll / LN2}
