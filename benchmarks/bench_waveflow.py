"""WaveFlow speed: vocoding (batch 1 and 8) and a training step, against an sgemm timed in the same run.

    PYTHONPATH=$PWD python benchmarks/bench_waveflow.py --presets waveflow-h16-r64 waveflow-cpu \
        --threads 2 [--train-warmup --train-repeats 3] [--l0sg /path/to/L0SG-WaveFlow-checkout]

Prints, per preset and mode: median and best wall time, samples/s, real-time factor at the model's
rate, FLOP per sample (sashimi.nn.waveflow_fast.inverse_flops_per_sample: for our vocoding rows the
products the fast inverse runs, folded=True; for L0SG's rows and for training, where a step counts 3x
the forward, the network as defined), achieved GFLOP/s and its percentage of a 2048^3 float32 matmul timed at the start and
the end of the run, and the load average. On a shared machine the CPU-time columns (best run's
process CPU time; meaningful with --threads 1, where no thread spins waiting for another) estimate
what one uncontended core does. With --l0sg, the public L0SG/WaveFlow h16-r64 model runs
the same modes beside ours (reverse_fast with weight norm removed and conditioning fused, as its
own synthesis script does); its inversion drops the last 768 samples of the condition, so its
samples/s counts what it produced.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sashimi.models.waveflow import PRESETS, WaveFlow  # noqa: E402
from sashimi.nn.waveflow_fast import inverse_flops_per_sample  # noqa: E402
from sashimi.objectives.waveflow import waveflow_objective  # noqa: E402
from _timing import sgemm_rates, time_runs  # noqa: E402  (benchmarks/_timing.py)


def timed(fn, repeats: int, warmup: bool = True):
    """(median wall s, best wall s, best CPU s of this process, last output); the warm-up call builds
    kernel spectra and fills the allocator."""
    runs = time_runs(fn, repeats, warmup=int(warmup))
    return runs.median_s, runs.min_s, runs.cpu_min_s, runs.result


def perturbed(model):
    """Weights moved off the init (a new model is the identity: same work, but unrealistic values)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


def row(label, mode, timing, samples, rate, flop_per_sample, sgemm):
    med, best, cpu = timing
    sps = samples / med
    gflops = flop_per_sample * sps / 1e9
    cpu_gflops = flop_per_sample * samples / cpu / 1e9
    print(f"| {label} | {mode} | {med:.3f} | {best:.3f} | {sps:,.0f} | {sps / rate:.3f} | "
          f"{flop_per_sample / 1e6:.2f} | {gflops:.1f} | {100 * gflops / sgemm[0]:.0f} % | {cpu:.3f} | "
          f"{samples / cpu / rate:.3f} | {100 * cpu_gflops / sgemm[1]:.0f} % |", flush=True)


def bench_ours(name, modes, seconds, repeats, train_repeats, train_warmup, sgemm):
    config = PRESETS[name]
    model = perturbed(WaveFlow(config))
    rate, hop = config.sample_rate, config.hop_length
    flops = inverse_flops_per_sample(config, folded=True)  # what the fast inverse computes
    train_flops = 3 * inverse_flops_per_sample(config)
    frames = max(1, int(seconds * rate / hop))
    for mode in modes:
        if mode.startswith("vocode"):
            batch = int(mode[len("vocode"):] or 1)
            n = frames * hop // config.h * config.h
            mel = torch.randn(batch, config.n_mels, frames) - 5
            z = torch.randn(batch, n)
            *timing, _ = timed(lambda: model.inverse(z, mel), repeats)
            row(name, f"vocode batch {batch}", timing, batch * n, rate, flops, sgemm)
        elif mode == "train":
            model.train()
            wav = 0.3 * torch.randn(1, 16000)

            def step():
                loss_sum, count, _ = waveflow_objective(model, {"wav": wav})
                (loss_sum / count).backward()
                model.zero_grad(set_to_none=True)

            *timing, _ = timed(step, train_repeats, warmup=train_warmup)
            row(name, "train fwd+bwd batch 1", timing, 15872, rate, train_flops, sgemm)
            model.eval()


def bench_l0sg(path, modes, seconds, repeats, train_repeats, train_warmup, sgemm):
    sys.path.insert(0, path)
    from models.waveflow import WaveFlow as L0SGWaveFlow  # type: ignore

    config = PRESETS["waveflow-h16-r64"]
    flops = inverse_flops_per_sample(config)
    rate, hop = config.sample_rate, config.hop_length
    frames = max(4, int(seconds * rate / hop))
    for mode in modes:
        torch.manual_seed(0)
        model = perturbed(L0SGWaveFlow(1, 80, 64, 16, 8, 8, 1, bipartize=False))
        if mode.startswith("vocode"):
            batch = int(mode[len("vocode"):] or 1)
            model.remove_weight_norm()
            model.fuse_conditioning_layers()
            mel = torch.randn(batch, 80, frames) - 5
            with torch.no_grad():
                *timing, audio = timed(lambda: model.reverse_fast(mel, 1.0), repeats)
            row("L0SG h16-r64", f"vocode batch {batch}", timing, audio.numel(), rate, flops, sgemm)
        elif mode == "train":
            model.train()
            x, mel = 0.3 * torch.randn(1, 15872), torch.randn(1, 80, 62) - 5

            def step():
                out, logdet = model(x, mel)
                loss = (0.5 * out.pow(2).sum() - logdet.sum()) / out.numel()
                loss.backward()
                model.zero_grad(set_to_none=True)

            *timing, _ = timed(step, train_repeats, warmup=train_warmup)
            row("L0SG h16-r64", "train fwd+bwd batch 1", timing, 15872, rate, 3 * flops, sgemm)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["waveflow-h16-r64", "waveflow-cpu"])
    p.add_argument("--modes", nargs="+", default=["vocode1", "vocode8", "train"],
                   help="vocodeB (batch B) and/or train")
    p.add_argument("--seconds", type=float, default=1.0, help="audio per vocoded clip")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-repeats", type=int, default=1, help="timed training steps (the median is reported)")
    p.add_argument("--train-warmup", action="store_true",
                   help="one untimed training step first (fills the allocator and the fused path's kept buffers)")
    p.add_argument("--l0sg", default=None, help="L0SG/WaveFlow checkout to run beside ours")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load = os.getloadavg()
    sgemm = sgemm_rates()
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, {args.threads} threads, "
          f"load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; sgemm 2048^3 at start: {sgemm[0]:.1f} GFLOP/s wall, "
          f"{sgemm[1]:.1f} GFLOP per CPU-s")
    print("| model | mode | median s | best s | samples/s | x real time | MFLOP/sample | GFLOP/s | of sgemm "
          "| best CPU s | x real time per CPU-s | of sgemm per CPU-s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.presets:
        bench_ours(name, args.modes, args.seconds, args.repeats, args.train_repeats, args.train_warmup, sgemm)
    if args.l0sg:
        bench_l0sg(args.l0sg, args.modes, args.seconds, args.repeats, args.train_repeats, args.train_warmup, sgemm)
    end = sgemm_rates()
    load = os.getloadavg()
    print(f"sgemm at end: {end[0]:.1f} GFLOP/s wall, {end[1]:.1f} GFLOP per CPU-s; load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"(percentages above use the start figure)")


if __name__ == "__main__":
    main()
