"""Train WaveFlow models for the same CPU-time budget on the same data, then report test LL (nats/sample).

    PYTHONPATH=$PWD python benchmarks/budget_waveflow.py --minutes 6 --models waveflow-h16-r64 waveflow-cpu \
        [--l0sg /path/to/L0SG-WaveFlow-checkout] --out /tmp/budget.json

Every model sees the same builtin clips at 22.05 kHz (random crops, the same seed), dequantised the
same way (uniform noise of one 16-bit step), log-mel features from sashimi.nn.mel, Adam at the same
learning rate; the test figure is the mean NLL over the same held-out crops with the same noise.
`--l0sg DIR` adds the public L0SG/WaveFlow model (h16-r64, its own modules) trained by the same loop
on the same batches. Runs go one after another in this process (`--threads` each); `--mel-error N`
also vocodes N held-out clips and reports the mean absolute log-mel error of the result.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sashimi.data.datasets import BuiltinDataset  # noqa: E402
from sashimi.models.waveflow import PRESETS, WaveFlow  # noqa: E402
from sashimi.nn.mel import LogMel  # noqa: E402

RATE = 22050


def clips(split: str, n: int, length: int, seed: int):
    """n crops of `length` samples from the builtin set's clips (1 s each at 22.05 kHz), deterministic."""
    data = BuiltinDataset(split, n_items=max(n, 64), sample_rate=RATE, sample_len=RATE, quantizer=None,
                          seed=0)
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        wav = data[int(torch.randint(len(data), (1,), generator=g))]["wav"]
        start = int(torch.randint(RATE - length + 1, (1,), generator=g))
        out.append(wav[start:start + length])
    x = torch.stack(out)
    return x + (torch.rand(x.shape, generator=g) - 0.5) * 2.0 ** -15


class L0SGAdapter(torch.nn.Module):
    """The L0SG/WaveFlow model behind our (x, mel) -> nll interface (imported from its checkout)."""

    def __init__(self, path: str):
        super().__init__()
        sys.path.insert(0, path)
        from models.waveflow import WaveFlow as L0SGWaveFlow  # type: ignore

        self.net = L0SGWaveFlow(1, 80, 64, 16, 8, 8, 1, bipartize=False)

    def nll(self, x, mel):
        out, logdet = self.net(x, mel)
        return (0.5 * (math.log(2 * math.pi) + out.pow(2)).sum() - logdet.sum()) / out.numel()


def nll_ours(model, x, mel):
    return -model.log_prob(x, mel).mean()


def train(name, model, nll, mel_fn, minutes, batch, length, lr, seed):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    train_data = BuiltinDataset("train", n_items=2000, sample_rate=RATE, sample_len=RATE, quantizer=None,
                                seed=0)
    # the budget is CPU time of this process (with --threads 1, the compute the run got), so runs made one
    # after another on a shared machine get the same work whatever the other load was; wall time is reported
    steps, losses, t0, wall0 = 0, [], time.process_time(), time.perf_counter()
    while time.process_time() - t0 < minutes * 60:
        idx = torch.randint(len(train_data), (batch,), generator=g)
        starts = torch.randint(RATE - length + 1, (batch,), generator=g)
        x = torch.stack([train_data[int(i)]["wav"][int(s):int(s) + length] for i, s in zip(idx, starts)])
        x = x + (torch.rand(x.shape, generator=g) - 0.5) * 2.0 ** -15
        loss = nll(model, x, mel_fn(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
        losses.append(loss.item())
    seconds, wall = time.process_time() - t0, time.perf_counter() - wall0
    print(f"{name}: {steps} steps in {seconds:.0f} CPU s ({wall:.0f} s wall, {seconds / max(steps, 1):.2f} CPU s/step), "
          f"last-10 train NLL {sum(losses[-10:]) / len(losses[-10:]):.3f}", flush=True)
    return {"steps": steps, "cpu_seconds": seconds, "wall_seconds": wall,
            "train_nll_last10": sum(losses[-10:]) / len(losses[-10:])}


@torch.no_grad()
def test_nll(model, nll, mel_fn, x_test):
    return float(sum(nll(model, x[None], mel_fn(x[None])) for x in x_test) / len(x_test))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=["waveflow-h16-r64"],
                   help="presets, optionally with integer changes: waveflow-s4-h16:residual_channels=88")
    p.add_argument("--l0sg", default=None, help="L0SG/WaveFlow checkout: add its h16-r64 model")
    p.add_argument("--minutes", type=float, default=5.0, help="CPU-time budget per model")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=4096, help="training crop, samples (a multiple of 256)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--test-clips", type=int, default=8)
    p.add_argument("--mel-error", type=int, default=0, help="vocode this many held-out clips (conditional models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    mel = LogMel(RATE)
    x_test = clips("test", args.test_clips, 16384, seed=123)
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_before": os.getloadavg(),
               "args": vars(args), "runs": {}}
    entries = [(m, None) for m in args.models] + ([("l0sg-h16-r64", args.l0sg)] if args.l0sg else [])
    for name, path in entries:
        torch.manual_seed(args.seed)
        if path is None:
            preset, _, changes = name.partition(":")  # e.g. waveflow-s4-h16:residual_channels=88
            config = PRESETS[preset].replace(**{k: int(v) for k, v in
                                                (c.split("=") for c in changes.split(",") if c)})
            model, nll = WaveFlow(config), nll_ours
            if not model.conditional:
                raise SystemExit(f"{name} is unconditional; this comparison trains vocoders")
        else:
            model = L0SGAdapter(path)
            nll = L0SGAdapter.nll
        n_params = sum(p.numel() for p in model.parameters())
        run = train(name, model, nll, mel, args.minutes, args.batch, args.length, args.lr, args.seed)
        run["params"] = n_params
        run["test_nll"] = test_nll(model, nll, mel, x_test)
        if args.mel_error and path is None:
            errors = []
            with torch.no_grad():
                for x in x_test[:args.mel_error]:
                    m = mel(x[None])
                    audio = model.sample(m, generator=torch.Generator().manual_seed(0))
                    errors.append(float((mel(audio.clamp(-1, 1)) - m[..., :audio.shape[1] // 256]).abs().mean()))
            run["mel_l1"] = sum(errors) / len(errors)
        print(f"{name}: test NLL {run['test_nll']:.4f} nats/sample ({n_params / 1e6:.2f}M params)"
              + (f", log-mel L1 {run['mel_l1']:.3f}" if "mel_l1" in run else ""), flush=True)
        results["runs"][name] = run
    results["load_after"] = os.getloadavg()
    print(json.dumps(results, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
