"""Fused step path for WaveformAR: the whole recurrent step (and the sampling loop) in one C++ engine.

`FastStepper(model, batch_size)` exports a WaveformAR's step parameters (after
`model.setup_step()`) into the engine in kernels/sashimi_step_cpu.cpp, which holds the recurrent
state and runs embedding -> SaShiMi step (each level only on the steps where it fires) ->
LayerNorm -> head on raw float32 arrays; its S4 layers run s4lib's fused layer step
(kernels/s4_layer_step.h, packed by s4lib.fused_step.pack_ssm). The eager `model.step` stays the oracle: the engine
follows it to float32 round-off, and its state converts to and from `model.default_state`'s
format, so a prompt read by `model.prefill` continues in the engine and the engine's state
continues in eager mode. When the engine cannot serve a model (no compiler, failed build, a
feature it does not implement) the constructor raises `FastPathUnavailable` with the reason and
the caller uses the eager step; it never returns a silently different result.

    model.eval(); model.setup_step()
    stepper = FastStepper(model, batch_size=4)
    stepper.set_state(state)                  # optional: e.g. after model.prefill(prompt, state)
    logits = stepper.step(tokens)             # (4,) -> (4, n_classes), like model.step
    tokens, logprobs = stepper.generate(first, uniforms, temperature=1.0, top_k=0, top_p=0.95)

Sampling rule (generate, and `sample` on given logits). For one row of float32 logits l[0..V)
and one uniform u in [0, 1), all arithmetic in IEEE float64 (each l_i converted exactly),
sums taken sequentially in the order stated:

1. m = max_i l_i. The log-probability reported for the chosen token c is
   logprob = (l_c - m) - log(S), with S = sum over i = 0, 1, ..., V-1 (index order) of exp(l_i - m):
   log_softmax of the raw logits (temperature 1, no truncation), whatever the settings.
2. temperature == 0: c = argmax_i l_i, the lowest index among equal maxima (u is not used).
3. Otherwise order the indices by logit descending, ties by lower index (-0.0 equals +0.0):
   o_0, o_1, ..., o_{V-1}. Keep the first K = min(top_k, V) of them (top_k = 0: K = V).
4. Weights w_j = exp((l_{o_j} - m) / temperature); cumulative sums c_j = c_{j-1} + w_j (c_{-1} = 0)
   for j = 0 .. K-1.
5. Nucleus: M = the smallest j + 1 with c_j >= top_p * c_{K-1} (top_p in (0, 1]; top_p = 1
   keeps all K, up to trailing zero weights).
6. Pick: c = o_j for the first j < M with c_j > u * c_{M-1}; if there is none, j = M - 1.
   (Mathematically: renormalise over the kept set, pick the first index in sorted order whose
   cumulative probability exceeds u.)

`sashimi.pipelines.sampling.sample` implements the same rule with torch ops (the eager path's sampler);
an implementation that sums in another order agrees except when u lies within round-off
(~1e-16 relative) of a cumulative boundary. Non-finite logits give an arbitrary token and a
NaN log-probability.

generate(first, uniforms (B, n)) feeds `first` (B,), samples token t of each row with
uniforms[:, t], and feeds it back; afterwards the state has consumed first and tokens[:, :-1]
(tokens[:, -1] is the next input), exactly as this eager loop:

    token = first
    for t in range(n):
        logits, state = model.step(token, state)
        token = sample(logits, uniforms[:, t], ...)
"""

from __future__ import annotations

import torch

from ..models.autoregressive import WaveformAR
from .sampling import check_sampling
from ..nn.fused_backbone import (BackboneEngine, FastPathUnavailable, _NAME, _SOURCES, _HEADERS, _plain_layer_norm,
                                 _plain_tensors, backbone_reason, load_engine)
from s4lib import fused_step as s4_fused
from s4lib.ops import native_build

__all__ = ["FastPathUnavailable", "FastStepper", "fast_path_status", "engine_sample"]


def unsupported_reason(model) -> str | None:
    """Why the fused engine cannot run `model` (None if it can)."""
    if not isinstance(model, WaveformAR):
        return f"expected a WaveformAR, got {type(model).__name__}"
    reason = backbone_reason(model.backbone, final_norm_allowed=False)
    if reason:
        return reason
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.is_floating_point() and (p.dtype != torch.float32 or p.device.type != "cpu"):
            return f"the fused engine runs float32 on CPU; {name} is {p.dtype} on {p.device}"
    if not _plain_layer_norm(model.norm):
        return "only LayerNorm over the feature axis is implemented"
    return None


def fast_path_status(model=None) -> tuple[bool, str]:
    """(usable, reason): can the fused engine be built here (and serve `model`, if given)?

    Does not compile anything: a build that failed before (in any process, with the same
    torch, compiler, flags and sources) is reported as failed; one not tried yet as usable.
    """
    if model is not None:
        reason = unsupported_reason(model)
        if reason:
            return False, reason
    return native_build.module_status(_NAME, _SOURCES, s4_fused.extra_cflags(_HEADERS))


