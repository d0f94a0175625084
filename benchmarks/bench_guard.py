"""The cost of the finite-weights guard: AdamW's step alone vs StepGuard.step() on a preset's parameters.

Builds the model of --preset (default the CPU preset 'tiny') with the training loop's AdamW parameter
groups, gives every parameter a random gradient, and times, taking turns, --repeats rounds of
--steps calls of optimizer.step() and of guard.step() (which snapshots the parameters and AdamW's
state, steps, and checks that every parameter is finite). Prints the median milliseconds per call,
their ratio, the load average and the sgemm GFLOP/s measured in the same run.

    python benchmarks/bench_guard.py
    python benchmarks/bench_guard.py --preset sc09 --steps 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from s4lib import param_groups  # noqa: E402
from sashimi.models.registry import build_model  # noqa: E402
from sashimi.training.guard import StepGuard  # noqa: E402
from _timing import load_average, sgemm_gflops, time_runs  # noqa: E402  (benchmarks/_timing.py)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=50, help="calls per timed round")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds of each (median reported)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.preset)
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay=0.0, lr=1e-4), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    guard = StepGuard(model.parameters(), optimizer)
    optimizer.step()  # AdamW's state exists from here on, as in a run past its first step
    tensors = sum(1 for p in model.parameters() if p.requires_grad)
    sgemm_before = sgemm_gflops()

    def rounds(fn):
        def run():
            for _ in range(args.steps):
                fn()
        return run

    plain, guarded = rounds(optimizer.step), rounds(lambda: guard.step())
    times = {"optimizer.step()": [], "guard.step()": []}
    plain(), guarded()  # warm-up
    for _ in range(args.repeats):  # taking turns: the load of a shared machine falls on both alike
        times["optimizer.step()"] += time_runs(plain, 1, warmup=0).wall
        times["guard.step()"] += time_runs(guarded, 1, warmup=0).wall
    sgemm_after = sgemm_gflops()
    ms = {name: 1e3 * statistics.median(t) / args.steps for name, t in times.items()}
    print(f"# bench_guard: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
          f"preset {args.preset!r} ({sum(p.numel() for p in model.parameters()):,} parameters in {tensors} tensors), "
          f"{args.threads} thread(s), load {load_average()}, sgemm {sgemm_before:.1f} / {sgemm_after:.1f} GFLOP/s "
          f"(before/after)")
    print("| call | ms per call (median of rounds) |")
    print("|---|---:|")
    for name, value in ms.items():
        print(f"| {name} | {value:.3f} |")
    print(f"guard.step() / optimizer.step(): {ms['guard.step()'] / ms['optimizer.step()']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
