"""Command-line wiring of the rectified-flow stages after 1-RF: reflow (pairs, then 2-RF) and distill.

    sashimi train --preset rf-tiny --data builtin --out runs/rf1 --max-time 10m              # 1-RF
    sashimi reflow --model runs/rf1 --pairs-out runs/pairs --pairs 256 --out runs/rf2 --max-steps 300
    sashimi distill --model runs/rf2 --pairs runs/pairs --out runs/rf1step --max-steps 200
    sashimi generate --ckpt runs/rf1step --steps 1 --label 7 --n 8

Both train through the shared loop (sashimi.training.loop: `init_from` the previous stage's
weights, `stage` '2-rf' / 'distilled', `data` the pair folder), so every training flag of
`sashimi train` applies, and `--resume` continues either run (`sashimi train --out RUN --resume`
too). Each command ends with one JSON line: straightness S before and after (DESIGN §7), the
training summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["COMMANDS", "straightness_report"]

# training flags a stage fixes itself
_FIXED = ("data", "preset", "init_from", "stage")


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text}")
    return value


def _train_arguments(p):
    from .cli import add_train_arguments

    add_train_arguments(p, exclude=_FIXED)


def _train(args, data: str, init_from: str, stage: str) -> dict:
    from .cli import _saved_train_config
    from .training.loop import TrainConfig, train

    given = {k: v for k, v in vars(args).items() if k in {f.name for f in TrainConfig.__dataclass_fields__.values()}}
    base = _saved_train_config(given.get("out", TrainConfig.out)) if given.get("resume") else {}
    cfg = TrainConfig.from_dict({**base, **given, "data": data, "init_from": init_from, "stage": stage})
    return train(cfg)


def straightness_report(model, n: int = 16, steps: int = 24, seed: int = 1234) -> dict:
    """Straightness S of a flow along its own Euler trajectories from n fixed noises (conditions cycled)."""
    import torch

    from .pipelines.flow_sampling import straightness

    model.eval()
    noise = torch.randn(model.noise_shape(n), generator=torch.Generator().manual_seed(seed))
    cond = None
    if model.config.condition == "label":
        cond = model.condition(labels=[i % model.config.n_classes for i in range(n)])
    elif model.config.condition == "text":
        from .data.builtin_synth import BUILTIN_CLASSES, BUILTIN_TIMBRES
        from .data.flow_data import builtin_caption

        cond = model.condition(prompts=[builtin_caption({"timbre_name": BUILTIN_TIMBRES[i % len(BUILTIN_TIMBRES)],
                                                         "class_name": BUILTIN_CLASSES[i % len(BUILTIN_CLASSES)]})
                                        for i in range(n)])
    elif model.config.condition == "embedding":
        cond = model.null_condition(n)
    result = straightness(model, noise, cond, steps=steps)
    return {"S": result["S"], "displacement": result["displacement"], "S_steps": steps, "S_samples": n}


def _load(path: str):
    from .pipelines.flow_files import load_flow_model

    model, info = load_flow_model(path)
    if model.config.family != "rectified_flow":
        raise ValueError(f"{path} holds a {model.config.family!r} model; reflow and distillation need a "
                         f"rectified flow")
    return model, info


# ----------------------------------------------------------------------------- reflow
def add_reflow_arguments(p):
    p.add_argument("--model", required=True, help="the trained 1-RF model: run directory, checkpoint or model folder")
    p.add_argument("--pairs-out", required=True, help="folder for the (noise seed, sample) pairs (reused when it "
                                                      "already holds the same pairs)")
    p.add_argument("--pairs", type=_positive_int, default=256, help="number of pairs (default 256)")
    p.add_argument("--steps", type=_positive_int, default=24, help="Euler steps per pair (default 24)")
    p.add_argument("--cfg", type=float, default=1.0, help="guidance scale of the pairs (default 1)")
    p.add_argument("--anchored", action="store_true", help="Anchored Optimization of guided pairs (cfg > 1)")
    p.add_argument("--label", type=int, nargs="+", default=None, help="labels to cycle (default all)")
    p.add_argument("--prompt", nargs="+", default=None, help="prompts to cycle (text models)")
    p.add_argument("--pairs-only", action="store_true", help="write the pairs, do not train 2-RF")
    _train_arguments(p)


def _pair_settings(args, model_file: str) -> dict:
    return {"n": args.pairs, "steps": args.steps, "cfg": args.cfg, "anchored": args.anchored, "labels": args.label,
            "prompts": args.prompt, "seed": getattr(args, "seed", 0), "source": model_file}


def make_or_reuse_pairs(args, model, info) -> dict:
    """Write the pair folder, or reuse it when it holds pairs made with the same settings from the same model."""
    from .pipelines.reflow import make_pairs, write_pairs

    settings = _pair_settings(args, info.get("checkpoint") or info.get("model"))
    meta_path = os.path.join(args.pairs_out, "pairs.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            made = (json.load(f).get("info") or {}).get("settings")
        if made != settings:
            raise ValueError(f"--pairs-out {args.pairs_out} holds other pairs (made with {made}); choose another "
                             f"folder or remove it")
        print(f"reusing the {args.pairs} pairs in {args.pairs_out}", file=sys.stderr)
        return {"reused": True}
    seed = settings["seed"]
    pairs = make_pairs(model, args.pairs, seed=seed + 1_000_000, steps=args.steps, cfg=args.cfg, labels=args.label,
                       prompts=args.prompt, anchored=args.anchored, batch_size=getattr(args, "batch_size", 8))
    pairs["info"].update({"settings": settings, "source_data": info.get("data")})
    write_pairs(args.pairs_out, pairs, model.config.to_dict())
    return {"reused": False, "seconds": pairs["info"]["seconds"]}


def run_reflow(args) -> int:
    from .training.loop import NonFiniteLossError

    try:
        if not args.pairs_only and "out" not in vars(args):
            raise ValueError("--out: the run directory of the 2-RF model (or --pairs-only to write just the pairs)")
        model, info = _load(args.model)
        report = {"pairs": args.pairs, "pairs_out": args.pairs_out, **make_or_reuse_pairs(args, model, info),
                  "1rf": straightness_report(model)}
        if not args.pairs_only:
            result = _train(args, args.pairs_out, args.model, "2-rf")
            report["train"] = _summary(result)
            if result["status"] != "interrupted":
                report["2rf"] = straightness_report(_load(result["out"])[0])
                report["S_ratio_1rf_over_2rf"] = report["1rf"]["S"] / max(report["2rf"]["S"], 1e-30)
    except (ValueError, TypeError, OSError, NonFiniteLossError) as e:
        print(f"sashimi reflow: error: {_one_line(e)}", file=sys.stderr)
        return 1
    print(json.dumps(report))
    return 0


def _summary(result: dict) -> dict:
    return {k: result[k] for k in ("status", "step", "val", "best_val", "unit", "seconds", "out")}


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


# ----------------------------------------------------------------------------- distill
def add_distill_arguments(p):
    p.add_argument("--model", required=True, help="the (2-RF) model to distil: run directory, checkpoint or folder")
    p.add_argument("--pairs", required=True, help="a reflow pair folder (sashimi reflow --pairs-out)")
    _train_arguments(p)


def run_distill(args) -> int:
    from .data.reflow_pairs import ReflowPairs
    from .training.loop import NonFiniteLossError

    try:
        if "out" not in vars(args):
            raise ValueError("--out: the run directory of the distilled model")
        teacher, _ = _load(args.model)
        ReflowPairs(args.pairs)  # a clear error before the run starts
        report = {"teacher": straightness_report(teacher)}
        result = _train(args, args.pairs, args.model, "distilled")
        report["train"] = _summary(result)
        if result["status"] != "interrupted":
            report["distilled"] = straightness_report(_load(result["out"])[0])
    except (ValueError, TypeError, OSError, NonFiniteLossError) as e:
        print(f"sashimi distill: error: {_one_line(e)}", file=sys.stderr)
        return 1
    print(json.dumps(report))
    return 0


COMMANDS = {
    "reflow": (add_reflow_arguments, run_reflow,
               "make reflow pairs from a 1-RF model and train 2-RF on them (Mix-Exp, immiscible; the shared loop)"),
    "distill": (add_distill_arguments, run_distill,
                "distil a (2-RF) flow into a one-step generator on reflow pairs (the shared loop)"),
}
