"""Command-line wiring of the flow families: train-flow, reflow, distill, generate-flow.

    sashimi train-flow --preset rf-tiny --data builtin --out runs/rf1 --steps 300
    sashimi reflow --model runs/rf1 --pairs-out runs/pairs --pairs 256 --out runs/rf2 --train-steps 300
    sashimi distill --model runs/rf2 --pairs runs/pairs --out runs/rf1step --train-steps 200
    sashimi generate-flow --model runs/rf1step --steps 1 --label 7 --cfg 3.0 --n 8 --out samples/

Each command prints one JSON line of results (straightness S for reflow and distill).
"""

from __future__ import annotations

import argparse
import json
import os

__all__ = ["COMMANDS", "add_flow_generate_arguments", "run_flow_generate"]


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text}")
    return value


def _common_fit(p):
    p.add_argument("--train-steps", type=_positive_int, default=300, help="optimiser steps (default 300)")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_positive_int, default=None)


def _threads(args):
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def flow_dataset(config, data: str, split: str = "train", n_items: int | None = None):
    """Audio items at the model's rate and clip length (captioned for prompt models), or a reflow pair folder."""
    if isinstance(data, str) and os.path.exists(os.path.join(data, "pairs.json")):
        from .pipelines.reflow import ReflowPairs

        return ReflowPairs(data)
    from .data.datasets import dataset_for
    from .training.flow_fit import CaptionedDataset

    dataset = dataset_for(config, data, split, n_items=n_items)
    if config.condition == "text":
        if not hasattr(dataset, "clip_info"):
            raise ValueError("a prompt-conditioned model trains on the builtin data (its clips have captions)")
        dataset = CaptionedDataset(dataset)
    return dataset


# ----------------------------------------------------------------------------- train-flow
def add_train_flow_arguments(p):
    p.add_argument("--preset", required=True, help="a rectified-flow (rf-*) or DiffWave (diffwave-*) preset")
    p.add_argument("--data", default="builtin", help="'builtin' or a folder of audio (default builtin)")
    p.add_argument("--out", required=True, help="directory of the trained model (config.json, model.safetensors)")
    p.add_argument("--n-items", type=_positive_int, default=None)
    _common_fit(p)


def run_train_flow(args) -> int:
    from .models import diffwave, rectified_flow
    from .training.flow_fit import fit

    _threads(args)
    if args.preset in rectified_flow.PRESETS:
        model = rectified_flow.build(args.preset)
    elif args.preset in diffwave.PRESETS:
        model = diffwave.build(args.preset)
    else:
        raise ValueError(f"unknown flow preset {args.preset!r}; expected one of "
                         f"{sorted(rectified_flow.PRESETS) + sorted(diffwave.PRESETS)}")
    result = fit(model, flow_dataset(model.config, args.data, "train", args.n_items), steps=args.train_steps,
                 batch_size=args.batch_size, lr=args.lr, seed=args.seed, out=args.out)
    print(json.dumps(result))
    return 0


# ----------------------------------------------------------------------------- reflow / distill
def _straightness(model, n: int = 16, steps: int = 24, seed: int = 1234) -> dict:
    import torch

    from .pipelines.flow_sampling import straightness

    noise = torch.randn(model.noise_shape(n), generator=torch.Generator().manual_seed(seed))
    cond = None
    if model.config.condition == "label":
        cond = model.condition(labels=[i % model.config.n_classes for i in range(n)])
    elif model.config.condition == "text":
        cond = model.condition(prompts=["harmonic arpeggio up"] * n)
    result = straightness(model, noise, cond, steps=steps)
    return {"S": result["S"], "displacement": result["displacement"], "S_steps": steps, "S_samples": n}


def add_reflow_arguments(p):
    p.add_argument("--model", required=True, help="the trained 1-RF model directory")
    p.add_argument("--pairs-out", required=True, help="folder for the (noise seed, sample) pairs")
    p.add_argument("--pairs", type=_positive_int, default=256, help="number of pairs (default 256)")
    p.add_argument("--steps", type=_positive_int, default=24, help="Euler steps per pair (default 24)")
    p.add_argument("--cfg", type=float, default=1.0, help="guidance scale of the pairs (default 1)")
    p.add_argument("--anchored", action="store_true", help="Anchored Optimization of guided pairs (cfg > 1)")
    p.add_argument("--label", type=int, nargs="*", default=None, help="labels to cycle (default all)")
    p.add_argument("--prompt", nargs="*", default=None, help="prompts to cycle (text models)")
    p.add_argument("--out", default=None, help="train 2-RF on the pairs into this directory")
    p.add_argument("--mix-exp-a", type=float, default=4.0)
    p.add_argument("--no-immiscible", action="store_true")
    _common_fit(p)


