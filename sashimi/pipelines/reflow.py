"""Reflow pairs: (noise seed, ODE(noise)) from a trained flow, optionally with Anchored Optimization; their folder.

The folder's layout and its dataset (ReflowPairs, pair_noise) are in sashimi.data.reflow_pairs.

Anchored Optimization (for guidance w > 1): the w = 1 trajectory A_k is the anchor. At each step
the guided step is x_{k+1} = x_k + h (v(x_k, null') + w (v(x_k, c) - v(x_k, null'))) with an
adjustable unconditional embedding null' (starting from the learned null, carried from step to
step); a few gradient steps on null' move x_{k+1} towards A_{k+1} (budget `anchor_steps`, early
stop once the miss is below `anchor_tol` of the step's length), which bounds the error that
guidance accumulates along the trajectory.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from sashimi.schedulers.guidance import check_guidance_scale
from ..files import atomic_write
from ..data.reflow_pairs import FORMAT, ReflowPairs, pair_noise
from .flow_sampling import check_steps, flow_scheduler

__all__ = ["pair_noise", "make_pairs", "anchored_sample", "write_pairs", "ReflowPairs"]

def _times(t, x):
    return torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)


def anchored_sample(model, noise, condition, null, cfg: float, steps: int = 24, anchor_steps: int = 5,
                    anchor_lr: float = 0.1, anchor_tol: float = 0.05):
    """Guided Euler sampling anchored to the w = 1 trajectory; returns (x1, info)."""
    scheduler = flow_scheduler("euler", steps)
    grid = scheduler.grid.tolist()
    x, anchor = noise, noise
    null_opt = null.detach().clone()
    iterations, misses = 0, []
    for k, t in enumerate(scheduler.timesteps):
        h = grid[k + 1] - grid[k]
        tt = _times(t, x)
        with torch.no_grad():
            anchor_next = anchor + h * model(anchor, tt, condition)
            v_cond = model(x, tt, condition)
        scale = float((anchor_next - anchor).square().mean().sqrt()) + 1e-12
        null_opt.requires_grad_(True)
        optimiser = torch.optim.Adam([null_opt], lr=anchor_lr)
        for _ in range(anchor_steps):
            v_null = model(x, tt, null_opt)
            x_next = x + h * (v_null + cfg * (v_cond - v_null))
            miss = (x_next - anchor_next).square().mean()
            if float(miss.detach().sqrt()) < anchor_tol * scale:
                break
            # the gradient of the embedding only (the network's weights collect none)
            (null_opt.grad,) = torch.autograd.grad(miss, [null_opt])
            optimiser.step()
            iterations += 1
        null_opt = null_opt.detach()
        with torch.no_grad():
            v_null = model(x, tt, null_opt)
            x = x + h * (v_null + cfg * (v_cond - v_null))
            misses.append(float((x - anchor_next).square().mean().sqrt()) / scale)
        anchor = anchor_next
    return x, {"anchor_iterations": iterations, "final_distance_to_anchor": float((x - anchor).square().mean().sqrt()),
               "mean_relative_miss": float(np.mean(misses))}


def make_pairs(model, n: int, *, seed: int = 0, steps: int = 24, method: str = "euler", cfg: float = 1.0,
               labels=None, prompts=None, embedding=None, batch_size: int = 16, anchored: bool = False,
               anchor_steps: int = 5, anchor_lr: float = 0.1, anchor_tol: float = 0.05) -> dict:
    """n pairs (seed_i = seed + i, x1_hat_i = ODE(noise_i)) with conditions cycled from labels/prompts/embedding."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of pairs must be an int >= 1, got {n!r}")
    check_steps(steps)
    check_guidance_scale(cfg)
    if anchored and cfg <= 1.0:
        raise ValueError("Anchored Optimization anchors guided (cfg > 1) trajectories to the cfg = 1 one; "
                         f"got cfg={cfg}")
    model.eval()
    shape = model.noise_shape(1)[1:]
    seeds = [seed + i for i in range(n)]
    conds = _cycle_conditions(model, n, labels, prompts, embedding)
    out, info = [], {"anchor_iterations": 0}
    start = time.perf_counter()
    for lo in range(0, n, batch_size):
        hi = min(n, lo + batch_size)
        noise = torch.stack([pair_noise(s, shape) for s in seeds[lo:hi]])
        cond = model.condition(**{k: v[lo:hi] for k, v in conds.items()}) if conds else None
        null = model.null_condition(hi - lo) if cond is not None else None
        if anchored and cond is not None:
            x, extra = anchored_sample(model, noise, cond, null, cfg, steps, anchor_steps, anchor_lr, anchor_tol)
            info["anchor_iterations"] += extra["anchor_iterations"]
        else:
            from .flow_sampling import sample_flow
            x = sample_flow(model, noise, cond, null, steps=steps, method=method, cfg=cfg)
        out.append(x.detach().float())
    samples = torch.cat(out)
    info.update({"seconds": time.perf_counter() - start, "steps": steps, "method": method, "cfg": cfg,
                 "anchored": anchored})
    return {"seeds": seeds, "samples": samples, "conditions": {k: _jsonable(v) for k, v in conds.items()},
            "info": info}


def _cycle_conditions(model, n, labels, prompts, embedding) -> dict:
    kind = model.config.condition
    if kind == "none":
        return {}
    if kind == "label":
        if labels is None:
            labels = list(range(model.config.n_classes))
        labels = [int(v) for v in (labels if isinstance(labels, (list, tuple)) else [labels])]
        return {"labels": torch.tensor([labels[i % len(labels)] for i in range(n)])}
    if kind == "text":
        if not prompts:
            raise ValueError("a text-conditioned model needs prompts to make reflow pairs")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return {"prompts": [prompts[i % len(prompts)] for i in range(n)]}
    if embedding is None:
        raise ValueError("an embedding-conditioned model needs embeddings to make reflow pairs")
    embedding = torch.as_tensor(embedding, dtype=torch.float32)
    return {"embedding": embedding[torch.arange(n) % embedding.shape[0]]}


def _jsonable(v):
    return v.tolist() if isinstance(v, torch.Tensor) else list(v)


def write_pairs(out_dir: str, pairs: dict, model_config: dict) -> str:
    """Write a pair folder (sashimi.data.reflow_pairs); returns the path of pairs.json (written last)."""
    os.makedirs(out_dir, exist_ok=True)
    samples = pairs["samples"].numpy().astype(np.float32)
    atomic_write(os.path.join(out_dir, "samples.npy"), lambda f: np.save(f, samples))
    meta = {"format": FORMAT, "shape": list(samples.shape[1:]), "seeds": pairs["seeds"],
            "conditions": pairs["conditions"], "info": pairs["info"], "model": model_config}
    path = os.path.join(out_dir, "pairs.json")
    atomic_write(path, json.dumps(meta).encode())
    return path