class FastStepper(BackboneEngine):
    """The fused recurrent step of a WaveformAR for `batch_size` sequences (CPU, float32).

    Build after `model.setup_step()` (and again after the parameters change). The state starts
    as `model.default_state(batch_size)`; see the module docstring for the sampling rule.
    Raises FastPathUnavailable when the engine cannot serve the model or cannot be built.

    weights: 'float32' (default: the eager step to float32 round-off) or 'float16', which stores the
    weights of every Linear (S4 output, FF, pooling, head; not the SSM parameters, whose recurrence
    needs float32) in IEEE half precision, widened exactly to float32 for float32 sums: a step
    streams about 40 % fewer bytes, and the logits differ from the eager step by up to 2e-3 of the
    largest logit (tested over 2048 steps) instead of ~1e-6.
    One stepper serves one caller at a time (it is not thread-safe). Threads: from 8 rows on,
    torch's threads take a slice of the rows each; below 8 rows, for a model as large as the
    presets (SPLIT_BYTES per step), the engine times its calls and runs each (64 steps at a time
    in generate()) on one thread or on two threads splitting every step in halves (each thread half
    of every SSM's channels and of every Linear's inputs, one barrier per block), whichever
    has been faster lately; s4lib.step_threads(n) fixes n. The tokens and log-probabilities do not
    depend on the count or the way.
    """

    def __init__(self, model: WaveformAR, batch_size: int, weights: str = "float32"):
        reason = unsupported_reason(model)
        if reason:
            raise FastPathUnavailable(f"fused step engine cannot run this model: {reason}")
        self.model_config = model.config
        self.n_classes = model.n_classes
        self._build(model.backbone, batch_size, embedding=model.embedding.weight, head=(model.norm, model.head),
                    weights=weights)

    def _thread_arg(self) -> int:
        """The engine's thread argument: step_threads(n)'s n; at batch sizes below SPLIT_BATCH with
        torch given T > 1 threads and a model that reads at least SPLIT_BYTES per step, -T (the engine
        times its calls, 64 steps at a time in generate(), and runs each on 1 thread or on 2 splitting
        the step in halves, whichever has been faster lately); else the policy's count (rows from 8 up)."""
        n = s4_fused.threads_override()
        if n is not None:
            return n
        T = torch.get_num_threads()
        if self.batch_size < s4_fused.SPLIT_BATCH and T > 1 and self.work >= s4_fused.SPLIT_BYTES:
            return -T
        return self.threads()

    # ------------------------------------------------------------------------------------- steps
    def _tokens(self, tokens, name="tokens") -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.is_floating_point() or tokens.is_complex() \
                or tokens.dtype == torch.bool or tuple(tokens.shape) != (self.batch_size,):
            raise ValueError(f"{name} must be an integer tensor of shape ({self.batch_size},), got "
                             f"{getattr(tokens, 'dtype', type(tokens).__name__)} {tuple(getattr(tokens, 'shape', ()))}")
        tokens = tokens.to(torch.long).contiguous()
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.n_classes:
            raise ValueError(f"{name} must be levels in [0, {self.n_classes}), got values in "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")
        return tokens

    @_plain_tensors
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,) integer levels -> logits (B, n_classes) float32; the state advances one step."""
        tokens = self._tokens(tokens)
        logits = torch.empty(self.batch_size, self.n_classes)
        self._engine.set_threads(self._thread_arg(), self.SPLITS.index(self.split))
        self._engine.step(tokens, logits)
        return logits

    @_plain_tensors
    def generate(self, first_tokens: torch.Tensor, uniforms: torch.Tensor, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0):
        """Sample uniforms.shape[1] tokens per row: (tokens (B, n) int64, logprobs (B, n) float64).

        first_tokens (B,) is fed first; token t of row b is drawn with uniforms[b, t] by the rule
        in the module docstring; logprobs are the model's log-probabilities of the chosen tokens
        (temperature 1, untruncated).
        """
        first_tokens = self._tokens(first_tokens, "first_tokens")
        uniforms = _check_sampling(uniforms, temperature, top_k, top_p, (self.batch_size, None))
        n = uniforms.shape[1]
        tokens = torch.empty(self.batch_size, n, dtype=torch.long)
        logprobs = torch.empty(self.batch_size, n, dtype=torch.float64)
        self._engine.set_threads(self._thread_arg(), self.SPLITS.index(self.split))
        self._engine.generate(first_tokens, uniforms, float(temperature), int(top_k), float(top_p), tokens, logprobs)
        return tokens, logprobs


def _check_sampling(uniforms, temperature, top_k, top_p, shape):
    check_sampling(temperature, top_k, top_p)
    if not isinstance(uniforms, torch.Tensor) or not uniforms.is_floating_point() or uniforms.dim() != len(shape) \
            or any(s is not None and s != d for s, d in zip(shape, uniforms.shape)):
        want = ", ".join("n" if s is None else str(s) for s in shape)
        raise ValueError(f"uniforms must be a float tensor of shape ({want}), got "
                         f"{getattr(uniforms, 'dtype', type(uniforms).__name__)} {tuple(getattr(uniforms, 'shape', ()))}")
    uniforms = uniforms.detach().to(torch.float64).contiguous()
    if uniforms.numel() and not (float(uniforms.min()) >= 0 and float(uniforms.max()) < 1):
        raise ValueError("uniforms must lie in [0, 1)")
    return uniforms


def engine_sample(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0):
    """The engine's own sampling code on given logits (B, V): (tokens (B,) int64, logprobs (B,) float64).

    The same rule as sashimi.pipelines.sampling.sample (the oracle the tests compare it with).
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() != 2:
        raise ValueError(f"logits must be a float tensor (batch, n_classes), got {getattr(logits, 'shape', logits)}")
    B = logits.shape[0]
    uniforms = _check_sampling(uniforms, temperature, top_k, top_p, (B,))
    ext = load_engine()
    tokens = torch.empty(B, dtype=torch.long)
    logprobs = torch.empty(B, dtype=torch.float64)
    ext.sample(logits.detach().to(torch.float32).contiguous(), uniforms, float(temperature), int(top_k),
               float(top_p), tokens, logprobs)
    return tokens, logprobs
