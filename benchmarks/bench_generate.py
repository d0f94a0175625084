"""Generation throughput of WaveformAR: eager step loop vs the fused engine (sashimi.pipelines.fast_step).

Prints a table of samples/s (median of --repeats runs, wall clock), the real-time factor at the
model's rate (16 kHz), samples per CPU-second (the machine is shared: wall time includes other
jobs' time slices), the flop count per generated sample and the implied GFLOP/s against the
machine's peak. float32, torch.set_num_threads(--threads) for the fused engine (it splits a
batch over the threads); the eager loop runs on one thread, as sashimi.pipelines.generate runs it.

    python benchmarks/bench_generate.py                 # sc09-2layer:1, sc09:1, sc09:16
    python benchmarks/bench_generate.py --cases tiny:1 sc09-2layer:1   # the demo's model and the 2-layer one
    python benchmarks/bench_generate.py --quick         # fewer steps and repeats

Flops per generated sample: every Linear is a matvec of in x out MACs (2 flops each), weighted
by how often its level runs (level i once every prod(pool[:i]) samples; a DownPool/UpPool pair
of level i once every prod(pool[:i+1])); the SSM state update counts the engine's real flops per
complex state element (S4 DPLR rank r: 16 + 12 r, S4D: 16); LayerNorm, GELU, GLU and sampling are
not counted. Peak: cores x clock x fp32 flops/cycle/core, with the clock from lscpu (max MHz, else
BogoMIPS / 2) and flops/cycle = SIMD lanes (16 with avx512f, 8 with avx2) x 2 (FMA) x 2 FMA units.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from sashimi import build_model  # noqa: E402
from sashimi.pipelines.fast_step import FastPathUnavailable, FastStepper  # noqa: E402
from sashimi.pipelines.sampling import sample  # noqa: E402


# ---------------------------------------------------------------------------------------- flops

def flops_per_sample(model) -> dict:
    """Flops per generated sample: matvecs (weighted by how often each level runs) and SSM updates."""
    backbone = model.backbone
    strides = [math.prod(backbone.pool[:i]) for i in range(len(backbone.pool) + 1)]
    matvec = 0.0
    ssm = 0.0

    def blocks_cost(blocks):
        macs, ssm_flops = 0, 0
        for block in blocks:
            for m in block.modules():
                if isinstance(m, torch.nn.Linear):
                    macs += m.in_features * m.out_features
            if block.stateful:
                kernel = block.layer.layer.kernel
                per_element = 16 + 12 * kernel.rank if hasattr(kernel, "rank") else 16
                ssm_flops += per_element * kernel.H * kernel.n
        return macs, ssm_flops

    levels = []
    for i in range(len(backbone.pool)):
        macs, s = blocks_cost(list(backbone.down_blocks[i]) + list(backbone.up_blocks[i]))
        pool_macs = backbone.down_pools[i].linear.weight.numel() + backbone.up_pools[i].linear.weight.numel()
        levels.append((f"level {i} (1/{strides[i]})", 2 * macs / strides[i] + 2 * pool_macs / strides[i + 1],
                       s / strides[i]))
    macs, s = blocks_cost(backbone.center_blocks)
    levels.append((f"centre (1/{strides[-1]})", 2 * macs / strides[-1], s / strides[-1]))
    head = 2 * model.head.weight.numel()
    for _, m, s in levels:
        matvec += m
        ssm += s
    return {"levels": levels, "head": head, "matvec": matvec + head, "ssm": ssm, "total": matvec + head + ssm}


def peak_gflops() -> tuple[float, str]:
    """(GFLOP/s, how) for fp32 from lscpu: cores x GHz x lanes x 2 (FMA) x 2 units."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    info = {}
    for line in out.splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            info[key.strip()] = value.strip()
    cores = os.cpu_count() or 1
    ghz, clock_how = None, ""
    if info.get("CPU max MHz"):
        ghz, clock_how = float(info["CPU max MHz"]) / 1000, "lscpu max MHz"
    elif info.get("BogoMIPS"):
        ghz, clock_how = float(info["BogoMIPS"]) / 2000, "lscpu BogoMIPS / 2"
    else:
        ghz, clock_how = 2.0, "clock unknown, 2 GHz assumed"
    flags = info.get("Flags", "")
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    per_cycle = lanes * 2 * 2
    peak = cores * ghz * per_cycle
    how = (f"{cores} cores x {ghz:.2f} GHz ({clock_how}) x {per_cycle} fp32 flops/cycle "
           f"({lanes} lanes x 2 FMA x 2 units)")
    return peak, how


