"""Sample-quality table: real-vs-real floor, an untrained model, and trained checkpoints at several sampling settings.

    python benchmarks/bench_metrics.py --classifier runs/classifier --ckpt runs/tiny/best.pt runs/tiny/step_1000.pt \
        --n 128 --settings 1.0:1.0 0.95:1.0 1.0:0.95 --json metrics_table.json

For every row it prints FID, IS, mIS, AM, NDB and mel FD against the builtin test split (the
same number of real clips as generated ones, so FIDs are comparable within the table), and for
models the NLL of their own samples next to their test NLL. Settings are TEMPERATURE:TOP_P.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from sashimi.metrics import EvalClassifier, score
from sashimi.metrics.score import load_clips


def sample_and_score(model, classifier, real, n, seconds, temperature, top_p, seed):
    from sashimi.generate import Generator

    t0 = time.time()
    generator = Generator(model, batch_size=min(n, 32))
    result = generator.generate(n, seconds=seconds, temperature=temperature, top_p=top_p, seed=seed)
    s = score(classifier, real, result)
    s["sample_nll_bits"] = float(result.bits_per_sample.mean())
    s["seconds_generating"] = round(time.time() - t0, 1)
    return s


def row(name, s, test_nll=None):
    nll = f"{s['sample_nll_bits']:.3f}" if "sample_nll_bits" in s else "-"
    test = f"{test_nll:.3f}" if test_nll is not None else "-"
    return (f"| {name} | {s['fid']:.2f} | {s['is']:.2f} | {s['mis']:.2f} | {s['am']:.3f} | "
            f"{s['ndb']}/{s['ndb_bins']} | {s['mel_fd']:.2f} | {nll} | {test} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifier", required=True)
    parser.add_argument("--ckpt", nargs="*", default=[], help="checkpoint files or run folders")
    parser.add_argument("--n", type=int, default=128, help="generated clips per row (and real clips)")
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--settings", nargs="*", default=["1.0:1.0"], help="TEMPERATURE:TOP_P per row")
    parser.add_argument("--init-preset", default="tiny", help="also score this preset untrained ('' to skip)")
    parser.add_argument("--no-floor", dest="floor", action="store_false")
    parser.add_argument("--test-items", type=int, default=64, help="test clips for each checkpoint's test NLL")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from sashimi.evaluate import evaluate
    from sashimi.model import build_model
    from sashimi.train import load_checkpoint, model_from_checkpoint, resolve_checkpoint

    classifier = EvalClassifier.from_pretrained(args.classifier)
    n = args.n
    real = load_clips("builtin:test", "real", classifier.config.sample_rate, classifier.config.clip_samples, [], n)
    rows, records = [], []
    print(f"| set ({n} clips each) | FID | IS | mIS | AM | NDB | mel FD | sample NLL | test NLL |")
    print("|---|---|---|---|---|---|---|---|---|")

    def report(name, s, test_nll=None):
        s["name"], s["test_nll_bits"] = name, test_nll
        records.append(s)
        rows.append(row(name, s, test_nll))
        print(rows[-1], flush=True)

    if args.floor:
        report("real train vs real test", score(classifier, real, "builtin:train", n_fake=n))
    if args.init_preset:
        torch.manual_seed(args.seed)
        model = build_model(args.init_preset)
        report(f"'{args.init_preset}' at initialisation, T=1", sample_and_score(
            model, classifier, real, n, args.seconds, 1.0, 1.0, args.seed))
    for ckpt in args.ckpt:
        path = resolve_checkpoint(ckpt)
        state = load_checkpoint(path)
        model = model_from_checkpoint(state, use_ema=True, path=path)
        test_nll = evaluate(path, "builtin", split="test", n_items=args.test_items, progress=False)["nll_bits_per_sample"]
        for setting in args.settings:
            temperature, top_p = (float(v) for v in setting.split(":"))
            s = sample_and_score(model, classifier, real, n, args.seconds, temperature, top_p, args.seed)
            s["step"], s["temperature"], s["top_p"] = state.get("step"), temperature, top_p
            report(f"{os.path.basename(path)} (step {state.get('step')}), T={temperature:g}, top-p={top_p:g}", s,
                   test_nll)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)


if __name__ == "__main__":
    main()
