"""The training loop every model family shares: TrainConfig, and train(cfg) minimising the family's objective.

    from sashimi.training.loop import TrainConfig, train
    train(TrainConfig(data="builtin", preset="tiny", out="runs/tiny", max_steps=300))
    train(TrainConfig(data="builtin", preset="tiny", out="runs/tiny30", max_time="30m"))

The loop knows no family: the preset names a config (sashimi.models.registry), the config builds
the model and its dataset (sashimi.data.datasets.dataset_for), and the model's class names the
objective (sashimi.objectives.base) that the loop minimises and validation reports. `train()`
reads top to bottom: processes, run state (model, optimiser, data), then per step learning
rate -> batch -> loss -> backward -> clip -> step -> EMA -> log -> validate -> checkpoint.
Under `torchrun --nproc_per_node K` every process runs the same loop on 1/K of each global
batch (DistributedDataParallel); only rank 0 writes files. Checkpoints: checkpoint.py; schedule:
schedule.py; processes, data order, seeds, signals, metrics files: runtime.py; docs/training.md.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import re
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from s4lib import param_groups

from ..checks import check_int, check_number
from ..data.datasets import dataset_for
from ..files import atomic_write, write_json
from ..models.registry import build_model, preset_names, resolve_config
from ..objectives.base import Objective, objective_for
from ..progress import progress
from .checkpoint import (BEST_CHECKPOINT, LAST_CHECKPOINT, CheckpointError, config_diff, gather_rng_states,
                         load_checkpoint, set_rng_state, write_checkpoint)
from .ema import update_ema
from .evaluate import sum_metrics
from .guard import StepGuard
from .init_from import read_init
from .rundir import prepare_run_dir
from .runtime import (GlobalBatches, Processes, StopFlag, batch_stream, configure_threads, plot_curves, read_metrics,
                      seed_everything, setup_processes)
from .schedule import LRSchedule

__all__ = ["TrainConfig", "train", "NonFiniteLossError", "parse_duration"]

FLOAT32_MAX = float(torch.finfo(torch.float32).max)

CHECKPOINT_AUTO_BYTES = 2e9  # checkpointing='auto' turns on above this estimate (the model's activation_bytes)


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
    init_from: str | None = _opt(None, "start from these weights, not a fresh initialisation: a model folder "
                                       "(config.json + model.safetensors), a run directory (best.pt, else last.pt) "
                                       "or a checkpoint file; the model is that one (preset unused) at --stage")
    stage: str | None = _opt(None, "with init_from: the training stage of its family, e.g. '2-rf' (reflow, on "
                                   "a pair folder from `sashimi reflow`) or 'distilled' (one step) for a "
                                   "rectified flow")
    # optimisation
    max_steps: int = _opt(100_000, "total optimiser steps (a resumed run continues up to this)")
    max_time: str | None = _opt(None, "time budget of the whole run (on budget_clock), e.g. 90 (seconds), 30m, 2h: "
                                      "the cosine schedule decays over it, and the run stops in time for a final "
                                      "validation and checkpoint (also bounded by max_steps)")
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
    budget_clock: str = _opt("wall", "what max_time counts: 'wall' (wall-clock seconds) or 'cpu' (this process's "
                                     "CPU seconds, all its threads: an equal budget for runs on a shared machine)")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this (0: off)")
    ema: float | None = _opt(None, "decay of an exponential moving average of the weights, e.g. 0.999; "
                                   "validation and best.pt then use the EMA weights")
    precision: str = _opt("fp32", "'fp32', or 'bf16' (autocast; CUDA or recent CPUs)")
    max_nonfinite: int = _opt(10, "stop after this many consecutive non-finite losses")
    # bookkeeping
    seed: int = _opt(0, "seed for initialisation, data order and dropout")
    num_workers: int = _opt(0, "DataLoader worker processes per training process")
    threads: int | None = _opt(None, "torch threads per process (default: torch's choice; under torchrun cores / local processes)")
    log_every: int = _opt(10, "append training metrics every this many steps")
    val_every: int = _opt(500, "validate every this many steps (and at the end)")
    val_batches: int | None = _opt(None, "validate on at most this many batches (default: the whole split)")
    ckpt_every: int = _opt(500, "write last.pt every this many steps (and at the end)")
    resume: bool = _opt(False, "continue from RUN_DIR/last.pt (in a directory without a run: start one)")
    overwrite: bool = _opt(False, "start over in a directory that holds a run: its files move to "
                                  "RUN_DIR/replaced-<time>/ (never deleted); with --resume only when there is "
                                  "no last.pt")
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
        check_number("lr", self.lr, 0, low_open=True)
        if self.lr > FLOAT32_MAX:  # AdamW could not represent the rate; huge rates below it meet StepGuard
            raise ValueError(f"lr must be at most {FLOAT32_MAX:.4g} (the largest float32, the precision of the "
                             f"weights it updates), got {self.lr!r}")
        check_number("weight_decay", self.weight_decay, 0)
        check_number("grad_clip", self.grad_clip, 0)
        check_number("min_lr_ratio", self.min_lr_ratio, 0, 1)
        check_number("plateau_factor", self.plateau_factor, 0, 1, low_open=True, high_open=True)
        check_number("ema", self.ema, 0, 1, low_open=True, high_open=True, allow_none=True)
        check_number("dropout", self.dropout, 0, 1, high_open=True, allow_none=True)
        if self.schedule not in ("cosine", "plateau"):
            raise ValueError(f"schedule must be 'cosine' or 'plateau', got {self.schedule!r}")
        if self.checkpointing not in ("auto", "on", "off"):
            raise ValueError(f"checkpointing must be 'auto', 'on' or 'off', got {self.checkpointing!r}")
        if self.budget_clock not in ("wall", "cpu"):
            raise ValueError(f"budget_clock must be 'wall' or 'cpu', got {self.budget_clock!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.init_from is None and self.preset not in preset_names():
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {preset_names()}")
        if self.stage is not None and self.init_from is None:
            raise ValueError("stage needs init_from: a stage continues from a trained model's weights")

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


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss, gradient or updated weights; the run stopped."""


