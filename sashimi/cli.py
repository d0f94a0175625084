"""Command line: `sashimi <command> ...` (also `python -m sashimi`, and under torchrun `-m sashimi`).

    sashimi train --data builtin --preset tiny --out runs/tiny --max-steps 300
    sashimi train --out runs/tiny --resume --max-steps 600
    sashimi train --data builtin --preset tiny --out runs/tiny30 --max-time 30m
    sashimi eval --ckpt runs/tiny --data builtin --split test --json runs/tiny/test.json
    sashimi generate --ckpt runs/tiny --n 4 --seconds 1
    sashimi train --data builtin --preset rf-tiny --out runs/rf1 --max-time 10m
    sashimi generate --ckpt runs/rf1 --steps 24 --cfg 3.0 --label 7 --n 8
    sashimi demo

The CLI only wires flags to the library: sashimi.training.loop.train, sashimi.training.evaluate.evaluate,
sashimi.pipelines.from_checkpoint.generate_from_checkpoint and sashimi.demo.run_demo.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing

# How subcommands are organised: COMMANDS (at the bottom) maps a name to
# (add_arguments(parser), run(args) -> exit code). To add one, write those two functions and add a line to COMMANDS; main() does the rest. Heavy imports (torch,
# the model) happen inside run functions so `sashimi --help` stays fast.


# ----------------------------------------------------------------------------- train


def _flag_type(annotation):
    """The argparse type for a TrainConfig field annotation (X | None: 'none' gives None)."""
    args = typing.get_args(annotation)
    if type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return lambda s: None if s.lower() == "none" else inner(s)
    return annotation


def add_train_arguments(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """One flag per TrainConfig field (--max-steps for max_steps, ...), help from the field; `exclude`:
    fields a command sets itself."""
    from .training.loop import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in exclude:
            continue
        flag = "--" + f.name.replace("_", "-")
        help = f.metadata.get("help", "")
        if "default" not in help:
            help += f" (default: {f.default!r})"
        if hints[f.name] is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help)
            continue
        parser.add_argument(flag, type=_flag_type(hints[f.name]), default=argparse.SUPPRESS, help=help,
                            metavar=f.name.upper())


def _os_message(e: BaseException) -> str:
    """One line for an error; an OSError names its file (if it has one) and its reason without '[Errno n]'."""
    if isinstance(e, OSError) and e.strerror:
        where = f"{e.filename}: " if e.filename else ""
        return where + e.strerror.strip().splitlines()[0]
    return _one_line(e)


def _saved_train_config(out: str) -> dict:
    """The training settings a run directory's config.json recorded ({} if there is none), minus the one-off
    flags (resume, overwrite); ValueError naming the file when it cannot be read."""
    path = os.path.join(out, "config.json")
    if not os.path.exists(path):
        return {}
    problem = None
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except OSError as e:
        problem = e.strerror or type(e).__name__
    except ValueError as e:  # empty, truncated or not JSON
        problem = f"not valid JSON: {str(e).splitlines()[0]}"
    else:
        base = saved.get("train") if isinstance(saved, dict) else None
        if not isinstance(base, dict):
            problem = "no 'train' settings in it"
    if problem is not None:
        raise ValueError(f"cannot read the run's settings from {path} ({problem}); restore or remove that file "
                         f"(resuming then uses only the flags given, so give every flag of the run)")
    return {k: v for k, v in base.items() if k not in ("resume", "overwrite")}


def run_train(args: argparse.Namespace) -> int:
    from .training.checkpoint import CheckpointError
    from .training.loop import NonFiniteLossError, TrainConfig, train

    given = {k: v for k, v in vars(args).items() if k not in ("command", "func")}
    # --resume starts from the run's saved configuration; flags given now override it
    try:
        base = _saved_train_config(given.get("out", TrainConfig.out)) if given.get("resume") else {}
        cfg = TrainConfig.from_dict({**base, **given})
        result = train(cfg)
    except (ValueError, OSError, NonFiniteLossError) as e:
        # user-caused problems (flags, data, checkpoints, files, divergence): one line, not a traceback
        kind = "error" if not isinstance(e, CheckpointError) else "checkpoint error"
        print(f"sashimi train: {kind}: {_os_message(e)}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return 0
    if result["status"] == "interrupted":
        print(f"interrupted at step {result['step']}; checkpoint {result['checkpoint']}")
    else:
        val = result["val"]
        how = "finished" if result["status"] == "finished" else f"stopped ({result['status']})"
        print(f"{how} at step {result['step']}" + (f": val {val:.4f} {result['unit']}" if val is not None else ""))
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

    from .training.rundir import check_output_file

    try:
        if args.json is not None:  # before the evaluation, not after it
            check_output_file(args.json, "--json")
        evaluate(args.ckpt, args.data, split=args.split, batch_size=args.batch_size, json_path=args.json,
                 use_ema=args.use_ema, preset=args.preset, n_items=args.n_items, num_workers=args.num_workers,
                 progress=args.progress)
    except (ValueError, OSError, FloatingPointError) as e:
        print(f"sashimi eval: error: {_os_message(e)}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- generate


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _print_generation(result, paths, speed: str | None = None) -> None:
    """What every generation command prints: files written, the speed line, scores, the page."""
    if speed is None:
        speed = (f"{result.samples_per_second:,.0f} samples/s = {result.real_time_factor:.3f}x real time "
                 f"({result.path} path); generated samples: {float(result.bits_per_sample.mean()):.3f} "
                 "bits/sample (mean NLL)")
    print(f"wrote {result.n_samples} samples ({result.audio.shape[1] / result.sample_rate:.3f} s at "
          f"{result.sample_rate} Hz) to {os.path.dirname(paths['index'])}")
    print(f"speed: {speed}")
    if paths.get("scores") is not None:
        from .metrics.cli import format_scores

        print(format_scores(paths["scores"]))
    print(f"listening page: {paths['index']}")


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="run directory (its best.pt, else last.pt) or checkpoint file")
    parser.add_argument("--n", type=int, default=16, help="number of samples (default: 16)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="length of each sample, prompt included (default: 4; a flow model makes clips of its "
                             "training length)")
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
    parser.add_argument("--score", default=None, metavar="CLS",
                        help="score the samples with this evaluation classifier (sashimi metrics train-classifier): "
                             "FID, IS, ... in samples.json and on the page")
    parser.add_argument("--score-real", default=None, metavar="DIR",
                        help="real audio to score against: a folder or 'builtin' (default: the run's data)")
    parser.add_argument("--real-clips", type=int, default=4, help="real clips shown on the page with --score (default: 4)")
    flow = parser.add_argument_group("rectified-flow and DiffWave models")
    flow.add_argument("--steps", type=int, default=None,
                      help="sampler steps: 1, 4, 24 ... (default: 24 Euler / 12 Heun for a flow, 200 DDPM / 50 DDIM)")
    flow.add_argument("--method", default=None, help="euler | heun (flows), ddpm | ddim (DiffWave)")
    flow.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale w (default: 1 = off)")
    flow.add_argument("--label", type=int, nargs="+", default=None, help="class labels, cycled over the samples")
    flow.add_argument("--prompt", nargs="+", default=None, help="text prompts, cycled over the samples")
    flow.add_argument("--embedding", default=None, metavar="FILE", help="(N, d) user embeddings (.npy or .pt)")
    flow.add_argument("--vocoder", default=None, metavar="DIR", help="WaveFlow vocoder of a mel-space model")


_FLOW_FLAGS = ("steps", "method", "cfg", "label", "prompt", "embedding", "vocoder")


def _run_flow_generate(args: argparse.Namespace) -> int:
    """`sashimi generate` of a rectified-flow or DiffWave model (routed by the checkpoint's family)."""
    from .pipelines.flow_files import generate_flow_files

    try:
        if args.prefix is not None or args.top_k or args.top_p != 1.0 or args.temperature != 1.0:
            raise ValueError("--prefix, --top-k, --top-p and --temperature apply to autoregressive models, not to "
                             "a rectified flow or DiffWave")
        if args.seconds is not None:
            raise ValueError("--seconds: a rectified flow or DiffWave model makes clips of its training length; "
                             "leave --seconds out")
        result, paths = generate_flow_files(
            args.ckpt, args.out, n=args.n, steps=args.steps, method=args.method,
            cfg=1.0 if args.cfg is None else args.cfg, labels=args.label, prompts=args.prompt,
            embedding=args.embedding, vocoder=args.vocoder, seed=args.seed, batch_size=args.batch_size,
            use_ema=args.use_ema, score=args.score, score_real=args.score_real, real_clips=args.real_clips)
    except (ValueError, TypeError, OSError, RuntimeError) as e:  # flags, conditions, checkpoints, files
        print(f"sashimi generate: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sashimi generate: interrupted; nothing written", file=sys.stderr)
        return 130
    s = result.info
    _print_generation(result, paths, speed=(
        f"{result.real_time_factor:.3f}x real time ({s['method']}, {s['steps']} steps, cfg {s['cfg']:g}, "
        f"{s['network_evaluations_per_batch']} network calls per batch, {result.seconds:.2f} s)"))
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from .pipelines.flow_files import flow_family
    from .pipelines.from_checkpoint import generate_from_checkpoint
    from .pipelines.waveflow import generate_files, is_waveflow_checkpoint

    if flow_family(args.ckpt) is not None:
        return _run_flow_generate(args)
    given = [f"--{name}" for name in _FLOW_FLAGS if getattr(args, name) is not None]
    if given:
        print(f"sashimi generate: error: {', '.join(given)} apply to rectified-flow and DiffWave models; {args.ckpt} "
              f"is not one", file=sys.stderr)
        return 1
    if args.seconds is None:
        args.seconds = 4.0
    if is_waveflow_checkpoint(args.ckpt):  # an unconditional WaveFlow: no prompt or token sampling flags
        try:
            if args.prefix is not None or args.top_k or args.top_p != 1.0:
                raise ValueError("--prefix, --top-k and --top-p apply to autoregressive models, not to a WaveFlow")
            generate_files(args.ckpt, args.out, args.n, args.seconds, args.temperature, args.seed, fast=args.fast)
        except (ValueError, OSError) as e:
            print(f"sashimi generate: error: {_one_line(e)}", file=sys.stderr)
            return 1
        return 0
    try:
        result, paths = generate_from_checkpoint(
            args.ckpt, args.out, n=args.n, seconds=args.seconds, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, prefix=args.prefix, batch_size=args.batch_size, seed=args.seed, fast=args.fast,
            use_ema=args.use_ema, progress=args.progress, score=args.score, score_real=args.score_real,
            real_clips=args.real_clips)
    except (ValueError, OSError) as e:  # flags, checkpoints (CheckpointError), audio files (AudioError), output
        print(f"sashimi generate: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sashimi generate: interrupted; nothing written", file=sys.stderr)
        return 130
    _print_generation(result, paths)
    return 0


# ----------------------------------------------------------------------------- vocode


def add_vocode_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="WaveFlow vocoder: run directory, checkpoint file or "
                        "shareable folder (config.json + model.safetensors)")
    parser.add_argument("--in", dest="inputs", nargs="+", required=True, metavar="FILE",
                        help="audio files (wav -> log-mel -> wav) or .npy log-mel arrays (n_mels, frames)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder: one listening page per input")
    parser.add_argument("--temperature", type=float, default=1.0, help="scale of the prior's noise (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    parser.add_argument("--plain", dest="fast", action="store_false",
                        help="invert with the plain oracle instead of the row-cached fast path")


