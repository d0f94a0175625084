"""FFTConv forward+backward: time and peak memory per kernel backend, for S4 (DPLR) and S4D.

    python benchmarks/bench_layer.py                      # H=256, N=64, L in {4096, 16384}, all backends
    python benchmarks/bench_layer.py --L 4096 --backends chunked native --repeats 5

Each case runs in a fresh subprocess so that its peak RSS (ru_maxrss) is its own. Times are
medians over --repeats runs after one warm-up run; the ratio column compares with the first
backend listed for the same (mode, L) in this run. The table is markdown, ready for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def run_case(mode, backend, B, H, N, L, repeats, threads):
    import resource

    import torch

    import s4lib

    torch.set_num_threads(threads)
    ok, reason = s4lib.ops.backend_status(backend)
    if not ok:  # never time a silent fallback under the wrong name
        raise SystemExit(f"backend {backend} unavailable: {reason}")
    torch.manual_seed(0)
    layer = s4lib.FFTConv(H, d_state=N, mode=mode, backend=backend, transposed=True)
    x = torch.randn(B, H, L, requires_grad=True)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        y, _ = layer(x)
        y.sum().backward()
        times.append(time.perf_counter() - t0)
        layer.zero_grad(set_to_none=True)
        x.grad = None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"median_s": statistics.median(times[1:]), "min_s": min(times[1:]),
            "peak_rss_gb": peak / 2**20, "base_rss_gb": base_rss / 2**20}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", nargs="+", default=["dplr", "diag"])
    parser.add_argument("--backends", nargs="+", default=["naive", "chunked", "keops", "native"])
    parser.add_argument("--L", nargs="+", type=int, default=[4096, 16384])
    parser.add_argument("--B", type=int, default=1)
    parser.add_argument("--H", type=int, default=256)
    parser.add_argument("--N", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case:  # child process
        mode, backend, L = args.case.split(",")
        print(json.dumps(run_case(mode, backend, args.B, args.H, args.N, int(L), args.repeats, args.threads)))
        return

    print(f"FFTConv forward+backward, B={args.B}, H={args.H}, N={args.N}, float32, {args.threads} threads, "
          f"median of {args.repeats}\n")
    print("| model | L | backend | time (s) | peak RSS (GB) | time ratio | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for mode in args.modes:
        for L in args.L:
            baseline = None
            for backend in args.backends:
                cmd = [sys.executable, __file__, "--case", f"{mode},{backend},{L}", "--B", str(args.B),
                       "--H", str(args.H), "--N", str(args.N), "--repeats", str(args.repeats),
                       "--threads", str(args.threads)]
                try:
                    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                    result = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
                    note = "" if result else out.stderr.strip().splitlines()[-1][:80]
                except subprocess.TimeoutExpired:
                    result, note = None, f"timeout > {args.timeout:.0f}s"
                name = "S4 (dplr)" if mode == "dplr" else "S4D (diag)"
                if result is None:
                    print(f"| {name} | {L} | {backend} | failed: {note} | | | |")
                    continue
                baseline = baseline or result
                print(f"| {name} | {L} | {backend} | {result['median_s']:.3f} | {result['peak_rss_gb']:.2f} | "
                      f"{baseline['median_s'] / result['median_s']:.1f}x | "
                      f"{baseline['peak_rss_gb'] / result['peak_rss_gb']:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