# ----------------------------------------------------------------------------- model and objective


def resolve_model_config(cfg: TrainConfig, init=None):
    """The preset's model config (or that of init_from at its stage) with this run's overrides (sample_len, dropout).

    init: the init model's config (default: read from cfg.init_from).
    """
    overrides = {k: getattr(cfg, k) for k in ("sample_len", "dropout") if getattr(cfg, k) is not None}
    if cfg.init_from is None:
        return resolve_config(cfg.preset, **overrides)
    if init is None:
        init = read_init(cfg.init_from)[0]
    config = resolve_config(init, **overrides)
    if cfg.stage is not None:
        with_stage = getattr(config, "with_stage", None)
        if not callable(with_stage):
            raise ValueError(f"a {getattr(config, 'family', type(config).__name__)!r} model has no training stages")
        config = with_stage(cfg.stage)
    return config


def checkpointing_decision(cfg: TrainConfig, activation_bytes, local_batch: int) -> tuple[bool, float]:
    """(gradient checkpointing on?, estimated activation bytes of one micro-batch without it).

    activation_bytes(batch_size) is the model's estimate (None: the model gives none, 'auto' stays off).
    """
    estimate = activation_bytes(min(cfg.micro_batch or local_batch, local_batch)) if activation_bytes else 0.0
    if cfg.checkpointing == "auto":
        return estimate > CHECKPOINT_AUTO_BYTES, estimate
    return cfg.checkpointing == "on", estimate


class ObjectiveStep(torch.nn.Module):
    """The model and its objective as one module: DDP wraps it, so the objective's forward is the one DDP sees."""

    def __init__(self, model: torch.nn.Module, objective: Objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: dict):
        return self.objective(self.model, batch)


