"""Side-by-side with the reference implementation (state-spaces/s4): accuracy and speed on the same weights.

    python benchmarks/compare_reference.py --ref-file /path/to/state-spaces/s4/models/s4/s4.py

Nothing of the reference is shipped with s4lib: point --ref-file at your own checkout's
models/s4/s4.py. Its imports need einops; pytorch_lightning is only used there for a logging
decorator, so if it is missing a stand-in is put on sys.path for this run.

Prints three tables:
1. conv-mode outputs of the reference (float32) and of s4lib (float32), both against s4lib in
   float64 on the same weights (loaded with s4lib.compat.load_state_spaces);
2. FFTConv forward+backward time, reference (naive path; its PyKeOps path crashes on CPU) vs s4lib;
3. recurrent steps per second and max |step - conv| for each step mode.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time

import torch

from _timing import time_runs  # benchmarks/_timing.py


def import_reference(path):
    try:
        import pytorch_lightning  # noqa: F401
    except ImportError:
        shim = tempfile.mkdtemp()
        os.makedirs(os.path.join(shim, "pytorch_lightning"))
        open(os.path.join(shim, "pytorch_lightning", "__init__.py"), "w").close()
        with open(os.path.join(shim, "pytorch_lightning", "utilities.py"), "w") as f:
            f.write("def rank_zero_only(fn):\n    return fn\n")
        sys.path.insert(0, shim)
    spec = importlib.util.spec_from_file_location("reference_s4", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(fn, repeats):
    return time_runs(fn, repeats).median_s


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ref-file", required=True)
    parser.add_argument("--H", type=int, default=64)
    parser.add_argument("--N", type=int, default=64)
    parser.add_argument("--L", nargs="+", type=int, default=[1024, 4096])
    parser.add_argument("--step-L", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ref_s4 = import_reference(args.ref_file)
    import s4lib
    from s4lib.compat import load_state_spaces

    def pair(mode, seed=0):
        torch.manual_seed(seed)
        ref = ref_s4.S4Block(args.H, mode=mode, d_state=args.N, transposed=True, verbose=False, backend="naive")
        mine = s4lib.S4Block(args.H, mode=mode, d_state=args.N)
        load_state_spaces(mine, ref.state_dict())
        return ref.eval(), mine.eval()

    print("1. Accuracy on the same weights (max abs error against s4lib float64)\n")
    print("| model | L | max abs y | reference float32 | s4lib float32 |")
    print("|---|---|---|---|---|")
    for mode in ("dplr", "diag"):
        for L in args.L:
            ref, mine = pair(mode)
            weights = {k: v.clone() for k, v in ref.state_dict().items()}
            x = torch.randn(2, args.H, L)
            with torch.no_grad():
                y_ref, _ = ref(x)
                y, _ = mine(x)
                truth = s4lib.S4Block(args.H, mode=mode, d_state=args.N).double().eval()
                load_state_spaces(truth, weights)
                y64, _ = truth(x.double())
            print(f"| {mode} | {L} | {y64.abs().max():.2f} | {(y_ref.double() - y64).abs().max():.1e} | "
                  f"{(y.double() - y64).abs().max():.1e} |", flush=True)

    print(f"\n2. FFTConv forward+backward, B=1, H={args.H}, N={args.N}, median of {args.repeats}\n")
    print("| model | L | reference (s) | s4lib (s) | speed-up |")
    print("|---|---|---|---|---|")
    for mode in ("dplr", "diag"):
        for L in args.L:
            ref, mine = pair(mode)
            ref.train(), mine.train()
            x = torch.randn(1, args.H, L)

            def run(model):
                def go():
                    y, _ = model(x)
                    y.sum().backward()
                return go
            t_ref, t_mine = timed(run(ref), args.repeats), timed(run(mine), args.repeats)
            print(f"| {mode} | {L} | {t_ref:.3f} | {t_mine:.3f} | {t_ref / t_mine:.1f}x |", flush=True)

    print(f"\n3. Recurrent mode, B=1, H={args.H}, N={args.N}, {args.step_L} steps\n")
    print("| model | implementation | step mode | steps/s | max abs (step - conv) / max abs y |")
    print("|---|---|---|---|---|")
    for mode in ("dplr", "diag"):
        ref, mine = pair(mode)
        x = torch.randn(1, args.H, args.step_L)
        with torch.no_grad():
            y_ref, _ = ref(x)
            y_mine, _ = mine(x)
        variants = [("reference", ref, m, y_ref) for m in (["dense", "linear", "diagonal"] if mode == "dplr" else [None])]
        variants += [("s4lib", mine, m, y_mine) for m in (["linear", "dense"] if mode == "dplr" else ["linear"])]
        for name, model, step_mode, y in variants:
            with torch.no_grad():
                model.setup_step(**({"mode": step_mode} if step_mode else {}))
                state = model.default_state(1)
                outs = []
                t0 = time.perf_counter()
                for t in range(args.step_L):
                    y_t, state = model.step(x[..., t], state)
                    outs.append(y_t)
                elapsed = time.perf_counter() - t0
            err = (torch.stack(outs, -1) - y).abs().max() / y.abs().max()
            print(f"| {mode} | {name} | {step_mode or 'default'} | {args.step_L / elapsed:,.0f} | {err:.1e} |", flush=True)


if __name__ == "__main__":
    main()
