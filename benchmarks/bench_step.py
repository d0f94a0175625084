"""Recurrent-step throughput: eager vs fused step of S4Block, SaShiMi and sc09 generation, 1 thread vs default.

Prints steps/s (samples/s for generation): the median of --repeats wall-clock runs, with the CPU
time of the process beside it (the machine may be shared), the load average and the sgemm
GFLOP/s measured in the same run. Cases, all float32 at batch 1 unless stated:

    S4Block(256, d_state=64, mode='dplr' | 'diag').step        the library layer in a user's loop
    SaShiMi(d_model=64, n_layers=2).step                        the library backbone in a user's loop
    sc09 preset generation, batch 1 and 16 (sashimi's FastStepper.generate; eager: model.step + sample)

Paths: 'eager' = step_backend 'eager' (module by module), 'fused' = the default 'auto' (the native
step). Threads: 'default' = whatever torch was given (torch.get_num_threads(); the fused step picks
its own count, s4lib.fused_step.default_threads), '1 thread' = inside s4lib.step_threads(1).
The script asserts that at batch 1 the default thread choice is not slower than 1 thread.

    python benchmarks/bench_step.py            # full
    python benchmarks/bench_step.py --quick    # fewer steps and repeats
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import s4lib  # noqa: E402
from s4lib import S4Block, fused_step  # noqa: E402
from sashimi import build_model  # noqa: E402
from sashimi.nn.backbone import SaShiMi  # noqa: E402
from sashimi.pipelines.fast_step import FastStepper  # noqa: E402
from sashimi.pipelines.sampling import sample  # noqa: E402
from _timing import sgemm_gflops, time_runs  # noqa: E402  (benchmarks/_timing.py)


def timed(run, repeats):
    """(median wall rate, median CPU rate) of run() -> number of steps (run is warmed up already)."""
    runs = time_runs(run, repeats, warmup=0)
    n = runs.result
    return statistics.median(n / w for w in runs.wall), statistics.median(n / max(c, 1e-9) for c in runs.cpu)


def module_runner(module, x, steps, backend):
    s4lib.set_step_backend(module, backend)
    state0 = module.default_state(x.shape[0])

    def run():
        state = state0
        with torch.no_grad():
            for _ in range(steps):
                _, state = module.step(x, state)
        return steps

    run()  # warm up (packs / builds the fused step)
    return run


def generation_runner(model, batch, steps, backend):
    first = torch.full((batch,), model.config.zero_level)
    gen = torch.Generator().manual_seed(0)
    if backend == "fused":
        stepper = FastStepper(model, batch)

        def run():
            stepper.reset()
            stepper.generate(first, torch.rand(batch, steps, generator=gen, dtype=torch.float64))
            return batch * steps
    else:
        s4lib.set_step_backend(model, "eager")

        def run():
            state, token = model.default_state(batch), first
            u = torch.rand(batch, steps, generator=gen, dtype=torch.float64)
            with torch.no_grad():
                for t in range(steps):
                    logits, state = model.step(token, state)
                    token, _ = sample(logits, u[:, t])
            return batch * steps
    run()
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3000, help="fused steps per run (eager: a tenth)")
    parser.add_argument("--quick", action="store_true", help="1000 steps, 3 repeats")
    parser.add_argument("--no-eager-generation", action="store_true", help="skip the (slow) eager sc09 loop")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = 1000, 3
    default_threads = torch.get_num_threads()
    load_start = os.getloadavg()
    gflops = sgemm_gflops(512, 20)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch threads {default_threads}; load average {load_start[0]:.1f} at start; sgemm 512^3 "
          f"{gflops:.0f} GFLOP/s; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    fused_ok, why = fused_step.fused_status()
    print(f"fused step: {why}\n")

    torch.manual_seed(0)
    cases = []
    for mode in ("dplr", "diag"):
        block = S4Block(256, d_state=64, mode=mode, transposed=False).eval()
        block.setup_step()
        cases.append((f"S4Block(256, d_state=64, {mode}).step", "steps/s", block, torch.randn(1, 256)))
    sashimi = SaShiMi(d_model=64, n_layers=2).eval()
    sashimi.setup_step()
    cases.append(("SaShiMi(d_model=64, n_layers=2).step", "steps/s", sashimi, torch.randn(1, 64)))
    sc09 = build_model("sc09", init="dplr-random").eval()  # speed does not depend on the init
    sc09.setup_step()

    rows, rates = [], {}

    def measure(name, unit, make_run, backend, steps, threads_label):
        def go():
            run = make_run(backend, steps)
            return timed(run, args.repeats)
        if threads_label == "1 thread":
            with s4lib.step_threads(1):
                wall, cpu = go()
        else:
            wall, cpu = go()
        rates[(name, backend, threads_label)] = wall
        rows.append((name, backend, threads_label, wall, cpu, unit))
        print(f"  {name:45s} {backend:6s} {threads_label:8s} {wall:12,.0f} {unit} (CPU-time rate {cpu:,.0f})",
              flush=True)

    for name, unit, module, x in cases:
        for backend in ("eager", "fused"):
            steps = args.steps if backend == "fused" else max(50, args.steps // 10)
            for threads_label in ("default", "1 thread"):
                measure(name, unit, lambda b, n, m=module, x=x: module_runner(m, x, n, b), backend, steps,
                        threads_label)
    for batch in (1, 16):
        name = f"sc09 generation, batch {batch}"
        for backend in ("eager", "fused"):
            if backend == "eager" and args.no_eager_generation:
                continue
            steps = args.steps if backend == "fused" else max(20, args.steps // 100)
            if batch == 16:
                steps = max(20, steps // 4)
            for threads_label in ("default", "1 thread"):
                measure(name, "samples/s", lambda b, n, bs=batch: generation_runner(sc09, bs, n, b), backend, steps,
                        threads_label)

    load_end = os.getloadavg()
    print(f"\nload average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end (1-minute); "
          f"sgemm {gflops:.0f} GFLOP/s\n")
    print("| case | path | threads | rate (median, wall) | CPU-time rate | fused / eager (same threads) |")
    print("|---|---|---|---|---|---|")
    for name, backend, threads_label, wall, cpu, unit in rows:
        eager = rates.get((name, "eager", threads_label))
        ratio = f"{wall / eager:.1f}x" if backend == "fused" and eager else ""
        print(f"| {name} | {backend} | {threads_label} | {wall:,.0f} {unit} | {cpu:,.0f} | {ratio} |")

    print()
    goals = [("S4Block(256, d_state=64, dplr).step", 50000), ("S4Block(256, d_state=64, diag).step", 50000),
             ("SaShiMi(d_model=64, n_layers=2).step", 20000), ("sc09 generation, batch 1", 16000),
             ("sc09 generation, batch 16", 53000)]
    for name, goal in goals:
        rate = rates.get((name, "fused", "default"))
        if rate is not None:
            print(f"goal {name} >= {goal:,}: {'met' if rate >= goal else 'NOT met'} ({rate:,.0f})")

    # the default thread choice at batch 1 must not be slower than one thread (the fused path picks 1)
    assert fused_step.default_threads(1) == 1, "the fused step must use one thread at batch 1"
    for name, _, _, _ in cases:
        default, one = rates[(name, "fused", "default")], rates[(name, "fused", "1 thread")]
        assert default >= 0.75 * one, f"{name}: default threads {default:,.0f} < 1 thread {one:,.0f} steps/s"
    print("check: at batch 1 the default thread choice is not slower than 1 thread (within 25 % noise): ok")


if __name__ == "__main__":
    main()