# ----------------------------------------------------------------------------- the run


@dataclass
class Position:
    """Where a run is: what a checkpoint records and resuming restores (besides weights and RNG)."""
    step: int = 0
    epoch: int = 0  # position in the data: the next batch is batch `index` of epoch `epoch`
    index: int = 0
    nonfinite_total: int = 0
    best_val: float = math.inf  # the best validation value of the objective's metric (lower is better)
    val: float | None = None  # the last one
    elapsed_before: float = 0.0  # training seconds of earlier sessions of this run


@dataclass
class Run:
    """Everything one training run holds; the functions below take it and advance it."""
    cfg: TrainConfig
    procs: Processes
    model_config: object
    model: torch.nn.Module  # the model itself (its state_dict is what checkpoints hold)
    step_module: torch.nn.Module  # ObjectiveStep(model), DDP-wrapped with several processes
    objective: Objective
    ema_model: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    train_set: object
    val_set: object
    stream: object
    autocast: object
    position: Position
    t_start: float = 0.0
    lr_now: float = 0.0
    guard: StepGuard | None = None  # the optimiser step, undone when it leaves non-finite weights

    @property
    def last_path(self) -> str:
        return os.path.join(self.cfg.out, LAST_CHECKPOINT)

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.cfg.out, "metrics.jsonl")

    @property
    def local_batch(self) -> int:
        return self.cfg.batch_size // self.procs.world_size

    def clock(self) -> float:
        """The budget's clock: wall-clock seconds, or this process's CPU seconds (cfg.budget_clock)."""
        return time.process_time() if self.cfg.budget_clock == "cpu" else time.time()

    def seconds(self) -> float:
        """Training time of the whole run so far (earlier sessions included), on the budget's clock."""
        return self.position.elapsed_before + self.clock() - self.t_start

    def log(self, message: str) -> None:
        if self.procs.is_main:
            tqdm.write(message)

    def append_metrics(self, record: dict) -> None:
        if self.procs.is_main:
            try:
                with open(self.metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")  # one write: a kill cannot tear it, a full disk can
            except OSError as e:
                raise OSError(e.errno, f"cannot append to {self.metrics_path}: {e.strerror or e} (the checkpoints "
                                       f"are kept; free space or fix the folder, then --resume)") from e


def _autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return lambda: torch.autocast(device.type, enabled=False)


def start_run(cfg: TrainConfig, procs: Processes) -> Run:
    """Build (or resume) the run: model, EMA, optimiser, schedule, data, position."""
    last_path = os.path.join(cfg.out, LAST_CHECKPOINT)
    # the weights to start from (read before anything is written: a bad path leaves no run behind)
    init = read_init(cfg.init_from) if cfg.init_from is not None else None
    model_config = resolve_model_config(cfg, init[0] if init is not None else None)
    if init is not None:  # the run is named by the model it continues
        cfg = dataclasses.replace(cfg, preset=getattr(model_config, "name", cfg.preset))
    if procs.is_main:  # a run directory is never trained into by accident (sashimi.training.rundir)
        prepare_run_dir(cfg.out, cfg.resume, cfg.overwrite, LAST_CHECKPOINT, log=tqdm.write)

    # the checkpoint to resume from must describe the same model (checked before building it)
    ckpt = load_checkpoint(last_path) if cfg.resume and os.path.exists(last_path) else None
    if ckpt is not None:
        diff = config_diff(ckpt["model_config"], model_config.to_dict())
        if diff:
            raise CheckpointError(f"{last_path} was trained with preset {ckpt.get('preset')!r}, a different model "
                                  f"than preset {cfg.preset!r} with this run's overrides: " + "; ".join(diff))

    # model, optimiser, schedule (identical initialisation on every process)
    configure_threads(cfg.threads, procs, lambda message: procs.is_main and tqdm.write(message))
    seed_everything(cfg.seed)
    model = build_model(model_config).to(procs.device)
    if init is not None:
        try:
            model.load_state_dict(init[1])
        except RuntimeError as e:
            raise CheckpointError(f"init_from {init[2]}: its weights do not fit the model ({e})") from e
        if procs.is_main:
            tqdm.write(f"initialised from {init[2]}" + (f" (stage {cfg.stage})" if cfg.stage else ""))
    objective = objective_for(model)
    ema_model = copy.deepcopy(model).eval() if cfg.ema is not None else None
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay=cfg.weight_decay, lr=cfg.lr), lr=cfg.lr)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]  # the schedule scales every group's own lr
    schedule = LRSchedule(cfg.schedule, cfg.warmup_steps, cfg.decay_steps or cfg.max_steps, cfg.min_lr_ratio,
                          cfg.plateau_factor, cfg.plateau_patience, budget_seconds=cfg.max_seconds)
    seed_everything(cfg.seed + 1 + procs.rank)  # dropout etc.: a different stream per process
    position = Position()
    run = Run(cfg, procs, model_config, model, ObjectiveStep(model, objective), objective, ema_model, optimizer,
              schedule, None, None, None, _autocast(cfg.precision, procs.device), position)
    run.t_start = run.clock()  # the checkpoint written before the first step records no training time
    n_parameters = sum(p.numel() for p in model.parameters())
    run.log(f"sashimi: preset {cfg.preset!r}, {n_parameters:,} parameters, "
            f"{procs.world_size} process(es) on {procs.device}")

    run.guard = StepGuard(model.parameters(), optimizer)
    if ckpt is not None:
        resume(run, ckpt)

    if hasattr(model, "set_gradient_checkpointing"):
        on, estimate = checkpointing_decision(cfg, getattr(model, "activation_bytes", None), run.local_batch)
        model.set_gradient_checkpointing(on)
        run.log(f"gradient checkpointing {'on' if on else 'off'} ({cfg.checkpointing}; activations of a "
                f"micro-batch estimated at {estimate / 1e9:.2f} GB without it)")
    if procs.world_size > 1:
        device_ids = [procs.device.index] if procs.device.type == "cuda" else None
        run.step_module = torch.nn.parallel.DistributedDataParallel(run.step_module, device_ids=device_ids)

    run.train_set = dataset_for(model_config, cfg.data, "train", n_items=cfg.n_train_items)
    run.val_set = dataset_for(model_config, cfg.data, "val", n_items=cfg.n_val_items)
    batches = GlobalBatches(len(run.train_set), cfg.batch_size, cfg.seed, procs.rank, procs.world_size)
    run.stream = batch_stream(run.train_set, batches, position.epoch, position.index, cfg.num_workers)
    if ckpt is None:  # a new run holds a loadable last.pt from the start: --resume works after any kill
        save_checkpoint(run, run.last_path)
    if procs.is_main:
        write_json(os.path.join(cfg.out, "config.json"),
                   {"train": cfg.to_dict(), "model": model_config.to_dict(), "world_size": procs.world_size})
    return run


