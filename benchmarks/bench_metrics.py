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


def generate(model, n, seconds, temperature, top_p, seed, cache=None, key=""):
    """(audio (n, T), sample_rate, mean NLL of the samples in bits); reused from cache/key.pt when there."""
    from sashimi.pipelines.generate import Generator

    path = os.path.join(cache, key + ".pt") if cache else None
    if path and os.path.exists(path):
        saved = torch.load(path)
        return saved["audio"], saved["sample_rate"], saved["nll"]
    generator = Generator(model, batch_size=min(n, 32))
    result = generator.generate(n, seconds=seconds, temperature=temperature, top_p=top_p, seed=seed)
    out = result.audio, result.sample_rate, float(result.bits_per_sample.mean())
    if path:
        os.makedirs(cache, exist_ok=True)
        torch.save({"audio": out[0], "sample_rate": out[1], "nll": out[2]}, path)
    return out


def sample_and_score(model, classifier, real, n, seconds, temperature, top_p, seed, cache=None, key=""):
    t0 = time.time()
    audio, rate, nll = generate(model, n, seconds, temperature, top_p, seed, cache, key)
    if classifier is None:  # --generate-only
        return None
    s = score(classifier, real, (audio, rate))
    s["sample_nll_bits"] = nll
    s["seconds"] = round(time.time() - t0, 1)
    return s


def row(name, s, test_nll=None):
    nll = f"{s['sample_nll_bits']:.3f}" if "sample_nll_bits" in s else "-"
    test = f"{test_nll:.3f}" if test_nll is not None else "-"
    return (f"| {name} | {s['fid']:.2f} | {s['is']:.2f} | {s['mis']:.2f} | {s['am']:.3f} | "
            f"{s['ndb']}/{s['ndb_bins']} | {s['mel_fd']:.2f} | {nll} | {test} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifier", default=None, help="evaluation classifier folder (not needed with --generate-only)")
    parser.add_argument("--ckpt", nargs="*", default=[], help="checkpoint files or run folders")
    parser.add_argument("--n", type=int, default=128, help="generated clips per row (and real clips)")
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--settings", nargs="*", default=["1.0:1.0"], help="TEMPERATURE:TOP_P per row")
    parser.add_argument("--init-preset", default="tiny", help="also score this preset untrained ('' to skip)")
    parser.add_argument("--no-floor", dest="floor", action="store_false")
    parser.add_argument("--test-items", type=int, default=64, help="test clips for each checkpoint's test NLL")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--cache", default=None, metavar="DIR", help="keep generated sets here and reuse them")
    parser.add_argument("--generate-only", action="store_true", help="fill --cache, score nothing")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from sashimi.training.evaluate import evaluate
    from sashimi.models.autoregressive import build_model
    from sashimi.training.checkpoint import load_checkpoint, model_from_checkpoint, resolve_checkpoint

    n = args.n
    classifier = real = None
    if not args.generate_only:
        classifier = EvalClassifier.from_pretrained(args.classifier)
        real = load_clips("builtin:test", "real", classifier.config.sample_rate, classifier.config.clip_samples, [], n)
    rows, records = [], []
    print(f"| set ({n} clips each) | FID | IS | mIS | AM | NDB | mel FD | sample NLL | test NLL |")
    print("|---|---|---|---|---|---|---|---|---|")

    def report(name, s, test_nll=None):
        if s is None:
            print(f"generated: {name}", flush=True)
            return
        s["name"], s["test_nll_bits"] = name, test_nll
        records.append(s)
        rows.append(row(name, s, test_nll))
        print(rows[-1], flush=True)

    if args.floor and not args.generate_only:
        report("real train vs real test", score(classifier, real, "builtin:train", n_fake=n))
    if args.init_preset:
        torch.manual_seed(args.seed)
        model = build_model(args.init_preset)
        report(f"'{args.init_preset}' at initialisation, T=1", sample_and_score(
            model, classifier, real, n, args.seconds, 1.0, 1.0, args.seed, args.cache, f"init_{args.init_preset}_{n}"))
    for ckpt in args.ckpt:
        path = resolve_checkpoint(ckpt)
        state = load_checkpoint(path)
        model = model_from_checkpoint(state, use_ema=True, path=path)
        test_nll = None if args.generate_only else evaluate(
            path, "builtin", split="test", n_items=args.test_items, progress=False)["nll_bits_per_sample"]
        for setting in args.settings:
            temperature, top_p = (float(v) for v in setting.split(":"))
            key = f"{os.path.basename(path)}_{state.get('step')}_T{temperature:g}_p{top_p:g}_{n}"
            s = sample_and_score(model, classifier, real, n, args.seconds, temperature, top_p, args.seed, args.cache, key)
            if s is not None:
                s["step"], s["temperature"], s["top_p"] = state.get("step"), temperature, top_p
            report(f"{os.path.basename(path)} (step {state.get('step')}), T={temperature:g}, top-p={top_p:g}", s,
                   test_nll)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)


if __name__ == "__main__":
    main()
