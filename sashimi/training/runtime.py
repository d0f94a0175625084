"""What sashimi.training.loop runs on: the process group, the data order, seeds, signals and the run's files.

Processes / setup_processes (torchrun ranks and devices), GlobalBatches / batch_stream (the
deterministic, resumable order of global batches), seed_everything, StopFlag (SIGINT/SIGTERM stop the
loop after a step) and the metrics-file helpers read_metrics / plot_curves.
"""

from __future__ import annotations

import json
import os
import random
import signal
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ..files import atomic_write

__all__ = ["Processes", "setup_processes", "available_cores", "choose_threads", "configure_threads", "GlobalBatches",
           "batch_stream", "seed_everything", "StopFlag", "read_metrics", "plot_curves"]


# ----------------------------------------------------------------------------- processes


@dataclass
class Processes:
    """Where this process sits: rank among world_size processes, and its device."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this train() call created the process group (and destroys it)
    local_world_size: int = 1  # processes of the group on this machine (torchrun's LOCAL_WORLD_SIZE)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        """Sum numbers over processes (float64)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(t)
        return t.tolist()


def setup_processes() -> Processes:
    """Join the process group when launched by torchrun (RANK / WORLD_SIZE / LOCAL_RANK are set)."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return Processes(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend=backend)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return Processes(rank, world_size, device, owns, max(1, local))


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else os.cpu_count())."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def choose_threads(requested: int | None, local_processes: int, cores: int) -> tuple[int | None, str | None]:
    """(torch threads per process, or None for torch's own choice; a warning, or None).

    One process keeps torch's choice unless threads are requested. Several processes on one
    machine (torchrun) get cores // processes each unless requested: torchrun sets no thread
    count when OMP_NUM_THREADS is already exported, and K processes of that many threads each on
    fewer cores spin against each other (a 7x slowdown measured with 2 x 2 threads on 2 cores).
    The warning says when threads x local processes exceed the cores.
    """
    threads = requested
    if threads is None and local_processes > 1:
        threads = max(1, cores // local_processes)
    used = (threads or torch.get_num_threads()) * local_processes
    warning = None
    if used > cores and (requested is not None or local_processes > 1):
        warning = (f"warning: {threads or torch.get_num_threads()} torch thread(s) x {local_processes} process(es) "
                   f"on this machine exceed its {cores} core(s): throughput can collapse; use --threads "
                   f"{max(1, cores // local_processes)}")
    return threads, warning


def configure_threads(requested: int | None, procs: Processes, log=print) -> int:
    """Set torch's thread count by choose_threads (warning once, from the first local process); returns it."""
    threads, warning = choose_threads(requested, procs.local_world_size, available_cores())
    if threads is not None:
        torch.set_num_threads(threads)
    if warning and procs.rank % procs.local_world_size == 0:
        log(warning)
    return torch.get_num_threads()


# ----------------------------------------------------------------------------- data order


class GlobalBatches:
    """Deterministic data order: epoch e is a permutation seeded by (seed, e), cut into global batches.

    The last incomplete batch of an epoch is dropped. Process `rank` of `world_size` takes the
    rank-th contiguous slice of every global batch, so K processes see exactly the batches one
    process would see. A position (epoch, index) says where the next batch starts.
    """

    def __init__(self, n_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} must be divisible by the number of processes ({world_size})")
        if n_items < batch_size:
            raise ValueError(f"the training split has {n_items} items, fewer than batch_size={batch_size}")
        self.n_items, self.batch_size, self.seed = n_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.per_epoch = n_items // batch_size

    def local_batches(self, epoch: int) -> list[list[int]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n_items)
        local = self.batch_size // self.world_size
        starts = range(0, self.per_epoch * self.batch_size, self.batch_size)
        return [order[s + self.rank * local: s + (self.rank + 1) * local].tolist() for s in starts]


def _ignore_sigint(_worker_id: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle


def batch_stream(dataset, batches: GlobalBatches, epoch: int, index: int, num_workers: int):
    """Yield (epoch, index, batch) forever from position (epoch, index); the position is the one after the batch."""
    while True:
        loader = DataLoader(dataset, batch_sampler=batches.local_batches(epoch)[index:], num_workers=num_workers,
                            generator=torch.Generator(),  # keeps the global RNG untouched
                            worker_init_fn=_ignore_sigint if num_workers else None)
        for batch in loader:
            index += 1
            yield epoch, index, batch
        epoch, index = epoch + 1, 0


# ----------------------------------------------------------------------------- seeds


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- signals


class StopFlag:
    """Set by the first SIGINT/SIGTERM; the loop finishes its step, checkpoints and returns.

    After it a SIGINT gets the default behaviour (Ctrl-C twice aborts at once), but a repeated SIGTERM
    changes nothing: it is the same request arriving twice, as when a scheduler signals every process
    of a job and torchrun forwards its own SIGTERM to the workers (which must still checkpoint).
    """

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: no signal handling
            pass
        return self

    def _handle(self, signum, frame):
        self.signal = self.signal or signal.Signals(signum).name
        if signal.SIGINT in self._previous:
            signal.signal(signal.SIGINT, self._previous[signal.SIGINT])

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------- files


def read_metrics(path: str, warn=None) -> list[dict]:
    """The records of a metrics.jsonl file ([] if there is none).

    A last line that is not complete JSON (a write cut short by a kill or a full disk) is dropped,
    with `warn(message)` when given; a bad line before the last raises ValueError naming the file and line.
    """
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(k + 1, line) for k, line in enumerate(f) if line.strip()]
    records = []
    for i, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a record with an integer step")
        except ValueError as e:
            if i == len(lines) - 1:
                if warn is not None:
                    warn(f"warning: dropped the torn last line {number} of {path} (an interrupted write): "
                         f"{line.strip()[:60]!r}")
                break
            raise ValueError(f"{path} line {number} is not a metrics record ({e}); fix or remove that line") from e
        records.append(record)
    return records


def plot_curves(metrics_path: str, png_path: str, metric: str = "bits", unit: str = "bits/sample") -> None:
    """Train and validation `metric` (train_<metric>, val_<metric>) against step, from metrics.jsonl."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path)
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, style in ((f"train_{metric}", "-"), (f"val_{metric}", "o-")):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), style, label=key.replace("_", " "), markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(unit)
    ax.grid(alpha=0.3)
    if records:
        ax.legend()
    fig.tight_layout()
    atomic_write(png_path, lambda f: fig.savefig(f, format="png", dpi=100))