def resume(run: Run, ckpt: dict) -> None:
    """Weights, optimiser, schedule, position in the data and RNG from a checkpoint."""
    cfg, procs, position = run.cfg, run.procs, run.position
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.schedule.load_state_dict(ckpt["scheduler"])
    if run.ema_model is not None:
        run.ema_model.load_state_dict(ckpt["ema"] if ckpt["ema"] is not None else ckpt["model"])
    position.step, position.nonfinite_total = ckpt["step"], ckpt["nonfinite_total"]
    position.best_val, position.val = ckpt["best_val_bits"], ckpt["val_bits"]
    position.epoch, position.index = ckpt["data"]["epoch"], ckpt["data"]["index"]
    position.elapsed_before = ckpt["elapsed_seconds"]
    if ckpt["data"]["batch_size"] != cfg.batch_size or ckpt["data"]["seed"] != cfg.seed:
        run.log("warning: batch_size or seed changed since the checkpoint; the data order is not the original one")
    if len(ckpt["rng"]) == procs.world_size:
        set_rng_state(ckpt["rng"][procs.rank])
    else:
        run.log(f"warning: checkpoint has RNG states for {len(ckpt['rng'])} processes, this run has "
                f"{procs.world_size}; reseeding")
        seed_everything(cfg.seed + 1 + procs.rank + 1000 * position.step)
    if procs.is_main:  # forget metrics logged after the checkpoint (their steps will be redone)
        kept = [r for r in read_metrics(run.metrics_path, warn=run.log) if r["step"] <= position.step]
        atomic_write(run.metrics_path, "".join(json.dumps(r) + "\n" for r in kept).encode())
    run.log(f"resumed from {run.last_path} at step {position.step}")


