"""The WaveFlow objective: negative log-likelihood of (dequantised) audio in nats per sample."""

from __future__ import annotations

import math

import torch

from .base import Objective

LN2 = math.log(2.0)


def padded_lengths(config, length: int) -> tuple[int, int]:
    """(samples the flow runs on, samples the log-mel is computed from) for a clip of `length`: the
    flow needs a multiple of h, the condition ceil(that / hop) whole frames. Both pad with zeros
    that the mask leaves out of the loss."""
    n = math.ceil(length / config.h) * config.h
    if config.condition != "mel":
        return n, n
    return n, math.ceil(n / config.hop_length) * config.hop_length


def prepare(model, wav: torch.Tensor, mask: torch.Tensor | None = None, dequantize: bool = True,
            seed: int | None = None):
    """Pad a batch of waveforms (B, L) with zeros to whole columns (and whole mel frames), add the
    dequantisation noise (from `seed` when given, else the global generator), compute the log-mel from
    the clean audio -> (x (B, n), mel or None, mask (B, n), False on the padding)."""
    config = model.config
    B, L = wav.shape
    param = next(model.parameters())
    wav = wav.to(device=param.device, dtype=param.dtype)
    mask = torch.ones(B, L, dtype=torch.bool, device=wav.device) if mask is None else mask.to(wav.device).bool()
    n, n_mel = padded_lengths(config, L)
    mel = None
    if model.conditional:
        if n_mel < model.mel_transform.min_length():
            raise ValueError(f"clips of {L} samples are too short for this WaveFlow's log-mel (need at least "
                             f"{model.mel_transform.min_length()} samples)")
        mel = model.mel(torch.nn.functional.pad(wav, (0, n_mel - L)))
    x = torch.nn.functional.pad(wav, (0, n - L))
    mask = torch.nn.functional.pad(mask, (0, n - L), value=False)
    if dequantize and config.dequantize_step > 0:
        generator = None if seed is None else torch.Generator(device=x.device).manual_seed(seed)
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x + (noise - 0.5) * config.dequantize_step
    return x, mel, mask


def waveflow_objective(model, batch: dict):
    """-log p(x) summed over the valid samples of the batch, the number of those samples, and metrics
    summed over the same samples: nll (nats) and nll_bits. Padding (mask False) is excluded from the
    sum (its samples are held at their padded values, see WaveFlow.log_likelihood_terms). In eval mode
    the dequantisation noise comes from a fixed seed, so validation and `sashimi eval` repeat exactly."""
    if "wav" not in batch:
        raise KeyError(f"a WaveFlow batch needs 'wav' (float audio (B, L)); got keys {sorted(batch)}")
    x, mel, mask = prepare(model, batch["wav"], batch.get("mask"), seed=None if model.training else 0)
    terms = model.log_likelihood_terms(x, mel)
    mask = mask.to(terms.dtype)
    loss_sum = -(terms * mask).sum()
    count = mask.sum()
    nll = loss_sum.detach()
    return loss_sum, count, {"nll": nll, "nll_bits": nll / LN2}


# the loss sums over the batch's real samples (the default count): the padding to whole columns is masked
WAVEFLOW = Objective(waveflow_objective, metric="nll", unit="nats/sample", summary_key="nll_nats_per_sample")