def run_reflow(args) -> int:
    from .models.flow_model import FlowModel
    from .models.rectified_flow import RectifiedFlowModel, reflow_config
    from .pipelines.reflow import ReflowPairs, make_pairs, write_pairs
    from .training.flow_fit import fit

    _threads(args)
    model = FlowModel.from_pretrained(args.model)
    if model.config.family != "rectified_flow":
        raise ValueError(f"reflow needs a rectified flow, {args.model} holds a {model.config.family!r} model")
    pairs = make_pairs(model, args.pairs, seed=args.seed + 1_000_000, steps=args.steps, cfg=args.cfg,
                       labels=args.label, prompts=args.prompt, anchored=args.anchored, batch_size=args.batch_size)
    write_pairs(args.pairs_out, pairs, model.config.to_dict())
    report = {"pairs": args.pairs, "pair_seconds": pairs["info"]["seconds"], "pairs_out": args.pairs_out,
              "1rf": _straightness(model)}
    if args.out:
        reflowed = RectifiedFlowModel(reflow_config(model.config, a=args.mix_exp_a, immiscible=not args.no_immiscible))
        reflowed.load_state_dict(model.state_dict())
        report["train"] = fit(reflowed, ReflowPairs(args.pairs_out), steps=args.train_steps,
                              batch_size=args.batch_size, lr=args.lr, seed=args.seed, out=args.out)
        report["2rf"] = _straightness(reflowed)
        report["S_ratio_1rf_over_2rf"] = report["1rf"]["S"] / max(report["2rf"]["S"], 1e-30)
    print(json.dumps(report))
    return 0


def add_distill_arguments(p):
    p.add_argument("--model", required=True, help="the (2-RF) model to distil")
    p.add_argument("--pairs", required=True, help="a reflow pair folder")
    p.add_argument("--out", required=True)
    _common_fit(p)


def run_distill(args) -> int:
    from .models.flow_model import FlowModel
    from .models.rectified_flow import RectifiedFlowModel, distill_config
    from .pipelines.reflow import ReflowPairs
    from .training.flow_fit import fit

    _threads(args)
    teacher = FlowModel.from_pretrained(args.model)
    if teacher.config.family != "rectified_flow":
        raise ValueError(f"distill needs a rectified flow, {args.model} holds a {teacher.config.family!r} model")
    student = RectifiedFlowModel(distill_config(teacher.config))
    student.load_state_dict(teacher.state_dict())
    report = {"teacher": _straightness(teacher)}
    report["train"] = fit(student, ReflowPairs(args.pairs), steps=args.train_steps, batch_size=args.batch_size,
                          lr=args.lr, seed=args.seed, out=args.out)
    report["distilled"] = _straightness(student)
    print(json.dumps(report))
    return 0


# ----------------------------------------------------------------------------- generate
def add_flow_generate_arguments(p):
    p.add_argument("--model", required=True, help="a saved flow / DiffWave model directory")
    p.add_argument("--out", required=True, help="folder for the WAVs, samples.json and index.html")
    p.add_argument("--n", type=int, default=4, help="number of samples (default 4)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: 24 Euler / 200 DDPM)")
    p.add_argument("--method", default=None, help="euler | heun (flows), ddpm | ddim (DiffWave)")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (default 1)")
    p.add_argument("--label", type=int, nargs="*", default=None)
    p.add_argument("--prompt", nargs="*", default=None)
    p.add_argument("--embedding", default=None, help="a .npy or .pt file of (N, d) user embeddings")
    p.add_argument("--vocoder", default=None, help="a WaveFlow vocoder directory (mel-space models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--threads", type=_positive_int, default=None)


def _load_embedding(path):
    import numpy as np
    import torch

    if not os.path.exists(path):
        raise FileNotFoundError(f"--embedding: no file {path}")
    if path.endswith(".npy"):
        return torch.from_numpy(np.load(path)).float()
    return torch.load(path, weights_only=True).float()


def run_flow_generate(args) -> int:
    from .models.flow_model import FlowModel
    from .pipelines.flow_generate import FlowPipeline
    from .pipelines.flow_report import write_flow_report

    _threads(args)
    if args.n < 1:
        raise ValueError(f"--n must be >= 1 (the number of samples to generate), got {args.n}")
    if args.prompt is not None and not args.prompt:
        raise ValueError("--prompt needs at least one prompt")
    model = FlowModel.from_pretrained(args.model)
    vocoder = None
    if args.vocoder:
        from .models.waveflow import WaveFlow

        vocoder = WaveFlow.from_pretrained(args.vocoder).eval()
    embedding = _load_embedding(args.embedding) if args.embedding else None
    result = FlowPipeline(model, vocoder)(args.n, labels=args.label, prompts=args.prompt, embedding=embedding,
                                          steps=args.steps, method=args.method, cfg=args.cfg, seed=args.seed,
                                          batch_size=args.batch_size)
    paths = write_flow_report(args.out, result, {"model": args.model, "stage": model.config.stage})
    print(json.dumps({"index": paths["index"], "real_time_factor": result.real_time_factor,
                      "seconds": result.seconds, **result.info}))
    return 0


def _guarded(name, run):
    """run(args) with user errors (flags, files, conditions) printed as one line and exit code 1."""
    import sys

    def guarded(args) -> int:
        try:
            return run(args)
        except (ValueError, TypeError, OSError) as e:
            print(f"sashimi {name}: error: {e}", file=sys.stderr)
            return 1
    return guarded


COMMANDS = {
    "train-flow": (add_train_flow_arguments, _guarded("train-flow", run_train_flow),
                   "train a rectified flow (rf-*) or the DiffWave baseline (diffwave-*) preset"),
    "reflow": (add_reflow_arguments, _guarded("reflow", run_reflow),
               "make reflow pairs from a 1-RF model and train 2-RF on them (Mix-Exp, immiscible)"),
    "distill": (add_distill_arguments, _guarded("distill", run_distill),
                "distil a (2-RF) flow into a one-step generator"),
    "generate-flow": (add_flow_generate_arguments, _guarded("generate-flow", run_flow_generate),
                      "sample a flow / DiffWave model: WAVs, samples.json (real-time factor), index.html"),
}