def save_checkpoint(run: Run, path: str) -> None:
    """Collective (every process calls it: RNG states are gathered); rank 0 writes."""
    rng = gather_rng_states(run.procs.world_size)
    if not run.procs.is_main:
        return
    cfg, p = run.cfg, run.position
    write_checkpoint(
        path, train_config=cfg.to_dict(), model_config=run.model_config.to_dict(), model=run.model.state_dict(),
        ema=run.ema_model.state_dict() if run.ema_model is not None else None, optimizer=run.optimizer.state_dict(),
        scheduler=run.schedule.state_dict(), step=p.step,
        data={"epoch": p.epoch, "index": p.index, "seed": cfg.seed, "batch_size": cfg.batch_size}, rng=rng,
        nonfinite_total=p.nonfinite_total, best_val_bits=p.best_val, val_bits=p.val,
        elapsed_seconds=run.seconds(), world_size=run.procs.world_size)


def train_step(run: Run, batch: dict) -> tuple[dict[str, float], bool]:
    """One optimiser step on a global batch: (train metrics per unit, whether the update was applied).

    The loss is normalised by the objective's count over the *global* batch, and DDP averages
    gradients over processes, hence the factor world_size. With micro_batch the batch goes through
    in chunks whose gradients add up (same result). A non-finite loss or gradient skips the update,
    and an update that leaves any weight non-finite is undone (the same decision on every process).
    """
    procs, cfg = run.procs, run.cfg
    batch = {k: v.to(procs.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    (global_count,) = procs.all_sum([float(run.objective.count(batch))])
    scale = procs.world_size / max(global_count, 1.0)
    size = len(batch["mask"]) if "mask" in batch else len(next(v for v in batch.values() if torch.is_tensor(v)))
    micro = cfg.micro_batch or size
    n_chunks = math.ceil(size / micro)
    local = {}
    for i in range(n_chunks):
        part = {k: v[i * micro:(i + 1) * micro] for k, v in batch.items()}
        sync = i == n_chunks - 1 or procs.world_size == 1  # DDP exchanges gradients after the last chunk
        with contextlib.nullcontext() if sync else run.step_module.no_sync():
            with run.autocast():
                loss_sum, _, metrics = run.step_module(part)
            (loss_sum * scale).backward()
        for name, value in metrics.items():
            local[name] = local.get(name, 0.0) + float(value)
    names = sorted(local)
    sums = procs.all_sum([local[name] for name in names])
    means = {name: total / max(global_count, 1.0) for name, total in zip(names, sums)}
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), max_norm)
    finite = all(math.isfinite(v) for v in means.values()) and bool(torch.isfinite(grad_norm))
    if finite:  # a step that leaves any weight non-finite is undone, on every process, and counted as skipped
        finite = run.guard.step()
        if procs.world_size > 1 and procs.all_sum([0.0 if finite else 1.0])[0] > 0:
            if finite:
                run.guard.undo()
            finite = False
    if finite:
        if run.ema_model is not None:
            update_ema(run.ema_model, run.model, cfg.ema, run.position.step)
    run.optimizer.zero_grad(set_to_none=True)
    return means, finite


