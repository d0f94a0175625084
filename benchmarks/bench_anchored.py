"""Reflow pairs with guidance: plain CFG against Anchored Optimization, from the same seeds, on a trained model.

    python benchmarks/bench_anchored.py --model runs/rf1 --classifier runs/quality/classifier --n 96 --cfg 3

For each way of making pairs (w = 1; plain guidance at --cfg; anchored guidance at --cfg with the
pair generator's defaults) it prints: seconds per pair, network forward calls and backward passes per
batch of 16 pairs (a guided call on 2B counts once), the RMS distance of
the pair's endpoint from the w = 1 endpoint of the same noise (relative to the RMS of that endpoint),
and, with --classifier, how often the evaluation classifier names the pair's label and the
classifier-feature Frechet distance of the pairs against the builtin test split. The model must be
label-conditioned (trained with condition dropout, so that it has a null label).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sashimi.metrics import score  # noqa: E402
from sashimi.metrics.classifier import EvalClassifier  # noqa: E402
from sashimi.pipelines.flow_files import load_flow_model  # noqa: E402
from sashimi.pipelines.reflow import make_pairs  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a trained label-conditioned rectified-flow run or export")
    p.add_argument("--classifier", default=None, help="an evaluation classifier at the model's rate and clip length")
    p.add_argument("--n", type=int, default=96, help="pairs per case (default 96)")
    p.add_argument("--cfg", type=float, default=3.0, help="guidance scale of the guided cases (default 3)")
    p.add_argument("--steps", type=int, default=24, help="Euler steps per pair (default 24)")
    p.add_argument("--anchor-steps", type=int, default=5, help="Adam steps per Euler step, at most (default 5)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model = load_flow_model(args.model)[0]
    if model.config.n_classes <= 0:
        sys.exit(f"{args.model} is not label-conditioned; Anchored Optimization needs a guided model")
    labels = [i % model.config.n_classes for i in range(args.n)]
    common = dict(seed=args.seed, steps=args.steps, labels=labels)
    cases = [("w = 1 (the anchor)", dict(cfg=1.0)),
             (f"plain CFG, w = {args.cfg:g}", dict(cfg=args.cfg)),
             (f"anchored, w = {args.cfg:g}", dict(cfg=args.cfg, anchored=True, anchor_steps=args.anchor_steps))]
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    results, forwards = {}, {}
    for name, kw in cases:
        calls[0] = 0
        results[name] = make_pairs(model, args.n, **common, **kw)
        forwards[name] = calls[0]
    reference = results[cases[0][0]]["samples"]
    ref_rms = float(reference.square().mean().sqrt())
    cls = EvalClassifier.from_pretrained(args.classifier) if args.classifier else None

    print(f"# bench_anchored: {args.model}, n={args.n}, {args.steps} Euler steps, threads={args.threads}, "
          f"load {os.getloadavg()[0]:.1f}")
    batches = -(-args.n // 16)  # make_pairs' batch size
    print("| pairs | seconds per pair | network forwards per batch | backwards per batch "
          "| endpoint distance from w = 1 (relative RMS) | classifier names the label | FID vs builtin test |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, kw in cases:
        r = results[name]
        x = r["samples"]
        backwards = r["info"].get("anchor_iterations", 0) / batches  # one per Adam step on the null embedding
        dist = float((x - reference).square().mean().sqrt()) / ref_rms
        acc = fid = ""
        if cls is not None:
            wav = model.decode(x, None).float().reshape(args.n, -1)
            rate = model.config.sample_rate
            _, probs = cls.features_and_probabilities(wav, 64)
            acc = f"{float((probs.argmax(-1) == torch.tensor(labels)).float().mean()):.3f}"
            fid = f"{score(cls, 'builtin', (wav, rate), n_real=512)['fid']:.2f}"
        print(f"| {name} | {r['info']['seconds'] / args.n:.3f} | {forwards[name] / batches:.1f} | {backwards:.1f} "
              f"| {dist:.4f} | {acc} | {fid} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
