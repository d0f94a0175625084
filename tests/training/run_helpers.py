"""Helpers of the training-run tests: a small TrainConfig, its `sashimi train` flags, one thread, finite weights."""

import contextlib
import os

import torch

from sashimi.training.loop import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# the tiny preset on 128-sample chunks of one builtin clip: seconds per dozen steps
SMALL_RUN = dict(data="builtin", preset="tiny", sample_len=128, batch_size=8, n_train_items=1, n_val_items=1,
                 val_batches=1, warmup_steps=2, val_every=5, ckpt_every=5, log_every=5, progress=False)


def small_run(out, **overrides) -> TrainConfig:
    """A TrainConfig of SMALL_RUN writing to `out`, with fields overridden."""
    return TrainConfig(**{**SMALL_RUN, "out": str(out), **overrides})


def cli_args(cfg: TrainConfig) -> list[str]:
    """The `sashimi train` flags that reproduce cfg."""
    args = []
    for key, value in cfg.to_dict().items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            args += [flag, *map(str, value)] if value else []
        elif value is not None:
            args += [flag, str(value)]
    return args


def subprocess_env(threads: int = 1, **extra: str) -> dict:
    """The environment of a `python -m sashimi` child: this checkout first on PYTHONPATH, `threads` OpenMP threads."""
    return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore", **extra)


@contextlib.contextmanager
def one_thread():
    """torch on one thread inside (the tiny model gains nothing from a second; a busy machine makes two slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def finite(state: dict) -> bool:
    """True when every floating-point tensor of a state dict is finite."""
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())
