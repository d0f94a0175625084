"""Command line: `sashimi <command> ...` (also `python -m sashimi`, and under torchrun `-m sashimi`).

    sashimi train --data builtin --preset tiny --out runs/tiny --max-steps 300
    sashimi train --out runs/tiny --resume --max-steps 600
    sashimi eval --ckpt runs/tiny --data builtin --split test --json runs/tiny/test.json

The CLI only wires flags to sashimi.training.loop.train and sashimi.training.evaluate.evaluate.
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
    from .training.loop import TrainConfig

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
    from .training.loop import CheckpointError, NonFiniteLossError, TrainConfig, train

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
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return 0
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
    from .training.evaluate import evaluate

    try:
        evaluate(args.ckpt, args.data, split=args.split, batch_size=args.batch_size, json_path=args.json,
                 use_ema=args.use_ema, preset=args.preset, n_items=args.n_items, num_workers=args.num_workers,
                 progress=args.progress)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"sashimi eval: error: {e}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- generate


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _check_generate_flags(args: argparse.Namespace) -> None:
    """Flag errors before anything is loaded (ValueError naming the flag)."""
    from .pipelines.sampling import check_sampling

    check_sampling(args.temperature, args.top_k, args.top_p)
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if not args.seconds > 0:
        raise ValueError(f"--seconds must be > 0, got {args.seconds}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")


def _generate_to_folder(args: argparse.Namespace, info: dict | None = None, title: str = "sashimi samples"):
    """Checkpoint -> Generator -> WAVs, samples.json, index.html in args.out: (result, report paths)."""
    import warnings

    from .data.audio import probe_audio
    from .pipelines.generate import FastPathWarning, Generator
    from .models.autoregressive import describe
    from .pipelines.report import write_report
    from .training.loop import BEST_CHECKPOINT, LAST_CHECKPOINT, load_checkpoint, model_from_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(args.ckpt, prefer=(BEST_CHECKPOINT, LAST_CHECKPOINT))
    state = load_checkpoint(path)
    model = model_from_checkpoint(state, use_ema=args.use_ema, path=path)
    rate = model.config.sample_rate
    print(f"sashimi generate: {path} (step {state.get('step')}): {describe(model)}")
    if args.prefix is not None:
        file_rate = probe_audio(args.prefix, check_content=False).sample_rate
        if file_rate != rate:
            print(f"note: prefix {args.prefix} is at {file_rate} Hz; resampled to the model's {rate} Hz")
    batch_size = args.batch_size or min(args.n, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FastPathWarning)
        generator = Generator(model, batch_size=batch_size, fast="auto" if args.fast else False)
    if any(issubclass(w.category, FastPathWarning) for w in caught):
        print(f"note: fast path unavailable ({generator.fast_reason}); using the eager step loop")
    result = generator.generate(args.n, seconds=args.seconds, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed, prefix=args.prefix, progress=args.progress)
    out = args.out if args.out is not None else os.path.join(os.path.dirname(os.path.abspath(path)), "samples")
    info = {"checkpoint": os.path.abspath(path), "step": state.get("step"), "preset": state.get("preset"),
            "ema_weights": bool(args.use_ema and state.get("ema") is not None), **(info or {})}
    paths = write_report(out, result, info=info, title=title)
    return result, paths


def _print_generation(result, paths) -> None:
    print(f"wrote {result.n_samples} samples ({result.audio.shape[1] / result.sample_rate:.3f} s at "
          f"{result.sample_rate} Hz) to {os.path.dirname(paths['index'])}")
    print(f"speed: {result.samples_per_second:,.0f} samples/s = {result.real_time_factor:.3f}x real time "
          f"({result.path} path); generated samples: {float(result.bits_per_sample.mean()):.3f} bits/sample (mean NLL)")
    print(f"listening page: {paths['index']}")


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="run directory (its best.pt, else last.pt) or checkpoint file")
    parser.add_argument("--n", type=int, default=16, help="number of samples (default: 16)")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each sample, prompt included (default: 4)")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 = greedy (default: 1)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default: 1 = off)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the K most likely levels (default: 0 = all)")
    parser.add_argument("--prefix", default=None, metavar="FILE",
                        help="audio prompt every sample continues (resampled to the model's rate)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences generated together (default: min(n, 16))")
    parser.add_argument("--seed", type=int, default=0, help="seed: the same seed gives the same audio (default: 0)")
    parser.add_argument("--out", default=None, metavar="DIR", help="output folder (default: RUN_DIR/samples)")
    parser.add_argument("--no-fast", dest="fast", action="store_false", help="use the eager step loop (the oracle)")
    parser.add_argument("--no-ema", dest="use_ema", action="store_false", help="use the raw weights, not the EMA")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def run_generate(args: argparse.Namespace) -> int:
    try:
        _check_generate_flags(args)
        result, paths = _generate_to_folder(args)
    except (ValueError, OSError) as e:  # flags, checkpoints (CheckpointError), audio files (AudioError), output
        print(f"sashimi generate: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sashimi generate: interrupted; nothing written", file=sys.stderr)
        return 130
    _print_generation(result, paths)
    return 0


# ----------------------------------------------------------------------------- demo


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", metavar="DIR",
                        help="demo folder: DIR/run (training run), DIR/samples (listening page) (default: runs/demo)")
    parser.add_argument("--minutes", type=float, default=4.0, help="training time budget in minutes (default: 4)")
    parser.add_argument("--n", type=int, default=4, help="samples to generate (default: 4)")
    parser.add_argument("--seconds", type=float, default=1.0, help="length of each sample (default: 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-fast", dest="fast", action="store_false", help="generate with the eager step loop")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


_DEMO_TRAIN = dict(data="builtin", preset="tiny", sample_len=1024, batch_size=8, n_val_items=16, lr=4e-3)
_DEMO_TEST_CLIPS = 16  # test clips evaluated after training


def _demo_step_seconds(threads: int, give_up_after: float | None = None) -> float:
    """Seconds per training step of the demo recipe with this many torch threads (a short timing run).

    Stops early when a step takes longer than give_up_after seconds (clearly the slower choice).
    """
    import time

    import torch

    from .models.autoregressive import build_model

    torch.set_num_threads(threads)
    model = build_model(_DEMO_TRAIN["preset"], sample_len=_DEMO_TRAIN["sample_len"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, model.n_classes, (_DEMO_TRAIN["batch_size"], _DEMO_TRAIN["sample_len"]))
    times = []
    for _ in range(3):  # the first is warm-up
        t0 = time.perf_counter()
        bits, count = model(x, x)
        (bits / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - t0)
        if give_up_after is not None and times[-1] > give_up_after:
            return times[-1]
    return min(times[1:]) * 1.15  # plus data loading, validation and checkpoints


def run_demo(args: argparse.Namespace) -> int:
    import time

    import torch

    from .training.evaluate import evaluate
    from .training.loop import LAST_CHECKPOINT, NonFiniteLossError, TrainConfig, read_metrics, train

    t_start = time.time()
    run_dir, samples_dir = os.path.join(args.out, "run"), os.path.join(args.out, "samples")
    try:
        if not args.minutes > 0:
            raise ValueError(f"--minutes must be > 0, got {args.minutes}")
        val_bits, steps = None, None
        if os.path.exists(os.path.join(run_dir, LAST_CHECKPOINT)):
            print(f"sashimi demo: {run_dir} already holds a trained model; skipping training "
                  f"(delete it or pass another --out to train again)")
            vals = [r["val_bits"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if "val_bits" in r]
            val_bits = vals[-1] if vals else None
        else:
            # size the step budget from this machine's measured speed (1 or 2 threads, whichever is faster)
            timings = {1: _demo_step_seconds(1)}
            if (os.cpu_count() or 1) > 1:
                timings[2] = _demo_step_seconds(2, give_up_after=3 * timings[1])
            threads = min(timings, key=timings.get)
            torch.set_num_threads(threads)
            budget = args.minutes * 60 - (time.time() - t_start)
            steps = int(min(20_000, max(20, budget / timings[threads])))
            print(f"sashimi demo: training the 'tiny' preset on builtin data for {steps} steps "
                  f"(~{steps * timings[threads] / 60:.1f} min at {timings[threads]:.2f} s/step, {threads} thread(s)); "
                  f"Ctrl-C stops training early and goes on to generation")
            cfg = TrainConfig(**_DEMO_TRAIN, out=run_dir, max_steps=steps, warmup_steps=max(10, steps // 20),
                              val_every=-(-steps // 4), ckpt_every=-(-steps // 4), log_every=10,
                              seed=args.seed, progress=args.progress)
            summary = train(cfg)
            val_bits, steps = summary["val_bits"], summary["step"]
            if val_bits is None:  # interrupted before the final validation
                vals = [r["val_bits"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if "val_bits" in r]
                val_bits = vals[-1] if vals else None
        t_trained = time.time()
        test = evaluate(run_dir, "builtin", split="test", n_items=_DEMO_TEST_CLIPS, batch_size=8,
                        progress=args.progress)
        gen_args = argparse.Namespace(ckpt=run_dir, n=args.n, seconds=args.seconds, temperature=1.0, top_k=0,
                                      top_p=1.0, prefix=None, batch_size=args.n, seed=args.seed, out=samples_dir,
                                      fast=args.fast, use_ema=True, progress=args.progress)
        _check_generate_flags(gen_args)
        info = {"training_steps": steps, "training_minutes": round((t_trained - t_start) / 60, 2),
                "val_bits_per_sample": val_bits, "test_bits_per_sample": test["nll_bits_per_sample"],
                "data": "builtin (synthetic)"}
        result, paths = _generate_to_folder(gen_args, info=info, title="sashimi demo: tiny model on builtin data")
    except (ValueError, OSError, NonFiniteLossError) as e:
        print(f"sashimi demo: error: {_one_line(e)}", file=sys.stderr)
        return 1
    print()
    print(f"sashimi demo done in {(time.time() - t_start) / 60:.1f} min")
    if val_bits is not None:
        print(f"validation: {val_bits:.3f} bits/sample; test ({_DEMO_TEST_CLIPS} clips): "
              f"{test['nll_bits_per_sample']:.3f} bits/sample "
              f"(8 bits = no better than uniform)")
    _print_generation(result, paths)
    return 0


# ----------------------------------------------------------------------------- entry point

COMMANDS = {
    "train": (add_train_arguments, run_train, "train a model (or --resume a run); torchrun for many processes"),
    "eval": (add_eval_arguments, run_eval, "NLL in bits/sample of a checkpoint over a data split"),
    "generate": (add_generate_arguments, run_generate, "sample audio from a checkpoint: WAVs, samples.json, index.html"),
    "demo": (add_demo_arguments, run_demo, "train the tiny model for a few minutes, then generate a listening page"),
}
from .cli_flows import COMMANDS as _FLOW_COMMANDS  # noqa: E402  (argument parsers only; torch loads on use)

COMMANDS.update(_FLOW_COMMANDS)


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
