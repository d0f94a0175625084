"""Generation pipeline: sample audio from a WaveformAR in recurrent mode (seeded, prompted, streaming).

    from sashimi.pipelines.generate import Generator
    gen = Generator(model, batch_size=4)                     # fast path when available, else eager
    result = gen.generate(4, seconds=1.0, temperature=1.0, top_p=0.95, seed=0)
    result.audio               # (4, 16000) float32 in [-1, 1], at model.config.sample_rate
    result.bits_per_sample     # (4,) model NLL of the generated samples, bits/sample
    for chunk in gen.stream(4, seconds=10):                  # (4, chunk_len) as soon as produced
        play(chunk)

The loop, per sequence: the first input is the zero level (silence), or a prompt is read in
convolution mode (`model.prefill`, with state forwarding) and its last level is the first input;
then step -> logits -> `sashimi.pipelines.sampling.sample` -> the sampled level is the next input. The
plain eager loop (`model.step`) is the oracle; the fused fast path (`sashimi.pipelines.fast_step`), when
it is built and accepts the model, runs the same loop with the same uniforms, so a seed gives
the same levels on either path. See docs/generation.md.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..checks import check_int, check_number
from ..data.audio import load_audio, probe_audio
from ..data.quantize import Quantizer
from ..models.autoregressive import WaveformAR
from ..objectives.autoregressive import LN2
from ..progress import progress as progress_display
from .sampling import UniformStream, check_sampling, sample

__all__ = ["Generator", "GenerationResult", "Chunk", "FastPathWarning", "load_prefix"]


class FastPathWarning(UserWarning):
    """The fused fast path could not be used; generation runs the eager step loop."""


@dataclass
class Chunk:
    """A piece of a batch's output, in time order. kind: 'prefix' (the quantised prompt) or 'generated'.

    start is the position of the chunk's first sample in the full sequence (prefix included);
    logprobs are natural-log likelihoods of `tokens` under the model.
    """
    kind: str
    start: int
    audio: torch.Tensor  # (B, n) float32
    tokens: torch.Tensor  # (B, n) long
    logprobs: torch.Tensor  # (B, n) float64


@dataclass
class GenerationResult:
    """What `Generator.generate` returns. Positions [0, prefix_len) hold the prompt, the rest is generated.

    seconds is wall time from the first prefill/step to the last sample (model loading and
    setup excluded); samples_per_second counts generated samples over all sequences.
    """
    audio: torch.Tensor  # (N, L) float32 in [-1, 1]
    tokens: torch.Tensor  # (N, L) long
    logprobs: torch.Tensor  # (N, L - prefix_len) float64, nats, of the generated samples
    prefix_logprobs: torch.Tensor  # (N, prefix_len) float64: the model's likelihood of the prompt
    prefix_len: int
    sample_rate: int
    seconds: float
    path: str  # 'fast' or 'eager'
    settings: dict = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        return self.audio.shape[0]

    @property
    def n_generated(self) -> int:
        """Generated samples per sequence (the prompt excluded)."""
        return self.audio.shape[1] - self.prefix_len

    @property
    def samples_per_second(self) -> float:
        return self.n_samples * self.n_generated / max(self.seconds, 1e-9)

    @property
    def real_time_factor(self) -> float:
        """Seconds of audio generated per second of wall time, over all sequences (> 1: faster than real time)."""
        return self.samples_per_second / self.sample_rate

    @property
    def log_likelihood_bits(self) -> torch.Tensor:
        """(N,) log2-likelihood of each sequence's generated samples (a sum, <= 0)."""
        return self.logprobs.sum(dim=1) / LN2

    @property
    def bits_per_sample(self) -> torch.Tensor:
        """(N,) negative log-likelihood per generated sample in bits (comparable with validation NLL)."""
        return -self.log_likelihood_bits / max(self.n_generated, 1)

    def summary(self) -> dict:
        """JSON-able: settings, throughput and per-sequence likelihoods."""
        return {
            "settings": self.settings,
            "throughput": {"samples_per_second": self.samples_per_second, "real_time_factor": self.real_time_factor,
                           "seconds": self.seconds, "generated_samples": self.n_samples * self.n_generated,
                           "path": self.path},
            "samples": [{"index": i, "log_likelihood_bits": float(self.log_likelihood_bits[i]),
                         "bits_per_sample": float(self.bits_per_sample[i])} for i in range(self.n_samples)],
        }


