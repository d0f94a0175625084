"""`sashimi metrics train-classifier` and `sashimi metrics score`: the flags and their wiring only.

    sashimi metrics train-classifier --data builtin --out runs/classifier
    sashimi metrics score --classifier runs/classifier --real builtin --fake runs/tiny/samples --json scores.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["add_arguments", "run", "format_scores"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="metrics_command", required=True, metavar="SUBCOMMAND")
    train = sub.add_parser("train-classifier", help="train the evaluation classifier on labelled audio",
                           description="Train the log-mel CNN evaluation classifier; prints and stores the held-out "
                                       "(test split) accuracy in OUT/config.json beside OUT/model.safetensors.")
    train.add_argument("--data", required=True,
                       help="'builtin' or a folder with one sub-folder of audio files per class (SC09 layout)")
    train.add_argument("--out", required=True, metavar="CLS", help="folder to write the classifier to")
    train.add_argument("--epochs", type=int, default=4, help="training epochs (default: 4)")
    train.add_argument("--n-train", type=int, default=None,
                       help="training clips (default: 3000 for builtin, every clip of a folder's train split)")
    train.add_argument("--sample-rate", type=int, default=16000, help="rate the classifier works at (default: 16000)")
    train.add_argument("--clip-seconds", type=float, default=1.0, help="clip length it sees (default: 1)")
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")

    score = sub.add_parser("score", help="FID, IS, mIS, AM, NDB and mel FD of generated audio against real audio",
                           description="Score a folder of generated clips against real clips with an evaluation "
                                       "classifier. Lower is better for FID, AM, NDB and mel FD; higher for IS and mIS.")
    score.add_argument("--classifier", required=True, metavar="CLS", help="folder written by train-classifier")
    score.add_argument("--real", required=True, help="folder of real audio, 'builtin' (test split) or 'builtin:SPLIT'")
    score.add_argument("--fake", required=True, help="folder of generated audio (e.g. a `sashimi generate` folder)")
    score.add_argument("--n-real", type=int, default=None, help="use at most N real clips (builtin default: 500)")
    score.add_argument("--ndb-bins", type=int, default=None, help="k-means bins for NDB (default: n_real/25, 2..20)")
    score.add_argument("--seed", type=int, default=0, help="seed of NDB's k-means")
    score.add_argument("--json", default=None, metavar="FILE", help="also write the scores to this JSON file")


def format_scores(s: dict) -> str:
    """A few lines a person reads: the generated set's scores, and the real set's IS for scale."""
    lines = [f"{s['n_fake']} generated vs {s['n_real']} real clips ({s['clip_seconds']:g} s at {s['sample_rate']} Hz)",
             f"  FID     {s['fid']:10.4f}   (lower is better; 0 = same feature statistics)",
             f"  IS      {s['is']:10.4f}   (higher is better; real set: {s['real_is']:.4f})",
             f"  mIS     {s['mis']:10.4f}   (higher is better; real set: {s['real_mis']:.4f})",
             f"  AM      {s['am']:10.4f}   (lower is better; nats)",
             f"  NDB     {s['ndb']:4d} / {s['ndb_bins']:<3d}   (lower is better; bins differing at p < 0.05)",
             f"  mel FD  {s['mel_fd']:10.4f}   (lower is better; log-mel frame statistics, no classifier)"]
    return "\n".join(lines + [f"note: {n}" for n in s["notes"]])


def _run_train(args) -> int:
    from .training import train_classifier

    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    if not args.clip_seconds > 0:
        raise ValueError(f"--clip-seconds must be > 0, got {args.clip_seconds}")
    result = train_classifier(args.data, args.out, sample_rate=args.sample_rate,
                              clip_samples=int(round(args.clip_seconds * args.sample_rate)), epochs=args.epochs,
                              batch_size=args.batch_size, lr=args.lr, n_train=args.n_train, seed=args.seed,
                              threads=args.threads)
    print(f"held-out accuracy: {result['test_accuracy']:.4f} ({result['n_test']} test clips); classifier in {args.out}")
    return 0


def _run_score(args) -> int:
    from .score import score

    scores = score(args.classifier, args.real, args.fake, n_real=args.n_real, ndb_bins=args.ndb_bins, seed=args.seed)
    print(format_scores(scores))
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(folder, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(scores, f, indent=2)
            f.write("\n")
        print(f"scores written to {args.json}")
    return 0


def run(args: argparse.Namespace) -> int:
    command = {"train-classifier": _run_train, "score": _run_score}[args.metrics_command]
    try:
        return command(args)
    except (ValueError, FileNotFoundError) as e:  # flags, data folders, classifier folders: a message
        print(f"sashimi metrics {args.metrics_command}: error: {e}", file=sys.stderr)
        return 1
