"""Sampling rule for the next quantised level (temperature, top-k, top-p) and the seeded uniforms that drive it.

This is the oracle: the fused fast path (sashimi.pipelines.fast_step) implements the same rule and the
tests compare the two. Given raw logits l (B, V) and one uniform u in [0, 1) per row:

    temperature 0      token = argmax l (ties: the lowest index)
    otherwise          z = l / temperature                        (float64)
                       sort z descending, ties by lower index     (the order used below)
    top_k > 0          keep the first top_k entries of that order (0: all)
                       p = softmax over the kept entries
    top_p < 1          keep the shortest prefix whose mass sum(p) >= top_p (an entry is kept
                       when the mass before it is < top_p), renormalise p over it
                       token = the first entry (in sorted order) whose cumulative p exceeds u
                       (rounding: if none does, the last entry with p > 0)
    logprob            log_softmax(l)[token]: the model's own log-likelihood of the sample
                       (temperature 1, no truncation), whatever the sampling settings

Uniforms come from one torch.Generator per generated sequence, seeded from (seed, sequence
index) (see `sequence_seed`): sequence i of a run gets the same uniforms whatever the batch size
and however the steps are cut into chunks, so a seed fixes the audio.
"""

from __future__ import annotations

import numpy as np
import torch

from ..checks import check_int, check_number

__all__ = ["check_sampling", "sample", "sequence_seed", "UniformStream"]


def check_sampling(temperature=1.0, top_k=0, top_p=1.0) -> tuple[float, int, float]:
    """Validate the sampling settings; returns them as (float, int, float). Raises ValueError."""
    check_number("temperature (0 = greedy)", temperature, 0)
    check_int("top_k (0 = keep all levels)", top_k, 0)
    check_number("top_p (1 = no nucleus truncation)", top_p, 0, 1, low_open=True)
    return float(temperature), int(top_k), float(top_p)


def sample(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One level per row: logits (B, V), uniforms (B,) in [0, 1) -> (tokens (B,) long, logprobs (B,) float64).

    The rule is in the module docstring; logprobs are natural-log likelihoods under the raw logits.
    """
    temperature, top_k, top_p = check_sampling(temperature, top_k, top_p)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor (batch, n_classes), got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if not isinstance(uniforms, torch.Tensor) or uniforms.shape != logits.shape[:1]:
        raise ValueError(f"uniforms must be a tensor of shape (batch,) = {tuple(logits.shape[:1])}, got "
                         f"{tuple(uniforms.shape) if isinstance(uniforms, torch.Tensor) else type(uniforms).__name__}")
    logits = logits.to(torch.float64)
    log_probs = torch.log_softmax(logits, dim=-1)
    if temperature == 0:
        tokens = logits.argmax(dim=-1)  # the first maximum: ties go to the lowest index
        return tokens, log_probs.gather(-1, tokens[:, None])[:, 0]

    z = logits / temperature
    z_sorted, order = torch.sort(z, dim=-1, descending=True, stable=True)  # stable: ties by lower index
    n_classes = z.shape[-1]
    if 0 < top_k < n_classes:
        z_sorted = z_sorted[:, :top_k]
    p = torch.softmax(z_sorted, dim=-1)
    if top_p < 1:
        mass_before = torch.cumsum(p, dim=-1) - p
        p = torch.where(mass_before < top_p, p, torch.zeros((), dtype=p.dtype))
        p = p / p.sum(dim=-1, keepdim=True)
    cdf = torch.cumsum(p, dim=-1)
    u = uniforms.to(device=cdf.device, dtype=torch.float64)[:, None]
    position = (cdf <= u).sum(dim=-1)  # cdf is non-decreasing: this is the first entry with cdf > u
    last_positive = (p > 0).sum(dim=-1) - 1  # p is sorted, so its positive entries come first
    position = torch.minimum(position, last_positive)
    tokens = order.gather(-1, position[:, None])[:, 0]
    return tokens, log_probs.gather(-1, tokens[:, None])[:, 0]


def sequence_seed(seed: int, index: int) -> int:
    """The torch.Generator seed of sequence `index` in a run seeded with `seed` (both ints >= 0)."""
    check_int("seed", seed, 0)
    check_int("index", index, 0)
    words = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])  # < 2**63, as torch.Generator.manual_seed wants


class UniformStream:
    """Uniforms in [0, 1) for a batch of sequences, drawn chunk by chunk: next(n) -> (B, n) float64.

    Row b comes from its own generator seeded with sequence_seed(seed, indices[b]); drawing
    n1 then n2 values gives exactly the n1 + n2 values of one draw, so chunking changes nothing.
    """

    def __init__(self, seed: int, indices):
        self.generators = [torch.Generator().manual_seed(sequence_seed(seed, i)) for i in indices]

    def next(self, n: int) -> torch.Tensor:
        if not self.generators:
            return torch.zeros(0, n, dtype=torch.float64)
        return torch.stack([torch.rand(n, generator=g, dtype=torch.float64) for g in self.generators])
