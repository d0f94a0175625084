"""Training loop for the autoregressive SaShiMi waveform model: TrainConfig, train(cfg).

    from sashimi.training.loop import TrainConfig, train
    train(TrainConfig(data="builtin", preset="tiny", out="runs/tiny", max_steps=300))

Everything happens in `train()`, top to bottom: processes, model, optimiser, data, then the loop
(learning rate -> batch -> loss -> backward -> clip -> step -> EMA -> log -> validate -> checkpoint).
Under `torchrun --nproc_per_node K` every process runs the same loop on 1/K of each global batch
(DistributedDataParallel); only rank 0 writes files. Checkpoints: sashimi/checkpoint.py; learning-rate schedule:
sashimi/schedule.py; processes, data order, seeds, signals, metrics files: sashimi/runtime.py; see docs/training.md.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from s4lib import param_groups

from .checkpoint import (BEST_CHECKPOINT, LAST_CHECKPOINT, CheckpointError, _config_diff, atomic_write,
                         gather_rng_states, load_checkpoint, set_rng_state, write_checkpoint)
from .checkpoint import CHECKPOINT_FORMAT, model_from_checkpoint, resolve_checkpoint, rng_state  # noqa: F401 (re-exported)
from ..data.datasets import make_dataset
from ..models.autoregressive import PRESETS, ModelConfig, activation_bytes, build_model, count_parameters
from .runtime import (GlobalBatches, Processes, StopFlag, batch_stream, plot_curves, read_metrics, seed_everything,
                      setup_processes, write_json)
from .runtime import _ignore_sigint  # noqa: F401 (re-exported)
from .schedule import LRSchedule

__all__ = ["TrainConfig", "train", "NonFiniteLossError", "CheckpointError", "load_checkpoint",
           "resolve_checkpoint", "model_from_checkpoint", "CHECKPOINT_FORMAT", "LAST_CHECKPOINT",
           "BEST_CHECKPOINT"]

CHECKPOINT_AUTO_BYTES = 2e9  # checkpointing='auto' turns on above this estimate (sashimi.models.autoregressive.activation_bytes)
LN2 = math.log(2.0)


def _opt(default, help: str):
    """A config field with its --help text (the CLI builds one flag per field)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # what to train, and where
    data: str = _opt("builtin", "'builtin' (synthetic, no download) or a folder of audio files")
    preset: str = _opt("sc09", "model preset (sashimi.models.autoregressive.PRESETS)")
    out: str = _opt("runs/sashimi", "run directory: checkpoints, config.json, metrics.jsonl, curves.png")
    sample_len: int | None = _opt(None, "training clip length in samples (default: the preset's)")
    dropout: float | None = _opt(None, "override the preset's dropout")
    n_train_items: int | None = _opt(None, "use at most this many training items (default: all)")
    n_val_items: int | None = _opt(None, "use at most this many validation items (default: all)")
    # optimisation
    max_steps: int = _opt(100_000, "total optimiser steps (a resumed run continues up to this)")
    batch_size: int = _opt(8, "global batch size, split evenly across processes")
    micro_batch: int | None = _opt(None, "run each process's batch in chunks of this many clips and add up their "
                                         "gradients (same result, less memory; default: all at once)")
    checkpointing: str = _opt("auto", "gradient checkpointing per layer: 'on', 'off', or 'auto' (on when a "
                                      "micro-batch's estimated activations exceed 2 GB, e.g. sc09 at batch >= 4)")
    lr: float = _opt(4e-3, "peak learning rate (SSM A, B, dt keep their own 1e-3 from s4lib)")
    weight_decay: float = _opt(0.0, "AdamW weight decay (SSM parameters are exempt)")
    warmup_steps: int = _opt(1000, "linear warmup from 0 to lr")
    schedule: str = _opt("cosine", "'cosine' (decay to min_lr_ratio*lr at decay_steps) or 'plateau'")
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
    progress: bool = _opt(True, "show a progress bar")
    debug_nonfinite_steps: tuple[int, ...] = _opt((), "testing aid: make the loss NaN at these (0-based) steps")

    def check(self) -> None:
        """Raise ValueError naming the first bad field."""
        positive = ["max_steps", "batch_size", "log_every", "val_every", "ckpt_every", "max_nonfinite"]
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ["sample_len", "micro_batch", "threads", "n_train_items", "n_val_items", "val_batches", "decay_steps"]:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if self.weight_decay < 0 or self.warmup_steps < 0 or self.grad_clip < 0 or self.num_workers < 0:
            raise ValueError("weight_decay, warmup_steps, grad_clip and num_workers must be >= 0")
        if self.schedule not in ("cosine", "plateau"):
            raise ValueError(f"schedule must be 'cosine' or 'plateau', got {self.schedule!r}")
        if not 0 <= self.min_lr_ratio <= 1 or not 0 < self.plateau_factor < 1 or self.plateau_patience < 0:
            raise ValueError("need 0 <= min_lr_ratio <= 1, 0 < plateau_factor < 1, plateau_patience >= 0")
        if self.ema is not None and not 0 < self.ema < 1:
            raise ValueError(f"ema must be a decay in (0, 1) or None, got {self.ema!r}")
        if self.checkpointing not in ("auto", "on", "off"):
            raise ValueError(f"checkpointing must be 'auto', 'on' or 'off', got {self.checkpointing!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["debug_nonfinite_steps"] = list(self.debug_nonfinite_steps)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}")
        d = dict(d)
        if "debug_nonfinite_steps" in d:
            d["debug_nonfinite_steps"] = tuple(d["debug_nonfinite_steps"])
        return cls(**d)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient; the run stopped."""


# ----------------------------------------------------------------------------- model config


def resolve_model_config(cfg: TrainConfig) -> ModelConfig:
    """The preset's model config with this run's overrides (sample_len, dropout)."""
    preset = PRESETS[cfg.preset]
    d = preset.to_dict() if hasattr(preset, "to_dict") else dict(preset)
    if cfg.sample_len is not None:
        d["sample_len"] = cfg.sample_len
    if cfg.dropout is not None:
        d["dropout"] = cfg.dropout
    return ModelConfig.from_dict(d)


def checkpointing_decision(cfg: TrainConfig, model_config: ModelConfig, local_batch: int) -> tuple[bool, float]:
    """(gradient checkpointing on?, estimated activation bytes of one micro-batch without it)."""
    estimate = activation_bytes(model_config, min(cfg.micro_batch or local_batch, local_batch))
    if cfg.checkpointing == "auto":
        return estimate > CHECKPOINT_AUTO_BYTES, estimate
    return cfg.checkpointing == "on", estimate


# ----------------------------------------------------------------------------- EMA and validation


@torch.no_grad()
def update_ema(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """ema = d * ema + (1 - d) * weights, with d ramped up as min(decay, (1 + step) / (10 + step))."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema_model.state_dict().values(), model.state_dict().values()):
        if e.is_floating_point() or e.is_complex():
            e.mul_(d).add_(p, alpha=1 - d)
        else:
            e.copy_(p)


