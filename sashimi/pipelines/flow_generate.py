"""FlowPipeline: conditions -> noise -> a few (flow) or many (diffusion) network calls -> audio, timed.

    pipe = FlowPipeline(model)                    # a FlowModel (rectified_flow or diffwave family)
    result = pipe(n=8, labels=[7], steps=1, cfg=3.0, seed=0)
    result.audio                                  # (8, L) float in [-1, 1]; result.real_time_factor
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from sashimi.schedulers.guidance import check_guidance_scale
from .flow_sampling import check_steps, sample_diffusion, sample_flow

__all__ = ["FlowPipeline", "FlowGenerationResult"]


@dataclass
class FlowGenerationResult:
    audio: torch.Tensor  # (N, L) float32 in [-1, 1]
    sample_rate: int
    seconds: float  # wall time of sampling and decoding (model loading excluded)
    info: dict = field(default_factory=dict)
    conditions: list = field(default_factory=list)  # per sample: its label / prompt (None when unconditional)

    @property
    def n_samples(self) -> int:
        return self.audio.shape[0]

    @property
    def real_time_factor(self) -> float:
        """Seconds of audio made per second of wall time, over all samples (> 1: faster than real time)."""
        return self.audio.numel() / self.sample_rate / max(self.seconds, 1e-9)

    @property
    def samples_per_second(self) -> float:
        return self.audio.numel() / max(self.seconds, 1e-9)

    def summary(self) -> dict:
        """What samples.json holds (the listening page's layout: settings, throughput, samples)."""
        return {"n_samples": self.n_samples, "sample_rate": self.sample_rate,
                "seconds_of_audio": self.audio.shape[1] / self.sample_rate, "wall_seconds": self.seconds,
                "real_time_factor": self.real_time_factor, "settings": self.info,
                "throughput": {"samples_per_second": self.samples_per_second,
                               "real_time_factor": self.real_time_factor, "seconds": self.seconds,
                               "generated_samples": self.audio.numel(),
                               "path": f"{self.info.get('method')} {self.info.get('steps')}-step"},
                "samples": [{"index": i, "condition": c} for i, c in enumerate(self.conditions)]}


class FlowPipeline:
    """Sampling for a FlowModel: Euler/Heun ODE (rectified flow) or DDPM/DDIM (DiffWave), with guidance."""

    def __init__(self, model, vocoder=None):
        self.model = model.eval()
        self.vocoder = vocoder
        if model.config.space == "mel" and vocoder is None:
            raise ValueError("a mel-space model needs a WaveFlow vocoder to make audio (pass vocoder=)")

    def default_method(self) -> str:
        return "euler" if self.model.config.family == "rectified_flow" else "ddpm"

    @torch.no_grad()
    def __call__(self, n: int = 1, *, labels=None, prompts=None, embedding=None, steps: int | None = None,
                 method: str | None = None, cfg: float = 1.0, seed: int = 0, batch_size: int = 8,
                 schedule="linear") -> FlowGenerationResult:
        model, config = self.model, self.model.config
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"the number of samples must be an int >= 1, got {n!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        method = method or self.default_method()
        flow = config.family == "rectified_flow"
        if flow and method not in ("euler", "heun"):
            raise ValueError(f"a rectified flow samples with 'euler' or 'heun', got {method!r}")
        if not flow and method not in ("ddpm", "ddim"):
            raise ValueError(f"a diffusion model samples with 'ddpm' or 'ddim', got {method!r}")
        if steps is None:
            steps = {"euler": 24, "heun": 12, "ddpm": config.T, "ddim": 50}[method]
        check_steps(steps)
        cfg = check_guidance_scale(cfg)
        per_sample = self._conditions(n, labels, prompts, embedding)
        if cfg != 1.0 and not model.conditional:
            raise ValueError("classifier-free guidance (cfg != 1) needs a conditional model")
        generator = torch.Generator().manual_seed(int(seed))
        start = time.perf_counter()
        out = []
        for lo in range(0, n, batch_size):
            hi = min(n, lo + batch_size)
            noise = torch.randn(model.noise_shape(hi - lo), generator=generator)
            cond = model.condition(**{k: v[lo:hi] for k, v in per_sample.items()}) if per_sample else None
            null = model.null_condition(hi - lo) if cond is not None and cfg != 1.0 else None
            if flow:
                x = sample_flow(model, noise, cond, null, steps=steps, method=method, schedule=schedule, cfg=cfg)
            else:
                x = sample_diffusion(model, noise, model.diffusion_schedule(), cond, null, method=method,
                                     steps=steps if method == "ddim" else None, cfg=cfg, generator=generator)
            out.append(model.decode(x, self.vocoder).float())
        seconds = time.perf_counter() - start
        audio = torch.cat(out)
        info = {"family": config.family, "space": config.space, "method": method, "steps": steps, "cfg": cfg,
                "seed": seed, "batch_size": batch_size, "network_evaluations_per_batch":
                steps * (2 if method == "heun" else 1) * (2 if cfg not in (0.0, 1.0) else 1)}
        labels_out = next(iter(per_sample.values())) if per_sample else [None] * n
        conditions = [c.tolist() if isinstance(c, torch.Tensor) else c for c in labels_out]
        if "embedding" in per_sample:
            conditions = [f"embedding {i}" for i in range(n)]
        return FlowGenerationResult(audio, config.sample_rate, seconds, info, conditions)

    def _conditions(self, n, labels, prompts, embedding) -> dict:
        kind = self.model.config.condition
        given = {k: v for k, v in (("labels", labels), ("prompts", prompts), ("embedding", embedding)) if v is not None}
        if kind == "none":
            if given:
                raise ValueError(f"this model is unconditional; it takes no {', '.join(given)}")
            return {}
        if not given:
            raise ValueError(f"this model is conditioned by {kind!r}: give "
                             f"{ {'label': '--label', 'text': '--prompt', 'embedding': '--embedding'}[kind] }")
        if len(given) != 1:
            raise ValueError(f"give one kind of condition, got {sorted(given)}")
        key, value = next(iter(given.items()))
        if key == "labels":
            values = [int(v) for v in (value if isinstance(value, (list, tuple)) else
                                       torch.as_tensor(value).reshape(-1).tolist())]
            return {"labels": torch.tensor([values[i % len(values)] for i in range(n)])}
        if key == "prompts":
            values = [value] if isinstance(value, str) else list(value)
            return {"prompts": [values[i % len(values)] for i in range(n)]}
        value = torch.as_tensor(value, dtype=torch.float32)
        if value.dim() == 1:
            value = value[None]
        return {"embedding": value[torch.arange(n) % value.shape[0]]}