def run_vocode(args: argparse.Namespace) -> int:
    from .pipelines.waveflow import vocode_files

    try:
        vocode_files(args.ckpt, args.inputs, args.out, args.temperature, args.seed, fast=args.fast)
    except (ValueError, OSError) as e:  # checkpoints, audio files, mel shapes
        print(f"sashimi vocode: error: {_one_line(e)}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- demo


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", metavar="DIR",
                        help="demo folder: DIR/run (training run), DIR/samples (listening page) (default: runs/demo)")
    parser.add_argument("--minutes", type=float, default=4.0, help="training time budget in minutes (default: 4)")
    parser.add_argument("--n", type=int, default=32, help="samples to generate and score (default: 32)")
    parser.add_argument("--seconds", type=float, default=1.0, help="length of each sample (default: 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classifier", default=None, metavar="CLS",
                        help="evaluation classifier for the scores (default: DIR/classifier, trained first if missing)")
    parser.add_argument("--no-score", dest="score", action="store_false", help="skip the sample-quality scores")
    parser.add_argument("--no-fast", dest="fast", action="store_false", help="generate with the eager step loop")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def run_demo(args: argparse.Namespace) -> int:
    from .demo import DEMO_TEST_CLIPS, run_demo as demo
    from .training.loop import NonFiniteLossError

    try:
        done = demo(args.out, minutes=args.minutes, n=args.n, seconds=args.seconds, seed=args.seed, fast=args.fast,
                    progress=args.progress, score=args.score, classifier=args.classifier)
    except (ValueError, OSError, NonFiniteLossError) as e:
        print(f"sashimi demo: error: {_one_line(e)}", file=sys.stderr)
        return 1
    print()
    print(f"sashimi demo done in {done['minutes']:.1f} min")
    if done["val_bits"] is not None:
        print(f"validation: {done['val_bits']:.3f} bits/sample; test ({DEMO_TEST_CLIPS} clips): "
              f"{done['test']['nll_bits_per_sample']:.3f} bits/sample (8 bits = no better than uniform)")
        sample_bits = float(done["result"].bits_per_sample.mean())
        print(f"generated samples: {sample_bits:.3f} bits/sample under the model, "
              f"{sample_bits - done['test']['nll_bits_per_sample']:+.3f} from the test NLL")
    _print_generation(done["result"], done["paths"])
    return 0