def validate(run: Run) -> tuple[dict[str, float], int]:
    """The objective's metrics per unit over the validation split (or its first val_batches global batches)."""
    procs, cfg = run.procs, run.cfg
    n = len(run.val_set)
    if cfg.val_batches is not None:
        n = min(n, cfg.val_batches * run.local_batch * procs.world_size)
    loader = DataLoader(torch.utils.data.Subset(run.val_set, list(range(procs.rank, n, procs.world_size))),
                        batch_size=run.local_batch, shuffle=False)
    model = run.ema_model if run.ema_model is not None else run.model
    sums, count = sum_metrics(model, run.objective, loader, procs.device, run.autocast)
    names = sorted(sums)
    *totals, total_count = procs.all_sum([sums[name] for name in names] + [count])
    return {name: total / max(total_count, 1.0) for name, total in zip(names, totals)}, int(total_count)


def run_validation(run: Run) -> None:
    """Validate, log, feed the schedule, and write best.pt when the objective's metric improved."""
    metric, position = run.objective.metric, run.position
    values, n_samples = validate(run)
    position.val = values[metric]
    run.schedule.observe(position.val)
    run.append_metrics({"step": position.step, **{f"val_{k}": v for k, v in values.items()},
                        "val_samples": n_samples, "lr": run.lr_now, "time": run.seconds()})
    run.log(f"step {position.step}: val {position.val:.4f} {run.objective.unit} ({n_samples:,} samples)")
    if position.val < position.best_val:
        position.best_val = position.val
        save_checkpoint(run, os.path.join(run.cfg.out, BEST_CHECKPOINT))
    if run.procs.is_main:
        plot_curves(run.metrics_path, os.path.join(run.cfg.out, "curves.png"), metric, run.objective.unit)


class Window:
    """Training metrics averaged over the steps since the last log line, and the speed over them."""

    def __init__(self):
        self.sums, self.steps, self.clips, self.t_start, self.paused = {}, 0, 0, time.time(), 0.0

    def add(self, means: dict, finite: bool, clips: int) -> None:
        self.clips += clips
        if finite:
            self.steps += 1
            for name, value in means.items():
                self.sums[name] = self.sums.get(name, 0.0) + value

    def record(self, names) -> tuple[dict, float]:
        """({train_<name>: mean over the window's finite steps}, clips per second)."""
        seconds = time.time() - self.t_start - self.paused
        record = {f"train_{n}": self.sums[n] / self.steps if self.steps else None for n in names}
        return record, self.clips / max(seconds, 1e-9)


# ----------------------------------------------------------------------------- training


