"""Recurrent-step throughput: eager vs fused step of S4Block, SaShiMi and sc09 generation, 1 thread vs default.

Prints steps/s (samples/s for generation): the median of --repeats wall-clock runs, with the CPU
time of the process beside it (the machine may be shared), the load average and the sgemm
GFLOP/s measured in the same run. Cases, all float32 at batch 1 unless stated:

    S4Block(256, d_state=64, mode='dplr' | 'diag').step        the library layer in a user's loop
    SaShiMi(d_model=64, n_layers=2).step                        the library backbone in a user's loop
    sc09 preset generation, batch 1 and 16 (sashimi's FastStepper.generate; eager: model.step + sample),
    and the fused engine with weights='float16' (the Linear layers' weights stored in half precision)

Paths: 'eager' = step_backend 'eager' (module by module), 'fused' = the default 'auto' (the native
step). Threads: 'default' = whatever torch was given (torch.get_num_threads(); the fused step picks
its own count, s4lib.fused_step.default_threads), '1 thread' / '2 threads' = inside
s4lib.step_threads(1) / (2) (fused: 2 threads split every step's columns below 8 rows).
The two thread settings of a case take turns in every repeat. The script fails (exit status 1)
when at batch 1 the default thread choice is slower than 1 thread by more than --tolerance.

    python benchmarks/bench_step.py            # full
    python benchmarks/bench_step.py --quick    # fewer steps and repeats
"""

from __future__ import annotations

import argparse
import contextlib
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
from _timing import sgemm_gflops  # noqa: E402  (benchmarks/_timing.py)


def timed_interleaved(runs, repeats):
    """{label: (median wall rate, median CPU rate)} of runs {label: (context, run() -> steps)}, the
    labels taking turns in every repeat, in rotated order (a drift of the machine's speed, or a cost
    of coming first, hits all of them alike)."""
    walls = {label: [] for label in runs}
    cpus = {label: [] for label in runs}
    labels = list(runs)
    for r in range(repeats):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:  # rotated: no label always first
            context, run = runs[label]
            with context():
                w, c = time.perf_counter(), time.process_time()
                n = run()
                walls[label].append(n / (time.perf_counter() - w))
                cpus[label].append(n / max(time.process_time() - c, 1e-9))
    return {label: (statistics.median(walls[label]), statistics.median(cpus[label])) for label in runs}


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


def generation_runner(model, batch, steps, backend, weights="float32"):
    first = torch.full((batch,), model.config.zero_level)
    gen = torch.Generator().manual_seed(0)
    if backend == "fused":
        stepper = FastStepper(model, batch, weights=weights)

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
    parser.add_argument("--tolerance", type=float, default=0.10,
                        help="the default thread choice may be this much slower than 1 thread (noise)")
    parser.add_argument("--only", default="", help="comma-separated case prefixes to run (e.g. 'sc09,SaShiMi')")
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
    contexts = {"default": contextlib.nullcontext, "1 thread": lambda: s4lib.step_threads(1),
                "2 threads": lambda: s4lib.step_threads(2)}

    def measure(name, unit, make_run, backend, steps):
        runs = {}
        for label, context in contexts.items():
            if label == "2 threads" and backend == "eager":
                continue  # the eager step's default is torch's 2 threads
            with context():
                runs[label] = (context, make_run(backend, steps))  # built and warmed up under its setting
        for label, (wall, cpu) in timed_interleaved(runs, args.repeats).items():
            rates[(name, backend, label)] = wall
            rows.append((name, backend, label, wall, cpu, unit))
            print(f"  {name:45s} {backend:6s} {label:8s} {wall:12,.0f} {unit} (CPU-time rate {cpu:,.0f})",
                  flush=True)

    wanted = [w.strip() for w in args.only.split(",") if w.strip()]

    def selected(name):
        return not wanted or any(name.startswith(w) for w in wanted)

    for name, unit, module, x in cases:
        if not selected(name):
            continue
        for backend in ("eager", "fused"):
            steps = args.steps if backend == "fused" else max(50, args.steps // 10)
            measure(name, unit, lambda b, n, m=module, x=x: module_runner(m, x, n, b), backend, steps)
    for batch in (1, 16):
        name = f"sc09 generation, batch {batch}"
        if not selected(name):
            continue
        for backend in ("eager", "fused"):
            if backend == "eager" and args.no_eager_generation:
                continue
            steps = args.steps if backend == "fused" else max(20, args.steps // 100)
            if batch == 16:
                steps = max(20, steps // 4)
            measure(name, "samples/s", lambda b, n, bs=batch: generation_runner(sc09, bs, n, b), backend, steps)
        name = f"sc09 generation, batch {batch}, float16 weights"
        if selected(name):
            steps = args.steps if batch == 1 else max(20, args.steps // 4)
            measure(name, "samples/s", lambda b, n, bs=batch: generation_runner(sc09, bs, n, b, "float16"), "fused",
                    steps)

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

    # the default thread choice at batch 1 must not be slower than one thread: measured, interleaved
    slower = []
    for name in [c[0] for c in cases] + ["sc09 generation, batch 1"]:
        if (name, "fused", "default") not in rates:
            continue
        default, one = rates[(name, "fused", "default")], rates[(name, "fused", "1 thread")]
        verdict = "ok" if default >= (1 - args.tolerance) * one else "SLOWER"
        print(f"check {name}: default threads {default:,.0f} vs 1 thread {one:,.0f} "
              f"({default / one:.2f}x): {verdict}")
        if verdict != "ok":
            slower.append(name)
    if slower:
        raise SystemExit(f"the default thread choice is slower than 1 thread (by more than "
                         f"{args.tolerance:.0%}) at batch 1 for: {', '.join(slower)}")
    print(f"check: at batch 1 the default thread choice is not slower than 1 thread (tolerance "
          f"{args.tolerance:.0%}): ok")


if __name__ == "__main__":
    main()
