"""Benchmark of the kernel ops per backend: forward+backward time and peak memory, as a table.

    python benchmarks/bench_ops.py
    python benchmarks/bench_ops.py --backends chunked keops --repeats 5 --L-cauchy 4096

Cases (complex64 unless --dtype float64; S4-like inputs; torch.set_num_threads(--threads)):
  cauchy           r = cauchy(v, z, dt*Lambda), H x N/2 = 256 x 32, L = 8192 nodes
                   z = 2(1 - omega)/(1 + omega) at omega = exp(-i pi k / L); gradients of v and w
  log_vandermonde  K = log_vandermonde(v, dt*Lambda, L), 256 x 32, L = 16384; gradients of v and x

One step is the op's forward plus the backward of a fixed random upstream gradient. Each
(case, backend) runs in a fresh subprocess: a tiny step first (libraries load, PyKeOps compiles),
then one warm-up step at full size and --repeats timed steps. Reported: the median wall time of
a step and of its forward alone, the median process CPU time of a step (all threads; less
disturbed than wall time when other jobs share the machine), and the peak RSS increase: VmHWM
at the end minus VmRSS once the inputs exist, read from /proc/self/status (ru_maxrss is not used:
Linux carries it across exec from the parent process). Ratios compare with the naive backend in the same run. The load
average is printed, since a busy machine slows every backend.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ("cauchy", "log_vandermonde")


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def make_inputs(op: str, H: int, N: int, L: int, dtype):
    """S4D-Lin poles dt * Lambda with dt log-uniform in [1e-3, 1e-1]; random v; the cotangent."""
    import torch

    gen = torch.Generator().manual_seed(0)
    real = torch.float64 if dtype == torch.complex128 else torch.float32
    dt = torch.exp(math.log(1e-3) + math.log(100) * torch.rand(H, 1, generator=gen, dtype=torch.float64))
    Lambda = torch.complex(torch.full((H, N), -0.5, dtype=torch.float64),
                           math.pi * torch.arange(N, dtype=torch.float64).expand(H, N))
    poles = (dt * Lambda).to(dtype).requires_grad_()
    v = torch.randn(H, N, 2, generator=gen, dtype=torch.float64)
    v = torch.view_as_complex(v).to(dtype).requires_grad_()
    if op == "cauchy":
        omega = torch.exp(-1j * math.pi * torch.arange(L, dtype=torch.float64) / L)
        z = (2 * (1 - omega) / (1 + omega)).to(dtype)
        g = torch.view_as_complex(torch.randn(H, L, 2, generator=gen, dtype=torch.float64)).to(dtype)
        return (v, z, poles), (v, poles), g
    g = torch.randn(H, L, generator=gen, dtype=torch.float64).to(real)
    return (v, poles, L), (v, poles), g


def child(args) -> None:
    """Run one (op, backend) case in this process and print one JSON line."""
    import torch

    sys.path.insert(0, REPO)
    from s4lib import ops

    torch.set_num_threads(args.threads)
    ok, reason = ops.backend_status(args.backend)  # imports the backend (and pykeops) before the baseline
    if not ok:
        print(json.dumps({"error": reason}))
        return
    dtype = torch.complex64 if args.dtype == "float32" else torch.complex128
    L = args.L_cauchy if args.op == "cauchy" else args.L_vandermonde
    fn = getattr(ops, args.op)

    def step(inputs, wrt, g):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn(*inputs, backend=args.backend)
        t1 = time.perf_counter()
        torch.autograd.grad(out, wrt, g)
        return time.perf_counter() - t0, t1 - t0, time.process_time() - c0

    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to another backend is an error here
        step(*make_inputs(args.op, 2, args.N2, 16, dtype))  # loads libraries, compiles: not the op's memory
        case = make_inputs(args.op, args.H, args.N2, L, dtype)
        rss_before = status_kib("VmRSS")
        step(*case)  # warm-up
        runs = [step(*case) for _ in range(args.repeats)]
    print(json.dumps({
        "step": statistics.median(r[0] for r in runs),
        "forward": statistics.median(r[1] for r in runs),
        "cpu": statistics.median(r[2] for r in runs),
        "peak_mib": (status_kib("VmHWM") - rss_before) / 1024,
    }))


def run_case(args, op: str, backend: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--op", op, "--backend", backend,
           "--H", str(args.H), "--N2", str(args.N2), "--L-cauchy", str(args.L_cauchy),
           "--L-vandermonde", str(args.L_vandermonde), "--repeats", str(args.repeats),
           "--threads", str(args.threads), "--dtype", args.dtype]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE") if args.omp_passive else None
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {result.returncode}: {tail}"}
    return json.loads(lines[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=None,
                        help="backends to run (default: every available one; naive is always run for the ratios)")
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    parser.add_argument("--H", type=int, default=256, help="channels (batch of the op)")
    parser.add_argument("--N2", type=int, default=32, help="N/2, the number of conjugate pairs")
    parser.add_argument("--L-cauchy", type=int, default=8192, help="number of Cauchy nodes z")
    parser.add_argument("--L-vandermonde", type=int, default=16384, help="kernel length of log-Vandermonde")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per case (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--omp-passive", action="store_true",
                        help="run the cases with OMP_WAIT_POLICY=PASSIVE: on a machine busy with other jobs, "
                             "spinning OpenMP threads make every torch op cost a scheduler time slice")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--op", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return

    sys.path.insert(0, REPO)
    from s4lib import ops

    backends = args.backends or ops.available_backends()
    if "naive" not in backends:
        backends = ["naive"] + backends
    print(f"kernel ops, forward+backward, {args.dtype}, H={args.H}, N/2={args.N2}, threads={args.threads}, "
          f"{'OMP_WAIT_POLICY=PASSIVE, ' if args.omp_passive else ''}"
          f"median of {args.repeats} after 1 warm-up; load average before: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    header = (f"{'op':16s} {'L':>6s} {'backend':8s} {'fwd+bwd s':>10s} {'fwd s':>8s} {'cpu s':>8s} "
              f"{'peak MiB':>9s} {'x naive time':>13s} {'x naive mem':>12s}")
    print(header)
    print("-" * len(header))
    for op in args.ops:
        L = args.L_cauchy if op == "cauchy" else args.L_vandermonde
        results = {name: run_case(args, op, name) for name in backends}
        base = results.get("naive", {})
        for name, r in results.items():
            if "error" in r:
                print(f"{op:16s} {L:6d} {name:8s} error: {r['error']}")
                continue
            time_ratio = f"{r['step'] / base['step']:.3f}" if "step" in base else "-"
            mem_ratio = f"{r['peak_mib'] / base['peak_mib']:.3f}" if base.get("peak_mib") else "-"
            print(f"{op:16s} {L:6d} {name:8s} {r['step']:10.3f} {r['forward']:8.3f} {r['cpu']:8.3f} "
                  f"{r['peak_mib']:9.0f} {time_ratio:>13s} {mem_ratio:>12s}")
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