@contextlib.contextmanager
def _torch_threads(n: int | None):
    if n is None or n == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_prefix(prefix, sample_rate: int, quantizer: Quantizer) -> tuple[torch.Tensor, dict]:
    """A prompt as levels (P,) and a description: a file path (resampled to sample_rate) or a waveform (P,).

    A waveform tensor must already be at sample_rate, values in [-1, 1] (clipped otherwise).
    Raises AudioError / ValueError for unusable input.
    """
    info = {}
    if isinstance(prefix, (str, os.PathLike)):
        path = os.fspath(prefix)
        file_rate = probe_audio(path, check_content=False).sample_rate
        wav = load_audio(path, sample_rate)
        info = {"path": path, "file_sample_rate": file_rate, "resampled": file_rate != sample_rate}
    elif isinstance(prefix, torch.Tensor):
        if prefix.dim() != 1 or not prefix.is_floating_point():
            raise ValueError(f"a prefix waveform must be a float tensor (length,), got {prefix.dtype} "
                             f"{tuple(prefix.shape)}")
        if not torch.isfinite(prefix).all():
            raise ValueError("the prefix waveform contains NaN or inf values")
        wav = prefix.detach().cpu().float()
        info = {"path": None, "file_sample_rate": sample_rate, "resampled": False}
    else:
        raise TypeError(f"prefix must be an audio file path or a waveform tensor, got {type(prefix).__name__}")
    if wav.numel() == 0:
        raise ValueError("the prefix is empty (0 samples)")
    tokens = quantizer.encode(wav.clamp(-1, 1)).long().cpu()
    info["samples"] = int(tokens.numel())
    info["seconds"] = tokens.numel() / sample_rate
    return tokens, info


def _make_fast_stepper(model, batch_size: int, fast, weights: str = "float32"):
    """(FastStepper or None, reason it is None)."""
    if fast is False:
        return None, "disabled (fast=False)"
    try:
        from .fast_step import FastPathUnavailable, FastStepper
    except ImportError as e:
        return None, f"sashimi.pipelines.fast_step cannot be imported ({e})"
    try:
        return FastStepper(model, batch_size, weights=weights), ""
    except FastPathUnavailable as e:
        return None, str(e) or type(e).__name__