@torch.no_grad()
def validate(model, dataset, procs: Processes, local_batch: int, max_batches: int | None, autocast) -> tuple[float, int]:
    """Bits/sample over the validation split (or its first max_batches global batches), summed over processes."""
    n = len(dataset) if max_batches is None else min(len(dataset), max_batches * local_batch * procs.world_size)
    indices = list(range(procs.rank, n, procs.world_size))
    loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=local_batch, shuffle=False)
    was_training = model.training
    model.eval()
    total_bits, total_count = 0.0, 0.0
    for batch in loader:
        with autocast():
            bits, count = model(batch["x"].to(procs.device), batch["y"].to(procs.device), batch["mask"].to(procs.device))
        total_bits += float(bits)
        total_count += float(count)
    model.train(was_training)
    total_bits, total_count = procs.all_sum([total_bits, total_count])
    return total_bits / max(total_count, 1.0), int(total_count)


# ----------------------------------------------------------------------------- training


def train(cfg: TrainConfig) -> dict:
    """Train (or resume) a run; returns a summary dict (step, status, last val bits, paths).

    status is 'finished', or 'interrupted' (SIGINT/SIGTERM: last.pt was written). Raises
    NonFiniteLossError after cfg.max_nonfinite consecutive non-finite steps (last.pt untouched).
    """
    cfg.check()
    procs = setup_processes()
    try:
        return _train(cfg, procs)
    finally:
        if procs.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, procs: Processes) -> dict:
    log = (lambda msg: tqdm.write(msg)) if procs.is_main else (lambda msg: None)
    device = procs.device
    last_path = os.path.join(cfg.out, LAST_CHECKPOINT)
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    if procs.is_main:
        os.makedirs(cfg.out, exist_ok=True)
        if not cfg.resume and os.path.exists(last_path):
            raise FileExistsError(f"{cfg.out} already holds a run ({LAST_CHECKPOINT}); pass --resume to "
                                  f"continue it or choose another --out")

    # ---- the checkpoint to resume from must describe the same model (checked before building it)
    model_config = resolve_model_config(cfg)
    ckpt = load_checkpoint(last_path) if cfg.resume and os.path.exists(last_path) else None
    if ckpt is not None:
        diff = _config_diff(ckpt["model_config"], model_config.to_dict())
        if diff:
            raise CheckpointError(f"{last_path} was trained with preset {ckpt.get('preset')!r}, a different model "
                                  f"than preset {cfg.preset!r} with this run's overrides: " + "; ".join(diff))

    # ---- model, optimiser, schedule (identical initialisation on every process)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    model = build_model(model_config).to(device)
    log(f"sashimi: preset {cfg.preset!r}, {count_parameters(model):,} parameters, "
        f"{procs.world_size} process(es) on {device}")
    ema_model = copy.deepcopy(model).eval() if cfg.ema is not None else None
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay=cfg.weight_decay, lr=cfg.lr), lr=cfg.lr)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]  # the schedule scales every group's own lr
    schedule = LRSchedule(cfg)
    step, epoch, index, nonfinite_total, best_val, elapsed_before = 0, 0, 0, 0, math.inf, 0.0
    resumed_val_bits = None
    seed_everything(cfg.seed + 1 + procs.rank)  # dropout etc.: a different stream per process

    # ---- resume: weights, optimiser, schedule, position in the data, RNG
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["scheduler"])
        if ema_model is not None:
            ema_model.load_state_dict(ckpt["ema"] if ckpt["ema"] is not None else ckpt["model"])
        step, nonfinite_total, best_val = ckpt["step"], ckpt["nonfinite_total"], ckpt["best_val_bits"]
        resumed_val_bits = ckpt["val_bits"]
        epoch, index = ckpt["data"]["epoch"], ckpt["data"]["index"]
        elapsed_before = ckpt["elapsed_seconds"]
        if ckpt["data"]["batch_size"] != cfg.batch_size or ckpt["data"]["seed"] != cfg.seed:
            log("warning: batch_size or seed changed since the checkpoint; the data order is not the original one")
        if len(ckpt["rng"]) == procs.world_size:
            set_rng_state(ckpt["rng"][procs.rank])
        else:
            log(f"warning: checkpoint has RNG states for {len(ckpt['rng'])} processes, this run has "
                f"{procs.world_size}; reseeding")
            seed_everything(cfg.seed + 1 + procs.rank + 1000 * step)
        if procs.is_main:  # forget metrics logged after the checkpoint (their steps will be redone)
            kept = [r for r in read_metrics(metrics_path) if r["step"] <= step]
            atomic_write(metrics_path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))
        log(f"resumed from {last_path} at step {step}")
        ckpt = None  # its tensors now live in the model and optimiser
    elif cfg.resume:
        log(f"--resume: no {last_path} yet, starting a new run")

    if procs.is_main:
        write_json(os.path.join(cfg.out, "config.json"),
                   {"train": cfg.to_dict(), "model": model_config.to_dict(), "world_size": procs.world_size})
    raw_model = model
    use_checkpointing, micro_estimate = checkpointing_decision(cfg, model_config, cfg.batch_size // procs.world_size)
    raw_model.set_gradient_checkpointing(use_checkpointing)
    log(f"gradient checkpointing {'on' if use_checkpointing else 'off'} ({cfg.checkpointing}; activations of a "
        f"micro-batch estimated at {micro_estimate / 1e9:.2f} GB without it)")
    if procs.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    # ---- data
    data_kwargs = dict(sample_rate=model_config.sample_rate, sample_len=model_config.sample_len,
                       quantization=model_config.quantization, bits=model_config.bits)
    train_set = make_dataset(cfg.data, "train", n_items=cfg.n_train_items, **data_kwargs)
    val_set = make_dataset(cfg.data, "val", n_items=cfg.n_val_items, **data_kwargs)
    batches = GlobalBatches(len(train_set), cfg.batch_size, cfg.seed, procs.rank, procs.world_size)
    stream = batch_stream(train_set, batches, epoch, index, cfg.num_workers)
    local_batch = cfg.batch_size // procs.world_size
    if cfg.precision == "bf16":
        autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = lambda: torch.autocast(device.type, enabled=False)  # noqa: E731

    def save_checkpoint(path: str) -> None:
        """Collective (every process calls it: RNG states are gathered); rank 0 writes."""
        rng = gather_rng_states(procs.world_size)
        if not procs.is_main:
            return
        write_checkpoint(
            path, train_config=cfg.to_dict(), model_config=model_config.to_dict(), model=raw_model.state_dict(),
            ema=ema_model.state_dict() if ema_model is not None else None, optimizer=optimizer.state_dict(),
            scheduler=schedule.state_dict(), step=step,
            data={"epoch": epoch, "index": index, "seed": cfg.seed, "batch_size": cfg.batch_size}, rng=rng,
            nonfinite_total=nonfinite_total, best_val_bits=best_val, val_bits=val_bits,
            elapsed_seconds=elapsed_before + time.time() - t_start, world_size=procs.world_size)

    def append_metrics(record: dict) -> None:
        if procs.is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def run_validation() -> None:
        nonlocal best_val, val_bits
        eval_model = ema_model if ema_model is not None else raw_model
        val_bits, n_samples = validate(eval_model, val_set, procs, local_batch, cfg.val_batches, autocast)
        schedule.observe(val_bits)
        append_metrics({"step": step, "val_bits": val_bits, "val_samples": n_samples, "lr": lr_now,
                        "time": elapsed_before + time.time() - t_start})
        log(f"step {step}: val {val_bits:.4f} bits/sample ({n_samples:,} samples)")
        if val_bits < best_val:
            best_val = val_bits
            save_checkpoint(os.path.join(cfg.out, BEST_CHECKPOINT))
        if procs.is_main:
            plot_curves(metrics_path, os.path.join(cfg.out, "curves.png"))

    # ---- the loop
    t_start = time.time()
    val_bits, lr_now, status = resumed_val_bits, cfg.lr, "finished"
    consecutive_nonfinite, window_bits, window_steps, window_clips, t_window = 0, 0.0, 0, 0, time.time()
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (procs.is_main and cfg.progress),
               dynamic_ncols=True, desc="train")
    model.train()
    with StopFlag() as stop:
        while step < cfg.max_steps:
            # learning rate for this step
            lr_factor = schedule.factor(step)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lr_factor
            lr_now = cfg.lr * lr_factor

            # forward and backward; the loss is normalised by the number of audio samples in the
            # *global* batch, and DDP averages gradients over processes, hence the factor world_size.
            # With micro_batch the batch goes through in chunks whose gradients add up (same result).
            epoch, index, batch = next(stream)
            x, y, mask = batch["x"].to(device), batch["y"].to(device), batch["mask"].to(device)
            (global_count,) = procs.all_sum([float(mask.sum())])
            loss_scale = LN2 * procs.world_size / max(global_count, 1.0)
            poisoned = step in cfg.debug_nonfinite_steps  # testing aid (TrainConfig.debug_nonfinite_steps)
            micro = cfg.micro_batch or len(x)
            n_chunks = math.ceil(len(x) / micro)
            local_bits = 0.0
            for i in range(n_chunks):
                chunk = slice(i * micro, (i + 1) * micro)
                sync = i == n_chunks - 1 or procs.world_size == 1  # DDP exchanges gradients after the last chunk
                with contextlib.nullcontext() if sync else model.no_sync():
                    with autocast():  # the loss in chunks of time: the whole batch's logits never exist at once
                        bits, _ = model(x[chunk], y[chunk], mask[chunk])
                    loss = bits * loss_scale * (float("nan") if poisoned else 1.0)
                    loss.backward()
                local_bits += float(bits.detach())
            (global_bits,) = procs.all_sum([local_bits if not poisoned else float("nan")])
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), max_norm)

            # a non-finite loss or gradient skips the update (same decision on every process)
            train_bits = global_bits / max(global_count, 1.0)
            if math.isfinite(train_bits) and torch.isfinite(grad_norm):
                optimizer.step()
                if ema_model is not None:
                    update_ema(ema_model, raw_model, cfg.ema, step)
                consecutive_nonfinite = 0
                window_bits += train_bits
                window_steps += 1
            else:
                consecutive_nonfinite += 1
                nonfinite_total += 1
                log(f"step {step}: non-finite loss or gradient, update skipped "
                    f"({consecutive_nonfinite} in a row, {nonfinite_total} in total)")
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_clips += cfg.batch_size
            bar.update(1)
            if math.isfinite(train_bits):
                bar.set_postfix(loss=f"{train_bits * LN2:.3f}", bits=f"{train_bits:.3f}", lr=f"{lr_now:.2e}")
            if consecutive_nonfinite >= cfg.max_nonfinite:
                bar.close()
                raise NonFiniteLossError(
                    f"stopped at step {step}: {consecutive_nonfinite} consecutive steps had a non-finite loss or "
                    f"gradient (lower --lr, raise --warmup-steps, or check the data). The last good checkpoint "
                    f"{last_path} was left as it was.")

            # metrics, validation, checkpoint
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                seconds = time.time() - t_window
                append_metrics({"step": step, "train_bits": window_bits / window_steps if window_steps else None,
                                "lr": lr_now, "time": elapsed_before + time.time() - t_start,
                                "samples_per_s": window_clips / seconds,
                                "audio_samples_per_s": window_clips * model_config.sample_len / seconds,
                                "nonfinite_steps": nonfinite_total})
                window_bits, window_steps, window_clips, t_window = 0.0, 0, 0, time.time()
            t_pause = time.time()  # validation and checkpoints do not count against samples_per_s
            if step % cfg.val_every == 0 or step == cfg.max_steps:
                run_validation()
            healthy = consecutive_nonfinite == 0  # never overwrite last.pt in the middle of a bad streak
            saved = healthy and (step % cfg.ckpt_every == 0 or step == cfg.max_steps)
            if saved:
                save_checkpoint(last_path)
            t_window += time.time() - t_pause

            # SIGINT/SIGTERM: every process stops after the same step
            if procs.all_sum([1.0 if stop.signal else 0.0])[0] > 0:
                if not saved:
                    save_checkpoint(last_path)
                status = "interrupted"
                log(f"{stop.signal or 'signal'} received: saved {last_path} at step {step}; "
                    f"continue with --resume")
                break
    bar.close()
    return {"status": status, "step": step, "val_bits": val_bits, "best_val_bits": best_val,
            "nonfinite_steps": nonfinite_total, "out": cfg.out, "checkpoint": last_path}
