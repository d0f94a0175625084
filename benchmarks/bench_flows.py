"""Generation speed of the flow families: one step vs 24 Euler steps vs 200-step DDPM, side by side in one run.

Each case generates --batch clips of --seconds of audio at --rate Hz on --threads threads
(float32). The network's cost per evaluation is measured as the median of --repeats forward
passes of the whole batch (the models taking turns); a case's time is its number of network
evaluations times that median (the sampler's own arithmetic is negligible beside the network),
and cases of at most --full-evals evaluations are also run end to end through FlowPipeline (the
median of --repeats runs is printed beside it; --full-evals 200 runs every case end to end). The
sgemm rate of this machine is measured in the same run (a 2048^2 float32 matmul, median of 5, before and after the cases) and every
case's GFLOP/s is given as a fraction of it.

FLOPs per evaluation: torch.utils.flop_counter on one forward of one clip, times the batch (the
Linear layers: matmuls and addmm), plus the FFT convolutions, counted as 2.5 n log2 n per real
FFT of size n (two per S4 channel and batch element: rfft of the input and irfft of the product;
the kernel's rfft once per channel) and 6 flops per complex product. LayerNorm, GELU and the Cauchy kernel are not
counted. FLOPs per generated second = evaluations x FLOPs per evaluation / (batch x seconds).

    python benchmarks/bench_flows.py                       # the issue's cases (slow on a shared CPU)
    python benchmarks/bench_flows.py --quick               # a 0.25 s smoke run with tiny presets
    python benchmarks/bench_flows.py --mel-only            # one mel-space step plus WaveFlow vocoding
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sashimi.models import diffwave, rectified_flow  # noqa: E402
from sashimi.pipelines.flow_generate import FlowPipeline  # noqa: E402
from s4lib.fftconv import FFTConv  # noqa: E402
from _timing import sgemm_gflops  # noqa: E402  (benchmarks/_timing.py)


def fft_flops(model, batch: int, length: int) -> float:
    """FFT-convolution flops of one forward (see the module docstring); a bidirectional layer folds
    its two kernels into one of length 2L, so every FFT has size n = 2L."""
    total = 0.0
    for name, conv in model.named_modules():
        if not isinstance(conv, FFTConv):
            continue
        n = 2 * (length // _level_stride(model, name))
        fft = 2.5 * n * math.log2(n)
        H, C = conv.d_model, conv.channels
        total += batch * H * (fft + C * fft) + C * H * fft + batch * C * H * 6 * (n // 2 + 1)
    return total


def _level_stride(model, name: str) -> int:
    """Length divisor of the level an FFTConv sits at, from its module path (net.down.1..., net.center...)."""
    net = model.net
    parts = name.split(".")
    if "center" in parts:
        return net.stride
    for key in ("down", "up"):
        if key in parts:
            level = int(parts[parts.index(key) + 1])
            return math.prod(net.pool[:level])
    return 1


def network_flops(model, batch: int) -> dict:
    """Counted on one clip and scaled by the batch (every counted op acts per clip)."""
    from torch.utils.flop_counter import FlopCounterMode

    shape = model.noise_shape(1)
    cond = model.condition(labels=[0]) if model.config.condition == "label" else None
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.randn(shape), torch.rand(1), cond)
    return {"matmul": batch * float(counter.get_total_flops()), "fft": fft_flops(model, batch, shape[1])}


def time_forwards(models: dict, batch: int, repeats: int) -> dict:
    """Median seconds of one forward of each model, the models taking turns (round robin) so that
    the load of a shared machine falls on all of them alike."""
    inputs = {}
    for name, model in models.items():
        cond = model.condition(labels=[0] * batch) if model.config.condition == "label" else None
        inputs[name] = (torch.randn(model.noise_shape(batch)), torch.rand(batch), cond)
    times = {name: [] for name in models}
    with torch.no_grad():
        for name, model in models.items():  # warm-up (kernel backends prepared), on one clip
            x, t, cond = inputs[name]
            model(x[:1], t[:1], None if cond is None else cond[:1])
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(*inputs[name])
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def mel_case(batch: int, repeats: int, vocoder_preset: str = "waveflow-cpu") -> dict:
    """One Euler step of the mel-space flow plus WaveFlow vocoding, end to end through FlowPipeline
    (median of `repeats` runs), split into the flow network's call and the vocoder's inversion."""
    from sashimi.models.registry import build_model

    flow = rectified_flow.build("rf-mel").eval()
    c = flow.config
    vocoder = build_model(vocoder_preset, sample_rate=c.sample_rate, n_mels=c.n_mels, hop_length=c.hop_length,
                          n_fft=c.n_fft, win_length=c.n_fft).eval()
    pipe = FlowPipeline(flow, vocoder)
    pipe(1, labels=[0], steps=1)  # warm-up
    total, net = [], []
    cond = flow.condition(labels=[0] * batch)
    for _ in range(repeats):
        total.append(pipe(batch, labels=[0], steps=1, batch_size=batch).seconds)
        with torch.no_grad():
            start = time.perf_counter()
            flow(torch.randn(flow.noise_shape(batch)), torch.zeros(batch), cond)
            net.append(time.perf_counter() - start)
    seconds = statistics.median(total)
    audio = batch * c.frames * c.hop_length / c.sample_rate
    return {"case": f"rf-mel euler 1 + {vocoder_preset}", "params": sum(p.numel() for p in flow.parameters()),
            "vocoder_params": sum(p.numel() for p in vocoder.parameters()), "seconds": seconds,
            "network": statistics.median(net), "rtf": audio / seconds, "audio_seconds": audio}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--rate", type=int, default=16000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--full-evals", type=int, default=1,
                        help="run a case end to end when it needs at most this many network evaluations")
    parser.add_argument("--quick", action="store_true", help="tiny presets, 0.25 s at 8 kHz")
    parser.add_argument("--big", action="store_true", help="also the 23M-parameter SC09 U-Net (one step)")
    parser.add_argument("--mel", action="store_true",
                        help="also mel space: one step of rf-mel plus waveflow-cpu vocoding, end to end")
    parser.add_argument("--mel-only", action="store_true", help="only the mel-space case")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.quick:
        args.rate, args.seconds = 8000, 0.256
        rf_name, dw_name = "rf-tiny", "diffwave-tiny"
    else:
        rf_name, dw_name = "rf-wave-5m", "diffwave-wave-5m"
    length = int(args.rate * args.seconds)
    stride = 16
    length -= length % stride
    common = dict(sample_rate=args.rate, sample_len=length)
    rf_model = rectified_flow.build(rf_name, **common).eval()
    dw_model = diffwave.build(dw_name, **common).eval()
    models = {rf_name: rf_model, dw_name: dw_model}
    if args.big:
        models["rf-sc09"] = rectified_flow.build("rf-sc09", **common).eval()
    cases = [(rf_name, "euler", 1), (rf_name, "euler", 24), (dw_name, "ddpm", 200)]
    if args.big:
        cases.insert(1, ("rf-sc09", "euler", 1))

    if args.mel_only:
        peak_before = sgemm_gflops()
        m = mel_case(args.batch, args.repeats)
        peak_after = sgemm_gflops()
        load = os.getloadavg()
        print(f"# bench_flows --mel-only: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
              f"threads={args.threads}, batch={args.batch}, load {load[0]:.1f}/{load[1]:.1f}, "
              f"sgemm {peak_before:.1f} / {peak_after:.1f} GFLOP/s (before/after)")
        _print_mel(m)
        return 0
    peak_before = sgemm_gflops()
    mel = mel_case(args.batch, args.repeats) if args.mel else None
    per_eval = time_forwards(models, args.batch, args.repeats)
    flops = {name: network_flops(model, args.batch) for name, model in models.items()}
    rows = []
    for name, method, steps in cases:
        model = models[name]
        estimate = per_eval[name] * steps
        measured = None
        if steps <= args.full_evals:  # end to end through the pipeline, median of --repeats runs
            pipe = FlowPipeline(model)
            measured = statistics.median(
                pipe(args.batch, labels=[0], steps=steps, method=method, batch_size=args.batch, seed=r).seconds
                for r in range(args.repeats))
        seconds = estimate
        f = flops[name]
        per_eval_flops = f["matmul"] + f["fft"]
        rows.append({"case": f"{name} {method} {steps}", "params": sum(p.numel() for p in model.parameters()),
                     "evals": steps, "seconds": seconds, "measured": measured,
                     "rtf": args.batch * length / args.rate / seconds,
                     "flops_per_audio_second": steps * per_eval_flops / (args.batch * length / args.rate),
                     "gflops": per_eval_flops / per_eval[name] / 1e9})
    peak_after = sgemm_gflops()
    peak = statistics.median([peak_before, peak_after])

    load = os.getloadavg()
    print(f"# bench_flows: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, threads={args.threads}, "
          f"batch={args.batch}, {length} samples at {args.rate} Hz, load {load[0]:.1f}/{load[1]:.1f}, "
          f"sgemm {peak_before:.1f} / {peak_after:.1f} GFLOP/s (before/after)")
    for name in models:
        f = flops[name]
        print(f"#   {name}: {per_eval[name]:.3f} s per network evaluation (median of {args.repeats}); "
              f"{(f['matmul'] + f['fft']) / 1e9:.1f} GFLOP per evaluation ({f['fft'] / 1e9:.1f} in FFTs)")
    base = rows[0]["seconds"]
    print("| case | params | evaluations | seconds (evals x median) | end to end (measured) | real-time factor | "
          "vs one step | GFLOP per audio s | GFLOP/s | of sgemm |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['params'] / 1e6:.2f}M | {r['evals']} | {r['seconds']:.2f} | "
              f"{'-' if r['measured'] is None else format(r['measured'], '.2f')} | {r['rtf']:.3f} | {r['seconds'] / base:.1f}x | "
              f"{r['flops_per_audio_second'] / 1e9:.1f} | {r['gflops']:.1f} | {r['gflops'] / peak:.1%} |")
    if mel is not None:
        _print_mel(mel)
    return 0


def _print_mel(m: dict) -> None:
    print(f"| {m['case']} ({m['params'] / 1e6:.2f}M + {m['vocoder_params'] / 1e6:.2f}M vocoder) | end to end "
          f"{m['seconds']:.2f} s for {m['audio_seconds']:.2f} s of audio (median) | flow network {m['network']:.3f} s | "
          f"real-time factor {m['rtf']:.3f} |")


if __name__ == "__main__":
    raise SystemExit(main())