class Generator:
    """Autoregressive sampling from a WaveformAR, `batch_size` sequences at a time.

    fast: 'auto' (default) uses the fused fast path when sashimi.pipelines.fast_step is built and accepts
    the model, else the eager loop with one FastPathWarning naming the reason; True requires it
    (RuntimeError otherwise); False always runs the eager loop (the oracle). step_threads: torch
    threads while the eager loop steps (1 by default: a step is many tiny ops, and extra threads
    only add synchronisation; None leaves torch's setting).

    weights: the fast path's storage of the Linear layers' weights, 'float32' (default) or
    'float16' (half the bytes of those weights per step, float32 arithmetic, SSM parameters in
    float32; logits within 2e-3 of the largest logit of the float32 step, see FastStepper). The
    eager loop always runs the model's own float32 weights, so with weights='float16' sampled
    tokens can differ from it where two choices are that close.

    The model is put in eval mode and its recurrence prepared (setup_step) here; call
    `prepare()` again after changing its weights.
    """

    def __init__(self, model: WaveformAR, batch_size: int = 1, fast="auto", step_threads: int | None = 1,
                 weights: str = "float32"):
        if not isinstance(model, WaveformAR):
            raise TypeError(f"Generator needs a sashimi WaveformAR, got {type(model).__name__}")
        check_int("batch_size", batch_size, 1)
        if fast not in (True, False, "auto"):
            raise ValueError(f"fast must be True, False or 'auto', got {fast!r}")
        check_int("step_threads", step_threads, 1, allow_none=True)
        if weights not in ("float32", "float16"):
            raise ValueError(f"weights must be 'float32' or 'float16', got {weights!r}")
        self.model, self.batch_size, self.fast, self.step_threads = model, batch_size, fast, step_threads
        self.weights = weights
        config = model.config
        self.sample_rate = config.sample_rate
        self.quantizer = config.quantizer()
        self.zero_level = config.zero_level
        self.prepare()

    def prepare(self) -> None:
        """eval mode, setup_step, and (re)build the fast stepper."""
        self.model.eval()
        self.model.setup_step()
        self.device = next(self.model.parameters()).device
        self.stepper, self.fast_reason = _make_fast_stepper(self.model, self.batch_size, self.fast, self.weights)
        if self.stepper is None and self.fast is True:
            raise RuntimeError(f"the fast generation path is unavailable: {self.fast_reason}")
        if self.stepper is None and self.fast == "auto":
            warnings.warn(f"sashimi: using the eager step loop: {self.fast_reason}", FastPathWarning, stacklevel=3)

    @property
    def path(self) -> str:
        """'fast' or 'eager': which loop generate() and stream() run."""
        return "fast" if self.stepper is not None else "eager"

    # ------------------------------------------------------------------------------ public API
    def generate(self, n_samples: int | None = None, seconds: float | None = None, n_steps: int | None = None, *,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, prefix=None,
                 chunk_len: int | None = None, progress: bool = False) -> GenerationResult:
        """n_samples sequences (default: batch_size) of `seconds` or `n_steps` samples each, prompt included.

        prefix: an audio file (resampled to the model's rate) or a waveform tensor (P,) at that
        rate, shared by all sequences; it must be shorter than the requested length. Sequence i
        uses the uniforms of sequence_seed(seed, i), whatever the batch size.
        """
        n_samples, n_steps, sampling, prefix_tokens, prefix_info = self._check_request(
            n_samples, seconds, n_steps, temperature, top_k, top_p, seed, prefix, chunk_len)
        n_generated = n_steps - len(prefix_tokens)
        bar = progress_display(total=n_samples * n_generated, unit="sample", unit_scale=True, disable=not progress,
                               desc=f"generate ({self.path})")
        pieces, seconds_spent = [], 0.0
        try:
            for first in range(0, n_samples, self.batch_size):
                indices = list(range(first, min(n_samples, first + self.batch_size)))
                t0 = time.perf_counter()
                chunks = []
                for chunk in self._run_batch(indices, n_steps, sampling, seed, prefix_tokens, chunk_len):
                    chunks.append(chunk)
                    if chunk.kind == "generated":
                        bar.update(chunk.tokens.numel())
                        rate = (bar.n / max(seconds_spent + time.perf_counter() - t0, 1e-9))
                        bar.set_postfix_str(f"{rate / self.sample_rate:.2f}x real time")
                seconds_spent += time.perf_counter() - t0
                pieces.append(chunks)
        finally:
            bar.close()
        prefix_len = len(prefix_tokens)

        def joined(attr: str, kind: str) -> torch.Tensor:
            """One tensor (N, length) from the batches' chunks of one kind."""
            rows = []
            for chunks in pieces:
                parts = [getattr(c, attr) for c in chunks if c.kind == kind]
                rows.append(torch.cat(parts, dim=1) if parts else torch.zeros(len(chunks[0].tokens), 0,
                                                                              dtype=chunks[0].logprobs.dtype))
            return torch.cat(rows, dim=0)

        audio = torch.cat([joined("audio", "prefix"), joined("audio", "generated")], dim=1) if prefix_len \
            else joined("audio", "generated")
        tokens = torch.cat([joined("tokens", "prefix"), joined("tokens", "generated")], dim=1) if prefix_len \
            else joined("tokens", "generated")
        settings = {"n_samples": n_samples, "n_steps": n_steps, "seconds": n_steps / self.sample_rate,
                    "sample_rate": self.sample_rate, "temperature": sampling[0], "top_k": sampling[1],
                    "top_p": sampling[2], "seed": seed, "batch_size": self.batch_size, "path": self.path,
                    "weights": self.weights if self.stepper is not None else "float32",
                    "fast_path_unavailable_reason": self.fast_reason or None, "prefix": prefix_info}
        return GenerationResult(audio=audio, tokens=tokens, logprobs=joined("logprobs", "generated"),
                                prefix_logprobs=joined("logprobs", "prefix"), prefix_len=prefix_len,
                                sample_rate=self.sample_rate, seconds=seconds_spent, path=self.path,
                                settings=settings)

    def stream(self, n_samples: int | None = None, seconds: float | None = None, n_steps: int | None = None, *,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, prefix=None,
               chunk_len: int | None = None, details: bool = False) -> Iterator:
        """Yield audio (n_samples, <= chunk_len) float32 as it is produced; one batch (n_samples <= batch_size).

        A prompt comes first, as one chunk of its quantised audio, then the generated samples;
        the chunks concatenate to generate(...).audio for the same arguments. chunk_len defaults
        to a tenth of a second. details=True yields `Chunk` objects (tokens and logprobs too).
        """
        n_samples, n_steps, sampling, prefix_tokens, _ = self._check_request(
            n_samples, seconds, n_steps, temperature, top_k, top_p, seed, prefix, chunk_len)
        if n_samples > self.batch_size:
            raise ValueError(f"stream() generates one batch: n_samples={n_samples} exceeds batch_size="
                             f"{self.batch_size} (make a Generator with a larger batch_size)")
        chunks = self._run_batch(list(range(n_samples)), n_steps, sampling, seed, prefix_tokens, chunk_len)
        # arguments are checked above, when stream() is called; the chunks come when iterated
        return chunks if details else (chunk.audio for chunk in chunks)

    # ------------------------------------------------------------------------------ the loop
    def _check_request(self, n_samples, seconds, n_steps, temperature, top_k, top_p, seed, prefix, chunk_len):
        sampling = check_sampling(temperature, top_k, top_p)
        n_samples = self.batch_size if n_samples is None else n_samples
        check_int("n_samples", n_samples, 1)
        if (seconds is None) == (n_steps is None):
            raise ValueError("give exactly one of seconds and n_steps (the length of each sequence)")
        if seconds is not None:
            check_number("seconds", seconds, 0, low_open=True)
            n_steps = max(1, round(seconds * self.sample_rate))
        check_int("n_steps", n_steps, 1)
        check_int("seed", seed, 0)
        check_int("chunk_len", chunk_len, 1, allow_none=True)
        prefix_tokens, prefix_info = torch.zeros(0, dtype=torch.long), None
        if prefix is not None:
            prefix_tokens, prefix_info = load_prefix(prefix, self.sample_rate, self.quantizer)
            if len(prefix_tokens) >= n_steps:
                raise ValueError(
                    f"the prefix is {len(prefix_tokens)} samples ({len(prefix_tokens) / self.sample_rate:.3f} s at "
                    f"{self.sample_rate} Hz) but each sequence is {n_steps} samples "
                    f"({n_steps / self.sample_rate:.3f} s) long, prompt included: ask for a longer length or "
                    f"use a shorter prefix")
        return n_samples, n_steps, sampling, prefix_tokens, prefix_info

    @torch.no_grad()
    def _run_batch(self, indices: list[int], n_steps: int, sampling: tuple, seed: int,
                   prefix_tokens: torch.Tensor, chunk_len: int | None) -> Iterator[Chunk]:
        """Generate the sequences `indices` (at most batch_size) of n_steps samples: yield Chunks in order."""
        model, B, device = self.model, len(indices), self.device
        chunk_len = chunk_len or max(1, self.sample_rate // 10)
        uniforms = UniformStream(seed, indices)
        # the fast stepper has a fixed batch size: pad with extra sequences and drop them
        rows = self.batch_size if self.stepper is not None else B
        state = model.default_state(rows, device=device)
        P = len(prefix_tokens)
        if P:
            prompt = prefix_tokens.to(device).expand(rows, P)
            inputs = torch.cat([torch.full((rows, 1), self.zero_level, dtype=torch.long, device=device),
                                prompt[:, :-1]], dim=1)  # shifted like training data
            logits, state = model.prefill(inputs, state)
            logprobs = torch.log_softmax(logits.double(), dim=-1).gather(-1, prompt[..., None])[..., 0]
            yield Chunk("prefix", 0, self.quantizer.decode(prompt[:B]).float().cpu(), prompt[:B].cpu(),
                        logprobs[:B].cpu())
            token = prompt[:, -1]
        else:
            token = torch.full((rows,), self.zero_level, dtype=torch.long, device=device)
        if self.stepper is not None:
            self.stepper.set_state(state)
        temperature, top_k, top_p = sampling
        position = P
        while position < n_steps:
            n = min(chunk_len, n_steps - position)
            u = uniforms.next(n)
            if rows > B:  # padding rows: any uniforms will do, they are discarded
                u = torch.cat([u, torch.zeros(rows - B, n, dtype=u.dtype)], dim=0)
            if self.stepper is not None:
                tokens, logprobs = self.stepper.generate(token, u, temperature, top_k, top_p)
                tokens, logprobs = tokens.long(), logprobs.double()
            else:
                tokens, logprobs, state = self._eager_chunk(token, state, u, sampling)
            token = tokens[:, -1].to(device)
            tokens, logprobs = tokens[:B].cpu(), logprobs[:B].cpu()
            yield Chunk("generated", position, self.quantizer.decode(tokens).float(), tokens, logprobs)
            position += n

    def _eager_chunk(self, token: torch.Tensor, state: dict, uniforms: torch.Tensor, sampling: tuple):
        """The oracle loop: step, sample, feed back; uniforms (B, n) -> tokens (B, n), logprobs (B, n), state."""
        B, n = uniforms.shape
        tokens = torch.empty(B, n, dtype=torch.long)
        logprobs = torch.empty(B, n, dtype=torch.float64)
        with _torch_threads(self.step_threads):
            for t in range(n):
                logits, state = self.model.step(token, state)
                token, logprob = sample(logits, uniforms[:, t], *sampling)
                tokens[:, t] = token
                logprobs[:, t] = logprob
        return tokens, logprobs, state
