"""Timing helpers the benchmarks share: wall and CPU seconds of repeated runs, the sgemm rate, the load average.

    from _timing import load_average, sgemm_gflops, time_runs   # a script in benchmarks/ (its folder is on sys.path)

    runs = time_runs(lambda: model(x), repeats=5)      # one untimed call first (warmup=1)
    runs.median_s, runs.min_s, runs.cpu_median_s, runs.cpu_min_s, runs.result
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["Runs", "time_runs", "sgemm_rates", "sgemm_gflops", "load_average"]


@dataclass
class Runs:
    """Wall-clock and CPU seconds (of this process) of each timed call, and what the last call returned."""

    wall: list
    cpu: list
    result: Any = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.wall)

    @property
    def min_s(self) -> float:
        return min(self.wall)

    @property
    def cpu_median_s(self) -> float:
        return statistics.median(self.cpu)

    @property
    def cpu_min_s(self) -> float:
        return min(self.cpu)


def time_runs(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> Runs:
    """Call fn() `warmup` times untimed, then `repeats` times timed (wall: perf_counter, CPU: process_time)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    wall, cpu, result = [], [], None
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        result = fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return Runs(wall, cpu, result)


def sgemm_rates(n: int = 2048, repeats: int = 5) -> tuple[float, float]:
    """(GFLOP/s of the median wall time, GFLOP per CPU-second of the least CPU time) of an n x n float32 matmul."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    runs = time_runs(lambda: torch.mm(a, b), repeats)
    flops = 2 * n**3
    return flops / runs.median_s / 1e9, flops / max(runs.cpu_min_s, 1e-9) / 1e9


def sgemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of an n x n float32 matmul (median wall time of `repeats`): the machine's rate right now."""
    return sgemm_rates(n, repeats)[0]


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as '1.2 1.1 0.9'."""
    return " ".join(f"{x:.1f}" for x in os.getloadavg())