# ----------------------------------------------------------------------------- export


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="run directory (its best.pt, else last.pt) or checkpoint file")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for config.json and model.safetensors")
    parser.add_argument("--no-ema", dest="use_ema", action="store_false",
                        help="export the raw weights even when the checkpoint has EMA weights")


def run_export(args: argparse.Namespace) -> int:
    from .training.export import export_checkpoint

    try:
        info = export_checkpoint(args.ckpt, args.out, use_ema=args.use_ema)
    except (ValueError, OSError) as e:
        print(f"sashimi export: error: {e}", file=sys.stderr)
        return 1
    print(f"sashimi export: {info['source_checkpoint']} (step {info['step']}) -> {args.out}: "
          f"{'EMA' if info['weights'] == 'ema' else 'raw (no EMA in the checkpoint)' if args.use_ema else 'raw'} "
          f"weights; load with sashimi.from_pretrained({args.out!r})")
    return 0


# ----------------------------------------------------------------------------- entry point


def _metrics_cli():
    from .metrics import cli

    return cli


COMMANDS = {
    "train": (add_train_arguments, run_train, "train a model (or --resume a run); torchrun for many processes"),
    "eval": (add_eval_arguments, run_eval, "NLL in bits/sample of a checkpoint over a data split"),
    "generate": (add_generate_arguments, run_generate, "sample audio from a checkpoint: WAVs, samples.json, index.html"),
    "vocode": (add_vocode_arguments, run_vocode, "WaveFlow vocoder: wav files or log-mel arrays -> audio and a listening page"),
    "export": (add_export_arguments, run_export, "write a checkpoint as a shareable model folder "
               "(config.json + model.safetensors; EMA weights when present)"),
    "demo": (add_demo_arguments, run_demo, "train the tiny model for a few minutes, then generate a listening page"),
    "metrics": (lambda p: _metrics_cli().add_arguments(p), lambda a: _metrics_cli().run(a),
                "sample-quality metrics: train the evaluation classifier, score generated audio"),
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
