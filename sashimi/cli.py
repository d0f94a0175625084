"""Command line: `sashimi <command> ...` (also `python -m sashimi`, and under torchrun `-m sashimi`).

    sashimi train --data builtin --preset tiny --out runs/tiny --max-steps 300
    sashimi train --out runs/tiny --resume --max-steps 600
    sashimi eval --ckpt runs/tiny --data builtin --split test --json runs/tiny/test.json

The CLI only wires flags to sashimi.train.train and sashimi.evaluate.evaluate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing

# How subcommands are organised: COMMANDS (at the bottom) maps a name to
# (add_arguments(parser), run(args) -> exit code). To add one (e.g. `generate`, `demo`), write
# those two functions and add a line to COMMANDS; main() does the rest. Heavy imports (torch,
# the model) happen inside run functions so `sashimi --help` stays fast.


# ----------------------------------------------------------------------------- train


def _flag_type(annotation):
    """(argparse type, nargs) for a TrainConfig field annotation."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is tuple:  # tuple[int, ...]
        return args[0], "*"
    if type(None) in args:  # X | None: 'none' gives None
        (inner,) = [a for a in args if a is not type(None)]
        return (lambda s: None if s.lower() == "none" else inner(s)), None
    return annotation, None


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (--max-steps for max_steps, ...), help from the field."""
    from .train import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help = f.metadata.get("help", "")
        if "default" not in help:
            help += f" (default: {f.default!r})"
        if hints[f.name] is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help)
            continue
        kind, nargs = _flag_type(hints[f.name])
        parser.add_argument(flag, type=kind, nargs=nargs, default=argparse.SUPPRESS, help=help,
                            metavar=f.name.upper())


def run_train(args: argparse.Namespace) -> int:
    from .train import CheckpointError, NonFiniteLossError, TrainConfig, train

    given = {k: v for k, v in vars(args).items() if k not in ("command", "func")}
    if "debug_nonfinite_steps" in given:
        given["debug_nonfinite_steps"] = tuple(given["debug_nonfinite_steps"])
    # --resume starts from the run's saved configuration; flags given now override it
    base = {}
    saved = os.path.join(given.get("out", TrainConfig.out), "config.json")
    if given.get("resume") and os.path.exists(saved):
        with open(saved) as f:
            base = json.load(f)["train"]
    try:
        cfg = TrainConfig.from_dict({**base, **given})
        result = train(cfg)
    except (ValueError, FileExistsError, FileNotFoundError, NonFiniteLossError) as e:
        # user-caused problems (flags, data, checkpoints, divergence): a message, not a traceback
        kind = "error" if not isinstance(e, CheckpointError) else "checkpoint error"
        print(f"sashimi train: {kind}: {e}", file=sys.stderr)
        return 1
    if result["status"] == "interrupted":
        print(f"interrupted at step {result['step']}; checkpoint {result['checkpoint']}")
    else:
        val = result["val_bits"]
        print(f"finished at step {result['step']}" + (f": val {val:.4f} bits/sample" if val is not None else ""))
    return 0


# ----------------------------------------------------------------------------- eval


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="run directory (its best.pt, else last.pt) or checkpoint file")
    parser.add_argument("--data", default=None, help="'builtin' or a folder of audio files (default: the run's data)")
    parser.add_argument("--split", default="test", help="train, val or test (default: test)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the result to this JSON file")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-ema", dest="use_ema", action="store_false", help="use the raw weights, not the EMA")
    parser.add_argument("--preset", default=None, help="check that the checkpoint comes from this preset")
    parser.add_argument("--n-items", type=int, default=None, help="evaluate only the first N items")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def run_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate

    try:
        evaluate(args.ckpt, args.data, split=args.split, batch_size=args.batch_size, json_path=args.json,
                 use_ema=args.use_ema, preset=args.preset, n_items=args.n_items, num_workers=args.num_workers,
                 progress=args.progress)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"sashimi eval: error: {e}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- entry point

COMMANDS = {
    "train": (add_train_arguments, run_train, "train a model (or --resume a run); torchrun for many processes"),
    "eval": (add_eval_arguments, run_eval, "NLL in bits/sample of a checkpoint over a data split"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sashimi", description="SaShiMi raw-audio models: train and evaluate.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_arguments, run, help) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        add_arguments(p)
        p.set_defaults(func=run)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
