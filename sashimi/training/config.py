"""The training run's settings: TrainConfig (one `sashimi train` flag per field) and parse_duration for --max-time."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from ..checks import check_int
from ..models.registry import preset_names

__all__ = ["TrainConfig", "parse_duration"]


def _opt(default, help: str):
    """A config field with its --help text (the CLI builds one flag per field)."""
    return field(default=default, metadata={"help": help})


def parse_duration(text) -> float:
    """Seconds in a duration: a number of seconds (90, '90', '90s'), minutes ('30m') or hours ('2h', '1.5h')."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)\s*", str(text).lower())
        if not match:
            raise ValueError(f"max_time must be a duration such as 90, '90s', '30m' or '2h', got {text!r}")
        seconds = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]
    if not seconds > 0 or not math.isfinite(seconds):
        raise ValueError(f"max_time must be a positive duration, got {text!r}")
    return seconds


@dataclass
class TrainConfig:
    # what to train, and where
    data: str = _opt("builtin", "'builtin' (synthetic, no download) or a folder of audio files")
    preset: str = _opt("sc09", "model preset (sashimi.preset_names())")
    out: str = _opt("runs/sashimi", "run directory: checkpoints, config.json, metrics.jsonl, curves.png")
    sample_len: int | None = _opt(None, "training clip length in samples (default: the preset's)")
    dropout: float | None = _opt(None, "override the preset's dropout")
    n_train_items: int | None = _opt(None, "use at most this many training items (default: all)")
    n_val_items: int | None = _opt(None, "use at most this many validation items (default: all)")
    # optimisation
    max_steps: int = _opt(100_000, "total optimiser steps (a resumed run continues up to this)")
    max_time: str | None = _opt(None, "wall-clock budget of the whole run, e.g. 90 (seconds), 30m, 2h: the cosine "
                                      "schedule decays over it, and the run stops in time for a final validation "
                                      "and checkpoint (also bounded by max_steps)")
    batch_size: int = _opt(8, "global batch size, split evenly across processes")
    micro_batch: int | None = _opt(None, "run each process's batch in chunks of this many clips and add up their "
                                         "gradients (same result, less memory; default: all at once)")
    checkpointing: str = _opt("auto", "gradient checkpointing per layer: 'on', 'off', or 'auto' (on when a "
                                      "micro-batch's estimated activations exceed 2 GB, e.g. sc09 at batch >= 4)")
    lr: float = _opt(4e-3, "peak learning rate (SSM A, B, dt keep their own 1e-3 from s4lib)")
    weight_decay: float = _opt(0.0, "AdamW weight decay (SSM parameters are exempt)")
    warmup_steps: int = _opt(1000, "linear warmup from 0 to lr")
    schedule: str = _opt("cosine", "'cosine' (decay to min_lr_ratio*lr at decay_steps, or at max_time) or 'plateau'")
    decay_steps: int | None = _opt(None, "length of the cosine schedule (default: max_steps)")
    min_lr_ratio: float = _opt(0.01, "final learning rate of the cosine schedule, relative to lr")
    plateau_factor: float = _opt(0.5, "plateau: multiply the learning rate by this ...")
    plateau_patience: int = _opt(5, "... after this many validations without improvement")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this (0: off)")
    ema: float | None = _opt(None, "decay of an exponential moving average of the weights, e.g. 0.999; "
                                   "validation and best.pt then use the EMA weights")
    precision: str = _opt("fp32", "'fp32', or 'bf16' (autocast; CUDA or recent CPUs)")
    max_nonfinite: int = _opt(10, "stop after this many consecutive non-finite losses")
    # bookkeeping
    seed: int = _opt(0, "seed for initialisation, data order and dropout")
    num_workers: int = _opt(0, "DataLoader worker processes per training process")
    threads: int | None = _opt(None, "torch threads per process (default: torch's choice; torchrun sets 1)")
    log_every: int = _opt(10, "append training metrics every this many steps")
    val_every: int = _opt(500, "validate every this many steps (and at the end)")
    val_batches: int | None = _opt(None, "validate on at most this many batches (default: the whole split)")
    ckpt_every: int = _opt(500, "write last.pt every this many steps (and at the end)")
    resume: bool = _opt(False, "continue from RUN_DIR/last.pt")
    progress: bool = _opt(True, "show progress (a bar on a terminal, a line every few seconds otherwise)")

    def check(self) -> None:
        """Raise ValueError naming the first bad field."""
        for name in ["max_steps", "batch_size", "log_every", "val_every", "ckpt_every", "max_nonfinite"]:
            check_int(name, getattr(self, name), 1)
        for name in ["sample_len", "micro_batch", "threads", "n_train_items", "n_val_items", "val_batches", "decay_steps"]:
            check_int(name, getattr(self, name), 1, allow_none=True)
        for name in ["warmup_steps", "num_workers", "plateau_patience", "seed"]:
            check_int(name, getattr(self, name), 0)
        if self.max_time is not None:
            parse_duration(self.max_time)
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0")
        if self.schedule not in ("cosine", "plateau"):
            raise ValueError(f"schedule must be 'cosine' or 'plateau', got {self.schedule!r}")
        if not 0 <= self.min_lr_ratio <= 1 or not 0 < self.plateau_factor < 1:
            raise ValueError("need 0 <= min_lr_ratio <= 1 and 0 < plateau_factor < 1")
        if self.ema is not None and not 0 < self.ema < 1:
            raise ValueError(f"ema must be a decay in (0, 1) or None, got {self.ema!r}")
        if self.checkpointing not in ("auto", "on", "off"):
            raise ValueError(f"checkpointing must be 'auto', 'on' or 'off', got {self.checkpointing!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.preset not in preset_names():
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {preset_names()}")

    @property
    def max_seconds(self) -> float | None:
        return None if self.max_time is None else parse_duration(self.max_time)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}")
        return cls(**d)
