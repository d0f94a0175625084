"""Raw kernel ops, forward+backward: the native backend against PyKeOps, chunked and naive.

    python benchmarks/bench_native.py                          # both cases, all backends
    python benchmarks/bench_native.py --backends native pykeops keops --repeats 7

Backends: s4lib's native, keops, chunked and naive, plus 'pykeops' (Cauchy only): plain PyKeOps the
way state-spaces/s4 calls it, float32, the baseline of the ">= 2x faster than PyKeOps" goal.

Cases (float32 / complex64, torch.set_num_threads(--threads), S4-like inputs):
  cauchy           H=256, N/2=32, L=8192:  r = cauchy(v, z, dt*Lambda); grads of v and w
  log_vandermonde  H=256, N/2=32, L=16384: K = log_vandermonde(v, dt*lambda, L); grads of v and x

Each (case, backend) runs in its own subprocess so that its peak RSS (ru_maxrss) is its own.
Times are wall-clock medians (and minima) over --repeats runs after one warm-up run (which also
compiles PyKeOps / loads the native kernels), plus the median process CPU time (all threads; on a
shared machine it is less disturbed by other jobs than wall time). Ratios compare median wall
times of backends within this run. A step is the op's forward and the backward of a fixed random
upstream gradient, nothing else.

Flop counts follow what the native kernels execute per (h, n, l) term, an FMA counted as 2 flops
and a division as 1: Cauchy forward 25, backward (v, w) 48; log-Vandermonde forward 4 (two FMAs),
backward 8 (the two moments, four FMAs); the per-block seeds and tables are O(H N L / 64) and not
counted. "% peak" divides the native rate by the machine's fp32 peak, estimated as
cores x clock x 16 lanes (AVX-512; 8 for AVX2) x 2 (FMA) x 2 (FMA units per core), with the clock
from /proc/cpuinfo; the float32 GEMM rate measured by torch.mm in the same run is shown as a
practical ceiling. The Cauchy kernels also need one division per term, whose throughput (not the
FMA ports) bounds them well below that peak.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = {
    "cauchy": dict(H=256, N=32, L=8192, flops_per_term=25 + 48),
    "log_vandermonde": dict(H=256, N=32, L=16384, flops_per_term=4 + 8),
}
BACKENDS = ("native", "keops", "pykeops", "chunked", "naive")

# 'pykeops' is not an s4lib backend: it is plain PyKeOps as state-spaces/s4 uses it (float32 Genred on
# the paired Cauchy formula, KeOps autodiff for the backward), the baseline of that goal.
# (s4lib's own 'keops' backend computes float32 in float64 with Kahan sums on CPU and writes its
# backward by hand.) It serves the Cauchy case only.
_PYKEOPS_CAUCHY = ("ComplexDivide(z * ComplexReal(v) - Real2Complex(Sum(v * w)), ComplexMult(z - w, z - Conj(w)))",
                   ["v = Vj(2)", "z = Vi(2)", "w = Vj(2)"])


def _plain_pykeops_cauchy():
    import contextlib
    import io

    import torch

    with contextlib.redirect_stdout(io.StringIO()):
        from pykeops.torch import Genred
    reduction = Genred(_PYKEOPS_CAUCHY[0], _PYKEOPS_CAUCHY[1], reduction_op="Sum", axis=1)

    def cauchy(v, z, w):
        r = reduction(torch.view_as_real(v), torch.view_as_real(z).unsqueeze(0), torch.view_as_real(w), backend="CPU")
        return torch.view_as_complex(2 * r)

    return cauchy


def _inputs(case, H, N, L):
    import torch

    g = torch.Generator().manual_seed(0)
    dt = torch.exp(torch.empty(H, 1).uniform_(math.log(1e-3), math.log(1e-1), generator=g))
    n = torch.arange(N, dtype=torch.float32)
    Lambda = torch.complex(-0.5 * torch.ones(N), math.pi * n)  # S4D-Lin poles
    v = torch.randn(H, N, dtype=torch.complex64, generator=g)
    if case == "cauchy":
        omega = torch.exp(-2j * math.pi * (torch.arange(L, dtype=torch.float64) + 0.5) / L)
        z = (2 * (1 - omega) / (1 + omega)).to(torch.complex64)  # bilinear nodes, no omega = -1
        w = (dt * Lambda).to(torch.complex64)
        return v, z, w
    x = (dt * Lambda).to(torch.complex64)
    return v, x


def run_case(case, backend, repeats, threads):
    import resource

    import torch

    from s4lib import ops

    torch.set_num_threads(threads)
    if backend == "pykeops":
        if case != "cauchy":
            return {"error": "plain PyKeOps baseline covers the Cauchy case only"}
        try:
            plain_cauchy = _plain_pykeops_cauchy()
        except Exception as e:
            return {"error": f"pykeops unavailable: {type(e).__name__}: {e}"}
    else:
        ok, reason = ops.backend_status(backend)
        if not ok:
            return {"error": reason}
    spec = CASES[case]
    H, N, L = spec["H"], spec["N"], spec["L"]
    tensors = _inputs(case, H, N, L)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    g = torch.Generator().manual_seed(1)
    if case == "cauchy":
        grad_out = torch.randn(H, L, dtype=torch.complex64, generator=g)
    else:
        grad_out = torch.randn(H, L, generator=g)

    def step():  # forward, then backward of a fixed upstream gradient: the ops and nothing else
        if case == "cauchy":
            v, z, w = (t.clone().requires_grad_(i != 1) for i, t in enumerate(tensors))
            out = plain_cauchy(v, z, w) if backend == "pykeops" else ops.cauchy(v, z, w, backend=backend)
        else:
            v, x = (t.clone().requires_grad_() for t in tensors)
            out = ops.log_vandermonde(v, x, L, backend=backend)
        out.backward(grad_out)

    from _timing import time_runs  # benchmarks/_timing.py (this script's folder is on sys.path)

    runs = time_runs(step, repeats, warmup=1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"median_s": runs.median_s, "min_s": runs.min_s, "cpu_s": runs.cpu_median_s,
            "peak_rss_gb": peak / 2**20, "base_rss_gb": base_rss / 2**20}


def machine_peak():
    """(estimated fp32 peak GFLOP/s, description)."""
    flags, mhz = [], None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1].split()
                if line.startswith("cpu MHz") and mhz is None:
                    mhz = float(line.split(":", 1)[1])
    except OSError:
        pass
    cores = os.cpu_count() or 1
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    ghz = (mhz or 2000.0) / 1000
    peak = cores * ghz * lanes * 2 * 2
    return peak, (f"{cores} cores x {ghz:.2f} GHz (/proc/cpuinfo) x {lanes} fp32 lanes x 2 (FMA) x 2 FMA units"
                  f" = {peak:.0f} GFLOP/s")


def measured_gemm(threads):
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * 2048**3 / best / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--run-case", nargs=2, metavar=("CASE", "BACKEND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_case:
        print(json.dumps(run_case(*args.run_case, args.repeats, args.threads)))
        return

    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    peak, peak_text = machine_peak()
    gemm = measured_gemm(args.threads)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"threads {args.threads}; load average {load}; fp32 peak estimate: {peak_text}; "
          f"measured torch.mm fp32: {gemm:.0f} GFLOP/s\n")
    print("| case | backend | median s | min s | CPU s | peak RSS GB | GFLOP/s | % peak | % gemm "
          "| x vs pykeops | x vs keops | x vs naive |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for case in args.cases:
        spec = CASES[case]
        flops = spec["flops_per_term"] * spec["H"] * spec["N"] * spec["L"]
        results = {}
        for backend in args.backends:
            cmd = [sys.executable, os.path.abspath(__file__), "--run-case", case, backend,
                   "--repeats", str(args.repeats), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = out.stdout.strip().splitlines()
            try:
                results[backend] = json.loads(lines[-1])
            except (IndexError, json.JSONDecodeError):
                results[backend] = {"error": (out.stderr.strip().splitlines() or ["crashed"])[-1][:120]}
        for backend, r in results.items():
            if "error" in r:
                print(f"| {case} | {backend} | - | - | - | - | - | - | - | - | - | - |  ({r['error']})")
                continue
            rate = flops / r["median_s"] / 1e9
            ratio = lambda other: (f"{results[other]['median_s'] / r['median_s']:.1f}"  # noqa: E731
                                   if other in results and "error" not in results[other] else "-")
            print(f"| {case} | {backend} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['cpu_s']:.3f} | {r['peak_rss_gb']:.2f} | "
                  f"{rate:.1f} | {100 * rate / peak:.1f} | {100 * rate / gemm:.1f} | {ratio('pykeops')} | "
                  f"{ratio('keops')} | {ratio('naive')} |")
        print(f"|  | flops ({case}, fwd+bwd) | {flops / 1e9:.2f} G |  |  |  |  |  |  |  |  |  |")


if __name__ == "__main__":
    main()