# ---------------------------------------------------------------------------------------- timing

def time_fast(model, batch_size, steps, repeats):
    stepper = FastStepper(model, batch_size)
    first = torch.full((batch_size,), model.config.zero_level)
    gen = torch.Generator().manual_seed(0)
    stepper.generate(first, torch.rand(batch_size, min(steps, 256), generator=gen, dtype=torch.float64))  # warm up
    walls, cpus = [], []
    for _ in range(repeats):
        stepper.reset()
        u = torch.rand(batch_size, steps, generator=gen, dtype=torch.float64)
        wall, cpu = time.perf_counter(), time.process_time()
        stepper.generate(first, u)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return [batch_size * steps / w for w in walls], [batch_size * steps / c for c in cpus]


@torch.no_grad()
def time_eager(model, batch_size, steps, repeats):
    """The eager loop as sashimi.pipelines.generate runs it: one torch thread (a step is hundreds of tiny ops;
    more threads only add synchronisation, badly so on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _time_eager(model, batch_size, steps, repeats)
    finally:
        torch.set_num_threads(threads)


def _time_eager(model, batch_size, steps, repeats):
    gen = torch.Generator().manual_seed(0)
    walls, cpus = [], []
    for r in range(repeats + 1):  # the first run warms up
        state = model.default_state(batch_size)
        token = torch.full((batch_size,), model.config.zero_level)
        u = torch.rand(batch_size, steps, generator=gen, dtype=torch.float64)
        wall, cpu = time.perf_counter(), time.process_time()
        for t in range(steps if r else min(steps, 20)):
            logits, state = model.step(token, state)
            token, _ = sample(logits, u[:, t])
        if r:
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    return [batch_size * steps / w for w in walls], [batch_size * steps / c for c in cpus]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fast-steps", type=int, default=4000, help="steps per fast run (batch 1)")
    parser.add_argument("--eager-steps", type=int, default=300, help="steps per eager run")
    parser.add_argument("--init", default=None, help="S4 init override (default: the preset's; 'dplr-random' "
                        "builds sc09 in seconds instead of ~20 s; speed does not depend on it)")
    parser.add_argument("--no-eager", action="store_true")
    parser.add_argument("--quick", action="store_true", help="1000 fast / 100 eager steps, 3 repeats")
    parser.add_argument("--cases", nargs="+", default=["sc09-2layer:1", "sc09:1", "sc09:16"],
                        help="preset:batch pairs (e.g. tiny:1 for the demo's model)")
    args = parser.parse_args()
    if args.quick:
        args.fast_steps, args.eager_steps, args.repeats = 1000, 100, 3
    torch.set_num_threads(args.threads)
    peak, peak_how = peak_gflops()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} at start")
    print(f"peak fp32: {peak:.0f} GFLOP/s = {peak_how}\n")

    cases = []
    for case in args.cases:
        name, _, batch = case.partition(":")
        batch_size = int(batch or 1)
        cases.append((name, batch_size, args.fast_steps if name in ("tiny", "sc09-2layer") and batch_size == 1
                      else max(1, args.fast_steps // 2)))
    models, rows = {}, []
    for name, batch_size, fast_steps in cases:
        if name not in models:
            torch.manual_seed(0)
            t = time.perf_counter()
            overrides = {"init": args.init} if args.init else {}
            model = build_model(name, **overrides).eval()
            model.setup_step()
            models[name] = model
            flops = flops_per_sample(model)
            print(f"{name}: built in {time.perf_counter() - t:.1f} s; flops per generated sample: "
                  f"{flops['total'] / 1e6:.2f} M (matvec {flops['matvec'] / 1e6:.2f} M incl. head "
                  f"{flops['head'] / 1e3:.0f} k, SSM {flops['ssm'] / 1e6:.2f} M)")
            for label, m, s in flops["levels"]:
                print(f"    {label:18s} matvec {m / 1e6:6.3f} M   SSM {s / 1e6:6.3f} M")
        model = models[name]
        flops = flops_per_sample(model)["total"]
        paths = [] if args.no_eager else [("eager", time_eager, args.eager_steps)]
        paths.append(("fast", time_fast, fast_steps))
        for path, fn, steps in paths:
            try:
                rates, cpu_rates = fn(model, batch_size, steps, args.repeats)
            except FastPathUnavailable as e:
                print(f"  fast path unavailable: {e}")
                continue
            rate, cpu_rate = statistics.median(rates), statistics.median(cpu_rates)
            threads = 1 if path == "eager" else min(batch_size, torch.get_num_threads())
            rows.append((name, batch_size, path, steps, rate, rate / model.config.sample_rate, cpu_rate,
                         rate / cpu_rate, threads * cpu_rate, flops * rate / 1e9, 100 * flops * rate / 1e9 / peak))
            print(f"  {name} batch {batch_size} {path}: {rate:,.0f} samples/s (runs: "
                  f"{', '.join(f'{r:,.0f}' for r in rates)})")

    print("\n| model | batch | path | steps/run | samples/s (median) | real-time factor @16 kHz | "
          "samples per CPU-second | CPUs we got | idle-machine estimate | GFLOP/s | % of peak |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, batch_size, path, steps, rate, rtf, cpu_rate, cpus, idle, gflops, frac in rows:
        print(f"| {name} | {batch_size} | {path} | {steps} | {rate:,.0f} | {rtf:.2f}x | {cpu_rate:,.0f} | "
              f"{cpus:.2f} | {idle:,.0f} | {gflops:.1f} | {frac:.1f}% |")
    print("\n(samples per CPU-second counts the CPU time of all threads; 'CPUs we got' = wall rate / that;\n"
          " idle-machine estimate = samples per CPU-second x threads the path uses: what the run would give\n"
          " with its threads on otherwise idle cores; GFLOP/s and % of peak use the measured wall rate. On a\n"
          " shared machine the scheduler gives a process group a fair share of the CPUs whatever its thread count,\n"
          " so 'CPUs we got' can stay below 1 for a 2-thread run.)")
    by = {(r[0], r[1], r[2]): r[4] for r in rows}
    idle = {(r[0], r[1], r[2]): r[8] for r in rows}
    print()
    goals = ((("tiny", 1), 16000), (("sc09-2layer", 1), 16000), (("sc09", 1), 4000), (("sc09", 16), 32000))
    for (name, batch_size), goal in goals:
        if (name, batch_size) not in {(c[0], c[1]) for c in cases}:
            continue
        fast, eager = by.get((name, batch_size, "fast")), by.get((name, batch_size, "eager"))
        speedup = f", {fast / eager:.0f}x eager" if fast and eager else ""
        status = "n/a" if fast is None else ("met" if fast >= goal else "NOT met")
        estimate = idle.get((name, batch_size, "fast"))
        print(f"goal {name} batch {batch_size} >= {goal:,} samples/s: {status}"
              f"{f' ({fast:,.0f}{speedup}; idle-machine estimate {estimate:,.0f})' if fast else ''}")


if __name__ == "__main__":
    main()