def train(cfg: TrainConfig) -> dict:
    """Train (or resume) a run; returns a summary dict (step, status, last and best validation, paths).

    status is 'finished', 'out of time' (max_time reached: validated and checkpointed), or
    'interrupted' (SIGINT/SIGTERM: last.pt was written). Raises NonFiniteLossError after
    cfg.max_nonfinite consecutive non-finite steps (last.pt untouched).
    """
    cfg.check()
    procs = setup_processes()
    try:
        run = start_run(cfg, procs)
        return _loop(run)
    finally:
        if procs.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _loop(run: Run) -> dict:
    cfg, procs, position, objective = run.cfg, run.procs, run.position, run.objective
    budget = cfg.max_seconds
    run.t_start, run.lr_now, status = run.clock(), cfg.lr, "finished"
    consecutive_nonfinite, window, step_seconds, pause_seconds = 0, Window(), 0.0, 0.0
    schedule_clock = 0.0  # never runs backwards: a step faster than the last must not raise the rate again
    desc = "train" if budget is None else f"train (budget {cfg.max_time})"
    bar = progress(total=cfg.max_steps, initial=position.step, desc=desc, disable=not (procs.is_main and cfg.progress))
    run.step_module.train()
    with StopFlag() as stop:
        while position.step < cfg.max_steps:
            t_step = run.clock()
            # with a time budget the schedule's clock runs ahead by what the end of the run needs (a step, the
            # final validation and checkpoint), so the last step is the decayed one
            schedule_clock = max(schedule_clock, run.seconds() + step_seconds + pause_seconds)
            lr_factor = run.schedule.factor(position.step, schedule_clock)
            for group in run.optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lr_factor
            run.lr_now = cfg.lr * lr_factor

            position.epoch, position.index, batch = next(run.stream)
            means, finite = train_step(run, batch)
            position.step += 1
            window.add(means, finite, cfg.batch_size)
            if finite:
                consecutive_nonfinite = 0
            else:
                consecutive_nonfinite += 1
                position.nonfinite_total += 1
                run.log(f"step {position.step - 1}: non-finite loss, gradient or updated weights, update skipped "
                        f"({consecutive_nonfinite} in a row, {position.nonfinite_total} in total)")
            bar.update(1)
            if finite:
                bar.set_postfix(**{objective.metric: f"{means[objective.metric]:.3f}"}, lr=f"{run.lr_now:.2e}")
            if consecutive_nonfinite >= cfg.max_nonfinite:
                bar.close()
                raise NonFiniteLossError(
                    f"stopped at step {position.step}: {consecutive_nonfinite} consecutive steps had a non-finite "
                    f"loss, gradient or updated weights (lower --lr, raise --warmup-steps, or check the data). "
                    f"The last good checkpoint {run.last_path} was left as it was.")
            step_seconds = run.clock() - t_step

            # out of time? (the same decision on every process: rank 0's clock decides)
            out_of_time = False
            if budget is not None:
                needed = step_seconds + pause_seconds  # another step, then the final validation and checkpoint
                late = run.seconds() + needed >= budget if procs.is_main else False
                out_of_time = procs.all_sum([1.0 if late else 0.0])[0] > 0
            last = position.step == cfg.max_steps or out_of_time

            # metrics, validation, checkpoint
            if position.step % cfg.log_every == 0 or last:
                train_means, speed = window.record(sorted(means))
                run.append_metrics({"step": position.step, **train_means, "lr": run.lr_now, "time": run.seconds(),
                                    "samples_per_s": speed, "audio_samples_per_s": speed * run.model_config.sample_len,
                                    "nonfinite_steps": position.nonfinite_total})
                window = Window()
            t_pause, t_pause_wall = run.clock(), time.time()  # validation and checkpoints do not count against samples_per_s
            validated = position.step % cfg.val_every == 0 or last
            if validated:
                run_validation(run)
            healthy = consecutive_nonfinite == 0  # never overwrite last.pt in the middle of a bad streak
            saved = healthy and (position.step % cfg.ckpt_every == 0 or last)
            if saved:
                save_checkpoint(run, run.last_path)
            paused = run.clock() - t_pause
            window.paused += time.time() - t_pause_wall
            if validated and saved:
                pause_seconds = max(pause_seconds, paused)  # what the final validation and checkpoint will take
            if out_of_time:
                status = "out of time"
                run.log(f"step {position.step}: the time budget ({cfg.max_time}) is spent; validated and saved "
                        f"{run.last_path}")
                break

            # SIGINT/SIGTERM: every process stops after the same step
            if procs.all_sum([1.0 if stop.signal else 0.0])[0] > 0:
                if not saved:
                    save_checkpoint(run, run.last_path)
                status = "interrupted"
                run.log(f"{stop.signal or 'signal'} received: saved {run.last_path} at step {position.step}; "
                        f"continue with --resume")
                break
    bar.close()
    metric = objective.metric
    return {"status": status, "step": position.step, "val": position.val, "best_val": position.best_val,
            f"val_{metric}": position.val, f"best_val_{metric}": position.best_val, "metric": metric,
            "unit": objective.unit, "nonfinite_steps": position.nonfinite_total, "out": cfg.out,
            "checkpoint": run.last_path, "seconds": run.seconds()}
