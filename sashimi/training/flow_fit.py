"""A compact fit for the flow families' stages (1-RF, 2-RF on reflow pairs, distillation, DiffWave).

    fit(model, dataset, steps=300, batch_size=8, lr=2e-3, out="runs/rf")  -> {"loss": [...], ...}

It starts from the weights the model has (a 1-RF model for 2-RF, a 2-RF model for its one-step
student) and trains on any dataset of items (reflow pairs from sashimi.pipelines.reflow, audio
items with captions): what the run-directory loop (sashimi.training.loop, presets and data
folders) does not take. AdamW with a linear warm-up and cosine decay, gradient clipping, the
objective the model's class declares, and save_pretrained(out) at the end.
"""

from __future__ import annotations

import json
import math
import os
import time

import torch
from torch.utils.data import DataLoader, Dataset

from ..objectives.base import objective_for

__all__ = ["fit", "builtin_caption", "CaptionedDataset"]


def builtin_caption(info: dict) -> str:
    """A builtin clip's caption from its metadata: 'pluck arpeggio up'."""
    return f"{info['timbre_name']} {info['class_name'].replace('_', ' ')}"


class CaptionedDataset(Dataset):
    """A BuiltinDataset whose items carry a 'prompt' (the clip's caption)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = dict(self.dataset[i])
        clip = (i % len(self.dataset)) // self.dataset.chunks_per_clip
        item["prompt"] = builtin_caption(self.dataset.clip_info(clip))
        return item


def fit(model, dataset, *, steps: int = 300, batch_size: int = 8, lr: float = 2e-3, warmup: int = 20,
        clip: float = 1.0, seed: int = 0, out: str | None = None, log_every: int = 25, log=print) -> dict:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if len(dataset) == 0:
        raise ValueError("the training set is empty")
    torch.manual_seed(seed)
    objective = objective_for(model)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def lr_at(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lr_at)
    loader = DataLoader(dataset, batch_size=min(batch_size, len(dataset)), shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    history, step, start = [], 0, time.perf_counter()
    model.train()
    while step < steps:
        for batch in loader:
            loss_sum, count, _ = objective(model, batch)
            loss = loss_sum / count
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at step {step}")
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimiser.step()
            schedule.step()
            history.append(float(loss.detach()))
            step += 1
            if log and (step % log_every == 0 or step == steps):
                recent = history[-log_every:]
                log(f"step {step}/{steps}  mse {sum(recent) / len(recent):.4f}  {time.perf_counter() - start:.0f} s")
            if step >= steps:
                break
    model.eval()
    result = {"steps": steps, "seconds": time.perf_counter() - start, "final_mse": sum(history[-25:]) / len(history[-25:]),
              "stage": model.config.stage, "family": model.config.family}
    if out:
        model.save_pretrained(out)
        with open(os.path.join(out, "train.json"), "w") as f:
            json.dump({**result, "loss": history}, f)
    return result
